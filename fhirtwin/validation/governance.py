"""Governance of optional engine components: each one is scored on subgroup calibration, on and off.

Why: a new mechanism (a scale modifier, a learned residual) can improve the cohort as a whole and still
miscalibrate a subgroup, which is exactly what a governance board (and ONC HTI-1's fairness attributes)
asks about. The bounds are the calibration report's own: O/E inside 0.8-1.25 and calibration slope inside
0.8-1.2. A component **worsens subgroup calibration** when, in an outcome x horizon x subgroup row with at
least ``FEW_EVENTS`` events where the generator's true risks are inside the bounds (so a miss is not
sampling noise), the engine with the component lies further outside the bounds than without it (a row
inside counts as 0 outside) by more than ``MATERIAL``: 5 % on O/E or 0.05 on the slope, so that a row
grazing a bound, or one already outside that moves a hair, is not a verdict on noise. Such a component is
**off by default**.

Design: each component is judged against the anchor alone (every optional component off), on the same
patients and seeds, so one component's verdict does not depend on another's; then the components that pass
are added one at a time, the most helpful alone first (fewest firm flags), each set judged against the anchor
alone: a component whose addition worsens a subgroup is off (the report says which rows). The verdicts
are written to ``fhirtwin/sim/components.json`` and the model card lists them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirtwin.validation.calibration import FEW_EVENTS, OE_RANGE, SLOPE_RANGE, Row, flag_reason


def _distance_outside(value: float, bounds: tuple[float, float], log_scale: bool) -> float:
    """How far a value lies outside its bounds (0 inside; on the log scale for ratios); NaN counts as inside."""
    if not math.isfinite(value) or value <= 0 and log_scale:
        return 0.0
    lo, hi = bounds
    if log_scale:
        value, lo, hi = math.log(value), math.log(lo), math.log(hi)
    return max(lo - value, value - hi, 0.0)


#: A move further outside the bounds smaller than this (log O/E; slope) is not counted as worsening.
MATERIAL = (math.log(1.05), 0.05)


def misses(row: Row) -> tuple[float, float]:
    """The engine's distance outside the bounds in this row: (log O/E, slope); 0 where inside."""
    return (_distance_outside(row.engine.oe, OE_RANGE, True), _distance_outside(row.engine.slope, SLOPE_RANGE, False))


def _worse(before: Row, after: Row) -> bool:
    """``after`` lies further outside the bounds than ``before`` (0 when inside) by more than ``MATERIAL``."""
    return any(a - b > margin for a, b, margin in zip(misses(after), misses(before), MATERIAL, strict=True))


@dataclass(frozen=True)
class Worsened:
    """One outcome x horizon x subgroup row that a component pushed (further) out of the bounds."""

    outcome: str
    horizon_years: int
    dimension: str
    level: str
    without: str
    with_component: str

    def text(self) -> str:
        """One line for the report."""
        before = self.without or "inside the bounds"
        return (f"{self.outcome} {self.horizon_years} y, {self.dimension} {self.level}: {self.with_component} "
                f"(without: {before})")

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {**self.__dict__, "text": self.text()}


def worsened_rows(without: Sequence[Row], with_component: Sequence[Row]) -> list[Worsened]:
    """Rows where the component worsens subgroup calibration beyond the bounds (module docstring rule)."""
    before = {(r.outcome, r.horizon_years, r.dimension, r.level): r for r in without}
    out: list[Worsened] = []
    for r in with_component:
        key = (r.outcome, r.horizon_years, r.dimension, r.level)
        b = before.get(key)
        if b is None or r.engine.events < FEW_EVENTS or flag_reason(r.truth):
            continue
        if _worse(b, r):
            out.append(Worsened(r.outcome, r.horizon_years, r.dimension, r.level, flag_reason(b.engine),
                                flag_reason(r.engine)))
    return out


