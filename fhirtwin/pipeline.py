"""The vertical path composed: read a record → build the TwinState → fit a model → plan.

The layers do not know each other; this module (used by the CLI and, later, the service) is where
they meet. Reads go through anything with the client's read interface: a live ``FhirClient`` or an
offline ``NdjsonSource``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

from fhirtwin.adapters import build_twin, flatten_resources
from fhirtwin.fhir.models import ResourceValidationError, validate_resource
from fhirtwin.twin import LedgerEntry, LedgerKind, SourceRef, TwinState


class RecordSource(Protocol):
    """What the pipeline needs from a FHIR source (FhirClient and NdjsonSource both offer it)."""

    def fetch_patient_record(self, patient_id: str) -> list[dict[str, Any]]: ...

    def fetch_patients_records(self, patient_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]: ...


def today() -> date:
    return datetime.now(UTC).date()


def read_twin(
    source: RecordSource, patient_id: str, reference_date: date | None = None, *, validate: bool = False
) -> TwinState:
    """One patient's TwinState from one record read (one HTTP request on a live server, plus paging).

    ``validate=True`` is strict mode: resources that fail R4 validation are ledgered, not used.
    """
    record = source.fetch_patient_record(patient_id)
    if validate:
        return _build_strict(patient_id, record, reference_date or today())
    return build_twin(patient_id, record, reference_date or today())


def read_twins(
    source: RecordSource,
    patient_ids: Iterable[str],
    reference_date: date | None = None,
    *,
    chunk_size: int = 20,
    validate: bool = False,
) -> Iterator[TwinState]:
    """TwinStates of many patients, reading ``chunk_size`` patients per request (``validate``: strict mode)."""
    ids = list(patient_ids)
    when = reference_date or today()
    build = _build_strict if validate else build_twin
    for start in range(0, len(ids), chunk_size):
        records = source.fetch_patients_records(ids[start : start + chunk_size])
        for patient_id, record in records.items():
            yield build(patient_id, record, when)


@dataclass(frozen=True)
class PatientRead:
    """One patient's read split in two: the clinical record (twin input) and fhirtwin's own stored results.

    Why: the writer needs the stored results to decide what is superseded; reading them in the record's
    batch saves a request per patient, and splitting them out keeps fhirtwin's outputs from ever being
    read back as inputs.
    """

    record: list[dict[str, Any]]
    existing: list[dict[str, Any]]


def existing_results_searches(patient_id: str) -> list[str]:
    """Relative search URLs for fhirtwin's RiskAssessments, Goals and CarePlans of a patient."""
    return [f"{rtype}?subject=Patient/{patient_id}&_tag={GENERATED_TAG_QUERY}&_count=500"
            for rtype in ("RiskAssessment", "Goal", "CarePlan")]


def is_generated(resource: Any) -> bool:
    """True for a resource fhirtwin wrote (it carries the ``fhirtwin-generated`` tag)."""
    if not isinstance(resource, dict):
        return False
    system, _, code = GENERATED_TAG_QUERY.partition("|")
    return any(isinstance(t, dict) and t.get("system") == system and t.get("code") == code
               for t in (resource.get("meta") or {}).get("tag") or [])


def read_patient(source: Any, patient_id: str) -> PatientRead:
    """The record and the stored fhirtwin results of one patient in one request (a live FhirClient).

    A source without ``extra_searches`` (e.g. NdjsonSource) gives its record; anything fhirtwin generated
    is split out of the record either way.
    """
    import inspect

    if "extra_searches" in inspect.signature(source.fetch_patient_record).parameters:
        resources = source.fetch_patient_record(patient_id, extra_searches=existing_results_searches(patient_id))
    else:
        resources = source.fetch_patient_record(patient_id)
    record: list[dict[str, Any]] = []
    existing: list[dict[str, Any]] = []
    for resource in resources:
        (existing if is_generated(resource) else record).append(resource)
    return PatientRead(record, existing)


