"""Named invariants of the engine, checked over generated patients (hypothesis).

Each test states a clinical property the forecasts must keep whatever the patient: the published anchors
are reproduced on the expected course, competing death is counted once, no outcome jumps as eGFR crosses
a threshold, a quitter never does better than a never-smoker, genomic modifiers act on the coronary
component only, and trajectories stay positive without piling up at a floor. Expected values come from
the published equations (tested against published examples in ``test_equations.py``), never from the
engine's own tables.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sim_fixtures import series

from fhirtwin.sim import Intervention, Scenario, get_model
from fhirtwin.sim.equations import kfre_risk, prevent_risk
from fhirtwin.sim.inputs import PatientInputs

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUIT = Scenario("quit", (Intervention("smoking_cessation", "quit"),))
SGLT2 = Scenario("sglt2", (Intervention("sglt2i", "start SGLT2i"),))


@st.composite
def patients(draw: st.DrawFn, smoker: bool | None = None, uacr: bool | None = None) -> PatientInputs:
    """A primary-prevention patient inside PREVENT's ranges, with or without UACR and HbA1c."""
    diabetes = draw(st.booleans())
    has_uacr = draw(st.booleans()) if uacr is None else uacr
    has_a1c = draw(st.booleans())
    return PatientInputs(
        patient_id="generated",
        sex=draw(st.sampled_from(["female", "male"])),
        age_years=draw(st.floats(30, 79)),
        total_cholesterol_mg_dl=draw(st.floats(140, 300)),
        hdl_cholesterol_mg_dl=draw(st.floats(30, 90)),
        ldl_cholesterol_mg_dl=draw(st.floats(60, 220)),
        systolic_bp_mm_hg=draw(st.floats(100, 190)),
        egfr_ml_min_1_73m2=draw(st.floats(16, 130)),
        bmi_kg_m2=draw(st.floats(19, 39)),
        diabetes=diabetes,
        current_smoker=draw(st.booleans()) if smoker is None else smoker,
        on_bp_treatment=draw(st.booleans()),
        on_statin=False,
        hba1c_percent=(draw(st.floats(6.5, 10.0)) if diabetes else draw(st.floats(4.8, 6.3))) if has_a1c else None,
        uacr_mg_g=draw(st.floats(2, 2000)) if has_uacr else None,
    )


def prevent_10y(p: PatientInputs, outcome: str, age: float | None = None, **change: object) -> float:
    kw: dict[str, object] = dict(
        sex=p.sex, total_cholesterol_mg_dl=p.total_cholesterol_mg_dl, hdl_cholesterol_mg_dl=p.hdl_cholesterol_mg_dl,
        systolic_bp_mm_hg=p.systolic_bp_mm_hg, on_bp_treatment=int(p.on_bp_treatment), on_statin=int(p.on_statin),
        diabetes=int(p.diabetes), current_smoker=int(p.current_smoker), bmi_kg_m2=p.bmi_kg_m2,
        egfr_ml_min_1_73m2=p.egfr_ml_min_1_73m2,
    )
    model = {(True, True): "full", (True, False): "uacr", (False, True): "hba1c", (False, False): "base"}[
        (p.uacr_mg_g is not None, p.hba1c_percent is not None)]
    if p.uacr_mg_g is not None:
        kw["uacr_mg_g"] = p.uacr_mg_g
    if p.hba1c_percent is not None:
        kw["hba1c_percent"] = p.hba1c_percent
    kw.update(change)
    return float(prevent_risk(outcome=outcome, horizon_years=10, age_years=p.age_years if age is None else age,
                              model=model, clip=True, **kw))


def equations(p: PatientInputs, scenario: Scenario | None = None, horizon: float = 10.0):
    return get_model("fhirtwin-equations").fit(p).simulate(scenario, horizon, 50, 0)


