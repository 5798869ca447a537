"""A patient who leaves the primary-prevention population loses current results; coming back reinstates them."""

from __future__ import annotations

import json

import pytest
import requests

from fhirtwin.cli import main

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
PATIENT = "ftp-0009"
GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"
SUPERSEDED = "https://fhirtwin.org/CodeSystem/fhirtwin|superseded"


def current(http: requests.Session, base_url: str) -> set[str]:
    bundle = http.get(f"{base_url}/RiskAssessment", params={"subject": f"Patient/{PATIENT}", "_tag": GENERATED,
                                                           "_tag:not": SUPERSEDED, "_count": 100}).json()
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def run(capsys: pytest.CaptureFixture[str], base_url: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["run", "--server", base_url, "--patient", PATIENT, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_new_myocardial_infarction_retires_results_and_removing_it_reinstates(
        loaded_cohort, base_url: str, http: requests.Session, capsys: pytest.CaptureFixture[str]) -> None:
    code, first = run(capsys, base_url)
    assert code == 0 and first["patients"][0]["status"] in ("written", "unchanged")
    before = current(http, base_url)
    assert len(before) >= 4
    mi = {"resourceType": "Condition",
          "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                         "code": "active"}]},
          "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                             "code": "confirmed"}]},
          "code": {"coding": [{"system": "http://snomed.info/sct", "code": "22298006",
                               "display": "Myocardial infarction"}]},
          "subject": {"reference": f"Patient/{PATIENT}"}, "onsetDateTime": "2026-01-15"}
    created = http.post(f"{base_url}/Condition", json=mi, headers={"Content-Type": FHIR_JSON})
    assert created.status_code == 201
    condition_id = created.json()["id"]
    try:
        code, second = run(capsys, base_url)
        [patient] = second["patients"]
        assert patient["status"] == "skipped" and "out of scope" in patient["message"]
        assert patient["updated"] == len(before) + 2 + 1  # RiskAssessments, two Goals, the CarePlan
        assert current(http, base_url) == set()
        code, third = run(capsys, base_url)  # nothing left to retire: nothing changes
        assert third["patients"][0]["updated"] == 0
    finally:
        assert http.delete(f"{base_url}/Condition/{condition_id}").status_code in (200, 204)
    code, back = run(capsys, base_url)
    assert code == 0 and back["patients"][0]["status"] in ("written", "unchanged")
    assert current(http, base_url) == before  # the same results are current again (reinstated, not rewritten)
