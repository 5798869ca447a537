"""Files shipped inside the package: the conformance resources and the model card.

Why here: a pip-installed fhirtwin has no repository around it, so everything a command serves or
uploads is read through :mod:`importlib.resources`, never from a path relative to the checkout.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

PROFILES_PACKAGE = "fhirtwin.profiles"


def _walk(folder: Traversable) -> list[Traversable]:
    found: list[Traversable] = []
    for item in sorted(folder.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            found += _walk(item)
        elif item.name.endswith(".json"):
            found.append(item)
    return found


def conformance_resources() -> list[dict[str, Any]]:
    """Every StructureDefinition, CodeSystem, ValueSet and OperationDefinition fhirtwin ships."""
    out = []
    for item in _walk(resources.files("fhirtwin") / "profiles"):
        resource = json.loads(item.read_text("utf-8"))
        if isinstance(resource, dict) and "resourceType" in resource and "id" in resource:
            out.append(resource)
    return out


def model_card_markdown() -> str:
    """The model card (Markdown), as linked from every RiskAssessment, Provenance and CDS card."""
    return (resources.files("fhirtwin") / "model-card.md").read_text("utf-8")
