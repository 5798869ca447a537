"""Subscription webhook: the FHIR server tells fhirtwin that a patient's data changed; fhirtwin recomputes.

Why it looks like this:

* HAPI's rest-hook delivers either the resource (``PUT {endpoint}/{Type}/{id}``, with a payload) or an
  empty ``POST {endpoint}`` (no payload; the receiver re-queries). Both are answered 200 at once; the
  recompute and write-back run on the job queue's worker thread (:mod:`fhirtwin.service.jobs`).
* Only changes to types the twin reads count (``fhirtwin.engine.WATCHED_TYPES``: the Patient, the record
  types and referenced Medications); fhirtwin's own writes (tagged ``fhirtwin-generated`` or identified in
  ``https://fhirtwin.org/sid/prediction``) are ignored, so a write-back never triggers another one. A
  changed Medication is traced to the patients whose requests or statements refer to it.
* Several deliveries for one patient within ``window`` seconds become one recompute; a failing recompute
  is retried and then kept as a dead letter, shown (without PHI) at ``GET /hooks/fhir/status`` and
  replayable with ``POST /hooks/fhir/dead-letter/replay``.
* A delivery is answered 200 only once its task is committed to the service's store
  (:mod:`fhirtwin.service.store`); when the store cannot take it the answer is 503 and the FHIR server
  retries. Tasks, dead letters and the status counts outlive a crash; several processes may share the store.

Subscription administration (``fhirtwin subscribe``) is :mod:`fhirtwin.fhir.subscriptions`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhirtwin.engine import (
    WATCHED_TYPES,
    BadRequest,
    InsufficientPatientData,
    OutOfScope,
    PatientNotFound,
    is_watched,
    referring_searches,
)
from fhirtwin.fhir.client import patient_reference_id
from fhirtwin.service.jobs import Permanent, WebhookWorker
from fhirtwin.service.runtime import ServiceSettings, engine_for, ensure_json_logging, log_event, shared_client
from fhirtwin.service.security import STATUS_SCOPES, WRITE_SCOPES, AuthError
from fhirtwin.service.store import open_store

BASE = "/hooks/fhir"
FHIR_JSON = "application/fhir+json"
RECEIVED = "webhook_received"  # store counter scope of the delivery outcomes


def patient_of(resource: dict[str, Any]) -> str | None:
    """The Patient id a changed resource belongs to (``subject``/``patient``, or a Patient's own id)."""
    try:
        return patient_reference_id(resource)
    except (AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- service


class WebhookService:
    """Connects the worker to the engine and the FHIR server (recompute, re-query, deleted lookups)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        options = settings.webhook
        self.worker = WebhookWorker(
            {"patient": self.recompute, "ping": self.requery, "deleted": self.resolve_deleted,
             "referenced": self.resolve_referenced},
            store=self.store, window=options.window, max_wait=options.max_wait, max_attempts=options.max_attempts,
            backoff=options.backoff)
        self._watermark = datetime.now(UTC) - timedelta(seconds=30)
        self._seen_at_watermark: set[str] = set()

    def recompute(self, patient_id: str) -> tuple[str, list[str]]:
        """Recompute and write one patient; insufficient data or an unknown patient is an answer, not a failure."""
        try:
            simulation = engine_for(self.settings).simulate_patient(patient_id, write=True)
        except InsufficientPatientData:
            return "insufficient_data", []
        except OutOfScope:
            return "out_of_scope", []  # its earlier results were retired; nothing to retry
        except (PatientNotFound, BadRequest) as exc:
            raise Permanent(type(exc).__name__) from exc
        created = simulation.commit.created if simulation.commit else 0
        return ("written" if created else "unchanged"), []

    def requery(self, _: str) -> tuple[str, list[str]]:
        """Payload-less ping: find patients with watched resources changed since the last look."""
        client = shared_client(self.settings)
        since = self._watermark.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        newest = self._watermark
        seen_now: set[str] = set()
        patients: list[str] = []
        for rtype in WATCHED_TYPES:
            params = {"_lastUpdated": f"ge{since}", "_count": 200, "_sort": "_lastUpdated"}
            response = client.request("GET", rtype, params=params, headers={"Cache-Control": "no-cache"})
            for resource in client.iter_bundle_pages(response.json(), max_pages=50):
                meta = resource.get("meta", {})
                ref = f"{rtype}/{resource.get('id')}/{meta.get('versionId')}"
                updated = _parse_instant(meta.get("lastUpdated"))
                if ref in self._seen_at_watermark:
                    continue
                if updated is not None and updated >= newest:
                    if updated > newest:
                        newest, seen_now = updated, set()
                    seen_now.add(ref)
                if not is_watched(resource):
                    continue
                if rtype != "Patient" and patient_of(resource) is None:
                    self.worker.submit("referenced", f"{rtype}/{resource.get('id')}")
                    continue
                patient_id = patient_of(resource)
                if patient_id and patient_id not in patients:
                    patients.append(patient_id)
        if newest > self._watermark:
            self._watermark, self._seen_at_watermark = newest, seen_now
        else:
            self._seen_at_watermark |= seen_now
        return "requeried", patients

    def resolve_deleted(self, ref: str) -> tuple[str, list[str]]:
        """A deleted resource: its last version in the history names the patient to recompute."""
        client = shared_client(self.settings)
        if referring_searches(ref):  # a deleted Medication: whoever referred to it
            return self.resolve_referenced(ref)
        bundle = client.request("GET", f"{ref}/_history", params={"_count": 10}).json()
        for entry in bundle.get("entry", []):
            resource = entry.get("resource")
            if is_watched(resource):
                patient_id = patient_of(resource)
                if patient_id:
                    return "resolved", [patient_id]
        return "unattributed", []

    def resolve_referenced(self, ref: str) -> tuple[str, list[str]]:
        """A changed resource without a patient (a Medication): the patients whose records refer to it."""
        client = shared_client(self.settings)
        patients: list[str] = []
        for search in referring_searches(ref):
            rtype, _, query = search.partition("?")
            param, _, value = query.partition("=")
            for resource in client.search_all(rtype, {param: value, "_count": 200}, max_pages=50):
                patient_id = patient_of(resource)
                if patient_id and patient_id not in patients:
                    patients.append(patient_id)
        return ("resolved" if patients else "unattributed"), patients

    def accept_resource(self, resource: Any, *, path_type: str | None = None) -> str:
        """Classify one delivered resource and schedule its patient; returns what happened (for counts)."""
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return "invalid"
        if path_type and resource["resourceType"] != path_type:
            return "invalid"
        if resource["resourceType"] not in WATCHED_TYPES:
            return "ignored_type"
        if not is_watched(resource):
            return "ignored_own"
        patient_id = patient_of(resource)
        if not patient_id and referring_searches(f"{resource['resourceType']}/{resource.get('id')}"):
            self.worker.submit("referenced", f"{resource['resourceType']}/{resource.get('id')}")
            return "scheduled"
        if not patient_id:
            return "unattributed"
        self.worker.submit("patient", patient_id)
        return "scheduled"

    def received(self, outcome: str) -> None:
        """Count a delivery's outcome (persisted with the status page)."""
        self.store.count(RECEIVED, outcome)

    def status(self) -> dict[str, Any]:
        """Worker status plus delivery counts."""
        out = self.worker.status()
        out["received"] = self.store.counts(RECEIVED)
        return out


def _parse_instant(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_service_lock = threading.Lock()


def get_service(app: Any) -> WebhookService:
    """The app's WebhookService, created (and its worker started) on first use."""
    with _service_lock:
        service = getattr(app.state, "webhook", None)
        if service is None:
            service = WebhookService(app.state.settings)
            app.state.webhook = service
        service.worker.start()
        return service


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the worker with the server; drain it on shutdown."""
    ensure_json_logging()
    get_service(app)
    yield
    service = getattr(app.state, "webhook", None)
    if service is not None:
        drained = await run_in_threadpool(service.worker.shutdown, 30.0)
        tasks = service.store.task_counts()
        log_event("webhook_shutdown", drained=drained, pending=tasks["pending"], retrying=tasks["retrying"])


router = APIRouter(lifespan=lifespan)


def _ack(what: str, status: int = 200) -> JSONResponse:
    severity = "information" if status < 400 else "error"
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": "informational" if status < 400 else "invalid",
                       "diagnostics": what}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _refused(request: Request, *, operator: bool = False) -> JSONResponse | None:
    """None if the caller may use this door, else the 401/403 answer. Deliveries carry the Subscription's
    secret or a bearer token with write scopes; operators (status, replay) a bearer token."""
    from fhirtwin.service.operations import auth_error_response

    guard = request.app.state.guard
    try:
        if operator:
            guard.bearer(request.headers, WRITE_SCOPES if request.method == "POST" else STATUS_SCOPES)
        else:
            guard.webhook(request.headers)
    except AuthError as exc:
        log_event("webhook_refused", method=request.method, status=exc.status, error=exc.error)
        return auth_error_response(exc)
    return None


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ValueError


def _record(service: WebhookService, outcome: str, method: str, rtype: str | None) -> None:
    service.received(outcome)
    log_event("webhook_delivery", method=method, resource_type=rtype, outcome=outcome)


async def _stored(service: WebhookService, work: Callable[[], JSONResponse]) -> JSONResponse:
    """Run a delivery's bookkeeping in one store transaction, off the event loop; the answer is sent after
    the commit. A store that cannot take it (locked too long, disk full) is a 503: the server redelivers."""

    def in_transaction() -> JSONResponse:
        with service.store.transaction():
            return work()

    try:
        return await run_in_threadpool(in_transaction)
    except sqlite3.Error as exc:
        log_event("webhook_store_error", error=type(exc).__name__, level=40)
        return _ack("the event store is unavailable; deliver again later", 503)


@router.put(BASE + "/{resource_type}/{resource_id}")
@router.post(BASE + "/{resource_type}")
async def deliver_resource(request: Request, resource_type: str, resource_id: str | None = None) -> JSONResponse:
    """A delivery with payload (HAPI: ``PUT {endpoint}/{Type}/{id}``); answered at once, processed later."""
    if (refused := await run_in_threadpool(_refused, request)) is not None:  # a JWKS fetch may block
        return refused
    service = get_service(request.app)
    body = await _read_json(request)
    method = request.method

    def work() -> JSONResponse:
        if body is ValueError:
            _record(service, "invalid", method, resource_type)
            return _ack("body is not JSON", 400)
        if body is None:  # a payload-less delivery to a typed path: treat as a ping
            service.worker.submit("ping", "")
            _record(service, "ping", method, resource_type)
            return _ack("ping accepted")
        outcome = service.accept_resource(body, path_type=resource_type)
        _record(service, outcome, method, resource_type)
        if outcome == "invalid":
            return _ack("body is not a resource of the type in the path", 400)
        return _ack(outcome)

    return await _stored(service, work)


@router.delete(BASE + "/{resource_type}/{resource_id}")
async def deliver_delete(request: Request, resource_type: str, resource_id: str) -> JSONResponse:
    """A deletion: the patient is found from the resource's history on the worker thread."""
    if (refused := await run_in_threadpool(_refused, request)) is not None:  # a JWKS fetch may block
        return refused
    service = get_service(request.app)

    def work() -> JSONResponse:
        if resource_type not in WATCHED_TYPES or resource_type == "Patient":
            _record(service, "ignored_type", "DELETE", resource_type)
            return _ack("ignored")
        service.worker.submit("deleted", f"{resource_type}/{resource_id}")
        _record(service, "deleted", "DELETE", resource_type)
        return _ack("scheduled")

    return await _stored(service, work)


@router.post(BASE)
async def deliver_ping(request: Request) -> JSONResponse:
    """A payload-less notification (empty POST): re-query recently changed resources on the worker."""
    if (refused := await run_in_threadpool(_refused, request)) is not None:  # a JWKS fetch may block
        return refused
    service = get_service(request.app)
    body = await _read_json(request)

    def work() -> JSONResponse:
        if body is ValueError:
            _record(service, "invalid", "POST", None)
            return _ack("body is not JSON", 400)
        resources: list[Any] = []
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            entries = body.get("entry") or []
            if not isinstance(entries, list):
                _record(service, "invalid", "POST", "Bundle")
                return _ack("Bundle.entry must be an array", 400)
            resources = [e.get("resource") for e in entries if isinstance(e, dict)]
            resources = [r for r in resources if isinstance(r, dict) and r.get("resourceType") != "Parameters"]
        elif isinstance(body, dict):
            resources = [body]
        if not resources:
            service.worker.submit("ping", "")
            _record(service, "ping", "POST", None)
            return _ack("ping accepted")
        outcomes = [service.accept_resource(r) for r in resources]
        for outcome, resource in zip(outcomes, resources, strict=True):
            _record(service, outcome, "POST", resource.get("resourceType"))
        return _ack(", ".join(sorted(set(outcomes))))

    return await _stored(service, work)


@router.get(BASE + "/status")
def webhook_status(request: Request) -> Any:
    """Queue, counts, dead letters and recent errors, without PHI (an operator's bearer token)."""
    if (refused := _refused(request, operator=True)) is not None:
        return refused
    return get_service(request.app).status()


@router.post(BASE + "/dead-letter/replay")
def replay_dead_letters(request: Request) -> Any:
    """Requeue every dead letter (after the FHIR server is back); it writes, so it needs the write scopes."""
    if (refused := _refused(request, operator=True)) is not None:
        return refused
    return {"replayed": get_service(request.app).worker.replay_dead_letters()}
