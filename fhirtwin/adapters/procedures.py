"""Procedure adapter: coronary revascularisation (CABG, PCI), dialysis and kidney transplant.

Codes map by value set membership exactly as Conditions do (:func:`fhirtwin.adapters.conditions.map_concepts`
with the value sets whose ``fhirtwin.resources`` include ``Procedure``: SNOMED CT procedures, CPT, HCPCS,
ICD-10-PCS). Status (R4 ``event-status``): ``completed`` and ``in-progress`` count; ``entered-in-error``
is recorded as such; every other status (``not-done``, ``preparation``, ``on-hold``, ``stopped``,
``unknown``) means the procedure cannot be taken as performed and is recorded as excluded.

Time: ``performedDateTime``, else ``performedPeriod.start`` (or ``.end``), is the event time; a period
end is the episode end. ``performedString``/``performedAge``/``performedRange`` cannot be placed in
time and are recorded as missing time. History variables (revascularisation, transplant) hold from the
event on; a current variable (dialysis) stays current for the value set's ``episode_days`` after the
procedure ends, and while an ``in-progress`` procedure has no end.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fhirtwin.adapters._common import Context, add_note, first_time
from fhirtwin.adapters.conditions import coded_concepts, flag_value
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable

COUNTED = frozenset({"completed", "in-progress"})


def adapt_procedure(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Evidence for every variable a performed Procedure's code maps to."""
    status = resource.get("status")
    if status == "entered-in-error":
        ctx.record(src, LedgerKind.ENTERED_IN_ERROR, "status entered-in-error: ignored")
        return []
    if status not in COUNTED:
        ctx.record(src, LedgerKind.EXCLUDED, f"status {status!s}: not a performed procedure, not counted")
        return []
    mapped = coded_concepts(resource, "Procedure", ctx, src, "no twin variable for procedure code")
    if not mapped:
        return []
    start = first_time(resource, (("performedDateTime",), ("performedPeriod", "start"), ("performedPeriod", "end")))
    if start is None:
        ctx.record(src, LedgerKind.MISSING_TIME, "no performedDateTime/performedPeriod")
        return []
    period_end = first_time(resource, (("performedPeriod", "end"),)) if "performedPeriod" in resource else None
    ongoing = status == "in-progress" and period_end is None
    out = []
    for variable, match in sorted(mapped.items()):
        var = get_variable(variable)
        end: TimePoint | None = None
        note = start.note
        if var.temporal == "current" and not ongoing:
            end = period_end.value if period_end is not None else start.value
            if match.episode_days is not None:
                end = end + timedelta(days=match.episode_days)
                note = add_note(note, f"current for {match.episode_days} days after the procedure ({match.valueset})")
        elif ongoing:
            note = add_note(note, "in progress")
        out.append(
            Evidence(
                variable=variable,
                scale=var.scale,
                value=flag_value(match.value),
                unit=None,
                time=start.value,
                source=src,
                status=f"procedure/{status}",
                original_value=match.code,
                note=note,
                code=match.code,
                end=end,
            )
        )
    return out
