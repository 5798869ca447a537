"""Event hazards anchored to published equations, and discrete-time competing-risks incidence.

Why anchoring: the equations (PREVENT, KFRE) are the validated part; the dynamics only say how risk
*changes* from there. Each outcome's baseline hazard is the constant hazard that reproduces the
equation's risk, h = -ln(1 - r) / T (PREVENT T = 10 per age decade; KFRE T = 5). Over time the hazard
is multiplied by
  * the equation's own hazard ratio re-evaluated on the simulated eGFR, BMI and HbA1c (yearly knots,
    log-linear between them), relative to the measured baseline, so the equation is never changed;
  * trial per-unit effects for LDL-C (CTT) and SBP (Ettehad) relative to the draw's own baseline;
  * genomic modifiers (FH variant at the same LDL-C, CAD polygenic score per SD) and smoking cessation.
Death from non-cardiovascular causes (a documented Gompertz assumption) competes with every event:
CIF_k(t) = sum over months of S(t-) * P(event k in month | alive and event-free), S = survival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fhirtwin.sim._params import dynamics_parameters
from fhirtwin.sim.dynamics import Trajectories, interpolation_matrix
from fhirtwin.sim.ensemble import ParameterDraws
from fhirtwin.sim.equations import (
    EquationInputError,
    kfre_risk,
    method_of,
    prevent_risk,
)
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import Scenario

OUTCOMES = ("ascvd", "total_cvd", "heart_failure", "kidney_failure", "death")
CVD_OUTCOMES = ("ascvd", "total_cvd", "heart_failure")
MG_DL_PER_MMOL_L_LDL = 38.67
PREVENT_AGE_RANGE = (30.0, 79.0)
KFRE_EGFR_RANGE = (10.0, 60.0)
_AFRICAN_ANCESTRY_RACES = ("black", "african_american", "black or african american")
THRESHOLD_HAZARD_PER_YEAR = 1000.0  # effectively certain within the month once eGFR < 15


def prevent_model_for(inputs: PatientInputs) -> str:
    """PREVENT model chosen from the optional inputs available (as preventr does)."""
    if inputs.uacr_mg_g is not None and inputs.hba1c_percent is not None:
        return "full"
    if inputs.uacr_mg_g is not None:
        return "uacr"
    if inputs.hba1c_percent is not None:
        return "hba1c"
    return "base"


def prevent_kwargs(inputs: PatientInputs, model: str) -> dict[str, Any]:
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
    return kw


def _cum_hazard(risk: Any) -> np.ndarray:
    cum: np.ndarray = -np.log1p(-np.clip(np.asarray(risk, dtype=float), 0.0, 1.0 - 1e-12))
    return cum


@dataclass(frozen=True, eq=False)
class Anchors:
    """Baseline hazards per outcome and age decade, the equations used, and what had to be bent."""

    prevent_model: str
    prevent_10y: dict[str, np.ndarray]
    hazard_per_decade: dict[str, np.ndarray]
    kidney_mode: str
    kfre_5y: float | None
    method: dict[str, Any]
    caveats: tuple[str, ...] = field(default=())
    log_cum_hazard_at_baseline: dict[str, float] = field(default_factory=dict)


def compute_anchors(inputs: PatientInputs, horizon_years: float) -> Anchors:
    """Evaluate PREVENT (and KFRE) at the measured baseline, one PREVENT anchor per age decade."""
    model = prevent_model_for(inputs)
    kw = prevent_kwargs(inputs, model)
    caveats: list[str] = []
    try:
        for outcome in CVD_OUTCOMES:
            prevent_risk(outcome=outcome, horizon_years=10, age_years=inputs.age_years, **kw)
    except EquationInputError as exc:
        caveats.append(f"PREVENT input outside its validated range, clipped to the range: {exc}")
    decades = int(np.ceil(horizon_years / 10.0))
    ages = inputs.age_years + 10.0 * np.arange(decades)
    if ages.max() > PREVENT_AGE_RANGE[1] or ages.min() < PREVENT_AGE_RANGE[0]:
        caveats.append(
            "PREVENT is validated for ages 30-79: baseline hazards for age decades outside it use the "
            "equation at the nearest age in range"
        )
    ages_c = np.clip(ages, *PREVENT_AGE_RANGE)
    prevent_10y: dict[str, np.ndarray] = {}
    hazard: dict[str, np.ndarray] = {}
    for outcome in CVD_OUTCOMES:
        risk = np.atleast_1d(prevent_risk(outcome=outcome, horizon_years=10, age_years=ages_c, clip=True, **kw))
        prevent_10y[outcome] = risk
        hazard[outcome] = _cum_hazard(risk) / 10.0
    if inputs.prior_ascvd:
        caveats.append("prior MI or stroke: PREVENT is a primary-prevention equation and understates recurrent risk")
    if inputs.heart_failure:
        caveats.append("existing heart failure: the heart-failure outcome is a new HF event estimate from PREVENT")

    kidney_mode = "kfre" if inputs.uacr_mg_g is not None else "egfr_threshold"
    kfre5 = None
    if kidney_mode == "kfre":
        kfre5 = float(
            kfre_risk(
                horizon_years=5,
                sex=inputs.sex,
                age_years=inputs.age_years,
                egfr_ml_min_1_73m2=float(np.clip(inputs.egfr_ml_min_1_73m2, *KFRE_EGFR_RANGE)),
                uacr_mg_g=inputs.uacr_mg_g,
                clip=True,
            )
        )
        if inputs.egfr_ml_min_1_73m2 >= KFRE_EGFR_RANGE[1]:
            caveats.append(
                "KFRE was developed in CKD G3-G5 (eGFR < 60): above 60 its hazard is extrapolated log-linearly "
                "in eGFR from the equation's own slope"
            )
    else:
        caveats.append(
            "no UACR: KFRE cannot be evaluated; kidney failure is taken as the simulated eGFR falling below "
            "15 mL/min/1.73m2 (KDIGO G5)"
        )
    method = {
        "prevent": method_of("prevent_risk", model),
        "kfre": method_of("kfre_risk") if kidney_mode == "kfre" else None,
        "egfr": method_of("egfr_ckd_epi_2021"),
        "kidney_mode": kidney_mode,
        "anchoring": "constant hazard -ln(1-r)/T per outcome and age decade, times trajectory and effect multipliers",
    }
    age0 = float(np.clip(inputs.age_years, *PREVENT_AGE_RANGE))
    log_base = {
        o: float(np.log(_cum_hazard(prevent_risk(outcome=o, horizon_years=10, age_years=age0, clip=True, **kw))))
        for o in CVD_OUTCOMES
    }
    return Anchors(model, prevent_10y, hazard, kidney_mode, kfre5, method, tuple(caveats), log_base)


def _knot_index(t: np.ndarray) -> np.ndarray:
    """Month indices of the yearly knots 0, 12, 24, ... (last knot capped at the final month)."""
    years = int(np.ceil(t[-1] - 1e-9))
    return np.minimum(np.arange(years + 1) * 12, t.size - 1)


def _interp_knots_to_months(values: np.ndarray, knot_t: np.ndarray, t_mid: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 1 from knot times to month midpoints (vectorised)."""
    at_months: np.ndarray = values @ interpolation_matrix(knot_t, t_mid)
    return at_months


