"""Markers beyond PREVENT: no change without them, the published effect with them, one driver per scale.

Truths used: the published numbers themselves (Lp(a) HR 1.11, 95% CI 1.10-1.12 per 50 nmol/L, Patel 2021;
coronary share of first ASCVD events 192/338 = 0.57, Muntner 2014; the Lp(a) molar/mass factor 2.4, Trinder
2021), the MESA ratio (checked against a second transcription in test_mesa.py), PREVENT's own SDI model, and
the published population distributions of each marker, sampled here with this file's own numpy code (not the
engine's quadrature): the engine's multiplier must average 1 over them (mean-preserving over the anchor's
population).
"""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.adapters import build_twin
from fhirtwin.sim import get_model, inputs_from_state
from fhirtwin.sim.components import component_names
from fhirtwin.sim.dynamics import month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import STREAM_NAMES, draw_parameters
from fhirtwin.sim.equations import coronary_calcium_ratio, prevent_risk
from fhirtwin.sim.hazards import hazard_paths
from fhirtwin.sim.interventions import BASELINE
from fhirtwin.sim.modifiers import active_modifiers, ascvd_risk_with, reference_level
from fhirtwin.twin import Demographics, Evidence, Scale, SourceRef, TwinState, get_variable

#: These tests check each marker's effect, so every optional component is on (their defaults are governance's).
ALL = component_names()


def _model(name):
    return get_model(name, components=ALL)


CORONARY_SHARE = 0.57  # REGARDS: 192 of 338 first hard ASCVD events were coronary (Muntner P et al., JAMA 2014)
WHITE_MAN = dict(race="white")


def _hazards(p, model="fhirtwin-equations", n=40, seed=1):
    m = _model(model).fit(p)
    t = month_grid(10.0)
    draws = draw_parameters(p, m.posteriors_, n, seed, 10.0, uacr_quantiles=m.anchors_.kidney.shape[0])
    traj = simulate_trajectories(p, m.posteriors_, draws, BASELINE, t, dynamic=m.dynamic)
    return hazard_paths(p, m.anchors_, traj, draws, BASELINE, dynamic=m.dynamic), draws, m


def test_without_markers_nothing_is_added_and_old_draws_keep_their_streams():
    plain, with_lpa = patient(**WHITE_MAN), patient(**WHITE_MAN, lpa_nmol_l=150.0)
    m = _model("fhirtwin-mechanistic").fit(plain)
    assert m.anchors_.modifiers == () and "modifiers" not in m.anchors_.method
    a = draw_parameters(plain, m.posteriors_, 64, 7, 10.0)
    b = draw_parameters(with_lpa, m.posteriors_, 64, 7, 10.0)
    assert a.modifiers == {} and set(b.modifiers) == {"lipoprotein_a:coronary", "lipoprotein_a:stroke"}
    for name in a.ratios:
        np.testing.assert_array_equal(a.ratios[name], b.ratios[name])
    np.testing.assert_array_equal(a.quit_probability, b.quit_probability)
    first_new = min(i for i, s in enumerate(STREAM_NAMES) if s.startswith("modifier:"))
    assert STREAM_NAMES.index("quit_probability") < first_new


#: The published population distributions, transcribed here independently of modifiers.json: a sampler each.
def _lognormal(median, sd_log):
    return lambda rng, n: median * np.exp(sd_log * rng.standard_normal(n))


def _activity(rng, n):  # NHIS: 32.4 % inactive (2010), 43.5 % >= 150 min/week (2008), uniform in between
    u = rng.random(n)
    return np.where(u < 0.324, 0.0, np.where(u < 0.324 + 0.435, 150.0, rng.uniform(0.0, 150.0, n)))


