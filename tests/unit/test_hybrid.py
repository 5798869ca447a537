"""The hybrid residual against known truth: a generated FHIR cohort whose eGFR and SBP slopes depend on PM2.5
and exercise (effects the mechanistic model lacks), staged with the project's stager, trained and scored on
held-out patients; the fallback with few patients; the deployment switch; the artifact's round trip."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hybrid_generator import EGFR_PM25, SBP_PM25, write_cohort
from sim_fixtures import patient

from fhirtwin.hybrid import ArtifactError, HybridTwin, ResidualArtifact, configured_model
from fhirtwin.hybrid.data import Dataset, Rows, dataset_from_stage, stage_hash
from fhirtwin.hybrid.features import layout
from fhirtwin.hybrid.train import (
    MIN_TRAINING_PATIENTS,
    DirectModel,
    evaluate,
    fit_biomarker,
    fit_residual,
    hybrid_point,
    split_patients,
)
from fhirtwin.hybrid.trees import GBM_SETTINGS, TreeEnsemble
from fhirtwin.population import stage_ndjson
from fhirtwin.sim import available_models
from fhirtwin.sim.components import component_names
from fhirtwin.sim.model import MechanisticTwin, NotFittedError

EGFR, SBP, LDL = "egfr_ml_min_1_73m2", "systolic_bp_mm_hg", "ldl_cholesterol_mg_dl"
N_PATIENTS, HELD_OUT = 360, 0.3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, Dataset]:
    """Generated, staged and turned into rows once; (stage folder, training patients, held-out patients)."""
    root = tmp_path_factory.mktemp("hybrid")
    write_cohort(root / "ndjson", N_PATIENTS, seed=11)
    stage_ndjson(root / "ndjson", root / "staged")
    data = dataset_from_stage(root / "staged", draws=100, seed=0, components=component_names())
    train_ids, test_ids = split_patients(data.patients(), HELD_OUT, seed=11)
    return root / "staged", data.of_patients(train_ids), data.of_patients(test_ids)


@pytest.fixture(scope="module")
def trained(cohort: tuple[Path, Dataset, Dataset]) -> tuple[ResidualArtifact, DirectModel, dict]:
    _, train, test = cohort
    artifact = fit_residual(train, "gbm", seed=0)
    direct = DirectModel.fit(train, seed=0)
    return artifact, direct, evaluate(test, {"hybrid": artifact}, direct)


def test_training_rows_come_from_the_staged_population(cohort) -> None:
    stage, train, test = cohort
    described = train.description
    assert described.n_patients == len(train.patients()) and described.n_skipped == 0
    assert described.stage_sha256 == stage_hash(stage)
    assert described.first_date[:4] == "2014" or described.first_date[:4] == "2015"
    assert described.last_date[:4] == "2021"
    rows = test.rows[EGFR]
    assert set(np.unique(rows.horizon)) == {1.0, 2.0, 3.0}
    assert not set(train.patients()) & set(test.patients())
    assert train.description.n_patients + test.description.n_patients == N_PATIENTS
    # a feature the mechanistic model does not read arrives from the record (every generated patient has it)
    assert not np.isnan(rows.twin[:, layout().names.index("pm25_ug_m3")]).any()


def test_hybrid_beats_mechanistic_and_learned_only_where_the_mechanism_misses_an_effect(trained) -> None:
    _, _, scores = trained
    for biomarker in (EGFR, SBP):
        s = scores[biomarker]
        assert s["hybrid"]["rmse"] < s["mechanistic"]["rmse"], (biomarker, s)
        assert s["hybrid"]["rmse"] < s["learned_only"]["rmse"], (biomarker, s)
        assert s["hybrid"]["shrinkage"] > 0.3


def test_the_residual_recovers_the_direction_of_the_pm25_effects_and_leaves_ldl_alone(cohort, trained) -> None:
    """Raise PM2.5 from 8 to 20 ug/m3 for held-out patients at 3 years: the truth moves eGFR by
    -EGFR_PM25 * 12 * 3 and SBP by +SBP_PM25 * 12 * 3, LDL-C not at all (the mechanistic model moves none)."""
    _, _, test = cohort
    artifact, _, scores = trained
    column = layout().names.index("pm25_ug_m3")

    def shift(biomarker: str) -> float:
        rows = test.rows[biomarker].take(test.rows[biomarker].horizon == 3.0)
        low, high = rows.design(), rows.design()
        low[:, column], high[:, column] = 8.0, 20.0
        residual = artifact.biomarkers[biomarker]
        return float(np.mean(residual.residual(high) - residual.residual(low)))

    egfr_truth, sbp_truth = -EGFR_PM25 * 12 * 3, SBP_PM25 * 12 * 3
    assert egfr_truth * 1.5 < shift(EGFR) < 0.2 * egfr_truth
    assert 0.2 * sbp_truth < shift(SBP) < 1.5 * sbp_truth
    # no effect in the truth: any shift is small against the error of a forecast
    assert abs(shift(LDL)) < 0.2 * scores[LDL]["mechanistic"]["rmse"]


def test_ninety_percent_intervals_cover_about_ninety_percent_of_held_out_values(trained) -> None:
    """Split conformal guarantees >= 90 % on average; with ~80 calibration patients per horizon and ~110
    held-out patients (3 rows each, correlated within a patient) the realised coverage has an sd of about
    0.04, so each biomarker must lie within 0.90 +- 0.10 and their mean within 0.90 +- 0.05."""
    _, _, scores = trained
    coverage = [s["hybrid"]["coverage90"] for s in scores.values()]
    assert all(0.80 <= c <= 1.0 for c in coverage), coverage
    assert abs(float(np.mean(coverage)) - 0.90) <= 0.05, coverage
    # the mechanistic model's own interval over-covers SBP here; the hybrid's is narrower and still calibrated
    sbp = scores[SBP]
    assert sbp["mechanistic"]["coverage90"] > 0.95
    assert sbp["hybrid"]["mean_width"] < 0.8 * sbp["mechanistic"]["mean_width"]


def test_subgroup_coverage_is_reported_and_flags_fire_only_outside_the_target_range(trained) -> None:
    """Coverage per validation subgroup (sex, age band, CKD stage, diabetes): every subgroup of >= 40 held-out
    patients is covered within 0.90 +- 0.12 (about 3 sd for 40 patients with 3 correlated rows each); the
    mechanistic interval's systematic over-coverage of SBP (0.97-0.98 measured) is flagged in the large groups."""
    _, _, scores = trained
    for biomarker, entry in scores.items():
        groups = entry["hybrid"]["subgroups"]
        assert {"sex female", "sex male", "diabetes yes", "diabetes no"} <= set(groups), biomarker
        assert sum(g["rows"] for k, g in groups.items() if k.startswith("sex ")) == entry["rows"]
        large = {k: g["coverage90"] for k, g in groups.items() if g["patients"] >= 40}
        assert large and all(0.78 <= c <= 1.0 for c in large.values()), (biomarker, large)
        assert set(entry["hybrid"]["flags"]) <= {k for k, c in large.items() if not 0.85 <= c <= 0.95}
    assert {"sex female", "sex male", "CKD stage G1-2"} <= set(scores[SBP]["mechanistic"]["flags"])


