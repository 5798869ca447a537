"""fhirtwin run through a seeded fault-injecting proxy in front of the live sandbox: nothing lost, nothing
duplicated, nothing stale, no committed write reported as failed; a killed run resumes from its checkpoint.

The tests work on their own copies of the default cohort (ids ``flt-NNNN``, uploaded once, kept), so the
writes and input changes here never touch the patients other tests use. Each session gives every copy
a fresh input (a repeat of its latest blood pressure, dated now), so every run supersedes the previous session's
results: the transactions carry ``ifMatch`` and a lost response makes the retry conflict (409/412).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from fault_proxy import FaultProxy

from fhirtwin.cli import main
from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.writeback.checkpoint import checkpoint_path

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
PREFIX = "flt-"
COPIES = 200
GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"
SUPERSEDED = "https://fhirtwin.org/CodeSystem/fhirtwin|superseded"
RESULT_TYPES = ("RiskAssessment", "Goal", "CarePlan")
FRESH_CODES = ("85354-9", "8480-6")  # blood pressure panel, else systolic: read by the twin, harmless to repeat
SEED = 14


def _copy(bundle: dict) -> dict:
    return json.loads(json.dumps(bundle).replace("ftp-", PREFIX))


def _post(http: requests.Session, base_url: str, bundle: dict) -> dict:
    response = http.post(base_url, data=json.dumps(bundle), timeout=300)
    assert response.status_code == 200, response.text[:500]
    return response.json()


@pytest.fixture(scope="module")
def copies(base_url: str, cohort, http: requests.Session) -> list[str]:
    """The cohort's first COPIES patients under ``flt-`` ids (uploaded when missing), each with a fresh input."""
    bundles = [_copy(b) for b in cohort.bundles[:COPIES]]
    ids = [b["entry"][0]["resource"]["id"] for b in bundles]
    present = http.get(f"{base_url}/Patient", params={"_id": ",".join(ids), "_elements": "id", "_count": COPIES})
    have = {e["resource"]["id"] for e in present.json().get("entry", [])}
    for bundle in bundles:
        if bundle["entry"][0]["resource"]["id"] not in have:
            _post(http, base_url, bundle)
    fresh = [entry for bundle in bundles if (entry := _fresh_input(bundle)) is not None]
    _post(http, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": fresh})
    return ids


def _fresh_input(bundle: dict, when: datetime | None = None) -> dict | None:
    """A POST entry repeating the copy's latest blood pressure observation, dated ``when`` (now)."""
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
                    and e["resource"]["code"]["coding"][0]["code"] in FRESH_CODES]
    if not observations:
        return None
    latest = max(observations, key=lambda o: str(o.get("effectiveDateTime") or o.get("effectivePeriod", {})))
    body = {k: v for k, v in latest.items() if k not in ("id", "meta", "issued", "effectivePeriod")}
    body["effectiveDateTime"] = (when or datetime.now(UTC)).replace(microsecond=0).isoformat()
    return {"resource": body, "request": {"method": "POST", "url": "Observation"}}


@pytest.fixture(scope="module")
def http() -> requests.Session:
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, "Cache-Control": "no-cache"})
    return session


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fhirtwin-state")


def _env(state: Path, keys: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRTWIN_")}
    return {**env, "FHIRTWIN_STATE_DIR": str(state), "FHIRTWIN_KEY_STORE": str(keys)}


def _run_args(server: str, patients: list[str]) -> list[str]:
    return [sys.executable, "-m", "fhirtwin", "run", "--server", server, "--json",
            *[arg for p in patients for arg in ("--patient", p)]]


def current_results(http: requests.Session, base_url: str, patients: list[str]) -> dict[str, list[dict]]:
    """Every patient's current (untagged) fhirtwin results, read straight from the server."""
    found: dict[str, list[dict]] = {p: [] for p in patients}
    for start in range(0, len(patients), 50):
        chunk = ",".join(f"Patient/{p}" for p in patients[start:start + 50])
        for rtype in RESULT_TYPES:
            url = f"{base_url}/{rtype}"
            params = {"subject": chunk, "_tag": GENERATED, "_tag:not": SUPERSEDED, "_count": 1000}
            while url:
                bundle = http.get(url, params=params, timeout=120).json()
                for entry in bundle.get("entry", []):
                    found[entry["resource"]["subject"]["reference"].split("/")[-1]].append(entry["resource"])
                url, params = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"),
                                   None), None
    return found