@dataclass(frozen=True)
class ComponentVerdict:
    """One component's governance result: on by default only when it worsens no subgroup.

    A component the virtual cohort cannot exercise (no patient has its input) is not evaluated: it is on by
    default only when it is a published anchor equation (PREVENT's own SDI model), never when it is a
    mechanism fhirtwin adds.
    """

    component: str
    worsened: tuple[Worsened, ...]
    patients_affected: int
    flags_without: int
    flags_with: int
    evaluated: bool = True
    published_anchor: bool = False

    @property
    def default_on(self) -> bool:
        """On by default unless it worsened subgroup calibration (or, unevaluated, unless it is an added mechanism)."""
        return not self.worsened if self.evaluated else self.published_anchor

    @property
    def reason(self) -> str:
        """Why it is on or off by default, in one sentence."""
        if not self.evaluated:
            return ("not evaluated (no patient of the virtual cohort has its input); on as a published anchor "
                    "equation" if self.published_anchor else
                    "not evaluated (no patient of the virtual cohort has its input); off until it is")
        if self.worsened:
            return f"off: worsened subgroup calibration in {len(self.worsened)} row(s)"
        return "on: worsened no subgroup's calibration"

    def to_json(self) -> dict[str, Any]:
        """Plain dict, as stored in components.json."""
        return {"component": self.component, "default_on": self.default_on, "reason": self.reason,
                "evaluated": self.evaluated, "patients_affected": self.patients_affected,
                "flags_without": self.flags_without, "flags_with": self.flags_with,
                "worsened": [w.to_json() for w in self.worsened]}


def verdict(component: str, without: Sequence[Row], with_component: Sequence[Row],
            patients_affected: int) -> ComponentVerdict:
    """Compare the report's rows without and with one component."""
    def firm_flags(rows: Sequence[Row]) -> int:
        return sum(1 for r in rows if r.flag and r.engine.events >= FEW_EVENTS and not flag_reason(r.truth))

    return ComponentVerdict(component, tuple(worsened_rows(without, with_component)), patients_affected,
                            firm_flags(without), firm_flags(with_component))


# ------------------------------------------------------------------------------------------------
# the run over the virtual cohort
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GovernanceReport:
    """Every component's verdict against the anchor alone, and which passing ones were kept together."""

    n: int
    seed: int
    draws: int
    verdicts: tuple[ComponentVerdict, ...]
    whole_cohort: dict[str, list[dict[str, Any]]]
    joint: ComponentVerdict | None = None
    dropped_together: tuple[tuple[str, tuple[Worsened, ...]], ...] = ()

    @property
    def default_on(self) -> tuple[str, ...]:
        """The components on by default: passed alone and kept when added to the others (or, unevaluated, a
        published anchor)."""
        dropped = {name for name, _ in self.dropped_together}
        return tuple(v.component for v in self.verdicts if v.default_on and v.component not in dropped)

    def _final(self, v: ComponentVerdict) -> dict[str, Any]:
        """One component's entry with the final default (adding it to the others can turn a passing one off)."""
        rows = dict(self.dropped_together).get(v.component)
        if rows is None:
            return v.to_json()
        return {**v.to_json(), "default_on": False,
                "reason": f"off: passed alone, but added to the components kept before it, it worsened subgroup "
                          f"calibration in {len(rows)} row(s)",
                "worsened_together": [w.to_json() for w in rows]}

    def to_json(self) -> dict[str, Any]:
        """What ``components.json`` holds."""
        return {"format": FORMAT,
                "rule": {"oe_range": list(OE_RANGE), "slope_range": list(SLOPE_RANGE), "few_events": FEW_EVENTS,
                         "text": RULE_TEXT},
                "cohort": {"generator": "fhirtwin.validation.events (markers=True)", "n_virtual": self.n,
                           "seed": self.seed, "draws": self.draws,
                           "design": "each component alone vs the anchor alone (all optional components off), "
                                     "then the passing ones added one at a time (most helpful alone first), "
                                     "each set vs the anchor alone; same patients and seeds"},
                "components": {v.component: self._final(v) for v in self.verdicts},
                "together": None if self.joint is None else self.joint.to_json(),
                "whole_cohort": self.whole_cohort}


