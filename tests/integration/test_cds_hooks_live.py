"""CDS Hooks against the live sandbox: `fhirtwin serve` as a subprocess answers patient-view for cohort patients,
reading fhirServer itself or using prefetch built from its own templates; both give well-formed cards."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

pytestmark = pytest.mark.integration

PATIENTS = ["ftp-0001", "ftp-0010", "ftp-0020"]


@pytest.fixture(scope="module")
def service_url(base_url: str, loaded_cohort, start_service) -> str:
    return start_service(base_url)


def hook_request(patient_id: str, **extra: Any) -> dict[str, Any]:
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": patient_id}}
    body.update(extra)
    return body


def build_prefetch(base_url: str, templates: dict[str, str], patient_id: str) -> dict[str, Any]:
    """What a CDS client does: fill each template and run it against its FHIR server."""
    out = {}
    for key, template in templates.items():
        query = template.replace("{{context.patientId}}", patient_id)
        response = requests.get(f"{base_url}/{query}", headers={"Accept": "application/fhir+json",
                                                                 "Cache-Control": "no-cache"}, timeout=30)
        assert response.status_code == 200, (key, response.status_code)
        body = response.json()
        assert not any(link.get("relation") == "next" for link in body.get("link", [])), f"{key} needs paging"
        out[key] = body
    return out


def check_cards(body: dict[str, Any], service_url: str, patient_id: str) -> dict[str, Any]:
    [card] = body["cards"]
    uuid.UUID(card["uuid"])
    assert 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"] and card["source"]["url"] == f"{service_url}/model-card"
    assert requests.get(card["source"]["url"], timeout=10).status_code == 200
    assert card["links"][0]["type"] == "smart" and card["links"][0]["url"] == f"{service_url}/launch"
    if "suggestions" in card:
        assert card["selectionBehavior"] == "at-most-one"
        for suggestion in card["suggestions"]:
            uuid.UUID(suggestion["uuid"])
            [action] = suggestion["actions"]
            assert action["type"] == "create"
            assert action["resource"]["resourceType"] == "CarePlan"
            assert action["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
        assert "90 % interval" in card["detail"]
    return card


def test_discovery(service_url: str) -> None:
    [service] = requests.get(f"{service_url}/cds-services", timeout=10).json()["services"]
    assert service["hook"] == "patient-view"


@pytest.mark.parametrize("patient_id", PATIENTS)
def test_patient_view_reading_fhir_server_and_from_prefetch(service_url: str, base_url: str, patient_id: str) -> None:
    endpoint = f"{service_url}/cds-services/fhirtwin-cardiorenal-risk"
    read = requests.post(endpoint, json=hook_request(patient_id, fhirServer=base_url), timeout=60)
    assert read.status_code == 200, read.text
    card_read = check_cards(read.json(), service_url, patient_id)

    [service] = requests.get(f"{service_url}/cds-services", timeout=10).json()["services"]
    prefetch = build_prefetch(base_url, service["prefetch"], patient_id)
    assert prefetch["patient"]["id"] == patient_id
    pre = requests.post(endpoint, json=hook_request(patient_id, prefetch=prefetch), timeout=60)
    assert pre.status_code == 200, pre.text
    card_pre = check_cards(pre.json(), service_url, patient_id)
    # same record, same seed and ensemble size: the same answer by either path
    assert card_pre["summary"] == card_read["summary"]
    assert card_pre["indicator"] == card_read["indicator"]


def test_unknown_patient_on_fhir_server_is_412(service_url: str, base_url: str) -> None:
    endpoint = f"{service_url}/cds-services/fhirtwin-cardiorenal-risk"
    response = requests.post(endpoint, json=hook_request("no-such-patient-xyz", fhirServer=base_url), timeout=60)
    assert response.status_code == 412 and response.json()["error"] == "precondition_failed"


def test_without_prefetch_or_fhir_server_is_412(service_url: str) -> None:
    endpoint = f"{service_url}/cds-services/fhirtwin-cardiorenal-risk"
    assert requests.post(endpoint, json=hook_request("ftp-0001"), timeout=30).status_code == 412
