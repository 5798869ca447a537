"""Incremental population runs from a folder: only patients whose input changed (or who are new) are simulated,
the others' summary rows and bundles are carried over unchanged, and patients no longer there are retired with
the results they had listed for write-back."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fhirtwin.cli import main
from fhirtwin.population import run as population_run
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import LEDGER_FILE, PartitionResult, PopulationReport, PopulationRunError, run_population

N_PATIENTS = 30
DRAWS = 100
AS_OF = date(2026, 6, 30)
LDL = "18262-6"


pytestmark = pytest.mark.usefixtures("deployment_key")


# ------------------------------------------------------------------------------------------------ helpers


def owner(resource: dict[str, Any]) -> str | None:
    """The patient a resource is of (None: shared, e.g. a Medication)."""
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    reference = (resource.get("subject") or resource.get("patient") or {}).get("reference")
    return str(reference).split("/")[-1] if reference else None


def read_folder(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {path.name: [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
            for path in sorted(folder.glob("*.ndjson"))}


def write_folder(folder: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    for path in folder.glob("*.ndjson"):
        path.unlink()
    for name, resources in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in resources), encoding="utf-8")


def summary_rows(out: Path, run_id: str) -> dict[str, dict[str, Any]]:
    files = sorted((out / "runs" / run_id / "summaries").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    rows = table.to_pylist()
    assert len(rows) == len({r["patient_id"] for r in rows}), "a patient has two summary rows"
    return {r["patient_id"]: r for r in rows}


def bundle_lines(out: Path, run_id: str) -> dict[str, str]:
    """Each bundle line (as written) by the patient its RiskAssessments are about."""
    found: dict[str, str] = {}
    for path in sorted((out / "runs" / run_id / "bundles").glob("*.ndjson")):
        for line in path.read_text("utf-8").splitlines():
            bundle = json.loads(line)
            subject = next(e["resource"]["subject"]["reference"] for e in bundle["entry"]
                           if e["resource"]["resourceType"] == "RiskAssessment")
            assert subject not in found
            found[subject.split("/")[-1]] = line
    return found


def ledger(out: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(out / LEDGER_FILE) as db:
        return list(db.execute(sql, params))


class Counted:
    """Counts the patients the engine really simulates (``_simulate_one``, run in this process with serial=True)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.patients: list[str] = []
        self.results: list[PartitionResult] = []
        original = population_run._simulate_one

        def counting(engine: Any, consent: Any, patient_id: str, *args: Any) -> dict[str, Any] | None:
            self.patients.append(patient_id)
            return original(engine, consent, patient_id, *args)

        monkeypatch.setattr(population_run, "_simulate_one", counting)

    def run(self, source: Path, out: Path, **kwargs: Any) -> PopulationReport:
        self.patients.clear()
        self.results.clear()
        return run_population(source, out, serial=True, on_partition=self.results.append, **kwargs)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PopulationReport]:
    """A full run of 30 generated patients: (NDJSON folder, output folder, report)."""
    root = tmp_path_factory.mktemp("incremental")
    source = root / "ndjson"
    write_cohort_ndjson(source, N_PATIENTS, seed=41)
    out = root / "out"
    report = run_population(source, out, serial=True, draws=DRAWS, as_of=AS_OF, buckets=4,
                            recorded=datetime(2026, 7, 1, 8, 0, tzinfo=UTC))
    assert report.failed == 0 and sum(report.patients.values()) == N_PATIENTS
    return source, out, report


def changed_copy(source: Path, target: Path, out: Path, run_id: str) -> tuple[set[str], set[str]]:
    """``source`` copied to ``target`` with 10 patients' first LDL (else first quantity) value raised and two
    planned patients deleted; returns (changed, deleted)."""
    shutil.copytree(source, target)
    files = read_folder(target)
    observations = [o for name, items in files.items() if name.startswith("Observation") for o in items]
    quantities: dict[str, dict[str, Any]] = {}
    for observation in sorted(observations, key=lambda o: LDL not in json.dumps(o.get("code"))):
        if isinstance(observation.get("valueQuantity", {}).get("value"), int | float):
            quantities.setdefault(str(owner(observation)), observation)
    planned = sorted(p for p, r in summary_rows(out, run_id).items() if r["status"] == "planned")
    deleted = set(planned[:2])
    changed = set(sorted(p for p in quantities if p not in deleted)[:10])
    assert len(changed) == 10
    for patient_id in changed:
        quantities[patient_id]["valueQuantity"]["value"] = round(quantities[patient_id]["valueQuantity"]["value"] * 1.2
                                                                 + 7, 2)
    write_folder(target, {name: [r for r in items if owner(r) not in deleted] for name, items in files.items()})
    return changed, deleted


