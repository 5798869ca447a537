"""Patient-specific levels and drifts from the patient's own history, by conjugate Bayesian regression.

Why: a twin must follow *this* patient's trajectory (an eGFR falling 4 mL/min/yr is not the population's
1 mL/min/yr), yet a patient with two measurements must not get a wild slope. A Gaussian prior on
(level at as_of, slope per year) plus Gaussian measurement noise gives a closed-form Gaussian posterior:
many points -> the data dominate; few points -> the estimate shrinks toward the population prior. The
posterior is drawn from in the ensemble, so calibration uncertainty reaches every forecast.

Measurement noise: the population within-person sd (published biological plus analytical variation,
``dynamics_parameters.json``) is the centre of a scaled-inverse-chi-square prior on a per-patient noise
scale, because within-person variability differs between people. The patient's own residual scatter
updates it (two-pass: fit, estimate the scale from the standardised residuals, refit), so a patient
whose values scatter little gets narrower intervals and one who scatters a lot gets wider ones. The
future measurement noise is then Student-t with the posterior degrees of freedom.

Priors and noise levels live in ``dynamics_parameters.json`` with their sources/assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fhirtwin.sim._params import dynamics_parameters, intervention_parameters
from fhirtwin.sim.course import deviation_parameters, expected_slope
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
    noise_scale: float = 1.0
    noise_dof: float = float("inf")
    sex: str | None = None
    age_years: float | None = None

    def predictive_noise_sd(self, values: np.ndarray) -> np.ndarray:
        """Scale of a future measurement's noise around latent ``values`` (this patient's noise scale)."""
        return self.noise_scale * noise_sd(self.variable, values, sex=self.sex, age_years=self.age_years)

    def predictive_noise(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws of future measurement noise around latent ``values`` (Student-t, ``noise_dof`` df)."""
        values = np.asarray(values, dtype=float)
        if np.isfinite(self.noise_dof):
            z = rng.standard_t(self.noise_dof, values.shape)
        else:
            z = rng.standard_normal(values.shape)
        return self.predictive_noise_sd(values) * z

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


def total_cv(spec: dict[str, Any]) -> float:
    """Within-person CV of one measurement: biological (CVI) and analytical (CVA) combined in quadrature."""
    return float(np.hypot(spec["within_subject_cv"], spec["analytical_cv"]))


def egfr_creatinine_elasticity(values: np.ndarray, sex: str | None, age_years: float | None) -> np.ndarray:
    """|d ln eGFR / d ln creatinine| of CKD-EPI 2021 at each eGFR value.

    The equation has exponent ``b`` (-1.200) above creatinine ``kappa`` and ``alpha`` (-0.241 women,
    -0.302 men) below it, so a given creatinine CV moves a low eGFR five times more than a high one.
    Without sex and age the steeper exponent is used (conservative).
    """
    from fhirtwin.sim.equations._validation import load_data

    data = load_data("ckd_epi_2021.json")
    steep = abs(float(data["b"]))
    if sex not in ("female", "male") or age_years is None:
        return np.full(np.shape(values), steep)
    p = data["sex"][sex]
    egfr_at_kappa = float(data["a"]) * float(data["c"]) ** float(age_years) * float(p["sex_factor"])
    return np.where(np.asarray(values) < egfr_at_kappa, steep, abs(float(p["alpha"])))


def noise_sd(
    variable: str, values: np.ndarray, *, sex: str | None = None, age_years: float | None = None
) -> np.ndarray:
    """Population within-person sd of one measurement at each value, from the data file.

    ``absolute``: a fixed sd. ``cv``: biological and analytical CV combined, times the value. For eGFR
    the creatinine CV is carried through the CKD-EPI 2021 exponent (needs sex and age, see
    :func:`egfr_creatinine_elasticity`).
    """
    spec = dynamics_parameters()["biomarkers"][variable]["noise_sd"]
    values = np.asarray(values, dtype=float)
    if "absolute" in spec:
        return np.full(values.shape, float(spec["absolute"]))
    cv: float | np.ndarray = total_cv(spec)
    if spec.get("propagate_through") == "ckd_epi_2021":
        cv = cv * egfr_creatinine_elasticity(values, sex, age_years)
    sd: np.ndarray = np.maximum(cv * np.abs(values), 1e-6)
    return sd


def noise_scale_posterior(
    times: np.ndarray, values: np.ndarray, sd: np.ndarray, mean: np.ndarray, cov: np.ndarray,
    prior_dof: float, design_times: np.ndarray | None = None,
) -> tuple[float, float]:
    """Posterior (scale, dof) of the patient's noise multiplier k (noise sd = k * population sd).

    Prior: k^2 ~ scaled-inverse-chi-square(prior_dof, 1), centred on the published sd. Data: the
    standardised residuals of the fit, with the degrees of freedom the fit used (trace of the hat
    matrix) removed. Returns sqrt of the posterior scale and its degrees of freedom.
    """
    g = np.asarray(times if design_times is None else design_times, dtype=float)
    x = np.column_stack([np.ones_like(g), g])
    z = (np.asarray(values, dtype=float) - x @ mean) / sd
    used = float(np.sum((x @ cov) * x / sd[:, None] ** 2))
    dof = prior_dof + max(len(z) - used, 0.0)
    scale2 = (prior_dof + float(np.sum(z**2))) / dof
    return float(np.sqrt(scale2)), dof


def slope_prior(inputs: PatientInputs, variable: str) -> tuple[float, float]:
    """Prior (mean, sd) of the patient's yearly slope: the expected slope at their age, and the spread of
    individual slopes around it; APOL1 high risk shifts the eGFR prior (a deviation the anchors lack)."""
    mean = float(expected_slope(inputs, variable, inputs.age_years))
    sd, _ = deviation_parameters(inputs, variable)
    if variable == "egfr_ml_min_1_73m2" and inputs.apol1_high_risk:
        mean += float(dynamics_parameters()["apol1_high_risk_egfr_slope_shift"]["value"])
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
    sd = noise_sd(variable, y, sex=inputs.sex, age_years=inputs.age_years)
    mean, cov = bayes_linear(t, y, prior_mean=prior_mean, prior_cov=prior_cov, noise_sd=sd, design_times=design_times)
    prior_dof = float(spec["noise_sd"]["prior_dof"])
    scale, dof = noise_scale_posterior(t, y, sd, mean, cov, prior_dof, design_times)
    if dof > prior_dof:  # refit with this patient's noise level
        sd = sd * scale
        mean, cov = bayes_linear(
            t, y, prior_mean=prior_mean, prior_cov=prior_cov, noise_sd=sd, design_times=design_times
        )
    else:
        scale = 1.0
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
        noise_scale=scale,
        noise_dof=dof,
        sex=inputs.sex,
        age_years=inputs.age_years,
    )


def calibrate(inputs: PatientInputs) -> dict[str, LinearPosterior]:
    """Posteriors for every biomarker with data (HbA1c may be absent: it is then not simulated)."""
    out: dict[str, LinearPosterior] = {}
    for variable in HISTORY_VARIABLES:
        post = calibrate_variable(inputs, variable)
        if post is not None:
            out[variable] = post
    return out
