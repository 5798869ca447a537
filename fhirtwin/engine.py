"""The engine: the one place where read → twin → fit → plan → prepare → commit → what-if are composed.

Every front door (the CLI, ``$simulate``, the Subscription worker, CDS Hooks, the SMART page, the
benchmark) calls :class:`Engine`; none of them imports ``fhirtwin.adapters``, ``fhirtwin.sim`` or
``fhirtwin.writeback`` itself, so the same record gives the same answer through every door. Failures
the caller must answer are :class:`EngineError` subclasses with an HTTP status and an OperationOutcome;
"not enough data" is an answer (:attr:`TwinRun.error`), not a crash.

Reads go through any :class:`RecordSource` (a live ``FhirClient`` or an offline ``NdjsonSource``);
what a record is (types, ``_include``) comes from :mod:`fhirtwin.adapters.reads`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol

import numpy as np

from fhirtwin.adapters import build_twin, flatten_resources
from fhirtwin.adapters.reads import READ_TYPES, RECORD_INCLUDES, RECORD_TYPES, REFERENCED_TYPES, observation_codes
from fhirtwin.causal.counterfactual import (
    SETTABLE,
    Counterfactual,
    SetValue,
    Shift,
    UnsupportedIntervention,
    twin_counterfactual,
)
from fhirtwin.causal.graph import graph_reference
from fhirtwin.fhir import errors as fhir_errors
from fhirtwin.fhir.client import batch_results
from fhirtwin.fhir.models import ResourceValidationError, check_emittable, validate_resource
from fhirtwin.hybrid import HybridTwin
from fhirtwin.hybrid.artifact import configured_artifact
from fhirtwin.keys import key_device, key_device_id, public_key_from_device
from fhirtwin.package_data import conformance_resources
from fhirtwin.sequencing import SequencePlan, SequencingError, sequence
from fhirtwin.sim.components import checked, enabled_components
from fhirtwin.sim.inputs import InsufficientData, medication_safety_inputs
from fhirtwin.sim.interventions import BASELINE, Intervention, Scenario, candidate_interventions
from fhirtwin.sim.model import Forecast, MechanisticTwin, registered_models
from fhirtwin.sim.pharmacogenomics import MedicationFlag, medication_flags
from fhirtwin.sim.planner import Plan, paired_difference, paired_draws, plan
from fhirtwin.sim.scope import EGFR_KIDNEY_FAILURE, KIDNEY_FAILURE, ScopeDecision, decide_scope
from fhirtwin.twin import LedgerEntry, LedgerKind, SourceRef, TwinState
from fhirtwin.vocabulary import CONCEPTS, GENERATED_TAG, SUPERSEDED_TAG, coding, is_fhirtwin_generated, token
from fhirtwin.writeback.careplan import build_draft_care_plan
from fhirtwin.writeback.device import DEFAULT_ORGANIZATION, device_id, device_resource, organization_resource
from fhirtwin.writeback.jws import JwsError, SigningKey
from fhirtwin.writeback.sequence import build_sequence_care_plan
from fhirtwin.writeback.signing import revision_keys, signature_header, verify_targets
from fhirtwin.writeback.transaction import (
    RESULT_TYPES,
    PatientWrite,
    build_patient_write,
    build_retirement,
    confirmation_reads,
    confirmed_response,
    full_url,
    is_superseded,
    key_of,
    merge_bundles,
    versioned_provenance_update,
)

if TYPE_CHECKING:
    from fhirtwin.audit import AuditTrail
    from fhirtwin.consent import ConsentPolicy

MIN_HORIZON_YEARS = 5.0  # the RiskAssessment reports the 5- and 10-year points; below 5 it would be empty
MAX_HORIZON_YEARS = 30.0  # the $simulate OperationDefinition documents 5 to 30 years
#: fhirtwin CodeSystem intervention codes -> (intervention kind, statin intensity).
INTERVENTION_CODES: dict[str, tuple[str, str | None]] = {
    "statin-high-intensity": ("statin", "high"),
    "statin-moderate-intensity": ("statin", "moderate"),
    "bp-lowering-agent": ("bp_lowering", None),
    "sglt2-inhibitor": ("sglt2i", None),
    "smoking-cessation": ("smoking_cessation", None),
    "ezetimibe": ("ezetimibe", None),
    "pcsk9-inhibitor": ("pcsk9_inhibitor", None),
}


# ---------------------------------------------------------------------------------------------- errors


def operation_outcome(message: str, *, code: str = "processing", severity: str = "error",
                      expression: list[str] | None = None) -> dict[str, Any]:
    """A one-issue OperationOutcome (the error body of every FHIR front door)."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class EngineError(Exception):
    """A failure the caller answers with ``http_status`` and :meth:`outcome` (no stack trace, no PHI)."""

    http_status = 500
    issue_code = "exception"

    def __init__(self, message: str, *, expression: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression

    def outcome(self) -> dict[str, Any]:
        """The OperationOutcome for this error."""
        return operation_outcome(self.message, code=self.issue_code, expression=self.expression)


class BadRequest(EngineError):
    """The request itself is wrong (a parameter out of range, an unknown scenario)."""

    http_status = 400
    issue_code = "invalid"


class PatientNotFound(EngineError):
    """The source has no such Patient (or it was deleted). The message never names the patient (it may
    reach a log or a client); ``patient_id`` is there for a caller who may say it, e.g. the CLI."""

    http_status = 404
    issue_code = "not-found"

    def __init__(self, message: str, *, patient_id: str | None = None) -> None:
        super().__init__(message)
        self.patient_id = patient_id


class InsufficientPatientData(EngineError):
    """The record lacks what the twin needs; ``missing`` names the variables (never values)."""

    http_status = 422
    issue_code = "incomplete"

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class OutOfScope(EngineError):
    """The anchoring equations do not apply to this patient; ``scope`` is the coded decision."""

    http_status = 422
    issue_code = "not-supported"

    def __init__(self, decision: ScopeDecision) -> None:
        super().__init__(f"out of scope for a primary-prevention forecast: {CONCEPTS[decision.code]}")
        self.scope = decision

    def outcome(self) -> dict[str, Any]:
        outcome = super().outcome()
        outcome["issue"][0]["details"] = {"coding": [coding(self.scope.code)], "text": CONCEPTS[self.scope.code]}
        return outcome


class UpstreamError(EngineError):
    """The FHIR server failed or refused (5xx, unexpected 4xx, broken connection, invalid response)."""

    http_status = 502
    issue_code = "transient"

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    """The FHIR server did not answer in time."""

    http_status = 504
    issue_code = "timeout"


class UpstreamUnauthorized(UpstreamError):
    """The FHIR server refused the credentials (401/403): the caller's token does not cover this."""

    http_status = 403
    issue_code = "forbidden"


def upstream_error(exc: Exception, during: str) -> EngineError:
    """Map a transport error to an EngineError; the message names the step and status, not the URL."""
    if isinstance(exc, fhir_errors.FhirTimeout):
        return UpstreamTimeout(f"FHIR server timed out during {during}")
    if isinstance(exc, fhir_errors.FhirUnauthorized):
        return UpstreamUnauthorized(f"FHIR server refused access during {during}")
    if isinstance(exc, fhir_errors.FhirError):
        status = getattr(exc, "status", None)
        codes = ",".join(str(i.get("code", "?")) for i in getattr(exc, "issues", []))
        detail = f" (HTTP {status}{', issues ' + codes if codes else ''})" if status else ""
        return UpstreamError(f"FHIR server error during {during}: {type(exc).__name__}{detail}",
                             upstream_status=status)
    return UpstreamError(f"FHIR server error during {during}: {type(exc).__name__}")


# ---------------------------------------------------------------------------------------------- contracts


class RecordSource(Protocol):
    """Where records come from: a live ``FhirClient`` or an ``NdjsonSource`` both satisfy it."""

    def fetch_patient_record(self, patient_id: str, types: Mapping[str, str], *, include: Iterable[str] = (),
                             extra_searches: Iterable[str] = ()) -> list[dict[str, Any]]: ...

    def fetch_patients_records(self, patient_ids: Iterable[str], types: Mapping[str, str], *,
                               include: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]: ...


@dataclass(frozen=True)
class PatientRecord:
    """One patient's read split in two: the clinical record (twin input) and fhirtwin's stored results.

    Why: the writer needs the stored results to decide what is superseded; reading them in the record's
    request saves a request per patient, and splitting them out keeps fhirtwin's outputs from ever being
    read back as inputs. ``stored`` is None when the read did not look for them.
    """

    patient_id: str
    resources: list[dict[str, Any]]
    stored: list[dict[str, Any]] | None = None
    #: The purpose of use whose Consents the reading engine checked (None: not checked), so that a run on
    #: this record does not search them again.
    consented_for: str | None = None

    @classmethod
    def split(cls, patient_id: str, resources: Iterable[Any], *, stored_read: bool) -> PatientRecord:
        """Separate fhirtwin's own resources from the clinical record."""
        record: list[dict[str, Any]] = []
        stored: list[dict[str, Any]] = []
        for resource in resources:
            (stored if is_fhirtwin_generated(resource) else record).append(resource)
        return cls(patient_id, record, [r for r in stored if r.get("resourceType") in RESULT_TYPES]
                   if stored_read else None)


@dataclass(frozen=True, eq=False)
class TwinRun:
    """One patient simulated: the twin, the fitted model and the plan — or the reason there is none.

    ``medication_flags`` (CPIC pharmacogenomic problems with current medications) are there for every run,
    also when there is no plan: a patient out of scope or without lipids may still take a risky dose.
    """

    state: TwinState
    model: MechanisticTwin | None
    plan: Plan | None
    error: str | None = None
    missing: tuple[str, ...] = ()
    stored: list[dict[str, Any]] | None = None
    scope: ScopeDecision | None = None
    medication_flags: tuple[MedicationFlag, ...] = ()

    @property
    def patient_id(self) -> str:
        return self.state.patient_id

    def require_plan(self) -> Plan:
        """The plan, or :class:`OutOfScope` / :class:`InsufficientPatientData` saying why there is none."""
        if self.plan is None and self.scope is not None and not self.scope.in_scope:
            raise OutOfScope(self.scope)
        if self.plan is None:
            raise InsufficientPatientData(
                "insufficient data for a prediction; missing: " + (", ".join(self.missing) or "see ledger"),
                self.missing)
        return self.plan


@dataclass(frozen=True, eq=False)
class WhatIf:
    """A chosen set of interventions against the run's baseline, paired draw by draw."""

    forecast: Forecast
    interventions: tuple[Intervention, ...]
    arr: dict[str, dict[str, float]]  # outcome -> median, p05, p95 of baseline - scenario at the horizon


@dataclass
class Commit:
    """What one committed transaction did."""

    response: dict[str, Any]
    created: int
    provenance: str | None
    reinstated: list[str] = field(default_factory=list)
    #: the response was lost (or a retry conflicted) and the content was found on the server instead
    confirmed: bool = False


@dataclass
class Simulation:
    """A front door's run: the TwinRun, the transaction that was (or would be) sent, and what it did."""

    run: TwinRun
    write: PatientWrite
    commit: Commit | None = None
    duration_ms: int = 0

    @property
    def bundle(self) -> dict[str, Any]:
        return self.write.bundle

    def resources(self, resource_type: str | None = None) -> list[dict[str, Any]]:
        """Resources fhirtwin builds for this patient (RiskAssessment, Goal, CarePlan, Provenance)."""
        return [r for r in self.write.results if resource_type is None or r["resourceType"] == resource_type]


@dataclass
class WriteResult:
    """What writing one patient's results did: ``written``, ``unchanged``, ``dry-run``, ``skipped``, ``failed``."""

    patient_id: str
    status: str
    created: int = 0
    updated: int = 0
    requests: int = 0
    message: str = ""
    provenance: str | None = None
    bundle: dict[str, Any] | None = None
    #: the results current after this write (``Type/id``), as the server reported or confirmed them
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bundle"}
        if self.bundle is not None:
            out["entries"] = [f"{e['request']['method']} {e['request']['url']}" for e in self.bundle["entry"]]
        return out


@dataclass
class VerifyReport:
    """Result of checking a Provenance's signature against the targets as they stand on the server."""

    provenance: str
    valid: bool
    message: str
    targets: list[str]
    changed_versions: list[str]
    kid: str | None = None
    #: what the signature covers besides the targets (None: made before revisions were signed)
    revisions: list[str] | None = None
    recorded: str | None = None


@dataclass
class PatientVerifyReport:
    """Whether a patient's current and superseded results are exactly what valid signed Provenances say."""

    patient_id: str
    valid: bool
    message: str
    problems: list[str]
    current: list[str]
    provenances: list[VerifyReport]


@dataclass(frozen=True)
class Transacted:
    """A transaction's response, and whether it was confirmed on the server after the response was lost."""

    response: dict[str, Any]
    confirmed: bool = False


def outcome_unknown(exc: fhir_errors.FhirError) -> bool:
    """True when a failed transaction may have committed: no response (reset, timeout), a server error, or
    a refusal (409/412 version check, 429) of a *retry* after an attempt whose response was lost, because
    that attempt may have committed. A first attempt refused with 409/412 is a real conflict (another
    writer got there first), never a success of this one."""
    status = exc.status
    if status is None or status >= 500:
        return True
    return status in (409, 412, 429) and exc.after_uncertain_attempt


def _ref_key(ref: str) -> str:
    """``Type/id`` of a reference (version dropped)."""
    return "/".join(ref.split("/_history")[0].split("/")[-2:])


def _instant_value(text: str | None) -> datetime:
    """An instant for ordering Provenances (unparseable or missing: the earliest)."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- helpers


def today() -> date:
    return datetime.now(UTC).date()


def _all_pages(client: Any, bundle: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The resources of a searchset and of every page after it (a patient with more results than one page
    must not have the rest ignored: they would stay current, or escape a verification)."""
    if not bundle:
        return []
    pages = getattr(client, "iter_bundle_pages", None)
    if callable(pages):
        return list(pages(bundle, max_pages=1000))
    return [e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict) and "resource" in e]