def test_a_lost_response_to_a_committed_superseding_write_is_a_success(copies, base_url, http, tmp_path,
                                                                       capsys) -> None:
    """Before the fix: the retry got 409 (its ifMatch named the version the lost attempt had tagged), the
    patient was reported failed and run exited 1 although the data was right."""
    patient = copies[2]
    assert main(["run", "--server", base_url, "--patient", patient, "--json"]) == 0  # this session's results
    capsys.readouterr()
    bundle = next(b for b in _copy_bundles(copies) if b["entry"][0]["resource"]["id"] == patient)
    entry = _fresh_input(bundle)
    assert entry is not None
    _post(http, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    dropped: list[str] = []

    def drop_first_transaction(method: str, path: str, body: bytes) -> str | None:
        if method == "POST" and b'"type":"transaction"' in body and not dropped:
            dropped.append(path)
            return "drop"
        return None

    with FaultProxy(base_url, plan=drop_first_transaction) as proxy:
        code = main(["run", "--server", proxy.base_url, "--patient", patient, "--json"])
        out = json.loads(capsys.readouterr().out)
    transactions = [f for f in proxy.forwarded if f.method == "POST" and f.path.rstrip("/").endswith("/fhir")]
    faults = [f.fault for f in transactions]
    assert faults.count("drop") == 1, proxy.forwarded
    after = [f.status for f in transactions[faults.index("drop") + 1:]]
    # the server committed the dropped transaction; its retry is refused by the version check
    assert transactions[faults.index("drop")].status == 200 and {409, 412} & set(after), after
    [result] = out["patients"]
    assert code == 0, out
    assert result["status"] == "written" and "lost" in result["message"]
    current = current_results(http, base_url, [patient])[patient]
    assert sorted(f"{r['resourceType']}/{r['id']}" for r in current) == sorted(result["outputs"])
    assert Engine(FhirClient(base_url)).verify_patient(patient).valid


def test_a_superseded_tag_without_a_signature_fails_verify_patient(copies, base_url, http, capsys) -> None:
    patient = copies[5]
    assert main(["run", "--server", base_url, "--patient", patient]) == 0
    assert main(["verify", "--server", base_url, "--patient", patient]) == 0
    [current] = [r for r in current_results(http, base_url, [patient])[patient]
                 if r["resourceType"] == "RiskAssessment"][:1]
    meta = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [
        {"system": SUPERSEDED.split("|")[0], "code": SUPERSEDED.split("|")[1]}]}}]}
    url = f"{base_url}/RiskAssessment/{current['id']}"
    assert http.post(f"{url}/$meta-add", data=json.dumps(meta)).status_code == 200
    capsys.readouterr()
    try:
        assert main(["verify", "--server", base_url, "--patient", patient]) == 1
        err = capsys.readouterr().err
        assert "INVALID" in err and f"RiskAssessment/{current['id']}" in err
        assert "without a signed Provenance" in err
    finally:
        assert http.post(f"{url}/$meta-delete", data=json.dumps(meta)).status_code == 200
    assert main(["verify", "--server", base_url, "--patient", patient]) == 0


def _copy_bundles(ids: list[str]) -> list[dict]:
    from fhirtwin.sandbox.cohort import generate_cohort

    return [_copy(b) for b in generate_cohort().bundles[:len(ids)]]


def test_run_of_200_patients_through_faults_then_a_killed_run_resumes(copies, base_url, http, state_dir,
                                                                      tmp_path) -> None:
    """Measured on a shared, loaded 2-core machine: about 5 minutes (300 s; the first run through the faults
    takes most of it)."""
    keys = tmp_path / "keys"
    with FaultProxy(base_url, seed=SEED, rate=0.1, delay=(0.2, 1.5)) as proxy:
        _faulty_run_then_killed_run(proxy, copies, base_url, http, state_dir, keys)