def prevent_log_ratio(
    inputs: PatientInputs, anchors: Anchors, traj: Trajectories, outcome: str
) -> tuple[np.ndarray, np.ndarray]:
    """log hazard ratio of PREVENT re-evaluated at yearly knots on simulated eGFR, BMI and HbA1c.

    The measured baseline is shifted by each draw's change since t=0, so the ratio is exactly 1 at t=0
    and the equation's other inputs (lipids, SBP, smoking: handled by trial effects) stay at baseline.
    """
    t = traj.t_years
    ki = _knot_index(t)
    knot_t = t[ki]
    kw = prevent_kwargs(inputs, anchors.prevent_model)
    age = float(np.clip(inputs.age_years, *PREVENT_AGE_RANGE))
    vals = traj.values
    kw["egfr_ml_min_1_73m2"] = inputs.egfr_ml_min_1_73m2 + (
        vals["egfr_ml_min_1_73m2"][:, ki] - vals["egfr_ml_min_1_73m2"][:, :1]
    )
    if outcome == "heart_failure":
        kw["bmi_kg_m2"] = inputs.bmi_kg_m2 + (vals["bmi_kg_m2"][:, ki] - vals["bmi_kg_m2"][:, :1])
    if "hba1c_percent" in kw and "hba1c_percent" in vals:
        kw["hba1c_percent"] = inputs.hba1c_percent + (vals["hba1c_percent"][:, ki] - vals["hba1c_percent"][:, :1])
    risk = prevent_risk(outcome=outcome, horizon_years=10, age_years=age, clip=True, **kw)
    log_ratio = np.log(_cum_hazard(risk)) - anchors.log_cum_hazard_at_baseline[outcome]
    return log_ratio, knot_t


