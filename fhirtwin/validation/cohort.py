"""Virtual trial cohorts sampled from a published baseline table with a Gaussian copula.

Why a copula: a baseline table gives only marginals (means, SDs, medians, IQRs, fractions), but risk
depends on combinations (old age with low eGFR, diabetes with high HbA1c). A Gaussian copula keeps each
published marginal exactly and joins them with correlations from ``correlations.json`` (sources and
assumptions listed there). Binary traits enter as latent thresholds. CKD is not sampled: it is derived
from the sampled eGFR and UACR (KDIGO: eGFR < 60 or UACR >= 30), and the resulting fraction is reported
next to the trial's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm

from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.validation.spec import LogNormal, Normal, Population

_CORRELATIONS = Path(__file__).resolve().parent / "correlations.json"
#: Plausibility bounds used when the spec gives none (the marginal is truncated to them).
BOUNDS = {
    "age": (18.0, 100.0), "sbp": (80.0, 240.0), "tc": (80.0, 400.0), "hdl": (15.0, 150.0),
    "ldl": (20.0, 300.0), "bmi": (15.0, 70.0), "egfr": (5.0, 150.0), "hba1c": (4.0, 15.0),
    "ln_uacr": (0.5, 10000.0),
}
FIELDS = {
    "age": "age_years", "sbp": "systolic_bp_mm_hg", "tc": "total_cholesterol_mg_dl",
    "hdl": "hdl_cholesterol_mg_dl", "ldl": "ldl_cholesterol_mg_dl", "bmi": "bmi_kg_m2",
    "egfr": "egfr_ml_min_1_73m2", "hba1c": "hba1c_percent", "ln_uacr": "uacr_mg_g",
}
BINARY = {"male": "female", "diabetes": "diabetes", "smoker": "current_smoker"}
#: Friedewald LDL-C when a table gives none: TC - HDL - TG/5 with triglycerides 150 mg/dL (ASSUMPTION).
FRIEDEWALD_TG_OVER_5 = 30.0


def _correlations(names: list[str], prevalence: dict[str, float]) -> np.ndarray:
    """The copula correlation among ``names``, binary rows converted to latent scale, made positive definite."""
    data = json.loads(_CORRELATIONS.read_text(encoding="utf-8"))
    index = {n: i for i, n in enumerate(data["variables"])}
    full = np.asarray(data["matrix"], dtype=float)
    r = full[np.ix_([index[n] for n in names], [index[n] for n in names])].copy()
    for i, name in enumerate(names):
        if name in prevalence:  # point-biserial -> biserial: r * sqrt(p(1-p)) / phi(Phi^-1(p))
            p = prevalence[name]
            if not 0.01 <= p <= 0.99:  # (almost) constant: carries no correlation
                r[i, :] = 0.0
                r[:, i] = 0.0
                continue
            factor = np.sqrt(p * (1 - p)) / norm.pdf(norm.ppf(p))
            r[i, :] *= factor
            r[:, i] *= factor
    np.fill_diagonal(r, 1.0)
    values, vectors = np.linalg.eigh(0.5 * (r + r.T))
    fixed = vectors @ np.diag(np.maximum(values, 1e-3)) @ vectors.T
    scale = np.sqrt(np.diag(fixed))
    out: np.ndarray = np.clip(fixed / np.outer(scale, scale), -0.999, 0.999)
    np.fill_diagonal(out, 1.0)
    return out


def _truncated_normal(mu: float, sd: float, lo: float, hi: float, u: np.ndarray) -> np.ndarray:
    a, b = norm.cdf((lo - mu) / sd), norm.cdf((hi - mu) / sd)
    out: np.ndarray = mu + sd * norm.ppf(np.clip(a + u * (b - a), 1e-12, 1 - 1e-12))
    return out


def _quantile(marginal: Normal | LogNormal, u: np.ndarray, bounds: tuple[float, float], log: bool) -> np.ndarray:
    """Inverse CDF of the marginal truncated to its [min, max] (else ``bounds``) at probabilities ``u``.

    ``bounds`` are in natural units; ``log``: return the natural log (the copula's scale for UACR).
    """
    lo = marginal.min if marginal.min is not None else bounds[0]
    hi = marginal.max if marginal.max is not None else bounds[1]
    if isinstance(marginal, LogNormal):  # fitted to median and IQR on the log scale
        sd = (np.log(marginal.q3) - np.log(marginal.q1)) / (2 * norm.ppf(0.75))
        x = _truncated_normal(float(np.log(marginal.median)), float(sd), float(np.log(lo)), float(np.log(hi)), u)
        return x if log else np.exp(x)
    value = _truncated_normal(marginal.mean, marginal.sd, lo, hi, u)
    return np.log(np.maximum(value, 1e-6)) if log else value


@dataclass(frozen=True)
class VirtualCohort:
    """The sampled patients and the achieved prevalence of derived traits (for the report)."""

    patients: tuple[PatientInputs, ...]
    ckd_fraction: float
    out_of_scope_fraction: float


def sample_cohort(population: Population, n: int | None = None, seed: int | None = None) -> VirtualCohort:
    """``n`` virtual patients (default: the spec's ``n_virtual``) reproducibly from the spec's seed."""
    n = n or population.n_virtual
    rng = np.random.default_rng(population.seed if seed is None else seed)
    marginals = {k: getattr(population, f) for k, f in FIELDS.items() if getattr(population, f) is not None}
    continuous = [k for k in FIELDS if k in marginals]
    prevalence = {"male": 1 - population.female, "diabetes": population.diabetes, "smoker": population.current_smoker}
    names = continuous + list(BINARY)  # a binary at 0 or 1 prevalence has no latent correlation to speak of
    z = rng.standard_normal((n, len(names))) @ np.linalg.cholesky(_correlations(names, prevalence)).T
    u = norm.cdf(z)
    values = {k: _quantile(marginals[k], u[:, i], BOUNDS[k], k == "ln_uacr") for i, k in enumerate(continuous)}
    # a trait is present at high latent values, so positive correlations keep their sign
    flags = {k: u[:, len(continuous) + j] > 1.0 - prevalence[k] for j, k in enumerate(BINARY)}
    if "ldl" not in values:
        values["ldl"] = np.maximum(values["tc"] - values["hdl"] - FRIEDEWALD_TG_OVER_5, BOUNDS["ldl"][0])
    values["tc"] = np.maximum(values["tc"], values["hdl"] + values["ldl"] + 5.0)  # TC holds HDL and LDL-C

    def bernoulli(p: float) -> np.ndarray:
        draws: np.ndarray = rng.random(n) < p
        return draws

    black, ascvd, hf = bernoulli(population.black), bernoulli(population.established_ascvd), \
        bernoulli(population.heart_failure)
    statin, bp = bernoulli(population.on_statin), bernoulli(population.on_bp_treatment)
    uacr = np.exp(values["ln_uacr"]) if "ln_uacr" in values else None
    ckd = values["egfr"] < 60 if uacr is None else (values["egfr"] < 60) | (uacr >= 30)
    patients = []
    for i in range(n):
        patients.append(PatientInputs(
            patient_id=f"virtual-{i}",
            sex="male" if flags["male"][i] else "female",
            age_years=float(values["age"][i]),
            total_cholesterol_mg_dl=float(values["tc"][i]),
            hdl_cholesterol_mg_dl=float(values["hdl"][i]),
            ldl_cholesterol_mg_dl=float(values["ldl"][i]),
            systolic_bp_mm_hg=float(values["sbp"][i]),
            egfr_ml_min_1_73m2=float(values["egfr"][i]),
            bmi_kg_m2=float(values["bmi"][i]),
            diabetes=bool(flags["diabetes"][i]),
            current_smoker=bool(flags["smoker"][i]),
            on_bp_treatment=bool(bp[i]),
            on_statin=bool(statin[i]),
            statin_intensity="moderate" if statin[i] else None,
            hba1c_percent=float(values["hba1c"][i]) if "hba1c" in values else None,
            uacr_mg_g=float(uacr[i]) if uacr is not None else None,
            race="black" if black[i] else None,
            ckd=bool(ckd[i]),
            prior_ascvd=bool(ascvd[i]),
            heart_failure=bool(hf[i]),
        ))
    out_of_scope = float(np.mean(ascvd | hf | (values["age"] < 30) | (values["age"] > 79) | (values["egfr"] < 15)))
    return VirtualCohort(tuple(patients), float(np.mean(ckd)), out_of_scope)