def read_twin_and_results(
    source: Any, patient_id: str, reference_date: date | None = None, *, validate: bool = False
) -> tuple[TwinState, list[dict[str, Any]]]:
    """The TwinState and the stored fhirtwin results (for ``write_predictions(existing=...)``), one request."""
    read = read_patient(source, patient_id)
    when = reference_date or today()
    state = (_build_strict if validate else build_twin)(patient_id, read.record, when)
    return state, read.existing


def _build_strict(patient_id: str, record: Iterable[Any], reference_date: date) -> TwinState:
    """Strict mode: only resources that pass R4 validation reach the adapters.

    A rejected resource is recorded in the twin's ledger as ``malformed`` with the validation message
    (locations and reasons, no values), so the twin never uses data it rejected and nothing is dropped
    silently. Valid but untraceable resources (no id) are ledgered here too, as build_twin would, so that
    their ``Type/?[position]`` label counts positions in the record as read.
    """
    accepted: list[Any] = []
    rejected: list[LedgerEntry] = []
    for i, resource in enumerate(flatten_resources(record)):
        try:
            validate_resource(resource)
            SourceRef.of(resource)
        except ResourceValidationError as exc:
            message = f"failed R4 validation: {exc.summary}"
            rejected.append(LedgerEntry(_ledger_source(resource, i), LedgerKind.MALFORMED, message))
        except ValueError as exc:
            rejected.append(LedgerEntry(_ledger_source(resource, i), LedgerKind.MALFORMED, str(exc)))
        else:
            accepted.append(resource)
    state = build_twin(patient_id, accepted, reference_date)
    state.ledger.extend(rejected)
    return state


def _ledger_source(resource: Any, position: int) -> str:
    """The ledger's name for an input: ``Type/id/_history/v``, else the same fallbacks as build_twin."""
    if not isinstance(resource, dict):
        return f"input[{position}]"
    try:
        return SourceRef.of(resource).reference
    except ValueError:
        rtype = resource.get("resourceType")
        return f"{rtype if isinstance(rtype, str) and rtype else 'Unknown'}/?[{position}]"


@dataclass(frozen=True)
class TwinRun:
    """The outcome of simulating one patient: a plan, or the reason there is none."""

    state: TwinState
    plan: Any | None  # fhirtwin.sim.planner.Plan
    error: str | None


def simulate_twin(
    state: TwinState, *, horizon_years: float = 10.0, draws: int = 1000, seed: int = 0, outcome: str = "total_cvd"
) -> TwinRun:
    """Fit the mechanistic twin and rank interventions; insufficient data is an answer, not a crash."""
    from fhirtwin.sim.inputs import InsufficientData
    from fhirtwin.sim.model import MechanisticTwin
    from fhirtwin.sim.planner import plan

    try:
        model = MechanisticTwin().fit(state)
        return TwinRun(state, plan(model, outcome=outcome, horizon_years=horizon_years, draws=draws, seed=seed),
                       None)
    except InsufficientData as exc:
        return TwinRun(state, None, str(exc))


def state_summary(state: TwinState) -> dict[str, Any]:
    """The TwinState as JSON grouped by scale (every scale present), with its ledger."""
    scales = {
        scale.value: {name: [ev.to_json() for ev in series] for name, series in variables.items()}
        for scale, variables in state.by_scale().items()
    }
    return {
        "patient_id": state.patient_id,
        "reference_date": state.reference_date.isoformat() if state.reference_date else None,
        "scales": scales,
        "ledger": state.ledger.to_json(),
    }


# ---------------------------------------------------------------------------------------------- write-back

GENERATED_TAG_QUERY = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"


@dataclass
class WriteResult:
    """What writing one patient's results did: ``written``, ``unchanged``, ``dry-run``, ``skipped`` or ``failed``."""

    patient_id: str
    status: str
    created: int = 0
    updated: int = 0
    requests: int = 0
    message: str = ""
    provenance: str | None = None
    bundle: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bundle"}
        if self.bundle is not None:
            out["entries"] = [f"{e['request']['method']} {e['request']['url']}" for e in self.bundle["entry"]]
        return out


