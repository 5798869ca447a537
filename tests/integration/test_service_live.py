"""The web service as a real process against the sandbox: $simulate (what-if and write) and the end-to-end
Subscription round trip (new LDL result -> HAPI rest-hook -> webhook -> recompute -> new current RiskAssessment,
and no write-back loop)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
from test_durable_events_live import ldl as ldl_result

from fhirtwin.cli import main
from fhirtwin.engine import WATCHED_TYPES

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"
SUPERSEDED = "https://fhirtwin.org/CodeSystem/fhirtwin|superseded"
TEST_TAG = {"system": "https://fhirtwin.org/CodeSystem/fhirtwin-tests", "code": "service-live"}
# cohort patients no other test file writes to
CANDIDATES = [f"ftp-{n:04d}" for n in range(150, 170)]


@pytest.fixture(scope="module")
def service(base_url: str, loaded_cohort, start_service) -> str:
    return start_service(base_url)


def simulate(service: str, patient: str, write: bool, **extra) -> requests.Response:
    parameters = [{"name": "write", "valueBoolean": write}]
    parameters += [{"name": k, "valueDecimal" if k == "horizon" else "valueString": v} for k, v in extra.items()]
    return requests.post(f"{service}/fhir/Patient/{patient}/$simulate",
                         json={"resourceType": "Parameters", "parameter": parameters},
                         headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=120)


def search(http: requests.Session, base_url: str, rtype: str, params: dict) -> list[dict]:
    bundle = http.get(f"{base_url}/{rtype}", params={"_count": 500, **params}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def ra_count(http: requests.Session, base_url: str, patient: str) -> int:
    params = {"subject": f"Patient/{patient}", "_tag": GENERATED, "_summary": "count"}
    return http.get(f"{base_url}/RiskAssessment", params=params).json()["total"]


def current_ras(http: requests.Session, base_url: str, patient: str) -> list[dict]:
    return search(http, base_url, "RiskAssessment",
                  {"subject": f"Patient/{patient}", "_tag": GENERATED, "_tag:not": SUPERSEDED})


def outcome_code(ra: dict) -> str:
    return ra["code"]["coding"][0]["code"]


@pytest.fixture(scope="module")
def patients(service: str) -> list[str]:
    """Two cohort patients with enough data for a prediction."""
    usable = [p for p in CANDIDATES if simulate(service, p, False).status_code == 200]
    assert len(usable) >= 2
    return usable[:2]


def test_simulate_without_write_returns_predictions_and_writes_nothing(service, patients, base_url, http) -> None:
    patient = patients[0]
    before = ra_count(http, base_url, patient)
    response = simulate(service, patient, False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    ras = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert ras and all(ra["subject"]["reference"] == f"Patient/{patient}" for ra in ras)
    assert all(ra["prediction"][0]["probabilityDecimal"] >= 0 for ra in ras)
    assert any(e["resource"]["resourceType"] == "Provenance" for e in bundle["entry"])
    get = requests.get(f"{service}/fhir/Patient/{patient}/$simulate", params={"scenario": "baseline"}, timeout=120)
    assert get.status_code == 200 and get.json()["type"] == "transaction"
    assert ra_count(http, base_url, patient) == before


def test_simulate_with_write_writes_once(service, patients, base_url, http) -> None:
    patient = patients[0]
    first = simulate(service, patient, True)
    assert first.status_code == 200, first.text
    assert first.json()["type"] == "transaction-response"
    after_first = ra_count(http, base_url, patient)
    current = current_ras(http, base_url, patient)
    assert current and all(n == 1 for n in Counter(outcome_code(r) for r in current).values())
    second = simulate(service, patient, True)
    assert second.status_code == 200
    statuses = [e["response"]["status"] for e in second.json()["entry"]]
    assert not any(s.startswith("201") for s in statuses), statuses
    assert ra_count(http, base_url, patient) == after_first


def test_error_outcomes(service, base_url, http) -> None:
    missing = requests.get(f"{service}/fhir/Patient/no-such-patient-xyz/$simulate", timeout=60)
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    bare = http.post(f"{base_url}/Patient", json={"resourceType": "Patient", "meta": {"tag": [TEST_TAG]},
                                                  "gender": "female", "birthDate": "1960-01-01"}).json()
    try:
        thin = simulate(service, bare["id"], False)
        assert thin.status_code == 422
        issue = thin.json()["issue"][0]
        assert issue["code"] == "incomplete" and "ldl_cholesterol_mg_dl" in issue["diagnostics"]
    finally:
        http.delete(f"{base_url}/Patient/{bare['id']}")
    bad = requests.post(f"{service}/fhir/Patient/ftp-0150/$simulate", json={"resourceType": "Parameters",
                        "parameter": [{"name": "write", "valueString": "no"}]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"


def test_subscription_round_trip(service, patients, base_url, http, capsys) -> None:
    patient = patients[1]
    endpoint = f"{service}/hooks/fhir"
    assert simulate(service, patient, True).status_code == 200  # the patient's results are current
    before = {r["id"] for r in current_ras(http, base_url, patient)}
    observation_id = None
    capsys.readouterr()
    try:
        # limited to this test's resources, so that other tests' writes to the shared sandbox are not recomputed
        only_ours = ["--filter", f"_tag={TEST_TAG['system']}|{TEST_TAG['code']}"]
        assert main(["subscribe", "--server", base_url, "--endpoint", endpoint, "--payload", *only_ours]) == 0
        out = capsys.readouterr().out
        ids = [line.split()[0].split("/")[1] for line in out.splitlines() if line.startswith("Subscription/")]
        assert len(ids) == len(WATCHED_TYPES) and all(line.endswith(" active") for line in out.splitlines() if line)
        # idempotent: a second run creates nothing
        assert main(["subscribe", "--server", base_url, "--endpoint", endpoint, *only_ours]) == 0
        assert "created" not in capsys.readouterr().out

        ldl = ldl_result(patient, 161, tag=TEST_TAG)
        started = time.monotonic()
        created = http.post(f"{base_url}/Observation", json=ldl)
        assert created.status_code == 201, created.text
        observation_id = created.json()["id"]

        deadline = started + 30
        fresh: list[dict] = []
        while time.monotonic() < deadline:
            current = current_ras(http, base_url, patient)
            fresh = [r for r in current if r["id"] not in before]
            if fresh and any(f"Observation/{observation_id}" in b.get("reference", "")
                             for r in fresh for b in r.get("basis", [])):
                break
            time.sleep(0.5)
        round_trip = time.monotonic() - started
        assert fresh, f"no new current RiskAssessment within 30 s; webhook: {requests.get(endpoint + '/status').json()}"
        print(f"\nsubscription round trip: {round_trip:.1f} s")
        counts = Counter(outcome_code(r) for r in current)
        assert set(counts.values()) == {1}, counts
        # no loop: the write-back triggers nothing further
        total = ra_count(http, base_url, patient)
        time.sleep(8)
        assert ra_count(http, base_url, patient) == total
        assert {r["id"] for r in current_ras(http, base_url, patient)} == {r["id"] for r in current}
        status = requests.get(endpoint + "/status", timeout=10).json()
        assert status["dead_letters"] == [] and status["received"].get("scheduled", 0) >= 1
        assert status["counts"].get("done_written", 0) >= 1
    finally:
        main(["subscribe", "--server", base_url, "--endpoint", endpoint, "--off"])
        if observation_id:
            http.delete(f"{base_url}/Observation/{observation_id}")
            simulate(service, patient, True)  # earlier results become current again (reinstate)
    active = search(http, base_url, "Subscription", {"status": "active"})
    assert not [s for s in active if s["channel"].get("endpoint") == endpoint]