def _faulty_run_then_killed_run(proxy: FaultProxy, copies: list[str], base_url: str, http: requests.Session,
                                state_dir: Path, keys: Path) -> None:
    """Everything goes through the proxy: the checkpoint is per FHIR base URL, and the proxy's is one."""
    done = subprocess.run(_run_args(proxy.base_url, copies), capture_output=True, text=True,
                          env=_env(state_dir, keys), timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    by_patient = {p["patient_id"]: p for p in report["patients"]}
    assert set(by_patient) == set(copies)
    statuses = Counter(p["status"] for p in report["patients"])
    assert statuses["failed"] == 0, [p for p in report["patients"] if p["status"] == "failed"]  # 0 false failures
    for fault in ("throttle", "unavailable", "delay", "reset", "drop"):
        assert proxy.count(fault) > 0, (fault, proxy.injected)
    assert proxy.count("drop", "POST") > 0, proxy.injected

    current = current_results(http, base_url, copies)
    planned = [p for p in copies if by_patient[p]["status"] in ("written", "unchanged")]
    assert len(planned) > COPIES // 2
    for patient in copies:
        results = current[patient]
        refs = sorted(f"{r['resourceType']}/{r['id']}" for r in results)
        if patient in planned:
            assert refs, f"{patient}: lost"
            assert refs == sorted(by_patient[patient]["outputs"]), f"{patient}: stale or foreign current results"
        else:
            assert refs == [], f"{patient}: results of a patient without a prediction"
        outcomes = Counter(r["code"]["coding"][0]["code"] for r in results if r["resourceType"] == "RiskAssessment")
        assert all(n == 1 for n in outcomes.values()), f"{patient}: duplicated {outcomes}"
    engine = Engine(FhirClient(base_url))
    for patient in planned[:: max(1, len(planned) // 8)]:
        verified = engine.verify_patient(patient)
        assert verified.valid, (patient, verified.problems)

    # inputs change for 40 patients; a run of all 200 is killed part-way, then run again
    changed = copies[:40]
    bundles = {b["entry"][0]["resource"]["id"]: b for b in _copy_bundles(copies)}
    fresh = [e for p in changed if (e := _fresh_input(bundles[p])) is not None]
    _post(http, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": fresh})
    database = checkpoint_path(proxy.base_url, state_dir)
    before = _checkpoint_rows(database)
    order = changed + copies[40:]
    killed = subprocess.Popen(_run_args(proxy.base_url, order), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_env(state_dir, keys))
    try:
        deadline = time.monotonic() + 300
        while len(_changed_rows(database, before)) < 12 and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    recorded = _changed_rows(database, before)
    assert 12 <= len(recorded) < len(changed), "the run was killed part-way through the changed patients"

    again = subprocess.run(_run_args(proxy.base_url, order), capture_output=True, text=True, env=_env(state_dir, keys),
                           timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout)
    status = {p["patient_id"]: p["status"] for p in rerun["patients"]}
    assert all(status[p] == "checkpointed" for p in recorded), "patients done before the kill are not re-run"
    assert all(status[p] == "checkpointed" for p in copies[40:])
    assert rerun["simulated"] == len(changed) - len(recorded)
    assert rerun["summary"].get("checkpointed") == COPIES - rerun["simulated"]
    assert rerun["summary"].get("failed", 0) == 0


def _checkpoint_rows(database: Path) -> dict[str, str]:
    with sqlite3.connect(str(database)) as db:
        return dict(db.execute("SELECT id, digest FROM patient").fetchall())


def _changed_rows(database: Path, before: dict[str, str]) -> set[str]:
    try:
        rows = _checkpoint_rows(database)
    except sqlite3.Error:
        return set()
    return {p for p, digest in rows.items() if before.get(p) != digest}


def test_a_rollback_by_deletion_is_caught_by_the_checkpoint_anchor(copies, base_url, http, tmp_path, capsys) -> None:
    """Signatures cannot prove that nothing newer was deleted. Deleting a patient's newest results and their
    Provenance, then untagging the older ones, passes ``verify --patient`` on the server's word alone; the
    run checkpoint's record of the last Provenance this machine wrote catches it."""
    patient, other = copies[6], copies[7]
    state = tmp_path / "state"
    run = ["run", "--server", base_url, "--patient", patient, "--patient", other, "--state-dir", str(state)]
    assert main(run) == 0
    fresh = _fresh_input(_copy_bundles(copies[:8])[6])
    assert fresh is not None
    _post(http, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": [fresh]})
    assert main(run) == 0  # the new results supersede the old; the checkpoint records the new Provenance
    assert main(["verify", "--server", base_url, "--patient", patient, "--state-dir", str(state)]) == 0
    newest = current_results(http, base_url, [patient])[patient]
    refs = [f"{r['resourceType']}/{r['id']}" for r in newest]
    provenances = http.get(f"{base_url}/Provenance", params={"target": ",".join(refs), "_count": 100}).json()
    found = [e["resource"] for e in provenances.get("entry", [])]
    older = sorted({"/".join(entity["what"]["reference"].split("/")[:2]) for prov in found
                    for entity in prov.get("entity", []) if entity.get("role") == "revision"})
    assert older, "the newest Provenance names the results it superseded"
    doomed = [f"Provenance/{prov['id']}" for prov in found] + refs
    assert http.post(base_url, data=json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": ref}} for ref in doomed]})).status_code == 200
    meta = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [
        {"system": SUPERSEDED.split("|")[0], "code": SUPERSEDED.split("|")[1]}]}}]}
    for ref in older:  # the previous run's results become "current" again
        assert http.post(f"{base_url}/{ref}/$meta-delete", data=json.dumps(meta)).status_code == 200
    capsys.readouterr()
    try:
        assert main(["verify", "--server", base_url, "--patient", patient,
                     "--state-dir", str(tmp_path / "elsewhere")]) == 0  # the server's word alone: looks fine
        assert main(["verify", "--server", base_url, "--patient", patient, "--state-dir", str(state)]) == 1
        assert "rolled back" in capsys.readouterr().err
    finally:
        assert main(["run", "--server", base_url, "--patient", patient, "--no-checkpoint"]) == 0
