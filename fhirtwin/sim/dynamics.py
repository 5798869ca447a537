"""Biomarker trajectories: the population-expected path plus a mean-reverting individual deviation.

Why this shape: the published equations the hazards are anchored on (PREVENT, KFRE) already contain
the average future course of a patient with the given baseline values. So each biomarker is split into

    x(t) = x0 * exp(E(t) + D(t)) * (treatment effects)

* ``E(t)``: the population-expected log change for the patient's age (and, for eGFR, albuminuria):
  the published average yearly (absolute) changes integrated over attained age, so the expected course
  is linear in the value (``course.expected_log_change``, ``dynamics_parameters.json``). A patient on this
  path is the patient the equations describe: their hazards are exactly the anchored ones.
* ``D(t)``: the patient's deviation, an integrated Ornstein-Uhlenbeck process on the log scale
  (Taylor, Cumberland & Sy, JASA 1994;89:727): the deviation of the *slope* from the expected slope
  starts at the slope calibrated from the patient's own history and reverts to zero at rate ``alpha``,
  with Brownian innovations. A steep eGFR history therefore persists for a few years and then fades,
  and the log scale keeps every value positive without floors that pile up probability.

Only ``x(t) - x_expected(t)`` (the deviation, including treatment effects) moves hazards
(``hazards.py``). The integrated-OU transition over one year is exact (joint Gaussian of the slope and
its integral); values between yearly knots are interpolated linearly. Couplings across scales: HbA1c
above its expected path steepens eGFR decline (``gamma``); APOL1 enters through the prior of the
patient's eGFR slope (calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fhirtwin.sim._params import dynamics_parameters
from fhirtwin.sim.calibration import LinearPosterior
from fhirtwin.sim.course import current_value, deviation_parameters, expected_log_change, expected_slope
from fhirtwin.sim.ensemble import ParameterDraws
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import LDL_ADD_ONS, Scenario

TRAJECTORY_VARIABLES = (
    "ldl_cholesterol_mg_dl",
    "systolic_bp_mm_hg",
    "egfr_ml_min_1_73m2",
    "hba1c_percent",
    "bmi_kg_m2",
)
SBP_TREATMENT_FLOOR_MM_HG = 110.0


def month_grid(horizon_years: float) -> np.ndarray:
    """Times in years of months 0..12*horizon (inclusive)."""
    months = int(round(12 * horizon_years))
    if months < 1:
        raise ValueError("horizon_years must be at least one month")
    return np.arange(months + 1) / 12.0


def interpolation_matrix(knot_t: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Weights W (knots, times) such that values_at_knots @ W interpolates linearly (one BLAS call)."""
    idx = np.clip(np.searchsorted(knot_t, t, side="right") - 1, 0, knot_t.size - 2)
    span = np.maximum(knot_t[idx + 1] - knot_t[idx], 1e-12)
    frac = np.clip((t - knot_t[idx]) / span, 0.0, 1.0)
    w = np.zeros((knot_t.size, t.size))
    cols = np.arange(t.size)
    w[idx, cols] = 1.0 - frac
    w[idx + 1, cols] += frac
    return w


def onset(t: np.ndarray, tau: float) -> np.ndarray:
    """First-order approach to a new steady state after a change at t=0 (0 before, ->1 after)."""
    approach: np.ndarray = 1.0 - np.exp(-np.maximum(t, 0.0) / tau)
    return approach


