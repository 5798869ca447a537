"""Adapters: one module per FHIR source kind, each emitting Evidence for the TwinState.

:func:`build_twin` routes every resource to its adapter and never fails on one bad resource: the
problem is recorded in the data-quality ledger. Every input resource ends up either as a source of
Evidence (or demographics) or with at least one ledger entry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fhirtwin.adapters._common import AdapterError, BuildOptions, Context, evidence_sources
from fhirtwin.adapters.behavioral import pair_exercise_parts
from fhirtwin.adapters.conditions import adapt_condition
from fhirtwin.adapters.genomics import adapt_genomics, is_genomic
from fhirtwin.adapters.medications import adapt_medication, one_statin_at_a_time
from fhirtwin.adapters.observations import adapt_observation
from fhirtwin.adapters.patient import adapt_patient
from fhirtwin.adapters.procedures import adapt_procedure
from fhirtwin.twin import Evidence, Ledger, LedgerKind, SourceRef, TimePoint, TwinState, get_variable, to_instant

__all__ = ["BuildOptions", "build_twin", "flatten_resources"]

log = logging.getLogger(__name__)

#: Resource types read only through references or not used by the twin.
GROUPING_TYPES = {"DiagnosticReport", "Encounter", "Provenance", "Practitioner", "Organization", "Device"}


@dataclass
class _Input:
    resource: dict[str, Any]
    src: SourceRef
    label: str


def flatten_resources(resources: Iterable[Any]) -> list[Any]:
    """Resources from an iterable that may contain Bundles (searchset, transaction, collection)."""
    out: list[Any] = []
    for res in resources:
        if isinstance(res, dict) and res.get("resourceType") == "Bundle":
            inner = [e.get("resource") for e in res.get("entry") or [] if isinstance(e, dict) and "resource" in e]
            out.extend(flatten_resources(inner))
        else:
            out.append(res)
    return out


def _version_key(src: SourceRef) -> tuple[int, str]:
    vid = src.version_id or ""
    return (int(vid), vid) if vid.isdigit() else (-1, src.last_updated or vid)


def _subject_id(resource: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            parts = ref["reference"].split("/_history")[0].split("/")
            if len(parts) >= 2 and parts[-2] == "Patient":
                return parts[-1]
    return None


def _prepare(resources: Iterable[Any], patient_id: str, ctx: Context) -> list[_Input]:
    """Identify, de-duplicate by resource id (latest version wins) and subject-check the inputs."""
    latest: dict[str, _Input] = {}
    order: list[str] = []
    for i, res in enumerate(flatten_resources(resources)):
        if not isinstance(res, dict):
            ctx.ledger.add(f"input[{i}]", LedgerKind.MALFORMED, "not a JSON object")
            continue
        try:
            src = SourceRef.of(res)
        except ValueError as exc:
            ctx.ledger.add(f"{res.get('resourceType') or 'Unknown'}/?[{i}]", LedgerKind.MALFORMED, str(exc))
            continue
        key = src.unversioned
        if key in latest:
            keep, drop = sorted((latest[key].src, src), key=_version_key, reverse=True)
            ctx.record(drop, LedgerKind.DUPLICATE, f"same resource given twice; version {keep.version_id} kept")
            if keep is src:
                latest[key] = _Input(res, src, key)
            continue
        latest[key] = _Input(res, src, key)
        order.append(key)
    out = []
    for key in order:
        item = latest[key]
        other = item.src.id if item.src.resource_type == "Patient" else _subject_id(item.resource)
        if other is not None and other != patient_id:
            ctx.record(item.src, LedgerKind.WRONG_SUBJECT, "resource belongs to another patient: not used")
            continue
        out.append(item)
    return out


def _check_plausible(evidence: list[Evidence], ctx: Context) -> list[Evidence]:
    kept = []
    for ev in evidence:
        var = get_variable(ev.variable)
        numeric = var.numeric and isinstance(ev.value, int | float) and not isinstance(ev.value, bool)
        if numeric and not var.is_plausible(float(ev.value)):
            low, high = var.plausible or (0, 0)
            msg = f"value outside plausible range {low:g}-{high:g} {var.unit or ''}".rstrip() + ": not used"
            ctx.record(ev.source, LedgerKind.IMPLAUSIBLE, msg, ev.variable)
            continue
        kept.append(ev)
    return kept


def _derive_non_hdl(evidence: list[Evidence], ctx: Context) -> list[Evidence]:
    """non-HDL = TC − HDL from the same draw when no non-HDL result exists for that time."""
    by_time: dict[tuple[str, Any], Evidence] = {}
    for ev in evidence:
        if ev.comparator is None:
            by_time.setdefault((ev.variable, to_instant(ev.time)), ev)
    out = []
    var = get_variable("non_hdl_cholesterol_mg_dl")
    for (name, when), tc in by_time.items():
        if name != "total_cholesterol_mg_dl":
            continue
        hdl = by_time.get(("hdl_cholesterol_mg_dl", when))
        if hdl is None or ("non_hdl_cholesterol_mg_dl", when) in by_time:
            continue
        value = float(tc.value) - float(hdl.value)
        if not var.is_plausible(value):
            ctx.record(tc.source, LedgerKind.IMPLAUSIBLE, "derived TC−HDL outside plausible range: not used", var.name)
            continue
        ctx.record(tc.source, LedgerKind.DERIVED, f"non-HDL derived as TC−HDL with {hdl.source.reference}", var.name)
        out.append(
            Evidence(
                variable=var.name,
                scale=var.scale,
                value=value,
                unit=var.unit,
                time=tc.time,
                source=tc.source,
                status=tc.status if tc.status == hdl.status else "preliminary",
                note="derived TC−HDL",
                derived_from=(hdl.source,),
            )
        )
    return out


def _collapse_duplicates(evidence: list[Evidence], ctx: Context) -> list[Evidence]:
    """Same variable, time, value (and end) from different resources: keep the first, ledger the rest."""
    seen: dict[tuple[Any, ...], Evidence] = {}
    kept = []
    for ev in evidence:
        end = to_instant(ev.end) if ev.end is not None else None
        key = (ev.variable, to_instant(ev.time), ev.value, ev.comparator, end)
        first = seen.get(key)
        if first is not None and first.source.unversioned != ev.source.unversioned:
            ctx.record(ev.source, LedgerKind.DUPLICATE, f"same value and time as {first.source.reference}", ev.variable)
            continue
        if first is None:
            seen[key] = ev
        kept.append(ev)
    return kept


def build_twin(
    patient_id: str,
    resources: Iterable[Any],
    reference_date: TimePoint,
    options: BuildOptions | None = None,
) -> TwinState:
    """Build the TwinState of one patient from R4 JSON resources (Bundles are unpacked).

    One bad resource never stops the build: the reason goes to the ledger as ``malformed``.
    """
    ledger = Ledger()
    ctx = Context(patient_id, reference_date, options or BuildOptions(), ledger)
    state = TwinState(patient_id, reference_date, ledger=ledger)
    inputs = _prepare(resources, patient_id, ctx)
    ctx.index = {item.label: item.resource for item in inputs}
    evidence: list[Evidence] = []
    genomic: list[tuple[dict[str, Any], SourceRef]] = []
    deferred_meds: list[_Input] = []
    for item in inputs:
        rtype = item.src.resource_type
        try:
            if rtype == "Patient":
                state.demographics = adapt_patient(item.resource, item.src, ctx)
            elif rtype == "Observation" and is_genomic(item.resource) or rtype == "MolecularSequence":
                genomic.append((item.resource, item.src))
            elif rtype == "Observation":
                evidence.extend(adapt_observation(item.resource, item.src, ctx))
            elif rtype == "Condition":
                evidence.extend(adapt_condition(item.resource, item.src, ctx))
            elif rtype == "Procedure":
                evidence.extend(adapt_procedure(item.resource, item.src, ctx))
            elif rtype in ("MedicationRequest", "MedicationStatement", "MedicationDispense"):
                deferred_meds.append(item)
            elif rtype == "Medication":
                continue  # read through the requests that reference it
            elif rtype in GROUPING_TYPES:
                ctx.record(
                    item.src, LedgerKind.UNSUPPORTED, f"{rtype}: not read by the twin (results read individually)"
                )
            else:
                ctx.record(item.src, LedgerKind.UNSUPPORTED, f"{rtype}: no adapter")
        except Exception as exc:  # noqa: BLE001 - one bad resource must not stop the build
            _malformed(item.src, exc, ctx)
    for item in deferred_meds:
        try:
            evidence.extend(adapt_medication(item.resource, item.src, ctx))
        except Exception as exc:  # noqa: BLE001
            _malformed(item.src, exc, ctx)
    evidence = one_statin_at_a_time(evidence, ctx)
    try:
        evidence.extend(adapt_genomics(genomic, ctx))
    except Exception as exc:  # noqa: BLE001 - keep the rest of the twin; record every genomic input
        for _, src in genomic:
            _malformed(src, exc, ctx)
    evidence.extend(pair_exercise_parts(ctx))
    evidence = _check_plausible(evidence, ctx)
    evidence.extend(_derive_non_hdl(evidence, ctx))
    evidence = _collapse_duplicates(evidence, ctx)
    state.extend(evidence)
    _account(inputs, state, ctx)
    log.info(
        "twin built: %d resources, %d evidence, %d variables, ledger %s",
        len(inputs),
        len(evidence),
        len(state.variables()),
        dict(ledger.counts()),
    )
    return state


def _malformed(src: SourceRef, exc: Exception, ctx: Context) -> None:
    # AdapterError messages are written to hold codes only; other exceptions may echo data, so only
    # their type is recorded.
    reason = str(exc) if isinstance(exc, AdapterError) else f"unexpected {type(exc).__name__} while reading"
    ctx.record(src, LedgerKind.MALFORMED, reason)  # counted in the build's one summary line, never one per resource


def _account(inputs: list[_Input], state: TwinState, ctx: Context) -> None:
    """Make sure every input is used or ledgered (a resource that fed nothing gets 'unmapped')."""
    fed = evidence_sources(state.all_evidence())
    used = fed | ctx.used
    if state.demographics.source is not None:
        used.add(state.demographics.source.unversioned)
    ledgered = {ref.split("/_history/")[0] for ref in ctx.ledger.sources()}
    for item in inputs:
        if item.src.resource_type == "Medication" and item.label in ctx.used and item.label not in fed \
                and item.label not in ledgered:
            ctx.record(item.src, LedgerKind.UNMAPPED, "Medication read through a request, but its drug feeds no "
                       "twin variable")
            continue
        if item.label in used or item.label in ledgered:
            continue
        if item.src.resource_type == "Medication":
            ctx.record(item.src, LedgerKind.UNSUPPORTED, "Medication not referenced by any request")
        else:
            ctx.record(item.src, LedgerKind.UNMAPPED, "resource produced no evidence")
