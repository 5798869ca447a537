"""Population report: the aggregates equal a direct computation over the run's summaries, the page has every
outcome's section and no patient identifier, and the CLI writes both files."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization

from fhirtwin.cli import main
from fhirtwin.population.report import (
    AGGREGATE_FILE,
    BIN_WIDTH,
    QUANTILES,
    REPORT_FILE,
    PopulationReportError,
    age_band,
    aggregate_run,
    ckd_stage,
    render_html,
    write_population_report,
)
from fhirtwin.population.run import SUMMARY_OUTCOMES, run_population
from fhirtwin.writeback.jws import ENV_KEY_FILE, generate_key

N_PATIENTS = 30


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 30-patient serial run (cohort written by ``fhirtwin population generate``)."""
    base = tmp_path_factory.mktemp("population-report")
    key = generate_key("ES256")
    pem = base / "signing.pem"
    pem.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    assert main(["population", "generate", "--patients", str(N_PATIENTS), "--seed", "23",
                 "--out", str(base / "ndjson")]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_KEY_FILE, str(pem))
        report = run_population(base / "ndjson", base / "out", serial=True, draws=100, as_of=date(2026, 6, 30),
                                buckets=3, recorded=datetime(2026, 7, 1, 8, 30, tzinfo=UTC))
    assert report.failed == 0
    yield base / "out" / "runs" / report.run_id


def _summaries(run_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "summaries").glob("*.parquet"))])


def _direct_age_band(row: dict[str, Any]) -> str:
    age = row["age_years"]
    if age is None:
        return "unknown"
    for low, high, label in ((30, 45, "30-44"), (45, 60, "45-59"), (60, 70, "60-69"), (70, 80, "70-79")):
        if low <= age < high:
            return label
    return "80+" if age >= 80 else "under 30"


def _direct_ckd_stage(row: dict[str, Any]) -> str:
    """KDIGO 2012 GFR categories, G1 and G2 together."""
    egfr = row["egfr"]
    if egfr is None:
        return "unknown"
    for low, high, label in ((60, math.inf, "G1-2"), (45, 60, "G3a"), (30, 45, "G3b"), (15, 30, "G4")):
        if low <= egfr < high:
            return label
    return "G5"


def test_aggregates_equal_a_direct_computation(run_dir: Path) -> None:
    rows = _summaries(run_dir).to_pylist()
    assert len(rows) == N_PATIENTS
    files = write_population_report(run_dir)
    table = pq.read_table(run_dir / AGGREGATE_FILE).to_pylist()
    assert files.patients == N_PATIENTS
    aggregates = {(r["outcome"], r["subgroup"], r["subgroup_value"]): r for r in table}
    subgroup_of = {"all": lambda r: "all", "scope": lambda r: r["scope"] or "unknown",
                   "risk category": lambda r: r["risk_category_code"] or "none",
                   "medication flags": lambda r: "any" if r["medication_flags"] else "none",
                   "sex": lambda r: r["sex"] or "unknown", "age band": _direct_age_band,
                   "diabetes": lambda r: "unknown" if r["diabetes"] is None else ("yes" if r["diabetes"] else "no"),
                   "CKD stage": _direct_ckd_stage, "race": lambda r: r["race"] or "not recorded"}
    checked = 0
    for outcome in SUMMARY_OUTCOMES:
        column = f"{outcome}_10y_median"
        for subgroup, key in subgroup_of.items():
            for value in {key(r) for r in rows if r[column] is not None}:
                chosen = [r for r in rows if r[column] is not None and key(r) == value]
                values = np.array([r[column] for r in chosen])
                got = aggregates[(outcome, subgroup, value)]
                assert got["n"] == len(chosen)
                assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
                for q in QUANTILES:
                    edge = got[f"p{round(100 * q):02d}"]
                    # the defined quantile: the first 0.1 % bin edge with at least q·n values below it
                    assert np.sum(values < edge) >= q * len(values)
                    assert np.sum(values < edge - BIN_WIDTH) < q * len(values)
                categories = Counter(r["risk_category_code"] for r in chosen if r["risk_category_code"])
                for code, count in categories.items():
                    assert got[f"share_{code}"] == pytest.approx(count / len(chosen))
                checked += 1
    assert checked >= len(SUMMARY_OUTCOMES) * len(subgroup_of)
    # the cohort spreads over the new subgroups (else grouping by them would test nothing)
    planned_rows = [r for r in rows if r["total_cvd_10y_median"] is not None]
    for subgroup in ("sex", "age band", "diabetes", "CKD stage"):
        assert len({subgroup_of[subgroup](r) for r in planned_rows}) >= 2, subgroup
    assert {k[1] for k in aggregates} == set(subgroup_of)
    planned = [r for r in rows if r["status"] == "planned"]
    assert aggregates[("total_cvd", "all", "all")]["n"] == len(planned) > 0


