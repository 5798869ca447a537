"""Coupled monthly trajectories of LDL-C, SBP, HbA1c, BMI and eGFR, vectorised over draws.

Why closed forms: the ensemble needs thousands of trajectories per patient in milliseconds. The model
is a small linear ODE system whose solution is known in closed form, evaluated on a monthly grid:

    level_x(t)  = a_x + b_x t + W_x(t)                 (calibrated level and drift, random walk W)
    LDL(t)      = level_LDL(t) * (1 - (1 - rho) * phi(t))      rho = (1 - r_new) / (1 - r_current)
    SBP(t)      = level_SBP(t) - drop * phi(t)                 (not below 110 mmHg from treatment)
    dE/dt       = s * f_sglt2 + gamma * (HbA1c(t) - HbA1c(0)) + dW_E/dt
    phi(t)      = 1 - exp(-t / tau)                            first-order treatment onset

``a_x, b_x`` come from the calibration posterior; W is Brownian motion sampled at yearly knots and
interpolated linearly (captures drift the linear model misses). Couplings across scales: HbA1c drives
the eGFR slope (gamma); APOL1 and diabetes enter through the eGFR slope prior (calibration); eGFR,
BMI and HbA1c feed the equations in ``hazards``; FH and PRS scale hazards there. The same system is
integrated draw by draw with ``solve_ivp`` in ``benchmarks/bench_ensemble.py`` as a reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fhirtwin.sim._params import dynamics_parameters
from fhirtwin.sim.calibration import LinearPosterior
from fhirtwin.sim.ensemble import ParameterDraws
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import Scenario

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


def interpolate_knots(knots: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of yearly knots (draws, years+1) at t = 0, 1, 2... onto times t (years)."""
    values: np.ndarray = knots @ interpolation_matrix(np.arange(knots.shape[1], dtype=float), t)
    return values


def onset(t: np.ndarray, tau: float) -> np.ndarray:
    """First-order approach to a new steady state after a change at t=0 (0 before, ->1 after)."""
    approach: np.ndarray = 1.0 - np.exp(-np.maximum(t, 0.0) / tau)
    return approach


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Latent (noise-free) biomarker paths, each (draws, months+1); ``egfr_natural`` ignores SGLT2i."""

    t_years: np.ndarray
    values: dict[str, np.ndarray]
    egfr_natural: np.ndarray


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
    """Trajectories for one scenario on the shared draws (``dynamic=False``: flat natural history)."""
    params = dynamics_parameters()
    tau = params["treatment_onset_time_constant_years"]
    gamma = params["egfr_slope_per_hba1c_percent"]["value"]
    bio = params["biomarkers"]
    out: dict[str, np.ndarray] = {}

    def natural(variable: str) -> np.ndarray:
        ab = draws.level_slope[variable]
        level = ab[:, :1]
        if not dynamic:
            return np.broadcast_to(level, (draws.n, t.size)).copy()
        path = level + ab[:, 1:] * t
        walk = interpolate_knots(draws.walk_knots[variable], t)
        relative = "relative" in bio[variable]["process_sd_per_sqrt_year"]
        values: np.ndarray = path * np.exp(walk) if relative else path + walk
        return values

    # LDL-C
    ldl = natural("ldl_cholesterol_mg_dl")
    post_ldl = posteriors["ldl_cholesterol_mg_dl"]
    r_cur = _statin_fraction(inputs, draws)[:, None]
    if post_ldl.pending_regimen_start is not None:  # regimen started after the last LDL: apply it now
        ldl = ldl * (1.0 - r_cur * onset(t - post_ldl.pending_regimen_start, tau["statin"]))
    statin = scenario.has("statin")
    if statin is not None:
        assert statin.intensity is not None  # a statin Intervention always has one (checked on creation)
        r_new = draws.ldl_lowering[statin.intensity][:, None]
        rho = (1.0 - np.maximum(r_new, r_cur)) / (1.0 - r_cur)
        ldl = ldl * (1.0 - (1.0 - rho) * onset(t, tau["statin"]))
    out["ldl_cholesterol_mg_dl"] = np.maximum(ldl, bio["ldl_cholesterol_mg_dl"]["floor"])

    # SBP
    sbp = natural("systolic_bp_mm_hg")
    post_sbp = posteriors["systolic_bp_mm_hg"]
    drop = draws.sbp_drop_mm_hg[:, None]
    if post_sbp.pending_regimen_start is not None:
        room = np.maximum(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)
        sbp = sbp - np.minimum(drop, room) * onset(t - post_sbp.pending_regimen_start, tau["bp_lowering"])
    if scenario.has("bp_lowering") is not None:
        room = np.maximum(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)
        sbp = sbp - np.minimum(drop, room) * onset(t, tau["bp_lowering"])
    out["systolic_bp_mm_hg"] = np.maximum(sbp, bio["systolic_bp_mm_hg"]["floor"])

    # HbA1c and BMI
    if "hba1c_percent" in draws.level_slope:
        out["hba1c_percent"] = np.maximum(natural("hba1c_percent"), bio["hba1c_percent"]["floor"])
    out["bmi_kg_m2"] = np.maximum(natural("bmi_kg_m2"), bio["bmi_kg_m2"]["floor"])

    # eGFR: dE/dt = slope * f + gamma * (HbA1c(t) - HbA1c(0)); integral by the trapezoid rule
    ab = draws.level_slope["egfr_ml_min_1_73m2"]
    level, slope = ab[:, :1], ab[:, 1:]
    if not dynamic:
        egfr_nat = np.broadcast_to(level, (draws.n, t.size)).copy()
        egfr = egfr_nat
    else:
        drift = np.zeros((draws.n, t.size))
        if "hba1c_percent" in out:
            excess = out["hba1c_percent"] - out["hba1c_percent"][:, :1]
            dt = np.diff(t)
            drift[:, 1:] = gamma * np.cumsum(0.5 * (excess[:, 1:] + excess[:, :-1]) * dt, axis=1)
        walk = interpolate_knots(draws.walk_knots["egfr_ml_min_1_73m2"], t)
        egfr_nat = level + slope * t + drift + walk
        egfr = egfr_nat
        if scenario.has("sglt2i") is not None:
            rr = draws.ratios["sglt2i_kidney_progression_rr"][:, None]
            # the chronic slope is scaled by the trial RR (assumption, see dynamics_parameters.json)
            egfr = level + slope * rr * t + drift + walk
    floor = bio["egfr_ml_min_1_73m2"]["floor"]
    out["egfr_ml_min_1_73m2"] = np.maximum(egfr, floor)
    return Trajectories(t, out, np.maximum(egfr_nat, floor))

