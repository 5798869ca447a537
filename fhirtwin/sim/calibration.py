"""Patient-specific levels and drifts from the patient's own history, by conjugate Bayesian regression.

Why: a twin must follow *this* patient's trajectory (an eGFR falling 4 mL/min/yr is not the population's
1 mL/min/yr), yet a patient with two measurements must not get a wild slope. A Gaussian prior on
(level at as_of, slope per year) plus Gaussian measurement noise gives a closed-form Gaussian posterior:
many points -> the data dominate; few points -> the estimate shrinks toward the population prior. The
posterior is drawn from in the ensemble, so calibration uncertainty reaches every forecast.

Priors and noise levels live in ``dynamics_parameters.json`` with their sources/assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fhirtwin.sim._params import dynamics_parameters, intervention_parameters
from fhirtwin.sim.inputs import HISTORY_VARIABLES, PatientInputs

ONSET_YEARS = 0.08  # points within ~1 month after a regimen change are not at steady state


@dataclass(frozen=True, eq=False)
class LinearPosterior:
    """Gaussian posterior of (level at t=0, slope per year) for one biomarker.

    ``pending_regimen_start`` is set when the current treatment started after the last usable
    measurement: the level is then the pre-treatment level and the dynamics apply the regimen's effect
    from that start time.
    """

    variable: str
    mean: np.ndarray
    cov: np.ndarray
    prior_mean: np.ndarray
    prior_cov: np.ndarray
    n_points: int
    noise_sd: float
    pending_regimen_start: float | None = None
    design: str = "linear"

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n posterior draws, shape (n, 2): column 0 level, column 1 slope."""
        chol = np.linalg.cholesky(self.cov + 1e-12 * np.eye(2))
        return self.mean + rng.standard_normal((n, 2)) @ chol.T

    def slope_interval(self, level: float = 0.90) -> tuple[float, float]:
        """Central credible interval of the slope."""
        from scipy.stats import norm

        z = float(norm.ppf(0.5 + level / 2))
        sd = float(np.sqrt(self.cov[1, 1]))
        return float(self.mean[1] - z * sd), float(self.mean[1] + z * sd)


def bayes_linear(
    times: np.ndarray,
    values: np.ndarray,
    *,
    prior_mean: np.ndarray,
    prior_cov: np.ndarray,
    noise_sd: np.ndarray | float,
    design_times: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Conjugate update for y = level + slope * g(t) + noise (known noise sd per point).

    ``design_times`` replaces t by g(t) in the slope column (used for a slope that changed at a known
    treatment start). Returns posterior mean (2,) and covariance (2, 2).
    """
    g = np.asarray(times if design_times is None else design_times, dtype=float)
    y = np.asarray(values, dtype=float)
    x = np.column_stack([np.ones_like(g), g])
    w = 1.0 / np.broadcast_to(np.asarray(noise_sd, dtype=float), y.shape) ** 2
    prior_prec = np.linalg.inv(prior_cov)
    post_prec = prior_prec + (x * w[:, None]).T @ x
    post_cov = np.linalg.inv(post_prec)
    post_mean = post_cov @ (prior_prec @ prior_mean + (x * w[:, None]).T @ y)
    return post_mean, 0.5 * (post_cov + post_cov.T)


def noise_sd(variable: str, values: np.ndarray) -> np.ndarray:
    """Measurement sd per point (absolute, or relative to the value), from the data file."""
    spec = dynamics_parameters()["biomarkers"][variable]["noise_sd"]
    if "relative" in spec:
        return np.maximum(spec["relative"] * np.abs(values), 1e-6)
    return np.full(np.shape(values), float(spec["absolute"]))


def slope_prior(inputs: PatientInputs, variable: str) -> tuple[float, float]:
    """Population prior (mean, sd) of the yearly drift, shifted by covariates for eGFR."""
    params = dynamics_parameters()
    spec = params["biomarkers"][variable]
    prior = spec["drift_prior"]
    if variable == "hba1c_percent" and inputs.diabetes:
        prior = spec["drift_prior_diabetes"]
    mean, sd = float(prior["mean"]), float(prior["sd"])
    if variable == "egfr_ml_min_1_73m2":
        shifts = params["egfr_slope_prior_shifts"]
        mean += shifts["diabetes"] * inputs.diabetes + shifts["hypertension"] * inputs.hypertension
        mean += shifts["ckd"] * (inputs.ckd or inputs.egfr_ml_min_1_73m2 < 60)
        mean += shifts["apol1_high_risk"] * inputs.apol1_high_risk
    return mean, sd


def _current_value(inputs: PatientInputs, variable: str) -> float | None:
    return {
        "ldl_cholesterol_mg_dl": inputs.ldl_cholesterol_mg_dl,
        "systolic_bp_mm_hg": inputs.systolic_bp_mm_hg,
        "egfr_ml_min_1_73m2": inputs.egfr_ml_min_1_73m2,
        "hba1c_percent": inputs.hba1c_percent,
        "bmi_kg_m2": inputs.bmi_kg_m2,
    }[variable]


def _regimen_start(inputs: PatientInputs, variable: str) -> float | None:
    if variable == "ldl_cholesterol_mg_dl" and inputs.on_statin:
        return inputs.statin_start_years
    if variable == "systolic_bp_mm_hg" and inputs.on_bp_treatment:
        return inputs.bp_treatment_start_years
    return None


def calibrate_variable(inputs: PatientInputs, variable: str) -> LinearPosterior | None:
    """Posterior of level and slope for one biomarker (None when it was never measured)."""
    hist = inputs.history(variable)
    current = _current_value(inputs, variable)
    if len(hist) == 0:
        if current is None:
            return None
        hist = np.array([[0.0, float(current)]])
    t, y = hist[:, 0], hist[:, 1]

    pending = None
    start = _regimen_start(inputs, variable)
    if start is not None:
        after = t >= start + ONSET_YEARS
        if after.any():
            t, y = t[after], y[after]
        else:
            pending = float(start)

    design_times = None
    design = "linear"
    if variable == "egfr_ml_min_1_73m2" and inputs.on_sglt2i and inputs.sglt2i_start_years is not None:
        # The slope parameter is the on-treatment slope; before the start the slope was slope / RR.
        rr = intervention_parameters()["ratios"]["sglt2i_kidney_progression_rr"]["value"]
        ts = float(inputs.sglt2i_start_years)
        design_times = np.where(t >= ts, t, ts + (t - ts) / rr)
        design = "sglt2i_piecewise"

    spec = dynamics_parameters()["biomarkers"][variable]
    s_mean, s_sd = slope_prior(inputs, variable)
    prior_mean = np.array([float(np.mean(y)), s_mean])
    prior_cov = np.diag([float(spec["level_prior_sd"]) ** 2, s_sd**2])
    sd = noise_sd(variable, y)
    mean, cov = bayes_linear(t, y, prior_mean=prior_mean, prior_cov=prior_cov, noise_sd=sd, design_times=design_times)
    return LinearPosterior(
        variable=variable,
        mean=mean,
        cov=cov,
        prior_mean=prior_mean,
        prior_cov=prior_cov,
        n_points=len(y),
        noise_sd=float(np.mean(sd)),
        pending_regimen_start=pending,
        design=design,
    )


def calibrate(inputs: PatientInputs) -> dict[str, LinearPosterior]:
    """Posteriors for every biomarker with data (HbA1c may be absent: it is then not simulated)."""
    out: dict[str, LinearPosterior] = {}
    for variable in HISTORY_VARIABLES:
        post = calibrate_variable(inputs, variable)
        if post is not None:
            out[variable] = post
    return out
