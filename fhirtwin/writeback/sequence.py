"""A draft CarePlan proposal of a timed treatment sequence (``fhirtwin.sequencing``), valid R4.

Each step is one activity whose ``detail.scheduledTiming`` is a Timing with the step's start date in
``repeat.boundsPeriod.start`` (daily for a drug; a stop is the end of the drug's bounds; a quit attempt
is a single occasion). The expected net benefit with its 90 % interval over the engine's draws, and the
comparators, are stated in ``note`` and in the plan's description; identifiers, tags and the profile are
those of the other fhirtwin CarePlans (``careplan``, ``identifiers``, ``riskassessment``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from fhirtwin.vocabulary import concept, meta
from fhirtwin.writeback.careplan import RXNORM, RXNORM_INGREDIENTS
from fhirtwin.writeback.contracts import SequencePlanLike, StepLike
from fhirtwin.writeback.identifiers import configuration_of, identifier, prediction_key
from fhirtwin.writeback.riskassessment import scope_extension

SCENARIO = "treatment-sequence"
_CODES = {"bp_lowering": "bp-lowering-agent", "sglt2i": "sglt2-inhibitor", "smoking_cessation": "smoking-cessation"}


def sequence_care_plan_key(plan: SequencePlanLike) -> str:
    """Business identifier value of the sequence CarePlan (the component configuration enters as it does for
    the forecasts, so a plan made under another configuration gets another key)."""
    return prediction_key(plan.patient_id, plan.model, plan.model_version, plan.sources, SCENARIO,
                          plan.horizon_years, "CarePlan/sequence",
                          configuration=configuration_of({"components_on": list(plan.components)}))


def _add_years(start: date, years: int) -> date:
    try:
        return start.replace(year=start.year + years)
    except ValueError:  # 29 February
        return start.replace(year=start.year + years, day=28)


def _per_1000(values: Mapping[str, float]) -> str:
    return (f"{1000 * values['expected']:.1f} per 1,000 (90 % interval over the draws {1000 * values['p05']:.1f} "
            f"to {1000 * values['p95']:.1f})")


def _code(step: StepLike) -> str:
    if step.kind == "statin":
        return "statin-high-intensity" if step.intensity == "high" else "statin-moderate-intensity"
    return _CODES[step.kind]


def _end_dates(plan: SequencePlanLike, start: date) -> dict[int, date]:
    """Index of each drug step -> the date its activity ends.

    Any later statin step (intensify, reduce, stop) ends the statin activity before it; a stop of an
    antihypertensive or the SGLT2 inhibitor ends the latest one still running.
    """
    ends: dict[int, date] = {}
    running: dict[str, list[int]] = {}
    for n, step in enumerate(plan.steps):
        if step.kind == "smoking_cessation":
            continue
        active = running.setdefault(step.kind, [])
        when = _add_years(start, step.year)
        if step.kind == "statin":
            ends.update({m: when for m in active})
            active.clear()
        elif step.verb == "stop" and active:
            ends[active.pop()] = when
        if step.verb != "stop":
            active.append(n)
    return ends


def _activity(step: StepLike, start: date, end: date | None) -> dict[str, Any]:
    begin = _add_years(start, step.year)
    bounds: dict[str, Any] = {"start": begin.isoformat()}
    if end is not None:
        bounds["end"] = end.isoformat()
    # a drug is taken daily; quit attempts are offered once a year within their bounds while still smoking
    unit = "a" if step.kind == "smoking_cessation" else "d"
    timing = {"repeat": {"boundsPeriod": bounds, "frequency": 1, "period": 1, "periodUnit": unit}}
    when = "from now" if step.year == 0 else f"from year {step.year}"
    if step.kind == "smoking_cessation":
        when += ", yearly while still smoking"
    description = f"{step.label} ({when}{', ' + step.condition if step.condition else ''})."
    detail: dict[str, Any] = {
        "kind": "ServiceRequest" if step.kind == "smoking_cessation" else "MedicationRequest",
        "code": concept(_code(step), text=step.label),
        "status": "not-started",
        "scheduledTiming": timing,
        "description": description,
    }
    if step.agent in RXNORM_INGREDIENTS:
        detail["productCodeableConcept"] = {
            "coding": [{"system": RXNORM, "code": RXNORM_INGREDIENTS[step.agent], "display": step.agent}],
            "text": f"{step.agent} {step.dose_mg:g} mg daily" if step.dose_mg else step.agent,
        }
    return {"detail": detail}


def build_sequence_care_plan(
    plan: SequencePlanLike,
    *,
    reference_date: date,
    occurrence: datetime,
    device_reference: str,
    ra_refs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The draft CarePlan proposal of the sequence (no id: the server assigns it).

    ``supportingInfo`` lists the RiskAssessments of the same run when given (``ra_refs``), else the versioned
    record entries the forecast used, as the standalone draft CarePlan does. Stops are not activities of
    their own: they end the started drug's ``boundsPeriod`` and are listed in a note.
    """
    ends = _end_dates(plan, reference_date)
    attempts = [s.year for s in plan.steps if s.kind == "smoking_cessation"]
    if attempts:  # one activity, yearly from the first attempt to the end of the last attempt's year
        ends[next(n for n, s in enumerate(plan.steps) if s.kind == "smoking_cessation")] = _add_years(
            reference_date, max(attempts) + 1)
    first_attempt = min(attempts, default=-1)
    activities = [_activity(step, reference_date, ends.get(n)) for n, step in enumerate(plan.steps)
                  if step.verb != "stop" and not (step.kind == "smoking_cessation" and step.year != first_attempt)]
    stops = [f"year {s.year}: {s.label}" for s in plan.steps if s.verb == "stop"]
    compared = "; ".join(f"{name} {_per_1000(values)}" for name, values in plan.comparators.items())
    notes = [
        {"text": "Proposal generated by fhirtwin for clinician review; nothing here is an order."},
        {"text": f"Expected net benefit over {plan.horizon_years} years (first major ASCVD, heart-failure or "
                 f"kidney-failure events prevented, minus weighted drug harms, treatment burden and monitoring, "
                 f"in events-prevented-equivalents, versus current care): {_per_1000(plan.net_benefit)}; "
                 f"weighted events prevented before harms and burden: {_per_1000(plan.events_prevented)}; "
                 f"{plan.draws} ensemble draws."},
    ]
    if compared:
        notes.append({"text": f"Same measure for the fixed alternatives: {compared}."})
    if stops:
        notes.append({"text": "Planned stops (the activity's period ends then): " + "; ".join(stops) + "."})
    notes += [{"text": text} for text in plan.notes]
    references = sorted(ra_refs.values()) if ra_refs else sorted(plan.sources)
    care_plan: dict[str, Any] = {
        "resourceType": "CarePlan",
        "meta": meta("fhirtwin-careplan"),
        "extension": [scope_extension(plan.scope)],
        "identifier": [identifier(sequence_care_plan_key(plan))],
        "status": "draft",
        "intent": "proposal",
        "category": [concept("twin-care-plan")],
        "title": "fhirtwin treatment sequence proposal",
        "description": (f"Yearly treatment sequence over {plan.horizon_years} years that maximises the expected "
                        f"net benefit in the patient's digital twin: {_per_1000(plan.net_benefit)} "
                        "events-prevented-equivalents versus current care."),
        "subject": {"reference": f"Patient/{plan.patient_id}"},
        "period": {"start": reference_date.isoformat(),
                   "end": _add_years(reference_date, plan.horizon_years).isoformat()},
        "created": occurrence.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "author": {"reference": device_reference},
        "note": notes,
    }
    if references:
        care_plan["supportingInfo"] = [{"reference": ref} for ref in references]
    if activities:
        care_plan["activity"] = activities
    return care_plan
