"""The population-expected course of each biomarker, the patient's deviation from it, and unmeasured UACR.

Why its own module: calibration (the prior of a patient's slope) and dynamics (the simulated paths)
must use the same expected course, or a patient on it would not reproduce the anchoring equations.
Average yearly changes by age come from published longitudinal cohorts (``dynamics_parameters.json``).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from fhirtwin.sim._params import dynamics_parameters
from fhirtwin.sim.inputs import PatientInputs


def current_value(inputs: PatientInputs, variable: str) -> float | None:
    """The measured baseline value the anchoring equations were evaluated with."""
    value: float | None = getattr(inputs, variable)
    return value


def expected_slope(inputs: PatientInputs, variable: str, ages: np.ndarray | float) -> np.ndarray:
    """Population-average change per year (absolute units) at the given ages, for this patient's covariates."""
    spec = dynamics_parameters()["biomarkers"][variable]["expected_slope_per_year"]
    table = np.asarray(spec["by_age"], dtype=float)
    slope = np.interp(np.asarray(ages, dtype=float), table[:, 0], table[:, 1])
    if inputs.diabetes and "diabetes" in spec:
        slope = slope + float(spec["diabetes"])
    if variable == "egfr_ml_min_1_73m2":
        uacr = inputs.uacr_mg_g if inputs.uacr_mg_g is not None else unmeasured_uacr(inputs)[0]
        slope = slope + float(spec["per_ln_uacr_above_10_mg_g"]) * max(0.0, float(np.log(uacr / 10.0)))
    result: np.ndarray = np.asarray(slope, dtype=float)
    return result


def unmeasured_uacr(inputs: PatientInputs) -> tuple[float, float]:
    """(median mg/g, log-sd) of the log-normal UACR assumed when none was measured.

    The share above 30 mg/g moves linearly with eGFR between the published CKD G3 share (eGFR <= 45) and
    the whole-population share by diabetes (eGFR >= 90), so the assumption has no step at any eGFR.
    """
    spec = dynamics_parameters()["uacr_when_unmeasured"]
    shares = spec["share_at_least_30_mg_g"]
    high = shares["egfr_90_or_above_diabetes" if inputs.diabetes else "egfr_90_or_above_no_diabetes"]
    share = float(np.interp(inputs.egfr_ml_min_1_73m2, [45.0, 90.0], [shares["egfr_45_or_below"], high]))
    log_sd = float(spec["log_sd"])
    return float(30.0 / np.exp(log_sd * norm.ppf(1.0 - share))), log_sd


#: The expected course never falls below this fraction of the baseline value (a linear decline would reach
#: zero; the individual deviation and the hazards carry what happens near kidney failure).
EXPECTED_FLOOR_FRACTION = 0.05


def expected_log_change(inputs: PatientInputs, variable: str, t: np.ndarray) -> np.ndarray:
    """E(t) = ln(x_expected(t) / x0): the published absolute slopes integrated over attained age.

    The cited slopes are absolute (e.g. mL/min/1.73 m2 per year), so the expected course is linear in the
    value, not in its logarithm: a patient at eGFR 30 losing 4 per year is expected at 10 after 5 years.
    """
    x0 = current_value(inputs, variable)
    if x0 is None:
        raise ValueError(f"{variable} has no baseline value")
    slope = expected_slope(inputs, variable, inputs.age_years + t)
    change = np.zeros_like(t)
    change[1:] = np.cumsum(0.5 * (slope[1:] + slope[:-1]) * np.diff(t))
    out: np.ndarray = np.log(np.maximum(1.0 + change / x0, EXPECTED_FLOOR_FRACTION))
    return out


def deviation_parameters(inputs: PatientInputs, variable: str) -> tuple[float, float]:
    """(stationary sd of the slope deviation in absolute units per year, reversion rate per year)."""
    spec = dynamics_parameters()["biomarkers"][variable]["slope_deviation"]
    sd = float(spec["stationary_sd_per_year"])
    if variable == "hba1c_percent" and inputs.diabetes:
        sd = float(spec["stationary_sd_per_year_diabetes"])
    return sd, float(spec["reversion_per_year"])


