"""What each of the twin's seven scales contributed to one patient's forecast.

Why: a clinician (and a governance board) should see, per scale, whether the record had data there, and
whether that data moved the risk in the engine or was only read. "Read, no modelled effect" and "no data"
are answers too: they say where the twin is blind, instead of implying that every scale acts. One home for
this summary; the CDS card, the SMART page and the CarePlan all show it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fhirtwin.twin.evidence import Scale

Status = Literal["acts", "used", "read", "no data"]
STATUS_TEXT: dict[str, str] = {
    "acts": "moves the forecast",
    "used": "used as a model input; no contribution above a reference value to show",
    "read": "recorded, but the model has no effect for it",
    "no data": "no data in the record",
}


class ScaledDriver(Protocol):
    """A driver as this summary reads it (``fhirtwin.sim.model.Driver`` fits)."""

    @property
    def factor(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def scale(self) -> str: ...
    @property
    def contribution(self) -> float: ...


@dataclass(frozen=True)
class ScaleContribution:
    """One scale: the variables recorded there (and which the model used), the factors that moved a risk,
    and the largest such move."""

    scale: str
    status: Status
    read: tuple[str, ...]
    used: tuple[str, ...]
    factors: tuple[str, ...]
    largest_points: float
    largest_outcome: str | None
    switched_off: tuple[str, ...] = ()

    def text(self) -> str:
        """One line for a card, a page or a CarePlan note."""
        head = f"{self.scale}: {STATUS_TEXT[self.status]}"
        off = f"; switched off in this deployment: {', '.join(self.switched_off)}" if self.switched_off else ""
        if self.status == "acts" and self.largest_outcome is not None:
            return (f"{head} ({', '.join(self.factors)}; largest {100 * self.largest_points:+.1f} points of "
                    f"{self.largest_outcome.replace('_', ' ')} risk{off})")
        if self.status == "used":
            return f"{head} ({', '.join(self.used)}{off})"
        if self.status == "read":
            shown = [v for v in self.read if v not in self.switched_off]
            return f"{head} ({', '.join(shown)}{off})" if shown else f"{head} ({off[2:]})"
        return head

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {"scale": self.scale, "status": self.status, "read": list(self.read), "used": list(self.used),
                "switched_off": list(self.switched_off),
                "factors": list(self.factors), "largest_points": self.largest_points,
                "largest_outcome": self.largest_outcome, "text": self.text()}


def scale_contributions(drivers: Iterable[ScaledDriver], read: Mapping[str, Iterable[str]],
                        used: Iterable[str] = (), switched_off: Iterable[str] = ()) -> tuple[ScaleContribution, ...]:
    """Per scale, in the order molecular -> environmental: acts (has a driver), used, read, or no data.

    ``read`` maps a scale to the twin variables the record held there at the forecast date; ``used`` names
    the variables the engine took a value from (an input at or better than its reference has no driver);
    ``switched_off`` recorded variables of a component this deployment turned off. A driver's
    contribution is its own counterfactual (risk now minus risk with that factor at its reference), so the
    largest one per scale is shown rather than a sum, which would not be meaningful for non-additive risks.
    """
    by_scale: dict[str, list[ScaledDriver]] = {}
    for d in drivers:
        by_scale.setdefault(d.scale, []).append(d)
    taken, off = set(used), set(switched_off)
    out: list[ScaleContribution] = []
    for scale in Scale:
        name = scale.value
        acting = sorted(by_scale.get(name, []), key=lambda d: -abs(d.contribution))
        variables = tuple(sorted(set(read.get(name, ()))))
        in_model = tuple(v for v in variables if v in taken)
        dropped = tuple(v for v in variables if v in off)
        if acting:
            factors = tuple(dict.fromkeys(d.factor for d in acting))
            out.append(ScaleContribution(name, "acts", variables, in_model, factors, acting[0].contribution,
                                         acting[0].outcome, dropped))
        else:
            status: Status = "used" if in_model else "read" if variables else "no data"
            out.append(ScaleContribution(name, status, variables, in_model, (), 0.0, None, dropped))
    return tuple(out)
