"""Individual counterfactuals: abduction-action-prediction recovers a closed-form truth, and do() on the engine
has the properties its mechanisms imply (consistency, monotone LDL-C effect, CTT per mmol/L, no kidney path)."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.causal.counterfactual import (
    SetValue,
    Shift,
    UnsupportedIntervention,
    abduction_action_prediction,
    apply_actions,
    twin_counterfactual,
)
from fhirtwin.sim.calibration import bayes_linear
from fhirtwin.sim.model import MechanisticTwin

# ------------------------------------------------------------------------------------------------
# a structural model with a closed-form counterfactual
# ------------------------------------------------------------------------------------------------
# latent level a and slope b ~ N(M0, S0); measurements y_i = a + b t_i + e_i (sd SIGMA) at t = -5..0;
# X(t) = a + b t; the outcome's hazard at T reads the mean past exposure over [-5, 0) (memory, weight BETA)
# and the current value X(T) (weight GAMMA): h = H0 exp(BETA * mean_past X + GAMMA * X(T)).

M0, S0 = np.array([130.0, 0.0]), np.diag([40.0**2, 3.0**2])
SIGMA, H0, BETA, GAMMA, T = 8.0, 0.01, 0.004, 0.006, 5.0
GRID = np.round(np.arange(-5.0, T + 1e-9, 0.25), 10)
OBS_T = np.arange(-5.0, 0.5, 1.0)
OBS_Y = np.array([162.0, 158.0, 151.0, 149.0, 140.0, 138.0])


def truth_posterior() -> tuple[np.ndarray, np.ndarray]:
    """Gaussian conditioning in covariance form (a different algebra from the engine's precision form)."""
    x = np.column_stack([np.ones_like(OBS_T), OBS_T])
    gain = S0 @ x.T @ np.linalg.inv(x @ S0 @ x.T + SIGMA**2 * np.eye(OBS_T.size))
    return M0 + gain @ (OBS_Y - x @ M0), S0 - gain @ x @ S0


def expected_hazard(c_level: float, c_slope: float, const: float = 0.0) -> float:
    """E[H0 exp(const + c . (a, b))] under the posterior: a log-normal mean."""
    mean, cov = truth_posterior()
    c = np.array([c_level, c_slope])
    return float(H0 * np.exp(const + c @ mean + 0.5 * c @ cov @ c))


def toy_counterfactual(actions, n: int = 200_000, seed: int = 11):
    rng = np.random.default_rng(seed)

    def abduct() -> np.ndarray:
        mean, cov = bayes_linear(OBS_T, OBS_Y, prior_mean=M0, prior_cov=S0, noise_sd=SIGMA)
        return mean + rng.standard_normal((n, 2)) @ np.linalg.cholesky(cov).T

    def structural(u: np.ndarray, acts) -> dict[str, np.ndarray]:
        return apply_actions(GRID, {"x": u[:, :1] + u[:, 1:] * GRID[None, :]}, acts)

    def predict(u: np.ndarray, paths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = paths["x"]
        past = x[:, GRID < 0].mean(axis=1)
        return {"h": H0 * np.exp(BETA * past + GAMMA * x[:, -1])}

    return abduction_action_prediction(abduct, structural, predict, actions)


def test_abduction_action_prediction_recovers_the_closed_form_past_counterfactual() -> None:
    factual, counter = toy_counterfactual([SetValue("x", 100.0, start_years=-5.0, end_years=0.0)])
    mean_past_slope = float(GRID[GRID < 0].mean())
    truth_f = expected_hazard(BETA + GAMMA, BETA * mean_past_slope + GAMMA * T)
    truth_cf = expected_hazard(GAMMA, GAMMA * T, const=BETA * 100.0)
    for est, truth in ((factual["h"], truth_f), (counter["h"], truth_cf)):
        se = float(est.std() / np.sqrt(est.size))
        assert abs(float(est.mean()) - truth) < 4 * se + 1e-12, (float(est.mean()), truth)
    # the answer needs the patient's own terms: the prior (no abduction) gives a clearly different one
    prior_cf = float(H0 * np.exp(BETA * 100.0 + GAMMA * (M0 @ [1, T]) + 0.5 * GAMMA**2 * np.array([1, T]) @ S0
                                 @ np.array([1, T])))
    assert abs(prior_cf - truth_cf) > 20 * float(counter["h"].std() / np.sqrt(counter["h"].size))


def test_a_shift_keeps_each_units_own_course() -> None:
    factual, counter = toy_counterfactual([Shift("x", -40.0, start_years=0.0)], n=1000)
    np.testing.assert_allclose(counter["h"], factual["h"] * np.exp(-40.0 * GAMMA), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin() -> MechanisticTwin:
    return MechanisticTwin().fit(patient())


def test_do_ldl_at_its_own_value_changes_nothing_and_the_factual_world_is_the_engine(twin) -> None:
    cf = twin_counterfactual(twin, [Shift("ldl_cholesterol_mg_dl", 0.0)], draws=200, seed=5)
    forecast = twin.simulate(draws=200, seed=5)
    for outcome, cif in forecast.cif.items():
        np.testing.assert_array_equal(cf.factual[outcome], cif)
        np.testing.assert_array_equal(cf.counterfactual[outcome], cif)


def test_lower_ldl_lowers_ascvd_monotonically_and_leaves_kidney_and_heart_failure_unchanged(twin) -> None:
    results = [twin_counterfactual(twin, [SetValue("ldl_cholesterol_mg_dl", v)], draws=200, seed=2)
               for v in (190.0, 160.0, 130.0, 100.0, 70.0)]
    ascvd = np.array([r.counterfactual["ascvd"][:, -1] for r in results])
    assert np.all(np.diff(ascvd, axis=0) < 0)  # every draw, every step down in LDL-C
    for r in results:
        for outcome in ("kidney_failure", "heart_failure"):
            np.testing.assert_array_equal(r.counterfactual[outcome], r.factual[outcome])


def test_one_mmol_per_l_lower_ldl_gives_the_ctt_hazard_ratio(twin) -> None:
    cf = twin_counterfactual(twin, [Shift("ldl_cholesterol_mg_dl", -38.67)], draws=400, seed=9)
    ratio = cf.counterfactual["hazard:ascvd"] / cf.factual["hazard:ascvd"]
    # in year 5 the ratio is the coronary/stroke-mixed SBP part (unchanged) times CTT's RR per mmol/L
    year5 = ratio[:, 54]
    assert np.ptp(year5) > 0.01  # one RR draw per ensemble member (its CI), not a fixed number
    assert abs(float(np.median(year5)) - 0.78) < 0.01  # CTT, Lancet 2010: 0.78 (0.76-0.80)
    assert abs(float(np.median(ratio[:, 5])) - 0.78**0.5) < 0.01  # first year: half the log-effect


def test_a_past_only_action_changes_nothing_and_says_why(twin) -> None:
    cf = twin_counterfactual(twin, [SetValue("ldl_cholesterol_mg_dl", 100.0, start_years=-5.0, end_years=0.0)],
                             draws=100, seed=1)
    for outcome in ("ascvd", "total_cvd", "kidney_failure", "death"):
        np.testing.assert_array_equal(cf.counterfactual[outcome], cf.factual[outcome])
    assert any("no memory of past exposure" in note for note in cf.notes)
    both = twin_counterfactual(twin, [SetValue("ldl_cholesterol_mg_dl", 100.0, start_years=-5.0)], draws=100, seed=1)
    assert float(both.counterfactual["ascvd"][:, -1].mean()) < float(both.factual["ascvd"][:, -1].mean())


def test_unsupported_actions_are_typed_errors(twin) -> None:
    with pytest.raises(UnsupportedIntervention, match="hba1c"):
        twin_counterfactual(twin, [SetValue("hba1c_percent", 6.0)], draws=10)
    with pytest.raises(UnsupportedIntervention, match="empty window"):
        SetValue("ldl_cholesterol_mg_dl", 100.0, start_years=0.0, end_years=0.0)
