"""AHA PREVENT equations (Khan et al., Circulation 2024): 10- and 30-year total CVD, ASCVD and HF risk."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import (
    SEX_CODES,
    EquationInputError,
    as_category,
    as_flag,
    as_float,
    check_range,
    choice,
    finish,
    is_scalar_call,
    load_data,
)

_EQ = "prevent_risk"
_FILE = "prevent_2024.json"
OUTCOMES = ("total_cvd", "ascvd", "heart_failure")
HORIZONS = (10, 30)
MODELS = ("base", "uacr", "hba1c", "sdi", "full")
_USES = {
    "base": frozenset(),
    "uacr": frozenset({"uacr"}),
    "hba1c": frozenset({"hba1c"}),
    "sdi": frozenset({"sdi"}),
    "full": frozenset({"uacr", "hba1c", "sdi"}),
}

_CACHE: dict[tuple[str, int, str], tuple[tuple[str, ...], np.ndarray]] = {}


def _table(model: str, horizon: int, outcome: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Term names and a (sex x term) coefficient matrix for one equation, built once."""
    key = (model, horizon, outcome)
    cached = _CACHE.get(key)
    if cached is None:
        block = load_data(_FILE)["models"][f"{model}_{horizon}"]["coefficients"]
        names = tuple(sorted(set(block["female"][outcome]) | set(block["male"][outcome])))
        coef = np.array([[block[sex][outcome].get(t, 0.0) for t in names] for sex in ("female", "male")])
        cached = _CACHE[key] = (names, coef)
    return cached


