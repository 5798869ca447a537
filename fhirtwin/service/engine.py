"""The one engine behind every front door: read → twin → simulate → (write) for one patient.

Why a shared module: ``$simulate``, the Subscription webhook, CDS Hooks and the SMART page must give the
same answer for the same record, use one FHIR connection pool per server, and never write the same
patient's results concurrently (two transactions superseding each other would collide on ``If-Match``).

Public API (used by every router; keep it small):

* :func:`simulate_patient` — run one patient; returns a :class:`SimulationResult` or raises an
  :class:`EngineError` subclass whose ``http_status`` and :meth:`EngineError.outcome` are ready for a
  FHIR response (400 bad request, 404 unknown patient, 422 insufficient data, 502/504 upstream).
* :func:`get_client` / :func:`get_signing_key` — the cached FhirClient and signing key of a settings.
* :func:`log_event` / :func:`patient_hash` — JSON-line logs without PHI (ids only as salted hashes).
* :func:`operation_outcome` — an OperationOutcome dict for an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from fhirtwin.fhir import errors as fhir_errors
from fhirtwin.pipeline import TwinRun

__all__ = [
    "BadRequest",
    "EngineError",
    "InsufficientPatientData",
    "PatientNotFound",
    "SimulationResult",
    "UpstreamError",
    "UpstreamTimeout",
    "get_client",
    "get_signing_key",
    "log_event",
    "operation_outcome",
    "patient_hash",
    "resolve_scenarios",
    "simulate_patient",
]

log = logging.getLogger("fhirtwin.service")

MIN_HORIZON_YEARS = 5.0  # the RiskAssessment reports the 5- and 10-year points; below 5 it would be empty
MAX_HORIZON_YEARS = 30.0  # OperationDefinition `simulate`: at most 30 years
INTERVENTION_CODES = {  # fhirtwin CodeSystem codes (CarePlan activities) -> (kind, statin intensity)
    "statin-high-intensity": ("statin", "high"),
    "statin-moderate-intensity": ("statin", "moderate"),
    "bp-lowering-agent": ("bp_lowering", None),
    "sglt2-inhibitor": ("sglt2i", None),
    "smoking-cessation": ("smoking_cessation", None),
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
    """A failure the caller can answer with ``http_status`` and :meth:`outcome` (no stack trace, no PHI)."""

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
    """The FHIR server has no such Patient (or it was deleted)."""

    http_status = 404
    issue_code = "not-found"


class InsufficientPatientData(EngineError):
    """The record lacks what the twin needs; ``missing`` names the variables (never values)."""

    http_status = 422
    issue_code = "incomplete"

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


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


def _upstream(exc: Exception, during: str) -> EngineError:
    """Map a transport error to an EngineError; the message names the step and status, not the URL."""
    if isinstance(exc, fhir_errors.FhirTimeout):
        return UpstreamTimeout(f"FHIR server timed out during {during}")
    if isinstance(exc, fhir_errors.FhirError):
        status = getattr(exc, "status", None)
        codes = ",".join(str(i.get("code", "?")) for i in getattr(exc, "issues", []))
        detail = f" (HTTP {status}{', issues ' + codes if codes else ''})" if status else ""
        return UpstreamError(f"FHIR server error during {during}: {type(exc).__name__}{detail}", upstream_status=status)
    return UpstreamError(f"FHIR server error during {during}: {type(exc).__name__}")


# ---------------------------------------------------------------------------------------------- logging


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the structured fields of the record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", record.getMessage()),
        }
        out.update(getattr(record, "fields", {}) or {})
        return json.dumps(out, separators=(",", ":"), default=str)


_logging_lock = threading.Lock()


def ensure_json_logging(level: int = logging.INFO) -> None:
    """Give the ``fhirtwin.service`` logger a JSON-lines stderr handler once (the server has no other)."""
    with _logging_lock:
        if any(isinstance(h.formatter, JsonLineFormatter) for h in log.handlers):
            return
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLineFormatter())
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


_SALT = secrets.token_bytes(16)


def patient_hash(patient_id: str) -> str:
    """Short salted hash of a patient id: correlates log lines of one process, reveals nothing."""
    return hashlib.blake2s(patient_id.encode("utf-8"), key=_SALT, digest_size=6).hexdigest()


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event. Callers pass only PHI-free fields (types, statuses, counts, durations)."""
    log.log(level, event, extra={"event": event, "fields": fields})


# ---------------------------------------------------------------------------------------------- caches

_cache_lock = threading.Lock()
_clients: dict[tuple[str, bool], Any] = {}
_keys: dict[str | None, Any] = {}
_patient_locks = [threading.Lock() for _ in range(64)]


