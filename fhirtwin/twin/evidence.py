"""Evidence: one traced value in the twin, with the resource version it came from.

Every number the simulator sees must be traceable to a resource version (for RiskAssessment.basis and
Provenance.entity), so Evidence carries its source, original value and unit, and status next to the
canonical value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any

Value = float | bool | str
TimePoint = datetime | date


class Scale(StrEnum):
    """Biological scale of a twin variable (molecular up to environmental)."""

    MOLECULAR = "molecular"
    CELLULAR = "cellular"
    TISSUE = "tissue"
    ORGAN = "organ"
    CLINICAL = "clinical"
    BEHAVIORAL = "behavioral"
    ENVIRONMENTAL = "environmental"


COMPARATORS = frozenset({"<", "<=", ">=", ">", "ad"})


def to_instant(t: TimePoint) -> datetime:
    """Map a date or aware datetime to a UTC datetime so that mixed series can be ordered.

    A date counts as the start of that day in UTC (FHIR dates carry no zone).
    """
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("naive datetime: Evidence times must be timezone-aware")
        return t.astimezone(UTC)
    return datetime.combine(t, time.min, tzinfo=UTC)


def upper_bound(as_of: TimePoint) -> datetime:
    """Exclusive upper bound for an 'as of' query: a date includes the whole of that day."""
    if isinstance(as_of, datetime):
        return to_instant(as_of) + timedelta(microseconds=1)
    return to_instant(as_of) + timedelta(days=1)


def time_to_json(t: TimePoint) -> str:
    """ISO 8601 text; dates stay dates so that the round trip keeps the precision."""
    return t.isoformat()


def time_from_json(text: str) -> TimePoint:
    """Inverse of :func:`time_to_json`."""
    if len(text) == 10:
        return date.fromisoformat(text)
    return datetime.fromisoformat(text)


@dataclass(frozen=True, order=True)
class SourceRef:
    """A versioned pointer to the FHIR resource a value came from."""

    resource_type: str
    id: str
    version_id: str | None = None
    last_updated: str | None = field(default=None, compare=False)

    @property
    def reference(self) -> str:
        """``Type/id/_history/v`` (or ``Type/id`` when the server gave no version)."""
        base = f"{self.resource_type}/{self.id}"
        return f"{base}/_history/{self.version_id}" if self.version_id else base

    @property
    def unversioned(self) -> str:
        """``Type/id``: used to match references between resources."""
        return f"{self.resource_type}/{self.id}"

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON serialisation."""
        out: dict[str, Any] = {"resourceType": self.resource_type, "id": self.id}
        if self.version_id is not None:
            out["versionId"] = self.version_id
        if self.last_updated is not None:
            out["lastUpdated"] = self.last_updated
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceRef:
        """Inverse of :meth:`to_json`."""
        return cls(data["resourceType"], data["id"], data.get("versionId"), data.get("lastUpdated"))

    @classmethod
    def of(cls, resource: dict[str, Any]) -> SourceRef:
        """SourceRef of an R4 JSON resource; raises ValueError if it has no type or id (untraceable)."""
        rtype = resource.get("resourceType")
        rid = resource.get("id")
        if not isinstance(rtype, str) or not rtype:
            raise ValueError("resource has no resourceType")
        if not isinstance(rid, str) or not rid:
            raise ValueError("resource has no id, so evidence from it could not be traced")
        meta = resource.get("meta") or {}
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        lu = meta.get("lastUpdated") if isinstance(meta, dict) else None
        return cls(rtype, rid, str(vid) if vid is not None else None, lu if isinstance(lu, str) else None)


@dataclass(frozen=True)
class Evidence:
    """One value of one twin variable at one time, from one resource version.

    ``value`` is in the variable's canonical ``unit`` (None for flags and codes). ``comparator`` marks a
    censored value (``>60`` is not 60). ``end`` is set only for interval evidence (an episode of a
    condition or a medication). ``derived_from`` lists further sources of a derived value (e.g. the HDL
    result behind a TC−HDL non-HDL value).
    """

    variable: str
    scale: Scale
    value: Value
    unit: str | None
    time: TimePoint
    source: SourceRef
    status: str
    original_value: Value | None = None
    original_unit: str | None = None
    comparator: str | None = None
    note: str | None = None
    code: str | None = None
    end: TimePoint | None = None
    derived_from: tuple[SourceRef, ...] = ()

    def __post_init__(self) -> None:
        if self.comparator is not None and self.comparator not in COMPARATORS:
            raise ValueError(f"unknown comparator {self.comparator!r}")
        if not isinstance(self.value, bool | int | float | str):
            raise TypeError(f"Evidence value must be float, bool or str, got {type(self.value).__name__}")
        to_instant(self.time)  # rejects naive datetimes early
        if self.end is not None:
            to_instant(self.end)

    @property
    def instant(self) -> datetime:
        """The time as a UTC datetime, for ordering."""
        return to_instant(self.time)

    @property
    def censored(self) -> bool:
        """True if the value is a bound (``<``, ``>``…) rather than a measurement."""
        return self.comparator is not None

    def sources(self) -> tuple[SourceRef, ...]:
        """The source and any further sources of a derived value."""
        return (self.source, *self.derived_from)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON serialisation."""
        out: dict[str, Any] = {
            "variable": self.variable,
            "scale": self.scale.value,
            "value": self.value,
            "unit": self.unit,
            "time": time_to_json(self.time),
            "source": self.source.to_json(),
            "status": self.status,
        }
        for key in ("original_value", "original_unit", "comparator", "note", "code"):
            val = getattr(self, key)
            if val is not None:
                out[key] = val
        if self.end is not None:
            out["end"] = time_to_json(self.end)
        if self.derived_from:
            out["derived_from"] = [s.to_json() for s in self.derived_from]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        """Inverse of :meth:`to_json`."""
        return cls(
            variable=data["variable"],
            scale=Scale(data["scale"]),
            value=data["value"],
            unit=data.get("unit"),
            time=time_from_json(data["time"]),
            source=SourceRef.from_json(data["source"]),
            status=data["status"],
            original_value=data.get("original_value"),
            original_unit=data.get("original_unit"),
            comparator=data.get("comparator"),
            note=data.get("note"),
            code=data.get("code"),
            end=time_from_json(data["end"]) if data.get("end") else None,
            derived_from=tuple(SourceRef.from_json(s) for s in data.get("derived_from", ())),
        )
