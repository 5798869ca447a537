"""Privacy consent: which active Consents deny a purpose of use, and that a denied patient's record is never read."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import pytest
import responses

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.consent import ACT_REASON, ConsentDenied, ConsentPolicy
from fhirtwin.engine import BadRequest, Engine
from fhirtwin.fhir.client import FhirClient

BASE = "https://fhir.example.org/r4"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TREAT = ConsentPolicy("TREAT")
RESEARCH = ConsentPolicy("HRESCH")


def purpose(code: str) -> dict[str, str]:
    return {"system": ACT_REASON, "code": code}


def consent(provision: dict[str, Any] | None, *, status: str = "active", scope: str = "patient-privacy",
            patient: str = "p1", cid: str = "c1") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Consent", "id": cid, "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
    }
    if provision is not None:
        resource["provision"] = provision
    return resource


def test_deny_without_purpose_denies_every_purpose() -> None:
    denying = [consent({"type": "deny"})]
    assert TREAT.denying(denying, NOW) == "Consent/c1"
    assert RESEARCH.denying(denying, NOW) == "Consent/c1"


def test_deny_research_only_leaves_treatment() -> None:
    research_only = [consent({"type": "deny", "purpose": [purpose("HRESCH")]})]
    assert RESEARCH.denying(research_only, NOW) == "Consent/c1"
    assert TREAT.denying(research_only, NOW) is None


def test_expired_or_future_consent_is_not_in_force() -> None:
    expired = consent({"type": "deny", "period": {"start": "2020-01-01", "end": "2025-12-31"}})
    future = consent({"type": "deny", "period": {"start": "2026-03-02T00:00:00Z"}})
    current = consent({"type": "deny", "period": {"start": "2026", "end": "2026-03"}})
    assert TREAT.denying([expired, future], NOW) is None
    assert TREAT.denying([current], NOW) == "Consent/c1"  # partial dates span their whole year / month


def test_unparseable_period_counts_against_the_use() -> None:
    assert TREAT.denying([consent({"type": "deny", "period": {"end": "soon"}})], NOW) == "Consent/c1"
    lifted = {"type": "deny", "provision": [{"type": "permit", "period": {"end": "soon"}}]}
    assert TREAT.denying([consent(lifted)], NOW) == "Consent/c1"  # an unreadable permit lifts nothing


def test_nested_permit_lifts_a_base_deny_for_its_purpose_only() -> None:
    opt_out_but_treatment = consent({"type": "deny", "provision": [{"type": "permit", "purpose": [purpose("TREAT")]}]})
    assert TREAT.denying([opt_out_but_treatment], NOW) is None
    assert RESEARCH.denying([opt_out_but_treatment], NOW) == "Consent/c1"


def test_data_scoped_permit_does_not_lift_and_data_scoped_deny_withholds_the_patient() -> None:
    partial_permit = consent({"type": "deny", "provision": [
        {"type": "permit", "data": [{"meaning": "instance", "reference": {"reference": "Observation/o1"}}]}]})
    assert TREAT.denying([partial_permit], NOW) == "Consent/c1"
    partial_deny = consent({"type": "permit", "purpose": [purpose("TREAT")], "provision": [
        {"type": "deny", "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                            "code": "PSY"}]}]})
    assert TREAT.denying([partial_deny], NOW) == "Consent/c1"


def test_permit_consent_and_nested_deny_for_another_purpose() -> None:
    tpo_no_research = consent({"type": "permit", "purpose": [purpose("TREAT")],
                               "provision": [{"type": "deny", "purpose": [purpose("HRESCH")]}]})
    assert TREAT.denying([tpo_no_research], NOW) is None
    assert RESEARCH.denying([tpo_no_research], NOW) == "Consent/c1"


def test_inactive_and_non_privacy_consents_are_ignored() -> None:
    for status in ("inactive", "draft", "proposed", "rejected", "entered-in-error"):
        assert TREAT.denying([consent({"type": "deny"}, status=status)], NOW) is None, status
    assert TREAT.denying([consent({"type": "deny"}, scope="treatment")], NOW) is None
    assert TREAT.denying([consent(None)], NOW) is None  # no provision: nothing is denied
    unscoped = consent({"type": "deny"})
    del unscoped["scope"]
    assert TREAT.denying([unscoped], NOW) == "Consent/c1"


def test_actor_restricted_provisions_apply_only_to_named_recipients() -> None:
    deny_org = consent({"type": "deny", "actor": [{
        "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
        "reference": {"reference": "Organization/fhirtwin"}}]})
    assert TREAT.denying([deny_org], NOW) is None
    assert ConsentPolicy("TREAT", recipients=("Organization/fhirtwin",)).denying([deny_org], NOW) == "Consent/c1"


def test_any_denying_consent_wins() -> None:
    permit = consent({"type": "permit"}, cid="a")
    deny = consent({"type": "deny", "purpose": [purpose("TREAT")]}, cid="b")
    assert TREAT.denying([permit, deny], NOW) == "Consent/b"


def test_purpose_must_be_a_code() -> None:
    with pytest.raises(ValueError):
        ConsentPolicy("treatment")


def test_the_cli_offers_exactly_the_known_purposes() -> None:
    from fhirtwin.cli import PURPOSES_OF_USE
    from fhirtwin.consent import PURPOSES

    assert tuple(sorted(PURPOSES)) == PURPOSES_OF_USE


def test_denied_is_a_typed_403_without_patient_data() -> None:
    error = ConsentDenied("TREAT", patient_id="p-secret", consent="Consent/c-secret")
    outcome = error.outcome()
    assert error.http_status == 403
    assert outcome["issue"][0]["code"] == "forbidden"
    assert outcome["issue"][0]["details"]["coding"][0] == {"system": ACT_REASON, "code": "TREAT",
                                                           "display": "treatment"}
    assert "secret" not in json.dumps(outcome) and "secret" not in str(error)


# ---------------------------------------------------------------------------------------------- engine


def _searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


@pytest.fixture
def client() -> FhirClient:
    return FhirClient(BASE, sleep=lambda s: None, rng=random.Random(1), max_retries=0)


@responses.activate
def test_denied_patient_gets_only_the_consent_search(client: FhirClient) -> None:
    responses.post(f"{BASE}/Consent/_search", json=_searchset([consent({"type": "deny"})]))
    with pytest.raises(ConsentDenied) as caught:
        Engine(client, consent=TREAT).read("p1")
    assert caught.value.patient_id == "p1" and caught.value.consent == "Consent/c1"
    assert [c.request.url for c in responses.calls] == [f"{BASE}/Consent/_search"]
    form = parse_qs(str(responses.calls[0].request.body))
    assert form["patient"] == ["Patient/p1"] and form["status"] == ["active"]


@responses.activate
def test_supplied_record_is_checked_before_any_simulation(client: FhirClient) -> None:
    from fhirtwin.engine import PatientRecord

    responses.post(f"{BASE}/Consent/_search", json=_searchset([consent({"type": "deny"})]))
    record = PatientRecord("p1", [{"resourceType": "Patient", "id": "p1"}])
    with pytest.raises(ConsentDenied):
        Engine(client, consent=TREAT).run("p1", record=record)


@responses.activate
def test_read_many_skips_and_reports_denied_patients(client: FhirClient) -> None:
    responses.post(f"{BASE}/Consent/_search", json=_searchset([
        consent({"type": "deny"}, patient="p2", cid="c2"),
        consent({"type": "deny"}, patient="elsewhere", cid="c9"),  # not asked for: never attributed
    ]))
    patient = {"resourceType": "Patient", "id": "p1"}
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "200 OK"}, "resource": _searchset([patient])},
        *[{"response": {"status": "200 OK"}, "resource": _searchset([])}] * len(RECORD_TYPES)]})
    denied: list[Any] = []
    records = list(Engine(client, consent=RESEARCH).read_many(["p1", "p2"], on_denied=denied.append))
    assert [r.patient_id for r in records] == ["p1"]
    assert [(d.patient_id, d.consent) for d in denied] == [("p2", "Consent/c2")]
    batch = json.loads(responses.calls[1].request.body or "{}")
    assert all("p2" not in e["request"]["url"] for e in batch["entry"])  # the denied patient is not read


@responses.activate
def test_read_many_without_a_callback_raises_the_denial(client: FhirClient) -> None:
    responses.post(f"{BASE}/Consent/_search", json=_searchset([consent({"type": "deny"}, patient="p2")]))
    with pytest.raises(ConsentDenied):
        list(Engine(client, consent=TREAT).read_many(["p1", "p2"]))
    assert len(responses.calls) == 1


def test_offline_source_cannot_check_consent() -> None:
    class Offline:
        def fetch_patient_record(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            raise AssertionError("the record must not be read")

    with pytest.raises(BadRequest):
        Engine(Offline(), consent=TREAT).read("p1")


def test_a_consent_the_server_matched_but_whose_patient_is_unreadable_fails_closed() -> None:
    """A deny whose ``patient`` is malformed still came back for this search: it counts for every patient
    searched (it may be any of them), rather than being silently ignored."""

    class Server:
        def search_all(self, rtype: str, params: dict, **_: object) -> list[dict]:
            return [{"resourceType": "Consent", "id": "odd", "status": "active", "patient": "Patient/p1",
                     "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                           "code": "patient-privacy"}]},
                     "provision": {"type": "deny"}}]

    denied = ConsentPolicy("TREAT").denials(Server(), ["p1", "p2"])
    assert set(denied) == {"p1", "p2"}
