"""Ensemble over parameter uncertainty: draw once, simulate every scenario on the same draws.

Why: a forecast without its uncertainty invites over-confidence, and comparing scenarios on different
random draws adds noise to the difference. Every parameter (calibration posteriors, process noise,
effect sizes, treatment responses) is drawn here from its own child stream of one seed, independent of
the scenario, so two scenarios with the same seed are paired draw by draw and a rerun is identical.
All arrays are (draws, ...) and nothing loops over draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fhirtwin.sim._params import dynamics_parameters, intervention_parameters
from fhirtwin.sim.calibration import LinearPosterior
from fhirtwin.sim.inputs import HISTORY_VARIABLES, PatientInputs
from fhirtwin.sim.interventions import ldl_lowering_draws, lognormal_draws

RATIO_NAMES = (
    "ldl_major_vascular_rr_per_mmol_l",
    "sbp_major_cvd_rr_per_10_mm_hg",
    "sbp_heart_failure_rr_per_10_mm_hg",
    "sglt2i_kidney_progression_rr",
    "smoking_cessation_cvd_hr",
    "fh_variant_cad_or_at_same_ldl",
    "cad_prs_hr_per_sd",
    "cad_prs_hr_per_sd_african_ancestry",
)
INTERVAL = (5.0, 95.0)


@dataclass(frozen=True, eq=False)
class ParameterDraws:
    """One ensemble's parameters; every array has the draws on axis 0."""

    n: int
    seed: int
    years: int
    level_slope: dict[str, np.ndarray]
    walk_knots: dict[str, np.ndarray]
    ratios: dict[str, np.ndarray]
    ldl_lowering: dict[str, np.ndarray]
    sbp_drop_mm_hg: np.ndarray


def _walk(rng: np.random.Generator, n: int, years: int, sd: float) -> np.ndarray:
    steps = rng.standard_normal((n, years)) * sd
    return np.concatenate([np.zeros((n, 1)), np.cumsum(steps, axis=1)], axis=1)


def draw_parameters(
    inputs: PatientInputs,
    posteriors: dict[str, LinearPosterior],
    n: int,
    seed: int,
    horizon_years: float,
) -> ParameterDraws:
    """Draw every uncertain parameter for ``n`` ensemble members (reproducible from ``seed``)."""
    if n < 1:
        raise ValueError("draws must be >= 1")
    years = int(math.ceil(horizon_years))
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    rng_cal, rng_walk, rng_eff, rng_resp = streams
    bio = dynamics_parameters()["biomarkers"]

    level_slope: dict[str, np.ndarray] = {}
    walk: dict[str, np.ndarray] = {}
    for variable in HISTORY_VARIABLES:  # fixed order: stream use does not depend on which data exist
        post = posteriors.get(variable)
        draws = post.draw(rng_cal, n) if post is not None else rng_cal.standard_normal((n, 2))
        spec = bio[variable]["process_sd_per_sqrt_year"]
        knots = _walk(rng_walk, n, years, 1.0)
        if post is None:
            continue
        level_slope[variable] = draws
        if "relative" in spec:
            walk[variable] = knots * spec["relative"]  # relative: multiplies the level
        else:
            walk[variable] = knots * spec["absolute"]

    ratios = {name: lognormal_draws(name, rng_eff, n) for name in RATIO_NAMES}
    lowering = {k: ldl_lowering_draws(k, rng_resp, n) for k in ("low", "moderate", "high")}
    bp = intervention_parameters()["sbp_lowering_one_drug_mm_hg"]
    drop = np.maximum(0.0, bp["value"] + bp["sd"] * rng_resp.standard_normal(n))
    return ParameterDraws(n, seed, years, level_slope, walk, ratios, lowering, drop)


def summarise(values: np.ndarray, axis: int = 0) -> dict[str, np.ndarray]:
    """Median and the 90% interval (5th/95th percentiles) over draws."""
    lo, med, hi = np.percentile(values, [INTERVAL[0], 50.0, INTERVAL[1]], axis=axis)
    return {"median": med, "p05": lo, "p95": hi}
