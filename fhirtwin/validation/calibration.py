"""Event-level calibration, subgroup fairness flags and per-subset biomarker coverage, as one report.

Why one report: a governance board asks whether the risks agree with what happened, overall and for each
group of patients the tool will be used on. This runs the engine on the virtual cohort of
:mod:`fhirtwin.validation.events` (whose events come from a model that is not the engine), computes the
metrics of :mod:`fhirtwin.validation.metrics` for 5- and 10-year total CVD, ASCVD, heart failure and
kidney failure (kidney failure only among recorded eGFR < 60, where KFRE applies), overall and by sex,
race as recorded, age band, CKD stage and diabetes, and flags any subgroup whose O/E lies outside
0.8-1.25 or whose calibration slope lies outside 0.8-1.2. The generator's own true risks are scored on
the same events as a reference: where the truth itself misses, the gap is sampling noise, not the engine.

The biomarker part scores the sandbox cohort's held-out measurements separately for points whose treatment
stayed the same after the forecast date and points after a treatment change that the baseline forecast
could not know about; each subset is held to the 85-95 % coverage target on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fhirtwin.validation.events import HORIZONS, OUTCOMES, EventCohort, engine_predictions, generate
from fhirtwin.validation.metrics import Metrics, deciles, evaluate

OE_RANGE = (0.8, 1.25)
SLOPE_RANGE = (0.8, 1.2)
#: Below this many events a subgroup's flag is marked as resting on few events.
FEW_EVENTS = 20
COVERAGE_TARGET = (0.85, 0.95)
LABELS = {"total_cvd": "Total CVD", "ascvd": "ASCVD", "heart_failure": "Heart failure",
          "kidney_failure": "Kidney failure (eGFR < 60)"}


def subgroups(attributes: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(dimension, level, mask) for every subgroup of the report, 'all' first."""
    age, egfr = attributes["age"], attributes["egfr_recorded"]
    out: list[tuple[str, str, np.ndarray]] = [("all", "all", np.ones(age.size, dtype=bool))]
    out += [("sex", s, attributes["sex"] == s) for s in ("female", "male")]
    out += [("race", str(r), attributes["race"] == r) for r in sorted(set(attributes["race"].tolist()))]
    for lo, hi in ((30, 45), (45, 60), (60, 70), (70, 80)):
        out.append(("age band", f"{lo}-{hi - 1}", (age >= lo) & (age < hi)))
    stages: tuple[tuple[str, float, float], ...] = (("G1-2", 60.0, math.inf), ("G3a", 45.0, 60.0),
                                                    ("G3b", 30.0, 45.0), ("G4", 15.0, 30.0))
    for name, e_lo, e_hi in stages:
        out.append(("CKD stage", name, (egfr >= e_lo) & (egfr < e_hi)))
    out += [("diabetes", "yes", attributes["diabetes"].astype(bool)),
            ("diabetes", "no", ~attributes["diabetes"].astype(bool))]
    return out


def eligible(outcome: str, attributes: dict[str, np.ndarray]) -> np.ndarray:
    """Who is evaluated for ``outcome``: everyone, or recorded eGFR < 60 for kidney failure."""
    if outcome == "kidney_failure":
        mask: np.ndarray = attributes["egfr_recorded"] < 60
        return mask
    return np.ones(attributes["egfr_recorded"].size, dtype=bool)


@dataclass(frozen=True)
class Row:
    """Engine and generator-truth metrics for one outcome, horizon and subgroup, and its flag."""

    outcome: str
    horizon_years: int
    dimension: str
    level: str
    engine: Metrics
    truth: Metrics
    flag: str = ""

    @property
    def truth_also_outside(self) -> bool:
        """The generator's own risks miss the same range on the same events: the flag is likely sampling noise."""
        return bool(self.flag) and bool(flag_reason(self.truth))

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {"outcome": self.outcome, "horizon_years": self.horizon_years, "dimension": self.dimension,
                "level": self.level, "engine": self.engine.to_json(), "truth": self.truth.to_json(),
                "flag": self.flag or None, "truth_also_outside": self.truth_also_outside}


