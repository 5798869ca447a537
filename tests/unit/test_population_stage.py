"""NDJSON -> Parquet staging: exact round trip, whole patients per partition, shared Medications, bounded buffers."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fhirtwin.cli import main
from fhirtwin.fhir.client import patient_reference_id
from fhirtwin.fhir.errors import NdjsonFormatError
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.stage import (
    SCHEMA,
    StageReport,
    bucket_of,
    iter_patient_records,
    list_partitions,
    read_shared,
    stage_ndjson,
)

N_PATIENTS = 60
BUCKETS = 4
MAX_BUFFER = 64 << 10


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ndjson")
    write_cohort_ndjson(folder, N_PATIENTS, seed=11)
    return folder


def ndjson_lines(folder: Path) -> list[str]:
    return [line for path in sorted(folder.glob("*.ndjson")) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def staged(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StageReport]:
    out = tmp_path_factory.mktemp("stage") / "staged"
    report = stage_ndjson(source, out, buckets=BUCKETS, max_buffer_bytes=MAX_BUFFER)
    return out, report


def test_every_resource_round_trips_and_patients_are_whole(source: Path, staged: tuple[Path, StageReport]) -> None:
    out, _ = staged
    originals = [json.loads(line) for line in ndjson_lines(source)]
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for resource in originals:
        owner = patient_reference_id(resource)
        if owner is not None:
            by_patient[owner].append(resource)
    shared = read_shared(out)
    seen: dict[str, Path] = {}
    for partition in list_partitions(out):
        for patient_id, record in iter_patient_records(partition, shared=shared):
            assert patient_id not in seen, "a patient is in two partitions"
            seen[patient_id] = partition
            assert partition.name == f"bucket-{bucket_of(patient_id, BUCKETS):05d}.parquet"
            assert record[0] == {**record[0], "resourceType": "Patient", "id": patient_id}
            own = [r for r in record if patient_reference_id(r) == patient_id]
            expected = sorted(by_patient[patient_id], key=lambda r: r["resourceType"] != "Patient")
            assert own == expected  # JSON-equal; the Patient first, then the source's order
    assert set(seen) == set(by_patient) and len(seen) == N_PATIENTS


def test_raw_json_column_is_the_source_line(source: Path, staged: tuple[Path, StageReport]) -> None:
    out, _ = staged
    staged_lines: list[str] = []
    for path in [*list_partitions(out), out / "shared.parquet"]:
        table = pq.read_table(path)
        assert table.schema.names == SCHEMA.names
        staged_lines += table["resource_json"].to_pylist()
    assert sorted(staged_lines) == sorted(ndjson_lines(source))


def test_medications_referenced_by_requests_are_in_the_record(staged: tuple[Path, StageReport]) -> None:
    out, _ = staged
    shared = read_shared(out)
    assert len(shared) > 0
    checked = 0
    for partition in list_partitions(out):
        for _, record in iter_patient_records(partition):  # shared table found beside the partition
            included = {f"Medication/{r['id']}": r for r in record if r["resourceType"] == "Medication"}
            for request in (r for r in record if r["resourceType"] == "MedicationRequest"):
                reference = request.get("medicationReference", {}).get("reference", "")
                if reference.startswith("Medication/"):
                    assert included[reference] == shared.get(reference)
                    assert shared.get(f"http://example.org/fhir/{reference}/_history/1") == included[reference]
                    checked += 1
            assert len(included) == len(set(included))
    assert checked > 0
    assert shared.get("#med") is None and shared.get("Medication/none") is None


def test_typed_columns_match_the_resource(staged: tuple[Path, StageReport]) -> None:
    out, _ = staged
    table = pq.read_table(list_partitions(out)[0])
    rows = table.to_pylist()
    quantities = 0
    for row in rows:
        resource = json.loads(row["resource_json"])
        assert (row["resource_type"], row["resource_id"]) == (resource["resourceType"], resource["id"])
        assert row["status"] == resource.get("status")
        if row["resource_type"] == "Observation":
            coding = resource["code"]["coding"][0]
            assert (row["code_system"], row["code"]) == (coding["system"], coding["code"])
            when = resource.get("effectiveDateTime") or resource.get("effectivePeriod", {}).get("start")
            assert row["effective"] == (when or resource.get("issued"))
            quantity = resource.get("valueQuantity")
            if quantity and "value" in quantity:
                quantities += 1
                assert row["value"] == pytest.approx(quantity["value"])
                assert row["unit"] == quantity.get("code", quantity.get("unit"))
            else:
                assert row["value"] is None
        if row["resource_type"] == "MedicationRequest":
            assert row["effective"] == resource["authoredOn"]
    assert quantities > 100


def test_buffers_stay_under_the_cap(staged: tuple[Path, StageReport]) -> None:
    _, report = staged
    total = sum(report.resources.values())
    assert report.peak_buffered_bytes <= MAX_BUFFER
    assert report.peak_buffered_bytes > MAX_BUFFER // 2
    # the cap forced many row groups (the source is several MB), each written while staging continued
    assert report.row_groups > 10 * (report.partitions + 1)
    assert report.patients == N_PATIENTS and total > 20 * N_PATIENTS
    row_groups = sum(pq.ParquetFile(p).num_row_groups for p in list_partitions(staged[0]))
    assert row_groups + pq.ParquetFile(staged[0] / "shared.parquet").num_row_groups == report.row_groups


def test_gzip_input_default_buckets_and_patientless_resources(source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("Patient.ndjson", "MedicationRequest.ndjson"):
        (folder / f"{name}.gz").write_bytes(gzip.compress((source / name).read_bytes()))
    orphan = {"resourceType": "Observation", "id": "no-subject", "status": "final", "code": {"text": "x"}}
    (folder / "Observation.ndjson").write_text(json.dumps(orphan) + "\n\n", encoding="utf-8")
    report = stage_ndjson(folder, tmp_path / "out")
    assert report.buckets == 1 and report.partitions == 1  # 60 patients: one partition of up to 1000
    assert report.shared_resources == 1
    assert read_shared(tmp_path / "out").get("Observation/no-subject") == orphan
    records = dict(iter_patient_records(list_partitions(tmp_path / "out")[0]))
    assert len(records) == N_PATIENTS
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["buckets"] == 1 and manifest["resources"]["Observation"] == 1


def test_bad_line_is_a_typed_error_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n{"resourceType":\n')
    with pytest.raises(NdjsonFormatError) as info:
        stage_ndjson(folder, tmp_path / "out")
    assert (info.value.file, info.value.line) == ("Patient.ndjson", 2)
    assert not (tmp_path / "out").exists()
    (folder / "Patient.ndjson").write_text('{"resourceType":"Observation","id":"a"}\n')
    with pytest.raises(NdjsonFormatError):
        stage_ndjson(folder, tmp_path / "out")
    (folder / "Patient.ndjson").write_text('{"resourceType":"Patient"}\n')
    with pytest.raises(NdjsonFormatError, match="no id"):
        stage_ndjson(folder, tmp_path / "out")
    (folder / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n')
    stage_ndjson(folder, tmp_path / "out")  # the leftover of the failed runs does not block a new run
    with pytest.raises(FileExistsError):
        stage_ndjson(folder, tmp_path / "out")


def test_cli_stage(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "st"
    assert main(["population", "stage", str(source), "--out", str(out), "--buckets", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["patients"] == N_PATIENTS and printed["buckets"] == 3
    assert len(list_partitions(out)) == printed["partitions"] <= 3
    assert main(["population", "stage", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("fhirtwin: ")
