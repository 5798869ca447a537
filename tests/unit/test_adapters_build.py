"""build_twin dispatcher: patient demographics, ledger completeness, malformed input, synthetic cohort."""

from __future__ import annotations

import logging
from datetime import date
from typing import Any

import pytest

from fhirtwin.adapters import build_twin, flatten_resources
from fhirtwin.twin import LedgerKind, TwinState

REF = date(2025, 1, 1)
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"


def patient(pid: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": "3"},
        "gender": "female",
        "birthDate": "1961-08-20",
        "name": [{"family": "Synthetic", "given": ["Test"]}],
        "extension": [
            {
                "url": RACE_URL,
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2054-5"},
                    },
                    {"url": "text", "valueString": "Black or African American"},
                ],
            }
        ],
        **extra,
    }


def lab(rid: str, code: str, value: Any, unit: str | None = "mg/dL", subject: str = "Patient/p1") -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    if unit:
        q |= {"unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-03-03",
        "valueQuantity": q,
    }


def test_patient_demographics_and_age():
    st = build_twin("p1", [patient()], REF)
    demo = st.demographics
    assert (demo.sex, demo.race) == ("female", "african_american")
    assert st.age_years() == 63
    assert demo.source is not None and demo.source.reference == "Patient/p1/_history/3"
    assert demo.source in st.sources()
    assert len(st.ledger) == 0


def test_patient_race_white_other_and_multiple():
    def with_races(*codes: str) -> dict[str, Any]:
        ext = [{"url": "ombCategory", "valueCoding": {"code": c}} for c in codes]
        return patient(extension=[{"url": RACE_URL, "extension": ext}])

    assert build_twin("p1", [with_races("2106-3")], REF).demographics.race == "white"
    assert build_twin("p1", [with_races("2028-9")], REF).demographics.race == "other"
    assert build_twin("p1", [with_races("2106-3", "2054-5")], REF).demographics.race == "other"
    assert build_twin("p1", [patient(extension=[])], REF).demographics.race is None


def test_patient_deceased_and_partial_birth_date():
    st = build_twin("p1", [patient(deceasedDateTime="2024-02-02", birthDate="1961")], REF)
    assert st.demographics.deceased is True
    assert st.demographics.birth_date == date(1961, 7, 1)
    assert st.ledger.kinds_for("Patient/p1") == {LedgerKind.DERIVED}


def test_bundles_are_unpacked():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient()}, {"resource": lab("tc", "2093-3", 190.0)}],
    }
    assert len(flatten_resources([bundle])) == 2
    st = build_twin("p1", [bundle], REF)
    assert st.value("total_cholesterol_mg_dl") == 190.0


def test_malformed_resources_recorded_and_build_continues():
    inputs: list[Any] = [
        patient(),
        "not a resource",
        {"resourceType": "Observation", "status": "final"},  # no id
        {"resourceType": "Observation", "id": "nocode", "status": "final", "subject": {"reference": "Patient/p1"}},
        lab("nan", "2093-3", "one hundred"),
        {
            "resourceType": "Condition",
            "id": "badtime",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "onsetDateTime": "last spring",
        },
        {
            "resourceType": "MedicationRequest",
            "id": "nomed",
            "status": "active",
            "intent": "order",
            "authoredOn": "2020-01-01",
        },
        lab("good", "2093-3", 180.0),
    ]
    st = build_twin("p1", inputs, REF)
    assert st.value("total_cholesterol_mg_dl") == 180.0
    malformed = {e.source for e in st.ledger.entries(kind="malformed")}
    assert {
        "input[1]",
        "Observation/?[2]",
        "Observation/nocode",
        "Observation/nan",
        "Condition/badtime",
        "MedicationRequest/nomed",
    } <= malformed


