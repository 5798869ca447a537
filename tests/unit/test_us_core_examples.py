"""The HL7 US Core example resources (tests/data/us-core, not written by this project) read as they should.

Expected values are read from the example files themselves (or stated by their US Core meaning), never
from fhirtwin's tables: a BP panel's components, a serum creatinine, an occasional smoker, a pregnancy
status, medication references that resolve (by reference, contained), and a patient whose sex is only in
the US Core individual-sex extension.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.sim.scope import decide_scope
from fhirtwin.twin import LedgerKind, TwinState

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "us-core"
REF = date(2022, 9, 1)  # after every dated example, within the pregnancy status window


def load(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))


def versioned(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "meta": {**resource.get("meta", {}), "versionId": "1"}}


@pytest.fixture(scope="module")
def record() -> list[dict[str, Any]]:
    return [versioned(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(EXAMPLES.glob("*.json"))]


@pytest.fixture(scope="module")
def state(record: list[dict[str, Any]]) -> TwinState:
    return build_twin("example", record, REF)


def test_every_example_is_used_or_ledgered(record: list[dict[str, Any]], state: TwinState) -> None:
    used = {ev.source.unversioned for ev in state.all_evidence()}
    if state.demographics.source is not None:
        used.add(state.demographics.source.unversioned)
    ledgered = {entry.source.split("/_history/")[0] for entry in state.ledger}
    for resource in record:
        ref = f"{resource['resourceType']}/{resource['id']}"
        assert ref in used or ref in ledgered, ref


def test_sex_from_the_individual_sex_extension_and_age(state: TwinState) -> None:
    patient = load("patient-example")
    assert "gender" not in patient  # US Core 8 example: sex only in the extension
    assert state.demographics.sex == "female"  # SNOMED 248152002 Female in us-core-individual-sex
    assert state.age_years(REF) == 35  # born 1987-02-20


def test_blood_pressure_panel_components(state: TwinState) -> None:
    components = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"]
                  for c in load("blood-pressure")["component"]}
    assert state.latest("systolic_bp_mm_hg").value == components["8480-6"]
    assert state.latest("diastolic_bp_mm_hg").value == components["8462-4"]
    absent = state.ledger.entries(source="Observation/bp-data-absent")
    assert any(e.kind == LedgerKind.NO_VALUE for e in absent)  # its systolic is absent (dataAbsentReason)


def test_labs_vitals_and_smoking(state: TwinState) -> None:
    assert state.latest("creatinine_mg_dl").value == load("observation-serum-creatinine")["valueQuantity"]["value"]
    assert state.latest("height_cm").value == pytest.approx(load("height")["valueQuantity"]["value"])
    assert state.latest("weight_kg").value == pytest.approx(load("weight")["valueQuantity"]["value"])
    # 428041000124106 Occasional tobacco smoker: a current smoker for the equations
    assert state.latest("current_smoker").value is True


def test_pregnancy_status_decides_scope(state: TwinState) -> None:
    assert state.latest("pregnancy", REF).value is True
    assert decide_scope(state, REF).code == "scope-pregnancy"
    assert decide_scope(state, date(2023, 9, 1)).code != "scope-pregnancy"  # a pregnancy ends


def test_medication_references_resolve(state: TwinState) -> None:
    # nizatidine (an H2 blocker) is no twin class: each request is read, resolved and recorded as unmapped,
    # never as an unresolved reference
    for rid in ("medicationrequest-referenced-oral-axid", "medicationrequest-contained-oral-axid",
                "medicationrequest-coded-oral-axid"):
        entries = state.ledger.entries(source=f"MedicationRequest/{rid}")
        assert entries, rid
        assert not any("not in the input" in e.message or "unresolved" in e.message.lower() for e in entries), rid