def flag_reason(m: Metrics) -> str:
    """Why a subgroup is flagged ('' when O/E is in 0.8-1.25 and the slope in 0.8-1.2, or not estimable)."""
    reasons = []
    if math.isfinite(m.oe) and not OE_RANGE[0] <= m.oe <= OE_RANGE[1]:
        reasons.append(f"O/E {m.oe:.2f}")
    if math.isfinite(m.slope) and not SLOPE_RANGE[0] <= m.slope <= SLOPE_RANGE[1]:
        reasons.append(f"slope {m.slope:.2f}")
    if reasons and m.events < FEW_EVENTS:
        reasons.append(f"few events ({m.events})")
    return "; ".join(reasons)


def score(predicted: dict[str, np.ndarray], observed: dict[str, np.ndarray], truth: dict[str, np.ndarray],
          attributes: dict[str, np.ndarray]) -> list[Row]:
    """Metrics for every outcome x horizon x subgroup; arrays are (n, len(HORIZONS)) per outcome."""
    rows = []
    groups = subgroups(attributes)
    for outcome in OUTCOMES:
        base = eligible(outcome, attributes)
        for j, horizon in enumerate(HORIZONS):
            for dimension, level, mask in groups:
                m = base & mask
                if not m.any():
                    continue
                y = observed[outcome][m, j]
                engine = evaluate(predicted[outcome][m, j], y)
                rows.append(Row(outcome, horizon, dimension, level, engine, evaluate(truth[outcome][m, j], y),
                                flag_reason(engine) if dimension != "all" else ""))
    return rows


# ------------------------------------------------------------------------------------------------
# biomarker coverage per subset (sandbox cohort, held-out measurements)
# ------------------------------------------------------------------------------------------------

#: Treatment whose start after the forecast date changes a biomarker's course (BMI: none).
REGIMEN = {
    "ldl_cholesterol_mg_dl": "statin_start_years",
    "systolic_bp_mm_hg": "bp_treatment_start_years",
    "egfr_ml_min_1_73m2": "sglt2i_start_years",
    "hba1c_percent": "sglt2i_start_years",
}