@PROPERTY
@given(patients())
def test_anchor_reproduced_on_the_expected_course_with_competing_death_counted_once(p: PatientInputs) -> None:
    f = equations(p)
    for outcome in ("ascvd", "total_cvd", "heart_failure"):
        np.testing.assert_allclose(f.cif[outcome][:, 120], prevent_10y(p, outcome), rtol=1e-6, atol=1e-9)


@PROPERTY
@given(patients(uacr=True))
def test_kfre_is_the_cause_specific_risk_at_2_and_5_years(p: PatientInputs) -> None:
    model = get_model("fhirtwin-equations").fit(p)
    hazard = model.anchors_.kidney[0]
    for years in (2, 5):
        egfr = min(p.egfr_ml_min_1_73m2, 60.0)
        if p.egfr_ml_min_1_73m2 > 60:  # KFRE continued along its own eGFR term: check inside its range only
            continue
        expected = float(kfre_risk(horizon_years=years, sex=p.sex, age_years=p.age_years, egfr_ml_min_1_73m2=egfr,
                                   uacr_mg_g=p.uacr_mg_g, clip=True))
        net = 1.0 - np.exp(-hazard[: 12 * years].sum() / 12.0)
        np.testing.assert_allclose(net, expected, rtol=1e-9)
        # with death competing the incidence is lower than the death-censored risk
        assert model.simulate(None, 5.0, 20, 0).cif["kidney_failure"][0, 12 * years] <= expected + 1e-12


@settings(max_examples=10, deadline=None)
@given(st.integers(30, 59), st.sampled_from(["female", "male"]))
def test_thirty_year_prevent_reproduced_for_ages_30_to_59(age: int, sex: str) -> None:
    p = PatientInputs(patient_id="g", sex=sex, age_years=float(age), total_cholesterol_mg_dl=210.0,
                      hdl_cholesterol_mg_dl=48.0, ldl_cholesterol_mg_dl=130.0, systolic_bp_mm_hg=138.0,
                      egfr_ml_min_1_73m2=88.0, bmi_kg_m2=29.0, diabetes=False, current_smoker=True,
                      on_bp_treatment=False, on_statin=False)
    f = equations(p, horizon=30.0)
    for outcome in ("ascvd", "total_cvd", "heart_failure"):
        r30 = float(prevent_risk(outcome=outcome, horizon_years=30, sex=sex, age_years=float(age),
                                 total_cholesterol_mg_dl=210.0, hdl_cholesterol_mg_dl=48.0, systolic_bp_mm_hg=138.0,
                                 on_bp_treatment=0, on_statin=0, diabetes=0, current_smoker=1, bmi_kg_m2=29.0,
                                 egfr_ml_min_1_73m2=88.0))
        np.testing.assert_allclose(f.cif[outcome][0, 360], r30, rtol=1e-6)
        assert not any("beyond 10 years" in c for c in f.caveats)


def test_extrapolation_past_the_validated_horizon_is_flagged() -> None:
    p = PatientInputs(patient_id="g", sex="male", age_years=72.0, total_cholesterol_mg_dl=200.0,
                      hdl_cholesterol_mg_dl=45.0, ldl_cholesterol_mg_dl=120.0, systolic_bp_mm_hg=140.0,
                      egfr_ml_min_1_73m2=70.0, bmi_kg_m2=27.0, diabetes=False, current_smoker=False,
                      on_bp_treatment=True, on_statin=False)
    ten, twenty = equations(p, horizon=10.0), equations(p, horizon=20.0)
    assert not any("beyond 10 years" in c for c in ten.caveats)
    assert any("beyond 10 years" in c for c in twenty.caveats)
    assert any("above 79" in c for c in twenty.caveats)
    assert any("beyond 5 years" in c for c in ten.caveats)  # KFRE carried past its 5-year horizon
    assert twenty.method["extrapolated"] and "beyond 10 years" not in " ".join(ten.method["extrapolated"])


