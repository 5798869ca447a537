"""The engine's door to treatment sequencing: a planned run gives its optimal timed sequence and a valid R4
draft CarePlan; a run without a plan is refused with the engine's typed errors."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from writeback_fixtures import cohort_run

from fhirtwin.adapters import build_twin
from fhirtwin.engine import Engine, InsufficientPatientData
from fhirtwin.fhir.models import check_emittable, validate_resource

NOW = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)


def test_a_planned_run_gives_timed_steps_and_a_valid_care_plan() -> None:
    run = cohort_run()
    plan, care_plan = Engine().sequence(run, draws=40, now=NOW)
    assert plan.patient_id == run.patient_id and plan.horizon_years == 10
    # the exact optimum is never worse than any fixed comparator, in expectation
    assert all(plan.net_benefit["expected"] >= c["expected"] - 1e-12 for c in plan.comparators.values())
    validate_resource(care_plan)
    check_emittable(care_plan)
    assert care_plan["status"] == "draft" and care_plan["intent"] == "proposal"
    assert care_plan["subject"]["reference"] == f"Patient/{run.patient_id}"
    starts = [a["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"]["start"] for a in care_plan.get("activity", [])]
    assert bool(starts) == any(s.verb != "stop" for s in plan.steps)
    assert sorted({date.fromisoformat(s).year - 2026 for s in starts}) == sorted(
        {s.year for s in plan.steps if s.verb not in ("stop", "quit-attempt")} | (
            {min(s.year for s in plan.steps if s.verb == "quit-attempt")} if any(
                s.verb == "quit-attempt" for s in plan.steps) else set()))


def test_without_a_plan_the_engine_says_why() -> None:
    state = build_twin("lonely", [{"resourceType": "Patient", "id": "lonely", "gender": "female",
                                   "birthDate": "1970-01-01"}], date(2026, 6, 30))
    run = Engine().simulate(state, draws=20)
    with pytest.raises(InsufficientPatientData):
        Engine().sequence(run, draws=20)


def test_the_care_plan_identifier_names_the_component_configuration() -> None:
    """A sequence made with other optional components is another result, as for the forecasts."""
    run = cohort_run()
    on, plan_on = Engine().sequence(run, draws=10, now=NOW)
    none, plan_none = Engine(components=[]).sequence(run, draws=10, now=NOW)
    assert on.components and none.components == ()
    assert plan_on["identifier"] != plan_none["identifier"]
    again, plan_again = Engine().sequence(run, draws=10, now=NOW)
    assert plan_again["identifier"] == plan_on["identifier"]