Z75, Z975 = 0.6744897501960817, 1.959963984540054
MARKERS = {  # name: (variable, sampler, f, clamp, {component: (HR, per)}, acts below, sex)
    "lipoprotein_a": ("lpa_nmol_l", _lognormal(19.6, math.log(74.8 / 7.6) / (2 * Z75)), lambda x: x, (0.0, 400.0),
                      {"coronary": (1.11, 50.0), "stroke": (1.11, 50.0)}, None, "male"),  # UK Biobank, Patel 2021
    "hscrp": ("hscrp_mg_l", _lognormal(2.1, math.log(3.0)), np.log, (0.1, 10.0),  # NHANES median, ERFC SD
              {"coronary": (1.37, math.log(3.0)), "stroke": (1.27, math.log(3.0))}, 10.0, "male"),
    "physical_activity": ("exercise_min_per_week", _activity, lambda x: x, (0.0, 150.0),
                          {"coronary": (0.83, 150.0), "stroke": (0.83, 150.0)}, None, "male"),
    "pm25": ("pm25_ug_m3", lambda rng, n: 12.6 + 2.8 * rng.standard_normal(n), lambda x: x, (0.0, 40.0),  # CPS-II
             {"coronary": (1.08, 10.0), "stroke": (1.13, 10.0)}, None, "male"),
    "nt_probnp_female": ("nt_probnp_pg_ml", _lognormal(62.0, math.log(299.0 / 66.0) / Z975), np.log, (10.0, 1000.0),
                         {"heart_failure": (1.95, 1.0)}, None, "female"),  # ARIC median, Generation Scotland spread
    "nt_probnp_male": ("nt_probnp_pg_ml", _lognormal(36.0, math.log(195.0 / 38.0) / Z975), np.log, (10.0, 1000.0),
                       {"heart_failure": (1.95, 1.0)}, None, "male"),
}


def _effects(variable, value, sex):
    (m,) = active_modifiers(patient(**WHITE_MAN, sex=sex, **{variable: value}))
    return m


@pytest.mark.parametrize("marker", sorted(MARKERS))
def test_every_multiplier_averages_one_over_its_population_at_the_point_and_per_draw(marker):
    variable, sample, f, (lo, hi), effects, acts_below, sex = MARKERS[marker]
    x = sample(np.random.default_rng(11), 400_000)
    if acts_below is not None:
        x = x[x <= acts_below]  # above it the marker does not act at all (no multiplier)
    x0 = float(np.median(x))
    m = _effects(variable, x0, sex)
    assert {e.component for e in m.effects} == set(effects)
    for e in m.effects:
        hr, per = effects[e.component]
        assert e.value == hr
        for ratio in (e.ci95[0], hr, e.ci95[1]):  # the centring follows the drawn ratio
            log_at_x0 = float(e.log_multiplier(np.array([ratio]))[0])
            mult = np.exp(log_at_x0 + math.log(ratio) * (f(np.clip(x, lo, hi)) - f(np.clip(x0, lo, hi))) / per)
            se = mult.std() / math.sqrt(mult.size)
            assert mult.mean() == pytest.approx(1.0, abs=4 * se + 1e-4), (marker, e.component, ratio)


@pytest.mark.parametrize("marker", sorted(MARKERS))
def test_a_patient_at_the_shown_reference_gets_exactly_the_anchor(marker):
    variable, *_, sex = MARKERS[marker]
    name = marker.removesuffix("_female").removesuffix("_male")
    x_ref = reference_level(name, sex if name == "nt_probnp" else None)
    fitted = _model("fhirtwin-equations").fit(patient(**WHITE_MAN, sex=sex, **{variable: x_ref}))
    (m,) = fitted.anchors_.modifiers
    assert m.reference.startswith(f"{x_ref:.3g} ")
    if name == "nt_probnp":
        assert m.point_log("heart_failure") == pytest.approx(0.0, abs=1e-12)
    else:
        r = fitted.anchors_.published["prevent_10y_ascvd"]
        at = ascvd_risk_with(r, math.exp(m.point_log("coronary")), math.exp(m.point_log("stroke")), CORONARY_SHARE)
        assert at == pytest.approx(r, rel=1e-10)
    assert not any(d.factor == m.label for d in fitted.drivers_)  # no contribution at the reference


@pytest.mark.parametrize("marker,low,high", [("lipoprotein_a", 10.0, 200.0), ("hscrp", 0.5, 5.0),
                                             ("physical_activity", 200.0, 0.0), ("pm25", 6.0, 18.0),
                                             ("nt_probnp_male", 20.0, 300.0)])
def test_each_effect_keeps_its_direction_and_crosses_one_at_the_reference(marker, low, high):
    variable, *_, sex = MARKERS[marker]
    component = "heart_failure" if marker.startswith("nt_probnp") else "coronary"
    below, above = (_effects(variable, v, sex).point_log(component) for v in (low, high))
    assert below < 0.0 < above  # 'high' is the riskier level (no activity for physical activity)


