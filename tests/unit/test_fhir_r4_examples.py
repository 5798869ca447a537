"""The FHIR R4 specification's own examples (tests/data/fhir-r4-examples, not written by this project).

Every example of a type the twin reads goes through the adapters grouped by the patient it names, with the
Medications it may refer to: nothing crashes, every resource is used or ledgered, and the examples whose
meaning is stated in the specification are read as such (Patient/example's ischaemic stroke puts the
patient out of primary-prevention scope; the blood-pressure panel's components).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.sim.scope import decide_scope
from fhirtwin.twin import TwinState

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "fhir-r4-examples"
REF = date(2020, 1, 1)


def _versioned(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "meta": {**resource.get("meta", {}), "versionId": "1"}}


def _owner(resource: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            return str(ref["reference"]).split("/")[1]
    return resource["id"] if resource["resourceType"] == "Patient" else None


def _records() -> dict[str, list[dict[str, Any]]]:
    resources = [_versioned(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(EXAMPLES.glob("*.json"))]
    medications = [r for r in resources if r["resourceType"] == "Medication"]
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in resources:
        owner = _owner(resource)
        if owner is not None:
            records[owner].append(resource)
    return {pid: [*record, *medications] for pid, record in records.items()}


RECORDS = _records()


@pytest.fixture(scope="module")
def twins() -> dict[str, TwinState]:
    return {pid: build_twin(pid, record, REF) for pid, record in RECORDS.items()}


def test_the_examples_cover_the_read_types() -> None:
    types = {r["resourceType"] for record in RECORDS.values() for r in record}
    assert {"Patient", "Observation", "Condition", "Procedure", "MedicationRequest", "MedicationStatement",
            "MedicationDispense", "Medication"} <= types


@pytest.mark.parametrize("patient_id", sorted(RECORDS))
def test_every_example_is_used_or_ledgered(twins: dict[str, TwinState], patient_id: str) -> None:
    state = twins[patient_id]
    used = {ev.source.unversioned for ev in state.all_evidence()}
    if state.demographics.source is not None:
        used.add(state.demographics.source.unversioned)
    ledgered = {entry.source.split("/_history/")[0] for entry in state.ledger}
    own = [r for r in RECORDS[patient_id] if r["resourceType"] != "Medication"]
    missing = [f"{r['resourceType']}/{r['id']}" for r in own
               if f"{r['resourceType']}/{r['id']}" not in used | ledgered]
    assert not missing


def test_patient_example_stroke_and_blood_pressure(twins: dict[str, TwinState]) -> None:
    state = twins["example"]
    stroke = json.loads((EXAMPLES / "Condition-stroke.json").read_text())
    assert stroke["code"]["coding"][0]["code"] == "422504002"  # Ischemic stroke (disorder)
    assert state.latest("established_ascvd", REF).value is True
    assert decide_scope(state, REF).code == "scope-established-ascvd"
    panel = json.loads((EXAMPLES / "Observation-blood-pressure.json").read_text())
    values = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in panel["component"]}
    assert any(ev.value == values["8480-6"] for ev in state.history("systolic_bp_mm_hg"))
    assert any(ev.value == values["8462-4"] for ev in state.history("diastolic_bp_mm_hg"))


def test_medication_references_to_present_or_contained_medications_resolve(twins: dict[str, TwinState]) -> None:
    present = {f"Medication/{r['id']}" for record in RECORDS.values() for r in record
               if r["resourceType"] == "Medication"}
    checked = 0
    for pid, record in RECORDS.items():
        for r in record:
            ref = (r.get("medicationReference") or {}).get("reference")
            contained = {f"#{c.get('id')}" for c in r.get("contained", []) if c.get("resourceType") == "Medication"}
            if r["resourceType"].startswith("Medication") and (ref in present or ref in contained):
                checked += 1
                entries = twins[pid].ledger.entries(source=f"{r['resourceType']}/{r['id']}")
                assert not any("not in the input" in e.message for e in entries), (pid, r["id"])
    assert checked >= 5
