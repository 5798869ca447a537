"""Markers beyond PREVENT: no change without them, the published effect with them, one driver per scale.

Truths used: the published numbers themselves (Lp(a) HR 1.11, 95% CI 1.10-1.12 per 50 nmol/L, Patel 2021;
coronary share of first ASCVD events 192/338 = 0.57, Muntner 2014; the Lp(a) molar/mass factor 2.4, Trinder
2021), the MESA ratio (checked against a second transcription in test_mesa.py), and PREVENT's own SDI model.
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


def test_markers_at_their_reference_level_give_the_bit_identical_forecast():
    at_reference = dict(lpa_nmol_l=19.6, hscrp_mg_l=2.0, exercise_min_per_week=200.0, pm25_ug_m3=9.0)
    a = _model("fhirtwin-mechanistic").fit(patient(**WHITE_MAN)).simulate(None, 10.0, 64, seed=5)
    b = _model("fhirtwin-mechanistic").fit(patient(**WHITE_MAN, **at_reference)).simulate(None, 10.0, 64, seed=5)
    for outcome in a.cif:
        np.testing.assert_array_equal(a.cif[outcome], b.cif[outcome])
    assert "modifiers" in b.method and "modifiers" not in a.method


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
    base, _, _ = _hazards(patient(**WHITE_MAN), n=4000)
    lpa, draws, _ = _hazards(patient(**WHITE_MAN, lpa_nmol_l=119.6), n=4000)  # two steps of 50 above 19.6
    hr = draws.modifiers["lipoprotein_a:coronary"]
    assert np.median(hr) == pytest.approx(1.11, abs=0.002)
    assert np.percentile(hr, [2.5, 97.5]) == pytest.approx([1.10, 1.12], abs=0.002)
    assert np.median(lpa["ascvd"][:, 0] / base["ascvd"][:, 0]) == pytest.approx(1.11**2, abs=0.003)
    np.testing.assert_array_equal(lpa["heart_failure"], base["heart_failure"])


def test_lpa_in_mg_dl_uses_the_cited_factor_and_says_so():
    nmol = _model("fhirtwin-equations").fit(patient(lpa_nmol_l=120.0))
    mass = _model("fhirtwin-equations").fit(patient(lpa_mg_dl=50.0))
    assert mass.anchors_.modifiers[0].point_log("coronary") == pytest.approx(
        nmol.anchors_.modifiers[0].point_log("coronary"))
    caveats = mass.simulate(None, 10.0, 8, seed=0).caveats
    assert any("2.4" in c and "isoform" in c for c in caveats)
    both = _model("fhirtwin-equations").fit(patient(lpa_nmol_l=19.6, lpa_mg_dl=200.0))
    assert both.anchors_.modifiers[0].point_log("coronary") == 0.0  # the molar result wins


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
    base, _, _ = _hazards(patient(**WHITE_MAN), n=4000)
    bnp, draws, m = _hazards(patient(**WHITE_MAN, nt_probnp_pg_ml=36.0 * math.e**2), n=4000)  # men's median 36
    hr = draws.modifiers["nt_probnp:heart_failure"]
    assert np.percentile(hr, [2.5, 50, 97.5]) == pytest.approx([1.54, 1.95, 2.46], abs=0.02)  # Choi 2012, MESA
    assert np.median(bnp["heart_failure"][:, 0] / base["heart_failure"][:, 0]) == pytest.approx(1.95**2, rel=0.01)
    np.testing.assert_array_equal(bnp["ascvd"], base["ascvd"])
    (driver,) = [d for d in m.drivers_ if d.factor == "NT-proBNP"]
    assert driver.outcome == "heart_failure" and driver.scale == "organ" and driver.contribution > 0
    at_median = _model("fhirtwin-equations").fit(patient(sex="female", nt_probnp_pg_ml=62.0))
    assert at_median.anchors_.modifiers[0].point_log("heart_failure") == 0.0  # women's median 62


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