def kfre_log_hazard(inputs: PatientInputs, traj: Trajectories) -> tuple[np.ndarray, np.ndarray]:
    """log of the KFRE-implied constant hazard at yearly knots on the untreated eGFR trajectory."""
    t = traj.t_years
    ki = _knot_index(t)
    knot_t = t[ki]
    egfr = inputs.egfr_ml_min_1_73m2 + (traj.egfr_natural[:, ki] - traj.egfr_natural[:, :1])
    # age is held at baseline: the 5-year risk already integrates ageing over its horizon, and KFRE's age
    # term is weak (and protective), so updating it would double count
    ages = np.full(knot_t.shape, inputs.age_years)
    common: dict[str, Any] = dict(sex=inputs.sex, uacr_mg_g=inputs.uacr_mg_g, clip=True)
    egfr_c = np.clip(egfr, *KFRE_EGFR_RANGE)
    log_h = np.log(_cum_hazard(kfre_risk(horizon_years=5, age_years=ages, egfr_ml_min_1_73m2=egfr_c, **common)) / 5)
    hi = np.log(_cum_hazard(kfre_risk(horizon_years=5, age_years=ages, egfr_ml_min_1_73m2=60.0, **common)))
    lo = np.log(_cum_hazard(kfre_risk(horizon_years=5, age_years=ages, egfr_ml_min_1_73m2=55.0, **common)))
    per_unit = (hi - lo) / 5.0
    log_h = log_h + per_unit * np.maximum(egfr - KFRE_EGFR_RANGE[1], 0.0)
    return log_h, knot_t


def background_death_hazard(inputs: PatientInputs, t_mid: np.ndarray) -> np.ndarray:
    """Non-CVD death hazard per year at month midpoints (Gompertz assumption, see the data file)."""
    spec = dynamics_parameters()["background_mortality"]
    age = inputs.age_years + t_mid
    hazard: np.ndarray = spec["h60"][inputs.sex] * np.exp(spec["b_per_year"] * (age - 60.0)) * spec["non_cvd_share"]
    return hazard


def _mid(x: np.ndarray) -> np.ndarray:
    mid: np.ndarray = 0.5 * (x[:, 1:] + x[:, :-1])
    return mid


