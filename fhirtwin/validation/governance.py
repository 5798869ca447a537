"""Governance of optional engine components: each one is scored on subgroup calibration, on and off.

Why: a new mechanism (a scale modifier, a learned residual) can improve the cohort as a whole and still
miscalibrate a subgroup, which is exactly what a governance board (and ONC HTI-1's fairness attributes)
asks about. The rule is the calibration report's own: a subgroup is out of bounds when its O/E lies outside
0.8-1.25 or its calibration slope outside 0.8-1.2. A component **worsens subgroup calibration** when, in a
subgroup with at least ``FEW_EVENTS`` events where the generator's true risks are inside the bounds (so the
miss is not sampling noise), the engine with the component is out of bounds and either was inside without
it or is further out than without it. Such a component is **off by default**; the decision, with the rows
that caused it, is written to ``fhirtwin/sim/components.json`` and the model card lists it.
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


def miss(row: Row) -> float:
    """The engine's distance outside the calibration bounds in this row (O/E on the log scale, plus slope)."""
    return (_distance_outside(row.engine.oe, OE_RANGE, True)
            + _distance_outside(row.engine.slope, SLOPE_RANGE, False))


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
        now = flag_reason(r.engine)
        if now and miss(r) > miss(b) + 1e-12:
            out.append(Worsened(r.outcome, r.horizon_years, r.dimension, r.level, flag_reason(b.engine), now))
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
    """Every component's verdict, from one virtual cohort (leave-one-out from all components on)."""

    n: int
    seed: int
    draws: int
    verdicts: tuple[ComponentVerdict, ...]
    whole_cohort: dict[str, list[dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        """What ``components.json`` holds."""
        return {"format": FORMAT,
                "rule": {"oe_range": list(OE_RANGE), "slope_range": list(SLOPE_RANGE), "few_events": FEW_EVENTS,
                         "text": RULE_TEXT},
                "cohort": {"generator": "fhirtwin.validation.events (markers=True)", "n_virtual": self.n,
                           "seed": self.seed, "draws": self.draws,
                           "design": "leave one out: all components on vs all on but this one, same patients "
                                     "and seeds"},
                "components": {v.component: v.to_json() for v in self.verdicts},
                "whole_cohort": self.whole_cohort}


FORMAT = "fhirtwin-components/1"
RULE_TEXT = ("A component is off by default when, in an outcome x horizon x subgroup row with at least "
             f"{FEW_EVENTS} events where the generator's true risks are inside O/E {OE_RANGE[0]}-{OE_RANGE[1]} "
             f"and slope {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}, the engine with it is outside those bounds and was "
             "inside without it or is further outside than without it.")


def run(n: int = 6000, seed: int = 2026, draws: int = 40,
        progress: Callable[[str, int, int], None] | None = None) -> GovernanceReport:
    """Score every optional component on the virtual cohort with markers, leave-one-out from all on."""
    from fhirtwin.sim.components import component_inputs
    from fhirtwin.sim.modifiers import modifier_table
    from fhirtwin.validation.calibration import score
    from fhirtwin.validation.events import engine_predictions, generate

    cohort = generate(n, seed, markers=True)
    inputs = component_inputs()
    everything = frozenset(inputs)

    def step(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda i, total: progress(name, i, total))

    full = engine_predictions(cohort, draws, model_kwargs={"components": everything}, progress=step("all on"))
    rows_full = score(full, cohort.observed, cohort.truth, cohort.attributes)
    anchors = set(modifier_table()["anchors"])
    verdicts: list[ComponentVerdict] = []
    whole: dict[str, list[dict[str, Any]]] = {"all on": [r.to_json() for r in rows_full if r.dimension == "all"]}
    for name, fields in inputs.items():
        affected = [i for i, p in enumerate(cohort.inputs) if any(getattr(p, f) is not None for f in fields)]
        if not affected:
            verdicts.append(ComponentVerdict(name, (), 0, 0, 0, evaluated=False, published_anchor=name in anchors))
            continue
        without = engine_predictions(cohort, draws, model_kwargs={"components": everything - {name}},
                                     only=affected, base=full, progress=step(name))
        rows = score(without, cohort.observed, cohort.truth, cohort.attributes)
        whole[f"without {name}"] = [r.to_json() for r in rows if r.dimension == "all"]
        verdicts.append(verdict(name, rows, rows_full, len(affected)))
    return GovernanceReport(n, seed, draws, tuple(verdicts), whole)


def markdown(report: GovernanceReport) -> str:
    """The governance page (docs/validation/governance.md)."""
    lines = ["# Component governance: subgroup calibration with and without each optional component", "",
             f"Generated by `fhirtwin validate governance --n {report.n} --seed {report.seed}`: {report.n} virtual "
             f"patients with markers (`fhirtwin.validation.events`, markers=True), {report.draws} ensemble draws "
             "each. Design: every component on, against every component on but one (same patients, same seeds).",
             "", f"**Rule.** {RULE_TEXT}", "",
             "The virtual cohort's events come from a generator that states each marker's true effect in its own "
             "code (PM2.5's true effect there is null); this checks that a component does not miscalibrate a "
             "subgroup in that synthetic world. It is not external validation.", "",
             "| Component | Default | Patients with the input | Firm flags without | Firm flags with | Why |",
             "|---|---|---|---|---|---|"]
    for v in report.verdicts:
        lines.append(f"| {v.component} | {'on' if v.default_on else 'off'} | {v.patients_affected} | "
                     f"{v.flags_without} | {v.flags_with} | {v.reason} |")
    worsened = [(v.component, w) for v in report.verdicts for w in v.worsened]
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