def stored_results_searches(patient_id: str) -> list[str]:
    """Relative search URLs for fhirtwin's RiskAssessments, Goals and CarePlans of a patient."""
    return [f"{rtype}?subject=Patient/{patient_id}&_tag={token(GENERATED_TAG)}&_count=500"
            for rtype in RESULT_TYPES]


_locks_guard = threading.Lock()
_patient_locks = [threading.Lock() for _ in range(64)]


def patient_lock(patient_id: str) -> threading.Lock:
    """A lock per patient (striped, process-wide): one write at a time for a patient, across all doors."""
    digest = hashlib.blake2s(patient_id.encode("utf-8"), digest_size=2).digest()
    return _patient_locks[int.from_bytes(digest, "big") % len(_patient_locks)]


_writes: dict[str, int] = {}


def write_generation(patient_id: str) -> int:
    """How many writes this process has committed for a patient: a read taken at generation g is stale
    once the generation moved on (another door wrote in between), whether or not the lock was busy."""
    with _locks_guard:
        return _writes.get(patient_id, 0)


def _wrote(patient_id: str) -> None:
    with _locks_guard:
        _writes[patient_id] = _writes.get(patient_id, 0) + 1


def _ledger_source(resource: Any, position: int) -> str:
    """The ledger's name for an input: ``Type/id/_history/v``, else the same fallbacks as build_twin."""
    if not isinstance(resource, dict):
        return f"input[{position}]"
    try:
        return SourceRef.of(resource).reference
    except ValueError:
        rtype = resource.get("resourceType")
        return f"{rtype if isinstance(rtype, str) and rtype else 'Unknown'}/?[{position}]"


