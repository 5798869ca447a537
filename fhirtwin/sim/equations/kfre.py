"""Kidney Failure Risk Equation (Tangri 2011/2016): 2- and 5-year risk of treated kidney failure."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import (
    SEX_CODES,
    EquationInputError,
    as_category,
    as_float,
    check_range,
    choice,
    finish,
    is_scalar_call,
    load_data,
)

_EQ = "kfre_risk"
_FILE = "kfre.json"
HORIZONS = (2, 5)
CALIBRATIONS = ("north_american", "non_north_american")
MODELS = ("4-variable", "8-variable")
_LABS = ("albumin_g_dl", "phosphorus_mg_dl", "bicarbonate_meq_l", "calcium_mg_dl")


def kfre_risk(
    *,
    horizon_years: int,
    sex: Any,
    age_years: Any,
    egfr_ml_min_1_73m2: Any,
    uacr_mg_g: Any,
    calibration: str = "north_american",
    model: str = "4-variable",
    clip: bool = False,
    albumin_g_dl: Any = None,
    phosphorus_mg_dl: Any = None,
    bicarbonate_meq_l: Any = None,
    calcium_mg_dl: Any = None,
) -> float | np.ndarray:
    """Risk (fraction) of dialysis or transplant within 2 or 5 years for adults with CKD G3-G5.

    ``calibration`` picks the baseline survival: the original North American one or the Tangri 2016
    non-North-American recalibration. ``model="4-variable"`` (default) uses age, sex, eGFR and UACR
    (mg/g; mg/mmol x 8.84). ``model="8-variable"`` also needs albumin (g/dL), phosphorus (mg/dL),
    bicarbonate (mEq/L) and calcium (mg/dL); its coefficients rest on one secondary source
    (confidence C in the project reference) and should be treated as provisional.

    eGFR must be 10-60 (the model was built in CKD G3-G5); other bounds are plausibility bounds (see
    ``kfre.json``). Out-of-range values raise OutOfRangeError unless ``clip=True``. Broadcasts arrays.
    """
    choice(_EQ, "horizon_years", horizon_years, HORIZONS)
    choice(_EQ, "calibration", calibration, CALIBRATIONS)
    choice(_EQ, "model", model, MODELS)
    labs = dict(zip(_LABS, (albumin_g_dl, phosphorus_mg_dl, bicarbonate_meq_l, calcium_mg_dl), strict=True))
    given = [k for k, v in labs.items() if v is not None]
    if model == "4-variable" and given:
        raise EquationInputError(f"{_EQ}: {given} are only used by model='8-variable'")
    if model == "8-variable" and len(given) != len(_LABS):
        missing = [k for k in _LABS if k not in given]
        raise EquationInputError(f"{_EQ}: model='8-variable' needs {missing}")

    scalar = is_scalar_call(sex, age_years, egfr_ml_min_1_73m2, uacr_mg_g, *labs.values())
    data = load_data(_FILE)
    rng = data["ranges"]
    block = data["models"][model]

    def num(name: str, value: Any) -> np.ndarray:
        return check_range(_EQ, name, as_float(_EQ, name, value), rng[name], clip)

    male = as_category(_EQ, "sex", sex, SEX_CODES).astype(float)
    values = {
        "age_per_10y": num("age_years", age_years) / 10.0,
        "male": male,
        "egfr_per_5": num("egfr_ml_min_1_73m2", egfr_ml_min_1_73m2) / 5.0,
        "ln_uacr_mg_g": np.log(num("uacr_mg_g", uacr_mg_g)),
    }
    if model == "8-variable":
        values.update({k: num(k, v) for k, v in labs.items()})
    names = list(block["terms"])
    cols = np.broadcast_arrays(*(values[n] for n in names))
    coef = np.array([block["terms"][n]["coef"] for n in names])
    centre = np.array([block["terms"][n]["centre"] for n in names])
    lp = np.einsum("...k,k->...", np.stack(cols, axis=-1) - centre, coef)
    s0 = block["s0"][calibration][str(horizon_years)]
    risk = 1.0 - s0 ** np.exp(lp)
    return finish(risk, scalar)
