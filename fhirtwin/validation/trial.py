"""Replicate a published randomised trial in silico and compare with what the trial found.

Why: the strongest public test of an absolute-risk model and of its intervention effects, without
patient-level data, is to run a trial's population through both arms and compare the control arm's
incidence and the hazard ratio with the published ones. Nothing is tuned per trial: the engine runs as
it does for a patient (same equations, effect sizes and dynamics), and a mismatch of outcome definition
is reported (``outcome_note``), not corrected.

Estimates. Every virtual patient is simulated with the same seed, so ensemble draw ``d`` is one coherent
set of effect sizes and biomarker responses across the cohort. The cohort incidence per draw is the
mean over patients; the hazard ratio is the ratio of cumulative hazards ln(1 - F_treatment) /
ln(1 - F_control) at follow-up (proportional hazards, as trials report it). The 90 % interval combines
parameter uncertainty (draws) and sampling (patients resampled with replacement), by bootstrap.

Subgroups. The same point estimates by sex, race as recorded, age band, CKD stage, diabetes and engine
scope (the breakdown of the event-level report, plus ages 80+). A subgroup whose simulated HR lies outside
the trial's overall 95 % CI is flagged: the engine applies the trials' relative effects uniformly, so such
a subgroup differs only through its absolute risks and competing death, and the flag asks for a look at
the trial's own subgroup forest plot (published subgroup HRs are not part of the trial format).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fhirtwin.sim import get_model
from fhirtwin.sim.interventions import Intervention, Scenario, lognormal_draws
from fhirtwin.validation.calibration import subgroups as report_subgroups
from fhirtwin.validation.cohort import VirtualCohort, sample_cohort
from fhirtwin.validation.spec import ArmItem, TrialSpec

BOOTSTRAP = 2000
#: Subgroups smaller than this are not reported (their point estimates would be noise).
MIN_SUBGROUP = 50
#: Non-statin LDL-C agents by engine kind (others are the generic ``ldl_lowering`` with their percent).
_LDL_AGENTS = {"ezetimibe": "ezetimibe", "evolocumab": "pcsk9_inhibitor", "alirocumab": "pcsk9_inhibitor"}


def to_interventions(arm: list[ArmItem]) -> tuple[Intervention, ...]:
    """The engine's interventions for one arm (placebo adds nothing; measured effects kept as measured)."""
    out: list[Intervention] = []
    for item in arm:
        if item.kind == "statin":
            out.append(Intervention("statin", f"{item.intensity}-intensity statin", intensity=item.intensity,
                                    agent=item.agent, dose_mg=item.dose_mg))
        elif item.kind == "ldl_lowering":
            kind = _LDL_AGENTS.get((item.agent or "").lower(), "ldl_lowering")
            out.append(Intervention(kind, f"{item.agent or 'LDL-C drug'} (-{item.percent:g} % LDL-C)",
                                    agent=item.agent, ldl_lowering_percent=item.percent))
        elif item.kind == "sbp_lowering":
            out.append(Intervention("bp_lowering", f"SBP -{item.mm_hg:g} mmHg", sbp_drop_mm_hg=item.mm_hg))
        elif item.kind == "sglt2_inhibitor":
            out.append(Intervention("sglt2i", item.agent or "SGLT2 inhibitor", agent=item.agent))
        elif item.kind == "smoking_cessation":
            out.append(Intervention("smoking_cessation", "quit attempt"))
    return tuple(out)


def _cv_death_by(model: Any, month: int) -> float:
    """Probability of cardiovascular death by ``month`` from the engine's competing-death model.

    The engine's all-cause death hazard (life table x CKD mortality ratio) times the cardiovascular share
    of deaths (``dynamics_parameters.json``); an arm's SGLT2 inhibitor scales it (:func:`_cv_death_in_arm`).
    """
    death = model.anchors_.death_all[:month]
    cv = death - model.anchors_.death_non_cvd[:month]
    surv = np.exp(-np.concatenate([[0.0], np.cumsum(death / 12.0)]))
    return float(np.sum((surv[:-1] - surv[1:]) * cv / np.maximum(death, 1e-12)))