def fetch_existing_results(client: Any, patient_id: str) -> list[dict[str, Any]]:
    """fhirtwin's stored RiskAssessments, Goals and CarePlans of a patient (one batch request)."""
    from fhirtwin.fhir.client import batch_results

    entries = [{"request": {"method": "GET", "url": url}} for url in existing_results_searches(patient_id)]
    response = client.batch(entries)
    found: list[dict[str, Any]] = []
    for result in batch_results(response, entries):
        if not result.ok:
            raise RuntimeError(f"search for existing fhirtwin results failed: {result.request} -> {result.status}")
        bundle = result.resource or {}
        found += [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    return found


def check_outgoing(bundle: dict[str, Any]) -> None:
    """Validate every outgoing resource at the boundary (R4 structure, nothing non-R4 on the wire)."""
    from fhirtwin.fhir.models import check_emittable

    for entry in bundle["entry"]:
        validate_resource(entry["resource"])
        check_emittable(entry["resource"])


def prepare_write(run: TwinRun, key: Any, *, existing: Iterable[dict[str, Any]] = (), now: datetime | None = None,
                  include_device: bool = True):
    """The transaction for one TwinRun (``fhirtwin.writeback.transaction.PatientWrite``), validated.

    ``include_device=False`` leaves out the PUTs of fhirtwin's Device and Organization, for writers whose
    (user-level) authorisation covers only the patient's results: they must already be registered
    (see :func:`fhirtwin_registration`).
    """
    from fhirtwin.writeback.transaction import build_patient_write

    if run.plan is None:
        raise ValueError(f"no prediction: {run.error}")
    write = build_patient_write(run.plan, run.state, key=key, existing=existing, now=now,
                                include_device=include_device)
    check_outgoing(write.bundle)
    return write


def fhirtwin_registration() -> list[dict[str, Any]]:
    """The Organization and the Device of every registered model: what a server needs once, before writes."""
    from fhirtwin.sim.model import _REGISTRY
    from fhirtwin.writeback.device import device_resource, organization_resource

    return [organization_resource(), *(device_resource(cls.name, cls.version) for cls in _REGISTRY.values())]


SUPERSEDED_TAG = {"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "superseded"}


def reinstate_results(client: Any, references: Iterable[str]) -> list[str]:
    """Make earlier results current again (inputs went back to an earlier state): drop their tag.

    One ``$meta-delete`` per resource, after the transaction (HAPI refuses operations inside one).
    Safe to repeat, so it is retried like a read.
    """
    done = []
    for ref in references:
        rtype, rid = ref.split("/")
        client.operation("meta-delete", resource_type=rtype, resource_id=rid, retry_safe=True, parameters={
            "resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [SUPERSEDED_TAG]}}]})
        done.append(ref)
    return done


def write_predictions(
    client: Any, runs: Iterable[TwinRun], key: Any, *, dry_run: bool = False, group: int = 1,
    now: datetime | None = None, existing: Mapping[str, Sequence[dict[str, Any]]] | None = None,
) -> list[WriteResult]:
    """Build and send one transaction per patient (``group`` > 1: several patients per transaction).

    ``existing`` maps a patient id to its stored fhirtwin results as read with the record
    (:func:`read_twin_and_results`); a patient not in it costs one extra search request.

    A patient without a plan (insufficient or rejected data) is ``skipped`` and gets no prediction; a
    failing patient (or group) is ``failed`` with the reason, and never stops the others. ``dry_run``
    reads what exists but writes nothing.
    """
    from fhirtwin.fhir.client import batch_results
    from fhirtwin.writeback.transaction import merge_bundles

    results: list[WriteResult] = []
    pending: list[tuple[WriteResult, Any]] = []

    def flush() -> None:
        if not pending:
            return
        writes = [w for _, w in pending]
        bundle = writes[0].bundle if len(writes) == 1 else merge_bundles(writes)
        before = client.request_count
        try:
            response = client.transaction(bundle)
        except Exception as exc:  # noqa: BLE001 - one group's failure must not lose the others
            for result, _ in pending:
                result.status, result.message = "failed", f"transaction failed: {type(exc).__name__}: {exc}"
        else:
            outcomes = batch_results(response, bundle["entry"])
            by_url = {e.get("fullUrl"): o for e, o in zip(bundle["entry"], outcomes, strict=False)}
            for result, write in pending:
                mine = [by_url.get(e.get("fullUrl")) for e in write.bundle["entry"]]
                created = sum(1 for o in mine if o is not None and o.status == 201)
                updated = sum(1 for e, o in zip(write.bundle["entry"], mine, strict=True)
                              if o is not None and e["request"]["method"] == "PUT"
                              and e["resource"]["resourceType"] not in ("Device", "Organization"))
                prov = [o for e, o in zip(write.bundle["entry"], mine, strict=True)
                        if e["resource"]["resourceType"] == "Provenance" and o is not None]
                result.created, result.updated = created, updated
                result.provenance = prov[0].location.split("/_history")[0] if prov and prov[0].location else None
                result.status = "written" if created or updated else "unchanged"
                result.requests += (client.request_count - before) if len(pending) == 1 else 0
                reinstate_results(client, write.reinstate)
        pending.clear()

    for run in runs:
        patient_id = run.state.patient_id
        result = WriteResult(patient_id, "skipped")
        results.append(result)
        if run.plan is None:
            result.message = f"no prediction: {run.error}"
            continue
        before = client.request_count
        try:
            stored = existing[patient_id] if existing is not None and patient_id in existing else \
                fetch_existing_results(client, patient_id)
            write = prepare_write(run, key, existing=stored, now=now)
        except Exception as exc:  # noqa: BLE001
            result.status, result.message = "failed", f"{type(exc).__name__}: {exc}"
            continue
        result.requests = client.request_count - before
        result.bundle = write.bundle
        if dry_run:
            result.status = "dry-run"
            result.message = (f"would send {len(write.bundle['entry'])} entries; supersede {len(write.superseded)}"
                              f"; reinstate {len(write.reinstate)}")
            continue
        pending.append((result, write))
        if len(pending) >= max(1, group):
            flush()
    flush()
    return results


@dataclass
class VerifyReport:
    """Result of checking a Provenance's signature against the targets as they stand on the server."""

    provenance: str
    valid: bool
    message: str
    targets: list[str]
    changed_versions: list[str]


def verify_provenance(client: Any, provenance_ref: str, public_key: Any) -> VerifyReport:
    """Fetch a Provenance and the current version of each target; check the JWS (see writeback.signing)."""
    from fhirtwin.writeback.jws import JwsError
    from fhirtwin.writeback.signing import verify_targets

    rtype, _, rid = provenance_ref.partition("/")
    if rtype != "Provenance" or not rid:
        raise ValueError("expected Provenance/<id>")
    provenance = client.read("Provenance", rid.split("/_history")[0])
    refs = [t.get("reference", "") for t in provenance.get("target", [])]
    signatures = [s for s in provenance.get("signature", []) if s.get("sigFormat") == "application/jose"]
    if not refs or not signatures:
        return VerifyReport(provenance_ref, False, "Provenance has no targets or no JWS signature", refs, [])
    targets, changed = [], []
    for ref in refs:
        parts = ref.split("/")
        try:
            current = client.read(parts[0], parts[1])
        except Exception as exc:  # noqa: BLE001 - a missing target is a verification failure, not a crash
            return VerifyReport(provenance_ref, False, f"target {ref} cannot be read: {type(exc).__name__}", refs,
                                changed)
        targets.append(current)
        if "_history" in parts and current.get("meta", {}).get("versionId") != parts[-1]:
            changed.append(f"{ref} -> version {current.get('meta', {}).get('versionId')}")
    try:
        header = verify_targets(signatures[0].get("data", ""), targets, refs, public_key)
    except JwsError as exc:
        return VerifyReport(provenance_ref, False, f"INVALID: {exc} (a target was changed after signing, or "
                            "another key signed it)", refs, changed)
    note = f"valid {header.get('alg')} signature over {len(refs)} target(s)"
    if changed:
        note += "; signed content unchanged although newer versions exist (meta only)"
    return VerifyReport(provenance_ref, True, note, refs, changed)
