"""Shared helpers for adapters: coding matching, FHIR time parsing, status gates, data-file loading.

Adapters read plain R4 JSON dicts; nothing here imports the transport layer or the simulator.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from importlib import resources
from typing import Any

from fhirtwin.twin import Evidence, Ledger, LedgerKind, SourceRef, TimePoint
from fhirtwin.vocabulary import CODESYSTEM

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
FHIRTWIN = CODESYSTEM  # matched loosely (scheme, case) like every system
GENOMICS_TBD = "http://hl7.org/fhir/uv/genomics-reporting/codesystem/tbd-codes-cs"

#: Short names used in the data files.
SYSTEM_ALIASES = {
    "loinc": LOINC,
    "snomed": SNOMED,
    "icd10cm": ICD10CM,
    "icd10": ICD10,
    "rxnorm": RXNORM,
    "fhirtwin": FHIRTWIN,
    "genomics_tbd": GENOMICS_TBD,
}


class AdapterError(ValueError):
    """A resource cannot be read; the dispatcher records the message as a ``malformed`` ledger entry."""


def norm_system(system: str | None) -> str:
    """Compare code systems loosely on scheme, case and trailing slash (feeds vary on all three)."""
    if not system:
        return ""
    s = system.strip().lower().rstrip("/")
    if s.startswith("https://"):
        s = "http://" + s[len("https://") :]
    return s


def system_uri(short_or_uri: str) -> str:
    """Resolve a data-file system name (``loinc``) or URI to its normalised URI."""
    return norm_system(SYSTEM_ALIASES.get(short_or_uri, short_or_uri))


def codings(concept: Any) -> list[tuple[str, str, str]]:
    """(normalised system, code, display) of every coding of a CodeableConcept (tolerates junk)."""
    if not isinstance(concept, dict):
        return []
    out = []
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and c.get("code") is not None:
            out.append((norm_system(c.get("system")), str(c["code"]).strip(), str(c.get("display") or "")))
    return out


def concept_text(concept: Any) -> str:
    """Text and displays of a CodeableConcept joined, for text fallbacks."""
    if not isinstance(concept, dict):
        return ""
    parts = [str(concept.get("text") or "")] + [d for _, _, d in codings(concept)]
    return " ".join(p for p in parts if p)


def code_label(concept: Any) -> str:
    """Compact ``code|code`` listing of a concept's codes for ledger messages (codes only, no text)."""
    cs = codings(concept)
    return ",".join(c for _, c, _ in cs) if cs else "(no coding)"


_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


@dataclass(frozen=True)
class ParsedTime:
    """A FHIR date/dateTime/instant as Evidence time, with a note when precision was filled in."""

    value: TimePoint
    note: str | None = None


def parse_time(text: Any) -> ParsedTime:
    """Parse FHIR date, partial date, dateTime or instant.

    Partial dates keep the earliest day (noted); a dateTime without zone (invalid FHIR) is read as UTC
    and noted rather than rejected. Raises AdapterError on anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise AdapterError("missing or non-string date")
    s = text.strip()
    m = _DATE_RE.match(s)
    if m:
        y, mo, d = m.group(1), m.group(2), m.group(3)
        try:
            value = date(int(y), int(mo or 1), int(d or 1))
        except ValueError as exc:
            raise AdapterError("invalid calendar date") from exc
        return ParsedTime(value, None if d else "partial date: earliest day assumed")
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise AdapterError("unparseable dateTime") from exc
    if dt.tzinfo is None:
        return ParsedTime(dt.replace(tzinfo=UTC), "dateTime without zone: UTC assumed")
    return ParsedTime(dt)


def first_time(resource: dict[str, Any], paths: Iterable[tuple[str, ...]]) -> ParsedTime | None:
    """The first present time along the given element paths (e.g. ``("effectivePeriod", "end")``)."""
    for path in paths:
        node: Any = resource
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return parse_time(node)
    return None


OBSERVATION_TIME_PATHS = (
    ("effectiveDateTime",),
    ("effectivePeriod", "end"),
    ("effectivePeriod", "start"),
    ("effectiveInstant",),
    ("issued",),
)


@dataclass(frozen=True)
class BuildOptions:
    """Choices the reference leaves configurable (defaults are the conservative reading)."""

    accept_preliminary: bool = False
    count_suspected_conditions: bool = False
    on_hold_is_current: bool = True


@dataclass
class Context:
    """What an adapter needs besides the resource: options, the ledger and cross-resource indexes."""

    patient_id: str
    reference_date: TimePoint | None
    options: BuildOptions
    ledger: Ledger
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    pending: dict[str, list[Any]] = field(default_factory=dict)

    def record(self, ref: SourceRef | str, kind: LedgerKind, message: str, variable: str | None = None) -> None:
        """Add a ledger entry for a resource."""
        self.ledger.add(ref.reference if isinstance(ref, SourceRef) else ref, kind, message, variable)


OBS_USABLE = frozenset({"final", "amended", "corrected"})


def observation_status_gate(resource: dict[str, Any], src: SourceRef, ctx: Context) -> str | None:
    """Return the status if the Observation may be used, else record why not and return None."""
    status = resource.get("status")
    if status in OBS_USABLE:
        return str(status)
    if status == "entered-in-error":
        ctx.record(src, LedgerKind.ENTERED_IN_ERROR, "status entered-in-error: excluded")
        return None
    if status == "preliminary":
        if ctx.options.accept_preliminary:
            ctx.record(src, LedgerKind.NOT_FINAL, "status preliminary: used because accept_preliminary is set")
            return "preliminary"
        ctx.record(src, LedgerKind.NOT_FINAL, "status preliminary: excluded (accept_preliminary is off)")
        return None
    ctx.record(src, LedgerKind.NOT_FINAL, f"status {status!s}: not a usable result")
    return None


def reference_target(ref: Any) -> str | None:
    """``Type/id`` of a Reference (drops base URL and ``_history``); None for contained/urn references."""
    if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
        return None
    parts = ref["reference"].split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or parts[0].startswith(("urn:", "#")):
        return None
    return f"{parts[-2]}/{parts[-1]}"


def first_number(values: Iterable[Any]) -> float | None:
    """First value that is a real number (bools excluded)."""
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


@cache
def data_text(name: str) -> str:
    """A data file shipped beside the adapters."""
    return resources.files("fhirtwin.adapters").joinpath("data", name).read_text(encoding="utf-8")


def read_csv(name: str) -> list[dict[str, str]]:
    """Rows of a data CSV; lines starting with ``#`` are comments (sources are cited there)."""
    lines = [ln for ln in data_text(name).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(lines)]


def read_json(name: str) -> Any:
    """A data JSON file."""
    return json.loads(data_text(name))


def iter_components(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Components of an Observation that are dicts."""
    for comp in resource.get("component") or []:
        if isinstance(comp, dict):
            yield comp


def add_note(*parts: str | None) -> str | None:
    """Join non-empty notes with '; '."""
    text = "; ".join(p for p in parts if p)
    return text or None


def evidence_sources(evidence: Iterable[Evidence]) -> set[str]:
    """Unversioned references of every source of some evidence."""
    return {s.unversioned for ev in evidence for s in ev.sources()}
