"""Planner: guideline-indicated options, paired ARR and NNT, net benefit after harms, "no drug indicated"."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.sim import get_model, plan
from fhirtwin.sim.interventions import Scenario, candidate_interventions
from fhirtwin.sim.planner import PAIRED_DRAWS, compare, paired_draws


@pytest.fixture(scope="module")
def result():
    model = get_model("fhirtwin-mechanistic").fit(patient(slco1b1_phenotype="decreased_function"))
    return plan(model, outcome="total_cvd", horizon_years=10, draws=300, seed=4)


def test_combination_first_then_singles_by_net_benefit_and_each_added_drug_pays_for_its_harm(result):
    combo, *singles = result.options
    assert len(combo.scenario.interventions) >= 2 and all(len(o.scenario.interventions) == 1 for o in singles)
    nets = [o.net_benefit["median"] for o in singles]
    assert nets == sorted(nets, reverse=True) and all(n > 0 for n in nets)
    # greedy: every prefix of the combination is worth less than the next step (paired, after harms)
    assert combo.net_benefit["median"] >= max(nets)
    assert sum(1 for i in combo.scenario.interventions if i.kind == "statin") <= 1
    # every option states the guideline indication of each of its drugs, and drug harms where trials measured some
    assert all(len(o.indication) == len(o.scenario.interventions) for o in result.options)
    assert any(o.harms for o in singles)


def test_arr_is_paired_per_draw_and_nnt_is_its_inverse(result):
    base = result.baseline
    for o in result.options:
        f = result.forecasts[o.scenario.name]
        assert f.draws == paired_draws(base.draws) < base.draws
        diff = base.cif["total_cvd"][: f.draws, 120] - f.cif["total_cvd"][:, 120]
        assert o.arr["median"] == pytest.approx(np.median(diff))
        assert o.arr["p05"] <= o.arr["median"] <= o.arr["p95"]
        if o.arr["p05"] > 0:
            assert o.nnt == pytest.approx(1 / o.arr["median"])
            assert o.nnt_interval[0] <= o.nnt <= o.nnt_interval[1]


def test_scenarios_run_on_the_baselines_first_draws_and_keep_its_precision():
    """Common random numbers: an ensemble of k is the first k members of an ensemble of n, so a scenario on
    fewer draws is paired member by member; the ARR on PAIRED_DRAWS stays close to the ARR on 1,000."""
    model = get_model("fhirtwin-mechanistic").fit(patient())
    full = model.simulate(None, 10, 1000, 3)
    head = model.simulate(None, 10, PAIRED_DRAWS, 3)
    for outcome in full.cif:
        np.testing.assert_array_equal(head.cif[outcome], full.cif[outcome][:PAIRED_DRAWS])
    statin = next(i for i in candidate_interventions(model.inputs_).eligible if i.kind == "statin")
    scenario = Scenario(statin.label, (statin,))
    arr_full = compare(full, model.simulate(scenario, 10, 1000, 3), "total_cvd").arr
    arr_paired = compare(full, model.simulate(scenario, 10, PAIRED_DRAWS, 3), "total_cvd").arr
    assert arr_full["median"] > 0
    assert arr_paired["median"] == pytest.approx(arr_full["median"], rel=0.1)
    width = arr_full["p95"] - arr_full["p05"]
    assert abs(arr_paired["p05"] - arr_full["p05"]) < 0.2 * width
    assert abs(arr_paired["p95"] - arr_full["p95"]) < 0.2 * width


def test_exclusions_carried_into_plan(result):
    assert any("simvastatin" in e.candidate for e in result.excluded)
    assert result.to_json()["options"][0]["nnt"] is not None


def test_no_benefit_gives_undefined_nnt():
    model = get_model("fhirtwin-mechanistic").fit(patient())
    f = model.simulate(None, 5, 50, 1)
    o = compare(f, f, "ascvd")
    assert o.arr["median"] == 0 and o.nnt is None and "undefined" in o.nnt_note


def test_unpaired_comparison_rejected():
    model = get_model("fhirtwin-mechanistic").fit(patient())
    with pytest.raises(ValueError):
        compare(model.simulate(None, 5, 50, 1), model.simulate(None, 5, 50, 2), "ascvd")


def _plain(**overrides):
    from fhirtwin.sim.inputs import PatientInputs

    base = dict(patient_id="p", sex="female", age_years=40.0, total_cholesterol_mg_dl=180.0,
                hdl_cholesterol_mg_dl=60.0, ldl_cholesterol_mg_dl=100.0, systolic_bp_mm_hg=112.0,
                egfr_ml_min_1_73m2=105.0, bmi_kg_m2=23.0, diabetes=False, current_smoker=False,
                on_bp_treatment=False, on_statin=False)
    base.update(overrides)
    return PatientInputs(**base)


def test_a_healthy_low_risk_patient_gets_no_drug():
    model = get_model("fhirtwin-mechanistic").fit(_plain())
    result = plan(model, draws=200, seed=1)
    assert result.options == ()
    assert result.notes[0].startswith("No drug indicated") and "low" in result.notes[0]
    assert any(e.candidate == "statin" and e.reason.startswith("not indicated") for e in result.excluded)
    assert result.ldl_goal_mg_dl is None


def test_borderline_risk_statin_is_a_shared_decision_not_a_ranked_option():
    # a 60-year-old man whose PREVENT-ASCVD falls in 3-5 %
    model = get_model("fhirtwin-mechanistic").fit(_plain(sex="male", age_years=60.0, total_cholesterol_mg_dl=200.0,
                                                         hdl_cholesterol_mg_dl=50.0, systolic_bp_mm_hg=125.0))
    ascvd = model.anchors_.published["prevent_10y_ascvd"]
    assert 0.03 <= ascvd < 0.05
    result = plan(model, draws=200, seed=1)
    assert not any(i.kind == "statin" for o in result.options for i in o.scenario.interventions)
    assert any(e.candidate == "statin" and e.reason.startswith("consider") for e in result.excluded)


def test_diabetic_kidney_disease_ranks_the_sglt2_inhibitor_on_kidney_and_heart_failure_benefit():
    from fhirtwin.sim.inputs import PatientInputs

    p = PatientInputs(patient_id="dkd", sex="male", age_years=64.0, total_cholesterol_mg_dl=190.0,
                      hdl_cholesterol_mg_dl=42.0, ldl_cholesterol_mg_dl=105.0, systolic_bp_mm_hg=128.0,
                      egfr_ml_min_1_73m2=40.0, bmi_kg_m2=31.0, diabetes=True, current_smoker=False,
                      on_bp_treatment=True, on_statin=True, statin_intensity="high", statin_agent="atorvastatin",
                      statin_daily_dose_mg=40.0, hba1c_percent=7.8, uacr_mg_g=450.0)
    result = plan(get_model("fhirtwin-mechanistic").fit(p), draws=300, seed=2)
    sglt2 = next(o for o in result.options if [i.kind for i in o.scenario.interventions] == ["sglt2i"])
    assert sglt2.arr_by_outcome["kidney_failure"] > 0 and sglt2.arr_by_outcome["heart_failure"] > 0
    singles = [o for o in result.options if len(o.scenario.interventions) == 1]
    assert singles[0] is sglt2  # the class 1 indication is not ranked last


def test_statin_indications_follow_the_literal_thresholds():
    from fhirtwin.sim.guidelines import indications

    def statin(ascvd: float, **kw):
        found = indications(_plain(**kw), {"prevent_10y_ascvd": ascvd, "prevent_10y_total_cvd": ascvd * 1.6})
        return found["statin"].status, found["statin"].intensities

    assert statin(0.029) == ("not-indicated", ())
    assert statin(0.03)[0] == "consider" and statin(0.049)[0] == "consider"
    assert statin(0.05) == ("indicated", ("moderate", "high"))
    assert statin(0.10) == ("indicated", ("high",))
    assert statin(0.01, ldl_cholesterol_mg_dl=190.0) == ("indicated", ("high",))
    # diabetes 40-75: at least moderate, also from a low-intensity statin; not again from a moderate one
    assert statin(0.01, diabetes=True, age_years=50.0) == ("indicated", ("moderate", "high"))
    assert statin(0.01, diabetes=True, age_years=50.0, on_statin=True, statin_intensity="low")[0] == "indicated"
    assert statin(0.01, diabetes=True, age_years=50.0, on_statin=True, statin_intensity="moderate",
                  ldl_cholesterol_mg_dl=80.0)[0] == "not-indicated"
    # above the LDL-C goal (< 100 mg/dL at intermediate risk, < 70 at high) on a moderate statin: intensify
    assert statin(0.061, on_statin=True, statin_intensity="moderate", ldl_cholesterol_mg_dl=140.0) == \
        ("indicated", ("high",))
    assert statin(0.12, on_statin=True, statin_intensity="moderate", ldl_cholesterol_mg_dl=75.0) == \
        ("indicated", ("high",))


def test_indicated_blood_pressure_treatment_stays_on_the_plan_whatever_the_modelled_net_benefit():
    # stage 2 hypertension (2025 AHA/ACC: drug treatment for everyone at >= 140 mmHg) at low CVD risk
    model = get_model("fhirtwin-mechanistic").fit(_plain(sex="female", age_years=55.0, systolic_bp_mm_hg=150.0))
    result = plan(model, draws=200, seed=1)
    bp = [o for o in result.options if [i.kind for i in o.scenario.interventions] == ["bp_lowering"]]
    assert len(bp) == 1
    assert not any(n.startswith("No drug indicated") for n in result.notes)
    if bp[0].net_benefit["median"] <= 0:
        assert "weigh with the patient" in bp[0].nnt_note


def test_severe_hypercholesterolaemia_above_goal_on_a_high_intensity_statin_gets_ezetimibe():
    from fhirtwin.sim.guidelines import indications

    p = _plain(ldl_cholesterol_mg_dl=195.0, total_cholesterol_mg_dl=270.0, on_statin=True, statin_intensity="high")
    found = indications(p, {"prevent_10y_ascvd": 0.01, "prevent_10y_total_cvd": 0.02}, statin_room=False)
    assert found["ezetimibe"].status == "indicated"


def test_kdigo_suggestion_without_albuminuria_is_not_a_ranked_indication():
    from fhirtwin.sim.guidelines import indications

    p = _plain(egfr_ml_min_1_73m2=38.0, ckd=True, uacr_mg_g=20.0)
    found = indications(p, {"prevent_10y_ascvd": 0.01, "prevent_10y_total_cvd": 0.02})
    assert found["sglt2i"].status == "consider"
