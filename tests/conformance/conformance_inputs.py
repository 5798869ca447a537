"""Writes the FHIR JSON files the HL7 validator checks: what fhirtwin writes for cohort patients, offline.

Run as ``python conformance_inputs.py OUT_DIR`` (the conformance fixture runs it in a subprocess so that
building the files overlaps other tests without holding their interpreter). For the first
:data:`PATIENTS` synthetic cohort patients whose twin can be fitted it writes

* ``input-<patient>.json``: the patient's transaction Bundle as the cohort generator makes it;
* ``write-<patient>.json``: the transaction Bundle ``build_patient_write`` makes from it, alternating the
  two server kinds: even positions as for a HAPI server (absolute ``fullUrl``s under :data:`BASE_URL`,
  HAPI's auto-version extension), odd positions as for any other server (``urn:uuid`` ``fullUrl``s, no
  HAPI extension);
* ``draft-careplan-<patient>.json``: the standalone draft CarePlan of the CDS Hooks suggestion;
* ``supersede-<patient>.json`` for the first patient: a second write after one input changed, which
  supersedes the first write's stored results (PUT entries, ``supersedes`` extension, revision entities);
* ``library-<id>.json``: the model card Library of every registered model version (``fhirtwin register``);

and ``manifest.json`` listing them, the files written for HAPI and the results the cohort generator
deliberately stripped of their unit (its documented ``missing-unit`` messy data). Patients whose fit
raises ``InsufficientData`` are skipped.
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fhirtwin.adapters import build_twin
from fhirtwin.model_card import model_card_libraries
from fhirtwin.sandbox.cohort import generate_cohort
from fhirtwin.sim.inputs import InsufficientData
from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.sim.planner import plan
from fhirtwin.writeback.careplan import build_draft_care_plan
from fhirtwin.writeback.device import device_id
from fhirtwin.writeback.jws import generate_key
from fhirtwin.writeback.transaction import build_patient_write

PATIENTS = 10
#: Patients looked at to find PATIENTS that can be fitted (the cohort is deterministic).
CANDIDATES = 40
BASE_URL = "http://127.0.0.1:8080/fhir"
REFERENCE_DATE = date(2026, 6, 30)
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def _versioned(bundle: dict[str, Any], version: str) -> list[dict[str, Any]]:
    """The bundle's resources with ``meta.versionId``, as a server returns them."""
    resources = []
    for entry in bundle["entry"]:
        resource = copy.deepcopy(entry["resource"])
        resource.setdefault("meta", {})["versionId"] = version
        resources.append(resource)
    return resources


def _plan(patient_id: str, resources: list[dict[str, Any]]) -> tuple[Any, Any]:
    state = build_twin(patient_id, resources, REFERENCE_DATE)
    model = MechanisticTwin().fit(state)
    return plan(model, outcome="total_cvd", horizon_years=10, draws=200, seed=0), state


def _stored(write_bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of a write as the server stores them: ids and versions assigned, urn references resolved."""
    ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/stored-{n}"
           for n, e in enumerate(write_bundle["entry"]) if e["request"]["method"] == "POST"}
    stored = []
    for entry in write_bundle["entry"]:
        if entry["request"]["method"] != "POST" or entry["resource"]["resourceType"] == "Provenance":
            continue
        text = json.dumps(entry["resource"])
        for urn, ref in ids.items():
            text = text.replace(f'"{urn}"', json.dumps(ref))
        resource = json.loads(text)
        resource["id"] = ids[entry["fullUrl"]].split("/")[1]
        resource.setdefault("meta", {})["versionId"] = "1"
        stored.append(resource)
    return stored


def _dump(path: Path, resource: dict[str, Any]) -> str:
    path.write_text(json.dumps(resource, indent=1, sort_keys=True))
    return path.name


def build(out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    cohort = generate_cohort(n_patients=CANDIDATES)
    manifest: dict[str, Any] = {"patients": [], "skipped": [], "files": {}, "hapi_files": [], "missing_unit": []}
    manifest["libraries"] = [_dump(out_dir / f"library-{library['id']}.json", library)
                             for library in model_card_libraries()]
    for bundle in cohort.bundles:
        if len(manifest["patients"]) == PATIENTS:
            break
        patient_id = bundle["entry"][0]["resource"]["id"]
        resources = _versioned(bundle, "1")
        try:
            the_plan, state = _plan(patient_id, resources)
        except InsufficientData as exc:
            manifest["skipped"].append({"patient": patient_id, "reason": str(exc)})
            continue
        hapi = len(manifest["patients"]) % 2 == 0
        write = build_patient_write(the_plan, state, key=key, existing=[], now=NOW,
                                    base_url=BASE_URL if hapi else None, hapi=hapi)
        forecast = the_plan.baseline
        draft = build_draft_care_plan(the_plan, state, occurrence=NOW,
                                      device_reference=f"Device/{device_id(forecast.model, forecast.model_version)}")
        files = {
            "input": _dump(out_dir / f"input-{patient_id}.json", bundle),
            "write": _dump(out_dir / f"write-{patient_id}.json", write.bundle),
            "draft-careplan": _dump(out_dir / f"draft-careplan-{patient_id}.json", draft),
        }
        if not manifest["patients"]:
            # Supersede: the Observations edited on the server (version 2) after the first write was stored.
            changed = _versioned(bundle, "1")
            for resource in changed:
                if resource["resourceType"] == "Observation":
                    resource["meta"]["versionId"] = "2"
            plan2, state2 = _plan(patient_id, changed)
            second = build_patient_write(plan2, state2, key=key, existing=_stored(write.bundle), now=NOW,
                                         base_url=BASE_URL, hapi=True)
            files["supersede"] = _dump(out_dir / f"supersede-{patient_id}.json", second.bundle)
        manifest["patients"].append(patient_id)
        manifest["files"][patient_id] = files
        manifest["hapi_files"] += [files["write"]] if hapi else []
        manifest["hapi_files"] += [files["supersede"]] if "supersede" in files else []
        # results the cohort generator deliberately stripped of unit, system and code (its "missing-unit" kind)
        manifest["missing_unit"] += [m["id"] for m in cohort.truth[patient_id]["messy"] if m["kind"] == "missing-unit"]
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    build(Path(sys.argv[1]))
