"""Condition adapter: SNOMED CT / ICD-10-CM -> condition flags as episodes (onset ... abatement).

clinicalStatus and verificationStatus are modifiers (fhirtwin FHIR reference §2.2): refuted and
entered-in-error are dropped and recorded; suspected diagnoses are not counted unless configured;
active/recurrence/relapse are current; inactive/remission/resolved are kept as history with an end.
Whether an ended episode still counts is the variable's ``temporal`` rule (e.g. prior_mi is "history").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirtwin.adapters._common import (
    ICD10,
    ICD10CM,
    SNOMED,
    AdapterError,
    Context,
    add_note,
    code_label,
    codings,
    first_time,
    norm_system,
    read_csv,
    system_uri,
)
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable, to_instant

CURRENT = {"active", "recurrence", "relapse"}
ENDED = {"inactive", "remission", "resolved"}
SUSPECTED = {"unconfirmed", "provisional", "differential"}


@dataclass(frozen=True)
class CondRow:
    """One row of ``condition_codes.csv``."""

    system: str
    code: str
    prefix: bool
    variable: str
    value: str


@cache
def _rows() -> list[CondRow]:
    rows = []
    for r in read_csv("condition_codes.csv"):
        get_variable(r["variable"])
        code = r["code"].replace(".", "").upper() if r["match"] == "prefix" else r["code"]
        rows.append(CondRow(system_uri(r["system"]), code, r["match"] == "prefix", r["variable"], r["value"]))
    return rows


def map_codes(concept: Any) -> dict[str, tuple[str, str]]:
    """variable -> (value, matched system|code) for every coding; ICD by longest prefix per variable."""
    found: dict[str, tuple[int, str, str]] = {}
    icd_systems = {norm_system(ICD10CM), norm_system(ICD10)}
    for system, code, _ in codings(concept):
        is_icd = system in icd_systems
        key = code.replace(".", "").upper() if is_icd else code
        for row in _rows():
            if row.prefix:
                if not is_icd or not key.startswith(row.code):
                    continue
                rank = len(row.code)
            else:
                if system != row.system or key != row.code or system != norm_system(SNOMED):
                    continue
                rank = 1000  # an exact SNOMED match is as specific as it gets
            if row.variable not in found or rank > found[row.variable][0]:
                found[row.variable] = (rank, row.value, f"{system}|{code}")
    return {var: (val, code) for var, (_, val, code) in found.items()}


def _status(concept: Any, system: str) -> str | None:
    uri = system_uri(f"http://terminology.hl7.org/CodeSystem/{system}")
    for s, c, _ in codings(concept):
        if s == uri or not s:
            return c
    return None


def adapt_condition(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Episode Evidence for every flag the Condition's codes map to."""
    verification = _status(resource.get("verificationStatus"), "condition-ver-status")
    clinical = _status(resource.get("clinicalStatus"), "condition-clinical")
    if verification == "entered-in-error":
        ctx.record(src, LedgerKind.ENTERED_IN_ERROR, "verificationStatus entered-in-error: ignored")
        return []
    if verification == "refuted":
        ctx.record(src, LedgerKind.REFUTED, "verificationStatus refuted: ignored")
        return []
    if verification in SUSPECTED and not ctx.options.count_suspected_conditions:
        ctx.record(src, LedgerKind.EXCLUDED, f"verificationStatus {verification}: suspected, not counted")
        return []
    if not isinstance(resource.get("code"), dict):
        raise AdapterError("Condition has no code")
    mapped = map_codes(resource["code"])
    if not mapped:
        ctx.record(src, LedgerKind.UNMAPPED, f"no twin flag for code {code_label(resource['code'])}")
        return []
    onset = first_time(resource, (("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",)))
    if onset is None:
        ctx.record(src, LedgerKind.MISSING_TIME, "no onsetDateTime/onsetPeriod/recordedDate")
        return []
    abatement = first_time(resource, (("abatementDateTime",), ("abatementPeriod", "end"), ("abatementPeriod", "start")))
    end: TimePoint | None = None
    note = onset.note
    if clinical in ENDED or (clinical is None and (abatement or resource.get("abatementBoolean") is True)):
        if abatement is not None:
            end = abatement.value
        else:
            recorded = first_time(resource, (("recordedDate",),))
            end = recorded.value if recorded and to_instant(recorded.value) > to_instant(onset.value) else onset.value
            note = add_note(note, f"{clinical or 'abated'} without abatement date: ended at recording")
    elif clinical is not None and clinical not in CURRENT:
        ctx.record(src, LedgerKind.MALFORMED, "clinicalStatus is not a condition-clinical code")
        return []
    elif clinical is None:
        note = add_note(note, "no clinicalStatus: read as active")
    status = f"{clinical or 'unknown'}/{verification or 'confirmed'}"
    out = []
    for variable, (value, code) in sorted(mapped.items()):
        var = get_variable(variable)
        out.append(
            Evidence(
                variable=variable,
                scale=var.scale,
                value=value if value else True,
                unit=None,
                time=onset.value,
                source=src,
                status=status,
                original_value=code,
                note=note,
                code=code,
                end=end,
            )
        )
    return out
