"""Registry of twin variables (name, scale, canonical unit, plausibility bounds), loaded from data.

Keeping the registry as data means a reviewer can check every unit and range against its cited basis
without reading code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from fhirtwin.twin.evidence import Scale

Kind = Literal["quantity", "count", "flag", "code"]


class UnknownVariable(KeyError):
    """Raised for a variable name that is not in the registry."""


@dataclass(frozen=True)
class Variable:
    """One twin variable as declared in ``variables.json``."""

    name: str
    scale: Scale
    kind: Kind
    unit: str | None
    family: str | None = None
    plausible: tuple[float, float] | None = None
    range_source: str = ""
    temporal: Literal["current", "history"] | None = None
    levels: tuple[str, ...] = ()

    @property
    def numeric(self) -> bool:
        """True for quantities and counts."""
        return self.kind in ("quantity", "count")

    def is_plausible(self, value: float) -> bool:
        """True if the value lies inside the screening bounds (always true without bounds)."""
        if self.plausible is None:
            return True
        low, high = self.plausible
        return low <= value <= high

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Variable:
        """Build from one registry entry."""
        plaus = data.get("plausible")
        return cls(
            name=data["name"],
            scale=Scale(data["scale"]),
            kind=data["kind"],
            unit=data.get("unit"),
            family=data.get("family"),
            plausible=(float(plaus[0]), float(plaus[1])) if plaus else None,
            range_source=data.get("range_source", ""),
            temporal=data.get("temporal"),
            levels=tuple(data.get("levels", ())),
        )


@cache
def registry() -> dict[str, Variable]:
    """All declared variables by name (read once)."""
    text = resources.files("fhirtwin.twin").joinpath("variables.json").read_text(encoding="utf-8")
    entries = json.loads(text)["variables"]
    out: dict[str, Variable] = {}
    for entry in entries:
        var = Variable.from_json(entry)
        if var.name in out:
            raise ValueError(f"variable {var.name!r} declared twice in variables.json")
        out[var.name] = var
    return out


def get_variable(name: str) -> Variable:
    """The registry entry for ``name``; raises :class:`UnknownVariable` with the name if absent."""
    try:
        return registry()[name]
    except KeyError:
        raise UnknownVariable(f"unknown twin variable {name!r}") from None
