"""Population write-back against the real sandbox: a run's bundles written three patients per transaction by two
writers, a writer killed mid-way and resumed with nothing created twice, a finished write sending nothing, a
refused patient split out, and the results equal to what the plain engine path writes for the same patient.

The patients are this module's own (ids unique to the run of the test), uploaded to the sandbox and read back
as the engine reads them (with versions, as a Bulk export gives them) to make the population run's source.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization

from fhirtwin.cli import main
from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.population.run import LEDGER_FILE, run_population
from fhirtwin.population.writeback import WriteReport, write_population
from fhirtwin.sandbox.cohort import generate_patient
from fhirtwin.vocabulary import GENERATED_TAG, PREDICTION_ID_SYSTEM, RUN_TAG_SYSTEM, token
from fhirtwin.writeback.jws import ENV_KEY_FILE, SigningKey, generate_key
from fhirtwin.writeback.signing import signing_form

pytestmark = pytest.mark.integration

N_PATIENTS = 8
SEED = 77
DRAWS = 50
AS_OF = date(2026, 6, 30)
RECORDED = datetime(2026, 7, 1, 9, 30, tzinfo=UTC)
RESULT_TYPES = ("RiskAssessment", "Goal", "CarePlan")


@dataclass
class Population:
    out: Path
    run_id: str
    patients: list[str]
    planned: dict[str, dict[str, Any]]  # patient id -> its summary row
    key: SigningKey


class KilledAfter(FhirClient):
    """A client whose writer dies right after its ``kill_at``-th transaction committed (its response is lost)."""

    def __init__(self, base_url: str, kill_at: int) -> None:
        super().__init__(base_url)
        self.kill_at = kill_at
        self.sent = 0

    def transaction(self, bundle_or_entries: Any) -> dict[str, Any]:
        response = super().transaction(bundle_or_entries)
        self.sent += 1
        if self.sent == self.kill_at:
            raise RuntimeError("writer killed")
        return response


@pytest.fixture(scope="module")
def population(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This module's patients on the sandbox and a population run made for the sandbox from their records."""
    folder = tmp_path_factory.mktemp("population-write")
    signing = generate_key("ES256")
    (folder / "signing.pem").write_bytes(signing.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    prefix = f"pw{uuid.uuid4().hex[:10]}"
    client = FhirClient(base_url)
    patients = []
    for k in range(1, N_PATIENTS + 1):
        bundle, _ = generate_patient(k, SEED)
        bundle = json.loads(json.dumps(bundle).replace("ftp-", f"{prefix}-"))
        client.transaction(bundle)
        patients.append(bundle["entry"][0]["resource"]["id"])
    engine = Engine(client)
    (folder / "ndjson").mkdir()
    for pid in patients:
        for resource in engine.read(pid, with_stored=False).resources:
            with open(folder / "ndjson" / f"{resource['resourceType']}.ndjson", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(resource) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_KEY_FILE, str(folder / "signing.pem"))
        report = run_population(folder / "ndjson", folder / "out", serial=True, draws=DRAWS, as_of=AS_OF,
                                recorded=RECORDED, target=base_url, buckets=2)
        rows = [r for f in (folder / "out" / "runs" / report.run_id / "summaries").glob("*.parquet")
                for r in pq.read_table(f).to_pylist()]
        planned = {r["patient_id"]: r for r in rows if r["status"] == "planned"}
        assert len(planned) >= 6 and len(rows) == N_PATIENTS
        yield Population(folder / "out", report.run_id, patients, planned, signing)


@pytest.fixture(scope="module")
def written(population: Population, base_url: str) -> tuple[WriteReport, dict[str, int]]:
    """The write killed after its second group committed, the state of the server then, and the resumed write."""
    with pytest.raises(RuntimeError, match="killed"):
        # transaction 1: the shared Organization and Devices; 2 and 3: groups of three patients
        write_population(population.out, population.run_id, server=base_url, client=KilledAfter(base_url, 3),
                         bundle_size=3, writers=1)
    after_kill = provenances(FhirClient(base_url), population)
    resumed = write_population(population.out, population.run_id, server=base_url, bundle_size=3, writers=2)
    return resumed, after_kill


def provenances(client: FhirClient, population: Population) -> dict[str, int]:
    """How many Provenances carry each planned patient's run tag on the server."""
    entries = [{"request": {"method": "GET", "url": f"Provenance?_tag={RUN_TAG_SYSTEM}|{row['run_key']}"
                                                    "&_summary=count"}} for row in population.planned.values()]
    answers = client.batch(entries)["entry"]
    return {pid: a["resource"]["total"] for pid, a in zip(population.planned, answers, strict=True)}


def identifier_counts(client: FhirClient, row: dict[str, Any]) -> dict[str, int]:
    """Resources on the server per result key of a summary row (``Type/name=key``)."""
    names = sorted(row["result_keys"])
    entries = [{"request": {"method": "GET", "url": f"{name.split('=')[0].split('/')[0]}?identifier="
                                                    f"{PREDICTION_ID_SYSTEM}|{name.split('=', 1)[1]}&_summary=count"}}
               for name in names]
    answers = client.batch(entries)["entry"]
    return {name: a["resource"]["total"] for name, a in zip(names, answers, strict=True)}


def test_killed_write_resumed_writes_every_planned_patient_once(population: Population, written: Any,
                                                                base_url: str) -> None:
    resumed, after_kill = written
    client = FhirClient(base_url)
    # the kill left two groups on the server (the second one unrecorded) and the rest unwritten
    assert sum(after_kill.values()) == 6 and set(after_kill.values()) == {0, 1}
    assert resumed.failed == 0 and resumed.already_written == 3
    assert resumed.written == len(population.planned) - 3
    assert provenances(client, population) == dict.fromkeys(population.planned, 1)
    for pid, row in population.planned.items():
        counts = identifier_counts(client, row)
        assert counts and set(counts.values()) == {1}, pid
        assert any(name.startswith("CarePlan") for name in counts)
        assert sum(name.startswith("RiskAssessment/") for name in counts) >= 4
        on_server = {t: client.search(t, {"subject": f"Patient/{pid}", "_tag": token(GENERATED_TAG),
                                          "_summary": "count"})["total"] for t in RESULT_TYPES}
        assert sum(on_server.values()) == len(counts), pid
    for pid in set(population.patients) - set(population.planned):
        assert client.search("RiskAssessment", {"subject": f"Patient/{pid}", "_summary": "count"})["total"] == 0


def test_the_written_results_verify_and_a_second_write_sends_nothing(population: Population, written: Any,
                                                                     base_url: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    engine = Engine(FhirClient(base_url))
    for pid in population.planned:
        report = engine.verify_patient(pid)
        assert report.valid, report.problems
        assert len(report.current) == len(population.planned[pid]["result_keys"])
    capsys.readouterr()
    code = main(["population", "write", str(population.out / "runs" / population.run_id), "--server", base_url,
                 "--bundle-size", "3", "--writers", "2", "--json"])
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["transactions"] == 0 and again["written"] == 0
    assert again["already_written"] == len(population.planned)
    with sqlite3.connect(population.out / LEDGER_FILE) as db:
        states = dict(db.execute("SELECT patient_id, state FROM population_writes WHERE run_id = ?",
                                 (population.run_id,)).fetchall())
    assert states == dict.fromkeys(population.planned, "written")


def test_a_refused_patient_is_split_out_on_the_server(population: Population, written: Any, base_url: str,
                                                      tmp_path: Path) -> None:
    """A copy of the run whose write state is gone, with one patient's bundle holding a new RiskAssessment about a
    patient the server does not hold: HAPI refuses that transaction (referential integrity); the others in its
    group are (again) written, nothing doubles and nothing of the refused transaction stays."""
    out = tmp_path / "out"
    shutil.copytree(population.out, out)
    with sqlite3.connect(out / LEDGER_FILE) as db:
        db.execute("DELETE FROM population_writes")
    bad = sorted(population.planned)[1]
    for path in (out / "runs" / population.run_id / "bundles").glob("*.ndjson"):
        lines = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        for bundle in lines:
            entry = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"][-1]
            if entry["resource"]["subject"]["reference"] == f"Patient/{bad}":
                fresh = uuid.uuid4().hex
                entry["resource"]["subject"]["reference"] = f"Patient/{bad}-gone"
                entry["resource"]["identifier"][0]["value"] = fresh
                entry["request"]["ifNoneExist"] = f"identifier={PREDICTION_ID_SYSTEM}|{fresh}"
        path.write_text("".join(json.dumps(b) + "\n" for b in lines), encoding="utf-8")
    report = write_population(out, population.run_id, server=base_url, bundle_size=3, writers=2)
    assert set(report.failures) == {bad} and report.splits >= 1
    assert report.written == len(population.planned) - 1 and report.created == 0
    client = FhirClient(base_url)
    assert provenances(client, population) == dict.fromkeys(population.planned, 1)
    assert client.search("RiskAssessment", {"subject": f"Patient/{bad}-gone", "_summary": "count"})["total"] == 0


def test_population_results_equal_the_engine_path_for_the_same_patient(population: Population, written: Any,
                                                                        base_url: str) -> None:
    """The engine's own run, prepare and commit for a patient the population wrote: the same content (ignoring
    meta, ids and the signature bytes: ECDSA signatures differ each time) and nothing new created."""
    client = FhirClient(base_url)
    engine = Engine(client, signing_key=population.key, draws=DRAWS)
    for pid in sorted(population.planned)[:2]:
        run = engine.run(pid, as_of=AS_OF)
        write = engine.prepare(run, now=RECORDED)
        assert write.run_key == population.planned[pid]["run_key"]
        sent = [e for e in write.bundle["entry"] if e["request"]["method"] == "POST"]
        *results, provenance = sent
        stored_provenance = client.search("Provenance", {"_tag": f"{RUN_TAG_SYSTEM}|{write.run_key}"})["entry"][0][
            "resource"]
        stored_refs = [t["reference"] for t in stored_provenance["target"]]
        sent_refs = [t["reference"] for t in provenance["resource"]["target"]]
        assert len(stored_refs) == len(sent_refs) == len(results)
        for entry, stored_ref in zip(results, stored_refs, strict=True):
            stored = client.read(*stored_ref.split("/")[:2])
            assert stored["identifier"] == entry["resource"]["identifier"]
            assert signing_form(stored, stored_refs) == signing_form(entry["resource"], sent_refs), stored_ref
        assert _provenance_content(stored_provenance) == _provenance_content(provenance["resource"])
        commit = engine.commit(write)
        assert commit.created == 0, pid


def _provenance_content(provenance: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in provenance.items() if k not in ("id", "meta", "text", "target", "signature")}
    signature = {k: v for k, v in provenance["signature"][0].items() if k != "data"}
    return {**body, "signature": signature, "targets": len(provenance["target"])}


def test_a_patient_gone_from_the_population_has_its_results_retired_once(
        population: Population, written: Any, base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental run over the same records less one planned patient lists that patient as retired; the
    write then supersedes every current result of the patient on the server (a signed currency Provenance), and
    a second write retires nothing more."""
    departed = sorted(population.planned)[-1]
    source = population.out.parent / "ndjson"
    smaller = population.out.parent / "ndjson-without-one"
    smaller.mkdir()
    for path in source.glob("*.ndjson"):
        kept = [line for line in path.read_text("utf-8").splitlines()
                if json.loads(line).get("id") != departed
                and (json.loads(line).get("subject") or json.loads(line).get("patient") or {}).get("reference")
                != f"Patient/{departed}"]
        path_out = smaller / path.name
        path_out.write_text("".join(line + "\n" for line in kept), "utf-8")
    monkeypatch.setenv(ENV_KEY_FILE, str(population.out.parent / "signing.pem"))
    later = run_population(smaller, population.out, serial=True, incremental_from=population.run_id,
                           recorded=datetime(2026, 7, 2, 9, 30, tzinfo=UTC))
    assert later.patients.get("retired") == 1

    report = write_population(population.out, later.run_id, server=base_url, bundle_size=3, writers=2)
    client = FhirClient(base_url)
    results = [e["resource"] for rtype in RESULT_TYPES for e in client.search(rtype, {
        "subject": f"Patient/{departed}", "_tag": token(GENERATED_TAG), "_count": 100}).get("entry", [])]
    assert {r["resourceType"] for r in results} == set(RESULT_TYPES)
    assert report.retired == len(results)  # every result the one earlier write made was current
    assert all(any(t.get("code") == "superseded" for t in r["meta"].get("tag", [])) for r in results)
    assert report.failed == 0 and report.written == 0  # the others are on the server already
    again = write_population(population.out, later.run_id, server=base_url, bundle_size=3, writers=2)
    assert again.retired == 0 and again.transactions == 0