def get_client(settings: Any) -> Any:
    """The shared FhirClient for ``settings.fhir_server`` (one connection pool per server and TLS mode)."""
    from fhirtwin.fhir.client import FhirClient

    cache_key = (settings.fhir_server.rstrip("/"), bool(settings.verify_tls))
    with _cache_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = FhirClient(cache_key[0], verify=cache_key[1])
            _clients[cache_key] = client
        return client


def get_signing_key(settings: Any) -> Any:
    """The Provenance signing key: ``settings.signing_key_file``, else the same key ``fhirtwin run`` uses."""
    from fhirtwin.writeback.jws import SigningKey, load_signing_key

    path = getattr(settings, "signing_key_file", None)
    with _cache_lock:
        key = _keys.get(path)
        if key is None:
            if path:
                with open(path, "rb") as handle:
                    key = SigningKey.from_pem(handle.read())
            else:
                from fhirtwin.sandbox.server import Sandbox

                key = load_signing_key(Sandbox.from_env().data_dir / "keys")
            _keys[path] = key
        return key


def patient_lock(patient_id: str) -> threading.Lock:
    """A lock per patient (striped): one write at a time for a patient, across all front doors."""
    digest = hashlib.blake2s(patient_id.encode("utf-8"), digest_size=2).digest()
    return _patient_locks[int.from_bytes(digest, "big") % len(_patient_locks)]


# ---------------------------------------------------------------------------------------------- result


@dataclass
class SimulationResult:
    """One patient's run: the TwinRun, the transaction that was (or would be) sent, and the response."""

    patient_id: str
    run: TwinRun
    bundle: dict[str, Any]
    written: bool
    response: dict[str, Any] | None = None
    superseded: list[str] = field(default_factory=list)
    reinstated: list[str] = field(default_factory=list)
    created: int = 0
    duration_ms: int = 0

    def resources(self, resource_type: str | None = None) -> list[dict[str, Any]]:
        """Resources fhirtwin builds for this patient (RiskAssessment, Goal, CarePlan, Provenance)."""
        out = [e["resource"] for e in self.bundle["entry"] if e["request"]["method"] == "POST"]
        return [r for r in out if resource_type is None or r["resourceType"] == resource_type]

    @property
    def risk_assessments(self) -> list[dict[str, Any]]:
        """One RiskAssessment per outcome."""
        return self.resources("RiskAssessment")

    @property
    def goals(self) -> list[dict[str, Any]]:
        """The LDL-C and SBP Goals."""
        return self.resources("Goal")

    @property
    def care_plan(self) -> dict[str, Any] | None:
        """The proposed CarePlan."""
        found = self.resources("CarePlan")
        return found[0] if found else None

    @property
    def provenance(self) -> dict[str, Any] | None:
        """The signed Provenance over the results."""
        found = self.resources("Provenance")
        return found[0] if found else None

    @property
    def plan(self) -> Any:
        """The ``fhirtwin.sim.planner.Plan`` (baseline forecast, ranked options, exclusions)."""
        return self.run.plan


# ---------------------------------------------------------------------------------------------- engine


def resolve_scenarios(model: Any, scenario: str | None) -> list[Any] | None:
    """The planner's scenario list for a requested scenario name (``None`` = every eligible one).

    Accepts ``baseline`` (no alternatives), a scenario name as the planner labels it (case-insensitive),
    or a fhirtwin intervention code (``statin-high-intensity`` …). A known code the patient is not
    eligible for is insufficient data for that question (422); an unknown name is a bad request (400).
    """
    from fhirtwin.sim.interventions import candidate_interventions, combinations

    if scenario is None:
        return None
    wanted = scenario.strip()
    if wanted.lower() == "baseline":
        return []
    options = combinations(candidate_interventions(model.inputs_).eligible)
    for option in options:
        if option.name.lower() == wanted.lower():
            return [option]
    if wanted in INTERVENTION_CODES:
        kind, intensity = INTERVENTION_CODES[wanted]
        for option in options:
            if len(option.interventions) == 1 and option.interventions[0].kind == kind and (
                    intensity is None or option.interventions[0].intensity == intensity):
                return [option]
        raise InsufficientPatientData(f"scenario {wanted!r} is not eligible for this patient", missing=[])
    names = ", ".join(["baseline", *INTERVENTION_CODES, *(o.name for o in options)])
    raise BadRequest(f"unknown scenario {wanted!r}; known: {names}", expression=["scenario"])


