"""Strict mode of the engine: resources failing R4 validation never reach the adapters and are ledgered."""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

from fhirtwin.engine import Engine
from fhirtwin.twin import LedgerKind, TwinState

REF = date(2025, 1, 1)


def read_twin(source: Any, patient_id: str, reference_date: date, *, validate: bool = False) -> TwinState:
    """One patient's twin through the engine (``validate``: strict mode)."""
    engine = Engine(source, strict=validate)
    return engine.twin(engine.read(patient_id, with_stored=False), reference_date)


def read_twins(source: Any, patient_ids: list[str], reference_date: date, *, chunk_size: int = 20,
               validate: bool = False) -> list[TwinState]:
    """Many patients' twins through the engine, ``chunk_size`` per read."""
    engine = Engine(source, strict=validate)
    return [engine.twin(r, reference_date) for r in engine.read_many(patient_ids, chunk_size=chunk_size)]


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1"}, "gender": "female",
            "birthDate": "1961-08-20"}


def tc(rid: str, pid: str, value: Any = 190.0, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": "4"},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2024-03-03",
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        **extra,
    }


class Source:
    """The engine's record source over in-memory records."""

    def __init__(self, records: dict[str, list[Any]]) -> None:
        self.records = records

    def fetch_patient_record(self, patient_id: str, types: Any, **_: Any) -> list[dict[str, Any]]:
        return self.records[patient_id]

    def fetch_patients_records(self, patient_ids: Any, types: Any, **_: Any) -> dict[str, list[dict[str, Any]]]:
        return {pid: self.records[pid] for pid in patient_ids}


def record() -> list[Any]:
    return [
        patient("p1"),
        tc("good", "p1", 180.0, effectiveDateTime="2024-01-01"),
        # read by the lenient adapters as UTC (noted); invalid R4 (a time needs a zone)
        tc("zoneless", "p1", 230.0, effectiveDateTime="2024-06-01T08:00:00"),
        tc("extra", "p1", 240.0, unknownElement=True),
        {"resourceType": "Observation", "status": "final", "code": {"text": "no id"},
         "effectiveDateTime": "not a date"},
        {"resourceType": "Observation", "status": "final", "code": {"text": "valid but no id"}},
        "not a resource",
    ]


def test_default_mode_is_lenient() -> None:
    state = read_twin(Source({"p1": record()}), "p1", REF)
    assert {ev.source.id for ev in state.history("total_cholesterol_mg_dl")} == {"good", "zoneless", "extra"}


def test_strict_mode_ledgers_rejected_resources_and_never_uses_them() -> None:
    data = record()
    before = copy.deepcopy(data)
    state = read_twin(Source({"p1": data}), "p1", REF, validate=True)
    assert data == before
    assert [ev.source.id for ev in state.history("total_cholesterol_mg_dl")] == ["good"]
    zoneless = state.ledger.entries(kind=LedgerKind.MALFORMED, source="Observation/zoneless")
    assert len(zoneless) == 1 and zoneless[0].source == "Observation/zoneless/_history/4"
    assert zoneless[0].message.startswith("failed R4 validation")
    assert "effectiveDateTime" in zoneless[0].message and "230" not in zoneless[0].message
    assert "unknownElement" in state.ledger.entries(source="Observation/extra")[0].message
    malformed = {e.source for e in state.ledger.entries(kind=LedgerKind.MALFORMED)}
    # positions are those of the record as read, whatever was filtered out before them
    assert {"Observation/?[4]", "Observation/?[5]", "input[6]"} <= malformed
    assert state.demographics.source is not None and state.demographics.source.id == "p1"


def test_strict_mode_for_many_patients() -> None:
    source = Source({"p1": record(), "p2": [patient("p2"), tc("p2-tc", "p2", status=None)]})
    states = {s.patient_id: s for s in read_twins(source, ["p1", "p2"], REF, chunk_size=1, validate=True)}
    assert [ev.source.id for ev in states["p1"].history("total_cholesterol_mg_dl")] == ["good"]
    assert states["p2"].history("total_cholesterol_mg_dl") == []
    assert LedgerKind.MALFORMED in states["p2"].ledger.kinds_for("Observation/p2-tc")
    lenient = {s.patient_id: s for s in read_twins(source, ["p1", "p2"], REF)}
    assert len(lenient["p1"].history("total_cholesterol_mg_dl")) == 3