# ------------------------------------------------------------------------------------------------ tests


def test_incremental_run_simulates_only_the_changed_carries_the_rest_and_retires_the_deleted(
        first: tuple[Path, Path, PopulationReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, original_out, full = first
    out = tmp_path / "out"
    shutil.copytree(original_out, out)
    changed, deleted = changed_copy(source, tmp_path / "changed", out, full.run_id)
    counted = Counted(monkeypatch)

    report = counted.run(tmp_path / "changed", out, incremental_from=full.run_id)

    # what the engine simulated: exactly the changed patients, once each
    assert sorted(counted.patients) == sorted(changed)
    assert sum(r.patients - r.carried for r in counted.results) == 10
    assert sum(r.carried for r in counted.results) == N_PATIENTS - 12
    assert (report.simulated_now, report.carried_now, report.failed) == (10, N_PATIENTS - 12, 0)
    assert report.lineage == {"simulated": 10, "carried_over": N_PATIENTS - 12, "retired": 2}
    assert report.patients["retired"] == 2

    # the ledger: lineage, counts, per-patient origin and the retired patients
    assert ledger(out, "SELECT incremental_from, simulated, carried_over, retired FROM runs WHERE run_id = ?",
                  report.run_id) == [(full.run_id, 10, N_PATIENTS - 12, 2)]
    rows = {pid: (status, origin) for pid, status, origin in ledger(
        out, "SELECT patient_id, status, carried_from FROM patients WHERE run_id = ?", report.run_id)}
    assert {p for p, (status, _) in rows.items() if status == "retired"} == deleted
    assert {p for p, (status, origin) in rows.items() if origin is None} == changed
    assert {p for p, (status, origin) in rows.items() if origin == full.run_id and status != "retired"} == (
        set(summary_rows(out, full.run_id)) - changed - deleted)

    # the outputs are complete: every remaining patient has a row; carried rows and bundles are the earlier ones
    before, after = summary_rows(out, full.run_id), summary_rows(out, report.run_id)
    assert set(after) == set(before) - deleted
    carried = set(after) - changed
    assert all(after[p] == before[p] for p in carried)
    assert all(after[p]["input_hash"] != before[p]["input_hash"] for p in changed)
    old_bundles, new_bundles = bundle_lines(out, full.run_id), bundle_lines(out, report.run_id)
    assert {p for p in new_bundles if p in carried} == {p for p in old_bundles if p in carried}
    assert all(new_bundles[p] == old_bundles[p] for p in new_bundles if p in carried)  # byte for byte
    assert {p for p in new_bundles if p in changed} == {p for p, r in after.items() if p in changed
                                                        and r["status"] == "planned"}

    # the retired patients' earlier results, by the identifiers their bundles gave them
    retired = [json.loads(line) for line in (out / "runs" / report.run_id / "retired.ndjson").read_text().splitlines()]
    assert {r["patient_id"] for r in retired} == deleted
    for item in retired:
        bundle = json.loads(old_bundles[item["patient_id"]])
        expected = sorted(f"{e['resource']['resourceType']}|{e['resource']['identifier'][0]['system']}|"
                          f"{e['resource']['identifier'][0]['value']}" for e in bundle["entry"]
                          if e["resource"]["resourceType"] in ("RiskAssessment", "Goal", "CarePlan"))
        assert expected and sorted(f"{r['resourceType']}|{r['identifier']}" for r in item["results"]) == expected
        assert item["results_run"] == full.run_id and item["status"] == "planned"


def test_a_chained_incremental_run_simulates_a_new_patient_and_keeps_the_origin_of_carried_results(
        first: tuple[Path, Path, PopulationReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, original_out, full = first
    out = tmp_path / "out"
    shutil.copytree(original_out, out)
    changed, deleted = changed_copy(source, tmp_path / "changed", out, full.run_id)
    second = run_population(tmp_path / "changed", out, serial=True, incremental_from=full.run_id)
    # a new patient: one patient's resources under new ids
    files = read_folder(tmp_path / "changed")
    template = sorted(changed)[0]
    newcomer = f"new-{template}"
    for items in files.values():
        items.extend(json.loads(json.dumps(r).replace(template, newcomer)) for r in list(items) if owner(r) == template)
    write_folder(tmp_path / "changed", files)
    counted = Counted(monkeypatch)

    third = counted.run(tmp_path / "changed", out, incremental_from=second.run_id)

    assert counted.patients == [newcomer]
    assert third.lineage == {"simulated": 1, "carried_over": N_PATIENTS - 2, "retired": 0}
    origins = dict(ledger(out, "SELECT patient_id, carried_from FROM patients WHERE run_id = ?", third.run_id))
    assert origins[newcomer] is None
    assert {p for p, o in origins.items() if o == second.run_id} == changed
    untouched = set(summary_rows(out, full.run_id)) - changed - deleted
    assert {p for p, o in origins.items() if o == full.run_id} == untouched
    assert len(summary_rows(out, third.run_id)) == N_PATIENTS - 1

    # resumed after losing one partition's files: that partition is carried again, nothing is simulated
    run_dir = out / "runs" / third.run_id
    lost = next(p for p in sorted((run_dir / "summaries").glob("*.parquet"))
                if newcomer not in pq.read_table(p)["patient_id"].to_pylist())
    lost.unlink()
    counted.patients.clear()
    resumed = run_population(None, out, resume=third.run_id, serial=True)
    assert counted.patients == [] and resumed.done_now == 1 and resumed.carried_now > 0
    assert resumed.lineage == third.lineage


def test_a_new_reference_date_or_an_unknown_earlier_run(first: tuple[Path, Path, PopulationReport], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    source, original_out, full = first
    out = tmp_path / "out"
    shutil.copytree(original_out, out)
    with pytest.raises(PopulationRunError, match="no run"):
        run_population(source, out, serial=True, incremental_from="20000101T000000Z-000000")
    # the same records with another reference date are other inputs: everyone is simulated again
    counted = Counted(monkeypatch)
    report = counted.run(source, out, incremental_from=full.run_id, as_of=date(2026, 12, 31))
    assert len(counted.patients) == N_PATIENTS and report.lineage["carried_over"] == 0
    # the CLI: an unchanged folder carries everyone over; the summary line says so
    code = main(["population", "run", str(source), "--out", str(out), "--serial", "--incremental-from",
                 full.run_id])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"incremental from {full.run_id}: 0 simulated, {N_PATIENTS} carried over, 0 retired" in printed


def test_staging_on_an_earlier_stage_replaces_and_drops_whole_patients(first: tuple[Path, Path, PopulationReport],
                                                                        tmp_path: Path) -> None:
    from fhirtwin.population.stage import iter_patient_records, list_partitions, read_shared, stage_ndjson

    source, _, _ = first
    base = tmp_path / "base"
    stage_ndjson(source, base, buckets=3)
    files = read_folder(source)
    patients = sorted(r["id"] for name, items in files.items() if name.startswith("Patient") for r in items)
    replaced, dropped = patients[0], patients[1]
    medication = next(r for items in files.values() for r in items if r["resourceType"] == "Medication")
    update = tmp_path / "update"
    update.mkdir()
    record = [r for items in files.values() for r in items if owner(r) == replaced]
    kept = [r for r in record if r["resourceType"] != "Observation"][:1] + [
        r for r in record if r["resourceType"] == "Observation"][:2]
    write_folder(update, {"Patient.ndjson": [r for r in kept if r["resourceType"] == "Patient"],
                          "Observation.ndjson": [r for r in kept if r["resourceType"] == "Observation"],
                          "Medication.ndjson": [{**medication, "status": "inactive"}]})

    stage_ndjson(update, tmp_path / "merged", base=base, drop_patients={dropped})

    def records(folder: Path) -> dict[str, list[dict[str, Any]]]:
        shared = read_shared(folder)
        return {pid: r for part in list_partitions(folder) for pid, r in iter_patient_records(part, shared=shared)}

    before, after = records(base), records(tmp_path / "merged")
    assert set(after) == set(before) - {dropped}
    assert all(after[p] == before[p] for p in after if p != replaced and not any(
        r["resourceType"] == "Medication" and r["id"] == medication["id"] for r in before[p]))
    assert [r["id"] for r in after[replaced]] == [r["id"] for r in kept]
    merged_medication = read_shared(tmp_path / "merged").get(f"Medication/{medication['id']}")
    assert merged_medication is not None and merged_medication["status"] == "inactive"
    with pytest.raises(ValueError, match="buckets"):
        stage_ndjson(update, tmp_path / "other", base=base, buckets=5)
