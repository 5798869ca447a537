"""Loaders for the data files beside the engine (effect sizes, priors, noise, mortality)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent


@cache
def load(filename: str) -> dict[str, Any]:
    """Parse one JSON data file once per process (the ensemble reads it on every call)."""
    with open(_DIR / filename, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def dynamics_parameters() -> dict[str, Any]:
    """Priors, noise, couplings and background mortality (``dynamics_parameters.json``)."""
    return load("dynamics_parameters.json")


def intervention_parameters() -> dict[str, Any]:
    """Effect sizes with CIs and citations (``interventions.json``)."""
    return load("interventions.json")


def modifier_parameters() -> dict[str, Any]:
    """Marker effects beyond the anchor, with CIs, adjustment and citations (``modifiers.json``)."""
    return load("modifiers.json")
