"""MESA 2015 10-year coronary heart disease risk, with and without coronary artery calcium (CAC).

Why it is here: CAC is the one organ-scale measurement with a published equation that re-estimates every
conventional coefficient jointly with it. The ratio of the two MESA models' cumulative hazards at the
same risk factors is therefore the information CAC adds beyond those factors (``coronary_calcium_ratio``),
which is how the twin lets CAC act on the coronary part of its PREVENT-anchored hazard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import SEX_CODES, as_category, as_flag, as_float, check_range, finish, is_scalar_call, load_data

_EQ = "mesa_chd_10y"
_FILE = "mesa_chd_2015.json"
RACES: dict[str, int] = {"white": 0, "chinese": 1, "black": 2, "hispanic": 3}


def _linear_predictor(model: str, *, sex: Any, age_years: Any, race: Any, total_cholesterol_mg_dl: Any,
                      hdl_cholesterol_mg_dl: Any, systolic_bp_mm_hg: Any, on_lipid_lowering: Any,
                      on_bp_treatment: Any, diabetes: Any, current_smoker: Any, family_history_mi: Any,
                      cac_agatston: Any, clip: bool) -> np.ndarray:
    data = load_data(_FILE)
    rng = data["ranges"]

    def num(name: str, value: Any) -> np.ndarray:
        return check_range(_EQ, name, as_float(_EQ, name, value), rng[name], clip)

    race_code = as_category(_EQ, "race", race, RACES)
    x = {
        "age": num("age_years", age_years),
        "male": as_category(_EQ, "sex", sex, SEX_CODES).astype(float),
        "race_chinese": (race_code == RACES["chinese"]).astype(float),
        "race_black": (race_code == RACES["black"]).astype(float),
        "race_hispanic": (race_code == RACES["hispanic"]).astype(float),
        "diabetes": as_flag(_EQ, "diabetes", diabetes),
        "current_smoker": as_flag(_EQ, "current_smoker", current_smoker),
        "total_cholesterol": num("total_cholesterol_mg_dl", total_cholesterol_mg_dl),
        "hdl_cholesterol": num("hdl_cholesterol_mg_dl", hdl_cholesterol_mg_dl),
        "lipid_lowering": as_flag(_EQ, "on_lipid_lowering", on_lipid_lowering),
        "systolic_bp": num("systolic_bp_mm_hg", systolic_bp_mm_hg),
        "bp_treatment": as_flag(_EQ, "on_bp_treatment", on_bp_treatment),
        "family_history_mi": as_flag(_EQ, "family_history_mi", family_history_mi),
    }
    coef = data["models"][model]["coef"]
    if model == "with_cac":
        x["ln_cac_plus_1"] = np.log1p(num("cac_agatston", cac_agatston))
    lp: np.ndarray = sum((coef[name] * value for name, value in x.items()), np.zeros(()))  # broadcasts
    return lp


def mesa_chd_10y(
    *,
    sex: Any,
    age_years: Any,
    race: Any,
    total_cholesterol_mg_dl: Any,
    hdl_cholesterol_mg_dl: Any,
    systolic_bp_mm_hg: Any,
    on_lipid_lowering: Any,
    on_bp_treatment: Any,
    diabetes: Any,
    current_smoker: Any,
    family_history_mi: Any,
    cac_agatston: Any = None,
    clip: bool = False,
) -> float | np.ndarray:
    """10-year hard-CHD risk (fraction) by MESA (McClelland 2015): with CAC when ``cac_agatston`` is given.

    ``race`` is one of MESA's four groups: white, chinese, black, hispanic (others raise: the caller
    decides and flags a mapping). Age 45-85 (OutOfRangeError unless ``clip=True``); CAC in Agatston
    units (0 allowed). Accepts numpy arrays (broadcast); returns a float for scalar input.
    """
    model = "without_cac" if cac_agatston is None else "with_cac"
    scalar = is_scalar_call(sex, age_years, race, total_cholesterol_mg_dl, hdl_cholesterol_mg_dl,
                            systolic_bp_mm_hg, on_lipid_lowering, on_bp_treatment, diabetes, current_smoker,
                            family_history_mi, 0 if cac_agatston is None else cac_agatston)
    lp = _linear_predictor(
        model, sex=sex, age_years=age_years, race=race, total_cholesterol_mg_dl=total_cholesterol_mg_dl,
        hdl_cholesterol_mg_dl=hdl_cholesterol_mg_dl, systolic_bp_mm_hg=systolic_bp_mm_hg,
        on_lipid_lowering=on_lipid_lowering, on_bp_treatment=on_bp_treatment, diabetes=diabetes,
        current_smoker=current_smoker, family_history_mi=family_history_mi, cac_agatston=cac_agatston, clip=clip,
    )
    s0 = load_data(_FILE)["models"][model]["s0"]
    return finish(1.0 - s0 ** np.exp(lp), scalar)


def coronary_calcium_ratio(**kwargs: Any) -> float | np.ndarray:
    """Cumulative-hazard ratio of MESA with CAC to MESA without CAC at the same risk factors.

    Takes the arguments of :func:`mesa_chd_10y` (``cac_agatston`` required). Both are Cox models, so
    -ln(1 - risk) is each model's 10-year cumulative hazard; their ratio is what CAC adds.
    """
    if kwargs.get("cac_agatston") is None:
        raise TypeError("coronary_calcium_ratio needs cac_agatston")
    without = {k: v for k, v in kwargs.items() if k != "cac_agatston"}
    with_cac = np.asarray(mesa_chd_10y(**kwargs), dtype=float)
    base = np.asarray(mesa_chd_10y(**without), dtype=float)
    ratio = np.log1p(-with_cac) / np.log1p(-base)
    return finish(ratio, is_scalar_call(*kwargs.values()))
