"""Observation adapter: LOINC-coded labs and vitals -> Evidence in canonical units.

Rules (fhirtwin FHIR reference §0.3, §1): match any coding by (system, code); only final/amended/corrected
results (preliminary configurable); dataAbsentReason means no value; comparators are kept as censoring;
units are normalised through UCUM or the alias table and never guessed; BP panels are read by component.
Genomic observations are routed to :mod:`fhirtwin.adapters.genomics` by the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirtwin.adapters import behavioral
from fhirtwin.adapters._common import (
    OBSERVATION_TIME_PATHS,
    AdapterError,
    Context,
    add_note,
    code_label,
    codings,
    first_time,
    iter_components,
    observation_status_gate,
    read_csv,
    system_uri,
)
from fhirtwin.adapters._quantity import quantity_evidence
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable, to_instant


@dataclass(frozen=True)
class CodeRow:
    """One row of ``observation_codes.csv``."""

    system: str
    code: str
    variable: str
    handler: str
    note: str


@cache
def code_table() -> dict[tuple[str, str], CodeRow]:
    """(normalised system, code) -> mapping row."""
    out = {}
    for r in read_csv("observation_codes.csv"):
        row = CodeRow(system_uri(r["system"]), r["code"], r["variable"], r["handler"], r["note"])
        if row.variable:
            get_variable(row.variable)  # fail fast on a typo in the data file
        out[(row.system, row.code)] = row
    return out


def lookup(concept: Any) -> CodeRow | None:
    """First mapping row matching any coding of the concept."""
    table = code_table()
    for system, code, _ in codings(concept):
        row = table.get((system, code))
        if row is not None:
            return row
    return None


def observation_time(resource: dict[str, Any]) -> tuple[TimePoint, str | None] | None:
    """Effective time by the reference's precedence: effectiveDateTime, period end/start, instant, issued."""
    parsed = first_time(resource, OBSERVATION_TIME_PATHS)
    return (parsed.value, parsed.note) if parsed else None


def adapt_observation(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Evidence from one non-genomic Observation (ledger entries for everything not used)."""
    status = observation_status_gate(resource, src, ctx)
    if status is None:
        return []
    if not isinstance(resource.get("code"), dict):
        raise AdapterError("Observation has no code")
    row = lookup(resource["code"])
    if row is None:
        ctx.record(src, LedgerKind.UNMAPPED, f"no twin variable for code {code_label(resource['code'])}")
        return []
    code = f"{row.system}|{row.code}"
    if row.handler == "exclude":
        ctx.record(src, LedgerKind.EXCLUDED, f"{row.code}: {row.note}")
        return []
    timed = observation_time(resource)
    if timed is None:
        ctx.record(src, LedgerKind.MISSING_TIME, f"{row.code}: no effective time or issued", row.variable or None)
        return []
    when, time_note = timed
    if row.handler == "quantity":
        variable = row.variable
        if variable == "egfr_ml_min_1_73m2" and not _per_body_surface(resource):
            variable = "egfr_ml_min"  # mL/min: normalised with height and weight later, never taken as-is
        ev = quantity_evidence(resource, variable, src, status, when, ctx, code, time_note)
        return [ev] if ev else []
    if row.handler == "bp_panel":
        return _bp_panel(resource, src, status, when, time_note, ctx)
    if row.handler == "smoking":
        return behavioral.smoking(resource, src, status, when, time_note, ctx, code)
    if row.handler == "pregnancy_status":
        return _pregnancy_status(resource, src, status, when, time_note, ctx, code)
    if row.handler in ("evs_panel", "evs_days", "evs_minutes"):
        return behavioral.exercise_vital_sign(resource, row.handler, src, status, when, time_note, ctx, code)
    raise AdapterError(f"unknown handler {row.handler} in observation_codes.csv")


def _bp_panel(
    resource: dict[str, Any], src: SourceRef, status: str, when: TimePoint, note: str | None, ctx: Context
) -> list[Evidence]:
    out: list[Evidence] = []
    seen = False
    for comp in iter_components(resource):
        row = lookup(comp.get("code"))
        if row is None or row.handler != "quantity" or row.variable not in ("systolic_bp_mm_hg", "diastolic_bp_mm_hg"):
            continue
        seen = True
        ev = quantity_evidence(comp, row.variable, src, status, when, ctx, f"{row.system}|{row.code}", note)
        if ev is not None:
            out.append(ev)
    if not seen:
        ctx.record(src, LedgerKind.NO_VALUE, "BP panel without systolic/diastolic components")
    return out


def _per_body_surface(resource: dict[str, Any]) -> bool:
    """Whether a GFR result's unit is normalised to 1.73 m2 (``mL/min/{1.73_m2}`` and its spellings).

    The annotation-stripping unit comparison cannot tell ``mL/min/{1.73_m2}`` from ``mL/min``; the
    numbers differ by the patient's body surface area, so an unnormalised result must not pass as eGFR.
    A quantity without any unit is left to the unit rules (rejected as missing).
    """
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict):
        return True
    texts = [str(quantity.get(k) or "") for k in ("code", "unit")]
    if not any(texts):
        return True
    return any("1.73" in t for t in texts)


#: SNOMED CT 77386006 Pregnant (finding): the US Core pregnancy status answer that means pregnant.
PREGNANT = "77386006"
#: A positive status counts for at most one pregnancy (301 days, as an open pregnancy condition does).
PREGNANCY_DAYS = 301


def _pregnancy_status(resource: dict[str, Any], src: SourceRef, status: str, when: TimePoint, note: str | None,
                      ctx: Context, code: str) -> list[Evidence]:
    """US Core pregnancy status (LOINC 82810-3): "Pregnant" starts a pregnancy episode; other answers
    (not pregnant, unknown) are recorded and say nothing here (absence of pregnancy is the default)."""
    from datetime import timedelta

    answers = [c for _, c, _ in codings(resource.get("valueCodeableConcept"))]
    if PREGNANT not in answers:
        ctx.record(src, LedgerKind.EXCLUDED, f"{code}: answer {','.join(answers) or '(none)'} is not 'Pregnant'",
                   "pregnancy")
        return []
    var = get_variable("pregnancy")
    end = to_instant(when) + timedelta(days=PREGNANCY_DAYS)
    return [Evidence("pregnancy", var.scale, True, None, when, src, status, code=code, end=end,
                     note=add_note(note, f"pregnancy status 'Pregnant': current for at most {PREGNANCY_DAYS} days"))]