def iou_knots(w0: np.ndarray, z: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """Integrated OU at yearly knots: D(0)=0, slope W(0)=w0, innovations z (draws, years, 2) ~ N(0, 1).

    Exact one-year transition: W' = W e^{-a} + e1; D' = D + W (1 - e^{-a}) / a + e2, with (e1, e2)
    jointly Gaussian (variances and covariance of the OU process and its integral over one year).
    """
    e = np.exp(-alpha)
    v1 = sigma**2 * (1 - e**2) / (2 * alpha)
    v2 = sigma**2 / alpha**2 * (1.0 - 2 * (1 - e) / alpha + (1 - e**2) / (2 * alpha))
    c12 = sigma**2 / (2 * alpha**2) * (1 - e) ** 2
    l11 = np.sqrt(v1)
    l21 = c12 / l11
    l22 = np.sqrt(max(v2 - l21**2, 0.0))
    n, years = z.shape[:2]
    d = np.zeros((n, years + 1))
    w = w0.astype(float).copy()
    for k in range(years):
        e1 = l11 * z[:, k, 0]
        e2 = l21 * z[:, k, 0] + l22 * z[:, k, 1]
        d[:, k + 1] = d[:, k] + w * (1 - e) / alpha + e2
        w = w * e + e1
    return d


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Biomarker paths (draws, months+1) and their deviations from the expected path.

    ``values``: what the patient's biomarker does under the scenario (displayed). ``deviation``: values
    minus the draw's expected path (absolute units), which is what moves hazards. ``expected``: the
    expected path from the measured baseline (months+1,), used to evaluate the equations.
    ``egfr_natural_deviation`` ignores the SGLT2 inhibitor's slope effect (its kidney effect enters the
    hazard once, as the trial measured it).
    """

    t_years: np.ndarray
    values: dict[str, np.ndarray]
    deviation: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    egfr_natural_deviation: np.ndarray


def _statin_fraction(inputs: PatientInputs, draws: ParameterDraws) -> np.ndarray:
    """LDL lowering of the current regimen, per draw (0 when not on a statin)."""
    if not inputs.on_statin:
        return np.zeros(draws.n)
    intensity = inputs.statin_intensity or "moderate"
    return draws.ldl_lowering.get(intensity, draws.ldl_lowering["moderate"])


def simulate_trajectories(
    inputs: PatientInputs,
    posteriors: dict[str, LinearPosterior],
    draws: ParameterDraws,
    scenario: Scenario,
    t: np.ndarray,
    dynamic: bool = True,
) -> Trajectories:
    """Trajectories for one scenario on the shared draws (``dynamic=False``: the expected path only)."""
    params = dynamics_parameters()
    tau = params["treatment_onset_time_constant_years"]
    gamma = float(params["egfr_slope_per_hba1c_percent"]["value"])
    knots_to_months = interpolation_matrix(np.arange(draws.years + 1, dtype=float), t)
    values: dict[str, np.ndarray] = {}
    natural_log: dict[str, np.ndarray] = {}
    start: dict[str, np.ndarray] = {}
    expected_log: dict[str, np.ndarray] = {}

    knot_years = np.arange(draws.years + 1, dtype=float)
    slow: dict[str, np.ndarray] = {}  # untreated markers computed at the yearly knots, interpolated for display
    for variable in TRAJECTORY_VARIABLES:
        if variable not in draws.level_slope or current_value(inputs, variable) is None:
            continue
        e = expected_log_change(inputs, variable, t)
        expected_log[variable] = e
        level = draws.level_slope[variable][:, :1]
        start[variable] = level
        d_knots = np.zeros((draws.n, knot_years.size))
        if dynamic:
            x0 = float(current_value(inputs, variable) or 0.0)
            sd, alpha = deviation_parameters(inputs, variable)
            w0 = (draws.level_slope[variable][:, 1] - float(expected_slope(inputs, variable, inputs.age_years))) / x0
            d_knots = iou_knots(w0, draws.innovations[variable], alpha, np.sqrt(2 * alpha) * sd / x0)
        if variable in ("hba1c_percent", "bmi_kg_m2"):
            e_knots = expected_log_change(inputs, variable, knot_years)[None, :]
            slow[variable] = level * np.exp(e_knots) * np.expm1(d_knots)  # deviation at the knots
            values[variable] = (level * np.exp(e_knots + d_knots)) @ knots_to_months
        elif dynamic:
            natural_log[variable] = e[None, :] + d_knots @ knots_to_months
        else:
            natural_log[variable] = np.broadcast_to(e, (draws.n, t.size))

    expected_abs = {v: start[v] * np.exp(expected_log[v])[None, :] for v in start if v not in slow}

    # LDL-C: current regimen started after the last LDL, then the scenario's lipid drugs
    ldl = start["ldl_cholesterol_mg_dl"] * np.exp(natural_log["ldl_cholesterol_mg_dl"])
    post_ldl = posteriors["ldl_cholesterol_mg_dl"]
    r_cur = _statin_fraction(inputs, draws)[:, None]
    if post_ldl.pending_regimen_start is not None:
        ldl = ldl * (1.0 - r_cur * onset(t - post_ldl.pending_regimen_start, tau["statin"]))
    statin = scenario.has("statin")
    if statin is not None:
        assert statin.intensity is not None  # a statin Intervention always has one (checked on creation)
        r_new = (np.full((draws.n, 1), statin.ldl_lowering_percent / 100.0) if statin.ldl_lowering_percent
                 else draws.ldl_lowering[statin.intensity][:, None])
        rho = (1.0 - np.maximum(r_new, r_cur)) / (1.0 - r_cur)
        ldl = ldl * (1.0 - (1.0 - rho) * onset(t, tau["statin"]))
    for add_on in (i for i in scenario.interventions if i.kind in LDL_ADD_ONS):
        fraction = (add_on.ldl_lowering_percent / 100.0 if add_on.ldl_lowering_percent is not None
                    else draws.ldl_lowering[add_on.kind][:, None])
        ldl = ldl * (1.0 - fraction * onset(t, tau["statin"]))
    values["ldl_cholesterol_mg_dl"] = ldl

    # SBP: one more antihypertensive lowers SBP by the drawn response, never below 110 mmHg from treatment
    sbp = start["systolic_bp_mm_hg"] * np.exp(natural_log["systolic_bp_mm_hg"])
    post_sbp = posteriors["systolic_bp_mm_hg"]
    drop = draws.sbp_drop_mm_hg[:, None]
    if post_sbp.pending_regimen_start is not None:
        room = np.maximum(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)
        sbp = sbp - np.minimum(drop, room) * onset(t - post_sbp.pending_regimen_start, tau["bp_lowering"])
    bp = scenario.has("bp_lowering")
    if bp is not None and bp.sbp_drop_mm_hg is not None:  # a measured difference is applied as measured
        sbp = sbp - bp.sbp_drop_mm_hg * onset(t, tau["bp_lowering"])
    elif bp is not None:
        room = np.maximum(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)
        sbp = sbp - np.minimum(drop, room) * onset(t, tau["bp_lowering"])
    values["systolic_bp_mm_hg"] = sbp

    # eGFR: its own course, plus HbA1c above its expected path steepening decline (log units of eGFR0)
    egfr_var = "egfr_ml_min_1_73m2"
    log_egfr = natural_log[egfr_var]
    if dynamic and "hba1c_percent" in slow:
        excess = slow["hba1c_percent"]  # HbA1c above its expected course, at the yearly knots
        integral = np.zeros_like(excess)
        integral[:, 1:] = np.cumsum(0.5 * (excess[:, 1:] + excess[:, :-1]), axis=1)  # one-year steps
        log_egfr = log_egfr + gamma * (integral @ knots_to_months) / start[egfr_var]
    natural_egfr = start[egfr_var] * np.exp(log_egfr)
    egfr = natural_egfr
    if scenario.has("sglt2i") is not None:
        # displayed course only: the chronic slope scaled by the trial RR (the hazard gets the RR once)
        rr = draws.ratios["sglt2i_kidney_progression_rr"][:, None]
        egfr = start[egfr_var] * np.exp(log_egfr * rr)
    values[egfr_var] = egfr

    deviation = {v: values[v] - expected_abs[v] for v in values if v not in slow}
    deviation.update({v: d @ knots_to_months for v, d in slow.items()})
    measured = {v: current_value(inputs, v) for v in values}
    baseline: dict[str, Any] = {v: float(m) * np.exp(expected_log[v]) for v, m in measured.items() if m is not None}
    return Trajectories(t, values, deviation, baseline, natural_egfr - expected_abs[egfr_var])
