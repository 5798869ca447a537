"""The engine's folded read: record and fhirtwin's stored results in one batch request, split before the twin."""

from __future__ import annotations

import json
import random

import pytest
import responses

from fhirtwin.engine import Engine, stored_results_searches
from fhirtwin.fhir.client import FhirClient
from fhirtwin.vocabulary import is_fhirtwin_generated

BASE = "https://fhir.example.org/r4"
GENERATED = {"tag": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "fhirtwin-generated"}]}


def _searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def _batch_response(*bundles: dict) -> dict:
    return {"resourceType": "Bundle", "type": "batch-response",
            "entry": [{"response": {"status": "200 OK"}, "resource": b} for b in bundles]}


@pytest.fixture
def client() -> FhirClient:
    return FhirClient(BASE, sleep=lambda s: None, rng=random.Random(1), max_retries=0)


@responses.activate
def test_record_and_existing_results_in_one_request(client: FhirClient) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
           "code": {"text": "x"}}
    ra = {"resourceType": "RiskAssessment", "id": "ra1", "meta": GENERATED, "status": "final",
          "subject": {"reference": "Patient/p1"}}
    goal = {"resourceType": "Goal", "id": "g1", "meta": GENERATED, "subject": {"reference": "Patient/p1"}}
    responses.post(BASE, json=_batch_response(patient, _searchset([obs]), *[_searchset([])] * 7,
                                              _searchset([ra]), _searchset([goal]), _searchset([])))
    read = Engine(client).read("p1")
    assert client.request_count == 1
    assert [r["id"] for r in read.resources] == ["p1", "o1"]
    assert read.stored is not None and [r["id"] for r in read.stored] == ["ra1", "g1"]
    urls = [e["request"]["url"] for e in json.loads(responses.calls[0].request.body)["entry"]]
    assert urls[-3:] == stored_results_searches("p1")
    assert "MedicationRequest?patient=p1&_count=1000&_include=MedicationRequest:medication" in urls


@responses.activate
def test_generated_resources_never_reach_the_twin(client: FhirClient) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1960-01-01"}
    ra = {"resourceType": "RiskAssessment", "id": "ra1", "meta": GENERATED, "status": "final",
          "subject": {"reference": "Patient/p1"}}
    # a misbehaving server returning an own result in a record search is split out all the same
    responses.post(BASE, json=_batch_response(patient, _searchset([ra]), *[_searchset([])] * 10))
    engine = Engine(client)
    record = engine.read("p1")
    state = engine.twin(record)
    assert record.stored is not None and [r["id"] for r in record.stored] == ["ra1"]
    assert not any("RiskAssessment" in str(entry) for entry in state.ledger.to_json())


def test_extra_searches_must_be_relative_searches(client: FhirClient) -> None:
    with pytest.raises(ValueError):
        client.fetch_patient_record("p1", ["Observation"], extra_searches=["https://elsewhere.example/Observation?x=1"])
    with pytest.raises(ValueError):
        client.fetch_patient_record("p1", ["Observation"], strategy="everything",
                                    extra_searches=["Goal?subject=Patient/p1"])


def test_is_generated() -> None:
    assert is_fhirtwin_generated({"resourceType": "Goal", "meta": GENERATED})
    assert not is_fhirtwin_generated({"resourceType": "Goal", "meta": {"tag": [{"system": "other", "code": "x"}]}})
    assert not is_fhirtwin_generated("not a resource")
    assert not is_fhirtwin_generated({"resourceType": "Goal", "meta": {"tag": "not a list"}})
