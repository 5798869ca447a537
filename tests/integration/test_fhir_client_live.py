"""The transport layer against the real sandbox: efficient reads, conditional writes, errors, bulk export."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fhirtwin.adapters.reads import RECORD_INCLUDES, RECORD_TYPES
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.errors import FhirConflict, FhirNotFound, FhirTransactionError
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.population.bulk import BulkExport

pytestmark = pytest.mark.integration


def _ids(resources) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def _bundle_ids(bundle: dict) -> set[str]:
    return _ids(e["resource"] for e in bundle["entry"])


def test_one_patient_record_in_one_request(loaded_cohort, base_url: str) -> None:
    client = FhirClient(base_url)
    richest = max(loaded_cohort.bundles, key=lambda b: len(b["entry"]))
    patient_id = richest["entry"][0]["resource"]["id"]
    record = client.fetch_patient_record(patient_id, RECORD_TYPES, include=RECORD_INCLUDES)
    assert client.request_count == 1 and client.pages_followed == 0
    assert record[0]["resourceType"] == "Patient"
    assert _ids(record) == _bundle_ids(richest)


def test_small_pages_are_followed_and_counted(loaded_cohort, base_url: str) -> None:
    client = FhirClient(base_url)
    bundle = loaded_cohort.bundles[0]
    patient_id = bundle["entry"][0]["resource"]["id"]
    record = client.fetch_patient_record(patient_id, RECORD_TYPES, include=RECORD_INCLUDES, count=20)
    assert _ids(record) == _bundle_ids(bundle)
    assert client.pages_followed >= 1
    assert client.request_count == 1 + client.pages_followed


def test_many_patients_share_requests(loaded_cohort, base_url: str) -> None:
    client = FhirClient(base_url)
    bundles = loaded_cohort.bundles[:20]
    ids = [b["entry"][0]["resource"]["id"] for b in bundles]
    records = client.fetch_patients_records(ids, RECORD_TYPES, include=RECORD_INCLUDES, chunk_size=20)
    assert list(records) == ids
    for bundle, patient_id in zip(bundles, ids, strict=True):
        got = _ids(records[patient_id])
        assert _bundle_ids(bundle) <= got
        # other tests may add data to a cohort patient on a long-lived sandbox: it must still be theirs
        for resource in records[patient_id]:
            if f"{resource['resourceType']}/{resource['id']}" not in _bundle_ids(bundle):
                assert resource.get("subject", {}).get("reference") == f"Patient/{patient_id}"
    assert client.request_count <= 1 + client.pages_followed


def test_missing_resource_raises_not_found(base_url: str) -> None:
    with pytest.raises(FhirNotFound) as raised:
        FhirClient(base_url).read("Patient", f"does-not-exist-{uuid.uuid4().hex[:8]}")
    assert raised.value.status == 404
    assert raised.value.issues, "the server's OperationOutcome travels with the error"


def test_conditional_create_is_idempotent_and_ambiguity_is_an_error(base_url: str) -> None:
    client = FhirClient(base_url)
    system, value = "https://fhirtwin.org/sid/test", uuid.uuid4().hex
    patient = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}]}
    first = client.create(patient, if_none_exist={"identifier": f"{system}|{value}"})
    second = client.create(patient, if_none_exist={"identifier": f"{system}|{value}"})
    assert first["id"] == second["id"]
    client.create(patient)  # a plain create makes a second match
    with pytest.raises(FhirConflict) as raised:
        client.create(patient, if_none_exist={"identifier": f"{system}|{value}"})
    assert raised.value.status == 412


def test_failed_transaction_raises_with_outcome_and_writes_nothing(base_url: str) -> None:
    client = FhirClient(base_url)
    tag = uuid.uuid4().hex
    good = {"resourceType": "Patient", "meta": {"tag": [{"system": "https://fhirtwin.org/test", "code": tag}]}}
    bad = {"resourceType": "Observation", "status": "not-a-status", "code": {"text": "x"}}
    with pytest.raises(FhirTransactionError) as raised:
        client.transaction([
            {"resource": good, "request": {"method": "POST", "url": "Patient"}},
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
        ])
    assert raised.value.status == 400
    assert client.search("Patient", {"_tag": tag, "_summary": "count"})["total"] == 0


def test_bulk_export_round_trips_through_the_ndjson_source(loaded_cohort, base_url: str, tmp_path: Path) -> None:
    client = FhirClient(base_url)
    BulkExport(client, "patient", types=["Patient", "Condition"], max_wait=600).run(tmp_path / "export")
    source = NdjsonSource(tmp_path / "export")
    bundle = loaded_cohort.bundles[5]
    patient_id = bundle["entry"][0]["resource"]["id"]
    offline = source.fetch_patient_record(patient_id, RECORD_TYPES, include=RECORD_INCLUDES)
    expected = {i for i in _bundle_ids(bundle) if i.split("/")[0] in ("Patient", "Condition")}
    assert _ids(offline) == expected


def test_record_and_stored_results_in_one_request(loaded_cohort, base_url: str) -> None:
    from fhirtwin.engine import Engine
    from fhirtwin.vocabulary import is_fhirtwin_generated

    client = FhirClient(base_url)
    patient_id = loaded_cohort.bundles[0]["entry"][0]["resource"]["id"]
    read = Engine(client).read(patient_id)
    assert client.request_count == 1 + client.pages_followed
    assert _ids(read.resources) == _bundle_ids(loaded_cohort.bundles[0])
    assert read.stored is not None and all(is_fhirtwin_generated(r) for r in read.stored)
    assert {r["resourceType"] for r in read.stored} <= {"RiskAssessment", "Goal", "CarePlan"}
