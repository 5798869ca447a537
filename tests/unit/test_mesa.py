"""MESA 2015 CHD risk with and without coronary calcium against an independent implementation and source.

Truth: (1) the CVrisk R package's own test values (vcastro/CVrisk, tests/testthat/test-chd_10y_mesa*.R:
8.61 % without CAC, 3.06 % with CAC 0, for a 70-year-old Hispanic man, SBP 130 treated, HDL 50, TC 190);
(2) a second transcription of McClelland 2015 Table 2, the ebmcalc.com MESA formula, typed below from that
page (not from fhirtwin's data file), evaluated for patients covering every coefficient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fhirtwin.sim.equations import (
    OutOfRangeError,
    UnknownCategoryError,
    coronary_calcium_ratio,
    mesa_chd_10y,
    method_of,
)

CVRISK_PATIENT = dict(sex="male", age_years=70, race="hispanic", systolic_bp_mm_hg=130, hdl_cholesterol_mg_dl=50,
                      total_cholesterol_mg_dl=190, on_bp_treatment=1, on_lipid_lowering=0, current_smoker=0,
                      diabetes=0, family_history_mi=0)


def test_reproduces_cvrisk_test_values():
    assert round(100 * mesa_chd_10y(**CVRISK_PATIENT), 2) == 8.61
    assert round(100 * mesa_chd_10y(**CVRISK_PATIENT, cac_agatston=0), 2) == 3.06


def _ebmcalc(p: dict, cac: float | None) -> float:
    """ebmcalc.com/MESA.htm: Race 1 = African American, 2 = Chinese, 3 = Hispanic; Sex 1 = male."""
    race = {"black": 1, "chinese": 2, "hispanic": 3}.get(p["race"], 0)
    sex = 1 if p["sex"] == "male" else 0
    if cac is None:
        terms = (p["age_years"] * 0.0455 + sex * 0.7496 + (race == 1) * -0.2111 + (race == 2) * -0.5055
                 + (race == 3) * -0.19 + p["diabetes"] * 0.5168 + p["current_smoker"] * 0.4732
                 + p["total_cholesterol_mg_dl"] * 0.0053 - p["hdl_cholesterol_mg_dl"] * 0.0140
                 + p["on_lipid_lowering"] * 0.2473 + p["systolic_bp_mm_hg"] * 0.0085 + p["on_bp_treatment"] * 0.3381
                 + p["family_history_mi"] * 0.4522)
        return 1 - 0.99963 ** math.exp(terms)
    terms = (p["age_years"] * 0.0172 + sex * 0.4079 + (race == 1) * 0.0353 + (race == 2) * -0.3475
             + (race == 3) * -0.0222 + p["diabetes"] * 0.3892 + p["current_smoker"] * 0.3717
             + p["total_cholesterol_mg_dl"] * 0.0043 - p["hdl_cholesterol_mg_dl"] * 0.0114
             + p["on_lipid_lowering"] * 0.1206 + p["systolic_bp_mm_hg"] * 0.0066 + p["on_bp_treatment"] * 0.2278
             + p["family_history_mi"] * 0.3239 + math.log(cac + 1) * 0.2743)
    return 1 - 0.99833 ** math.exp(terms)


@pytest.mark.parametrize("patient,cac", [
    (dict(sex="female", age_years=52, race="chinese", systolic_bp_mm_hg=118, hdl_cholesterol_mg_dl=62,
          total_cholesterol_mg_dl=205, on_bp_treatment=0, on_lipid_lowering=1, current_smoker=1, diabetes=0,
          family_history_mi=1), 35.0),
    (dict(sex="male", age_years=63, race="black", systolic_bp_mm_hg=152, hdl_cholesterol_mg_dl=38,
          total_cholesterol_mg_dl=244, on_bp_treatment=1, on_lipid_lowering=0, current_smoker=0, diabetes=1,
          family_history_mi=0), 420.0),
    (dict(sex="female", age_years=78, race="white", systolic_bp_mm_hg=140, hdl_cholesterol_mg_dl=55,
          total_cholesterol_mg_dl=180, on_bp_treatment=1, on_lipid_lowering=1, current_smoker=0, diabetes=1,
          family_history_mi=1), 0.0),
])
def test_agrees_with_a_second_transcription(patient, cac):
    assert mesa_chd_10y(**patient) == pytest.approx(_ebmcalc(patient, None), rel=1e-9)
    assert mesa_chd_10y(**patient, cac_agatston=cac) == pytest.approx(_ebmcalc(patient, cac), rel=1e-9)


def test_calcium_ratio_is_the_cumulative_hazard_ratio_and_rises_with_calcium():
    cacs = np.array([0.0, 1.0, 10.0, 100.0, 400.0, 1000.0])
    ratio = np.array([coronary_calcium_ratio(**CVRISK_PATIENT, cac_agatston=c) for c in cacs])
    with_cac = np.array([_ebmcalc(CVRISK_PATIENT, c) for c in cacs])
    without = _ebmcalc(CVRISK_PATIENT, None)
    np.testing.assert_allclose(ratio, np.log1p(-with_cac) / math.log1p(-without), rtol=1e-9)
    assert np.all(np.diff(ratio) > 0)
    assert ratio[0] < 0.5 < 1.0 < ratio[-2]  # the "power of zero" and a high score


def test_vectorised_and_typed_errors():
    risks = mesa_chd_10y(**{**CVRISK_PATIENT, "age_years": np.array([50.0, 60.0, 70.0])}, cac_agatston=10.0)
    assert isinstance(risks, np.ndarray) and np.all(np.diff(risks) > 0)
    with pytest.raises(OutOfRangeError):
        mesa_chd_10y(**{**CVRISK_PATIENT, "age_years": 40})
    assert mesa_chd_10y(**{**CVRISK_PATIENT, "age_years": 40}, clip=True) == pytest.approx(
        mesa_chd_10y(**{**CVRISK_PATIENT, "age_years": 45}))
    with pytest.raises(UnknownCategoryError):
        mesa_chd_10y(**{**CVRISK_PATIENT, "race": "asian"})
    with pytest.raises(TypeError):
        coronary_calcium_ratio(**CVRISK_PATIENT)


def test_method_identity_names_the_paper_and_both_variants():
    assert method_of("mesa_chd_10y")["citation"]["doi"] == "10.1016/j.jacc.2015.08.035"
    assert method_of("mesa_chd_10y", "without_cac")["variant"] == "without_cac"
