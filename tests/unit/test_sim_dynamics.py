"""Monotonic effects of interventions and genomic modifiers, and anchoring to the equations."""

from __future__ import annotations

import numpy as np
from sim_fixtures import patient, series

from fhirtwin.sim import Intervention, Scenario, get_model
from fhirtwin.sim.calibration import calibrate
from fhirtwin.sim.dynamics import month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import draw_parameters
from fhirtwin.sim.equations import kfre_risk, prevent_risk
from fhirtwin.sim.hazards import competing_cif

DRAWS, SEED, H = 400, 5, 10
STATIN = Scenario("statin", (Intervention("statin", "high statin", intensity="high", agent="atorvastatin"),))
BP = Scenario("bp", (Intervention("bp_lowering", "add BP drug"),))
SGLT2 = Scenario("sglt2", (Intervention("sglt2i", "start SGLT2i"),))
QUIT = Scenario("quit", (Intervention("smoking_cessation", "quit"),))


def run(inputs, scenario=None, name="fhirtwin-mechanistic", **kw):
    return get_model(name, **kw).fit(inputs).simulate(scenario, H, DRAWS, SEED)


def med(f, outcome):
    return f.at_horizon(outcome)["median"]


def test_statin_lowers_ldl_and_ascvd_not_heart_failure():
    base, treated = run(patient()), run(patient(), STATIN)
    ldl_b = base.trajectories["ldl_cholesterol_mg_dl"][:, -1]
    ldl_t = treated.trajectories["ldl_cholesterol_mg_dl"][:, -1]
    ratio = ldl_t / ldl_b
    assert np.all(ratio <= 0.5 + 1e-9) and np.all(ratio >= 0.4 - 1e-9)  # high intensity: 50-60 % lowering
    assert np.all(treated.cif["ascvd"][:, -1] < base.cif["ascvd"][:, -1])
    np.testing.assert_allclose(treated.cif["heart_failure"], base.cif["heart_failure"])


def test_bp_lowering_lowers_sbp_and_heart_failure():
    base, treated = run(patient()), run(patient(), BP)
    drop = base.trajectories["systolic_bp_mm_hg"][:, 24] - treated.trajectories["systolic_bp_mm_hg"][:, 24]
    assert np.all(drop >= 0) and np.median(drop) > 5
    assert np.all(treated.cif["heart_failure"][:, -1] < base.cif["heart_failure"][:, -1])
    assert med(treated, "total_cvd") < med(base, "total_cvd")


def test_sglt2i_lowers_kidney_failure_and_slows_egfr_decline():
    base, treated = run(patient()), run(patient(), SGLT2)
    assert np.all(treated.cif["kidney_failure"][:, -1] < base.cif["kidney_failure"][:, -1])
    assert np.median(treated.trajectories["egfr_ml_min_1_73m2"][:, -1]) > np.median(
        base.trajectories["egfr_ml_min_1_73m2"][:, -1]
    )


def test_smoking_cessation_lowers_cvd_only_for_smokers():
    assert med(run(patient(), QUIT), "total_cvd") < med(run(patient()), "total_cvd")
    never = patient(current_smoker=False)
    np.testing.assert_allclose(run(never, QUIT).cif["total_cvd"], run(never).cif["total_cvd"])


def _few_points(**kw):
    t = np.array([-1.0, 0.0])
    return patient(history_egfr_ml_min_1_73m2=series(t, 50.0), **kw)


def test_apol1_high_risk_steepens_egfr_decline():
    low = get_model("fhirtwin-mechanistic").fit(_few_points(apol1_risk_alleles=0))
    high = get_model("fhirtwin-mechanistic").fit(_few_points(apol1_risk_alleles=2))
    assert high.posteriors_["egfr_ml_min_1_73m2"].mean[1] < low.posteriors_["egfr_ml_min_1_73m2"].mean[1] - 0.5
    f_low, f_high = low.simulate(None, H, DRAWS, SEED), high.simulate(None, H, DRAWS, SEED)
    assert np.median(f_high.trajectories["egfr_ml_min_1_73m2"][:, -1]) < np.median(
        f_low.trajectories["egfr_ml_min_1_73m2"][:, -1]
    )
    assert med(f_high, "kidney_failure") > med(f_low, "kidney_failure")


