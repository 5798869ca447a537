"""Conformance: every registered model honours the TwinModel contract."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.sim import available_models, get_model
from fhirtwin.sim.interventions import candidate_interventions, combinations
from fhirtwin.sim.model import Forecast, NotFittedError

MODELS = available_models()
HORIZON = 10
DRAWS = 200


def test_registry_has_models():
    assert "fhirtwin-mechanistic" in MODELS and "fhirtwin-equations" in MODELS


@pytest.fixture(params=MODELS)
def fitted(request):
    model = get_model(request.param)
    before = set(vars(model))
    assert model.fit(patient()) is model
    return model, set(vars(model)) - before


def test_fit_returns_self_and_learned_attributes_end_with_underscore(fitted):
    model, learned = fitted
    assert learned, "fit must learn something"
    assert all(name.endswith("_") for name in learned), learned
    assert set(model.learned_attributes()) == learned


@pytest.mark.parametrize("name", MODELS)
def test_simulate_before_fit_raises(name):
    with pytest.raises(NotFittedError):
        get_model(name).simulate(horizon_years=1, draws=5, seed=0)


def _scenarios():
    return [None, *combinations(candidate_interventions(patient()).eligible)[:3]]


def test_same_seed_same_forecast_and_different_seed_different_draws(fitted):
    model, _ = fitted
    for scenario in _scenarios():
        a = model.simulate(scenario, HORIZON, DRAWS, seed=11)
        b = model.simulate(scenario, HORIZON, DRAWS, seed=11)
        c = model.simulate(scenario, HORIZON, DRAWS, seed=12)
        for o in a.outcomes:
            np.testing.assert_array_equal(a.cif[o], b.cif[o])
        for v in a.trajectories:
            np.testing.assert_array_equal(a.trajectories[v], b.trajectories[v])
        assert a.to_json() == b.to_json()
        # a new seed gives new draws (the equations-only comparator has no randomness in its baseline
        # hazards, so the draws show in the trajectories)
        assert not np.array_equal(a.trajectories["ldl_cholesterol_mg_dl"], c.trajectories["ldl_cholesterol_mg_dl"])
        if scenario is not None or model.dynamic:
            assert not np.array_equal(a.cif["total_cvd"], c.cif["total_cvd"])


def test_shapes_probabilities_monotone_and_competing(fitted):
    model, _ = fitted
    for scenario in _scenarios():
        f = model.simulate(scenario, HORIZON, DRAWS, seed=3)
        assert isinstance(f, Forecast)
        assert f.model == model.name and f.model_version == model.version
        months = 12 * HORIZON + 1
        np.testing.assert_array_equal(f.times_months, np.arange(months))
        assert set(f.outcomes) == {"ascvd", "total_cvd", "heart_failure", "kidney_failure", "death"}
        assert set(f.trajectories) == {
            "ldl_cholesterol_mg_dl", "systolic_bp_mm_hg", "egfr_ml_min_1_73m2", "hba1c_percent", "bmi_kg_m2"
        }
        for o, cif in f.cif.items():
            assert cif.shape == (DRAWS, months), o
            assert np.all(cif >= 0) and np.all(cif <= 1), o
            assert np.all(np.diff(cif, axis=1) >= -1e-12), f"{o} not monotone"
            assert np.all(cif[:, 0] == 0)
        for v, traj in f.trajectories.items():
            assert traj.shape == (DRAWS, months), v
            assert np.all(np.isfinite(traj))
        for group in f.competing_groups:
            assert np.all(sum(f.cif[o] for o in group) <= 1 + 1e-12)
        s = f.at_horizon("total_cvd")
        assert s["p05"] <= s["median"] <= s["p95"]
        assert f.sources == patient().sources
        assert f.method["prevent"]["variant"] == "full"


def test_horizon_out_of_range_rejected(fitted):
    model, _ = fitted
    with pytest.raises(ValueError):
        model.simulate(horizon_years=31, draws=5, seed=0)


def test_sim_never_imports_fhir_or_adapters():
    import subprocess
    import sys

    code = (
        "import sys, fhirtwin.sim, fhirtwin.sim.validation, fhirtwin.sim.planner;"
        "bad=[m for m in sys.modules if m.startswith(('fhirtwin.fhir','fhirtwin.adapters'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
