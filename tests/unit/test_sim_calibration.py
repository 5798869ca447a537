"""Bayesian calibration recovers known slopes and shrinks toward the prior with few points."""

from __future__ import annotations

import numpy as np
from sim_fixtures import patient, series

from fhirtwin.sim.calibration import bayes_linear, calibrate_variable, slope_prior


def _noisy_egfr(slope, n, years, seed):
    rng = np.random.default_rng(seed)
    t = np.linspace(-years, 0, n)
    true = 55.0 + slope * t
    return t, true * (1 + 0.05 * rng.standard_normal(n))


def test_recovers_known_slope_within_posterior_interval():
    hits = 0
    for seed in range(20):
        t, y = _noisy_egfr(-3.0, 12, 6.0, seed)
        post = calibrate_variable(patient(history_egfr_ml_min_1_73m2=series(t, y)), "egfr_ml_min_1_73m2")
        lo, hi = post.slope_interval(0.90)
        hits += lo <= -3.0 <= hi
        assert abs(post.mean[1] + 3.0) < 1.5
    assert hits >= 15  # nominal 90 %: 18 of 20 expected; 15 allows sampling noise


def test_few_points_shrink_toward_prior():
    inputs = patient(history_egfr_ml_min_1_73m2=series([-0.5, 0.0], [60.0, 55.0]))  # raw slope -10/yr
    prior_mean, _ = slope_prior(inputs, "egfr_ml_min_1_73m2")
    post = calibrate_variable(inputs, "egfr_ml_min_1_73m2")
    assert prior_mean > post.mean[1] > -10.0
    assert abs(post.mean[1] - prior_mean) < abs(post.mean[1] + 10.0)  # closer to the prior than to the data
    many = calibrate_variable(
        patient(history_egfr_ml_min_1_73m2=series(np.linspace(-5, 0, 11), 50.0 - 10.0 * np.linspace(-5, 0, 11))),
        "egfr_ml_min_1_73m2",
    )
    assert many.mean[1] < -8.0  # with many points the data dominate
    assert many.cov[1, 1] < post.cov[1, 1]


def test_bayes_linear_matches_ols_with_flat_prior():
    t = np.array([-3.0, -2.0, -1.0, 0.0])
    y = np.array([10.0, 12.0, 13.5, 16.0])
    mean, _ = bayes_linear(t, y, prior_mean=np.zeros(2), prior_cov=np.eye(2) * 1e12, noise_sd=1.0)
    np.testing.assert_allclose(mean, np.polyfit(t, y, 1)[::-1], rtol=1e-6)


def test_prior_depends_on_covariates():
    plain = slope_prior(patient(diabetes=False, egfr_ml_min_1_73m2=90.0), "egfr_ml_min_1_73m2")[0]
    apol1 = slope_prior(patient(diabetes=False, egfr_ml_min_1_73m2=90.0, apol1_risk_alleles=2), "egfr_ml_min_1_73m2")[0]
    dm = slope_prior(patient(diabetes=True, egfr_ml_min_1_73m2=90.0), "egfr_ml_min_1_73m2")[0]
    assert apol1 < plain and dm < plain


def test_measurements_before_current_statin_are_not_used():
    t = np.arange(-4.0, 0.5, 1.0)
    ldl = np.where(t < -2.0, 180.0, 100.0)  # statin started at -2.5
    post = calibrate_variable(
        patient(on_statin=True, statin_intensity="moderate", statin_start_years=-2.5,
                history_ldl_cholesterol_mg_dl=series(t, ldl)),
        "ldl_cholesterol_mg_dl",
    )
    assert abs(post.mean[0] - 100.0) < 5 and post.n_points == 3 and post.pending_regimen_start is None
    pending = calibrate_variable(
        patient(on_statin=True, statin_intensity="moderate", statin_start_years=-0.02,
                history_ldl_cholesterol_mg_dl=series(t, 180.0)),
        "ldl_cholesterol_mg_dl",
    )
    assert pending.pending_regimen_start == -0.02


def test_noise_scale_follows_the_patients_own_scatter():
    t = np.linspace(-6.0, 0.0, 13)
    rng = np.random.default_rng(3)
    calm = 140.0 + 2.0 * rng.standard_normal(t.size)
    jumpy = 140.0 + 20.0 * rng.standard_normal(t.size)
    low = calibrate_variable(patient(history_systolic_bp_mm_hg=series(t, calm)), "systolic_bp_mm_hg")
    high = calibrate_variable(patient(history_systolic_bp_mm_hg=series(t, jumpy)), "systolic_bp_mm_hg")
    assert low.noise_scale < 1.0 < high.noise_scale
    assert low.cov[0, 0] < high.cov[0, 0]  # the level is known better when the values scatter less
    assert low.noise_dof > 4.0


def test_predictive_noise_is_added_with_the_patients_scale():
    t = np.linspace(-6.0, 0.0, 13)
    post = calibrate_variable(patient(history_systolic_bp_mm_hg=series(t, 140.0 + 0 * t)), "systolic_bp_mm_hg")
    draws = post.predictive_noise(np.full(20000, 140.0), np.random.default_rng(0))
    assert abs(np.median(np.abs(draws)) / (0.6745 * post.predictive_noise_sd(np.array([140.0]))[0]) - 1) < 0.1


def test_egfr_noise_follows_ckd_epi_exponent():
    from fhirtwin.sim.calibration import noise_sd

    low, high = noise_sd("egfr_ml_min_1_73m2", np.array([40.0, 115.0]), sex="male", age_years=50.0)
    assert low / 40.0 > 3 * high / 115.0  # creatinine CV moves eGFR by 1.2x below kappa, 0.3x above
