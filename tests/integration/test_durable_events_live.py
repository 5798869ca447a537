"""Durable events against the sandbox with real `fhirtwin serve` processes: a delivery answered 200 is in the
store before the answer, and a service SIGKILLed inside the debounce window recomputes the patient after a
restart on the same store, with the status page's counts intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from ports import free_port

from fhirtwin.service.store import Store

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"
SUPERSEDED = "https://fhirtwin.org/CodeSystem/fhirtwin|superseded"
TEST_TAG = {"system": "https://fhirtwin.org/CodeSystem/fhirtwin-tests", "code": "durable-events"}
CANDIDATES = [f"ftp-{n:04d}" for n in range(200, 220)]  # cohort patients no other test file writes to
WINDOW_S = "5"  # long enough that a kill right after the answer always lands inside the debounce window


class Served:
    """One `fhirtwin serve` process on a store, killable."""

    def __init__(self, base_url: str, store: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fhirtwin.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--fhir-server", base_url, "--log-level", "warning", "--store", str(store), "--dev-no-auth",
                 "--webhook-window", WINDOW_S],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"fhirtwin serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self) -> dict:
        answer = requests.get(f"{self.url}/hooks/fhir/status", timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture()
def serve(base_url: str, tmp_path):
    """``serve(store) -> Served``; every process is stopped after the test and its log holds no traceback."""
    started: list[Served] = []

    def start(store: Path) -> Served:
        started.append(Served(base_url, store, tmp_path / f"serve-{len(started)}.log"))
        return started[-1]

    yield start
    for served in started:
        served.stop()
    for served in started:
        text = served.log_path.read_text()
        assert "Traceback" not in text, text[-3000:]


def simulate(url: str, patient: str, write: bool) -> requests.Response:
    return requests.post(f"{url}/fhir/Patient/{patient}/$simulate",
                         json={"resourceType": "Parameters", "parameter": [{"name": "write", "valueBoolean": write}]},
                         headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=180)


def current_ras(http: requests.Session, base_url: str, patient: str) -> list[dict]:
    bundle = http.get(f"{base_url}/RiskAssessment", params={
        "subject": f"Patient/{patient}", "_tag": GENERATED, "_tag:not": SUPERSEDED, "_count": 200}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def deliver(url: str, resource: dict) -> requests.Response:
    return requests.put(f"{url}/hooks/fhir/{resource['resourceType']}/{resource['id']}", json=resource,
                        headers={"Content-Type": FHIR_JSON}, timeout=30)


def stored_keys(store: Path) -> set[tuple[str, str]]:
    """The webhook tasks in the store file (read by this process, as a restarted service would)."""
    reader = Store(store)
    try:
        return {task.key for task in reader.tasks()}
    finally:
        reader.close()


def ldl(patient: str, value: float, tag: dict = TEST_TAG) -> dict:
    """A new LDL-C result for ``patient``, tagged so that only the test's own Subscriptions see it."""
    return {"resourceType": "Observation", "status": "final", "meta": {"tag": [tag]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "13457-7",
                                 "display": "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": datetime.now(UTC).isoformat(timespec="seconds"),
            "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                              "code": "mg/dL"}}


def test_every_delivery_answered_200_is_stored_before_the_answer(serve, tmp_path) -> None:
    store = tmp_path / "acked.sqlite3"
    service = serve(store)
    resources = [{"resourceType": "Observation", "id": f"durable-{n}", "status": "final",
                  "code": {"text": "test"}, "subject": {"reference": f"Patient/durable-patient-{n}"}}
                 for n in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda r: deliver(service.url, r), resources))
    service.sigkill()  # right after the last 200: nothing had time to run (5 s window)
    acknowledged = {("patient", f"durable-patient-{n}") for n, a in enumerate(answers) if a.status_code == 200}
    assert len(acknowledged) == len(resources), [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["issue"][0]["diagnostics"] == "scheduled" for a in answers)
    assert stored_keys(store) == acknowledged


def test_a_service_killed_inside_the_debounce_window_recomputes_after_a_restart(serve, base_url, http, tmp_path,
                                                                                 loaded_cohort) -> None:
    store = tmp_path / "service.sqlite3"
    first = serve(store)
    patient = next((p for p in CANDIDATES if simulate(first.url, p, True).status_code == 200), None)
    assert patient, "no candidate patient has enough data for a prediction"
    before = {r["id"] for r in current_ras(http, base_url, patient)}
    assert before
    observation_id = None
    try:
        created = http.post(f"{base_url}/Observation", json=ldl(patient, 173))
        assert created.status_code == 201, created.text
        observation = created.json()
        observation_id = observation["id"]
        answer = deliver(first.url, observation)
        assert answer.status_code == 200 and answer.json()["issue"][0]["diagnostics"] == "scheduled"
        counts_before = first.status()
        first.sigkill()
        # the acknowledged event is in the store and was not processed (its task is still there)
        assert stored_keys(store) == {("patient", patient)}
        assert {r["id"] for r in current_ras(http, base_url, patient)} == before

        second = serve(store)
        deadline = time.monotonic() + 180
        fresh: list[dict] = []
        while time.monotonic() < deadline:
            fresh = [r for r in current_ras(http, base_url, patient) if r["id"] not in before]
            if fresh and all(any(b.get("reference", "").startswith(f"Observation/{observation_id}")
                                 for b in r.get("basis", [])) for r in fresh):
                break
            time.sleep(1)
        assert fresh, f"no recompute after the restart; webhook status: {second.status()}"
        assert any(b.get("reference", "").startswith(f"Observation/{observation_id}")
                   for r in fresh for b in r.get("basis", []))
        provenance = http.get(f"{base_url}/Provenance", params={"target": f"RiskAssessment/{fresh[0]['id']}"}).json()
        assert provenance.get("entry"), "the recomputed RiskAssessment has no Provenance"

        status = second.status()
        assert status["pending"] == 0 and status["dead_letters"] == []
        assert status["counts"].get("done_written", 0) >= 1
        for name, value in counts_before["counts"].items():
            assert status["counts"].get(name, 0) >= value, (name, status["counts"], counts_before["counts"])
        for name, value in counts_before["received"].items():
            assert status["received"].get(name, 0) >= value, (name, status["received"], counts_before["received"])
        assert counts_before["received"].get("scheduled", 0) >= 1
    finally:
        if observation_id:
            http.delete(f"{base_url}/Observation/{observation_id}")
            reinstate = serve(tmp_path / "reinstate.sqlite3")
            simulate(reinstate.url, patient, True)  # the earlier results become current again
