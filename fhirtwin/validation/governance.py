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

import math
from collections.abc import Sequence
from dataclasses import dataclass
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
    """One component's governance result: on by default only when it worsens no subgroup."""

    component: str
    worsened: tuple[Worsened, ...]
    patients_affected: int
    flags_without: int
    flags_with: int

    @property
    def default_on(self) -> bool:
        """On by default unless it worsened subgroup calibration."""
        return not self.worsened

    def to_json(self) -> dict[str, Any]:
        """Plain dict, as stored in components.json."""
        return {"component": self.component, "default_on": self.default_on,
                "patients_affected": self.patients_affected, "flags_without": self.flags_without,
                "flags_with": self.flags_with, "worsened": [w.to_json() for w in self.worsened]}


def verdict(component: str, without: Sequence[Row], with_component: Sequence[Row],
            patients_affected: int) -> ComponentVerdict:
    """Compare the report's rows without and with one component."""
    def firm_flags(rows: Sequence[Row]) -> int:
        return sum(1 for r in rows if r.flag and r.engine.events >= FEW_EVENTS and not flag_reason(r.truth))

    return ComponentVerdict(component, tuple(worsened_rows(without, with_component)), patients_affected,
                            firm_flags(without), firm_flags(with_component))