def _mechanistic_on_expected_course(p: PatientInputs):
    model = get_model("fhirtwin-mechanistic").fit(p)
    return model.simulate(None, 10.0, 2000, 3)


def test_mechanistic_median_reproduces_the_anchors_for_a_patient_without_history() -> None:
    # no history: the slope prior is centred on the expected course, so the deviation is zero on average
    for sex, age, egfr, uacr in (("female", 68.0, 38.0, 300.0), ("male", 45.0, 95.0, None), ("male", 79.0, 70.0, None)):
        p = PatientInputs(patient_id="g", sex=sex, age_years=age, total_cholesterol_mg_dl=205.0,
                          hdl_cholesterol_mg_dl=50.0, ldl_cholesterol_mg_dl=125.0, systolic_bp_mm_hg=136.0,
                          egfr_ml_min_1_73m2=egfr, bmi_kg_m2=28.0, diabetes=False, current_smoker=False,
                          on_bp_treatment=True, on_statin=False, uacr_mg_g=uacr)
        f = _mechanistic_on_expected_course(p)
        for outcome in ("ascvd", "total_cvd", "heart_failure"):
            ref = prevent_10y(p, outcome)
            assert abs(f.at_horizon(outcome)["median"] / ref - 1) < 0.05, (sex, age, outcome)
        if uacr is not None:
            kfre5 = float(kfre_risk(horizon_years=5, sex=sex, age_years=age, egfr_ml_min_1_73m2=egfr, uacr_mg_g=uacr))
            # incidence with death competing: below the death-censored KFRE, but not by more than deaths explain
            cif5 = f.at_horizon("kidney_failure", 5)["median"]
            assert kfre5 * 0.75 < cif5 <= kfre5 * 1.02


def test_no_step_in_any_outcome_as_egfr_crosses_a_threshold() -> None:
    base = PatientInputs(patient_id="g", sex="male", age_years=62.0, total_cholesterol_mg_dl=210.0,
                         hdl_cholesterol_mg_dl=45.0, ldl_cholesterol_mg_dl=130.0, systolic_bp_mm_hg=140.0,
                         egfr_ml_min_1_73m2=60.0, bmi_kg_m2=29.0, diabetes=True, current_smoker=False,
                         on_bp_treatment=True, on_statin=False)
    grid = np.arange(15.0, 120.0, 0.25)
    for uacr in (None, 60.0):
        risks = {o: [] for o in ("ascvd", "total_cvd", "heart_failure", "kidney_failure", "death")}
        for egfr in grid:
            f = equations(dataclasses.replace(base, egfr_ml_min_1_73m2=float(egfr), uacr_mg_g=uacr))
            for o in risks:
                risks[o].append(f.cif[o][0, 120])
        for o, values in risks.items():
            v = np.log(np.asarray(values))
            # a quarter of a mL/min/1.73m2 never moves any outcome by more than 3 % (relative)
            assert np.max(np.abs(np.diff(v))) < 0.03, (o, uacr, grid[int(np.argmax(np.abs(np.diff(v))))])


def test_kidney_failure_without_uacr_is_continuous_and_sglt2i_effect_is_proportionate() -> None:
    t = np.arange(-4.0, 0.5, 1.0)
    p = PatientInputs(patient_id="g", sex="male", age_years=60.0, total_cholesterol_mg_dl=205.0,
                      hdl_cholesterol_mg_dl=48.0, ldl_cholesterol_mg_dl=125.0, systolic_bp_mm_hg=138.0,
                      egfr_ml_min_1_73m2=62.0, bmi_kg_m2=29.0, diabetes=False, current_smoker=False,
                      on_bp_treatment=True, on_statin=False,
                      history_egfr_ml_min_1_73m2=series(t, [80.0, 76.0, 72.0, 67.0, 62.0]))
    model = get_model("fhirtwin-mechanistic").fit(p)
    base, treated = model.simulate(None, 10, 1000, 0), model.simulate(SGLT2, 10, 1000, 0)
    kf10 = base.cif["kidney_failure"][:, 120]
    # a distribution, not a 0/1 step: most draws carry some risk, and none is certain
    assert np.mean(kf10 > 1e-4) > 0.9 and kf10.max() < 0.9
    arr = np.median(kf10 - treated.cif["kidney_failure"][:, 120])
    assert 0 < arr < 0.5 * np.median(kf10)  # SMART-C RR 0.63 cannot prevent more than about 37 %


