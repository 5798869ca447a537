"""The data-quality ledger: what was rejected or corrected while building a twin, and why.

Bad data is never silently used and never silently dropped: every input resource either feeds
Evidence or has at least one ledger entry (often both, e.g. a converted unit).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class LedgerKind(StrEnum):
    """Why a ledger entry exists. Rejections and corrections share one list so nothing is lost."""

    MISSING_UNIT = "missing_unit"
    UNKNOWN_UNIT = "unknown_unit"
    IMPLAUSIBLE = "implausible"
    ENTERED_IN_ERROR = "entered_in_error"
    NOT_FINAL = "not_final"
    DUPLICATE = "duplicate"
    REFUTED = "refuted"
    CONVERTED = "converted"
    DERIVED = "derived"
    MALFORMED = "malformed"
    NO_VALUE = "no_value"
    UNMAPPED = "unmapped"
    EXCLUDED = "excluded"
    UNSUPPORTED = "unsupported"
    WRONG_SUBJECT = "wrong_subject"
    MISSING_TIME = "missing_time"
    UNKNOWN_DOSE = "unknown_dose"


#: Kinds that mean "this input (or part of it) was not used".
REJECTIONS = frozenset(
    {
        LedgerKind.MISSING_UNIT,
        LedgerKind.UNKNOWN_UNIT,
        LedgerKind.IMPLAUSIBLE,
        LedgerKind.ENTERED_IN_ERROR,
        LedgerKind.NOT_FINAL,
        LedgerKind.DUPLICATE,
        LedgerKind.REFUTED,
        LedgerKind.MALFORMED,
        LedgerKind.NO_VALUE,
        LedgerKind.UNMAPPED,
        LedgerKind.EXCLUDED,
        LedgerKind.UNSUPPORTED,
        LedgerKind.WRONG_SUBJECT,
        LedgerKind.MISSING_TIME,
    }
)


@dataclass(frozen=True)
class LedgerEntry:
    """One finding about one input resource.

    ``source`` is the resource reference (``Type/id/_history/v``, or ``Type/?`` + position when the
    resource had no id). ``variable`` names the twin variable concerned, if any. Messages hold codes
    and reasons only, never patient values tied to identity.
    """

    source: str
    kind: LedgerKind
    message: str
    variable: str | None = None

    @property
    def rejected(self) -> bool:
        """True if this entry records that something was not used."""
        return self.kind in REJECTIONS

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON serialisation."""
        out: dict[str, Any] = {"source": self.source, "kind": self.kind.value, "message": self.message}
        if self.variable is not None:
            out["variable"] = self.variable
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerEntry:
        """Inverse of :meth:`to_json`."""
        return cls(data["source"], LedgerKind(data["kind"]), data["message"], data.get("variable"))


class Ledger:
    """An append-only list of :class:`LedgerEntry` with small query helpers."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: list[LedgerEntry] = list(entries)

    def add(self, source: str, kind: LedgerKind | str, message: str, variable: str | None = None) -> LedgerEntry:
        """Record a finding and return it."""
        entry = LedgerEntry(source, LedgerKind(kind), message, variable)
        self._entries.append(entry)
        return entry

    def extend(self, entries: Iterable[LedgerEntry]) -> None:
        """Append several entries."""
        self._entries.extend(entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ledger) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"Ledger({len(self._entries)} entries: {dict(self.counts())})"

    def entries(self, kind: LedgerKind | str | None = None, source: str | None = None) -> list[LedgerEntry]:
        """Entries filtered by kind and/or by source (a full reference or its ``Type/id`` prefix)."""
        out = self._entries
        if kind is not None:
            k = LedgerKind(kind)
            out = [e for e in out if e.kind is k]
        if source is not None:
            out = [e for e in out if e.source == source or e.source.startswith(source + "/_history/")]
        return list(out)

    def kinds_for(self, source: str) -> set[LedgerKind]:
        """All kinds recorded for one resource (``Type/id`` or the versioned reference)."""
        return {e.kind for e in self.entries(source=source)}

    def sources(self) -> set[str]:
        """Every resource reference that has at least one entry."""
        return {e.source for e in self._entries}

    def counts(self) -> Counter[str]:
        """Entries per kind: safe to log (codes and counts only)."""
        return Counter(e.kind.value for e in self._entries)

    def to_json(self) -> list[dict[str, Any]]:
        """Plain list for JSON serialisation."""
        return [e.to_json() for e in self._entries]

    @classmethod
    def from_json(cls, data: Iterable[dict[str, Any]]) -> Ledger:
        """Inverse of :meth:`to_json`."""
        return cls(LedgerEntry.from_json(d) for d in data)