def _optional(name: str, value: Any, bounds: list[float], clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Values and a 'missing' indicator for an optional input; None or NaN mean missing."""
    if value is None:
        return np.full((), float(bounds[0])), np.ones(())
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise EquationInputError(f"{_EQ}: {name}={value!r} is not numeric") from exc
    missing = np.isnan(arr)
    filled = np.where(missing, bounds[0], arr)
    filled = check_range(_EQ, name, filled, bounds, clip)
    return filled, missing.astype(float)


def prevent_risk(
    *,
    outcome: str,
    horizon_years: int,
    sex: Any,
    age_years: Any,
    total_cholesterol_mg_dl: Any,
    hdl_cholesterol_mg_dl: Any,
    systolic_bp_mm_hg: Any,
    on_bp_treatment: Any,
    on_statin: Any,
    diabetes: Any,
    current_smoker: Any,
    bmi_kg_m2: Any,
    egfr_ml_min_1_73m2: Any,
    model: str = "base",
    uacr_mg_g: Any = None,
    hba1c_percent: Any = None,
    sdi_decile: Any = None,
    clip: bool = False,
) -> float | np.ndarray:
    """Risk (fraction) of total CVD, ASCVD or heart failure over 10 or 30 years by AHA PREVENT.

    Race-free, sex-specific logistic equations of Khan 2024 (Supplemental Table S12). ``model`` picks
    the base equations or an add-on model (``"uacr"``, ``"hba1c"``, ``"sdi"``, ``"full"``); every
    add-on model re-estimates all coefficients. In an add-on model an optional input given as None
    (or NaN in an array) is handled as the paper does, by its "missing" indicator term; an optional
    input that the chosen model does not use raises rather than being silently ignored.

    The AHA web calculator treats missing SDI as decile 1-3 in the female ASCVD full model (noted in
    PooledCohort); this function follows the published equations (missing indicator) instead.

    ``egfr_ml_min_1_73m2`` should be CKD-EPI 2021. BMI enters only the heart-failure equations and is
    only range-checked there. Validated ranges (see ``prevent_2024.json``): age 30-79 (30-59 for the
    30-year horizon), TC 130-320, HDL-C 20-100, SBP 90-200, BMI 18.5-39.9, eGFR 15-140, UACR
    0.1-25000 mg/g, HbA1c 3-15 %, SDI decile integer 1-10. Outside them raise OutOfRangeError unless
    ``clip=True`` (the SDI decile is a category and always raises). Broadcasts numpy arrays.
    """
    choice(_EQ, "outcome", outcome, OUTCOMES)
    choice(_EQ, "horizon_years", horizon_years, HORIZONS)
    choice(_EQ, "model", model, MODELS)
    given = {
        "uacr": uacr_mg_g is not None,
        "hba1c": hba1c_percent is not None,
        "sdi": sdi_decile is not None,
    }
    unused = [k for k, v in given.items() if v and k not in _USES[model]]
    if unused:
        raise EquationInputError(f"{_EQ}: model={model!r} does not use {unused}; choose a model that does")

    scalar = is_scalar_call(
        sex, age_years, total_cholesterol_mg_dl, hdl_cholesterol_mg_dl, systolic_bp_mm_hg, on_bp_treatment,
        on_statin, diabetes, current_smoker, bmi_kg_m2, egfr_ml_min_1_73m2, uacr_mg_g, hba1c_percent, sdi_decile,
    )
    data = load_data(_FILE)
    rng = data["ranges"]
    age_bounds = rng["age_years_30y_horizon"] if horizon_years == 30 else rng["age_years"]

    def num(name: str, value: Any, key: str | None = None) -> np.ndarray:
        return check_range(_EQ, name, as_float(_EQ, name, value), rng[key or name], clip)

    sex_c = as_category(_EQ, "sex", sex, SEX_CODES)
    age = check_range(_EQ, "age_years", as_float(_EQ, "age_years", age_years), age_bounds, clip)
    tc = num("total_cholesterol_mg_dl", total_cholesterol_mg_dl)
    hdl = num("hdl_cholesterol_mg_dl", hdl_cholesterol_mg_dl)
    sbp = num("systolic_bp_mm_hg", systolic_bp_mm_hg)
    egfr = num("egfr_ml_min_1_73m2", egfr_ml_min_1_73m2)
    bmi = as_float(_EQ, "bmi_kg_m2", bmi_kg_m2)
    if outcome == "heart_failure":
        bmi = check_range(_EQ, "bmi_kg_m2", bmi, rng["bmi_kg_m2"], clip)
    bp_tx = as_flag(_EQ, "on_bp_treatment", on_bp_treatment)
    statin = as_flag(_EQ, "on_statin", on_statin)
    dm = as_flag(_EQ, "diabetes", diabetes)
    smoking = as_flag(_EQ, "current_smoker", current_smoker)

    uacr, miss_uacr = _optional("uacr_mg_g", uacr_mg_g, rng["uacr_mg_g"], clip)
    hba1c, miss_hba1c = _optional("hba1c_percent", hba1c_percent, rng["hba1c_percent"], clip)
    sdi, miss_sdi = _optional("sdi_decile", sdi_decile, rng["sdi_decile"], False)
    if np.any(sdi != np.round(sdi)):
        raise EquationInputError(f"{_EQ}: sdi_decile must be an integer decile 1-10, got {sdi_decile!r}")

    arrays = np.broadcast_arrays(
        sex_c, age, tc, hdl, sbp, egfr, bmi, bp_tx, statin, dm, smoking,
        uacr, miss_uacr, hba1c, miss_hba1c, sdi, miss_sdi,
    )
    (sex_c, age, tc, hdl, sbp, egfr, bmi, bp_tx, statin, dm, smoking,
     uacr, miss_uacr, hba1c, miss_hba1c, sdi, miss_sdi) = arrays

    mmol = data["cholesterol_mg_dl_to_mmol_l"]
    a = (age - 55.0) / 10.0
    non_hdl = (tc - hdl) * mmol - 3.5
    hdl_t = (hdl * mmol - 1.3) / 0.3
    sbp_lt = (np.minimum(sbp, 110.0) - 110.0) / 20.0
    sbp_gte = (np.maximum(sbp, 110.0) - 130.0) / 20.0
    bmi_lt = (np.minimum(bmi, 30.0) - 25.0) / 5.0
    bmi_gte = (np.maximum(bmi, 30.0) - 30.0) / 5.0
    egfr_lt = (np.minimum(egfr, 60.0) - 60.0) / -15.0
    egfr_gte = (np.maximum(egfr, 60.0) - 90.0) / -15.0
    have_hba1c = 1.0 - miss_hba1c
    have_sdi = 1.0 - miss_sdi
    terms = {
        "age": a,
        "age_squared": a * a,
        "non_hdl_c": non_hdl,
        "hdl_c": hdl_t,
        "sbp_lt_110": sbp_lt,
        "sbp_gte_110": sbp_gte,
        "dm": dm,
        "smoking": smoking,
        "bmi_lt_30": bmi_lt,
        "bmi_gte_30": bmi_gte,
        "egfr_lt_60": egfr_lt,
        "egfr_gte_60": egfr_gte,
        "bp_tx": bp_tx,
        "statin": statin,
        "bp_tx_sbp_gte_110": bp_tx * sbp_gte,
        "statin_non_hdl_c": statin * non_hdl,
        "age_non_hdl_c": a * non_hdl,
        "age_hdl_c": a * hdl_t,
        "age_sbp_gte_110": a * sbp_gte,
        "age_dm": a * dm,
        "age_smoking": a * smoking,
        "age_bmi_gte_30": a * bmi_gte,
        "age_egfr_lt_60": a * egfr_lt,
        "ln_uacr": np.where(miss_uacr > 0, 0.0, np.log(uacr)),
        "missing_uacr": miss_uacr,
        "hba1c_dm": have_hba1c * dm * (hba1c - 5.3),
        "hba1c_no_dm": have_hba1c * (1.0 - dm) * (hba1c - 5.3),
        "missing_hba1c": miss_hba1c,
        "sdi_4_to_6": have_sdi * ((sdi >= 4) & (sdi <= 6)),
        "sdi_7_to_10": have_sdi * (sdi >= 7),
        "missing_sdi": miss_sdi,
        "constant": np.ones_like(a),
    }
    names, coef = _table(model, horizon_years, outcome)
    # Accumulate term by term (a few dozen array operations, none per element); when sex is uniform the
    # coefficient is a scalar, which keeps large ensembles cheap.
    uniform = sex_c.size > 0 and bool(np.all(sex_c == sex_c.flat[0]))
    x = np.zeros(a.shape)
    for j, n in enumerate(names):
        c = coef[int(sex_c.flat[0]), j] if uniform else coef[:, j][sex_c]
        x += c * terms[n]
    risk = 1.0 / (1.0 + np.exp(-x))
    return finish(risk, scalar)