@PROPERTY
@given(patients(smoker=True))
def test_a_quitter_never_does_better_than_a_never_smoker(p: PatientInputs) -> None:
    never = equations(dataclasses.replace(p, current_smoker=False))
    quit_model = get_model("fhirtwin-equations").fit(p)
    from fhirtwin.sim.calibration import calibrate
    from fhirtwin.sim.dynamics import month_grid, simulate_trajectories
    from fhirtwin.sim.ensemble import draw_parameters
    from fhirtwin.sim.hazards import cumulative_incidence, hazard_paths, quitter_multiplier

    t = month_grid(10)
    draws = draw_parameters(p, calibrate(p), 50, 0, 10)
    traj = simulate_trajectories(p, quit_model.posteriors_, draws, QUIT, t, dynamic=False)
    smoking_hazards = hazard_paths(p, quit_model.anchors_, traj, draws, QUIT, dynamic=False)
    factor = quitter_multiplier(quit_model.anchors_, draws.ratios, 0.5 * (t[1:] + t[:-1]))
    sure_quitter = cumulative_incidence({o: smoking_hazards[o] * factor[o] for o in factor}, quit_model.anchors_,
                                        outcomes=tuple(factor))
    for outcome in ("ascvd", "total_cvd", "heart_failure"):
        assert np.all(sure_quitter[outcome][:, 120] >= never.cif[outcome][0, 120] * (1 - 1e-9))
    # and the forecast mixes the quit probability: between the sure quitter and continued smoking
    mixed, smoking = equations(p, QUIT), equations(p)
    assert np.all(mixed.cif["total_cvd"][:, 120] <= smoking.cif["total_cvd"][:, 120] + 1e-12)
    assert np.all(mixed.cif["total_cvd"][:, 120] >= sure_quitter["total_cvd"][:, 120] - 1e-12)


@PROPERTY
@given(patients(), st.floats(-3, 3), st.booleans())
def test_genomic_modifiers_act_on_the_coronary_component_only(p: PatientInputs, z: float, fh: bool) -> None:
    plain = equations(p)
    genomic = equations(dataclasses.replace(p, cad_prs_z=z, fh_variant=fh))
    np.testing.assert_allclose(genomic.cif["heart_failure"], plain.cif["heart_failure"])
    ratio = np.log1p(-genomic.cif["ascvd"][:, 120]) / np.log1p(-plain.cif["ascvd"][:, 120])
    # the largest possible coronary multiplier (upper CI bounds) applied to the whole ASCVD hazard bounds it
    bound = 1.42 ** abs(z) * (8.87 if fh else 1.0)
    assert np.all(ratio <= bound * (1 + 1e-9)) and np.all(ratio >= 1.0 / bound * (1 - 1e-9))


@PROPERTY
@given(patients())
def test_trajectories_stay_positive_without_mass_at_a_floor(p: PatientInputs) -> None:
    f = get_model("fhirtwin-mechanistic").fit(p).simulate(None, 10.0, 300, 1)
    for variable, values in f.trajectories.items():
        final = values[:, -1]
        assert np.all(final > 0), variable
        # a floor would make many draws share one value
        assert np.unique(np.round(final, 6)).size > 0.95 * final.size, variable