def test_with_few_patients_the_hybrid_is_the_mechanistic_model(cohort) -> None:
    _, train, test = cohort
    few = train.of_patients(train.patients()[:30])
    artifact = fit_residual(few, "gbm", seed=0)
    for biomarker, residual in artifact.biomarkers.items():
        assert residual.predictor is None and residual.shrinkage == 0.0
        assert residual.n_train_patients < MIN_TRAINING_PATIENTS and "residual off" in residual.reason
        assert residual.interval == {}  # too few calibration patients: the mechanistic model's own interval
        rows = test.rows[biomarker]
        np.testing.assert_array_equal(hybrid_point(residual, rows), rows.mechanistic)
    scores = evaluate(test, {"few": artifact})
    for s in scores.values():
        assert s["few"]["rmse"] == s["mechanistic"]["rmse"]
        assert s["few"]["coverage90"] == s["mechanistic"]["coverage90"]


def test_cross_validated_shrinkage_switches_off_a_residual_that_is_only_noise() -> None:
    """Enough patients, but observed = mechanistic + noise unrelated to the features: the residual must be
    shrunk to (nearly) nothing."""
    rng = np.random.default_rng(5)
    n_patients, width = 200, len(layout().names)
    ids = np.repeat(np.array([f"p{i:03d}" for i in range(n_patients)], dtype=object), 3)
    horizon = np.tile([1.0, 2.0, 3.0], n_patients)
    twin = np.repeat(rng.normal(size=(n_patients, width)), 3, axis=0)
    mechanistic = 70 + rng.normal(0, 10, ids.size)
    rows = Rows(ids, horizon, twin, mechanistic + 1.0, mechanistic,
                np.column_stack([mechanistic - 10, mechanistic + 10]), mechanistic + rng.normal(0, 5, ids.size))
    residual = fit_biomarker(rows, "gbm", calibration_fraction=0.25, seed=0)
    assert residual.shrinkage < 0.3
    assert set(residual.interval) == {1.0, 2.0, 3.0}
    # the 90 % half-width of N(0, 5) noise is 5 x 1.645 = 8.2; from 50 calibration patients per horizon the
    # sample quantile has an sd of about 5 x sqrt(0.9 x 0.1 / 50) / (2 phi(1.645)) = 1.0: allow 2.5 sd
    for half_width in residual.interval.values():
        assert 8.2 - 2.6 < half_width < 8.2 + 2.6


