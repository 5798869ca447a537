"""Population runs: the same numbers and identifiers as a plain engine run, Dask equal to serial, and a run
killed or damaged mid-way resumed with nothing lost, nothing twice and no done partition simulated again."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fhirtwin.cli import main
from fhirtwin.engine import Engine
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import (
    LEDGER_FILE,
    PopulationReport,
    PopulationRunError,
    run_population,
)
from fhirtwin.population.stage import stage_ndjson
from fhirtwin.writeback.jws import SigningKey
from fhirtwin.writeback.signing import signature_header

N_PATIENTS = 30
BUCKETS = 6
DRAWS = 100
AS_OF = date(2026, 6, 30)
RECORDED = datetime(2026, 7, 1, 8, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def key(deployment_key: SigningKey) -> SigningKey:
    return deployment_key


DENIED = "ftp-0002"
#: A privacy Consent denying every purpose of use (FHIR R4 Consent; scope patient-privacy, base provision deny).
DENY_ALL = {"resourceType": "Consent", "id": "deny-all", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{DENIED}"}, "provision": {"type": "deny"}}


@pytest.fixture(scope="module")
def ndjson(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ndjson")
    write_cohort_ndjson(folder, N_PATIENTS, seed=23)
    (folder / "Consent.ndjson").write_text(json.dumps(DENY_ALL) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def staged(ndjson: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage") / "staged"
    stage_ndjson(ndjson, out, buckets=BUCKETS)
    return out


@pytest.fixture(scope="module")
def serial(staged: Path, key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PopulationReport]:
    out = tmp_path_factory.mktemp("serial")
    report = run_population(staged, out, serial=True, draws=DRAWS, as_of=AS_OF, recorded=RECORDED)
    return out, report


@pytest.fixture(scope="module")
def cluster(key: SigningKey) -> Iterator[str]:
    """One two-worker cluster for the Dask tests (its workers inherit the key's environment)."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as local:
        yield local.scheduler_address


# ------------------------------------------------------------------------------------------------ helpers


def summaries(out: Path, run_id: str) -> pa.Table:
    files = sorted((out / "runs" / run_id / "summaries").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("patient_id")


def bundles(out: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """Every bundle line by its patient; a patient twice is a failure."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "runs" / run_id / "bundles").glob("*.ndjson")):
        for line in path.read_text("utf-8").splitlines():
            bundle = json.loads(line)
            patient = next(e["resource"]["subject"]["reference"] for e in bundle["entry"]
                           if e["resource"]["resourceType"] == "RiskAssessment")
            assert patient not in found, f"{patient} written twice"
            found[patient] = bundle
    return found


def unsigned(bundle: dict[str, Any]) -> dict[str, Any]:
    """The bundle without its signature values (ECDSA signatures differ on every signing)."""
    copied = copy.deepcopy(bundle)
    for entry in copied["entry"]:
        for signature in entry["resource"].get("signature", []):
            signature.pop("data")
    return copied


def ledger_rows(out: Path, run_id: str) -> dict[str, tuple[str, int, int]]:
    """partition -> (state, attempts, patients simulated over all attempts)."""
    with sqlite3.connect(out / LEDGER_FILE) as db:
        return {p: (s, a, n) for p, s, a, n in db.execute(
            "SELECT partition, state, attempts, simulated FROM partitions WHERE run_id = ?", (run_id,))}


def ledger_patients(out: Path, run_id: str) -> list[str]:
    with sqlite3.connect(out / LEDGER_FILE) as db:
        return [r[0] for r in db.execute("SELECT patient_id FROM patients WHERE run_id = ?", (run_id,))]


def temp_files(out: Path) -> list[str]:
    return [p.name for p in (out / "runs").rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ tests


def test_summaries_and_bundles_equal_a_plain_engine_run(ndjson: Path, serial: tuple[Path, PopulationReport],
                                                        key: SigningKey) -> None:
    out, report = serial
    assert report.failed == 0 and report.done_now == BUCKETS
    assert sum(report.patients.values()) == N_PATIENTS
    table = summaries(out, report.run_id)
    rows = {r["patient_id"]: r for r in table.to_pylist()}
    written = bundles(out, report.run_id)
    planned = [pid for pid, r in rows.items() if r["status"] == "planned"]
    others = [pid for pid, r in rows.items() if r["status"] in ("out-of-scope", "insufficient-data")]
    assert len(planned) >= 3 and others, "the cohort should hold planned and unplanned patients"
    assert all(isinstance(rows[p]["age_years"], float) and rows[p]["sex"] in ("female", "male") for p in planned)
    assert len(written) == len(planned)

    engine = Engine(NdjsonSource(ndjson), signing_key=key, draws=DRAWS)
    for patient_id in [*planned[:3], others[0]]:
        record = dataclasses.replace(engine.read(patient_id, with_stored=False), stored=[])
        run = engine.run(patient_id, record=record, as_of=AS_OF)
        row = rows[patient_id]
        inputs = run.model.inputs_ if run.model is not None else None
        if inputs is not None:  # the characteristics are the engine's own model inputs
            assert (row["sex"], row["age_years"], row["diabetes"], row["egfr"], row["race"]) == (
                inputs.sex, inputs.age_years, inputs.diabetes, inputs.egfr_ml_min_1_73m2, inputs.race)
        else:
            assert (row["sex"], row["race"]) == (run.state.demographics.sex, run.state.demographics.race)
            assert row["diabetes"] is None and row["egfr"] is None
        if run.plan is None:
            assert row["status"] in ("out-of-scope", "insufficient-data")
            assert row["scope"] == (run.scope.code if run.scope else None)
            assert f"Patient/{patient_id}" not in written
            continue
        baseline = run.plan.baseline
        for outcome in ("total_cvd", "ascvd", "kidney_failure"):
            for years in (5, 10):
                expected = baseline.at_horizon(outcome, years)
                assert row[f"{outcome}_{years}y_median"] == expected["median"]
                assert (row[f"{outcome}_{years}y_p05"], row[f"{outcome}_{years}y_p95"]) == (
                    expected["p05"], expected["p95"])
        best = run.plan.options[0] if run.plan.options else None
        assert row["best_proposal"] == (best.scenario.name if best else None)
        assert row["options"] == len(run.plan.options)
        category = baseline.risk_category("total_cvd", 10.0, baseline.at_horizon("total_cvd", 10.0)["median"])
        assert category is not None and row["risk_category_code"] == category.code
        write = engine.prepare(run, now=RECORDED)
        assert row["run_key"] == write.run_key
        assert unsigned(written[f"Patient/{patient_id}"]) == unsigned(write.bundle)
        provenance = next(e["resource"] for e in written[f"Patient/{patient_id}"]["entry"]
                          if e["resource"]["resourceType"] == "Provenance")
        assert signature_header(provenance["signature"][0]["data"])["kid"] == key.kid


def test_dask_and_serial_give_identical_results(staged: Path, serial: tuple[Path, PopulationReport],
                                                cluster: str, tmp_path: Path) -> None:
    serial_out, serial_report = serial
    report = run_population(staged, tmp_path, scheduler=cluster, draws=DRAWS, as_of=AS_OF, recorded=RECORDED)
    assert report.workers == 2 and report.done_now == BUCKETS and report.failed == 0
    assert summaries(tmp_path, report.run_id).equals(summaries(serial_out, serial_report.run_id))
    dask_bundles = bundles(tmp_path, report.run_id)
    serial_bundles = bundles(serial_out, serial_report.run_id)
    assert dask_bundles.keys() == serial_bundles.keys()
    assert all(unsigned(dask_bundles[p]) == unsigned(serial_bundles[p]) for p in dask_bundles)
    assert {state for state, _, _ in ledger_rows(tmp_path, report.run_id).values()} == {"done"}


def test_resume_after_a_crash_redoes_only_unfinished_partitions(serial: tuple[Path, PopulationReport], cluster: str,
                                                                tmp_path: Path) -> None:
    source, original = serial
    out = tmp_path / "out"
    shutil.copytree(source, out)
    run_dir = out / "runs" / original.run_id
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "summaries").iterdir()}
    # a crash: one partition left running, one partition's bundle file lost, a temporary file left behind
    with sqlite3.connect(out / LEDGER_FILE) as db:
        db.execute("UPDATE partitions SET state = 'running' WHERE partition = 'bucket-00001'")
    (run_dir / "bundles" / "bucket-00003.ndjson").unlink()
    (run_dir / "summaries" / "bucket-00004.parquet.tmp-deadbeef").write_bytes(b"half a file")

    report = run_population(None, out, resume=original.run_id, scheduler=cluster)
    assert (report.already_done, report.done_now, report.failed) == (BUCKETS - 2, 2, 0)
    rows = ledger_rows(out, original.run_id)
    assert {p for p, (_, attempts, _) in rows.items() if attempts == 2} == {"bucket-00001", "bucket-00003"}
    assert all(state == "done" and attempts in (1, 2) for state, attempts, _ in rows.values())
    redone = rows["bucket-00001"][2] // 2 + rows["bucket-00003"][2] // 2
    assert report.simulated_now == redone
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "summaries").iterdir()}
    untouched = set(before) - {"bucket-00001.parquet", "bucket-00003.parquet"}
    assert all(after[name] == before[name] for name in untouched), "a done partition was simulated again"
    table = summaries(out, original.run_id)
    assert table.num_rows == N_PATIENTS == len(set(table["patient_id"].to_pylist()))
    assert sorted(ledger_patients(out, original.run_id)) == table["patient_id"].to_pylist()
    assert len(bundles(out, original.run_id)) == report.patients["planned"]
    assert temp_files(out) == []


def test_sigkill_mid_run_then_resume_loses_nothing(ndjson: Path, key: SigningKey, cluster: str,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fhirtwin", "population", "run", str(ndjson), "--out", str(out), "--workers", "2",
               "--draws", str(DRAWS), "--as-of", AS_OF.isoformat(), "--buckets", "10"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 120
    found = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
            try:
                with sqlite3.connect(out / LEDGER_FILE, timeout=5) as db:
                    found = db.execute("SELECT run_id FROM runs").fetchone()
                    done = db.execute("SELECT COUNT(*) FROM partitions WHERE state = 'done'").fetchone()[0]
            except sqlite3.OperationalError:
                continue  # the ledger is being created
            if found and done:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL and found, "the run finished before it could be killed"
    run_id = found[0]
    done_before = {p: attempts for p, (state, attempts, _) in ledger_rows(out, run_id).items() if state == "done"}
    assert 0 < len(done_before) < 10

    report = run_population(None, out, resume=run_id, scheduler=cluster)
    rows = ledger_rows(out, run_id)
    assert len(rows) == 10 and all(state == "done" for state, _, _ in rows.values())
    assert all(rows[p][1] == attempts == 1 for p, attempts in done_before.items()), "done partitions were redone"
    assert report.already_done == len(done_before) and report.done_now == 10 - len(done_before)
    table = summaries(out, run_id)
    assert table.num_rows == N_PATIENTS == len(set(table["patient_id"].to_pylist()))
    assert len(bundles(out, run_id)) == report.patients["planned"]
    assert temp_files(out) == []


def test_resume_refuses_other_settings_and_unknown_runs(serial: tuple[Path, PopulationReport], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, report = serial
    with pytest.raises(PopulationRunError, match="other settings"):
        run_population(None, out, resume=report.run_id, draws=DRAWS + 1, serial=True)
    assert main(["population", "run", "--out", str(tmp_path), "--resume", "20000101T000000Z-000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run" in err
    assert main(["population", "run", "--out", str(tmp_path)]) == 2


def test_a_patient_whose_consent_denies_the_purpose_gets_no_numbers_and_no_bundle(
        ndjson: Path, serial: tuple[Path, PopulationReport], key: SigningKey) -> None:
    out, report = serial
    row = next(r for r in summaries(out, report.run_id).to_pylist() if r["patient_id"] == DENIED)
    assert row["status"] == "consent-denied" and row["total_cvd_10y_median"] is None
    assert f"Patient/{DENIED}" not in bundles(out, report.run_id)
    assert report.patients["consent-denied"] == 1
    engine = Engine(NdjsonSource(ndjson), signing_key=key, draws=DRAWS)  # without the Consent it would be planned
    record = dataclasses.replace(engine.read(DENIED, with_stored=False), stored=[])
    assert engine.run(DENIED, record=record, as_of=AS_OF).plan is not None


def test_a_failing_patient_is_a_failed_row_and_the_partition_goes_on(key: SigningKey, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "ndjson"
    write_cohort_ndjson(source, 3, seed=5)
    unborn = {"resourceType": "Patient", "id": "born-later", "gender": "female", "birthDate": "2031-01-01"}
    with open(source / "Patient.ndjson", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(unborn) + "\n")
    out = tmp_path / "out"
    code = main(["population", "run", str(source), "--out", str(out), "--serial", "--draws", str(DRAWS),
                 "--as-of", AS_OF.isoformat(), "--buckets", "1", "--json"])
    assert code == 1  # some patients failed
    report = json.loads(capsys.readouterr().out)
    assert report["done_now"] == 1 and report["patients"]["failed"] == 1
    assert sum(report["patients"].values()) == 4
    row = next(r for r in summaries(out, report["run_id"]).to_pylist() if r["patient_id"] == "born-later")
    assert row["status"] == "failed" and "birth date" in row["message"]