def _build_state(
    client: Any, patient_id: str, record: list[dict[str, Any]] | None, as_of: date | None
) -> tuple[Any, list[dict[str, Any]] | None]:
    """The TwinState, plus fhirtwin's stored results when they came with the record read (one request)."""
    from fhirtwin.adapters import build_twin
    from fhirtwin.pipeline import is_generated, read_patient, today

    existing: list[dict[str, Any]] | None = None
    if record is None:
        try:
            read = read_patient(client, patient_id)
        except fhir_errors.FhirNotFound as exc:
            raise PatientNotFound("Patient not found on the FHIR server") from exc
        except fhir_errors.FhirGone as exc:
            raise PatientNotFound("Patient was deleted on the FHIR server") from exc
        except fhir_errors.FhirError as exc:
            raise _upstream(exc, "record read") from exc
        record, existing = read.record, read.existing
    elif not any(r.get("resourceType") == "Patient" for r in record if isinstance(r, dict)):
        raise BadRequest("the supplied record holds no Patient resource")
    else:
        record = [r for r in record if not is_generated(r)]  # fhirtwin's outputs are never twin inputs
    return build_twin(patient_id, record, as_of or today()), existing


def _created(response: dict[str, Any]) -> int:
    return sum(1 for e in response.get("entry", []) if str(e.get("response", {}).get("status", "")).startswith("201"))


def simulate_patient(
    settings: Any,
    patient_id: str,
    *,
    write: bool,
    scenario: str | None = None,
    horizon_years: float | None = None,
    record: list[dict[str, Any]] | None = None,
    client: Any = None,
    as_of: date | None = None,
    include_device: bool = True,
) -> SimulationResult:
    """Read, build the twin, simulate and build (``write=False``) or commit (``write=True``) the results.

    ``record`` is an already-fetched record (e.g. CDS Hooks prefetch; must contain the Patient);
    ``client`` a FhirClient to use instead of the shared one (e.g. with a forwarded bearer token).
    Even ``write=False`` reads the patient's stored fhirtwin results so the bundle shows exactly what a
    write would supersede. A restricted ``scenario`` is what-if only: the CarePlan identifier does not
    encode the scenario set, so writing it would collide with the full plan (400).
    """
    from fhirtwin.pipeline import fetch_existing_results, prepare_write, reinstate_results
    from fhirtwin.sim.inputs import InsufficientData
    from fhirtwin.sim.model import MechanisticTwin
    from fhirtwin.sim.planner import plan

    if not isinstance(patient_id, str) or not patient_id or "," in patient_id or "/" in patient_id:
        raise BadRequest("invalid patient id")
    horizon = float(settings.horizon_years if horizon_years is None else horizon_years)
    if not MIN_HORIZON_YEARS <= horizon <= MAX_HORIZON_YEARS:
        raise BadRequest(f"horizon must be between {MIN_HORIZON_YEARS:g} and {MAX_HORIZON_YEARS:g} years",
                         expression=["horizon"])
    if write and scenario is not None:
        raise BadRequest("a scenario restricts the plan and can only be simulated with write=false",
                         expression=["scenario"])
    started = time.monotonic()
    client = client if client is not None else get_client(settings)
    state, existing = _build_state(client, patient_id, record, as_of)
    try:
        model = MechanisticTwin().fit(state)
    except InsufficientData as exc:
        raise InsufficientPatientData(
            "insufficient data for a prediction; missing: " + ", ".join(exc.missing), exc.missing) from exc
    scenarios = resolve_scenarios(model, scenario)
    result_plan = plan(model, outcome="total_cvd", horizon_years=horizon, draws=settings.draws, seed=0,
                       scenarios=scenarios)
    run = TwinRun(state, result_plan, None)
    key = get_signing_key(settings)
    lock = patient_lock(patient_id)
    if not lock.acquire(blocking=False):
        lock.acquire()
        existing = None  # another front door wrote this patient meanwhile: what we read may be stale
    try:
        if existing is None:
            try:
                existing = fetch_existing_results(client, patient_id)
            except (fhir_errors.FhirError, RuntimeError) as exc:
                raise _upstream(exc, "search of stored results") from exc
        prepared = prepare_write(run, key, existing=existing, include_device=include_device)
        result = SimulationResult(patient_id, run, prepared.bundle, written=False,
                                  superseded=list(prepared.superseded))
        if write:
            try:
                result.response = client.transaction(prepared.bundle)
            except fhir_errors.FhirError as exc:
                raise _upstream(exc, "write transaction") from exc
            result.written = True
            result.created = _created(result.response)
            try:
                result.reinstated = reinstate_results(client, prepared.reinstate)
            except fhir_errors.FhirError as exc:
                raise _upstream(exc, "reinstating earlier results") from exc
    finally:
        lock.release()
    result.duration_ms = int((time.monotonic() - started) * 1000)
    log_event("simulate", patient=patient_hash(patient_id), write=write, created=result.created,
              superseded=len(result.superseded), reinstated=len(result.reinstated),
              scenarios=len(result_plan.options), duration_ms=result.duration_ms)
    return result
