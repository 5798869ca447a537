"""Cause-specific hazards anchored to the published risks, and competing-risks incidence, counted once.

Why anchoring this way: PREVENT's risks are cumulative incidences with non-cardiovascular death as a
competing risk, and KFRE's are the risks of treated kidney failure; both already contain the average
future course of a patient with the given baseline values. So, on the population-expected trajectory:

* each cardiovascular outcome's cause-specific hazard is solved so that its cumulative incidence, *with*
  the competing deaths of this engine, equals PREVENT's risk at 10 years (and 30 years for ages 30-59):
  PREVENT already accounts for non-CVD death, so death is not subtracted a second time. KFRE censored
  death, so its cumulative hazard *is* the cause-specific one (2 and 5 years) and death then competes;
* within a PREVENT decade the hazard rises with attained age at the equation's own age gradient; later
  decades for ages 60+ use the equation at the attained age (conditional on being event-free), and KFRE
  beyond 5 years carries its 2-5-year hazard forward: both are extrapolations and are flagged;
* only the patient's deviation from that expected path (``dynamics.Trajectories.deviation``) and the
  scenario's trial effects multiply the hazards. A patient on the expected path reproduces the anchors.

Competing events: ASCVD, total CVD and heart failure each compete with non-cardiovascular death (as
PREVENT was fitted); kidney failure competes with death from any cause. Without a measured UACR, KFRE is
evaluated on a distribution of UACR (quantiles of a published distribution), so kidney-failure risk is a
continuous function of eGFR: there is no threshold at which it jumps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from fhirtwin.sim._params import dynamics_parameters, intervention_parameters
from fhirtwin.sim.course import unmeasured_uacr
from fhirtwin.sim.dynamics import Trajectories, interpolation_matrix
from fhirtwin.sim.ensemble import ParameterDraws
from fhirtwin.sim.equations import EquationInputError, kfre_risk, method_of, prevent_risk
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import Scenario
from fhirtwin.sim.modifiers import ActiveModifier, active_modifiers, component_multipliers, method_entry

OUTCOMES = ("ascvd", "total_cvd", "heart_failure", "kidney_failure", "death")
CVD_OUTCOMES = ("ascvd", "total_cvd", "heart_failure")
MG_DL_PER_MMOL_L_LDL = 38.67
PREVENT_AGE_RANGE = (30.0, 79.0)
PREVENT_30Y_MAX_AGE = 59.0
KFRE_EGFR_RANGE = (10.0, 60.0)
KFRE_UACR_RANGE = (0.1, 25000.0)
KFRE_ANCHOR_YEARS = (2, 5)
DT = 1.0 / 12.0
MAX_MONTHS = 360
UACR_QUANTILES = 16


def prevent_model_for(inputs: PatientInputs) -> str:
    """PREVENT model chosen from the optional inputs available (as preventr does).

    With an SDI decile: the SDI model, or the full model when UACR or HbA1c is also measured (the full
    model's missing-value terms then stand for the one not measured, as the paper specifies).
    """
    if inputs.sdi_decile is not None:
        return "full" if inputs.uacr_mg_g is not None or inputs.hba1c_percent is not None else "sdi"
    if inputs.uacr_mg_g is not None and inputs.hba1c_percent is not None:
        return "full"
    if inputs.uacr_mg_g is not None:
        return "uacr"
    if inputs.hba1c_percent is not None:
        return "hba1c"
    return "base"


def prevent_kwargs(inputs: PatientInputs, model: str) -> dict[str, Any]:
    """Keyword arguments of ``prevent_risk`` for this patient's measured baseline."""
    kw: dict[str, Any] = dict(
        sex=inputs.sex,
        total_cholesterol_mg_dl=inputs.total_cholesterol_mg_dl,
        hdl_cholesterol_mg_dl=inputs.hdl_cholesterol_mg_dl,
        systolic_bp_mm_hg=inputs.systolic_bp_mm_hg,
        on_bp_treatment=int(inputs.on_bp_treatment),
        on_statin=int(inputs.on_statin),
        diabetes=int(inputs.diabetes),
        current_smoker=int(inputs.current_smoker),
        bmi_kg_m2=inputs.bmi_kg_m2,
        egfr_ml_min_1_73m2=inputs.egfr_ml_min_1_73m2,
        model=model,
    )
    if model in ("uacr", "full"):
        kw["uacr_mg_g"] = inputs.uacr_mg_g
    if model in ("hba1c", "full"):
        kw["hba1c_percent"] = inputs.hba1c_percent
    if model in ("sdi", "full") and inputs.sdi_decile is not None:
        kw["sdi_decile"] = inputs.sdi_decile
    return kw


def cum_hazard(risk: Any) -> np.ndarray:
    """-ln(1 - risk): the cumulative hazard of a risk (the scale on which hazard ratios multiply)."""
    cum: np.ndarray = -np.log1p(-np.clip(np.asarray(risk, dtype=float), 0.0, 1.0 - 1e-12))
    return cum


# ------------------------------------------------------------------------------------------------
# competing deaths
# ------------------------------------------------------------------------------------------------


def ckd_mortality_ratio(inputs: PatientInputs) -> float:
    """All-cause mortality hazard ratio for the baseline eGFR and UACR (log-linear between published points)."""
    spec = dynamics_parameters()["ckd_mortality_hazard_ratio"]

    def at(points: list[list[float]], x: float, log_x: bool) -> float:
        table = np.asarray(points, dtype=float)
        xs = np.log(table[:, 0]) if log_x else table[:, 0]
        return float(np.exp(np.interp(np.log(x) if log_x else x, xs, np.log(table[:, 1]))))

    ratio = at(spec["by_egfr"], inputs.egfr_ml_min_1_73m2, False)
    if inputs.uacr_mg_g is not None:
        ratio *= at(spec["by_uacr_mg_g"], inputs.uacr_mg_g, True)
    return ratio


def death_hazards(inputs: PatientInputs, months: int) -> tuple[np.ndarray, np.ndarray]:
    """(all-cause, non-cardiovascular) death hazards per year for each month (months,)."""
    spec = dynamics_parameters()["background_mortality"]
    table = np.asarray(spec["death_probability_by_age"][inputs.sex], dtype=float)
    ages, log_h = table[:, 0], np.log(-np.log1p(-table[:, 1]))
    age = inputs.age_years + (np.arange(months) + 0.5) * DT
    lo_gradient = (log_h[1] - log_h[0]) / (ages[1] - ages[0])
    hi_gradient = (log_h[-1] - log_h[-2]) / (ages[-1] - ages[-2])
    log_at = (np.interp(age, ages, log_h) + lo_gradient * np.minimum(age - ages[0], 0.0)
              + hi_gradient * np.maximum(age - ages[-1], 0.0))
    all_cause = np.exp(log_at) * ckd_mortality_ratio(inputs)
    non_cvd: np.ndarray = all_cause * spec["non_cvd_share"]
    return all_cause, non_cvd


# ------------------------------------------------------------------------------------------------
# solving the anchored hazards
# ------------------------------------------------------------------------------------------------


def _segment(h: np.ndarray, death: np.ndarray, surv0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event incidence over a run of months (constant hazards within a month) and the survival at its end.

    ``h`` (K, m) event hazard, ``death`` (m,) competing hazard, ``surv0`` (K,) event-free survival at the
    start. Returns (cumulative incidence increment (K,), survival at the end (K,)).
    """
    total = h + death[None, :]
    log_s = np.concatenate([np.zeros((h.shape[0], 1)), -np.cumsum(total * DT, axis=1)], axis=1)
    s = surv0[:, None] * np.exp(log_s)
    frac = np.divide(h, total, out=np.zeros_like(total), where=total > 0)
    inc = np.sum((s[:, :-1] - s[:, 1:]) * frac, axis=1)
    return inc, s[:, -1]


@dataclass(frozen=True, eq=False)
class Anchors:
    """Hazards per month on the expected path, the competing deaths, and what the anchors rest on.

    ``cvd[outcome]`` (months,); ``kidney`` (K, months), one row per UACR quantile (K = 1 when measured);
    ``death_all``/``death_non_cvd`` (months,); ``published`` the published risks the hazards reproduce;
    ``never_smoker_ratio`` (months,) the anchored hazard of the same patient as a non-smoker over theirs
    (1 for non-smokers), the floor of any cessation benefit; ``extrapolated`` what goes beyond an
    equation's validated range or horizon; ``modifiers`` the markers beyond PREVENT that act for this
    patient (``fhirtwin.sim.modifiers``), empty without any.
    """

    prevent_model: str
    cvd: dict[str, np.ndarray]
    kidney: np.ndarray
    death_all: np.ndarray
    death_non_cvd: np.ndarray
    published: dict[str, float]
    never_smoker_ratio: dict[str, np.ndarray]
    method: dict[str, Any]
    logit: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    caveats: tuple[str, ...] = field(default=())
    extrapolated: tuple[str, ...] = field(default=())
    modifiers: tuple[ActiveModifier, ...] = field(default=())


def _prevent_at(inputs: PatientInputs, outcome: str, horizon: int, ages: np.ndarray, **change: Any) -> np.ndarray:
    model = prevent_model_for(inputs)
    kw = {**prevent_kwargs(inputs, model), **change}
    risk: np.ndarray = np.atleast_1d(
        prevent_risk(outcome=outcome, horizon_years=horizon, age_years=ages, clip=True, **kw)
    )
    return risk


_AGE_GRID = np.arange(PREVENT_AGE_RANGE[0], PREVENT_AGE_RANGE[1] + 1.0)


def _log_h10_curve(inputs: PatientInputs, outcome: str, **change: Any) -> Callable[[float], float]:
    """log 10-year cumulative hazard of PREVENT as a function of attained age (one equation call).

    Tabulated at whole years 30-79 and interpolated; beyond 79 extended at the gradient between 78 and 79.
    Used for the shape of the hazard within a decade and for conditional risks in later decades; the
    anchors themselves are evaluated at the exact age.
    """
    table = np.log(cum_hazard(_prevent_at(inputs, outcome, 10, _AGE_GRID, **change)))
    gradient = float(table[-1] - table[-2])

    def at(age: float) -> float:
        return float(np.interp(age, _AGE_GRID, table) + gradient * max(age - PREVENT_AGE_RANGE[1], 0.0))

    return at


def _solve_one(target: float, shape: np.ndarray, death: np.ndarray, surv0: float) -> tuple[float, float]:
    """Scale c with incidence(c * shape) == target over a run of months (Brent's method); returns (c, survival)."""
    target = min(target, surv0 * (1 - 1e-9))
    if target <= 0:
        return 0.0, float(_segment(np.zeros((1, shape.size)), death, np.array([surv0]))[1][0])

    def gap(c: float) -> float:
        return float(_segment(c * shape[None, :], death, np.array([surv0]))[0][0]) - target

    hi = 1.0
    while gap(hi) < 0:
        hi *= 8.0
    scale = float(brentq(gap, 0.0, hi, xtol=1e-15, rtol=1e-13))
    return scale, float(_segment(scale * shape[None, :], death, np.array([surv0]))[1][0])


def _cvd_anchor(inputs: PatientInputs, outcome: str, death: np.ndarray, **change: Any) -> tuple[np.ndarray, list[str]]:
    """Monthly hazards (MAX_MONTHS,) reproducing PREVENT's cumulative incidences with ``death`` competing."""
    age = inputs.age_years
    t_mid = (np.arange(MAX_MONTHS) + 0.5) * DT
    h = np.zeros(MAX_MONTHS)
    flags: list[str] = []
    surv = 1.0
    log_h10 = _log_h10_curve(inputs, outcome, **change)
    r10 = float(_prevent_at(inputs, outcome, 10, np.array([np.clip(age, *PREVENT_AGE_RANGE)]), **change)[0])
    segments: list[tuple[int, int, float]] = [(0, 120, r10)]  # (first month, end month, target incidence)
    if age <= PREVENT_30Y_MAX_AGE:
        r30 = float(_prevent_at(inputs, outcome, 30, np.array([max(age, PREVENT_AGE_RANGE[0])]), **change)[0])
        segments.append((120, 360, max(r30 - r10, 0.0)))
    else:
        segments += [(120, 240, np.nan), (240, 360, np.nan)]
        flags.append(f"{outcome} beyond 10 years: PREVENT's 10-year equation at the attained age "
                     "(30-year equations exist only for ages 30-59)")
        if age + 10 > PREVENT_AGE_RANGE[1]:
            flags.append(f"{outcome} at attained ages above 79: PREVENT extended at its own age gradient")
    for first, end, target in segments:
        seg_age = age + first / 12.0
        a0 = min(max(seg_age, PREVENT_AGE_RANGE[0]), PREVENT_AGE_RANGE[1] - 1.0) if seg_age <= 79 else seg_age
        gradient = log_h10(a0 + 1.0) - log_h10(a0)  # d ln H10 / d age: the equation's own ageing
        shape = np.exp(gradient * (t_mid[first:end] - first / 12.0))
        if np.isnan(target):  # conditional on being event-free at the attained age
            target = surv * float(1.0 - np.exp(-np.exp(log_h10(seg_age))))
        scale, surv = _solve_one(float(target), shape, death[first:end], surv)
        h[first:end] = scale * shape
    return h, flags


def kfre_log_cum_hazard(inputs: PatientInputs, horizon: int, egfr: Any, uacr: Any) -> np.ndarray:
    """log cumulative hazard of KFRE (4-variable, North American) with eGFR and UACR outside its range
    continued along the equation's own linear predictor (so no kink or step at eGFR 60)."""
    egfr = np.asarray(egfr, dtype=float)
    uacr = np.asarray(uacr, dtype=float)
    coef = _kfre_terms()
    egfr_c = np.clip(egfr, *KFRE_EGFR_RANGE)
    uacr_c = np.clip(uacr, *KFRE_UACR_RANGE)
    risk = kfre_risk(horizon_years=horizon, sex=inputs.sex, age_years=inputs.age_years,
                     egfr_ml_min_1_73m2=egfr_c, uacr_mg_g=uacr_c, clip=True)
    out: np.ndarray = (np.log(cum_hazard(risk)) + coef["egfr_per_5"] * (egfr - egfr_c) / 5.0
                       + coef["ln_uacr_mg_g"] * (np.log(uacr) - np.log(uacr_c)))
    return out


def _kfre_terms() -> dict[str, float]:
    from fhirtwin.sim.equations._validation import load_data

    terms = load_data("kfre.json")["models"]["4-variable"]["terms"]
    return {name: float(spec["coef"]) for name, spec in terms.items()}


def uacr_quantiles(inputs: PatientInputs, k: int = UACR_QUANTILES) -> np.ndarray:
    """Mid-quantiles (mg/g) of the UACR distribution assumed when none was measured."""
    median, log_sd = unmeasured_uacr(inputs)
    q: np.ndarray = median * np.exp(log_sd * norm.ppf((np.arange(k) + 0.5) / k))
    return q


def _kidney_anchor(inputs: PatientInputs) -> tuple[np.ndarray, str, list[str]]:
    """Cause-specific kidney-failure hazards (K, MAX_MONTHS) from KFRE at 2 and 5 years.

    KFRE was fitted by Cox regression with death censored (Tangri 2011; Ravani P et al., JASN
    2019;30:2219), so its risk is a net risk: its cumulative hazard is the cause-specific one, and death
    then competes in the simulation (the cumulative incidence is lower than KFRE where death is common,
    as Ravani and Ramspek CL et al., JASN 2021;32:1174 found). Piecewise constant on 0-2 and 2-5 years.
    """
    measured = inputs.uacr_mg_g is not None
    uacr = np.array([inputs.uacr_mg_g]) if measured else uacr_quantiles(inputs)
    mode = "kfre" if measured else "kfre-imputed-uacr"
    flags = ["kidney failure beyond 5 years: KFRE's 2-5-year hazard carried forward"]
    if inputs.egfr_ml_min_1_73m2 >= KFRE_EGFR_RANGE[1]:
        flags.append("kidney failure at eGFR >= 60: KFRE (developed in CKD G3-G5) continued along its eGFR term")
    two, five = (np.exp(kfre_log_cum_hazard(inputs, y, inputs.egfr_ml_min_1_73m2, uacr)) for y in KFRE_ANCHOR_YEARS)
    h = np.empty((uacr.size, MAX_MONTHS))
    h[:, :24] = (two / 2.0)[:, None]
    h[:, 24:] = (np.maximum(five - two, 0.0) / 3.0)[:, None]
    return h, mode, flags


def compute_anchors(inputs: PatientInputs) -> Anchors:
    """Solve the anchored hazards for one patient (done once at fit; every scenario reuses them)."""
    model = prevent_model_for(inputs)
    caveats: list[str] = []
    try:
        for outcome in CVD_OUTCOMES:
            prevent_risk(outcome=outcome, horizon_years=10, age_years=inputs.age_years,
                         **prevent_kwargs(inputs, model))
    except EquationInputError as exc:
        caveats.append(f"PREVENT input outside its validated range, clipped to the range: {exc}")
    death_all, death_non_cvd = death_hazards(inputs, MAX_MONTHS)
    cvd: dict[str, np.ndarray] = {}
    extrapolated: list[str] = []
    published: dict[str, float] = {}
    never: dict[str, np.ndarray] = {}
    age = np.array([float(np.clip(inputs.age_years, *PREVENT_AGE_RANGE))])
    for outcome in CVD_OUTCOMES:
        cvd[outcome], flags = _cvd_anchor(inputs, outcome, death_non_cvd)
        extrapolated += flags
        published[f"prevent_10y_{outcome}"] = float(_prevent_at(inputs, outcome, 10, age)[0])
        if inputs.age_years <= PREVENT_30Y_MAX_AGE:
            published[f"prevent_30y_{outcome}"] = float(_prevent_at(inputs, outcome, 30, age)[0])
        if inputs.current_smoker:  # the same patient as a non-smoker: the floor of any cessation benefit
            non_smoker, _ = _cvd_anchor(inputs, outcome, death_non_cvd, current_smoker=0)
            never[outcome] = np.minimum(non_smoker / np.maximum(cvd[outcome], 1e-300), 1.0)
        else:
            never[outcome] = np.ones(MAX_MONTHS)
    kidney, mode, flags = _kidney_anchor(inputs)
    extrapolated += flags
    if inputs.uacr_mg_g is not None:
        for years in KFRE_ANCHOR_YEARS:
            log_h = kfre_log_cum_hazard(inputs, years, inputs.egfr_ml_min_1_73m2, inputs.uacr_mg_g)
            published[f"kfre_{years}y"] = float(1.0 - np.exp(-np.exp(log_h)))
    else:
        caveats.append("no UACR measured: kidney-failure risk is KFRE averaged over a published UACR distribution")
    if inputs.prior_ascvd:
        caveats.append("prior MI or stroke: PREVENT is a primary-prevention equation and understates recurrent risk")
    if inputs.heart_failure:
        caveats.append("existing heart failure: the heart-failure outcome is a new HF event estimate from PREVENT")
    method = {
        "prevent": method_of("prevent_risk", model),
        "kfre": method_of("kfre_risk"),
        "egfr": method_of("egfr_ckd_epi_2021"),
        "kidney_mode": mode,
        "anchoring": ("on the population-expected path, cause-specific hazards whose cumulative incidences with "
                      "competing non-CVD death equal PREVENT (10 and 30 years), and KFRE's cumulative hazard "
                      "(2 and 5 years, death censored as fitted) with death from any cause competing; only "
                      "deviations from that path and trial effects multiply them"),
    }
    logit = {outcome: logit_curves(inputs, outcome) for outcome in CVD_OUTCOMES}
    modifiers = active_modifiers(inputs)
    if modifiers:
        method["modifiers"] = method_entry(modifiers)
    return Anchors(model, cvd, kidney, death_all, death_non_cvd, published, never, method, logit,
                   tuple(caveats), tuple(dict.fromkeys(extrapolated)), modifiers)


# ------------------------------------------------------------------------------------------------
# hazards along simulated trajectories
# ------------------------------------------------------------------------------------------------


def _knot_index(t: np.ndarray) -> np.ndarray:
    """Month indices of the yearly knots 0, 12, 24, ... (last knot capped at the final month)."""
    years = int(np.ceil(t[-1] - 1e-9))
    return np.minimum(np.arange(years + 1) * 12, t.size - 1)


#: Grids on which PREVENT's log-odds is tabulated per moving input; they contain the equation's spline knots
#: (eGFR 60, BMI 30) and range limits, and its log-odds is piecewise linear in each, so interpolation is exact.
_LOGIT_GRIDS = {
    "egfr_ml_min_1_73m2": np.unique(np.r_[np.arange(1.0, 251.0, 1.0), 15.0, 60.0, 140.0]),
    "bmi_kg_m2": np.unique(np.r_[np.arange(10.0, 80.5, 0.5), 18.5, 30.0, 39.9]),
    "hba1c_percent": np.unique(np.r_[np.arange(2.0, 20.05, 0.1), 4.5, 15.0]),
}


def moving_inputs(inputs: PatientInputs, outcome: str) -> tuple[str, ...]:
    """The PREVENT inputs whose deviation from the expected course moves this outcome's hazard."""
    moved = ["egfr_ml_min_1_73m2"]
    if outcome == "heart_failure":
        moved.append("bmi_kg_m2")
    if inputs.hba1c_percent is not None and prevent_model_for(inputs) in ("hba1c", "full"):
        moved.append("hba1c_percent")
    return tuple(moved)


def logit_curves(inputs: PatientInputs, outcome: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PREVENT's 10-year log-odds as a function of each moving input, the others at the measured baseline."""
    age = np.array([float(np.clip(inputs.age_years, *PREVENT_AGE_RANGE))])
    moved = moving_inputs(inputs, outcome)
    baseline = prevent_kwargs(inputs, prevent_model_for(inputs))
    # one equation call: each input's grid in its own block of rows, the other inputs at baseline there
    columns = {v: np.concatenate([_LOGIT_GRIDS[w] if w == v else np.full(_LOGIT_GRIDS[w].size, float(baseline[v]))
                                  for w in moved]) for v in moved}
    risk = np.clip(_prevent_at(inputs, outcome, 10, age, **columns), 1e-15, 1 - 1e-15)
    logit = np.log(risk) - np.log1p(-risk)
    ends = np.cumsum([_LOGIT_GRIDS[v].size for v in moved])
    return {v: (_LOGIT_GRIDS[v], block) for v, block in zip(moved, np.split(logit, ends[:-1]), strict=True)}


def _log_h_of_logit(logit: np.ndarray) -> np.ndarray:
    """log cumulative hazard -ln(1 - r) of a risk given by its log-odds."""
    out: np.ndarray = np.log(np.logaddexp(0.0, logit))  # -ln(1 - sigmoid(L)) = ln(1 + e^L)
    return out


def prevent_hazard_ratio(inputs: PatientInputs, anchors: Anchors, traj: Trajectories, outcome: str) -> np.ndarray:
    """Hazard ratio (draws, months) of PREVENT at expected + deviation vs the expected course.

    Evaluated at yearly knots on eGFR, BMI (heart failure) and HbA1c (when the model uses it), at the
    baseline age (ageing is in the anchored hazard); exactly 0 for a draw on the expected course. The
    equation's log-odds is additive over these inputs, so it is read from curves tabulated at fit.
    """
    t = traj.t_years
    ki = _knot_index(t)
    risk0 = min(max(anchors.published[f"prevent_10y_{outcome}"], 1e-15), 1 - 1e-15)
    expected = np.full(ki.size, np.log(risk0) - np.log1p(-risk0))  # log-odds at the measured baseline
    deviated = np.zeros((traj.deviation["egfr_ml_min_1_73m2"].shape[0], ki.size))
    for variable, (grid, logit) in anchors.logit[outcome].items():
        path = traj.expected[variable][ki]
        at_path = np.interp(path, grid, logit)
        # each curve holds the whole log-odds with the other inputs at baseline: add only its change
        expected += at_path - float(np.interp(path[0], grid, logit))
        # the SGLT2 inhibitor's slower eGFR decline is not fed back: its trial effects already include it
        dev = traj.egfr_natural_deviation if variable == "egfr_ml_min_1_73m2" else traj.deviation[variable]
        deviated += np.interp(path[None, :] + dev[:, ki], grid, logit) - at_path[None, :]
    ratio = np.exp(_log_h_of_logit(expected[None, :] + deviated) - _log_h_of_logit(expected)[None, :])
    t_mid = 0.5 * (t[1:] + t[:-1])
    months: np.ndarray = ratio @ interpolation_matrix(t[ki], t_mid)  # linear between the yearly knots
    return months


def _mid(x: np.ndarray) -> np.ndarray:
    mid: np.ndarray = 0.5 * (x[:, 1:] + x[:, :-1])
    return mid


def coronary_multiplier(inputs: PatientInputs, ratios: dict[str, np.ndarray]) -> np.ndarray:
    """Genomic hazard ratio of the coronary component (FH variant, CAD polygenic score), per draw."""
    n = next(iter(ratios.values())).shape[0]
    log_m = np.zeros(n)
    if inputs.fh_variant:
        log_m = log_m + np.log(ratios["fh_variant_cad_or_at_same_ldl"])
    if inputs.cad_prs_z is not None:
        log_m = log_m + inputs.cad_prs_z * np.log(ratios["cad_prs_hr_per_sd"])
    out: np.ndarray = np.exp(log_m)
    return out


def coronary_share() -> float:
    """Share of first ASCVD events that are coronary (the rest are strokes)."""
    return float(intervention_parameters()["coronary_share_of_ascvd"]["value"])


def quitter_multiplier(anchors: Anchors, ratios: dict[str, np.ndarray], t_mid: np.ndarray) -> dict[str, np.ndarray]:
    """Hazard ratio (draws, months) of a sustained quitter vs a continuing smoker, per CVD outcome.

    Duncan et al.'s HR for the first 5 years after quitting, then waning linearly to the never-smoker
    ratio of the anchoring equation by ``years_to_never_smoker``; never below that ratio (a quitter never
    does better than someone who never smoked).
    """
    spec = intervention_parameters()["smoking_cessation_time_course"]
    early, full = float(spec["early_years"]), float(spec["years_to_never_smoker"])
    log_hr = np.log(ratios["smoking_cessation_cvd_hr"])[:, None]
    out: dict[str, np.ndarray] = {}
    late = np.clip((t_mid - early) / (full - early), 0.0, 1.0)[None, :]
    for outcome in CVD_OUTCOMES:
        floor = np.log(anchors.never_smoker_ratio[outcome][: t_mid.size])[None, :]
        path = log_hr * (1.0 - late) + floor * late
        np.maximum(path, floor, out=path)
        out[outcome] = np.exp(path, out=path)
    return out


def hazard_paths(
    inputs: PatientInputs,
    anchors: Anchors,
    traj: Trajectories,
    draws: ParameterDraws,
    scenario: Scenario,
    dynamic: bool = True,
) -> dict[str, np.ndarray]:
    """Hazard per year for each month (draws, months) of every outcome (a continuing smoker keeps smoking)."""
    t = traj.t_years
    m = t.size - 1
    t_mid = 0.5 * (t[1:] + t[:-1])
    ratios = draws.ratios
    dev = traj.deviation

    # LDL-C (CTT per mmol/L, smaller in the first year) and SBP (Ettehad per 10 mmHg, by outcome)
    ldl_fall = _mid(dev["ldl_cholesterol_mg_dl"]) * (-1.0 / MG_DL_PER_MMOL_L_LDL)
    first_year = int(np.count_nonzero(t_mid < 1.0))
    log_ldl = ldl_fall * np.log(ratios["ldl_major_vascular_rr_per_mmol_l"])[:, None]
    log_ldl[:, :first_year] = ldl_fall[:, :first_year] * np.log(
        ratios["ldl_major_vascular_rr_per_mmol_l_year1"])[:, None]
    sbp_fall = _mid(dev["systolic_bp_mm_hg"]) * -0.1

    def per_10(name: str) -> np.ndarray:
        out: np.ndarray = np.exp(sbp_fall * np.log(ratios[name])[:, None])
        return out

    c = coronary_share()
    coronary = coronary_multiplier(inputs, ratios)[:, None]
    stroke = per_10("sbp_stroke_rr_per_10_mm_hg")
    m_hf = per_10("sbp_heart_failure_rr_per_10_mm_hg")
    if anchors.modifiers:  # markers beyond PREVENT, each on its component (none: this block is skipped)
        marker = component_multipliers(anchors.modifiers, draws.modifiers, draws.n)
        coronary = coronary * marker.get("coronary", np.ones(draws.n))[:, None]
        stroke = stroke * marker.get("stroke", np.ones(draws.n))[:, None]
        m_hf = m_hf * marker.get("heart_failure", np.ones(draws.n))[:, None]
    m_ascvd = np.exp(log_ldl) * (c * coronary * per_10("sbp_coronary_rr_per_10_mm_hg") + (1 - c) * stroke)
    if scenario.has("sglt2i") is not None:
        m_hf = m_hf * ratios["sglt2i_heart_failure_rr"][:, None]
    h_ascvd, h_hf = anchors.cvd["ascvd"][:m], anchors.cvd["heart_failure"][:m]
    a = (h_ascvd / np.maximum(h_ascvd + h_hf, 1e-12))[None, :]
    multipliers = {"ascvd": m_ascvd, "heart_failure": m_hf, "total_cvd": a * m_ascvd + (1 - a) * m_hf}

    out: dict[str, np.ndarray] = {}
    for outcome in CVD_OUTCOMES:
        hz = anchors.cvd[outcome][:m][None, :] * multipliers[outcome]
        if dynamic:
            hz *= prevent_hazard_ratio(inputs, anchors, traj, outcome)
        out[outcome] = hz

    # kidney failure: the KFRE-anchored hazard moved by the eGFR deviation along KFRE's eGFR term
    beta = _kfre_terms()["egfr_per_5"] / 5.0
    kidney = anchors.kidney[np.minimum(draws.uacr_quantile, anchors.kidney.shape[0] - 1), :m]
    kf = kidney * np.exp(beta * _mid(traj.egfr_natural_deviation)) if dynamic else kidney
    if scenario.has("sglt2i") is not None:
        kf = kf * ratios["sglt2i_kidney_progression_rr"][:, None]
    out["kidney_failure"] = kf
    return out


def competing_cif(
    hazard: np.ndarray, death: np.ndarray, dt: float, with_death: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Discrete-time competing risks: CIF of the event and (``with_death``) of death-before-event, (draws, months+1).

    Within a month hazards are constant, so P(any) = 1 - exp(-(h+d) dt), split in proportion h : d
    (the death hazard is positive at every age, so the total never vanishes).
    """
    total = hazard + death
    n, m = total.shape
    surv = np.empty((n, m + 1))
    surv[:, 0] = 1.0
    np.cumsum(total, axis=1, out=surv[:, 1:])
    surv[:, 1:] *= -dt
    np.exp(surv[:, 1:], out=surv[:, 1:])
    np.divide(hazard, total, out=total)  # the event's share of each month's exits
    cif_event = np.empty((n, m + 1))
    cif_event[:, 0] = 0.0
    step = np.subtract(surv[:, :-1], surv[:, 1:])
    step *= total
    np.cumsum(step, axis=1, out=cif_event[:, 1:])
    if not with_death:
        return cif_event, None
    cif_death = np.clip(1.0 - surv - cif_event, 0.0, 1.0)
    return cif_event, cif_death


def cumulative_incidence(
    hazards: dict[str, np.ndarray], anchors: Anchors, outcomes: tuple[str, ...] = OUTCOMES
) -> dict[str, np.ndarray]:
    """CIF per outcome with its competing death; ``death`` is non-CVD death before a first CVD event."""
    m = hazards["total_cvd"].shape[1]
    non_cvd = np.broadcast_to(anchors.death_non_cvd[:m], hazards["total_cvd"].shape)
    out: dict[str, np.ndarray] = {}
    for outcome in CVD_OUTCOMES:
        out[outcome], death = competing_cif(hazards[outcome], non_cvd, DT, with_death=outcome == "total_cvd")
        if death is not None:
            out["death"] = death
    if "kidney_failure" in outcomes:
        all_cause = np.broadcast_to(anchors.death_all[:m], hazards["kidney_failure"].shape)
        out["kidney_failure"], _ = competing_cif(hazards["kidney_failure"], all_cause, DT, with_death=False)
    return out


def after_quit_attempt(
    hazards: dict[str, np.ndarray], cif: dict[str, np.ndarray], anchors: Anchors, draws: ParameterDraws,
    t_mid: np.ndarray,
) -> dict[str, np.ndarray]:
    """CIFs after a quit attempt: the mixture of a sustained quit (probability q) and continued smoking."""
    factor = quitter_multiplier(anchors, draws.ratios, t_mid)
    for o in CVD_OUTCOMES:
        factor[o] *= hazards[o]
    quit = cumulative_incidence(factor, anchors, outcomes=CVD_OUTCOMES)
    q = draws.quit_probability[:, None]
    out = dict(cif)
    for o, after in quit.items():  # cif + q (quit - cif), in place
        after -= cif[o]
        after *= q
        after += cif[o]
        out[o] = after
    return out
