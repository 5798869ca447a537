"""valueQuantity -> Evidence in a variable's canonical unit, with every rejection ledgered."""

from __future__ import annotations

from typing import Any

from fhirtwin.adapters._common import Context, add_note, code_label
from fhirtwin.adapters.units import MissingUnit, UnknownUnit, convert
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable
from fhirtwin.twin.evidence import COMPARATORS

VALUE_KEYS = (
    "valueQuantity",
    "valueCodeableConcept",
    "valueString",
    "valueBoolean",
    "valueInteger",
    "valueRange",
    "valueRatio",
    "valueSampledData",
    "valueTime",
    "valueDateTime",
    "valuePeriod",
)


def quantity_evidence(
    holder: dict[str, Any],
    variable: str,
    src: SourceRef,
    status: str,
    when: TimePoint,
    ctx: Context,
    code: str,
    note: str | None = None,
    family: str | None = None,
) -> Evidence | None:
    """Evidence from the valueQuantity of an Observation or component, or a ledger entry and None."""
    var = get_variable(variable)
    if holder.get("dataAbsentReason") is not None:
        reason = code_label(holder.get("dataAbsentReason"))
        ctx.record(src, LedgerKind.NO_VALUE, f"{code}: dataAbsentReason {reason}", variable)
        return None
    quantity = holder.get("valueQuantity")
    if not isinstance(quantity, dict):
        other = next((k for k in VALUE_KEYS if k in holder and k != "valueQuantity"), None)
        if other:
            ctx.record(src, LedgerKind.MALFORMED, f"{code}: expected valueQuantity, got {other}", variable)
        else:
            ctx.record(src, LedgerKind.NO_VALUE, f"{code}: no value and no dataAbsentReason", variable)
        return None
    comparator = quantity.get("comparator")
    if comparator is not None and comparator not in COMPARATORS:
        ctx.record(src, LedgerKind.MALFORMED, f"{code}: unknown comparator", variable)
        return None
    try:
        value, conv, given = convert(quantity, family or var.family or "")
    except MissingUnit:
        ctx.record(src, LedgerKind.MISSING_UNIT, f"{code}: quantity without unit rejected (never guessed)", variable)
        return None
    except UnknownUnit as exc:
        ctx.record(src, LedgerKind.UNKNOWN_UNIT, f"{code}: {exc}", variable)
        return None
    except ValueError as exc:
        ctx.record(src, LedgerKind.MALFORMED, f"{code}: {exc}", variable)
        return None
    conv_note = None
    if conv.factor != 1 or conv.offset != 0:
        conv_note = f"converted from {given}"
        ctx.record(src, LedgerKind.CONVERTED, f"{code}: {given} -> {conv.to_unit} ({conv.source})", variable)
    return Evidence(
        variable=variable,
        scale=var.scale,
        value=value,
        unit=var.unit if family is None else conv.to_unit,
        time=when,
        source=src,
        status=status,
        original_value=float(quantity["value"]),
        original_unit=given,
        comparator=comparator,
        note=add_note(conv_note, note),
        code=code,
    )