def test_switch_off_gives_exactly_the_mechanistic_forecast(tmp_path: Path, trained, monkeypatch) -> None:
    artifact = trained[0].save(tmp_path / "residual")
    reference = MechanisticTwin().fit(patient()).simulate(horizon_years=5, draws=50, seed=3)
    monkeypatch.setenv("FHIRTWIN_HYBRID_ARTIFACT", str(tmp_path / "residual"))
    on = HybridTwin()
    assert on.active and configured_model().name == "fhirtwin-hybrid"
    on_forecast = on.fit(patient()).simulate(horizon_years=5, draws=50, seed=3)
    variants = [HybridTwin(enabled=False), HybridTwin(artifact, enabled=False)]
    monkeypatch.setenv("FHIRTWIN_HYBRID", "off")
    variants.append(HybridTwin())
    assert isinstance(configured_model(), MechanisticTwin)
    monkeypatch.delenv("FHIRTWIN_HYBRID")
    monkeypatch.delenv("FHIRTWIN_HYBRID_ARTIFACT")
    variants.append(HybridTwin())  # nothing configured: off by default
    for model in variants:
        assert not model.active
        forecast = model.fit(patient()).simulate(horizon_years=5, draws=50, seed=3)
        assert forecast.model == "fhirtwin-hybrid" and forecast.method["learned_residual"]["state"] == "off"
        for v in reference.trajectories:
            np.testing.assert_array_equal(forecast.trajectories[v], reference.trajectories[v])
        for o in reference.cif:
            np.testing.assert_array_equal(forecast.cif[o], reference.cif[o])
    # on: every draw is shifted by the same residual path, hazards untouched
    for v in reference.trajectories:
        shift = on_forecast.trajectories[v] - reference.trajectories[v]
        np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-9)
        assert shift[0, 0] == 0.0
    for o in reference.cif:
        np.testing.assert_array_equal(on_forecast.cif[o], reference.cif[o])
    assert on_forecast.method["learned_residual"]["artifact_version"] == artifact.version


def test_the_engine_runs_the_configured_residual_and_only_that(tmp_path: Path, trained, monkeypatch) -> None:
    from writeback_fixtures import versioned_resources

    from fhirtwin.adapters import build_twin
    from fhirtwin.engine import Engine

    artifact = trained[0].save(tmp_path / "residual")
    patient_id, resources = versioned_resources()
    state = build_twin(patient_id, resources, date(2026, 6, 30))
    monkeypatch.setenv("FHIRTWIN_HYBRID_ARTIFACT", str(tmp_path / "residual"))
    engine = Engine(draws=40)
    assert engine.learned_residual is not None and engine.learned_residual.version == artifact.version
    forecast = engine.simulate(state).plan.baseline
    assert forecast.model == "fhirtwin-hybrid"
    assert forecast.method["learned_residual"]["artifact_version"] == artifact.version
    monkeypatch.setenv("FHIRTWIN_HYBRID", "off")
    off = Engine(draws=40)
    assert off.learned_residual is None
    assert off.simulate(state).plan.baseline.model == "fhirtwin-mechanistic"
    monkeypatch.delenv("FHIRTWIN_HYBRID")
    monkeypatch.setenv("FHIRTWIN_HYBRID_ARTIFACT", str(tmp_path / "absent"))
    with pytest.raises(ArtifactError):
        Engine()  # a deployment that names an artifact it cannot read fails at once, not per patient


def test_the_registered_model_honours_the_contract() -> None:
    assert "fhirtwin-hybrid" in available_models()
    model = HybridTwin(enabled=False)
    with pytest.raises(NotFittedError):
        model.simulate(horizon_years=1, draws=5, seed=0)
    before = set(vars(model))
    assert model.fit(patient()) is model
    learned = set(vars(model)) - before
    assert learned and all(name.endswith("_") for name in learned)


