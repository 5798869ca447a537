"""Population runs whose source is the sandbox's Bulk export, and incremental runs on it.

Five generated patients under ids of this module's own go into a Group of their own (the export of a small
Group takes seconds; the 240-patient cohort's minutes). The first run exports, stages and simulates them;
a resume after the export never exports again, and a run that crashed while its job ran polls the recorded
status URL instead of starting another job; after two patients' LDL values change on the server the
incremental run simulates exactly those two; a patient removed from the Group and deleted is retired with
its results listed. Everything uploaded is deleted afterwards.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirtwin.cli import main
from fhirtwin.fhir.client import FhirClient, patient_reference_id
from fhirtwin.fhir.errors import FhirError
from fhirtwin.population import run as population_run
from fhirtwin.population.bulk import BulkExport
from fhirtwin.population.run import LEDGER_FILE, Ledger, ServerSource, new_settings, run_population
from fhirtwin.sandbox.cohort import generate_patient

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("deployment_key")]

PATIENTS = 5
DRAWS = 100
AS_OF = date(2026, 6, 30)
LDL = "18262-6"


@pytest.fixture(scope="module")
def population(base_url: str) -> Iterator[dict[str, Any]]:
    """Five generated patients under a unique prefix and a Group of them; all deleted afterwards."""
    client = FhirClient(base_url)
    prefix = f"prl-{uuid.uuid4().hex[:10]}"
    uploaded: list[tuple[str, str]] = []
    patients: dict[str, list[dict[str, Any]]] = {}
    group_id = f"{prefix}-g"
    try:
        for k in range(1, PATIENTS + 1):
            bundle, _ = generate_patient(k)
            bundle = json.loads(json.dumps(bundle).replace("ftp-", f"{prefix}-"))
            resources = [e["resource"] for e in bundle["entry"]]
            uploaded += [(r["resourceType"], r["id"]) for r in resources]
            client.transaction(bundle)
            patients[resources[0]["id"]] = resources
        client.update({"resourceType": "Group", "id": group_id, "type": "person", "actual": True,
                       "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in patients]})
        uploaded.append(("Group", group_id))
        yield {"client": client, "group": group_id, "patients": patients}
    finally:
        delete_all(client, uploaded[::-1])


def delete_all(client: FhirClient, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Delete ``(type, id)`` s, a resource others still refer to in a later pass (HAPI refuses to delete a
    referenced resource); returns what could not be deleted."""
    left = list(items)
    for _ in range(5):
        refused = []
        for resource_type, resource_id in left:
            try:
                client.delete(resource_type, resource_id)
            except FhirError:
                refused.append((resource_type, resource_id))
        if not refused:
            return []
        left = refused
    return left


class ExportRequests:
    """The export requests a client sends: kick-offs and status polls (a request hook)."""

    def __init__(self, client: FhirClient) -> None:
        self.kickoffs = 0
        self.polls: list[str] = []
        client.add_hook("request", self.seen)

    def seen(self, request: requests.PreparedRequest) -> None:
        url = str(request.url)
        if "$export-poll-status" in url:
            self.polls.append(url)
        elif "/$export" in url:
            self.kickoffs += 1


def ldl_observation(resources: list[dict[str, Any]]) -> dict[str, Any]:
    observations = [r for r in resources if r["resourceType"] == "Observation" and "valueQuantity" in r]
    return next((o for o in observations if LDL in json.dumps(o["code"])), observations[0])


