"""Person-period tables for the g-formula from TwinStates (the project's longitudinal data).

Why here: a population run (``fhirtwin.population``) stages whole patients to Parquet and the adapters turn
each patient's resources into a TwinState; the g-formula needs one row per person and period with the
covariates and treatment at the start of the period and whether the event happened in it. This module reads
only TwinStates, so it works on a staged population (read each patient's record, ``build_twin``, pass the
states here) and on any other source of twins, and it never touches FHIR.

Rules, so the table means what the g-formula assumes: period k covers [start + k*length, start +
(k+1)*length); covariates are the latest values at the period's start (none older than ``lookback_days``);
treatment is whether its episode is active then; a person with the event before the start is prevalent
and excluded; follow-up ends at the first event, at death, at the twin's reference date, or at the first
period whose covariates are missing (each exclusion and censoring is counted by reason, never silent).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd

from fhirtwin.twin import MissingEvidence, TwinState, get_variable, to_instant

#: A score computed from a twin at a moment (e.g. a 10-year risk), added as a column; None = not computable.
Score = Callable[[TwinState, datetime], float | None]


@dataclass(frozen=True)
class PeriodDesign:
    """What a person-period table holds and how time is cut."""

    start: date
    periods: int
    period_days: int = 365
    covariates: tuple[str, ...] = ("ldl_cholesterol_mg_dl",)
    treatment: str = "on_statin"
    events: tuple[str, ...] = ("prior_mi", "prior_stroke")
    lookback_days: int | None = 730
    scores: tuple[tuple[str, Score], ...] = ()

    def __post_init__(self) -> None:
        if self.periods < 1 or self.period_days < 1:
            raise ValueError("a person-period design needs at least one period of at least one day")
        for name in (*self.covariates, self.treatment, *self.events):
            get_variable(name)  # UnknownVariable names a typo at once
        if get_variable(self.treatment).kind != "flag":
            raise ValueError(f"treatment {self.treatment!r} must be a flag variable")


@dataclass(frozen=True, eq=False)
class PersonPeriods:
    """The table (columns id, period, age0, sex_male, covariates, scores, treatment, treated_before, event)
    and the people left out or censored early, counted by reason."""

    table: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)
    censored: dict[str, int] = field(default_factory=dict)


def _moment(day: date) -> datetime:
    return datetime.combine(day, time(0, 0), tzinfo=UTC)


def _flag(state: TwinState, variable: str, at: datetime) -> bool:
    ev = state.latest_or_none(variable, at)
    return ev is not None and ev.value is True


def _first_event(state: TwinState, events: Iterable[str]) -> datetime | None:
    onsets = [ev.instant for name in events for ev in state.history(name) if ev.value is True]
    return min(onsets) if onsets else None


def _covariate(state: TwinState, variable: str, at: datetime, lookback: timedelta | None) -> float | None:
    ev = state.latest_or_none(variable, at, lookback)
    if ev is None or ev.censored or isinstance(ev.value, bool) or not isinstance(ev.value, int | float):
        return None
    return float(ev.value)


def person_periods(states: Iterable[TwinState], design: PeriodDesign) -> PersonPeriods:
    """One row per person and period; see the module docstring for the rules."""
    rows: list[dict[str, float | int | str]] = []
    excluded: Counter[str] = Counter()
    censored: Counter[str] = Counter()
    lookback = timedelta(days=design.lookback_days) if design.lookback_days is not None else None
    length = timedelta(days=design.period_days)
    t0 = _moment(design.start)
    for state in states:
        sex = state.demographics.sex
        if sex not in ("female", "male"):
            excluded["sex not recorded as female or male"] += 1
            continue
        try:
            age0 = float(state.age_years(design.start))
        except (MissingEvidence, ValueError):
            excluded["no birth date before the start"] += 1
            continue
        event_at = _first_event(state, design.events)
        if event_at is not None and event_at < t0:
            excluded["event before the start (prevalent)"] += 1
            continue
        ends = [to_instant(t) for t in (state.reference_date, state.demographics.deceased_time) if t is not None]
        end = min(ends) if ends else t0 + design.periods * length
        person: list[dict[str, float | int | str]] = []
        reason = "end of the design"
        for k in range(design.periods):
            at = t0 + k * length
            if at >= end:
                reason = "end of the twin's data (reference date or death)"
                break
            values = {c: _covariate(state, c, at, lookback) for c in design.covariates}
            scores = {name: score(state, at) for name, score in design.scores}
            measured = {name: v for name, v in {**values, **scores}.items() if v is not None}
            if len(measured) < len(values) + len(scores):
                missing = sorted((set(values) | set(scores)) - set(measured))
                reason = f"{', '.join(missing)} missing at a period start"
                break
            event = event_at is not None and at <= event_at < at + length
            person.append({"id": state.patient_id, "period": k, "age0": age0, "sex_male": float(sex == "male"),
                           **measured,
                           design.treatment: float(_flag(state, design.treatment, at)),
                           "treated_before": float(_flag(state, design.treatment, at - timedelta(days=1))),
                           "event": float(event)})
            if event:
                reason = "event"
                break
        if not person:
            excluded[reason] += 1
            continue
        censored[reason] += 1
        rows.extend(person)
    columns = ["id", "period", "age0", "sex_male", *design.covariates, *(n for n, _ in design.scores),
               design.treatment, "treated_before", "event"]
    return PersonPeriods(pd.DataFrame(rows, columns=columns), dict(excluded), dict(censored))


def prevent_ascvd_score(state: TwinState, at: datetime) -> float | None:
    """PREVENT 10-year ASCVD risk of the twin at ``at`` (None when the engine lacks an input or is out of range),
    for strategies such as 'start a statin when the 10-year risk exceeds 7.5%'."""
    from fhirtwin.sim.equations import EquationInputError, prevent_risk
    from fhirtwin.sim.hazards import prevent_kwargs, prevent_model_for
    from fhirtwin.sim.inputs import InsufficientData, inputs_from_state

    try:
        inputs = inputs_from_state(state, at)
        model = prevent_model_for(inputs)
        return float(prevent_risk(outcome="ascvd", horizon_years=10, age_years=inputs.age_years,
                                  **prevent_kwargs(inputs, model)))
    except (InsufficientData, EquationInputError, ValueError):
        return None