def test_artifact_round_trips_with_its_version_description_and_metrics(tmp_path: Path, cohort, trained) -> None:
    _, _, test = cohort
    artifact = trained[0]
    metrics = {"held_out": trained[2]}
    saved = ResidualArtifact(artifact.learner, artifact.feature_names, artifact.horizons, artifact.biomarkers,
                             artifact.training_data, metrics, settings=artifact.settings).save(tmp_path / "a")
    loaded = ResidualArtifact.load(tmp_path / "a")
    assert loaded.version == saved.version and loaded.version.startswith("0.1.0+")
    assert loaded.training_data["stage_sha256"] == artifact.training_data["stage_sha256"]
    assert loaded.metrics["held_out"][EGFR]["hybrid"]["rmse"] == trained[2][EGFR]["hybrid"]["rmse"]
    for b, residual in artifact.biomarkers.items():
        rows = test.rows[b]
        np.testing.assert_array_equal(loaded.biomarkers[b].residual(rows.design()), residual.residual(rows.design()))
        assert loaded.biomarkers[b].interval == residual.interval
    # another residual, another version
    other = ResidualArtifact(artifact.learner, artifact.feature_names, artifact.horizons,
                             {EGFR: artifact.biomarkers[EGFR]}, artifact.training_data).save(tmp_path / "b")
    assert other.version != saved.version
    # a foreign format is refused with a typed error, and so is an array file that would need pickle
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    (tmp_path / "a" / "artifact.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ArtifactError):
        ResidualArtifact.load(tmp_path / "a")
    (tmp_path / "a" / "artifact.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "a" / "arrays.npz", **{f"{EGFR}/value": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ArtifactError):
        ResidualArtifact.load(tmp_path / "a")


def test_stored_trees_predict_what_scikit_learn_predicts() -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 5))
    x[::6, 1] = np.nan
    y = 2 * x[:, 0] + np.nan_to_num(x[:, 1]) * x[:, 2] + rng.normal(0, 0.1, 600)
    model = HistGradientBoostingRegressor(**GBM_SETTINGS, random_state=0).fit(x, y)
    probe = rng.normal(size=(200, 5))
    probe[::3, 1] = np.nan
    probe[::4, 3] = np.nan  # missing where training had none
    stored = TreeEnsemble.from_arrays(TreeEnsemble.from_estimator(model).to_arrays())
    np.testing.assert_allclose(stored.predict(probe), model.predict(probe), rtol=0, atol=1e-12)


def test_serving_imports_neither_the_fhir_layer_nor_scikit_learn() -> None:
    import subprocess
    import sys

    code = ("import sys, fhirtwin.hybrid; bad = [m for m in sys.modules if m.startswith(('fhirtwin.fhir', "
            "'fhirtwin.adapters', 'sklearn'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_graph_learner_also_beats_both_comparators_where_effects_are_missing(cohort, trained) -> None:
    """The shipped learner (the scale graph network, see docs/hybrid.md) on the two biomarkers with effects."""
    _, train, test = cohort
    _, direct, _ = trained
    subset = Dataset({b: train.rows[b] for b in (EGFR, SBP)}, train.description)
    held_out = Dataset({b: test.rows[b] for b in (EGFR, SBP)}, test.description)
    scores = evaluate(held_out, {"gnn": fit_residual(subset, "gnn", seed=0)}, direct)
    for biomarker, s in scores.items():
        assert s["gnn"]["rmse"] < min(s["mechanistic"]["rmse"], s["learned_only"]["rmse"]), (biomarker, s)
        assert 0.80 <= s["gnn"]["coverage90"] <= 1.0


def test_a_configured_artifact_that_cannot_be_read_is_a_typed_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FHIRTWIN_HYBRID_ARTIFACT", str(tmp_path / "absent"))
    with pytest.raises(ArtifactError):
        HybridTwin()
    monkeypatch.setenv("FHIRTWIN_HYBRID", "off")  # switched off: the configured path is not even read
    assert not HybridTwin().active


def test_the_command_line_trains_a_versioned_artifact_the_engine_loads(tmp_path: Path, capsys) -> None:
    from fhirtwin.cli import main

    write_cohort(tmp_path / "ndjson", MIN_TRAINING_PATIENTS + 20, seed=5)  # just above the fallback: a small run
    stage = tmp_path / "staged"
    stage_ndjson(tmp_path / "ndjson", stage)
    assert main(["population", "residual", str(stage), "--out", str(tmp_path / "r"), "--learner", "gbm",
                 "--draws", "20"]) == 0
    loaded = ResidualArtifact.load(tmp_path / "r")
    assert loaded.version in capsys.readouterr().out
    assert loaded.training_data["n_patients"] > 0 and loaded.settings["learner"] == "gbm"
    assert loaded.training_data["stage_sha256"] == stage_hash(stage)


def test_the_residual_never_sees_a_value_of_a_switched_off_component() -> None:
    from fhirtwin.hybrid.features import twin_features

    names = list(layout().names)
    p = patient(pm25_ug_m3=35.0, exercise_min_per_week=0.0)
    on = twin_features(MechanisticTwin(components=component_names()).fit(p).inputs_)
    off = twin_features(MechanisticTwin(components=[]).fit(p).inputs_)
    assert on[names.index("pm25_ug_m3")] == 35.0 and on[names.index("exercise_min_per_week")] == 0.0
    assert np.isnan(off[names.index("pm25_ug_m3")]) and np.isnan(off[names.index("exercise_min_per_week")])