def test_markers_move_the_forecast_and_a_population_typical_patient_stays_near_the_anchor():
    plain = _model("fhirtwin-mechanistic").fit(patient(**WHITE_MAN)).simulate(None, 10.0, 64, seed=5)
    typical = dict(lpa_nmol_l=reference_level("lipoprotein_a"), pm25_ug_m3=reference_level("pm25"))
    near = _model("fhirtwin-mechanistic").fit(patient(**WHITE_MAN, **typical)).simulate(None, 10.0, 64, seed=5)
    high = _model("fhirtwin-mechanistic").fit(patient(**WHITE_MAN, lpa_nmol_l=300.0, pm25_ug_m3=20.0)
                                              ).simulate(None, 10.0, 64, seed=5)
    base = plain.cif["ascvd"][:, -1].mean()
    assert near.cif["ascvd"][:, -1].mean() == pytest.approx(base, rel=0.01)  # per-draw centring: not bit-equal
    assert high.cif["ascvd"][:, -1].mean() > 1.1 * base
    assert "modifiers" in near.method and "modifiers" not in plain.method


def test_calcium_multiplies_only_the_coronary_part_by_the_mesa_ratio():
    base, _, _ = _hazards(patient(**WHITE_MAN))
    cac, _, _ = _hazards(patient(**WHITE_MAN, cac_agatston=400.0))
    ratio = coronary_calcium_ratio(sex="male", age_years=60.0, race="white", total_cholesterol_mg_dl=220.0,
                                   hdl_cholesterol_mg_dl=45.0, systolic_bp_mm_hg=145.0, on_lipid_lowering=0,
                                   on_bp_treatment=1, diabetes=1, current_smoker=1, family_history_mi=0,
                                   cac_agatston=400.0)
    np.testing.assert_allclose(cac["ascvd"] / base["ascvd"], CORONARY_SHARE * ratio + 1 - CORONARY_SHARE, rtol=1e-3)
    np.testing.assert_array_equal(cac["heart_failure"], base["heart_failure"])
    np.testing.assert_array_equal(cac["kidney_failure"], base["kidney_failure"])


def test_lpa_acts_with_the_published_effect_and_its_interval():
    base, _, _ = _hazards(patient(**WHITE_MAN, lpa_nmol_l=19.6), n=4000)  # the centring cancels in the ratio
    lpa, draws, _ = _hazards(patient(**WHITE_MAN, lpa_nmol_l=119.6), n=4000)  # two steps of 50 above 19.6
    hr = draws.modifiers["lipoprotein_a:coronary"]
    assert np.median(hr) == pytest.approx(1.11, abs=0.002)
    assert np.percentile(hr, [2.5, 97.5]) == pytest.approx([1.10, 1.12], abs=0.002)
    assert np.median(lpa["ascvd"][:, 0] / base["ascvd"][:, 0]) == pytest.approx(1.11**2, abs=0.003)
    np.testing.assert_array_equal(lpa["heart_failure"], base["heart_failure"])
    plain, _, _ = _hazards(patient(**WHITE_MAN), n=4000)
    np.testing.assert_array_equal(lpa["heart_failure"], plain["heart_failure"])


def test_lpa_in_mg_dl_uses_the_cited_factor_and_says_so():
    nmol = _model("fhirtwin-equations").fit(patient(lpa_nmol_l=120.0))
    mass = _model("fhirtwin-equations").fit(patient(lpa_mg_dl=50.0))
    assert mass.anchors_.modifiers[0].point_log("coronary") == pytest.approx(
        nmol.anchors_.modifiers[0].point_log("coronary"))
    caveats = mass.simulate(None, 10.0, 8, seed=0).caveats
    assert any("2.4" in c and "isoform" in c for c in caveats)
    both = _model("fhirtwin-equations").fit(patient(lpa_nmol_l=19.6, lpa_mg_dl=200.0))
    molar = _model("fhirtwin-equations").fit(patient(lpa_nmol_l=19.6))
    assert both.anchors_.modifiers[0].point_log("coronary") == molar.anchors_.modifiers[0].point_log("coronary")


