"""CKD-EPI 2021 race-free creatinine equation for estimated GFR."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import SEX_CODES, as_category, as_float, check_range, finish, is_scalar_call, load_data

_EQ = "egfr_ckd_epi_2021"
_FILE = "ckd_epi_2021.json"


def egfr_ckd_epi_2021(*, sex: Any, age_years: Any, serum_creatinine_mg_dl: Any) -> float | np.ndarray:
    """eGFR in mL/min/1.73 m² from IDMS-standardised serum creatinine (Inker 2021, no race term).

    The race-free 2021 equation is the one PREVENT and current KDIGO/NKF guidance expect. Creatinine in
    µmol/L must be divided by 88.4 first. Adults only: age 18-100 and creatinine 0.1-30 mg/dL are
    enforced as plausibility bounds (OutOfRangeError); the paper itself gives no hard limits, so there
    is no clip option. Accepts numpy arrays (broadcast); returns a float for scalar input.
    """
    scalar = is_scalar_call(sex, age_years, serum_creatinine_mg_dl)
    data = load_data(_FILE)
    rng = data["ranges"]
    sex_c = as_category(_EQ, "sex", sex, SEX_CODES)
    age = check_range(_EQ, "age_years", as_float(_EQ, "age_years", age_years), rng["age_years"], False)
    scr = check_range(
        _EQ, "serum_creatinine_mg_dl", as_float(_EQ, "serum_creatinine_mg_dl", serum_creatinine_mg_dl),
        rng["serum_creatinine_mg_dl"], False,
    )
    sex_c, age, scr = np.broadcast_arrays(sex_c, age, scr)
    params = [data["sex"]["female"], data["sex"]["male"]]
    kappa = np.array([p["kappa"] for p in params])[sex_c]
    alpha = np.array([p["alpha"] for p in params])[sex_c]
    factor = np.array([p["sex_factor"] for p in params])[sex_c]
    ratio = scr / kappa
    egfr = (
        data["a"]
        * np.minimum(ratio, 1.0) ** alpha
        * np.maximum(ratio, 1.0) ** data["b"]
        * data["c"] ** age
        * factor
    )
    return finish(egfr, scalar)