def _cv_death_in_arm(cv_death: float, scenario: Scenario, ratio: np.ndarray) -> np.ndarray:
    """Per-draw CV death by follow-up in one arm: with an SGLT2 inhibitor, its cumulative hazard times the
    class's CV-death ratio (``sglt2i_cardiovascular_death_rr``, proportional hazards); otherwise unchanged."""
    if not any(i.kind == "sglt2i" for i in scenario.interventions):
        return np.full(ratio.shape, cv_death)
    out: np.ndarray = 1.0 - (1.0 - cv_death) ** ratio
    return out


def _outcome_at(forecast: Any, outcome: str, month: int, cv_death: float | np.ndarray = 0.0) -> np.ndarray:
    """Per-draw cumulative incidence of the trial outcome at ``month``.

    ``kidney_composite``: kidney failure, a fall of the simulated eGFR to half its baseline (the trials'
    sustained >= 50 % decline) or cardiovascular death (``cv_death``), taken as independent parts.
    """
    if outcome != "kidney_composite":
        values: np.ndarray = forecast.cif[outcome][:, month]
        return values
    egfr = forecast.trajectories["egfr_ml_min_1_73m2"]
    halved = (egfr[:, : month + 1] <= 0.5 * egfr[:, :1]).any(axis=1).astype(float)
    kf = forecast.cif["kidney_failure"][:, month]
    composite: np.ndarray = 1.0 - (1.0 - halved) * (1.0 - kf) * (1.0 - cv_death)
    return composite