def _created(response: dict[str, Any]) -> int:
    return sum(1 for e in response.get("entry", []) if str(e.get("response", {}).get("status", "")).startswith("201"))


def _target_reference(ref: str) -> bool:
    """``Type/id`` or ``Type/id/_history/v``: the only shapes a signed target may have."""
    parts = ref.split("/")
    return (len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history")) and all(parts) and parts[0][:1].isupper()


def state_summary(state: TwinState) -> dict[str, Any]:
    """The TwinState as JSON grouped by scale (every scale present), with its ledger."""
    scales = {scale.value: {name: [ev.to_json() for ev in series] for name, series in variables.items()}
              for scale, variables in state.by_scale().items()}
    return {"patient_id": state.patient_id,
            "reference_date": state.reference_date.isoformat() if state.reference_date else None,
            "scales": scales, "ledger": state.ledger.to_json()}


# ---------------------------------------------------------------------------------------------- watching

#: Every resource type whose change can change a twin (the doors that watch for changes use this).
WATCHED_TYPES: tuple[str, ...] = ("Patient", *RECORD_TYPES, *REFERENCED_TYPES)


def subscription_criteria(*, twin_codes_only: bool = False, filters: Iterable[str] = ()) -> list[str]:
    """One rest-hook criterion per type the twin reads; ``twin_codes_only`` narrows Observations to mapped
    codes, ``filters`` (``param=value``) are added to every criterion (e.g. ``_tag=…`` for one source)."""
    extra = [f for f in filters if f]
    out = []
    for rtype in WATCHED_TYPES:
        params = ["code=" + ",".join(observation_codes())] if twin_codes_only and rtype == "Observation" else []
        out.append(f"{rtype}?" + "&".join(params + extra))
    return out


def referring_searches(reference: str) -> list[str]:
    """Searches that find the record resources pointing at a referenced resource (``Medication/x``)."""
    rtype = reference.split("/", 1)[0]
    return [template.format(ref=reference) for template in REFERENCED_TYPES.get(rtype, ())]


def is_watched(resource: Any) -> bool:
    """True when a changed resource can change a twin: a type the twin reads, not written by fhirtwin."""
    return (isinstance(resource, dict) and resource.get("resourceType") in READ_TYPES
            and not is_fhirtwin_generated(resource))


def prefetch_templates() -> dict[str, str]:
    """CDS Hooks prefetch: the Patient and one search per record type (with its ``_include``)."""
    out = {"patient": "Patient/{{context.patientId}}"}
    for rtype, param in RECORD_TYPES.items():
        key = rtype[0].lower() + rtype[1:] + "s"
        includes = "".join(f"&_include={i}" for i in RECORD_INCLUDES if i.startswith(rtype + ":"))
        out[key] = f"{rtype}?{param}={{{{context.patientId}}}}&_count=1000{includes}"
    return out


# ---------------------------------------------------------------------------------------------- audit

_P = ParamSpec("_P")


def record_queries(patient_id: str, extra: Iterable[str] = ()) -> list[str]:
    """The requests of one patient's record read, as an AuditEvent names them (``_count``/``_include`` left out)."""
    return [f"Patient/{patient_id}", *(f"{rtype}?{param}={patient_id}" for rtype, param in RECORD_TYPES.items()),
            *extra]


def consent_query(patient_id: str) -> str:
    return f"Consent?patient=Patient/{patient_id}&status=active"


def _audited_commit(commit: Callable[Concatenate[Engine, _P], Commit]) -> Callable[Concatenate[Engine, _P], Commit]:
    """Audit :meth:`Engine.commit`: one AuditEvent per transaction, success or failure."""
    @functools.wraps(commit)
    def audited(self: Engine, *args: _P.args, **kwargs: _P.kwargs) -> Commit:
        write = args[0] if args else kwargs["write"]
        assert isinstance(write, PatientWrite)
        try:
            done = commit(self, *args, **kwargs)
        except EngineError as exc:
            self._audit_write(write.patient_id, write.bundle["entry"], error=exc)
            raise
        self._audit_write(write.patient_id, write.bundle["entry"], response=done.response)
        return done
    return audited


def _audited_retire(retire: Callable[Concatenate[Engine, _P], int]) -> Callable[Concatenate[Engine, _P], int]:
    """Audit :meth:`Engine.retire` when it superseded something (or failed trying)."""
    @functools.wraps(retire)
    def audited(self: Engine, *args: _P.args, **kwargs: _P.kwargs) -> int:
        patient_id = args[0] if args else kwargs["patient_id"]
        assert isinstance(patient_id, str)
        try:
            count = retire(self, *args, **kwargs)
        except EngineError as exc:
            self._audit_write(patient_id, [], error=exc)
            raise
        if count:
            self._audit_write(patient_id, [])
        return count
    return audited


def _audited_writes(write: Callable[Concatenate[Engine, _P], Iterator[WriteResult]]
                    ) -> Callable[Concatenate[Engine, _P], Iterator[WriteResult]]:
    """Audit :meth:`Engine.write`: one AuditEvent per patient whose transaction was sent."""
    @functools.wraps(write)
    def audited(self: Engine, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[WriteResult]:
        for result in write(self, *args, **kwargs):
            if result.bundle is not None and result.status in ("written", "unchanged", "failed"):
                entries = result.bundle["entry"]
                written = [str(e["request"]["url"]) for e in entries if e["request"]["method"] == "PUT"]
                written += [result.provenance] if result.provenance else []
                error = UpstreamError(result.message) if result.status == "failed" else None
                self._audit_write(result.patient_id, entries, written=written, error=error)
            yield result
    return audited


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    """One configured engine: a record source, a signing key and the ensemble settings.

    ``source`` is needed for reads and writes (a FhirClient for writes); ``signing_key`` only for
    :meth:`prepare` and beyond. ``strict`` ledgers and drops resources that fail R4 validation.
    """

    def __init__(self, source: Any = None, *, signing_key: SigningKey | None = None, draws: int = 1000,
                 horizon_years: float = 10.0, seed: int = 0, outcome: str = "total_cvd", strict: bool = False,
                 organization_id: str = DEFAULT_ORGANIZATION, audit: AuditTrail | None = None,
                 consent: ConsentPolicy | None = None, validate_writes: bool = False,
                 components: Iterable[str] | None = None) -> None:
        self.source = source
        self.signing_key = signing_key
        self.draws = draws
        self.horizon_years = horizon_years
        self.seed = seed
        self.outcome = outcome
        self.strict = strict
        self.organization_id = organization_id
        #: Audit hook (:mod:`fhirtwin.audit`): an AuditEvent for every patient record read and every write.
        self.audit = audit
        #: Consent policy (:mod:`fhirtwin.consent`): checked before any read of a patient's record.
        self.consent = consent
        #: Check every prepared resource against R4 before sending (a debugging aid, 17 ms per patient): the
        #: resources come from one builder whose output the tests validate, with the official HL7 validator too.
        self.validate_writes = validate_writes
        #: Optional model components on (``fhirtwin.sim.components``): governance defaults and the deployment's
        #: FHIRTWIN_COMPONENTS, read once here so every door of one engine uses the same set.
        self.components = enabled_components() if components is None else checked(components)
        #: The learned residual the deployment configured (``FHIRTWIN_HYBRID_ARTIFACT``; None when none or
        #: switched off with ``FHIRTWIN_HYBRID=off``): read once, a bad artifact is an error here, not per patient.
        self.learned_residual = configured_artifact()
        self._hapi: bool | None = None

    # -- read

    def read(self, patient_id: str, *, with_stored: bool = True) -> PatientRecord:
        """The record (and fhirtwin's stored results, in the same request when the source can).

        With a consent policy the patient's active Consents are searched first; a denial raises
        :class:`fhirtwin.consent.ConsentDenied` before anything else is read. Every read is audited.
        """
        if not isinstance(patient_id, str) or not patient_id or "," in patient_id or "/" in patient_id:
            raise BadRequest("invalid patient id")
        self.require_consent(patient_id)
        extra = stored_results_searches(patient_id) if with_stored else []
        try:
            resources = self._fetch_record(patient_id, extra)
        except EngineError as exc:
            self._audit_read(patient_id, extra, exc)
            raise
        self._audit_read(patient_id, extra)
        return self._consented(PatientRecord.split(patient_id, resources, stored_read=with_stored))

    def _consented(self, record: PatientRecord) -> PatientRecord:
        """The record marked with the purpose whose Consents were checked before it was read."""
        purpose = self.consent.purpose if self.consent is not None else None
        return dataclasses.replace(record, consented_for=purpose) if purpose else record

    def _fetch_record(self, patient_id: str, extra: list[str]) -> list[dict[str, Any]]:
        try:
            records: list[dict[str, Any]] = self._source().fetch_patient_record(
                patient_id, RECORD_TYPES, include=RECORD_INCLUDES, extra_searches=extra)
        except (fhir_errors.FhirNotFound, fhir_errors.FhirGone) as exc:
            raise PatientNotFound("Patient not found on the FHIR server", patient_id=patient_id) from exc
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "record read") from exc
        return records

    def read_many(self, patient_ids: Iterable[str], *, chunk_size: int = 20,
                  on_denied: Callable[[EngineError], None] | None = None) -> Iterator[PatientRecord]:
        """Records of many patients, ``chunk_size`` per request (stored results not read).

        With a consent policy each chunk's Consents are searched first and denied patients are not read:
        each denial goes to ``on_denied`` (without one, the first denial is raised). Every read is audited.
        """
        ids = list(patient_ids)
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            denials = self.consent_denials(chunk)
            for denial in denials.values():
                if on_denied is None:
                    raise denial
                on_denied(denial)
            chunk = [pid for pid in chunk if pid not in denials]
            if not chunk:
                continue
            try:
                records = self._source().fetch_patients_records(chunk, RECORD_TYPES, include=RECORD_INCLUDES)
            except fhir_errors.FhirError as exc:
                error = (PatientNotFound(str(exc)) if isinstance(exc, fhir_errors.FhirNotFound)
                         else upstream_error(exc, "record read"))
                for patient_id in chunk:
                    self._audit_read(patient_id, [], error)
                raise error from exc
            for patient_id, resources in records.items():
                self._audit_read(patient_id, [])
                yield self._consented(PatientRecord.split(patient_id, resources, stored_read=False))

    # -- consent and audit

    def consent_denials(self, patient_ids: Sequence[str]) -> dict[str, EngineError]:
        """The patients (of ``patient_ids``) whose active Consent denies this engine's purpose of use, each
        audited as a refused read; empty without a consent policy. Only the Consent search is sent."""
        if self.consent is None or not patient_ids:
            return {}
        source = self._source()
        if not hasattr(source, "search_all"):
            raise BadRequest("consent checks need a FHIR server, not an offline source")
        try:
            denials: dict[str, EngineError] = dict(self.consent.denials(source, patient_ids))
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "consent check") from exc
        for patient_id, denial in denials.items():
            if self.audit is not None:
                self.audit.patient_read(patient_id, queries=[consent_query(patient_id)], server=self._server(),
                                        error=denial)
        return denials

    def require_consent(self, patient_id: str) -> None:
        """Raise :class:`fhirtwin.consent.ConsentDenied` when the patient's Consent denies this use."""
        denial = self.consent_denials([patient_id]).get(patient_id)
        if denial is not None:
            raise denial

    def _server(self) -> str | None:
        base = getattr(self.source, "base_url", None)
        return base if isinstance(base, str) else None

    def _audit_read(self, patient_id: str, extra: Iterable[str], error: EngineError | None = None) -> None:
        if self.audit is not None:
            queries = [consent_query(patient_id)] if self.consent is not None else []
            self.audit.patient_read(patient_id, queries=queries + record_queries(patient_id, extra),
                                    server=self._server(), error=error)

    def _audit_write(self, patient_id: str, entries: Sequence[Mapping[str, Any]], *,
                     response: Mapping[str, Any] | None = None, written: Sequence[str] | None = None,
                     error: EngineError | None = None) -> None:
        if self.audit is not None:
            self.audit.patient_write(patient_id, entries=entries, response=response, server=self._server(),
                                     written=written, error=error)

    # -- twin

    def twin(self, record: PatientRecord, as_of: date | None = None) -> TwinState:
        """The TwinState of a record (strict mode: resources failing R4 validation are ledgered, not used)."""
        when = as_of or today()
        if not self.strict:
            return build_twin(record.patient_id, record.resources, when)
        accepted: list[Any] = []
        rejected: list[LedgerEntry] = []
        for i, resource in enumerate(flatten_resources(record.resources)):
            try:
                validate_resource(resource)
                SourceRef.of(resource)
            except ResourceValidationError as exc:
                rejected.append(LedgerEntry(_ledger_source(resource, i), LedgerKind.MALFORMED,
                                            f"failed R4 validation: {exc.summary}"))
            except ValueError as exc:
                rejected.append(LedgerEntry(_ledger_source(resource, i), LedgerKind.MALFORMED, str(exc)))
            else:
                accepted.append(resource)
        state = build_twin(record.patient_id, accepted, when)
        state.ledger.extend(rejected)
        return state

    # -- fit and plan

    def simulate(self, state: TwinState, *, scenario: str | None = None, horizon_years: float | None = None,
                 draws: int | None = None, stored: list[dict[str, Any]] | None = None) -> TwinRun:
        """Fit the mechanistic twin and rank interventions (``scenario`` restricts the plan to one)."""
        horizon = float(self.horizon_years if horizon_years is None else horizon_years)
        if not MIN_HORIZON_YEARS <= horizon <= MAX_HORIZON_YEARS:
            raise BadRequest(f"horizon must be between {MIN_HORIZON_YEARS:g} and {MAX_HORIZON_YEARS:g} years",
                             expression=["horizon"])
        birth = state.demographics.birth_date
        if birth is not None and state.reference_date is not None and state.reference_date < birth:
            raise BadRequest("the reference date is before the patient's birth date", expression=["as-of"])
        flags = medication_flags(medication_safety_inputs(state)) if state.reference_date is not None else ()
        decision = decide_scope(state)
        if not decision.in_scope:
            return TwinRun(state, None, None, f"out of scope: {CONCEPTS[decision.code]}", (), stored, decision, flags)
        try:
            model = self._model().fit(state)
        except InsufficientData as exc:
            return TwinRun(state, None, None, str(exc), tuple(exc.missing), stored, decision, flags)
        inputs = model.inputs_
        if inputs is not None and inputs.egfr_ml_min_1_73m2 < EGFR_KIDNEY_FAILURE:
            failure = ScopeDecision(KIDNEY_FAILURE, False, (f"eGFR below {EGFR_KIDNEY_FAILURE:g}",))
            return TwinRun(state, None, None, f"out of scope: {CONCEPTS[KIDNEY_FAILURE]}", (), stored, failure, flags)
        scenarios = self._scenarios(model, scenario)
        result = plan(model, outcome=self.outcome, horizon_years=horizon, draws=draws or self.draws, seed=self.seed,
                      scenarios=scenarios)
        return TwinRun(state, model, dataclasses.replace(result, scope=decision.code), None, (), stored, decision,
                       flags)

    def run(self, patient_id: str, *, record: PatientRecord | None = None, as_of: date | None = None,
            scenario: str | None = None, horizon_years: float | None = None, draws: int | None = None) -> TwinRun:
        """Read (unless ``record`` is given), build the twin and simulate one patient."""
        if record is not None and not any(isinstance(r, dict) and r.get("resourceType") == "Patient"
                                          for r in record.resources):
            raise BadRequest("the supplied record holds no Patient resource")
        if record is not None and self.consent is not None and record.consented_for != self.consent.purpose:
            self.require_consent(patient_id)  # a record read elsewhere: check before any write
        record = record if record is not None else self.read(patient_id)
        state = self.twin(record, as_of)
        return self.simulate(state, scenario=scenario, horizon_years=horizon_years, draws=draws,
                             stored=record.stored)

    def run_many(self, patient_ids: Iterable[str], *, as_of: date | None = None, draws: int | None = None,
                 chunk_size: int = 20, on_denied: Callable[[EngineError], None] | None = None) -> Iterator[TwinRun]:
        """Runs of many patients, reading ``chunk_size`` patients per request (``on_denied``: see read_many)."""
        for record in self.read_many(patient_ids, chunk_size=chunk_size, on_denied=on_denied):
            yield self.simulate(self.twin(record, as_of), draws=draws)

    def _scenarios(self, model: MechanisticTwin, scenario: str | None) -> list[Scenario] | None:
        """The planner's scenario list for a requested name (None = every eligible one).

        Accepts ``baseline``, a scenario name as the planner labels it (intervention labels joined by
        " + ", case-insensitive) or a fhirtwin intervention code. A known code the patient is not
        eligible for is insufficient data for that question (422); an unknown name is a bad request (400).
        """
        if scenario is None:
            return None
        wanted = scenario.strip()
        if wanted.lower() == "baseline":
            return []
        inputs = model.inputs_
        assert inputs is not None
        eligible = candidate_interventions(inputs).eligible
        by_label = {i.label.lower(): i for i in eligible}
        parts = [p.strip().lower() for p in wanted.split(":", 1)[-1].split(" + ")]
        if all(p in by_label for p in parts) and sum(by_label[p].kind == "statin" for p in parts) <= 1:
            chosen = tuple(by_label[p] for p in parts)
            return [Scenario(" + ".join(i.label for i in chosen), chosen)]
        if wanted in INTERVENTION_CODES:
            kind, intensity = INTERVENTION_CODES[wanted]
            for one in eligible:
                if one.kind == kind and (intensity is None or one.intensity == intensity):
                    return [Scenario(one.label, (one,))]
            raise InsufficientPatientData(f"scenario {wanted!r} is not eligible for this patient", missing=[])
        names = ", ".join(["baseline", *INTERVENTION_CODES, *(i.label for i in eligible)])
        raise BadRequest(f"unknown scenario {wanted!r}; known: {names} (or labels joined by ' + ')",
                         expression=["scenario"])

    # -- what-if

    def eligible(self, run: TwinRun) -> list[Intervention]:
        """The interventions this patient is eligible for (what-if choices), in the planner's order."""
        if run.model is None or run.model.inputs_ is None:
            return []
        return list(candidate_interventions(run.model.inputs_).eligible)

    def what_if(self, run: TwinRun, interventions: Sequence[Intervention]) -> WhatIf:
        """The forecast with ``interventions`` started now, paired with the run's baseline (same draws)."""
        base = run.require_plan().baseline
        if run.model is None:
            raise InsufficientPatientData("no fitted model", run.missing)
        if sum(1 for i in interventions if i.kind == "statin") > 1:
            raise BadRequest("choose at most one statin option", expression=["interventions"])
        if not interventions:
            forecast = base
        else:
            scenario = Scenario(" + ".join(i.label for i in interventions), tuple(interventions))
            forecast = run.model.simulate(scenario, base.horizon_years, paired_draws(base.draws), base.seed)
        arr = {}
        for outcome in base.cif:
            diff = paired_difference(base, forecast, outcome)
            arr[outcome] = {"median": float(np.quantile(diff, 0.5)), "p05": float(np.quantile(diff, 0.05)),
                            "p95": float(np.quantile(diff, 0.95))}
        return WhatIf(forecast, tuple(interventions), arr)

    def _model(self) -> MechanisticTwin:
        """A fresh model for one patient: the hybrid when a learned residual is configured, else the mechanistic
        twin; both with this engine's components."""
        if self.learned_residual is not None:
            return HybridTwin(artifact=self.learned_residual, enabled=True, components=self.components)
        return MechanisticTwin(components=self.components)

    def sequence(self, run: TwinRun, *, draws: int = 200, now: datetime | None = None
                 ) -> tuple[SequencePlan, dict[str, Any]]:
        """The optimal yearly treatment sequence of a planned run (exact dynamic programming on the engine's
        hazards) and its timed draft CarePlan (``scheduledTiming`` per step; nothing is written)."""
        result = run.require_plan()
        try:
            plan_ = sequence(run.state, draws=draws, seed=self.seed, horizon_years=int(round(result.horizon_years)),
                             components=self.components)
        except SequencingError as exc:
            raise BadRequest(str(exc)) from None
        reference = run.state.reference_date
        start = reference.date() if isinstance(reference, datetime) else reference
        care_plan = build_sequence_care_plan(  # authored by the model that made the sequence (the mechanistic twin)
            plan_, reference_date=start or datetime.now(UTC).date(), occurrence=now or datetime.now(UTC),
            device_reference=f"Device/{device_id(plan_.model, plan_.model_version)}")
        return plan_, care_plan

    def counterfactual(self, run: TwinRun, actions: Sequence[SetValue | Mapping[str, Any]], *,
                       scenario: str | None = None, horizon_years: float | None = None,
                       draws: int | None = None) -> Counterfactual:
        """This patient's forecast with and without ``actions`` on the same abducted draws (do() on the twin,
        :mod:`fhirtwin.causal.counterfactual`); nothing is written.

        ``actions``: :class:`SetValue` / :class:`Shift` objects, or mappings ``{"kind": "set" | "shift",
        "variable", "value", "start_years" (default 0), "end_years" (default None = open)}`` as a door receives
        them; windows are years relative to the run's reference date (negative = past). ``scenario`` adds
        treatments to both worlds (a name or code as in :meth:`simulate`). A bad action is :class:`BadRequest`;
        a run without a plan raises what :meth:`TwinRun.require_plan` raises. Runs with this engine's
        components and seed (the run's model is refitted when it was fitted with other components).
        """
        result = run.require_plan()
        if run.model is None:
            raise InsufficientPatientData("no fitted model", run.missing)
        horizon = float(result.horizon_years if horizon_years is None else horizon_years)
        if not MIN_HORIZON_YEARS <= horizon <= MAX_HORIZON_YEARS:
            raise BadRequest(f"horizon must be between {MIN_HORIZON_YEARS:g} and {MAX_HORIZON_YEARS:g} years",
                             expression=["horizon"])
        n_draws = self.draws if draws is None else draws
        if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
            raise BadRequest("draws must be a whole number of at least 1", expression=["draws"])
        if not actions:
            raise BadRequest("a counterfactual needs at least one action", expression=["actions"])
        settable = ", ".join(SETTABLE)
        parsed: list[SetValue] = []
        for i, action in enumerate(actions):
            where = [f"actions[{i}]"]
            if isinstance(action, SetValue):
                one = action
            elif isinstance(action, Mapping):
                kind, variable = action.get("kind"), action.get("variable")
                value: Any = action.get("value")
                start: Any = action.get("start_years", 0.0)
                end: Any = action.get("end_years")
                numbers = [value, start] + ([] if end is None else [end])
                if kind not in ("set", "shift"):
                    raise BadRequest(f"action kind must be 'set' or 'shift', not {kind!r}", expression=where)
                if not isinstance(variable, str):
                    raise BadRequest("an action needs a variable", expression=where)
                if any(isinstance(x, bool) or not isinstance(x, int | float) for x in numbers):
                    raise BadRequest(f"the value and window of {variable} must be numbers", expression=where)
                try:
                    one = (Shift if kind == "shift" else SetValue)(
                        variable, float(value), float(start), math.inf if end is None else float(end))
                except UnsupportedIntervention as exc:
                    raise BadRequest(str(exc), expression=where) from None
                except OverflowError:
                    raise BadRequest(f"the value and window of {variable} must be finite", expression=where) from None
            else:
                raise BadRequest("an action is a SetValue/Shift or a mapping", expression=where)
            if one.variable not in SETTABLE:
                raise BadRequest(f"do({one.variable}) is not supported; settable paths: {settable}", expression=where)
            parsed.append(one)
        model = run.model
        if frozenset(model.components) != frozenset(self.components):
            model = self._model().fit(run.state)
        chosen = self._scenarios(model, scenario)
        world = chosen[0] if chosen else BASELINE
        try:
            answer = twin_counterfactual(model, parsed, scenario=world, horizon_years=horizon, draws=n_draws,
                                         seed=self.seed)
        except UnsupportedIntervention as exc:
            raise BadRequest(str(exc), expression=["actions"]) from None
        notes = list(answer.notes)
        if world.interventions:
            notes.append(f"both worlds under the scenario {world.name!r}")
        if isinstance(model, HybridTwin) and model.active:
            notes.append("the learned residual moves biomarker trajectories only; risks are the mechanistic model's")
        return dataclasses.replace(answer, notes=tuple(notes))

    def draft_care_plan(self, run: TwinRun) -> dict[str, Any]:
        """The proposed CarePlan as a standalone resource (for a CDS suggestion; nothing is written)."""
        result = run.require_plan()
        forecast = result.baseline
        return build_draft_care_plan(result, run.state, occurrence=datetime.now(UTC),
                                     device_reference=f"Device/{device_id(forecast.model, forecast.model_version)}")

    # -- prepare and commit

    def prepare(self, run: TwinRun, *, include_device: bool = True, now: datetime | None = None) -> PatientWrite:
        """The validated transaction for one run; stored results are searched when the read did not bring them."""
        result = run.require_plan()
        stored = run.stored if run.stored is not None else self.stored_results(run.patient_id)
        key = self._key()
        base = getattr(self.source, "base_url", None)
        base_url = base if isinstance(base, str) else None
        write = build_patient_write(result, run.state, key=key, existing=stored, now=now,
                                    include_device=include_device, organization_id=self.organization_id,
                                    base_url=base_url, hapi=self.server_is_hapi(),
                                    policies=(graph_reference(),))
        if include_device:  # publish the verifying key with the Device that signs (an unchanged PUT is a no-op)
            device = self._key_device(key)
            write.bundle["entry"].insert(0, {"fullUrl": full_url("Device", device["id"], base_url),
                                             "resource": device,
                                             "request": {"method": "PUT", "url": f"Device/{device['id']}"}})
        if self.validate_writes:
            for entry in write.bundle["entry"]:
                validate_resource(entry["resource"])
                check_emittable(entry["resource"])
        return write

    def stored_results(self, patient_id: str) -> list[dict[str, Any]]:
        """fhirtwin's stored RiskAssessments, Goals and CarePlans of a patient (one batch request)."""
        client = self._client()
        entries = [{"request": {"method": "GET", "url": url}} for url in stored_results_searches(patient_id)]
        try:
            response = client.batch(entries)
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "search of stored results") from exc
        found: list[dict[str, Any]] = []
        for result in batch_results(response, entries):
            if not result.ok:
                raise UpstreamError(f"search of stored results failed with HTTP {result.status}",
                                    upstream_status=result.status)
            found += _all_pages(client, result.resource)
        return found

    @_audited_commit
    def commit(self, write: PatientWrite) -> Commit:
        """Send one prepared transaction and reinstate earlier results it made current again."""
        sent = self.transact(write.bundle, [write], "write transaction")
        response = sent.response
        locations = [str(e.get("response", {}).get("location", "")) for e in response.get("entry", [])]
        provenance = next((loc.split("/_history")[0] for loc in locations if loc.startswith("Provenance/")), None)
        commit = Commit(response, _created(response), provenance, confirmed=sent.confirmed)
        try:
            commit.reinstated = self._finish(write, response)
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "finishing the write") from exc
        return commit

    def transact(self, bundle: dict[str, Any], writes: Sequence[PatientWrite], during: str) -> Transacted:
        """Send a transaction; when its outcome is unknown (:func:`outcome_unknown`), look on the server.

        The transaction's content found on the server (by the deterministic identifiers, run tags and
        superseded tags) is a success: a committed write is never reported as failed. Otherwise the
        original failure is raised, typed (:class:`UpstreamError`).
        """
        client = self._client()
        try:
            return Transacted(client.transaction(bundle))
        except fhir_errors.FhirError as exc:
            if not outcome_unknown(exc):
                raise upstream_error(exc, during) from exc
            try:
                reads = confirmation_reads(bundle)
                found = confirmed_response(bundle, client.batch(reads),
                                           [q for write in writes for q in write.expect_created])
            except fhir_errors.FhirError:
                found = None
            if found is None:
                raise upstream_error(exc, f"{during} (not found committed on the server)") from exc
            return Transacted(found, confirmed=True)

    def _finish(self, write: PatientWrite, response: dict[str, Any]) -> list[str]:
        """After a committed transaction (``response`` answers ``write``'s entries, in order): count the write,
        version the Provenance targets where the server does not, make reinstated results current again."""
        _wrote(write.patient_id)
        self._version_targets(write, response)
        return self.reinstate(write.reinstate)

    def server_is_hapi(self) -> bool:
        """Whether the server's CapabilityStatement names HAPI FHIR (it then versions references itself)."""
        if self._hapi is None:
            capabilities = getattr(self.source, "capabilities", None)
            try:
                software = (capabilities() if callable(capabilities) else {}).get("software") or {}
            except fhir_errors.FhirError:
                software = {}
            self._hapi = "hapi" in str(software.get("name", "")).lower()
        return self._hapi

    def _version_targets(self, write: PatientWrite, response: dict[str, Any]) -> None:
        """On servers other than HAPI, PUT the new Provenance again with versioned target references."""
        if self.server_is_hapi():
            return
        update = versioned_provenance_update(write, response)
        if update is not None:
            self._client().update(update)

    @_audited_retire
    def retire(self, patient_id: str) -> int:
        """Supersede a patient's current results (the patient is now out of scope, or has left the population
        they were made for); returns how many.

        Nothing new is written: a stale primary-prevention number after, say, a myocardial infarction
        would be worse than none. Under the patient lock, from a fresh search of what is stored.
        """
        with patient_lock(patient_id):
            retirement = self.prepare_retirement(patient_id)
            if retirement is None:
                return 0
            self.transact(retirement.bundle, [retirement], "retiring a patient's results")
            _wrote(patient_id)
            return len(retirement.superseded)

    def prepare_retirement(self, patient_id: str, stored: list[dict[str, Any]] | None = None, *,
                           now: datetime | None = None) -> PatientWrite | None:
        """The signed transaction that supersedes the patient's current results (None: none is current);
        ``stored`` results are searched when not given."""
        stored = stored if stored is not None else self.stored_results(patient_id)
        if not any(key_of(r) and not is_superseded(r) for r in stored):
            return None
        key = self._key()
        base = getattr(self.source, "base_url", None)
        base_url = base if isinstance(base, str) else None
        retirement = build_retirement(stored, base_url, patient_id=patient_id, key=key,
                                      model=(MechanisticTwin.name, MechanisticTwin.version),
                                      organization_id=self.organization_id, now=now, hapi=self.server_is_hapi())
        if retirement is not None:
            device = self._key_device(key)
            retirement.bundle["entry"].insert(0, {"fullUrl": full_url("Device", device["id"], base_url),
                                                  "resource": device,
                                                  "request": {"method": "PUT", "url": f"Device/{device['id']}"}})
        return retirement

    def reinstate(self, references: Iterable[str]) -> list[str]:
        """Make earlier results current again (inputs went back to an earlier state): drop their tag.

        One ``$meta-delete`` per resource, after the transaction (HAPI refuses operations inside one).
        Safe to repeat, so it is retried like a read.
        """
        client = self._client()
        done = []
        for ref in references:
            rtype, rid = ref.split("/")
            client.operation("meta-delete", resource_type=rtype, resource_id=rid, retry_safe=True, parameters={
                "resourceType": "Parameters",
                "parameter": [{"name": "meta", "valueMeta": {"tag": [dict(SUPERSEDED_TAG)]}}]})
            done.append(ref)
        return done

    def simulate_patient(self, patient_id: str, *, write: bool, scenario: str | None = None,
                         horizon_years: float | None = None, record: PatientRecord | None = None,
                         as_of: date | None = None, include_device: bool = True) -> Simulation:
        """A front door's whole path: run, prepare and (``write``) commit, one patient at a time.

        Even ``write=False`` reads the stored results, so the bundle shows exactly what a write would
        supersede. A restricted ``scenario`` is what-if only: the CarePlan identifier does not encode the
        scenario set, so writing it would collide with the full plan (400).
        """
        if write and scenario is not None:
            raise BadRequest("a scenario restricts the plan and can only be simulated with write=false",
                             expression=["scenario"])
        started = time.monotonic()
        generation = write_generation(patient_id)
        run = self.run(patient_id, record=record, as_of=as_of, scenario=scenario, horizon_years=horizon_years)
        if write and run.scope is not None and not run.scope.in_scope:
            self.retire(run.patient_id)
        run.require_plan()
        lock = patient_lock(patient_id)
        lock.acquire()
        if write_generation(patient_id) != generation:
            run = dataclasses.replace(run, stored=None)  # another door wrote meanwhile: re-read what is stored
        try:
            prepared = self.prepare(run, include_device=include_device)
            simulation = Simulation(run, prepared)
            if write:
                simulation.commit = self.commit(prepared)
        finally:
            lock.release()
        simulation.duration_ms = int((time.monotonic() - started) * 1000)
        return simulation

    @_audited_writes
    def write(self, runs: Iterable[TwinRun], *, dry_run: bool = False, group: int = 1,
              now: datetime | None = None) -> Iterator[WriteResult]:
        """Prepare and send one transaction per patient (``group`` > 1: several patients per transaction).

        A patient without a plan is ``skipped``; a failing patient (or group) is ``failed`` with the
        reason and never stops the others. ``dry_run`` reads what exists but writes nothing. Results are
        yielded as their transaction completes (progress bars follow them).
        """
        client = self._client()
        self.server_is_hapi()  # once per engine, before any patient's request count starts
        pending: list[tuple[WriteResult, PatientWrite]] = []

        def flush() -> list[WriteResult]:
            if not pending:
                return []
            done = [r for r, _ in pending]
            writes = [w for _, w in pending]
            bundle = writes[0].bundle if len(writes) == 1 else merge_bundles(writes)
            before = client.request_count
            try:
                sent = self.transact(bundle, writes, "write transaction")
            except EngineError as exc:
                for result in done:
                    result.status, result.message = "failed", str(exc)
            else:
                response = sent.response
                for result, write in pending:
                    part = self._response_part(response, bundle, write)
                    mine = list(zip(write.bundle["entry"], batch_results(part, write.bundle["entry"]), strict=True))
                    result.created = sum(1 for _, o in mine if o.status == 201)
                    result.updated = sum(1 for e, o in mine if o.ok and e["request"]["method"] == "PUT"
                                         and e["resource"]["resourceType"] in RESULT_TYPES)
                    prov = [o for e, o in mine if e["resource"]["resourceType"] == "Provenance" and o.location]
                    result.provenance = prov[0].location.split("/_history")[0] if prov and prov[0].location else None
                    result.outputs = [_ref_key(o.location) for e, o in mine if o.location and e["request"]["method"]
                                      == "POST" and e["resource"]["resourceType"] in RESULT_TYPES]
                    written = result.created or result.updated or write.expect_created
                    result.status = "written" if written else "unchanged"
                    if sent.confirmed:
                        result.message = "the response was lost; the transaction was found committed on the server"
                    try:
                        self._finish(write, part)
                    except fhir_errors.FhirError as exc:
                        result.status, result.message = "failed", str(upstream_error(exc, "finishing the write"))
                    result.requests += (client.request_count - before) if len(pending) == 1 else 0
            pending.clear()
            return done

        for run in runs:
            result = WriteResult(run.patient_id, "skipped")
            if run.plan is None and run.scope is not None and not run.scope.in_scope and not dry_run:
                try:
                    result.updated = self.retire(run.patient_id)
                except EngineError as exc:
                    result.status, result.message = "failed", str(exc)
                    yield result
                    continue
            if run.plan is None:
                result.message = (f"no prediction: {run.error}" if run.scope is not None and not run.scope.in_scope
                                  else f"no prediction: missing {', '.join(run.missing) or 'required data'}")
                yield result
                continue
            before = client.request_count
            try:
                write = self.prepare(run, now=now)
            except (EngineError, ResourceValidationError, JwsError) as exc:
                result.status, result.message = "failed", str(exc)
                yield result
                continue
            result.requests = client.request_count - before
            result.bundle = write.bundle
            if dry_run:
                result.status = "dry-run"
                result.message = (f"would send {len(write.bundle['entry'])} entries; supersede "
                                  f"{len(write.superseded)}; reinstate {len(write.reinstate)}")
                yield result
                continue
            pending.append((result, write))
            if len(pending) >= max(1, group):
                yield from flush()
        yield from flush()

    @staticmethod
    def _response_part(response: dict[str, Any], bundle: dict[str, Any], write: PatientWrite) -> dict[str, Any]:
        """The entries of a (merged) transaction response that answer ``write``'s entries, in its order."""
        by_url = {e.get("fullUrl"): a for e, a in zip(bundle["entry"], response.get("entry", []), strict=False)}
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [by_url.get(e.get("fullUrl"), {}) for e in write.bundle["entry"]]}

    # -- registration and verification

    def registration(self) -> list[dict[str, Any]]:
        """What a server needs once before writes: conformance resources, Organization, Devices, the model
        cards (one Library per model version, PUT to an id made of model and version), the key."""
        from fhirtwin.model_card import model_card_libraries

        org = organization_resource(self.organization_id)
        devices = [device_resource(cls.name, cls.version, self.organization_id) for cls in registered_models()]
        out = [*conformance_resources(), org, *devices, *model_card_libraries()]
        if self.signing_key is not None:
            out.append(self._key_device(self.signing_key))
        return out

    def _key_device(self, key: SigningKey) -> dict[str, Any]:
        model = f"Device/{device_id(MechanisticTwin.name, MechanisticTwin.version)}"
        return key_device(key, model_device=model, organization=f"Organization/{self.organization_id}")

    def verify(self, provenance_ref: str, public_key: Any = None) -> VerifyReport:
        """Check a Provenance's JWS against its targets as they now stand on the server.

        Without ``public_key`` the key is the one the server publishes for the signature's ``kid``
        (see :mod:`fhirtwin.keys`); a kid nobody published is a failed verification, not a crash.
        """
        client = self._client()
        rtype, _, rid = provenance_ref.partition("/")
        if rtype != "Provenance" or not rid:
            raise BadRequest("expected Provenance/<id>")
        try:
            provenance = client.read("Provenance", rid.split("/_history")[0])
        except (fhir_errors.FhirNotFound, fhir_errors.FhirGone) as exc:
            raise PatientNotFound(f"{provenance_ref} not found") from exc
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "Provenance read") from exc
        return self._check_provenance(provenance_ref, provenance, public_key, {}, {})

    def _check_provenance(self, label: str, provenance: dict[str, Any], public_key: Any,
                          targets_by_ref: dict[str, dict[str, Any]], keys: dict[str, Any]) -> VerifyReport:
        """The signature check behind :meth:`verify`; ``targets_by_ref`` (``Type/id``: current resource) and
        ``keys`` (kid: published key) are caches a caller checking many Provenances shares."""
        client = self._client()
        raw_targets = provenance.get("target")
        targets_in: list[Any] = raw_targets if isinstance(raw_targets, list) else []
        refs = [str(t.get("reference", "")) for t in targets_in if isinstance(t, dict)]
        signatures = [s for s in provenance.get("signature") or [] if isinstance(s, dict)
                      and s.get("sigFormat") == "application/jose"]
        if not refs or not signatures or len(refs) != len(targets_in):
            return VerifyReport(label, False, "Provenance has no targets or no JWS signature", refs, [])
        if not all(_target_reference(ref) for ref in refs):
            return VerifyReport(label, False, "INVALID: a target is not a Type/id reference", refs, [])
        jws = str(signatures[0].get("data", ""))
        try:
            header = signature_header(jws)
            if not isinstance(header, dict):
                raise JwsError("the JWS header is not a JSON object")
            kid = str(header.get("kid") or "")
        except JwsError as exc:
            return VerifyReport(label, False, f"INVALID: {exc}", refs, [])
        if public_key is None:
            if kid not in keys:
                try:
                    keys[kid] = public_key_from_device(client.read("Device", key_device_id(kid)), kid)
                except (fhir_errors.FhirError, JwsError) as exc:
                    return VerifyReport(label, False, f"no published key for kid {kid or '(none)'}: "
                                        f"{type(exc).__name__} (run `fhirtwin register`, or pass --key)",
                                        refs, [], kid)
            public_key = keys[kid]
        targets: list[dict[str, Any]] = []
        changed: list[str] = []
        for ref in refs:
            parts = ref.split("/")
            current = targets_by_ref.get(_ref_key(ref))
            if current is None:
                try:
                    current = client.read(parts[0], parts[1])
                except fhir_errors.FhirError as exc:
                    return VerifyReport(label, False, f"target {ref} cannot be read: {type(exc).__name__}",
                                        refs, changed, kid)
                targets_by_ref[_ref_key(ref)] = current
            targets.append(current)
            if "_history" in parts and current.get("meta", {}).get("versionId") != parts[-1]:
                changed.append(f"{ref} -> version {current.get('meta', {}).get('versionId')}")
        try:
            header = verify_targets(jws, targets, refs, public_key)
        except JwsError as exc:
            return VerifyReport(label, False, f"INVALID: {exc} (a target was changed after signing, or "
                                "another key signed it)", refs, changed, kid)
        named = revision_keys(str((e.get("what") or {}).get("reference", "")) for e in provenance.get("entity") or []
                              if isinstance(e, dict) and e.get("role") == "revision")
        signed = header.get("revisions")
        signed_revisions = [str(ref) for ref in signed] if isinstance(signed, list) else None
        if signed_revisions is not None and signed_revisions != named:
            return VerifyReport(label, False, "INVALID: the Provenance's revision entities differ from the "
                                "signed list of superseded results", refs, changed, kid)
        if "recorded" in header and header["recorded"] != provenance.get("recorded"):
            return VerifyReport(label, False, "INVALID: Provenance.recorded differs from the signed time",
                                refs, changed, kid)
        policy = sorted(map(str, provenance.get("policy") or []))  # order carries no meaning in R4
        if "policy" in header and sorted(map(str, header["policy"])) != policy:
            return VerifyReport(label, False, "INVALID: Provenance.policy differs from the signed policies (model "
                                "card, causal graph)", refs, changed, kid)
        note = f"valid {header.get('alg')} signature over {len(refs)} target(s)"
        if signed_revisions is not None:
            note += f" and {len(named)} superseded result(s)"
        if "policy" not in header:
            note += "; its policy list is not signed (the signature predates signed policies)"
        if changed:
            note += "; signed content unchanged although newer versions exist (meta only)"
        return VerifyReport(label, True, note, refs, changed, kid,
                            revisions=signed_revisions,
                            recorded=str(header.get("recorded") or provenance.get("recorded") or ""))

    def verify_patient(self, patient_id: str, public_key: Any = None, *,
                       anchor: str | None = None) -> PatientVerifyReport:
        """Check that what is current for a patient is what signed Provenances say, not what tags say.

        Valid when every Provenance naming the patient's results verifies, every result tagged superseded
        is a signed revision of a valid Provenance, and the current (untagged) results are exactly the
        targets minus the revisions of the newest valid Provenance (by its signed ``recorded``).

        ``anchor``: a Provenance known from outside the server (the last one this machine wrote, from its
        run checkpoint). Signatures cannot prove that nothing newer was deleted; the anchor can: if it is
        gone or invalid, the patient's results were rolled back.
        """
        if not isinstance(patient_id, str) or not patient_id or "," in patient_id or "/" in patient_id:
            raise BadRequest("invalid patient id")
        stored = [r for r in self.stored_results(patient_id) if key_of(r)]
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in stored}
        current = sorted(ref for ref, r in by_ref.items() if not is_superseded(r))
        superseded = sorted(ref for ref, r in by_ref.items() if is_superseded(r))
        provenances = self._provenances_of(sorted(by_ref))
        keys: dict[str, Any] = {}
        reports = [self._check_provenance(f"Provenance/{p.get('id')}", p, public_key, dict(by_ref), keys)
                   for p in provenances]
        problems = [f"{r.provenance}: {r.message}" for r in reports if not r.valid]
        valid = [r for r in reports if r.valid]
        signed_revisions = {ref for r in valid for ref in r.revisions or []}
        unsigned = [ref for ref in superseded if ref not in signed_revisions]
        if unsigned:
            problems.append(f"tagged superseded without a signed Provenance naming it as a revision: "
                            f"{', '.join(unsigned)}")
        if valid:
            newest_at = max(_instant_value(r.recorded) for r in valid)
            newest = [r for r in valid if _instant_value(r.recorded) == newest_at]
            expected = sorted({_ref_key(t) for r in newest for t in r.targets}
                              - {ref for r in newest for ref in r.revisions or []})
            if current != expected:
                hidden = sorted(set(expected) - set(current))
                extra = sorted(set(current) - set(expected))
                problems.append("current results differ from the newest signed Provenance "
                                f"({', '.join(r.provenance for r in newest)}): "
                                + "; ".join(part for part in (
                                    f"signed current but tagged or missing: {', '.join(hidden)}" if hidden else "",
                                    f"current but not signed current: {', '.join(extra)}" if extra else "") if part))
        elif current:
            problems.append(f"no valid signed Provenance for the current results: {', '.join(current)}")
        if anchor is not None and anchor not in {r.provenance for r in valid}:
            problems.append(f"{anchor}, the last Provenance this machine wrote for the patient, is missing or "
                            "invalid: the results may have been rolled back")
        if problems:
            message = f"INVALID: {len(problems)} problem(s)"
        else:
            message = (f"valid: {len(current)} current and {len(superseded)} superseded result(s) as "
                       f"{len(valid)} signed Provenance(s) say")
        return PatientVerifyReport(patient_id, not problems, message, problems, current, reports)

    def _provenances_of(self, refs: Sequence[str], chunk: int = 40) -> list[dict[str, Any]]:
        """Every Provenance whose targets include one of ``refs`` (one batch of searches)."""
        if not refs:
            return []
        entries = [{"request": {"method": "GET", "url": f"Provenance?target={','.join(refs[i:i + chunk])}"
                                                        "&_count=500"}}
                   for i in range(0, len(refs), chunk)]
        try:
            response = self._client().batch(entries)
        except fhir_errors.FhirError as exc:
            raise upstream_error(exc, "Provenance search") from exc
        found: dict[str, dict[str, Any]] = {}
        for result in batch_results(response, entries):
            if not result.ok:
                raise UpstreamError(f"Provenance search failed with HTTP {result.status}",
                                    upstream_status=result.status)
            for resource in _all_pages(self._client(), result.resource):
                if isinstance(resource, dict) and resource.get("resourceType") == "Provenance":
                    found[str(resource.get("id"))] = resource
        return list(found.values())

    # -- internals

    def _source(self) -> Any:
        if self.source is None:
            raise BadRequest("this engine has no record source")
        return self.source

    def _client(self) -> Any:
        """The source as a FHIR client (writes and searches need one)."""
        source = self._source()
        if not hasattr(source, "transaction"):
            raise BadRequest("writing needs a FHIR server, not an offline source")
        return source

    def _key(self) -> SigningKey:
        if self.signing_key is None:
            raise BadRequest("no signing key configured for writes")
        return self.signing_key