@dataclass(frozen=True)
class CoverageRow:
    """90 % interval coverage of held-out measurements of one biomarker in one subset."""

    variable: str
    subset: str
    n: int
    coverage: float
    slope: float
    intercept: float

    @property
    def passes(self) -> bool | None:
        """Coverage inside 85-95 % (None without points)."""
        return None if self.n == 0 else COVERAGE_TARGET[0] <= self.coverage <= COVERAGE_TARGET[1]

    def to_json(self) -> dict[str, Any]:
        """Plain dict (NaN as None)."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None
        return {"variable": self.variable, "subset": self.subset, "n": self.n, "coverage": num(self.coverage),
                "slope": num(self.slope), "intercept": num(self.intercept), "passes": self.passes}


def coverage_by_subset(patients: int = 240, seed: int = 20261127, holdout_years: float = 3.0,
                       draws: int = 300) -> tuple[list[CoverageRow], dict[str, Any]]:
    """Coverage of the sandbox cohort's held-out points, stable vs after a treatment change, never pooled."""
    from fhirtwin.adapters import build_twin
    from fhirtwin.sandbox.cohort import generate_cohort
    from fhirtwin.sim import InsufficientData, get_model, inputs_from_state
    from fhirtwin.sim.inputs import HISTORY_VARIABLES
    from fhirtwin.sim.validation import VariableScore, score_forecast

    reference = date(2026, 6, 30)
    cut = reference - timedelta(days=round(365.25 * holdout_years))
    cohort = generate_cohort(patients, seed, reference.isoformat())
    subsets = {"stable": {v: VariableScore() for v in HISTORY_VARIABLES},
               "after treatment change": {v: VariableScore() for v in HISTORY_VARIABLES}}
    used = skipped = 0
    model = get_model("fhirtwin-mechanistic")
    for pid, bundle in zip(cohort.truth, cohort.bundles, strict=True):
        state = build_twin(pid, [bundle], reference)
        try:
            full = inputs_from_state(state, reference)
            at_cut = inputs_from_state(state, cut)
        except InsufficientData:
            skipped += 1
            continue
        heldout = {}
        for v in HISTORY_VARIABLES:
            h = full.history(v)
            later = h[h[:, 0] > -holdout_years + 1e-6]
            heldout[v] = np.column_stack([later[:, 0] + holdout_years, later[:, 1]]) if len(later) else np.zeros((0, 2))
        model.fit(at_cut)
        forecast = model.simulate(None, holdout_years + 0.5, draws, seed=used)
        scores = score_forecast(forecast, heldout, seed=used, posteriors=getattr(model, "posteriors_", None))
        used += 1
        for v, s in scores.items():
            start = getattr(full, REGIMEN[v]) if v in REGIMEN else None
            changed = start is not None and start > -holdout_years
            subsets["after treatment change" if changed else "stable"][v].add(s)
    rows = []
    for v in HISTORY_VARIABLES:
        for name, table in subsets.items():
            s = table[v]
            slope, intercept = s.calibration()
            rows.append(CoverageRow(v, name, s.n, s.coverage(), slope, intercept))
    meta = {"patients": patients, "seed": seed, "holdout_years": holdout_years, "draws": draws,
            "forecast_date": cut.isoformat(), "used": used, "skipped_insufficient_data": skipped}
    return rows, meta


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


@dataclass
class CalibrationReport:
    """Everything ``fhirtwin validate cohort`` writes."""

    n: int
    seed: int
    draws: int
    rows: list[Row]
    decile_tables: dict[str, list[dict[str, Any]]]
    coverage: list[CoverageRow] = field(default_factory=list)
    coverage_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> list[Row]:
        """The whole-cohort rows."""
        return [r for r in self.rows if r.dimension == "all"]

    @property
    def flagged(self) -> list[Row]:
        """Subgroup rows outside the O/E or slope ranges."""
        return [r for r in self.rows if r.flag]

    @property
    def flagged_firm(self) -> list[Row]:
        """Flagged rows resting on at least ``FEW_EVENTS`` events."""
        return [r for r in self.flagged if r.engine.events >= FEW_EVENTS]

    @property
    def flagged_few(self) -> list[Row]:
        """Flagged rows with fewer than ``FEW_EVENTS`` events."""
        return [r for r in self.flagged if r.engine.events < FEW_EVENTS]

    def to_json(self) -> dict[str, Any]:
        """The JSON written to ``calibration.json``."""
        return {
            "format": "fhirtwin-calibration/1",
            "generator": "fhirtwin.validation.events (PREVENT full model and KFRE at true values; own eGFR-slope "
                         "progression and Gompertz competing death)",
            "n_virtual": self.n, "seed": self.seed, "draws": self.draws,
            "horizons_years": list(HORIZONS), "outcomes": list(OUTCOMES),
            "discrimination": "AUC(t): cases = event by t; controls = event-free at t, alive or dead of a competing "
                              "cause (Blanche 2013 definition 2); follow-up complete, no censoring weights",
            "flag_rule": {"oe_range": list(OE_RANGE), "slope_range": list(SLOPE_RANGE), "few_events": FEW_EVENTS},
            "overall": [r.to_json() for r in self.overall],
            "subgroups": [r.to_json() for r in self.rows if r.dimension != "all"],
            "flagged": [r.to_json() for r in self.flagged],
            "deciles": self.decile_tables,
            "biomarker_coverage": {"target": list(COVERAGE_TARGET), **self.coverage_meta,
                                   "rows": [c.to_json() for c in self.coverage]},
        }