def test_wrong_subject_and_unsupported_types():
    st = build_twin(
        "p1",
        [
            lab("other", "2093-3", 190.0, subject="Patient/p2"),
            patient("p2"),
            {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}},
            {"resourceType": "DiagnosticReport", "id": "dr", "subject": {"reference": "Patient/p1"}},
        ],
        REF,
    )
    assert st.latest_or_none("total_cholesterol_mg_dl") is None
    assert st.ledger.kinds_for("Observation/other") == {LedgerKind.WRONG_SUBJECT}
    assert st.ledger.kinds_for("Patient/p2") == {LedgerKind.WRONG_SUBJECT}
    assert st.ledger.kinds_for("Encounter/e1") == {LedgerKind.UNSUPPORTED}
    assert st.ledger.kinds_for("DiagnosticReport/dr") == {LedgerKind.UNSUPPORTED}


def assert_every_input_accounted(state: TwinState, resources: list[dict[str, Any]]) -> None:
    used = {s.unversioned for s in state.sources()}
    ledgered = {src.split("/_history/")[0] for src in state.ledger.sources()}
    for res in resources:
        key = f"{res['resourceType']}/{res['id']}"
        assert key in used or key in ledgered, key


def test_ledger_never_silently_drops():
    resources = [
        patient(),
        lab("a", "2093-3", 190.0),
        lab("b", "2093-3", 190.0),
        lab("c", "2093-3", 20.0),
        lab("d", "2093-3", 5.0, None),
        lab("e", "8867-4", 70.0, "/min"),
        lab("f", "2085-9", 2.0, "mmol/L"),
        {"resourceType": "Medication", "id": "m", "code": {"text": "unused"}},
    ]
    st = build_twin("p1", resources, REF)
    assert_every_input_accounted(st, resources)
    assert st.ledger.kinds_for("Medication/m") == {LedgerKind.UNSUPPORTED}


def test_logs_carry_no_identifiers_or_values(caplog):
    with caplog.at_level(logging.DEBUG, logger="fhirtwin"):
        build_twin("p1", [patient(), lab("x", "2093-3", 187.3), lab("y", "2093-3", "bad")], REF)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert text
    for secret in ("p1", "1961", "187.3", "Synthetic", "Patient/"):
        assert secret not in text


def test_json_round_trip_of_a_built_twin():
    st = build_twin("p1", [patient(), lab("x", "2093-3", 190.0), lab("y", "2093-3", 5.0, None)], REF)
    assert TwinState.from_json(st.to_json()) == st


# -- synthetic cohort (fhirtwin.sandbox.cohort) --------------------------------------------------------

EXPECTED_LEDGER_KIND = {
    "lipid-mmol-l": None,  # any entry: converted, or rejected for another injected reason
    "creatinine-umol-l": None,
    "missing-unit": LedgerKind.MISSING_UNIT,
    "entered-in-error": LedgerKind.ENTERED_IN_ERROR,
    "duplicate": LedgerKind.DUPLICATE,
    "implausible": LedgerKind.IMPLAUSIBLE,
    "preliminary": LedgerKind.NOT_FINAL,
    "condition-refuted": LedgerKind.REFUTED,
    "condition-entered-in-error": LedgerKind.ENTERED_IN_ERROR,
}


def test_synthetic_cohort_every_resource_accounted_and_messy_items_ledgered():
    cohort_mod = pytest.importorskip("fhirtwin.sandbox.cohort")
    cohort = cohort_mod.generate_cohort(n_patients=20, seed=cohort_mod.DEFAULT_SEED)
    reference = date(2026, 6, 30)
    checked = 0
    for bundle in cohort.bundles:
        resources = flatten_resources([bundle])
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        state = build_twin(pid, [bundle], reference)
        assert_every_input_accounted(state, resources)
        truth = cohort.truth[pid]
        assert state.demographics.sex == truth["sex"]
        for item in truth["messy"]:
            if item["kind"] == "sparse-patient":
                continue
            kinds = state.ledger.kinds_for(
                next(f"{r['resourceType']}/{r['id']}" for r in resources if r["id"] == item["id"])
            )
            want = EXPECTED_LEDGER_KIND[item["kind"]]
            assert kinds, item
            assert want is None or want in kinds, (item, kinds)
            checked += 1
        genotypes = truth.get("genotypes") or {}
        if genotypes.get("tested") and genotypes.get("apol1_risk_alleles") is not None:
            assert state.value("apol1_risk_alleles", as_of=reference) == genotypes["apol1_risk_alleles"]
    assert checked > 0
