"""TwinState: per-variable time series of Evidence for one patient, plus demographics and the ledger.

This is the contract between reading (adapters) and simulating (sim): models ask for
``latest``/``value`` and never see FHIR; adapters only add Evidence and ledger entries.
"""

from __future__ import annotations

import json
from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from fhirtwin.twin.evidence import (
    Evidence,
    Scale,
    SourceRef,
    TimePoint,
    Value,
    time_from_json,
    time_to_json,
    to_instant,
    upper_bound,
)
from fhirtwin.twin.ledger import Ledger
from fhirtwin.twin.variables import Variable, get_variable

if TYPE_CHECKING:
    import pandas as pd

FRAME_COLUMNS = (
    "patient",
    "scale",
    "variable",
    "time",
    "value",
    "unit",
    "original_value",
    "original_unit",
    "source",
    "status",
    "comparator",
    "note",
    "end",
)


class MissingEvidence(LookupError):
    """No usable evidence for a variable at the requested time: raised instead of returning None."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


@dataclass(frozen=True)
class Demographics:
    """Administrative facts about the patient.

    The birth date is kept only to compute age at a reference date; it is excluded from ``repr`` so it
    never reaches a log line by accident.
    """

    sex: str | None = None
    birth_date: date | None = field(default=None, repr=False)
    race: str | None = None
    deceased: bool | None = None
    deceased_time: TimePoint | None = field(default=None, repr=False)
    source: SourceRef | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON serialisation."""
        return {
            "sex": self.sex,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "race": self.race,
            "deceased": self.deceased,
            "deceased_time": time_to_json(self.deceased_time) if self.deceased_time else None,
            "source": self.source.to_json() if self.source else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Demographics:
        """Inverse of :meth:`to_json`."""
        return cls(
            sex=data.get("sex"),
            birth_date=date.fromisoformat(data["birth_date"]) if data.get("birth_date") else None,
            race=data.get("race"),
            deceased=data.get("deceased"),
            deceased_time=time_from_json(data["deceased_time"]) if data.get("deceased_time") else None,
            source=SourceRef.from_json(data["source"]) if data.get("source") else None,
        )


def _sort_key(ev: Evidence) -> datetime:
    return ev.instant


class TwinState:
    """The twin of one patient: Evidence series by variable, demographics and a data-quality ledger.

    Point variables (labs, vitals, genomics) answer ``latest`` with the most recent value at or before
    ``as_of``. Episode variables (registry ``temporal`` = current/history: conditions, medications) hold
    interval Evidence (``time`` … ``end``); ``latest`` answers with the active episode, or with a
    derived "not active" Evidence when every episode has ended.
    """

    def __init__(
        self,
        patient_id: str,
        reference_date: TimePoint | None = None,
        demographics: Demographics | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.patient_id = patient_id
        self.reference_date = reference_date
        self.demographics = demographics or Demographics()
        self.ledger = ledger if ledger is not None else Ledger()
        self._series: dict[str, list[Evidence]] = {}

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._series.values())
        return f"TwinState({len(self._series)} variables, {n} evidence, {len(self.ledger)} ledger entries)"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TwinState)
            and self.patient_id == other.patient_id
            and self.reference_date == other.reference_date
            and self.demographics == other.demographics
            and self.ledger == other.ledger
            and self._series == other._series
        )

    # -- building --------------------------------------------------------------------------------

    def add(self, evidence: Evidence) -> None:
        """Add one Evidence; the variable must be registered and the scale must match the registry."""
        var = get_variable(evidence.variable)
        if evidence.scale is not var.scale:
            raise ValueError(f"{evidence.variable}: scale {evidence.scale} differs from registry {var.scale}")
        insort(self._series.setdefault(evidence.variable, []), evidence, key=_sort_key)

    def extend(self, evidence: Iterable[Evidence]) -> None:
        """Add several Evidence."""
        for ev in evidence:
            self.add(ev)

    def remove(self, evidence: Evidence) -> None:
        """Remove one Evidence (used when collapsing duplicates)."""
        self._series[evidence.variable].remove(evidence)
        if not self._series[evidence.variable]:
            del self._series[evidence.variable]

    # -- queries ---------------------------------------------------------------------------------

    def variables(self) -> list[str]:
        """Names of variables with at least one Evidence."""
        return sorted(self._series)

    def history(self, variable: str) -> list[Evidence]:
        """All Evidence of a variable in time order (empty list if none; the name must be registered)."""
        get_variable(variable)
        return list(self._series.get(variable, ()))

    def all_evidence(self) -> list[Evidence]:
        """Every Evidence of every variable."""
        return [ev for name in sorted(self._series) for ev in self._series[name]]

    def _resolve_as_of(self, as_of: TimePoint | None) -> datetime | None:
        if as_of is None:
            as_of = self.reference_date
        return upper_bound(as_of) if as_of is not None else None

    def latest(self, variable: str, as_of: TimePoint | None = None, lookback: timedelta | None = None) -> Evidence:
        """Most recent usable Evidence at or before ``as_of`` (default: the twin's reference date).

        ``lookback`` limits how old a point value may be. For episode variables it applies only to
        ended episodes (an active chronic condition is current however old its onset).
        Raises :class:`MissingEvidence` if there is none.
        """
        found = self.latest_or_none(variable, as_of, lookback)
        if found is None:
            when = "" if as_of is None and self.reference_date is None else " as of the requested date"
            within = f" within {lookback.days} days" if lookback is not None else ""
            raise MissingEvidence(variable, f"no usable evidence for {variable!r}{when}{within}")
        return found

    def latest_or_none(
        self, variable: str, as_of: TimePoint | None = None, lookback: timedelta | None = None
    ) -> Evidence | None:
        """As :meth:`latest`, but None when there is no evidence — for callers that impute explicitly."""
        var = get_variable(variable)
        bound = self._resolve_as_of(as_of)
        series = [ev for ev in self._series.get(variable, ()) if bound is None or ev.instant < bound]
        if not series:
            return None
        if var.temporal is not None:
            return self._episode_state(var, series, bound, lookback)
        latest = series[-1]
        if lookback is not None and bound is not None and latest.instant < bound - lookback:
            return None
        return latest

    def _episode_state(
        self, var: Variable, started: list[Evidence], bound: datetime | None, lookback: timedelta | None
    ) -> Evidence | None:
        if var.temporal == "history":
            return started[-1]

        def active(ev: Evidence) -> bool:
            if ev.end is None:
                return True
            return bound is not None and to_instant(ev.end) >= bound and to_instant(ev.end) > ev.instant

        live = [ev for ev in started if active(ev)]
        if live:
            if var.levels:
                rank = {lvl: i for i, lvl in enumerate(var.levels)}
                return max(live, key=lambda ev: (rank.get(str(ev.value), -1), ev.instant))
            return live[-1]
        last = max(started, key=lambda ev: to_instant(ev.end or ev.time))
        ended_at = last.end or last.time
        if lookback is not None and bound is not None and to_instant(ended_at) < bound - lookback:
            return None
        off: Value = False if var.kind == "flag" else "none"
        return replace(last, value=off, time=ended_at, end=None, note="no active episode (derived from the last one)")

    def value(self, variable: str, as_of: TimePoint | None = None, lookback: timedelta | None = None) -> Value:
        """The value of :meth:`latest` (raises :class:`MissingEvidence`)."""
        return self.latest(variable, as_of, lookback).value

    def age_years(self, as_of: TimePoint | None = None) -> int:
        """Completed years of age at ``as_of`` (default: the reference date)."""
        birth = self.demographics.birth_date
        if birth is None:
            raise MissingEvidence("age", "no birth date in the twin")
        when = as_of if as_of is not None else self.reference_date
        if when is None:
            raise ValueError("age_years needs as_of when the twin has no reference date")
        day = when.date() if isinstance(when, datetime) else when
        years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
        if years < 0:
            raise ValueError("as_of is before the birth date")
        return years

    def sources(self) -> set[SourceRef]:
        """Every resource version any Evidence (or the demographics) came from."""
        out: set[SourceRef] = {s for ev in self.all_evidence() for s in ev.sources()}
        if self.demographics.source is not None:
            out.add(self.demographics.source)
        return out

    def by_scale(self) -> dict[Scale, dict[str, list[Evidence]]]:
        """Series grouped by scale (every scale present as a key, possibly empty)."""
        out: dict[Scale, dict[str, list[Evidence]]] = {s: {} for s in Scale}
        for name, series in sorted(self._series.items()):
            out[get_variable(name).scale][name] = list(series)
        return out

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "patient_id": self.patient_id,
            "reference_date": time_to_json(self.reference_date) if self.reference_date is not None else None,
            "demographics": self.demographics.to_json(),
            "evidence": [ev.to_json() for ev in self.all_evidence()],
            "ledger": self.ledger.to_json(),
        }

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; :meth:`from_json` restores an equal TwinState."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinState:
        """Inverse of :meth:`to_dict`."""
        ref = data.get("reference_date")
        state = cls(
            data["patient_id"],
            time_from_json(ref) if ref else None,
            Demographics.from_json(data.get("demographics") or {}),
            Ledger.from_json(data.get("ledger", ())),
        )
        state.extend(Evidence.from_json(e) for e in data.get("evidence", ()))
        return state

    @classmethod
    def from_json(cls, text: str) -> TwinState:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def to_frame(self) -> pd.DataFrame:
        """Long-format DataFrame, one row per Evidence (columns in ``FRAME_COLUMNS``; time in UTC)."""
        import pandas as pd

        rows = [
            {
                "patient": self.patient_id,
                "scale": ev.scale.value,
                "variable": ev.variable,
                "time": pd.Timestamp(ev.instant),
                "value": ev.value,
                "unit": ev.unit,
                "original_value": ev.original_value,
                "original_unit": ev.original_unit,
                "source": ev.source.reference,
                "status": ev.status,
                "comparator": ev.comparator,
                "note": ev.note,
                "end": pd.Timestamp(to_instant(ev.end)) if ev.end is not None else pd.NaT,
            }
            for ev in self.all_evidence()
        ]
        frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
        frame["time"] = pd.to_datetime(frame["time"], utc=True)
        frame["end"] = pd.to_datetime(frame["end"], utc=True)
        return frame