@dataclass(frozen=True)
class TrialResult:
    """The replication next to the publication (the JSON fields of ``fhirtwin validate trial``)."""

    name: str
    outcome: str
    follow_up_years: float
    n_virtual: int
    control_cumulative_incidence: float
    treatment_cumulative_incidence: float
    hazard_ratio: float
    hazard_ratio_interval90: tuple[float, float]
    published: dict[str, Any]
    control_ratio_to_published: float
    hr_within_published_ci95: bool
    outcome_note: str = ""
    citation: str = ""
    draws: int = 0
    virtual_ckd_fraction: float = 0.0
    out_of_engine_scope_fraction: float = 0.0
    notes: tuple[str, ...] = field(default=())
    subgroups: tuple[dict[str, Any], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """Plain dict, the contract's keys first."""
        data = asdict(self)
        data["hazard_ratio_interval90"] = list(self.hazard_ratio_interval90)
        data["notes"] = list(self.notes)
        data["subgroups"] = list(self.subgroups)
        return data


def _hazard_ratio(control: float, treatment: float) -> float:
    return float(np.log1p(-treatment) / np.log1p(-control)) if 0 < control < 1 else float("nan")


def subgroup_rows(cohort: VirtualCohort, f_c: np.ndarray, f_t: np.ndarray,
                  ci95: tuple[float, float]) -> tuple[dict[str, Any], ...]:
    """Control and treatment incidence and HR per subgroup of at least MIN_SUBGROUP virtual patients."""
    patients = cohort.patients
    age = np.array([p.age_years for p in patients])
    attributes = {"age": age, "egfr_recorded": np.array([p.egfr_ml_min_1_73m2 for p in patients]),
                  "sex": np.array([p.sex for p in patients]),
                  "race": np.array([p.race or "not recorded" for p in patients]),
                  "diabetes": np.array([bool(p.diabetes) for p in patients])}
    in_scope = np.array([not (p.prior_ascvd or p.heart_failure) for p in patients]) & (age >= 30) & (age <= 79) \
        & (attributes["egfr_recorded"] >= 15)
    groups = report_subgroups(attributes) + [("age band", "80+", age >= 80), ("engine scope", "in", in_scope),
                                             ("engine scope", "out", ~in_scope)]
    rows = []
    for dimension, level, mask in groups:
        if dimension == "all" or int(mask.sum()) < MIN_SUBGROUP:
            continue
        control, treatment = float(f_c[mask].mean()), float(f_t[mask].mean())
        hr = _hazard_ratio(control, treatment)
        flag = "" if (np.isfinite(hr) and ci95[0] <= hr <= ci95[1]) else "HR outside the trial's overall 95 % CI"
        rows.append({"dimension": dimension, "level": level, "n": int(mask.sum()),
                     "control_cumulative_incidence": control, "treatment_cumulative_incidence": treatment,
                     "hazard_ratio": hr, "flag": flag})
    return tuple(rows)


def replicate(spec: TrialSpec, *, n_virtual: int | None = None, draws: int = 100) -> TrialResult:
    """Simulate both arms of ``spec`` over its follow-up on a virtual cohort (no per-trial tuning)."""
    cohort = sample_cohort(spec.population, n_virtual)
    control = Scenario("control", to_interventions(spec.arms.control))
    treatment = Scenario("treatment", to_interventions(spec.arms.treatment))
    horizon = max(spec.follow_up_years, 1.0 / 12.0)
    month = int(round(12 * horizon))
    seed = spec.population.seed
    f_c = np.empty((len(cohort.patients), draws))
    f_t = np.empty((len(cohort.patients), draws))
    model = get_model("fhirtwin-mechanistic")
    cv_ratio = lognormal_draws("sglt2i_cardiovascular_death_rr", np.random.default_rng(seed), draws)
    for i, patient in enumerate(cohort.patients):
        model.fit(patient)
        cv = _cv_death_by(model, month) if spec.outcome == "kidney_composite" else 0.0
        f_c[i] = _outcome_at(model.simulate(control, horizon, draws, seed), spec.outcome, month,
                             _cv_death_in_arm(cv, control, cv_ratio))
        f_t[i] = _outcome_at(model.simulate(treatment, horizon, draws, seed), spec.outcome, month,
                             _cv_death_in_arm(cv, treatment, cv_ratio))
    fc, ft = float(f_c.mean()), float(f_t.mean())
    hr = _hazard_ratio(fc, ft)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, f_c.shape[0], (BOOTSTRAP, f_c.shape[0]))
    cols = rng.integers(0, draws, BOOTSTRAP)
    boot_c = np.array([f_c[r, c].mean() for r, c in zip(rows, cols, strict=True)])
    boot_t = np.array([f_t[r, c].mean() for r, c in zip(rows, cols, strict=True)])
    boot = np.log1p(-boot_t) / np.log1p(-boot_c)
    lo, hi = (float(v) for v in np.percentile(boot, [5.0, 95.0]))
    published = spec.published.model_dump()
    ci_lo, ci_hi = spec.published.hazard_ratio_ci95
    notes = []
    if cohort.out_of_scope_fraction > 0:
        notes.append(f"{100 * cohort.out_of_scope_fraction:.0f} % of the virtual cohort is outside the engine's "
                     "scope (established ASCVD, heart failure, age outside 30-79 or eGFR < 15): their risk uses "
                     "the primary-prevention equations as if in scope, which understates recurrent risk")
    if spec.outcome == "kidney_composite":
        notes.append("kidney composite = kidney failure, simulated eGFR halved, or cardiovascular death from the "
                     "engine's competing-death model (an SGLT2 inhibitor scales it by the class's CV-death RR 0.86, "
                     "Staplin 2021); renal death not counted")
    return TrialResult(
        name=spec.name, outcome=spec.outcome, follow_up_years=spec.follow_up_years,
        n_virtual=len(cohort.patients), control_cumulative_incidence=fc, treatment_cumulative_incidence=ft,
        hazard_ratio=hr, hazard_ratio_interval90=(lo, hi), published=published,
        control_ratio_to_published=fc / spec.published.control_cumulative_incidence,
        hr_within_published_ci95=bool(ci_lo <= hr <= ci_hi), outcome_note=spec.outcome_note,
        citation=spec.citation, draws=draws, virtual_ckd_fraction=cohort.ckd_fraction,
        out_of_engine_scope_fraction=cohort.out_of_scope_fraction, notes=tuple(notes),
        subgroups=subgroup_rows(cohort, f_c, f_t, (ci_lo, ci_hi)),
    )