def test_status_and_proposal_counts(run_dir: Path) -> None:
    rows = _summaries(run_dir).to_pylist()
    agg = aggregate_run(run_dir)
    assert dict(agg.statuses) == dict(Counter(r["status"] for r in rows))
    by_best = Counter(r["best_proposal"] for r in rows if r["status"] == "planned" and r["best_proposal"])
    assert {name: p.patients for name, p in agg.proposals.items()} == dict(by_best)
    for name, proposal in agg.proposals.items():
        arr = [r["best_arr_median"] for r in rows if r["best_proposal"] == name]
        assert proposal.prevented_per_1000 == pytest.approx(1000 * sum(arr) / len(arr))
    starts = sum(1 for name, n in by_best.items() if re.search(r"(^| \+ )Start \w+-intensity statin", name)
                 for _ in range(n))
    assert sum(agg.statin_gap.values()) == starts
    assert agg.ledger["partitions"] == 3 and agg.ledger["partition_states"] == {"done": 3}
    assert agg.ledger["draws"] == 100


def test_page_has_every_outcome_and_no_patient_id(run_dir: Path) -> None:
    page = render_html(aggregate_run(run_dir))
    for outcome in SUMMARY_OUTCOMES:
        assert f"id='outcome-{outcome}'" in page
    for section in ("metrics", "status", "categories", "proposals"):
        assert f"id='{section}'" in page
    assert page.count("<svg") >= len(SUMMARY_OUTCOMES)
    ids = _summaries(run_dir).column("patient_id").to_pylist()
    assert len(ids) == N_PATIENTS
    for patient_id in ids:
        assert patient_id not in page
    assert "<script" not in page


def test_page_escapes_text(run_dir: Path) -> None:
    agg = aggregate_run(run_dir)
    name = next(iter(agg.proposals))
    agg.proposals["<b>bold</b> & co"] = agg.proposals.pop(name)
    page = render_html(agg)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page


def test_cli_writes_the_page(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pages" / "population.html"
    assert main(["population", "report", str(run_dir), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["patients"] == N_PATIENTS and Path(printed["html"]) == out
    text = out.read_text("utf-8")
    assert text.startswith("<!doctype html>") and "id='outcome-total_cvd'" in text
    assert (run_dir / AGGREGATE_FILE).is_file()
    assert main(["population", "report", str(run_dir)]) == 0
    assert (run_dir / REPORT_FILE).is_file()


def test_a_folder_without_summaries_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PopulationReportError):
        aggregate_run(tmp_path)
    assert main(["population", "report", str(tmp_path)]) == 2
    assert "no summaries" in capsys.readouterr().err


def test_quantile_is_the_bin_edge() -> None:
    from fhirtwin.population.report import Distribution

    dist = Distribution()
    dist.add(np.array([0.0105, 0.2, 0.2, 0.9]), ["low"])
    assert dist.n == 4 and dist.mean == pytest.approx((0.0105 + 0.4 + 0.9) / 4)
    assert dist.quantile(0.25) == pytest.approx(0.011)
    assert dist.quantile(0.5) == pytest.approx(0.201)
    assert dist.quantile(1.0) == pytest.approx(0.901)
    assert math.isnan(Distribution().quantile(0.5))


def test_age_bands_and_ckd_stages_at_their_edges() -> None:
    ages = {29.9: "under 30", 30.0: "30-44", 44.9: "30-44", 45.0: "45-59", 59.99: "45-59", 60.0: "60-69",
            69.5: "60-69", 70.0: "70-79", 79.9: "70-79", 80.0: "80+", 97.0: "80+", None: "unknown"}
    assert {age: age_band(age) for age in ages} == ages
    stages = {120.0: "G1-2", 60.0: "G1-2", 59.9: "G3a", 45.0: "G3a", 44.9: "G3b", 30.0: "G3b", 29.9: "G4",
              15.0: "G4", 14.9: "G5", 0.0: "G5", None: "unknown"}
    assert {egfr: ckd_stage(egfr) for egfr in stages} == stages
