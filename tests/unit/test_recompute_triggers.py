"""A change to any resource type the twin reads triggers a recompute of the right patient; nothing else does.

The expected list is written out here, not taken from the code: if a type the adapters read is ever
dropped from the webhook's filter (or the filter grows to types the twin ignores) this test fails.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from starlette.testclient import TestClient

from fhirtwin.adapters.reads import READ_TYPES
from fhirtwin.service import webhook
from fhirtwin.service.app import ServiceSettings, create_app
from fhirtwin.service.runtime import WebhookOptions
from fhirtwin.writeback.jws import generate_key

#: What the twin reads (adapters/__init__.build_twin routes these), written out independently.
EXPECTED_TRIGGERS = {"Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement",
                     "MedicationDispense", "Medication", "MolecularSequence", "DiagnosticReport", "Procedure"}
NOT_TRIGGERS = ("RiskAssessment", "CarePlan", "Goal", "Provenance", "Device", "Organization", "Encounter",
                "Practitioner", "Subscription")


def resource_of(rtype: str, patient: str) -> dict:
    if rtype == "Patient":
        return {"resourceType": "Patient", "id": patient}
    if rtype == "Medication":
        return {"resourceType": "Medication", "id": "med-1"}
    key = "subject" if rtype in ("Observation", "Condition", "MedicationRequest", "MedicationStatement",
                                 "MedicationDispense", "DiagnosticReport", "Procedure") else "patient"
    return {"resourceType": rtype, "id": f"{rtype.lower()}-1", key: {"reference": f"Patient/{patient}"}}


class ReferringServer:
    """Answers the searches that find who refers to a Medication (the one type without a patient)."""

    def __init__(self) -> None:
        self.searches: list[tuple[str, dict]] = []

    def search_all(self, rtype: str, params: dict, max_pages: int | None = None) -> list[dict]:
        self.searches.append((rtype, dict(params)))
        if rtype == "MedicationRequest" and params.get("medication") == "Medication/med-1":
            return [{"resourceType": "MedicationRequest", "id": "mr9", "subject": {"reference": "Patient/p-med"}}]
        return []


@pytest.fixture()
def service(tmp_path, monkeypatch):
    pem = generate_key().private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption())
    (tmp_path / "k.pem").write_bytes(pem)
    settings = ServiceSettings(fhir_server="http://fhir.invalid/fhir", signing_key_file=str(tmp_path / "k.pem"),
                               dev_no_auth=True, store_path=str(tmp_path / "service.sqlite3"))
    app = create_app(replace(settings, webhook=WebhookOptions(window=3600.0, max_wait=3600.0)))
    server = ReferringServer()
    monkeypatch.setattr(webhook, "shared_client", lambda _settings: server)
    svc = webhook.WebhookService(app.state.settings)
    recomputed: list[str] = []
    svc.worker.handlers["patient"] = lambda pid: (recomputed.append(pid), ("written", []))[1]
    app.state.webhook = svc
    with TestClient(app) as client:
        yield client, svc, recomputed, server
    svc.worker.shutdown(5)


def test_the_declaration_matches_what_the_twin_reads() -> None:
    assert READ_TYPES == EXPECTED_TRIGGERS


@pytest.mark.parametrize("rtype", sorted(EXPECTED_TRIGGERS))
def test_a_change_of_every_read_type_recomputes_its_patient(service, rtype: str) -> None:
    client, svc, recomputed, server = service
    resource = resource_of(rtype, "p-1")
    answer = client.put(f"/hooks/fhir/{rtype}/{resource['id']}", json=resource)
    assert answer.status_code == 200 and answer.json()["issue"][0]["diagnostics"] == "scheduled"
    svc.worker.run_pending(everything=True)  # the referenced-resource lookup runs and fans out
    svc.worker.run_pending(everything=True)
    expected = "p-med" if rtype == "Medication" else "p-1"
    assert recomputed == [expected]
    if rtype == "Medication":
        assert ("MedicationRequest", {"medication": "Medication/med-1", "_count": 200}) in server.searches
        assert any(s[0] == "MedicationStatement" for s in server.searches)


@pytest.mark.parametrize("rtype", NOT_TRIGGERS)
def test_other_types_and_own_writes_never_recompute(service, rtype: str) -> None:
    client, svc, recomputed, _ = service
    resource = {"resourceType": rtype, "id": "x1", "subject": {"reference": "Patient/p-1"}}
    answer = client.put(f"/hooks/fhir/{rtype}/x1", json=resource)
    assert answer.json()["issue"][0]["diagnostics"] == "ignored_type"
    tagged = {**resource_of("Observation", "p-1"),
              "meta": {"tag": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "fhirtwin-generated"}]}}
    assert client.put("/hooks/fhir/Observation/observation-1", json=tagged).json()["issue"][0]["diagnostics"] \
        == "ignored_own"
    svc.worker.run_pending(everything=True)
    assert recomputed == []
