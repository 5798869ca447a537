"""inputs_from_state: the single bridge from TwinState, with sources and explicit missing data."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from fhirtwin.sim import InsufficientData, get_model, inputs_from_state
from fhirtwin.sim.equations import egfr_ckd_epi_2021
from fhirtwin.twin import Demographics, Evidence, SourceRef, TwinState, get_variable

REF = date(2026, 6, 30)


def ev(variable, value, when, rid, end=None):
    var = get_variable(variable)
    return Evidence(variable, var.scale, value, var.unit, when, SourceRef("Observation", rid, "1"), "final", end=end)


def state(drop=()):
    demo = Demographics(sex="female", birth_date=date(1966, 1, 1), source=SourceRef("Patient", "p1", "3"))
    s = TwinState("p1", REF, demo)
    items = [
        ev("total_cholesterol_mg_dl", 210.0, date(2026, 1, 10), "tc"),
        ev("hdl_cholesterol_mg_dl", 55.0, date(2026, 1, 10), "hdl"),
        ev("ldl_cholesterol_mg_dl", 135.0, date(2024, 1, 10), "ldl1"),
        ev("ldl_cholesterol_mg_dl", 130.0, date(2026, 1, 10), "ldl2"),
        ev("systolic_bp_mm_hg", 138.0, date(2026, 3, 1), "bp"),
        ev("bmi_kg_m2", 27.0, date(2026, 3, 1), "bmi"),
        ev("creatinine_mg_dl", 0.9, date(2023, 3, 1), "cr1"),
        ev("creatinine_mg_dl", 1.1, date(2026, 3, 1), "cr2"),
        ev("current_smoker", False, date(2026, 3, 1), "smk"),
        ev("diabetes", True, date(2020, 3, 1), "dm"),
        ev("hba1c_percent", 7.1, date(2026, 3, 1), "a1c"),
        ev("on_statin", True, date(2025, 6, 1), "statin"),
        ev("statin_intensity", "moderate", date(2025, 6, 1), "statin2"),
        ev("apol1_risk_alleles", 2.0, date(2025, 1, 1), "apol1"),
        ev("ldl_cholesterol_mg_dl", 90.0, date(2026, 12, 1), "future"),  # after as_of: never used
    ]
    s.extend(i for i in items if i.variable not in drop)
    return s


def test_reads_values_histories_and_sources():
    inp = inputs_from_state(state())
    assert inp.sex == "female" and 60 < inp.age_years < 61
    assert inp.ldl_cholesterol_mg_dl == 130.0
    assert inp.history_ldl_cholesterol_mg_dl.shape == (2, 2)
    assert np.all(inp.history_ldl_cholesterol_mg_dl[:, 0] <= 0)
    expected = egfr_ckd_epi_2021(sex="female", age_years=inp.age_years - (REF - date(2026, 3, 1)).days / 365.25,
                                 serum_creatinine_mg_dl=1.1)
    assert inp.egfr_ml_min_1_73m2 == pytest.approx(expected, rel=1e-9)
    assert inp.history_egfr_ml_min_1_73m2.shape == (2, 2)
    assert inp.diabetes and not inp.current_smoker and inp.on_statin and inp.statin_intensity == "moderate"
    assert inp.statin_start_years == pytest.approx(-(REF - date(2025, 6, 1)).days / 365.25)
    assert inp.apol1_risk_alleles == 2 and inp.apol1_high_risk
    assert "Observation/cr2/_history/1" in inp.sources and "Patient/p1/_history/3" in inp.sources
    assert "Observation/future/_history/1" not in inp.sources
    assert inp.uacr_mg_g is None and inp.fh_variant is None
    assert any("on_bp_treatment=False" in d for d in inp.defaults_used)
    forecast = get_model("fhirtwin-mechanistic").fit(state()).simulate(None, 5, 50, 0)
    assert forecast.sources == inp.sources
    assert any("UACR" in c for c in forecast.caveats)


def test_missing_required_data_is_named_not_invented():
    with pytest.raises(InsufficientData) as err:
        inputs_from_state(state(drop=("systolic_bp_mm_hg", "creatinine_mg_dl", "current_smoker")))
    msg = str(err.value)
    assert "systolic_bp_mm_hg" in msg and "creatinine" in msg and "current_smoker" in msg


def test_one_missing_data_rule_for_diabetes():
    # one diagnostic HbA1c: yes, but recorded as unconfirmed (ADA asks for two)
    one = inputs_from_state(state(drop=("diabetes",)))
    assert one.diabetes and any("unconfirmed" in d for d in one.defaults_used)
    # HbA1c and fasting glucose of the same sample confirm each other
    same = state(drop=("diabetes",))
    same.add(ev("fasting_glucose_mg_dl", 140.0, date(2026, 3, 1), "fpg-same"))
    assert any("two diagnostic" in d for d in inputs_from_state(same).defaults_used)
    # below the thresholds, no diagnosis, no treatment: a recorded closed-world "no"
    normal = state(drop=("diabetes", "hba1c_percent"))
    normal.add(ev("hba1c_percent", 5.6, date(2026, 3, 1), "a1c-normal"))
    low = inputs_from_state(normal)
    assert not low.diabetes and any(d.startswith("diabetes=False") for d in low.defaults_used)
    # a second diagnostic result on another day (HbA1c or fasting glucose): yes, as a recorded rule
    two = state(drop=("diabetes",))
    two.add(ev("fasting_glucose_mg_dl", 131.0, date(2025, 9, 1), "fpg"))
    inp = inputs_from_state(two)
    assert inp.diabetes and any("two diagnostic" in d for d in inp.defaults_used)
    assert "Observation/fpg/_history/1" in inp.sources
    # insulin without a diagnosis: yes; metformin alone is not diabetes evidence
    treated = state(drop=("diabetes", "hba1c_percent"))
    treated.add(ev("on_diabetes_specific_treatment", True, date(2024, 1, 1), "ins"))
    assert inputs_from_state(treated).diabetes
    metformin = state(drop=("diabetes", "hba1c_percent"))
    metformin.add(ev("on_metformin", True, date(2024, 1, 1), "met"))
    assert not inputs_from_state(metformin).diabetes
    # a patient with lipids, BP, age, sex and smoking is never refused for lack of diabetes evidence
    nothing = inputs_from_state(state(drop=("diabetes", "hba1c_percent")))
    assert nothing.diabetes is False


def test_reported_egfr_that_disagrees_with_creatinine_is_recorded_and_not_used():
    s = state()
    s.add(ev("egfr_ml_min_1_73m2", 18.0, date(2026, 3, 1), "egfr-lab"))  # creatinine 1.1 gives ~58
    inp = inputs_from_state(s)
    assert inp.egfr_ml_min_1_73m2 > 50
    assert any("disagrees with the creatinine-derived" in d for d in inp.defaults_used)
    near = state()
    near.add(ev("egfr_ml_min_1_73m2", 55.0, date(2026, 3, 1), "egfr-close"))
    assert not any("disagrees" in d for d in inputs_from_state(near).defaults_used)


def test_gfr_in_ml_min_is_normalised_only_with_height_and_weight():
    s = state(drop=("creatinine_mg_dl",))
    s.add(ev("egfr_ml_min", 80.0, date(2026, 3, 1), "gfr-abs"))
    with pytest.raises(InsufficientData):  # no height and weight: not used (and no other kidney function)
        inputs_from_state(s)
    s.add(ev("height_cm", 160.0, date(2025, 3, 1), "h"))
    s.add(ev("weight_kg", 60.0, date(2026, 3, 1), "w"))
    inp = inputs_from_state(s)
    bsa = 0.007184 * 60.0**0.425 * 160.0**0.725  # DuBois & DuBois 1916
    assert inp.egfr_ml_min_1_73m2 == pytest.approx(80.0 * 1.73 / bsa)