def test_drivers_show_each_scale_and_calcium_zero_lowers_the_risk():
    m = _model("fhirtwin-equations").fit(patient(**WHITE_MAN, cac_agatston=0.0, hscrp_mg_l=6.0, pm25_ug_m3=19.0,
                                                    exercise_min_per_week=0.0))
    drivers = {d.factor: d for d in m.drivers_}
    assert {d.scale for d in m.drivers_} <= {s.value for s in Scale}
    r = m.anchors_.published["prevent_10y_ascvd"]
    cac = drivers["coronary artery calcium"]
    ratio = math.exp(m.anchors_.modifiers[[x.name for x in m.anchors_.modifiers].index("coronary_calcium")]
                     .point_log("coronary"))
    assert cac.scale == "organ" and cac.risk_at_reference == r
    assert cac.risk == pytest.approx(1 - (1 - r) ** (CORONARY_SHARE * ratio + 1 - CORONARY_SHARE), rel=1e-3)
    assert cac.contribution < 0
    assert drivers["high-sensitivity CRP"].scale == "cellular" and drivers["high-sensitivity CRP"].contribution > 0
    assert drivers["physical activity"].scale == "behavioral" and drivers["physical activity"].contribution > 0
    assert drivers["long-term PM2.5"].scale == "environmental"
    assert drivers["SBP"].scale == "organ" and "scale" in drivers["SBP"].to_json()


def test_acute_phase_crp_and_markers_without_a_checked_effect_do_not_act():
    m = _model("fhirtwin-equations").fit(patient(hscrp_mg_l=25.0, lvef_percent=45.0, steps_per_day=3000.0))
    assert m.anchors_.modifiers == ()
    caveats = " ".join(m.simulate(None, 10.0, 8, seed=0).caveats)
    assert "acute-phase" in caveats and "LVEF" in caveats and "steps per day" in caveats


def test_nt_probnp_moves_only_heart_failure_from_the_sex_specific_median():
    base, _, _ = _hazards(patient(**WHITE_MAN, nt_probnp_pg_ml=36.0), n=4000)  # men's median 36
    bnp, draws, m = _hazards(patient(**WHITE_MAN, nt_probnp_pg_ml=36.0 * math.e**2), n=4000)
    hr = draws.modifiers["nt_probnp:heart_failure"]
    assert np.percentile(hr, [2.5, 50, 97.5]) == pytest.approx([1.54, 1.95, 2.46], abs=0.02)  # Choi 2012, MESA
    assert np.median(bnp["heart_failure"][:, 0] / base["heart_failure"][:, 0]) == pytest.approx(1.95**2, rel=0.01)
    np.testing.assert_array_equal(bnp["ascvd"], base["ascvd"])
    (driver,) = [d for d in m.drivers_ if d.factor == "NT-proBNP"]
    assert driver.outcome == "heart_failure" and driver.scale == "organ" and driver.contribution > 0
    women, men = (_model("fhirtwin-equations").fit(patient(sex=s, nt_probnp_pg_ml=62.0)) for s in ("female", "male"))
    assert women.anchors_.modifiers[0].point_log("heart_failure") < 0.0 < men.anchors_.modifiers[0].point_log(
        "heart_failure")  # 62 pg/mL: below women's population-typical level, above men's


