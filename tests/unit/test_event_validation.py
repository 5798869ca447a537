"""Event-level validation: metric definitions on hand-computed examples, the generator against its own
truth, subgroup flags on a deliberately miscalibrated group, and ``fhirtwin validate cohort`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fhirtwin.validation import calibration, events, metrics


def test_auc_matches_hand_count() -> None:
    # cases 0.35 and 0.8; non-cases 0.1 and 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4; lost 0.35<0.4 -> 3/4
    assert metrics.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # a tie between a case and a non-case counts one half: (1 + 0.5) / 2
    assert metrics.auc(np.array([0.2, 0.5, 0.5]), np.array([0, 0, 1])) == pytest.approx(0.75)
    assert math.isnan(metrics.auc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_observed_expected_and_interval() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0, 1, 0, 1])
    assert metrics.observed_expected(p, y) == pytest.approx(2 / 1.0)
    lo, hi = metrics.oe_interval(2.0, 1.0)
    assert lo < 2.0 < hi
    assert lo * hi == pytest.approx(4.0)  # symmetric on the log scale


def test_deciles_split_sorted_predictions() -> None:
    p = np.linspace(0.01, 0.5, 100)
    y = (np.arange(100) % 2).astype(float)
    rows = metrics.deciles(p, y)
    assert [r.n for r in rows] == [10] * 10
    assert all(a.mean_predicted < b.mean_predicted for a, b in zip(rows, rows[1:], strict=False))
    assert rows[0].observed == pytest.approx(0.5)


def _calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-2.0, 1.0, n)))
    return p, (rng.random(n) < p).astype(float)


def test_slope_one_when_calibrated_and_moves_when_misscaled() -> None:
    p, y = _calibrated_sample(40000, 1)
    slope, intercept = metrics.calibration_slope_intercept(p, y)
    assert slope == pytest.approx(1.0, abs=0.05)
    assert intercept == pytest.approx(0.0, abs=0.05)
    # too extreme (logit doubled) -> slope ~ 1/2; too flat (logit halved) -> slope ~ 2
    extreme = 1 / (1 + np.exp(-2 * metrics.logit(p)))
    flat = 1 / (1 + np.exp(-0.5 * metrics.logit(p)))
    assert metrics.calibration_slope_intercept(extreme, y)[0] == pytest.approx(0.5, abs=0.05)
    assert metrics.calibration_slope_intercept(flat, y)[0] == pytest.approx(2.0, abs=0.15)
    # doubling every risk keeps the ranking (same AUC) but halves O/E and raises the ICI
    doubled = np.clip(2 * p, 0, 0.999)
    assert metrics.auc(doubled, y) == pytest.approx(metrics.auc(p, y), abs=1e-3)
    assert metrics.observed_expected(doubled, y) < 0.6
    assert metrics.ici(p, y) < 0.01 < metrics.ici(doubled, y)


def test_generator_events_agree_with_truth_risks() -> None:
    cohort = events.generate(6000, seed=11)
    assert cohort.n == 6000
    for outcome in events.OUTCOMES:
        mask = calibration.eligible(outcome, cohort.attributes)
        for j in range(len(events.HORIZONS)):
            truth = cohort.truth[outcome][mask, j]
            observed = cohort.observed[outcome][mask, j]
            expected = truth.sum()
            # observed count within 4 Poisson-binomial SDs of the truth's expectation
            sd = math.sqrt(float((truth * (1 - truth)).sum()))
            assert abs(observed.sum() - expected) < 4 * sd + 1, (outcome, j)
            assert metrics.auc(truth, observed) > 0.65
        # 10-year risk at least the 5-year risk for every patient
        assert np.all(cohort.truth[outcome][:, 1] >= cohort.truth[outcome][:, 0] - 1e-12)
    # the CVD truth at 10 years is PREVENT for patients whose eGFR follows the expected course
    assert 0.05 < cohort.truth["total_cvd"][:, 1].mean() < 0.25


def test_generator_is_reproducible_and_records_histories() -> None:
    a, b = events.generate(50, seed=3), events.generate(50, seed=3)
    assert np.array_equal(a.observed["total_cvd"], b.observed["total_cvd"])
    patient = a.inputs[0]
    history = patient.history("egfr_ml_min_1_73m2")
    assert history.shape[0] >= 3 and history[-1, 0] == 0.0
    assert patient.egfr_ml_min_1_73m2 == history[-1, 1]
    assert {p.race for p in a.inputs} <= set(events.RACES)


def _rows_for(shift: float) -> list[calibration.Row]:
    rng = np.random.default_rng(5)
    n = 8000
    attributes = {
        "sex": np.where(rng.random(n) < 0.5, "female", "male"),
        "race": rng.choice(np.array(["white", "black"]), n),
        "age": rng.uniform(30, 79, n),
        "egfr_recorded": rng.uniform(20, 100, n),
        "diabetes": rng.random(n) < 0.3,
    }
    truth = {}
    observed = {}
    predicted = {}
    for o in events.OUTCOMES:
        z = rng.normal(0.0, 1.0, n)  # spread-out risks, so the slope is estimated precisely
        p = np.column_stack([1 / (1 + np.exp(2.0 - z)), 1 / (1 + np.exp(1.2 - z))])
        truth[o] = p
        observed[o] = (rng.random(p.shape) < p).astype(float)
        # the engine under-predicts black patients by a factor ``shift``
        predicted[o] = np.where((attributes["race"] == "black")[:, None], p / shift, p)
    return calibration.score(predicted, observed, truth, attributes)


def test_flags_appear_for_a_miscalibrated_subgroup_only() -> None:
    rows = _rows_for(shift=2.0)
    flagged = {(r.dimension, r.level) for r in rows if r.flag}
    assert ("race", "black") in flagged
    assert ("race", "white") not in flagged
    black = [r for r in rows if r.level == "black" and r.outcome == "ascvd" and r.horizon_years == 10][0]
    assert black.engine.oe == pytest.approx(2.0, rel=0.15)
    assert "O/E" in black.flag
    assert black.truth.oe == pytest.approx(1.0, abs=0.12)
    assert not black.truth_also_outside  # the engine, not sampling noise
    assert not any(r.flag for r in _rows_for(shift=1.0) if r.level == "black")


def test_cli_writes_report_with_small_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fhirtwin.cli import main

    out = tmp_path / "validation"
    code = main(["validate", "cohort", "--n", "120", "--draws", "8", "--seed", "4", "--out", str(out), "--json"])
    assert code == 0
    data = json.loads((out / "calibration.json").read_text())
    assert data["n_virtual"] == 120
    keys = {(r["outcome"], r["horizon_years"]) for r in data["overall"]}
    assert keys == {(o, h) for o in events.OUTCOMES for h in events.HORIZONS}
    assert {r["subset"] for r in data["biomarker_coverage"]["rows"]} == {"stable", "after treatment change"}
    text = (out / "calibration.md").read_text()
    assert "## Flagged subgroups" in text and "## Biomarker interval coverage per subset" in text
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(json.loads(last)["overall"]) == len(keys)