FORMAT = "fhirtwin-components/1"
RULE_TEXT = ("A component is off by default when, in an outcome x horizon x subgroup row with at least "
             f"{FEW_EVENTS} events where the generator's true risks are inside O/E {OE_RANGE[0]}-{OE_RANGE[1]} "
             f"and slope {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}, the engine with it lies further outside those bounds "
             "than without it (inside counts as 0) by more than 5 % on O/E or 0.05 on the slope.")


def run(n: int = 6000, seed: int = 2026, draws: int = 40,
        progress: Callable[[str, int, int], None] | None = None) -> GovernanceReport:
    """Score every optional component on the virtual cohort with markers (module docstring design)."""
    from fhirtwin.sim.components import component_inputs
    from fhirtwin.sim.modifiers import modifier_table
    from fhirtwin.validation.calibration import score
    from fhirtwin.validation.events import engine_predictions, generate

    cohort = generate(n, seed, markers=True)
    inputs = component_inputs()

    def step(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda i, total: progress(name, i, total))

    def predict(on: frozenset[str], only: Sequence[int] | None, base: dict[str, Any] | None,
                label: str) -> dict[str, Any]:
        return engine_predictions(cohort, draws, model_kwargs={"components": on}, only=only, base=base,
                                  progress=step(label))

    def rows(predicted: dict[str, Any]) -> list[Row]:
        return score(predicted, cohort.observed, cohort.truth, cohort.attributes)

    def overall(found: list[Row]) -> list[dict[str, Any]]:
        return [r.to_json() for r in found if r.dimension == "all"]

    def users(names: frozenset[str]) -> list[int]:
        fields = [f for name in names for f in inputs[name]]
        return [i for i, p in enumerate(cohort.inputs) if any(getattr(p, f) is not None for f in fields)]

    anchor = predict(frozenset(), None, None, "anchor alone")
    rows_anchor = rows(anchor)
    whole: dict[str, list[dict[str, Any]]] = {"anchor alone": overall(rows_anchor)}
    anchors = set(modifier_table()["anchors"])
    verdicts: list[ComponentVerdict] = []
    for name in inputs:
        affected = users(frozenset({name}))
        if not affected:
            verdicts.append(ComponentVerdict(name, (), 0, 0, 0, evaluated=False, published_anchor=name in anchors))
            continue
        found = rows(predict(frozenset({name}), affected, anchor, name))
        whole[f"{name} alone"] = overall(found)
        verdicts.append(verdict(name, rows_anchor, found, len(affected)))
    # then together: added one at a time, the most helpful alone first; one that worsens the set is dropped
    order = [v.component for v in sorted((v for v in verdicts if v.default_on and v.evaluated),
                                         key=lambda v: (v.flags_with - v.flags_without, v.component))]

    def judge(trial: frozenset[str]) -> ComponentVerdict:
        found = rows(predict(trial, users(trial), anchor, "+".join(sorted(trial))))
        tried = verdict("+".join(sorted(trial)), rows_anchor, found, len(users(trial)))
        if not tried.worsened:
            whole[f"together: {', '.join(sorted(trial))}"] = overall(found)
        return tried

    _, joint, dropped = keep_together(order, judge)
    return GovernanceReport(n, seed, draws, tuple(verdicts), whole, joint, tuple(dropped))