def test_prevent_re_evaluation_equals_the_equation_with_every_moving_input_shifted_at_once() -> None:
    from fhirtwin.sim.dynamics import Trajectories, month_grid
    from fhirtwin.sim.hazards import prevent_hazard_ratio

    p = PatientInputs(patient_id="g", sex="female", age_years=58.0, total_cholesterol_mg_dl=215.0,
                      hdl_cholesterol_mg_dl=47.0, ldl_cholesterol_mg_dl=130.0, systolic_bp_mm_hg=142.0,
                      egfr_ml_min_1_73m2=64.0, bmi_kg_m2=33.0, diabetes=True, current_smoker=False,
                      on_bp_treatment=True, on_statin=False, hba1c_percent=7.6, uacr_mg_g=55.0)
    model = get_model("fhirtwin-equations").fit(p)
    t = month_grid(3)
    shift = {"egfr_ml_min_1_73m2": -9.0, "bmi_kg_m2": 2.5, "hba1c_percent": 0.8}  # crosses eGFR 60 and BMI 30
    flat = {v: np.full(t.size, getattr(p, v)) for v in shift}
    deviation = {v: np.full((2, t.size), d) for v, d in shift.items()}
    traj = Trajectories(t, {}, deviation, flat, deviation["egfr_ml_min_1_73m2"])
    for outcome in ("ascvd", "total_cvd", "heart_failure"):
        engine = np.log(prevent_hazard_ratio(p, model.anchors_, traj, outcome)[0, -1])
        moved = {v: getattr(p, v) + d for v, d in shift.items() if outcome == "heart_failure" or v != "bmi_kg_m2"}
        direct = np.log(-np.log1p(-prevent_10y(p, outcome, **moved))) - np.log(-np.log1p(-prevent_10y(p, outcome)))
        np.testing.assert_allclose(engine, direct, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["female", "male"]), st.floats(30, 55), st.floats(150, 200), st.floats(50, 80),
       st.floats(100, 125), st.floats(75, 110))
def test_healthy_low_risk_patients_get_no_drug(sex: str, age: float, tc: float, hdl: float, sbp: float,
                                               egfr: float) -> None:
    from fhirtwin.sim.planner import NO_DRUG_INDICATED, plan

    p = PatientInputs(patient_id="g", sex=sex, age_years=age, total_cholesterol_mg_dl=tc, hdl_cholesterol_mg_dl=hdl,
                      ldl_cholesterol_mg_dl=max(tc - hdl - 30, 40), systolic_bp_mm_hg=sbp, egfr_ml_min_1_73m2=egfr,
                      bmi_kg_m2=25.0, diabetes=False, current_smoker=False, on_bp_treatment=False, on_statin=False)
    assume(prevent_10y(p, "ascvd") < 0.03)  # low risk by the published equation (2026 ACC/AHA category)
    result = plan(get_model("fhirtwin-mechanistic").fit(p), draws=60, seed=0)
    assert result.options == () and result.notes[0].startswith(NO_DRUG_INDICATED)


def test_every_number_the_engine_uses_names_its_source() -> None:
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "fhirtwin" / "sim"
    guidelines = json.loads((folder / "guidelines.json").read_text())
    for kind, rows in guidelines["harms_per_1000_person_years"].items():
        for row in rows if isinstance(rows, list) else []:
            assert row["source"] and row["rate"] >= 0, kind
    for key, spec in guidelines["risk_categories"].items():
        assert spec["source"] and spec["bands"][-1][0] is None, key
    dynamics = json.loads((folder / "dynamics_parameters.json").read_text())
    for variable, spec in dynamics["biomarkers"].items():
        assert spec["expected_slope_per_year"]["source"] and spec["slope_deviation"]["source"], variable
    for block in ("background_mortality", "ckd_mortality_hazard_ratio", "uacr_when_unmeasured"):
        assert dynamics[block]["source"], block
    interventions = json.loads((folder / "interventions.json").read_text())
    for name, spec in interventions["ratios"].items():
        lo, hi = spec["ci95"]
        assert lo < spec["value"] < hi and spec["source"] and spec["applies_to"], name
