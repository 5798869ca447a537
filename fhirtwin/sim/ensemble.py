"""Ensemble over parameter uncertainty: draw once, simulate every scenario on the same draws.

Why: a forecast without its uncertainty invites over-confidence, and comparing scenarios on different
random draws adds noise to the difference. Every parameter (calibration posteriors, process noise,
effect sizes, treatment responses) is drawn here from its own child stream of one seed, independent of
the scenario, so two scenarios with the same seed are paired draw by draw and a rerun is identical.
All arrays are (draws, ...) and nothing loops over draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.calibration import LinearPosterior
from fhirtwin.sim.inputs import HISTORY_VARIABLES, PatientInputs
from fhirtwin.sim.interventions import ldl_lowering_draws, lognormal_draws
from fhirtwin.sim.modifiers import active_modifiers, draw_effect, parameter_names

RATIO_NAMES = (
    "ldl_major_vascular_rr_per_mmol_l",
    "ldl_major_vascular_rr_per_mmol_l_year1",
    "sbp_coronary_rr_per_10_mm_hg",
    "sbp_stroke_rr_per_10_mm_hg",
    "sbp_heart_failure_rr_per_10_mm_hg",
    "sglt2i_kidney_progression_rr",
    "sglt2i_heart_failure_rr",
    "smoking_cessation_cvd_hr",
    "fh_variant_cad_or_at_same_ldl",
    "cad_prs_hr_per_sd",
)
LIPID_DRUGS = ("ezetimibe", "pcsk9_inhibitor")
INTERVAL = (5.0, 95.0)


@dataclass(frozen=True, eq=False)
class ParameterDraws:
    """One ensemble's parameters; every array has the draws on axis 0.

    ``level_slope``: calibrated (level, slope per year) per biomarker; ``innovations``: standard normal
    pairs (draws, years, 2) driving each biomarker's integrated-OU deviation; ``ratios``: effect sizes;
    ``ldl_lowering``: fractional LDL-C lowering per statin intensity and non-statin drug;
    ``uacr_quantile``: which quantile of the imputed UACR distribution a draw uses (when unmeasured);
    ``quit_probability``: sustained abstinence after a quit attempt; ``modifiers``: the hazard ratios of
    the patient's acting markers (``modifier:component``), empty without any.
    """

    n: int
    seed: int
    years: int
    level_slope: dict[str, np.ndarray]
    innovations: dict[str, np.ndarray]
    ratios: dict[str, np.ndarray]
    ldl_lowering: dict[str, np.ndarray]
    sbp_drop_mm_hg: np.ndarray
    uacr_quantile: np.ndarray
    quit_probability: np.ndarray
    modifiers: dict[str, np.ndarray] = field(default_factory=dict)


def draw_parameters(
    inputs: PatientInputs,
    posteriors: dict[str, LinearPosterior],
    n: int,
    seed: int,
    horizon_years: float,
    uacr_quantiles: int = 1,
) -> ParameterDraws:
    """Draw every uncertain parameter for ``n`` ensemble members (reproducible from ``seed``).

    Each parameter has its own child stream (:data:`STREAM_NAMES`) and every stream fills its
    array draw by draw, so the first ``k`` members of an ensemble of ``n`` are the ensemble of ``k``: a
    scenario simulated on fewer draws is paired member by member with the baseline (common random numbers).
    """
    if n < 1:
        raise ValueError("draws must be >= 1")
    years = int(math.ceil(horizon_years))
    rng = _Streams(seed)
    level_slope: dict[str, np.ndarray] = {}
    innovations: dict[str, np.ndarray] = {}
    for variable in HISTORY_VARIABLES:
        post = posteriors.get(variable)
        if post is not None:
            level_slope[variable] = post.draw(rng[f"level_slope:{variable}"], n)
            innovations[variable] = rng[f"innovations:{variable}"].standard_normal((n, years, 2))
    params = intervention_parameters()
    ratios = {name: lognormal_draws(name, rng[f"ratio:{name}"], n) for name in RATIO_NAMES}
    lowering = {k: ldl_lowering_draws(k, rng[f"ldl_lowering:{k}"], n) for k in LDL_LOWERING_KINDS}
    bp = params["sbp_lowering_one_drug_mm_hg"]
    drop = np.maximum(0.0, bp["value"] + bp["sd"] * rng["sbp_drop"].standard_normal(n))
    quantile = rng["uacr_quantile"].integers(0, uacr_quantiles, n)
    lo, hi = params["smoking_quit_probability"]["interval"]
    quit = rng["quit_probability"].uniform(lo, hi, n)
    used = dict.fromkeys(e.parameter for m in active_modifiers(inputs) for e in m.effects)
    modifiers = {name: draw_effect(name, rng[f"modifier:{name}"], n) for name in used}
    return ParameterDraws(n, seed, years, level_slope, innovations, ratios, lowering, drop, quantile, quit, modifiers)


LDL_LOWERING_KINDS = ("low", "moderate", "high", *LIPID_DRUGS)
#: Every stream's name, in the order of the seed's children (append only: a new name keeps the others' draws).
STREAM_NAMES = (
    *(f"{kind}:{v}" for v in HISTORY_VARIABLES for kind in ("level_slope", "innovations")),
    *(f"ratio:{name}" for name in RATIO_NAMES),
    *(f"ldl_lowering:{k}" for k in LDL_LOWERING_KINDS),
    "sbp_drop",
    "uacr_quantile",
    "quit_probability",
    *(f"modifier:{name}" for name in parameter_names()),
)


class _Streams(dict[str, np.random.Generator]):
    """Child generators of one seed by parameter name, created on first use (most patients use few)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._children = dict(zip(STREAM_NAMES, np.random.SeedSequence(seed).spawn(len(STREAM_NAMES)), strict=True))

    def __missing__(self, name: str) -> np.random.Generator:
        generator = np.random.Generator(np.random.PCG64(self._children[name]))
        self[name] = generator
        return generator


def summarise(values: np.ndarray, axis: int = 0) -> dict[str, np.ndarray]:
    """Median and the 90% interval (5th/95th percentiles) over draws."""
    lo, med, hi = np.percentile(values, [INTERVAL[0], 50.0, INTERVAL[1]], axis=axis)
    return {"median": med, "p05": lo, "p95": hi}
