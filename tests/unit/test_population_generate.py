"""Streaming NDJSON scale fixtures: the same resources as the in-memory generator, one patient in memory."""

from __future__ import annotations

import json
import tracemalloc
import weakref
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.cli import main
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.population import generate as generate_module
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.sandbox.cohort import codes, generate_cohort, generate_patient

SEED = 7


def lines_by_type(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for path in sorted(folder.glob("*.ndjson")):
        if path.name[0].isupper():
            out[path.name.split(".")[0]] += path.read_text(encoding="utf-8").splitlines()
    return dict(out)


def test_generate_patient_is_the_cohort_entry() -> None:
    cohort = generate_cohort(6, seed=SEED)
    for k in (1, 4, 6):
        bundle, truth = generate_patient(k, seed=SEED)
        assert bundle == cohort.bundles[k - 1]
        assert truth == cohort.truth[f"ftp-{k:04d}"]
    with pytest.raises(ValueError):
        generate_patient(0)


def test_streamed_resources_equal_generate_cohort(tmp_path: Path) -> None:
    n = 25
    report = write_cohort_ndjson(tmp_path, n, seed=SEED, truth=True)
    cohort = generate_cohort(n, seed=SEED)
    expected: dict[str, list[dict]] = defaultdict(list)
    for bundle in cohort.bundles:
        for entry in bundle["entry"]:
            expected[entry["resource"]["resourceType"]].append(entry["resource"])
    written = {t: [json.loads(line) for line in lines] for t, lines in lines_by_type(tmp_path).items()}
    assert written == dict(expected)
    assert report.patients == n
    assert report.resources == {t: len(v) for t, v in sorted(expected.items())}
    assert report.files == sorted(f"{t}.ndjson" for t in expected)
    truth = [json.loads(line) for line in (tmp_path / "truth.ndjson").read_text().splitlines()]
    assert {t["patient_id"]: t for t in truth} == json.loads(json.dumps(cohort.truth))
    # the Bulk Data reader of the project reads the folder
    source = NdjsonSource(tmp_path)
    assert [p["id"] for p in source.iter_patients()] == [f"ftp-{k:04d}" for k in range(1, n + 1)]


def test_workers_write_blocks_with_the_same_content(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write_cohort_ndjson(one, 9, seed=SEED)
    report = write_cohort_ndjson(two, 9, seed=SEED, workers=2)
    assert "Patient.1.ndjson" in report.files and "Patient.2.ndjson" in report.files
    assert all(name.count(".") == 2 for name in report.files)
    assert lines_by_type(two) == lines_by_type(one)  # blocks are contiguous and concatenated in part order


def test_refuses_a_folder_with_ndjson(tmp_path: Path) -> None:
    (tmp_path / "Patient.ndjson").write_text("")
    with pytest.raises(FileExistsError):
        write_cohort_ndjson(tmp_path, 2)


def _peak_traced_bytes(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_patient_is_alive_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When patient k is generated, at most patient k - 1's bundle is still referenced (by the loop)."""

    class Tracked(dict[str, Any]):  # a dict that can be weakly referenced
        pass

    alive: list[weakref.ref[Tracked]] = []
    most_alive = 0

    def tracked_patient(k: int, seed: int, reference_date: str | date) -> tuple[dict, dict]:
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        bundle, truth = generate_patient(k, seed, reference_date)
        wrapped = Tracked(bundle)
        alive.append(weakref.ref(wrapped))
        return wrapped, truth

    monkeypatch.setattr(generate_module, "generate_patient", tracked_patient)
    report = write_cohort_ndjson(tmp_path, 15, seed=SEED)
    assert report.patients == 15 and len(alive) == 15
    assert most_alive <= 1


def test_streaming_peak_is_far_below_the_in_memory_cohort(tmp_path: Path) -> None:
    codes()  # the code tables are loaded once per process, outside the measurement
    streaming = _peak_traced_bytes(lambda: write_cohort_ndjson(tmp_path, 60, seed=SEED))
    in_memory = _peak_traced_bytes(lambda: generate_cohort(60, seed=SEED))
    assert in_memory > 2.5 * streaming


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nd"
    assert main(["population", "generate", "--patients", "3", "--seed", str(SEED), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["patients"] == 3 and printed["resources"]["Patient"] == 3
    assert len((out / "Patient.ndjson").read_text().splitlines()) == 3
    assert main(["population", "generate", "--patients", "3", "--out", str(out)]) == 2  # folder not empty
    assert "already holds NDJSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["population", "generate", "--patients", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
