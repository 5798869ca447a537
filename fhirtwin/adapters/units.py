"""UCUM normalisation: resolve a Quantity's unit and convert it to a variable's canonical unit.

Units are resolved from ``Quantity.code`` when the system is UCUM, otherwise from the alias table; a
missing or unknown unit raises (the caller records it in the ledger) — a unit is never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirtwin.adapters._common import UCUM, norm_system, read_csv

_ANNOTATION = re.compile(r"\{[^}]*\}")


class UnitError(ValueError):
    """Base of unit problems."""


class MissingUnit(UnitError):
    """The Quantity has neither a code nor a unit string."""


class UnknownUnit(UnitError):
    """The unit is not UCUM/aliased, or cannot be converted to the variable's canonical unit."""


@dataclass(frozen=True)
class Conversion:
    """canonical = value * factor + offset."""

    factor: float
    offset: float
    to_unit: str
    source: str

    def apply(self, value: float) -> float:
        """Convert one value."""
        return value * self.factor + self.offset


@cache
def _conversions() -> dict[tuple[str, str], Conversion]:
    return {
        (r["family"], r["from_unit"]): Conversion(float(r["factor"]), float(r["offset"]), r["to_unit"], r["source"])
        for r in read_csv("unit_conversions.csv")
    }


@cache
def _aliases() -> dict[str, str]:
    return {r["alias"]: r["ucum"] for r in read_csv("unit_aliases.csv")}


def strip_annotations(unit: str) -> str:
    """UCUM comparison form: ``mg/g{creat}`` -> ``mg/g``, ``mL/min/{1.73_m2}`` -> ``mL/min``, ``{score}`` -> ``1``."""
    bare = _ANNOTATION.sub("", unit.strip()).rstrip("/").strip()
    bare = bare.replace("//", "/")
    return bare or "1"


def quantity_unit(quantity: dict[str, Any]) -> str:
    """The unit as given (UCUM code if coded, else the unit string); raises MissingUnit."""
    code = quantity.get("code")
    unit = quantity.get("unit")
    if isinstance(code, str) and code.strip():
        return code.strip()
    if isinstance(unit, str) and unit.strip():
        return unit.strip()
    raise MissingUnit("quantity has no unit")


def _candidates(quantity: dict[str, Any]) -> list[str]:
    out: list[str] = []
    code, unit = quantity.get("code"), quantity.get("unit")
    is_ucum = norm_system(quantity.get("system")) == norm_system(UCUM)
    for text in (code, unit) if is_ucum or not quantity.get("system") else (unit, code):
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def convert(quantity: dict[str, Any], family: str) -> tuple[float, Conversion, str]:
    """Convert a Quantity's value into the family's canonical unit.

    Returns (converted value, conversion used, the unit as given). Raises MissingUnit, UnknownUnit, or
    ValueError for a non-numeric value.
    """
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("quantity value is missing or not a number")
    given = quantity_unit(quantity)
    table = _conversions()
    for text in _candidates(quantity):
        for form in (text, _aliases().get(text)):
            if form is None:
                continue
            conv = table.get((family, strip_annotations(form)))
            if conv is not None:
                return conv.apply(float(value)), conv, given
    raise UnknownUnit(f"unit '{given}' is not a known unit convertible for family {family}")