def ledger_rows(out: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(out / LEDGER_FILE) as db:
        return list(db.execute(sql, params))


def test_server_runs_resume_without_exporting_again_and_incremental_runs_simulate_only_changes(
        population: dict[str, Any], base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    client: FhirClient = population["client"]
    group: str = population["group"]
    patients: dict[str, list[dict[str, Any]]] = population["patients"]
    out = tmp_path / "out"
    simulated: list[str] = []
    original = population_run._simulate_one

    def counting(engine: Any, consent: Any, patient_id: str, *args: Any) -> dict[str, Any] | None:
        simulated.append(patient_id)
        return original(engine, consent, patient_id, *args)

    monkeypatch.setattr(population_run, "_simulate_one", counting)

    # 1. the first run: exported, staged, simulated
    first = run_population(None, out, server=ServerSource(client, "group", group_id=group, max_wait=600),
                           serial=True, draws=DRAWS, as_of=AS_OF, target=base_url)  # the CLI's --server is both
    assert sorted(simulated) == sorted(patients)
    assert first.lineage == {"simulated": PATIENTS, "carried_over": 0, "retired": 0} and first.failed == 0
    assert first.export is not None and first.export["exported_now"] is True
    assert first.export["resources"]["Patient"] == PATIENTS
    assert first.export["resources"]["Observation"] == sum(
        1 for resources in patients.values() for r in resources if r["resourceType"] == "Observation")
    [(state, transaction_time, since, level)] = ledger_rows(
        out, "SELECT state, transaction_time, since, level FROM exports WHERE run_id = ?", first.run_id)
    assert (state, since, level) == ("done", None, "group") and transaction_time == first.export["transaction_time"]
    manifest = json.loads((out / "export" / first.run_id / "manifest.json").read_text())
    assert manifest["transactionTime"] == transaction_time

    # 2. a crash after the export (staging and results lost): the resume stages again and sends nothing
    shutil.rmtree(out / "stage" / first.run_id)
    shutil.rmtree(out / "runs" / first.run_id)
    with sqlite3.connect(out / LEDGER_FILE) as db:
        db.execute("UPDATE partitions SET state = 'running' WHERE run_id = ?", (first.run_id,))
    quiet = FhirClient(base_url)
    resumed = run_population(None, out, resume=first.run_id, serial=True,
                             server=ServerSource(quiet, "group", group_id=group))
    assert quiet.request_count == 0, "the resume contacted the server"
    assert resumed.export is not None and resumed.export["exported_now"] is False
    assert resumed.lineage["simulated"] == PATIENTS and resumed.failed == 0

    # 3. a crash while the job ran (status URL recorded, no folder): the resume polls that job, starts none
    watched = FhirClient(base_url)
    requests_seen = ExportRequests(watched)
    status_url = BulkExport(watched, "group", group_id=group).kick_off()
    assert requests_seen.kickoffs == 1
    crashed_id = "20260101T000000Z-c0ffee"
    with Ledger(out / LEDGER_FILE) as ledger:
        ledger.create_run(crashed_id, source=str(out / "export" / crashed_id),
                          stage_dir=str(out / "stage" / crashed_id),
                          settings=new_settings(draws=DRAWS, as_of=AS_OF, target=None))
        ledger.start_export(crashed_id, server=base_url, level="group", group_id=group, since=None)
        ledger.export_polling(crashed_id, status_url)
    polled = run_population(None, out, resume=crashed_id, serial=True,
                            server=ServerSource(watched, "group", group_id=group))
    assert requests_seen.kickoffs == 1, "the resume started another export job"
    assert polled.export is not None and polled.export["exported_now"] is True
    assert polled.lineage["simulated"] == PATIENTS

    # 4. two patients' LDL change on the server: the incremental run simulates exactly those two
    changed = sorted(patients)[:2]
    for patient_id in changed:
        observation = ldl_observation(patients[patient_id])
        observation["valueQuantity"]["value"] = round(observation["valueQuantity"]["value"] + 23.0, 1)
        client.update(observation)
    simulated.clear()
    second = run_population(None, out, server=ServerSource(client, "group", group_id=group, max_wait=600),
                            incremental_from=first.run_id, serial=True)
    assert sorted(simulated) == changed
    assert second.lineage == {"simulated": 2, "carried_over": PATIENTS - 2, "retired": 0}
    [(since, incremental_from)] = ledger_rows(
        out, "SELECT e.since, r.incremental_from FROM exports e JOIN runs r USING (run_id) WHERE run_id = ?",
        second.run_id)
    assert (since, incremental_from) == (transaction_time, first.run_id)
    assert second.export is not None and second.export["changed_patients"] == 2
    assert set(second.export["resources"]) == {"Observation"}  # the export held only what changed

    # 5. one patient leaves the Group and is deleted: retired, with its results listed; nobody is simulated
    gone = sorted(patients)[-1]
    client.update({"resourceType": "Group", "id": group, "type": "person", "actual": True,
                   "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in patients if pid != gone]})
    assert delete_all(client, [(r["resourceType"], r["id"]) for r in patients[gone][::-1]
                               if patient_reference_id(r) == gone]) == []
    simulated.clear()
    third = run_population(None, out, server=ServerSource(client, "group", group_id=group, max_wait=600),
                           incremental_from=second.run_id, serial=True)
    assert simulated == []
    assert third.lineage == {"simulated": 0, "carried_over": PATIENTS - 1, "retired": 1}
    assert ledger_rows(out, "SELECT patient_id FROM patients WHERE run_id = ? AND status = 'retired'",
                       third.run_id) == [(gone,)]
    [retired] = [json.loads(line) for line in (out / "runs" / third.run_id / "retired.ndjson").read_text().splitlines()]
    assert retired["patient_id"] == gone and retired["results_run"] == first.run_id
    first_status = ledger_rows(out, "SELECT status FROM patients WHERE run_id = ? AND patient_id = ?",
                               first.run_id, gone)[0][0]
    assert retired["status"] == first_status
    assert bool(retired["results"]) == (first_status == "planned")

    # 6. the CLI: --server without SOURCE is the source; nothing changed since, so everyone is carried over
    code = main(["population", "run", "--server", base_url, "--group", group, "--out", str(out), "--serial",
                 "--incremental-from", third.run_id, "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["lineage"] == {"simulated": 0, "carried_over": PATIENTS - 1, "retired": 0}
    assert third.export is not None and report["export"]["since"] == third.export["transaction_time"]
    assert simulated == []


def _outputs(out: Path, run_id: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Summary rows and bundles (signature values dropped: ECDSA differs per signing) by patient."""
    import pyarrow.parquet as pq

    rows = {r["patient_id"]: r for path in (out / "runs" / run_id / "summaries").glob("*.parquet")
            for r in pq.read_table(path).to_pylist()}
    bundles: dict[str, dict[str, Any]] = {}
    for path in (out / "runs" / run_id / "bundles").glob("*.ndjson"):
        for line in path.read_text("utf-8").splitlines():
            bundle = json.loads(line)
            for entry in bundle["entry"]:
                for signature in entry["resource"].get("signature", []):
                    signature.pop("data")
            subject = next(e["resource"]["subject"]["reference"] for e in bundle["entry"]
                           if "subject" in e["resource"])
            bundles[subject.split("/")[1]] = bundle
    return rows, bundles


def test_a_server_without_bulk_data_is_read_by_search_and_gives_the_export_runs_results(
        population: dict[str, Any], base_url: str, tmp_path: Path) -> None:
    """The search fallback sends no $export, reads the Group's members' whole records, and the run's numbers,
    statuses and bundles are those of the run from the Bulk export of the same Group."""
    from datetime import UTC, datetime

    group, recorded = population["group"], datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
    exported = run_population(None, tmp_path / "by-export", serial=True, draws=DRAWS, as_of=AS_OF, target=base_url,
                              recorded=recorded, server=ServerSource(population["client"], "group", group_id=group,
                                                                     max_wait=600))
    searching = FhirClient(base_url)
    requests_seen = ExportRequests(searching)
    searched = run_population(None, tmp_path / "by-search", serial=True, draws=DRAWS, as_of=AS_OF, target=base_url,
                              recorded=recorded, server=ServerSource(searching, "group", group_id=group,
                                                                     by_search=True))
    assert requests_seen.kickoffs == 0 and searched.export is None
    assert [p.name for p in (tmp_path / "by-search" / "search").iterdir()]  # the records read, kept for resume
    rows_e, bundles_e = _outputs(tmp_path / "by-export", exported.run_id)
    rows_s, bundles_s = _outputs(tmp_path / "by-search", searched.run_id)
    assert sorted(rows_s) == sorted(rows_e) and len(rows_s) >= 3
    numbers = [k for k in rows_e[next(iter(rows_e))] if k not in ("input_hash",)]
    for pid, row in rows_e.items():
        assert {k: rows_s[pid][k] for k in numbers} == {k: row[k] for k in numbers}, pid
    assert bundles_s == bundles_e and bundles_e
