"""Behavioural evidence: smoking status (LOINC 72166-2) and physical activity (Exercise Vital Sign).

Kept apart from labs because the values are coded answers or survey items rather than measurements, and
their scale is behavioural.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache
from typing import Any

from fhirtwin.adapters._common import (
    SNOMED,
    Context,
    add_note,
    code_label,
    codings,
    iter_components,
    norm_system,
    read_csv,
    system_uri,
)
from fhirtwin.adapters._quantity import quantity_evidence
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable, to_instant

EVS_DAYS = "89555-7"
EVS_MINUTES = "68516-4"
PENDING_KEY = "evs_parts"


@cache
def _smoking_table() -> dict[str, dict[str, str]]:
    return {r["snomed"]: r for r in read_csv("smoking_status.csv")}


def smoking(
    resource: dict[str, Any], src: SourceRef, status: str, when: TimePoint, note: str | None, ctx: Context, code: str
) -> list[Evidence]:
    """``smoking_status`` and ``current_smoker`` from the SNOMED CT answer; unknown is not guessed."""
    concept = resource.get("valueCodeableConcept")
    if concept is None:
        if resource.get("dataAbsentReason") is not None:
            ctx.record(src, LedgerKind.NO_VALUE, "72166-2: dataAbsentReason", "current_smoker")
        elif "valueQuantity" in resource:
            ctx.record(src, LedgerKind.EXCLUDED, "72166-2: quantity value (e.g. pack-years) not used", "current_smoker")
        else:
            ctx.record(src, LedgerKind.MALFORMED, "72166-2: no coded value", "current_smoker")
        return []
    table = _smoking_table()
    row = next((table[c] for s, c, _ in codings(concept) if s == norm_system(SNOMED) and c in table), None)
    if row is None:
        ctx.record(src, LedgerKind.UNMAPPED, f"72166-2: unmapped answer {code_label(concept)}", "current_smoker")
        return []
    out = []
    if row["smoking_status"] != "unknown":
        out.append(_coded("smoking_status", row["smoking_status"], src, status, when, note, code, row["snomed"]))
    if row["current_smoker"]:
        out.append(
            _coded("current_smoker", row["current_smoker"] == "true", src, status, when, note, code, row["snomed"])
        )
    else:
        ctx.record(
            src, LedgerKind.NO_VALUE, f"72166-2: answer {row['snomed']} does not say current or not", "current_smoker"
        )
    return out


def _coded(
    variable: str,
    value: bool | str,
    src: SourceRef,
    status: str,
    when: TimePoint,
    note: str | None,
    code: str,
    ans: str,
) -> Evidence:
    var = get_variable(variable)
    return Evidence(
        variable=variable,
        scale=var.scale,
        value=value,
        unit=None,
        time=when,
        source=src,
        status=status,
        original_value=f"{system_uri('snomed')}|{ans}",
        note=note,
        code=code,
    )


def exercise_vital_sign(
    resource: dict[str, Any],
    handler: str,
    src: SourceRef,
    status: str,
    when: TimePoint,
    note: str | None,
    ctx: Context,
    code: str,
) -> list[Evidence]:
    """Exercise Vital Sign: minutes/week = days/week x minutes/day.

    A panel is combined at once; standalone day and minute items are parked and paired by time in
    :func:`pair_exercise_parts` once every resource has been read.
    """
    if handler == "evs_panel":
        parts: dict[str, Evidence] = {}
        for comp in iter_components(resource):
            for sys, c, _ in codings(comp.get("code")):
                if sys == system_uri("loinc") and c in (EVS_DAYS, EVS_MINUTES):
                    family = "activity_days" if c == EVS_DAYS else "activity_minutes"
                    ev = quantity_evidence(
                        comp, "exercise_min_per_week", src, status, when, ctx, f"{sys}|{c}", note, family
                    )
                    if ev is not None:
                        parts[c] = ev
        if len(parts) == 2:
            return [_combine(parts[EVS_DAYS], parts[EVS_MINUTES], ctx)]
        ctx.record(
            src, LedgerKind.NO_VALUE, "EVS panel lacks usable days and minutes components", "exercise_min_per_week"
        )
        return []
    family = "activity_days" if handler == "evs_days" else "activity_minutes"
    part = quantity_evidence(resource, "exercise_min_per_week", src, status, when, ctx, code, note, family)
    if part is not None:
        ctx.pending.setdefault(PENDING_KEY, []).append(part)
    return []


def _combine(days: Evidence, minutes: Evidence, ctx: Context) -> Evidence:
    var = get_variable("exercise_min_per_week")
    same = days.source == minutes.source
    ctx.record(days.source, LedgerKind.DERIVED, "exercise_min_per_week = EVS days/week x minutes/day", var.name)
    return Evidence(
        variable=var.name,
        scale=var.scale,
        value=float(days.value) * float(minutes.value),
        unit=var.unit,
        time=days.time,
        source=days.source,
        status=days.status if days.status == minutes.status else "preliminary",
        original_value=f"{days.value:g} d/wk x {minutes.value:g} min/d",
        original_unit=None,
        comparator=days.comparator or minutes.comparator,
        note=add_note("derived: EVS days x minutes", days.note),
        code=days.code,
        derived_from=() if same else (minutes.source,),
    )


def pair_exercise_parts(ctx: Context) -> list[Evidence]:
    """Pair standalone EVS day and minute items taken at the same time; unpaired items are ledgered."""
    by_time: dict[Any, dict[str, list[Evidence]]] = defaultdict(lambda: {"d": [], "m": []})
    for part in ctx.pending.pop(PENDING_KEY, []):
        kind = "d" if part.unit == "d/wk" else "m"
        by_time[to_instant(part.time)][kind].append(part)
    out = []
    for group in by_time.values():
        if group["d"] and group["m"]:
            out.append(_combine(group["d"][0], group["m"][0], ctx))
            rest = group["d"][1:] + group["m"][1:]
        else:
            rest = group["d"] + group["m"]
        for part in rest:
            ctx.record(part.source, LedgerKind.NO_VALUE, "EVS item without its pair at the same time", part.variable)
    return out
