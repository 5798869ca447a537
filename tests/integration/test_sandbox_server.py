"""The sandbox is a real HAPI FHIR R4 server with the features fhirtwin relies on."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

pytestmark = pytest.mark.integration


def _wait(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_capability_statement_is_r4_and_lists_needed_resources(base_url: str, http: requests.Session) -> None:
    capability = http.get(f"{base_url}/metadata").json()
    assert capability["resourceType"] == "CapabilityStatement"
    assert capability["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in capability["rest"][0]["resource"]}
    assert {"Subscription", "RiskAssessment", "CarePlan", "Provenance", "MolecularSequence"} <= types
    operations = {op["name"] for op in capability["rest"][0].get("operation", [])}
    assert "export" in operations


def test_cors_preflight_allows_browser_apps(base_url: str) -> None:
    response = requests.options(f"{base_url}/Patient", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "http://localhost:3000")
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_conditional_create_transaction_is_idempotent(base_url: str, http: requests.Session) -> None:
    system, value = "https://fhirtwin.org/sid/test", str(uuid.uuid4())
    bundle = {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": value}],
                         "gender": "female"},
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|{value}"},
        }],
    }
    first = http.post(base_url, json=bundle)
    assert first.status_code == 200, first.text
    assert first.json()["entry"][0]["response"]["status"].startswith("201")
    second = http.post(base_url, json=bundle)
    assert second.status_code == 200, second.text
    assert second.json()["entry"][0]["response"]["status"].startswith("200")
    first_id = first.json()["entry"][0]["response"]["location"].split("/")[1]
    second_id = second.json()["entry"][0]["response"]["location"].split("/")[1]
    assert first_id == second_id
    found = http.get(f"{base_url}/Patient", params={"identifier": f"{system}|{value}", "_summary": "count"})
    assert found.json()["total"] == 1


def test_read_vread_history_search_and_paging(base_url: str, http: requests.Session) -> None:
    tag = str(uuid.uuid4())
    ids = []
    for i in range(7):
        created = http.post(f"{base_url}/Patient", json={
            "resourceType": "Patient", "meta": {"tag": [{"system": "https://fhirtwin.org/test", "code": tag}]},
            "birthDate": f"19{50 + i}-01-01"})
        assert created.status_code == 201
        ids.append(created.json()["id"])
    updated = http.put(f"{base_url}/Patient/{ids[0]}", json={
        "resourceType": "Patient", "id": ids[0], "gender": "male", "birthDate": "1950-01-01",
        "meta": {"tag": [{"system": "https://fhirtwin.org/test", "code": tag}]}})
    assert updated.json()["meta"]["versionId"] == "2"
    assert http.get(f"{base_url}/Patient/{ids[0]}/_history/1").json()["meta"]["versionId"] == "1"
    history = http.get(f"{base_url}/Patient/{ids[0]}/_history").json()
    assert history["type"] == "history" and len(history["entry"]) == 2
    count = http.get(f"{base_url}/Patient", params={"_tag": tag, "_summary": "count"}).json()
    assert count["total"] == 7
    page = http.get(f"{base_url}/Patient", params={"_tag": tag, "_count": 3}).json()
    seen = [e["resource"]["id"] for e in page["entry"]]
    while next_link := next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None):
        page = http.get(next_link).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
    assert sorted(seen) == sorted(ids)
    older = http.get(f"{base_url}/Patient", params={"_tag": tag, "birthdate": "lt1953-01-01",
                                                     "_summary": "count"}).json()
    assert older["total"] == 3


def test_validate_uses_uploaded_profile(base_url: str, http: requests.Session) -> None:
    url = f"https://fhirtwin.org/StructureDefinition/test-observation-{uuid.uuid4().hex[:12]}"
    profile = {
        "resourceType": "StructureDefinition", "url": url, "version": "0.0.1", "name": "TestObservation",
        "status": "draft", "fhirVersion": "4.0.1", "kind": "resource", "abstract": False,
        "type": "Observation", "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Observation",
        "derivation": "constraint",
        "differential": {"element": [
            {"id": "Observation.subject", "path": "Observation.subject", "min": 1},
            {"id": "Observation.value[x]", "path": "Observation.value[x]", "min": 1,
             "type": [{"code": "Quantity"}]},
        ]},
    }
    assert http.post(f"{base_url}/StructureDefinition", json=profile).status_code == 201
    good = {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
            "subject": {"reference": "Patient/example"}, "effectiveDateTime": "2026-01-02",
            "valueQuantity": {"value": 190, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                              "code": "mg/dL"}}
    bad = {k: v for k, v in good.items() if k not in ("subject", "valueQuantity")}

    def errors(resource: dict) -> list[str]:
        response = http.post(f"{base_url}/Observation/$validate", params={"profile": url}, json=resource,
                             timeout=180)
        assert response.status_code == 200  # HAPI answers 200 and puts the verdict in the outcome
        return [i.get("diagnostics", "") for i in response.json()["issue"] if i["severity"] in ("error", "fatal")]

    assert errors(good) == []
    bad_errors = errors(bad)
    assert any("Observation.subject" in e for e in bad_errors)
    assert any("Observation.value[x]" in e for e in bad_errors)


def test_rest_hook_subscription_delivers_to_local_receiver(base_url, http, receiver) -> None:
    code = uuid.uuid4().hex
    subscription = http.post(f"{base_url}/Subscription", json={
        "resourceType": "Subscription", "status": "requested", "reason": "fhirtwin integration test",
        "criteria": f"Observation?code=https://fhirtwin.org/test|{code}",
        "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/hook",
                    "payload": "application/fhir+json"},
    }).json()
    try:
        active = _wait(lambda: http.get(f"{base_url}/Subscription/{subscription['id']}").json()["status"]
                       == "active", timeout=60)
        assert active, "subscription never became active"
        observation = http.post(f"{base_url}/Observation", json={
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "https://fhirtwin.org/test", "code": code}]},
            "valueQuantity": {"value": 1}}).json()
        assert receiver.arrived.wait(30), "no delivery within 30 s"
        delivery = receiver.deliveries[0]
        assert delivery.method == "PUT"
        assert delivery.path == f"/hook/Observation/{observation['id']}"
        assert code.encode() in delivery.body
    finally:
        http.delete(f"{base_url}/Subscription/{subscription['id']}")


@pytest.mark.parametrize("level", ["system", "patient", "group"])
def test_bulk_export_produces_ndjson(level: str, base_url: str, http: requests.Session) -> None:
    tag = uuid.uuid4().hex
    patient = http.post(f"{base_url}/Patient", json={
        "resourceType": "Patient", "meta": {"tag": [{"system": "https://fhirtwin.org/test", "code": tag}]},
        "gender": "other"}).json()
    if level == "group":
        group = http.post(f"{base_url}/Group", json={
            "resourceType": "Group", "type": "person", "actual": True,
            "member": [{"entity": {"reference": f"Patient/{patient['id']}"}}]}).json()
        kickoff = f"{base_url}/Group/{group['id']}/$export"
    else:
        kickoff = f"{base_url}/$export" if level == "system" else f"{base_url}/Patient/$export"
    response = http.get(kickoff, params={"_type": "Patient"},
                        headers={"Prefer": "respond-async", "Accept": "application/fhir+json"})
    assert response.status_code == 202, response.text
    status_url = response.headers["Content-Location"]
    manifest = _wait(lambda: (r := http.get(status_url)).status_code == 200 and r.json(), timeout=120, interval=1)
    assert manifest, "export did not complete within 120 s"
    lines = []
    for output in manifest["output"]:
        assert output["type"] == "Patient"
        body = http.get(output["url"], headers={"Accept": "application/fhir+ndjson"}).text
        lines += [line for line in body.splitlines() if line.strip()]
    assert any(patient["id"] in line for line in lines)
    if level == "group":
        assert len(lines) == 1
