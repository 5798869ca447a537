"""Deterministic business identifiers: the same inputs give the same identifier, so writes repeat safely.

Why: conditional create (``ifNoneExist: identifier=system|value``) turns a rerun, a retried request or a
Subscription echo into a no-op only if the identifier depends on exactly what determines the result:
the patient, the model name and version, the sorted set of versioned input references, the scenario,
the horizon and the kind of resource (and its outcome or goal).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from fhirtwin.vocabulary import PREDICTION_ID_SYSTEM


def prediction_key(
    patient_id: str,
    model: str,
    model_version: str,
    sources: Iterable[str],
    scenario: str,
    horizon_years: float,
    kind: str,
    configuration: str = "",
) -> str:
    """Hex SHA-256 (first 32 characters) of the canonical JSON of everything that fixes a result.

    ``configuration`` (see :func:`configuration_of`) names the optional components and learned residual the
    model ran with; it enters only when there is one, so results made without any keep their identifiers."""
    payload = {
        "patient": patient_id,
        "model": model,
        "model_version": model_version,
        "inputs": sorted(set(sources)),
        "scenario": scenario,
        "horizon_years": round(float(horizon_years), 6),
        "kind": kind,
    }
    if configuration:
        payload["configuration"] = configuration
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def configuration_of(method: Mapping[str, Any]) -> str:
    """The model configuration a forecast records in its method: optional components on and the learned
    residual's version ('' when neither), so a result made under another configuration gets another key."""
    components = method.get("components_on") or []
    residual = method.get("learned_residual") or {}
    version = residual.get("artifact_version") if isinstance(residual, Mapping) else None
    parts = [f"components={','.join(sorted(components))}"] if components else []
    if version:
        parts.append(f"residual={version}")
    return ";".join(parts)


def identifier(value: str) -> dict[str, Any]:
    """The ``Identifier`` element for a prediction key."""
    return {"system": PREDICTION_ID_SYSTEM, "value": value}


def if_none_exist(value: str) -> str:
    """The conditional-create query for a prediction key."""
    return f"identifier={PREDICTION_ID_SYSTEM}|{value}"


def run_key(keys: Iterable[str]) -> str:
    """Key of one run for one patient: digest of its targets' keys (the Provenance has no identifier)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode("ascii")).hexdigest()[:32]
