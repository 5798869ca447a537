"""2013 ACC/AHA Pooled Cohort Equations (PCE) for 10-year hard ASCVD risk."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import (
    SEX_CODES,
    as_category,
    as_flag,
    as_float,
    check_range,
    choice,
    finish,
    is_scalar_call,
    load_data,
)

_EQ = "pce_ascvd_10y"
_FILE = "pce_2013.json"
VARIANTS = ("spreadsheet", "table_A")

# The guideline gives equations for white and African-American adults only and suggests the white
# equations for everyone else; these spellings are accepted and mapped accordingly.
RACE_CODES: dict[str, int] = {
    "white": 0,
    "african_american": 1,
    "black": 1,
    "other": 0,
    "asian": 0,
    "hispanic": 0,
}

_TERMS = (
    "ln_age",
    "ln_age_sq",
    "ln_tc",
    "ln_age_ln_tc",
    "ln_hdl",
    "ln_age_ln_hdl",
    "ln_treated_sbp",
    "ln_age_ln_treated_sbp",
    "ln_untreated_sbp",
    "ln_age_ln_untreated_sbp",
    "smoker",
    "ln_age_smoker",
    "diabetes",
)


def _tables(variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficient matrix (group x term), mean sums and S10 per group, built once per variant."""
    cached = _CACHE.get(variant)
    if cached is None:
        data = load_data(_FILE)
        block = data["variants"][variant]
        groups = data["groups"]
        coef = np.array([[block["coefficients"][g].get(t, 0.0) for t in _TERMS] for g in groups])
        mean = np.array([block["mean_sum"][g] for g in groups])
        s10 = np.array([block["s10"][g] for g in groups])
        cached = _CACHE[variant] = (coef, mean, s10)
    return cached


_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def pce_ascvd_10y(
    *,
    sex: Any,
    race: Any,
    age_years: Any,
    total_cholesterol_mg_dl: Any,
    hdl_cholesterol_mg_dl: Any,
    systolic_bp_mm_hg: Any,
    on_bp_treatment: Any,
    current_smoker: Any,
    diabetes: Any,
    variant: str = "spreadsheet",
    clip: bool = False,
) -> float | np.ndarray:
    """10-year risk (fraction) of a first hard ASCVD event by the 2013 Pooled Cohort Equations.

    Goff et al. 2013 derived equations only for white and African-American adults. ``race`` must be
    ``"white"`` or ``"african_american"`` (alias ``"black"``); ``"other"``, ``"asian"`` and
    ``"hispanic"`` use the white equations, as the guideline suggests. That is a known limitation: the
    white equations can over- or underestimate risk in those groups. Any other race value raises.

    ``variant="spreadsheet"`` (default) uses the full-precision coefficients that reproduce the online
    calculators; ``"table_A"`` uses the values printed in the guideline's Table A (differences up to
    about 0.2 percentage points, mostly in African-American women). Validated ranges: age 40-79,
    TC 130-320 mg/dL, HDL-C 20-100 mg/dL, SBP 90-200 mmHg; outside them raise OutOfRangeError unless
    ``clip=True``. Accepts numpy arrays (broadcast together); returns a float for scalar input.
    """
    choice(_EQ, "variant", variant, VARIANTS)
    scalar = is_scalar_call(
        sex, race, age_years, total_cholesterol_mg_dl, hdl_cholesterol_mg_dl, systolic_bp_mm_hg,
        on_bp_treatment, current_smoker, diabetes,
    )
    ranges = load_data(_FILE)["ranges"]
    sex_c = as_category(_EQ, "sex", sex, SEX_CODES)
    race_c = as_category(_EQ, "race", race, RACE_CODES)
    age = check_range(_EQ, "age_years", as_float(_EQ, "age_years", age_years), ranges["age_years"], clip)
    tc = check_range(
        _EQ, "total_cholesterol_mg_dl", as_float(_EQ, "total_cholesterol_mg_dl", total_cholesterol_mg_dl),
        ranges["total_cholesterol_mg_dl"], clip,
    )
    hdl = check_range(
        _EQ, "hdl_cholesterol_mg_dl", as_float(_EQ, "hdl_cholesterol_mg_dl", hdl_cholesterol_mg_dl),
        ranges["hdl_cholesterol_mg_dl"], clip,
    )
    sbp = check_range(
        _EQ, "systolic_bp_mm_hg", as_float(_EQ, "systolic_bp_mm_hg", systolic_bp_mm_hg),
        ranges["systolic_bp_mm_hg"], clip,
    )
    treated = as_flag(_EQ, "on_bp_treatment", on_bp_treatment)
    smoker = as_flag(_EQ, "current_smoker", current_smoker)
    dm = as_flag(_EQ, "diabetes", diabetes)

    sex_c, race_c, age, tc, hdl, sbp, treated, smoker, dm = np.broadcast_arrays(
        sex_c, race_c, age, tc, hdl, sbp, treated, smoker, dm
    )
    # Group order in the data file: white female, AA female, white male, AA male.
    group = 2 * sex_c + race_c

    ln_age = np.log(age)
    ln_tc = np.log(tc)
    ln_hdl = np.log(hdl)
    ln_sbp = np.log(sbp)
    ln_tsbp = ln_sbp * treated
    ln_usbp = ln_sbp * (1.0 - treated)
    terms = np.stack(
        [
            ln_age,
            ln_age**2,
            ln_tc,
            ln_age * ln_tc,
            ln_hdl,
            ln_age * ln_hdl,
            ln_tsbp,
            ln_age * ln_tsbp,
            ln_usbp,
            ln_age * ln_usbp,
            smoker,
            ln_age * smoker,
            dm,
        ],
        axis=-1,
    )
    coef, mean, s10 = _tables(variant)
    total = np.einsum("...k,...k->...", terms, coef[group])
    risk = 1.0 - s10[group] ** np.exp(total - mean[group])
    return finish(risk, scalar)