def test_sdi_makes_prevent_sdi_model_the_anchor():
    full = _model("fhirtwin-equations").fit(patient(sdi_decile=8))
    assert full.anchors_.prevent_model == "full"
    p = full.inputs_
    kw = dict(sex="male", total_cholesterol_mg_dl=p.total_cholesterol_mg_dl, hdl_cholesterol_mg_dl=45.0,
              systolic_bp_mm_hg=145.0, on_bp_treatment=1, on_statin=0, diabetes=1, current_smoker=1, bmi_kg_m2=30.0,
              egfr_ml_min_1_73m2=50.0, uacr_mg_g=100.0, hba1c_percent=7.5)
    expected = prevent_risk(outcome="ascvd", horizon_years=10, age_years=60.0, model="full", sdi_decile=8, **kw)
    missing = prevent_risk(outcome="ascvd", horizon_years=10, age_years=60.0, model="full", **kw)
    assert full.anchors_.published["prevent_10y_ascvd"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(missing, rel=1e-3)
    sdi_only = _model("fhirtwin-equations").fit(patient(sdi_decile=2, uacr_mg_g=None, hba1c_percent=None))
    assert sdi_only.anchors_.prevent_model == "sdi"
    assert any(d.factor == "area deprivation (SDI)" and d.scale == "environmental" for d in full.drivers_)


def _ev(variable, value, when, rid):
    var = get_variable(variable)
    return Evidence(variable, var.scale, value, var.unit, when, SourceRef("Observation", rid, "1"), "final")


def test_the_twin_reads_every_marker_into_the_inputs():
    state = TwinState("p1", date(2026, 6, 30), Demographics(sex="male", birth_date=date(1962, 1, 1)))
    state.extend([
        _ev("total_cholesterol_mg_dl", 210.0, date(2026, 1, 10), "tc"),
        _ev("hdl_cholesterol_mg_dl", 50.0, date(2026, 1, 10), "hdl"),
        _ev("ldl_cholesterol_mg_dl", 130.0, date(2026, 1, 10), "ldl"),
        _ev("systolic_bp_mm_hg", 138.0, date(2026, 3, 1), "bp"),
        _ev("bmi_kg_m2", 27.0, date(2026, 3, 1), "bmi"), _ev("creatinine_mg_dl", 1.0, date(2026, 3, 1), "cr"),
        _ev("current_smoker", False, date(2026, 3, 1), "smk"),
        _ev("lpa_nmol_l", 180.0, date(2025, 1, 1), "lpa"), _ev("hscrp_mg_l", 3.5, date(2026, 3, 1), "crp"),
        _ev("cac_agatston", 120.0, date(2025, 5, 1), "cac"), _ev("exercise_min_per_week", 60.0, date(2026, 3, 1), "pa"),
        _ev("pm25_ug_m3", 11.0, date(2025, 12, 31), "pm"), _ev("sdi_decile", 7.0, date(2025, 12, 31), "sdi"),
        _ev("nt_probnp_pg_ml", 90.0, date(2026, 3, 1), "bnp"),
    ])
    inputs = inputs_from_state(state)
    assert (inputs.lpa_nmol_l, inputs.hscrp_mg_l, inputs.cac_agatston, inputs.exercise_min_per_week,
            inputs.pm25_ug_m3, inputs.sdi_decile, inputs.nt_probnp_pg_ml) == (180.0, 3.5, 120.0, 60.0, 11.0, 7, 90.0)
    assert inputs.lpa_mg_dl is None and inputs.lvef_percent is None
    assert "Observation/cac/_history/1" in inputs.sources and "Observation/sdi/_history/1" in inputs.sources


def _obs(rid, code, value, unit, system="http://loinc.org"):
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1"}, "status": "final",
            "code": {"coding": [{"system": system, "code": code}]}, "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-01T08:00:00Z",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


@pytest.mark.parametrize("code,value,unit,variable,expected,scale", [
    ("43583-4", 150.0, "nmol/L", "lpa_nmol_l", 150.0, Scale.TISSUE),
    ("10835-7", 0.6, "g/L", "lpa_mg_dl", 60.0, Scale.TISSUE),
    ("30522-7", 0.35, "mg/dL", "hscrp_mg_l", 3.5, Scale.CELLULAR),
    ("33762-6", 250.0, "ng/L", "nt_probnp_pg_ml", 250.0, Scale.ORGAN),
    ("10230-1", 55.0, "%", "lvef_percent", 55.0, Scale.ORGAN),
    ("41950-7", 8000.0, "{steps}/d", "steps_per_day", 8000.0, Scale.BEHAVIORAL),
])
def test_adapters_map_the_marker_codes_and_units(code, value, unit, variable, expected, scale):
    state = build_twin("p1", [_obs("o", code, value, unit)], date(2025, 1, 1))
    ev = state.latest(variable)
    assert ev.value == pytest.approx(expected) and ev.scale is scale


def test_fhirtwin_coded_calcium_and_sdi_are_read():
    fhirtwin = "https://fhirtwin.org/CodeSystem/fhirtwin"
    state = build_twin("p1", [_obs("c", "coronary-artery-calcium-agatston", 85.0, "{Agatston}", fhirtwin),
                              _obs("s", "sdi-decile", 9, "{decile}", fhirtwin)], date(2025, 1, 1))
    assert state.latest("cac_agatston").value == 85.0 and state.latest("cac_agatston").scale is Scale.ORGAN
    assert state.latest("sdi_decile").value == 9 and state.latest("sdi_decile").scale is Scale.ENVIRONMENTAL