def test_fh_variant_and_prs_raise_ascvd():
    base = run(patient())
    assert med(run(patient(fh_variant=True)), "ascvd") > 1.5 * med(base, "ascvd")
    assert med(run(patient(cad_prs_z=1.5)), "ascvd") > med(base, "ascvd")
    assert med(run(patient(cad_prs_z=-1.5)), "ascvd") < med(base, "ascvd")
    # FH acts on ASCVD, not on heart failure
    np.testing.assert_allclose(run(patient(fh_variant=True)).cif["heart_failure"], base.cif["heart_failure"])


def test_hba1c_rise_speeds_egfr_decline():
    t = np.arange(-5.0, 0.5, 1.0)
    rising = patient(history_hba1c_percent=series(t, 7.5 + 0.3 * t))  # +0.3 %/yr
    f_flat, f_rise = run(patient()), run(rising)
    drop_flat = np.median(f_flat.trajectories["egfr_ml_min_1_73m2"][:, -1])
    drop_rise = np.median(f_rise.trajectories["egfr_ml_min_1_73m2"][:, -1])
    assert drop_rise < drop_flat


def _prevent_10y(inputs, outcome):
    return prevent_risk(
        outcome=outcome, horizon_years=10, sex=inputs.sex, age_years=inputs.age_years,
        total_cholesterol_mg_dl=inputs.total_cholesterol_mg_dl, hdl_cholesterol_mg_dl=inputs.hdl_cholesterol_mg_dl,
        systolic_bp_mm_hg=inputs.systolic_bp_mm_hg, on_bp_treatment=1, on_statin=0, diabetes=1, current_smoker=1,
        bmi_kg_m2=inputs.bmi_kg_m2, egfr_ml_min_1_73m2=inputs.egfr_ml_min_1_73m2, model="full",
        uacr_mg_g=inputs.uacr_mg_g, hba1c_percent=inputs.hba1c_percent,
    )


def test_equation_twin_reproduces_prevent_with_competing_death_and_kfre_as_cause_specific_risk():
    inputs = patient()
    f = run(inputs, name="fhirtwin-equations")
    # competing non-CVD death is already in PREVENT: the cumulative incidence equals it (counted once)
    for outcome in ("ascvd", "total_cvd", "heart_failure"):
        np.testing.assert_allclose(f.cif[outcome][:, 120], _prevent_10y(inputs, outcome), rtol=1e-6)
    # KFRE censored death: its risk is the cause-specific (net) risk, so the incidence with death competing
    # is lower than KFRE but by less than the deaths
    kfre5 = kfre_risk(horizon_years=5, sex="male", age_years=60.0, egfr_ml_min_1_73m2=50.0, uacr_mg_g=100.0)
    cif5 = f.cif["kidney_failure"][0, 60]
    assert kfre5 * (1 - f.cif["death"][0, 60] - f.cif["total_cvd"][0, 60]) < cif5 < kfre5


def test_competing_cif_constant_hazards_closed_form():
    h, d = np.full((1, 120), 0.02), np.full((1, 120), 0.01)
    cif, death = competing_cif(h, d, 1 / 12)
    total = 1 - np.exp(-0.03 * 10)
    np.testing.assert_allclose(cif[0, -1], total * 2 / 3, rtol=1e-12)
    np.testing.assert_allclose(death[0, -1], total / 3, rtol=1e-12)


def test_trajectories_are_vectorised_over_draws():
    inputs = patient()
    post = calibrate(inputs)
    t = month_grid(10)
    draws = draw_parameters(inputs, post, 7, 1, 10)
    traj = simulate_trajectories(inputs, post, draws, STATIN, t)
    assert all(v.shape == (7, 121) for v in traj.values.values())