def build_report(n: int, seed: int = 2026, draws: int = 40, coverage_patients: int = 240,
                 progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    """Generate the cohort, run the engine, score everything and re-score the biomarker coverage per subset."""
    cohort: EventCohort = generate(n, seed)
    predicted = engine_predictions(cohort, draws=draws, progress=progress)
    rows = score(predicted, cohort.observed, cohort.truth, cohort.attributes)
    tables: dict[str, list[dict[str, Any]]] = {}
    for outcome in OUTCOMES:
        m = eligible(outcome, cohort.attributes)
        for j, horizon in enumerate(HORIZONS):
            if int(cohort.observed[outcome][m, j].sum()) == 0:
                continue
            tables[f"{outcome}_{horizon}y"] = [
                {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.__dict__.items()}
                for d in deciles(predicted[outcome][m, j], cohort.observed[outcome][m, j])]
    coverage: list[CoverageRow] = []
    meta: dict[str, Any] = {}
    if coverage_patients > 0:
        coverage, meta = coverage_by_subset(patients=coverage_patients)
    return CalibrationReport(n=n, seed=seed, draws=draws, rows=rows, decile_tables=tables,
                             coverage=coverage, coverage_meta=meta)


def _f(v: float, digits: int = 2, pct: bool = False) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{100 * v:.{digits}f} %" if pct else f"{v:.{digits}f}"


def headline_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per outcome and horizon for the whole cohort."""
    out = ["| Outcome | Horizon | n | Events | Observed | Engine mean | Truth mean | O/E (95 % CI) | O/E truth "
           "| AUC engine | AUC truth | Slope | Intercept | ICI |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, t = r.engine, r.truth
        out.append(f"| {LABELS[r.outcome]} | {r.horizon_years} y | {e.n} | {e.events} | {_f(e.observed_risk, 1, True)} "
                   f"| {_f(e.mean_predicted, 1, True)} | {_f(t.mean_predicted, 1, True)} "
                   f"| {_f(e.oe)} ({_f(e.oe_ci95[0])}-{_f(e.oe_ci95[1])}) | {_f(t.oe)} | {_f(e.auc, 3)} "
                   f"| {_f(t.auc, 3)} | {_f(e.slope)} | {_f(e.intercept)} | {_f(e.ici, 3)} |")
    return "\n".join(out) + "\n"


def subgroup_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per subgroup for one outcome and horizon."""
    out = ["| Subgroup | n | Events | Observed | Engine mean | O/E | O/E truth | Slope | AUC | ICI | Flag |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.engine
        out.append(f"| {r.dimension}: {r.level} | {e.n} | {e.events} | {_f(e.observed_risk, 1, True)} "
                   f"| {_f(e.mean_predicted, 1, True)} | {_f(e.oe)} | {_f(r.truth.oe)} | {_f(e.slope)} "
                   f"| {_f(e.auc, 3)} | {_f(e.ici, 3)} | {('**' + r.flag + '**') if r.flag else ''} |")
    return "\n".join(out) + "\n"


def _overall_reading(rows: Sequence[Row]) -> str:
    """One sentence per whole-cohort row outside the ranges (by the subgroup rule), or that none is."""
    out = [f"- {LABELS[r.outcome]} at {r.horizon_years} years: {flag_reason(r.engine)} (truth O/E {_f(r.truth.oe)}, "
           f"slope {_f(r.truth.slope)}); AUC {_f(r.engine.auc, 3)} vs {_f(r.truth.auc, 3)} for the true risks."
           for r in rows if flag_reason(r.engine)]
    if not out:
        return "Every whole-cohort row lies inside O/E 0.8-1.25 and slope 0.8-1.2.\n"
    return "Whole-cohort rows outside O/E 0.8-1.25 or slope 0.8-1.2:\n\n" + "\n".join(out) + "\n"


def markdown(report: CalibrationReport) -> str:
    """The whole ``calibration.md``."""
    parts = [
        "# Event-level calibration and subgroup fairness\n",
        f"Generated by `fhirtwin validate cohort --n {report.n} --seed {report.seed}`: {report.n} virtual patients, "
        f"{report.draws} ensemble draws each (the engine's risk is the mean over draws).\n",
        "**What this is.** Virtual patients with recorded histories and future events drawn from a model that is "
        "*not* the engine: PREVENT (full model) and KFRE at each patient's true values, a personal eGFR slope "
        "acting through PREVENT's and KFRE's own eGFR terms, and Gompertz competing death fitted to US life "
        "expectancy at 65 (see the docstring of `fhirtwin/validation/events.py` for every number and its "
        "source). The engine sees only the noisy recorded values, histories and what was recorded (UACR for "
        "60-90 %, HbA1c for all with diabetes and half of the rest). Because the truth is synthetic and anchored "
        "on the same published equations, this checks the engine's anchoring, dynamics and missing-data handling "
        "for internal consistency; it is not external validation.\n",
        "**Metrics.** AUC(t): probability that a patient with the event by t has a higher predicted risk than one "
        "without it (event-free at t, alive or dead of a competing cause: Blanche 2013 definition 2; follow-up "
        "is complete, so no censoring weights). O/E: observed events / sum of predicted risks, 95 % CI treating "
        "O as Poisson. Slope: logistic recalibration `logit P(y) = a + b logit(p)`; intercept: calibration-in-"
        "the-large (`a` with `b` = 1). ICI: mean |predicted - loess-smoothed observed| (Austin & Steyerberg "
        "2019). *Truth* columns score the generator's own risks on the same events: the sampling-noise "
        "reference.\n",
        "## Whole cohort\n",
        headline_table(report.overall),
        "Kidney failure is evaluated only among patients with recorded eGFR < 60 (where KFRE was developed).\n",
        _overall_reading(report.overall),
        "## Flagged subgroups\n",
        f"Rule: O/E outside {OE_RANGE[0]}-{OE_RANGE[1]} or calibration slope outside {SLOPE_RANGE[0]}-"
        f"{SLOPE_RANGE[1]} (point estimates; 'few events' when fewer than {FEW_EVENTS}). 'Truth also outside': "
        "the generator's own (true) risks miss a range on the same events too, so the flag is mostly sampling "
        "noise; the flags that matter are those where the truth is inside.\n",
    ]
    for title, chosen in ((f"With at least {FEW_EVENTS} events", report.flagged_firm),
                          (f"With fewer than {FEW_EVENTS} events (mostly noise)", report.flagged_few)):
        parts.append(f"**{title}: {len(chosen)}**\n")
        if chosen:
            parts.append("| Outcome | Horizon | Subgroup | n | Events | O/E | O/E truth | Slope | Slope truth "
                         "| Reason | Truth also outside |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(
                             f"| {LABELS[r.outcome]} | {r.horizon_years} y | {r.dimension}: {r.level} | {r.engine.n} "
                             f"| {r.engine.events} | {_f(r.engine.oe)} | {_f(r.truth.oe)} | {_f(r.engine.slope)} "
                             f"| {_f(r.truth.slope)} | {r.flag} | {'yes (noise)' if r.truth_also_outside else 'no'} |"
                             for r in chosen) + "\n")
    parts.append("## Subgroups\n")
    for outcome in OUTCOMES:
        for horizon in HORIZONS:
            sub = [r for r in report.rows if r.outcome == outcome and r.horizon_years == horizon]
            if sub:
                parts += [f"### {LABELS[outcome]}, {horizon} years\n", subgroup_table(sub)]
    parts.append("## Observed vs expected by decile of predicted risk\n")
    for key, table in report.decile_tables.items():
        name, years = key.rsplit("_", 1)
        lines = [f"| {d['decile']} | {d['n']} | {_f(d['mean_predicted'], 2, True)} | {_f(d['observed'], 2, True)} "
                 f"| {_f(d['oe']) if d['oe'] is not None else '-'} |" for d in table]
        parts.append(f"**{LABELS[name]}, {years.rstrip('y')} years**\n\n| Decile | n | Mean predicted | Observed "
                     "| O/E |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    if report.coverage:
        m = report.coverage_meta
        parts += [
            "## Biomarker interval coverage per subset\n",
            f"Sandbox cohort ({m['patients']} patients, seed {m['seed']}; {m['used']} used, "
            f"{m['skipped_insufficient_data']} without enough data), fitted as of {m['forecast_date']} "
            f"({m['holdout_years']:g} years held out), {m['draws']} draws. Coverage of the 90 % predictive interval "
            "by held-out measurements, reported separately for points whose treatment did not change after the "
            "forecast date (*stable*) and points after a statin, antihypertensive or SGLT2-inhibitor start that the "
            "baseline forecast could not know (*after treatment change*); each subset is held to the 85-95 % "
            "target on its own.\n",
            "| Biomarker | Subset | n | Coverage | Slope | Intercept | 85-95 % |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(f"| {c.variable} | {c.subset} | {c.n} | {_f(c.coverage, 1, True)} | {_f(c.slope)} "
                        f"| {_f(c.intercept)} | {'-' if c.passes is None else ('yes' if c.passes else '**no**')} |"
                        for c in report.coverage) + "\n",
        ]
    parts += [
        "## Limitations\n",
        "- Synthetic truth anchored on the same published equations (PREVENT, KFRE) as the engine: agreement "
        "shows consistency of the anchoring, dynamics and missing-data handling, not that PREVENT or KFRE fit "
        "real patients. Race changes only covariate distributions here (PREVENT is race-free), so race "
        "subgroups test the engine's behaviour across covariate mixes, not ancestry-specific biology.\n"
        "- Kidney failure beyond 5 years and cardiovascular risk within a decade are extrapolations in both the "
        "engine (2-5-year KFRE hazard carried forward; PREVENT's age gradient) and the generator (Weibull "
        "through KFRE at 2 and 5 years; Gompertz-shaped hazard): disagreement there is between two "
        "assumptions, not an error of either.\n"
        "- Virtual patients are in the engine's scope (primary prevention, 30-79 years, eGFR >= 15) and their "
        "treatment does not change during follow-up.\n",
    ]
    return "\n".join(parts)


def write(report: CalibrationReport, out: str | Path) -> dict[str, Path]:
    """Write ``calibration.md`` and ``calibration.json`` to ``out``; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "calibration.md", "json": folder / "calibration.json"}
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    return paths


def summary(report: CalibrationReport) -> str:
    """A few lines for the terminal: the whole-cohort table and the flags."""
    flags = "\n".join(f"  {LABELS[r.outcome]} {r.horizon_years} y, {r.dimension} {r.level}: {r.flag} "
                      f"(truth O/E {_f(r.truth.oe)}, slope {_f(r.truth.slope)}"
                      f"{'; truth also outside: noise' if r.truth_also_outside else ''})" for r in report.flagged_firm)
    flags = flags or "  none"
    flags += f"\n  and {len(report.flagged_few)} with fewer than {FEW_EVENTS} events (see the report)"
    cov = "\n".join(f"  {c.variable} ({c.subset}): n={c.n} coverage {_f(c.coverage, 1, True)}"
                    for c in report.coverage if c.n)
    head = f"\nflagged subgroups with at least {FEW_EVENTS} events ({len(report.flagged_firm)}):\n"
    return (headline_table(report.overall) + head + f"{flags}\n"
            + (f"\nbiomarker coverage per subset:\n{cov}\n" if cov else ""))