def hazard_paths(
    inputs: PatientInputs,
    anchors: Anchors,
    traj: Trajectories,
    draws: ParameterDraws,
    scenario: Scenario,
    dynamic: bool = True,
) -> dict[str, np.ndarray]:
    """Hazard per year for each month (draws, months) and outcome (death: shape (months,))."""
    t = traj.t_years
    t_mid = 0.5 * (t[1:] + t[:-1])
    decade = np.minimum((t_mid // 10).astype(int), len(anchors.hazard_per_decade["total_cvd"]) - 1)
    vals = traj.values
    ratios = draws.ratios

    d_ldl = _mid(vals["ldl_cholesterol_mg_dl"]) - vals["ldl_cholesterol_mg_dl"][:, :1]
    d_sbp = _mid(vals["systolic_bp_mm_hg"]) - vals["systolic_bp_mm_hg"][:, :1]
    log_ldl = (d_ldl / MG_DL_PER_MMOL_L_LDL) * -np.log(ratios["ldl_major_vascular_rr_per_mmol_l"])[:, None]
    log_sbp_cvd = (d_sbp / 10.0) * -np.log(ratios["sbp_major_cvd_rr_per_10_mm_hg"])[:, None]
    log_sbp_hf = (d_sbp / 10.0) * -np.log(ratios["sbp_heart_failure_rr_per_10_mm_hg"])[:, None]

    log_gen = np.zeros(draws.n)
    if inputs.fh_variant:
        log_gen = log_gen + np.log(ratios["fh_variant_cad_or_at_same_ldl"])
    if inputs.cad_prs_z is not None:
        name = "cad_prs_hr_per_sd"
        if inputs.race is not None and inputs.race.lower() in _AFRICAN_ANCESTRY_RACES:
            name = "cad_prs_hr_per_sd_african_ancestry"
        log_gen = log_gen + inputs.cad_prs_z * np.log(ratios[name])
    log_smoke = np.zeros(draws.n)
    if scenario.has("smoking_cessation") is not None and inputs.current_smoker:
        log_smoke = np.log(ratios["smoking_cessation_cvd_hr"])

    def anchored(outcome: str) -> np.ndarray:
        base = anchors.hazard_per_decade[outcome][decade][None, :]
        if not dynamic:
            return np.broadcast_to(base, (draws.n, t_mid.size))
        log_r, knot_t = prevent_log_ratio(inputs, anchors, traj, outcome)
        hazard: np.ndarray = base * np.exp(_interp_knots_to_months(log_r, knot_t, t_mid))
        return hazard

    share = float(min(1.0, anchors.hazard_per_decade["ascvd"][0] / anchors.hazard_per_decade["total_cvd"][0]))
    ascvd_mult = np.exp(log_ldl + log_gen[:, None])
    out: dict[str, np.ndarray] = {}
    out["ascvd"] = anchored("ascvd") * ascvd_mult * np.exp(log_sbp_cvd + log_smoke[:, None])
    out["total_cvd"] = (
        anchored("total_cvd") * (share * ascvd_mult + (1.0 - share)) * np.exp(log_sbp_cvd + log_smoke[:, None])
    )
    out["heart_failure"] = anchored("heart_failure") * np.exp(log_sbp_hf + log_smoke[:, None])

    if anchors.kidney_mode == "kfre":
        log_h, knot_t = kfre_log_hazard(inputs, traj)
        kf = np.exp(_interp_knots_to_months(log_h, knot_t, t_mid))
        if scenario.has("sglt2i") is not None:
            kf = kf * ratios["sglt2i_kidney_progression_rr"][:, None]
        out["kidney_failure"] = kf
    else:
        threshold = dynamics_parameters()["kidney_failure_egfr_threshold"]["value"]
        below = _mid(vals["egfr_ml_min_1_73m2"]) < threshold
        out["kidney_failure"] = np.where(below, THRESHOLD_HAZARD_PER_YEAR, 0.0)
    out["death"] = background_death_hazard(inputs, t_mid)
    return out


def competing_cif(hazard: np.ndarray, death: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Discrete-time competing risks: CIF of the event and of death-before-event, (draws, months+1).

    Within a month hazards are constant, so P(any) = 1 - exp(-(h+d) dt), split in proportion h : d.
    """
    total = hazard + death
    n, m = total.shape
    cum = np.empty((n, m + 1))
    cum[:, 0] = 0.0
    np.cumsum(total * dt, axis=1, out=cum[:, 1:])
    surv = np.exp(-cum)  # S at month starts 0..m
    frac = np.divide(hazard, total, out=np.zeros_like(total), where=total > 0)
    cif_event = np.empty((n, m + 1))
    cif_event[:, 0] = 0.0
    np.cumsum((surv[:, :-1] - surv[:, 1:]) * frac, axis=1, out=cif_event[:, 1:])
    cif_death = np.clip(1.0 - surv - cif_event, 0.0, 1.0)  # everything that left the event-free state
    return cif_event, cif_death


def cumulative_incidence(hazards: dict[str, np.ndarray], dt: float, with_death: bool = True) -> dict[str, np.ndarray]:
    """CIF per outcome; ``death`` is non-CVD death before a first CVD event (competing with total CVD)."""
    any_event = hazards["total_cvd"]
    death = np.broadcast_to(hazards["death"], any_event.shape) if with_death else np.zeros_like(any_event)
    out: dict[str, np.ndarray] = {}
    for outcome in ("ascvd", "total_cvd", "heart_failure", "kidney_failure"):
        out[outcome], death_cif = competing_cif(hazards[outcome], death, dt)
        if outcome == "total_cvd":
            out["death"] = death_cif
    return out
