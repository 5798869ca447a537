"""An offline Plan + TwinState for the write-back tests: the first synthetic cohort patient, versioned."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from functools import cache

from fhirtwin.adapters import build_twin
from fhirtwin.engine import Engine, TwinRun
from fhirtwin.sandbox.cohort import generate_cohort

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def versioned_resources(version: str = "1") -> tuple[str, list[dict]]:
    """The first cohort patient's resources with ``meta.versionId`` set, as a server would return them."""
    bundle = generate_cohort(n_patients=1).bundles[0]
    resources = []
    for entry in bundle["entry"]:
        resource = copy.deepcopy(entry["resource"])
        resource.setdefault("meta", {})["versionId"] = version
        resources.append(resource)
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    return patient_id, resources


@cache
def cohort_run() -> TwinRun:
    """Plan of the first cohort patient (small ensemble; cached for the module)."""
    patient_id, resources = versioned_resources()
    state = build_twin(patient_id, resources, date(2026, 6, 30))
    run = Engine().simulate(state, draws=200)
    assert run.plan is not None, run.error
    return run


def changed_run() -> TwinRun:
    """The same patient after one input got a new version (an LDL result edited on the server)."""
    patient_id, resources = versioned_resources()
    for resource in resources:
        codes = [c.get("code") for c in resource.get("code", {}).get("coding", [])]
        if resource["resourceType"] == "Observation" and ("13457-7" in codes or "18262-6" in codes):
            resource["meta"]["versionId"] = "2"
    state = build_twin(patient_id, resources, date(2026, 6, 30))
    return Engine().simulate(state, draws=200)
