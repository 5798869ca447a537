"""The Device that describes fhirtwin (the software model) and the Organization that runs it.

Why stable ids: every RiskAssessment names the Device as performer and every Provenance as author, so
the Device is written with a PUT to an id derived from model name and version; an unchanged body is a
no-op on the server. A software Device sits outside patient compartments (R4 has no Device.patient here).
"""

from __future__ import annotations

import re
from typing import Any

from fhirtwin import __version__
from fhirtwin.vocabulary import (
    DEVICE_ID_SYSTEM,
    EXT_MODEL_CARD,
    MODEL_CARD_URI,
    ORGANIZATION_ID_SYSTEM,
    SNOMED,
    meta,
)
from fhirtwin.writeback.library import model_card_url

DEFAULT_ORGANIZATION = "fhirtwin-deployment"


def device_id(model: str, model_version: str) -> str:
    """``fhirtwin-mechanistic-0-1-0``: letters, digits and dashes only (a valid FHIR id)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", f"{model}-{model_version}")[:64]


def organization_resource(org_id: str = DEFAULT_ORGANIZATION, name: str = "fhirtwin deployment") -> dict[str, Any]:
    """The deploying organisation (agent.onBehalfOf in every Provenance)."""
    return {
        "resourceType": "Organization",
        "id": org_id,
        "meta": meta("fhirtwin-organization"),
        "identifier": [{"system": ORGANIZATION_ID_SYSTEM, "value": org_id}],
        "active": True,
        "name": name,
    }


def device_resource(model: str, model_version: str, org_id: str = DEFAULT_ORGANIZATION) -> dict[str, Any]:
    """The fhirtwin Device: name, software and model versions, model card."""
    return {
        "resourceType": "Device",
        "id": device_id(model, model_version),
        "meta": meta("fhirtwin-device"),
        "extension": [{"url": EXT_MODEL_CARD, "valueCanonical": model_card_url(model, model_version)}],
        "identifier": [{"system": DEVICE_ID_SYSTEM, "value": f"{model}@{model_version}"}],
        "status": "active",
        "manufacturer": "fhirtwin",
        "deviceName": [
            {"name": "fhirtwin", "type": "user-friendly-name"},
            {"name": model, "type": "model-name"},
        ],
        "type": {"coding": [{"system": SNOMED, "code": "706689003", "display": "Application program software"}]},
        "version": [
            {"type": {"text": "software"}, "value": __version__},
            {"type": {"text": "model"}, "value": model_version},
        ],
        "owner": {"reference": f"Organization/{org_id}"},
        "note": [{"text": f"Model card: the Library {model_card_url(model, model_version)} (HTI-1 source "
                          "attributes) and fhirtwin/model-card.md in the fhirtwin package "
                          f"({MODEL_CARD_URI}). Proposals need clinician review."}],
    }
