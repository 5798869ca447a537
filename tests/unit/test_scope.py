"""Scope decisions: who gets a primary-prevention forecast, coded on every output; who gets a coded refusal."""

from __future__ import annotations

import copy
from datetime import date

import pytest
from writeback_fixtures import NOW, versioned_resources

from fhirtwin.adapters import build_twin
from fhirtwin.engine import Engine, OutOfScope
from fhirtwin.sim.scope import decide_scope
from fhirtwin.writeback.jws import generate_key

REF = date(2026, 6, 30)
SCOPE_EXT = "https://fhirtwin.org/fhir/StructureDefinition/scope-decision"


def condition(pid: str, rid: str, snomed: str, text: str, **extra: object) -> dict:
    return {"resourceType": "Condition", "id": rid, "meta": {"versionId": "1"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": snomed}], "text": text},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": "2019-03-01", **extra}


def record_with(*extra: dict) -> tuple[str, list[dict]]:
    patient_id, resources = versioned_resources()
    keep = [r for r in resources if r["resourceType"] != "Condition"]  # a clean problem list
    return patient_id, keep + [copy.deepcopy(e) for e in extra]


def test_a_patient_without_exclusions_is_in_scope_and_every_output_says_so() -> None:
    patient_id, resources = record_with()
    engine = Engine(signing_key=generate_key())
    run = engine.simulate(build_twin(patient_id, resources, REF), draws=100)
    assert run.scope is not None and run.scope.in_scope and run.scope.code == "scope-primary-prevention"
    plan = run.require_plan()
    assert plan.scope == "scope-primary-prevention"
    from fhirtwin.writeback.transaction import build_patient_write

    bundle = build_patient_write(plan, run.state, key=generate_key(), now=NOW).bundle
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] in ("RiskAssessment", "CarePlan"):
            [ext] = [e for e in resource["extension"] if e["url"] == SCOPE_EXT]
            assert ext["valueCodeableConcept"]["coding"][0]["code"] == "scope-primary-prevention"


@pytest.mark.parametrize(("snomed", "text", "code"), [
    ("22298006", "Myocardial infarction", "scope-established-ascvd"),
    ("230690007", "Cerebrovascular accident", "scope-established-ascvd"),
    ("84114007", "Heart failure", "scope-heart-failure"),
])
def test_established_disease_is_out_of_scope_with_a_coded_reason(snomed: str, text: str, code: str) -> None:
    patient_id, resources = record_with(condition("x", "c-exclusion", snomed, text))
    for r in resources:
        if r["resourceType"] == "Condition":
            r["subject"] = {"reference": f"Patient/{patient_id}"}
    state = build_twin(patient_id, resources, REF)
    decision = decide_scope(state)
    assert not decision.in_scope and decision.code == code
    assert decision.sources == ("Condition/c-exclusion/_history/1",)
    run = Engine().simulate(state, draws=100)
    assert run.plan is None and run.scope == decision
    with pytest.raises(OutOfScope) as info:
        run.require_plan()
    issue = info.value.outcome()["issue"][0]
    assert info.value.http_status == 422 and issue["code"] == "not-supported"
    assert issue["details"]["coding"][0] == {"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": code,
                                             "display": issue["details"]["text"]}


def test_a_refuted_mi_does_not_count_but_a_resolved_heart_failure_still_excludes() -> None:
    refuted = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                           "code": "refuted"}]}
    patient_id, resources = record_with(condition("x", "c-mi", "22298006", "Myocardial infarction",
                                                  verificationStatus=refuted))
    for r in resources:
        if r["resourceType"] == "Condition":
            r["subject"] = {"reference": f"Patient/{patient_id}"}
    state = build_twin(patient_id, resources, REF)
    assert decide_scope(state).in_scope
    assert [e.kind.value for e in state.ledger.entries(source="Condition/c-mi")] == ["refuted"]
    resolved = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "resolved"}]}
    _, with_hf = record_with(condition("x", "c-hf", "84114007", "Heart failure", clinicalStatus=resolved,
                                       abatementDateTime="2024-01-01"))
    for r in with_hf:
        if r["resourceType"] == "Condition":
            r["subject"] = {"reference": f"Patient/{patient_id}"}
    decision = decide_scope(build_twin(patient_id, with_hf, REF))
    # heart failure is a history condition: a "resolved" episode does not return the patient to PREVENT's
    # derivation population (people without heart failure)
    assert decision.code == "scope-heart-failure"


def test_age_outside_the_equations_range_is_out_of_scope() -> None:
    patient_id, resources = record_with()
    for r in resources:
        if r["resourceType"] == "Patient":
            r["birthDate"] = "1940-01-01"
    decision = decide_scope(build_twin(patient_id, resources, REF))
    assert decision.code == "scope-age" and not decision.in_scope