def keep_together(order: Sequence[str], judge: Callable[[frozenset[str]], ComponentVerdict]
                  ) -> tuple[list[str], ComponentVerdict | None, list[tuple[str, tuple[Worsened, ...]]]]:
    """Add components in ``order``; keep one when ``judge`` finds the enlarged set worsens nothing.

    Returns (kept, the verdict of the last kept set of two or more, the dropped ones with the rows they worsened).
    """
    kept: list[str] = []
    joint: ComponentVerdict | None = None
    dropped: list[tuple[str, tuple[Worsened, ...]]] = []
    for name in order:
        if not kept:
            kept.append(name)
            continue
        tried = judge(frozenset([*kept, name]))
        if tried.worsened:
            dropped.append((name, tried.worsened))
        else:
            kept.append(name)
            joint = tried
    return kept, joint, dropped


def markdown(report: GovernanceReport) -> str:
    """The governance page (docs/validation/governance.md)."""
    lines = ["# Component governance: subgroup calibration with and without each optional component", "",
             f"Generated by `fhirtwin validate governance --n {report.n} --seed {report.seed}`: {report.n} virtual "
             f"patients with markers (`fhirtwin.validation.events`, markers=True), {report.draws} ensemble draws "
             "each. Design: each component alone against the anchor alone (every optional component off), then "
             "the components that pass added one at a time, each set against the anchor alone (same patients, "
             "same seeds).",
             "", f"**Rule.** {RULE_TEXT}", "",
             "The virtual cohort's events come from a generator that states each marker's true effect in its own "
             "code (PM2.5's true effect there is null); this checks that a component does not miscalibrate a "
             "subgroup in that synthetic world. It is not external validation.", "",
             "| Component | Default | Patients with the input | Firm flags without | Firm flags with | Why |",
             "|---|---|---|---|---|---|"]
    for v in report.verdicts:
        final = report._final(v)
        lines.append(f"| {v.component} | {'on' if final['default_on'] else 'off'} | "
                     f"{v.patients_affected} | {v.flags_without} | {v.flags_with} | {final['reason']} |")
    if report.joint is not None or report.dropped_together:
        kept = report.joint.component.replace("+", ", ") if report.joint is not None else "none"
        lines += ["", "**Together.** The components that passed alone were added one at a time, the most helpful "
                  f"alone first; kept together: {kept}"
                  + (f" (firm flags {report.joint.flags_without} without, {report.joint.flags_with} with)"
                     if report.joint is not None else "")
                  + "; " + ("; ".join(f"{name} dropped: with the others it worsened {len(rows)} row(s)"
                                    for name, rows in report.dropped_together) or "none dropped") + "."]
    lines += ["", "## Whole cohort (O/E; slope)", "", "| Setting | " + " | ".join(
        f"{r['outcome']} {r['horizon_years']} y" for r in next(iter(report.whole_cohort.values()))) + " |",
              "|---|" + "---|" * len(next(iter(report.whole_cohort.values())))]
    for setting, found in report.whole_cohort.items():
        lines.append(f"| {setting} | " + " | ".join(
            f"{r['engine']['oe']:.2f}; {r['engine']['slope']:.2f}" if r["engine"]["oe"] is not None
            and r["engine"]["slope"] is not None else "-" for r in found) + " |")
    worsened = [(v.component, w) for v in report.verdicts for w in v.worsened]
    worsened += [(f"{name} with the others", w) for name, rows in report.dropped_together for w in rows]
    if worsened:
        lines += ["", "## Rows a component worsened", ""]
        lines += [f"- {name}: {w.text()}" for name, w in worsened]
    lines += ["", "A deployment overrides the defaults with `FHIRTWIN_COMPONENTS=\"name=on,other=off\"`; every "
              "forecast records the components it used in its method (`components_on`).", ""]
    return "\n".join(lines)


def write(report: GovernanceReport, verdicts_path: Path, docs_path: Path) -> None:
    """components.json (read by the engine for its defaults) and the Markdown page."""
    verdicts_path.write_text(json.dumps(report.to_json(), indent=1, sort_keys=False) + "\n", "utf-8")
    docs_path.write_text(markdown(report), "utf-8")
