"""The vertical path composed: read a record → build the TwinState → fit a model → plan.

The layers do not know each other; this module (used by the CLI and, later, the service) is where
they meet. Reads go through anything with the client's read interface: a live ``FhirClient`` or an
offline ``NdjsonSource``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

from fhirtwin.adapters import build_twin
from fhirtwin.twin import TwinState


class RecordSource(Protocol):
    """What the pipeline needs from a FHIR source (FhirClient and NdjsonSource both offer it)."""

    def fetch_patient_record(self, patient_id: str) -> list[dict[str, Any]]: ...

    def fetch_patients_records(self, patient_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]: ...


def today() -> date:
    return datetime.now(UTC).date()


def read_twin(source: RecordSource, patient_id: str, reference_date: date | None = None) -> TwinState:
    """One patient's TwinState from one record read (one HTTP request on a live server, plus paging)."""
    record = source.fetch_patient_record(patient_id)
    return build_twin(patient_id, record, reference_date or today())


def read_twins(
    source: RecordSource, patient_ids: Iterable[str], reference_date: date | None = None, *, chunk_size: int = 20
) -> Iterator[TwinState]:
    """TwinStates of many patients, reading ``chunk_size`` patients per request."""
    ids = list(patient_ids)
    when = reference_date or today()
    for start in range(0, len(ids), chunk_size):
        records = source.fetch_patients_records(ids[start : start + chunk_size])
        for patient_id, record in records.items():
            yield build_twin(patient_id, record, when)


@dataclass(frozen=True)
class TwinRun:
    """The outcome of simulating one patient: a plan, or the reason there is none."""

    state: TwinState
    plan: Any | None  # fhirtwin.sim.planner.Plan
    error: str | None


def simulate_twin(
    state: TwinState, *, horizon_years: float = 10.0, draws: int = 1000, seed: int = 0, outcome: str = "total_cvd"
) -> TwinRun:
    """Fit the mechanistic twin and rank interventions; insufficient data is an answer, not a crash."""
    from fhirtwin.sim.inputs import InsufficientData
    from fhirtwin.sim.model import MechanisticTwin
    from fhirtwin.sim.planner import plan

    try:
        model = MechanisticTwin().fit(state)
        return TwinRun(state, plan(model, outcome=outcome, horizon_years=horizon_years, draws=draws, seed=seed),
                       None)
    except InsufficientData as exc:
        return TwinRun(state, None, str(exc))


def state_summary(state: TwinState) -> dict[str, Any]:
    """The TwinState as JSON grouped by scale (every scale present), with its ledger."""
    scales = {
        scale.value: {name: [ev.to_json() for ev in series] for name, series in variables.items()}
        for scale, variables in state.by_scale().items()
    }
    return {
        "patient_id": state.patient_id,
        "reference_date": state.reference_date.isoformat() if state.reference_date else None,
        "scales": scales,
        "ledger": state.ledger.to_json(),
    }
