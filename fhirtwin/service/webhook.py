"""Subscription webhook: the FHIR server tells fhirtwin that a patient's data changed; fhirtwin recomputes.

Why it looks like this:

* HAPI's rest-hook delivers either the resource (``PUT {endpoint}/{Type}/{id}``, with a payload) or an
  empty ``POST {endpoint}`` (no payload; the receiver re-queries). Both are answered 200 at once; the
  recompute and write-back run on one background worker thread, never in the request.
* fhirtwin's own writes (RiskAssessment, CarePlan, Goal, Provenance, Device, Organization, or anything
  tagged ``fhirtwin-generated`` / identified in ``https://fhirtwin.org/sid/prediction``) are ignored, so a
  write-back never triggers another one. Writes are conditional creates, so an echo writes nothing anyway.
* Several deliveries for one patient within ``window`` seconds (a lab panel is many Observations) become
  one recompute; ``max_wait`` caps how long a busy patient can be postponed.
* A failing recompute (FHIR server down, timeout) is retried with exponential backoff up to
  ``max_attempts`` times and then kept in a dead-letter list, shown (without PHI) at
  ``GET /hooks/fhir/status`` and replayable with ``POST /hooks/fhir/dead-letter/replay``.
* Shutdown drains: whatever is pending is processed once more before the worker stops.

``ensure_subscriptions`` (used by ``fhirtwin subscribe``) creates the matching Subscriptions idempotently.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from fhirtwin.fhir.client import patient_reference_id
from fhirtwin.service.engine import (
    BadRequest,
    InsufficientPatientData,
    PatientNotFound,
    ensure_json_logging,
    get_client,
    log_event,
    patient_hash,
    simulate_patient,
)

BASE = "/hooks/fhir"
FHIR_JSON = "application/fhir+json"
GENERATED_TAG = ("https://fhirtwin.org/CodeSystem/fhirtwin", "fhirtwin-generated")
PREDICTION_ID_SYSTEM = "https://fhirtwin.org/sid/prediction"
#: Types fhirtwin writes (or manages): a delivery of one of these never triggers a recompute.
OWN_TYPES = frozenset({"RiskAssessment", "CarePlan", "Goal", "Provenance", "Device", "Organization", "Subscription"})
#: Types whose changes feed the twin; payload-less pings re-query these.
WATCHED_TYPES = ("Observation", "Condition", "MedicationRequest")
SUBSCRIPTION_TAG_SYSTEM = "https://fhirtwin.org/sid/subscription"


# ---------------------------------------------------------------------------------------------- filters


def is_fhirtwin_authored(resource: dict[str, Any]) -> bool:
    """True for resources fhirtwin wrote: its types, its generated tag, or its prediction identifier."""
    if resource.get("resourceType") in OWN_TYPES:
        return True
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    for tag in meta.get("tag", []) or []:
        if isinstance(tag, dict) and (tag.get("system"), tag.get("code")) == GENERATED_TAG:
            return True
    identifiers = resource.get("identifier", [])
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    return any(isinstance(i, dict) and i.get("system") == PREDICTION_ID_SYSTEM for i in identifiers or [])


def patient_of(resource: dict[str, Any]) -> str | None:
    """The Patient id a changed resource belongs to (``subject``/``patient``), if any."""
    try:
        return patient_reference_id(resource)
    except (AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- debounce


class Debouncer:
    """Per-key due times: each new event pushes the key ``window`` seconds later, but at most ``max_wait``
    after its first event. Pure (the caller passes ``now``), so it is tested with a fake clock."""

    def __init__(self, window: float = 2.0, max_wait: float = 10.0) -> None:
        self.window = window
        self.max_wait = max(max_wait, window)
        self._due: dict[Any, float] = {}
        self._first: dict[Any, float] = {}

    def add(self, key: Any, now: float, *, delay: float | None = None) -> bool:
        """Record an event for ``key``; True when the key was not already pending."""
        new = key not in self._due
        if new:
            self._first[key] = now
        due = now + (self.window if delay is None else delay)
        self._due[key] = min(due, self._first[key] + self.max_wait) if delay is None else due
        return new

    def pop_due(self, now: float, *, everything: bool = False) -> list[Any]:
        """Keys whose time has come (all of them when ``everything``), oldest due first; removed."""
        ready = sorted((d, i, k) for i, (k, d) in enumerate(self._due.items()) if everything or d <= now)
        for _, _, key in ready:
            del self._due[key]
            del self._first[key]
        return [k for _, _, k in ready]

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is pending."""
        return min(self._due.values(), default=None)

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due


# ---------------------------------------------------------------------------------------------- worker


class Permanent(Exception):
    """A task failure that retrying cannot fix (recorded, not retried)."""


@dataclass
class DeadLetter:
    """A task given up after its retries: kept (with the raw key, for replay) but shown without PHI."""

    key: tuple[str, str]
    attempts: int
    error: str
    first_failed: str
    last_failed: str

    def public(self) -> dict[str, Any]:
        """What ``/status`` shows: kind, salted hash of the key, attempts, error class and status."""
        return {"kind": self.key[0], "ref": patient_hash(self.key[1]), "attempts": self.attempts,
                "error": self.error, "first_failed": self.first_failed, "last_failed": self.last_failed}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _error_label(exc: BaseException) -> str:
    status = getattr(exc, "http_status", None) or getattr(exc, "status", None)
    upstream = getattr(exc, "upstream_status", None)
    label = type(exc).__name__
    if status:
        label += f" {status}"
    if upstream:
        label += f" (upstream {upstream})"
    return label


class WebhookWorker:
    """Debounced, retried background processing of change notifications.

    ``handlers`` maps a task kind (``patient``, ``ping``, ``deleted``) to a callable taking the task's
    value and returning a status string (``written``, ``unchanged`` …) plus, for ``ping``/``deleted``,
    follow-up patient ids: ``(status, [patient ids])``. Raising :class:`Permanent` records a failure
    without retrying; any other exception is retried after ``backoff * 2**(attempt-1)`` seconds.
    """

    def __init__(
        self,
        handlers: dict[str, Callable[[str], tuple[str, list[str]]]],
        *,
        window: float = 2.0,
        max_wait: float = 10.0,
        max_attempts: int = 4,
        backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        dead_letter_limit: int = 500,
    ) -> None:
        self.handlers = handlers
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.clock = clock
        self.dead_letter_limit = dead_letter_limit
        self.debouncer = Debouncer(window, max_wait)
        self.attempts: dict[tuple[str, str], int] = {}
        self.dead_letters: list[DeadLetter] = []
        self.counts: Counter[str] = Counter()
        self.last_errors: list[dict[str, str]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False

    # -- producers (request threads)

    def submit(self, kind: str, value: str) -> None:
        """Schedule a task (debounced); wakes the worker."""
        with self._cv:
            key = (kind, value)
            if key in self.attempts and key in self.debouncer:
                self.counts["merged"] += 1  # waiting for a retry: keep its backoff
            elif self.debouncer.add(key, self.clock()):
                self.counts[f"scheduled_{kind}"] += 1
            else:
                self.counts["merged"] += 1
            self._cv.notify_all()

    # -- processing

    def run_pending(self, *, everything: bool = False) -> int:
        """Process every due task now (all pending ones when ``everything``); returns how many ran."""
        with self._cv:
            keys = self.debouncer.pop_due(self.clock(), everything=everything)
            self._busy = bool(keys)
        try:
            for key in keys:
                self._process(key, final=everything and self._stopping)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
        return len(keys)

    def _process(self, key: tuple[str, str], *, final: bool) -> None:
        kind, value = key
        started = time.monotonic()
        try:
            status, follow_ups = self.handlers[kind](value)
        except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered, never lost
            self._failed(key, exc, permanent=isinstance(exc, Permanent) or final)
            return
        duration_ms = int((time.monotonic() - started) * 1000)
        with self._cv:
            self.attempts.pop(key, None)
            self.counts[f"done_{status}"] += 1
        for patient_id in follow_ups:
            self.submit("patient", patient_id)
        log_event("webhook_task", kind=kind, status=status, follow_ups=len(follow_ups), duration_ms=duration_ms)

    def _failed(self, key: tuple[str, str], exc: BaseException, *, permanent: bool) -> None:
        label = _error_label(exc)
        with self._cv:
            attempt = self.attempts.get(key, 0) + 1
            self.counts["failed_attempts"] += 1
            self.last_errors = [*self.last_errors[-9:], {"kind": key[0], "error": label, "at": _now_iso()}]
            if permanent or attempt >= self.max_attempts:
                self.attempts.pop(key, None)
                self.counts["dead_lettered"] += 1
                letter = next((d for d in self.dead_letters if d.key == key), None)
                if letter is None:
                    self.dead_letters.append(DeadLetter(key, attempt, label, _now_iso(), _now_iso()))
                    del self.dead_letters[: -self.dead_letter_limit]
                else:
                    letter.attempts += attempt
                    letter.error, letter.last_failed = label, _now_iso()
                outcome = "dead_letter"
            else:
                self.attempts[key] = attempt
                self.counts["retries"] += 1
                self.debouncer.add(key, self.clock(), delay=self.backoff * 2 ** (attempt - 1))
                outcome = "retry"
            self._cv.notify_all()
        log_event("webhook_task_failed", kind=key[0], error=label, attempt=attempt, outcome=outcome,
                  level=30)

    def replay_dead_letters(self) -> int:
        """Put every dead letter back on the queue (after the cause was fixed); returns how many."""
        with self._cv:
            letters, self.dead_letters = self.dead_letters, []
        for letter in letters:
            self.submit(*letter.key)
        return len(letters)

    # -- thread

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fhirtwin-webhook", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping:
                    due = self.debouncer.next_due()
                    wait = None if due is None else due - self.clock()
                    if wait is not None and wait <= 0:
                        break
                    self._cv.wait(timeout=wait)
                if self._stopping:
                    break
            self.run_pending()
        # drain: everything still pending runs once more (failures go to the dead-letter list)
        while len(self.debouncer):
            self.run_pending(everything=True)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop after draining the queue; True when the worker finished within ``timeout`` seconds."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            while len(self.debouncer):
                self.run_pending(everything=True)
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def status(self) -> dict[str, Any]:
        """Counts, queue length, dead letters and recent errors — no PHI (hashes and error classes only)."""
        with self._cv:
            return {
                "running": bool(self._thread and self._thread.is_alive()),
                "pending": len(self.debouncer),
                "processing": self._busy,
                "retrying": len(self.attempts),
                "counts": dict(sorted(self.counts.items())),
                "dead_letters": [d.public() for d in self.dead_letters],
                "last_errors": list(self.last_errors),
            }


# ---------------------------------------------------------------------------------------------- service


class WebhookService:
    """Connects the worker to the engine and the FHIR server (recompute, re-query, deleted lookups)."""

    def __init__(self, settings: Any, *, worker_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        extra = getattr(settings, "extra", {}) or {}
        options = {k: extra[k] for k in ("window", "max_wait", "max_attempts", "backoff") if k in extra}
        options.update(worker_options or {})
        self.worker = WebhookWorker(
            {"patient": self.recompute, "ping": self.requery, "deleted": self.resolve_deleted}, **options)
        self.received: Counter[str] = Counter()
        self._watermark = datetime.now(UTC) - timedelta(seconds=30)
        self._seen_at_watermark: set[str] = set()

    def recompute(self, patient_id: str) -> tuple[str, list[str]]:
        """Recompute and write one patient; insufficient data or an unknown patient is an answer, not a failure."""
        try:
            result = simulate_patient(self.settings, patient_id, write=True)
        except InsufficientPatientData:
            return "insufficient_data", []
        except (PatientNotFound, BadRequest) as exc:
            raise Permanent(type(exc).__name__) from exc
        return ("written" if result.created else "unchanged"), []

    def requery(self, _: str) -> tuple[str, list[str]]:
        """Payload-less ping: find patients with watched resources changed since the last look."""
        client = get_client(self.settings)
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
                if is_fhirtwin_authored(resource):
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
        client = get_client(self.settings)
        bundle = client.request("GET", f"{ref}/_history", params={"_count": 10}).json()
        for entry in bundle.get("entry", []):
            resource = entry.get("resource")
            if isinstance(resource, dict) and not is_fhirtwin_authored(resource):
                patient_id = patient_of(resource)
                if patient_id:
                    return "resolved", [patient_id]
        return "unattributed", []

    def accept_resource(self, resource: Any, *, path_type: str | None = None) -> str:
        """Classify one delivered resource and schedule its patient; returns what happened (for counts)."""
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return "invalid"
        if path_type and resource["resourceType"] != path_type:
            return "invalid"
        if is_fhirtwin_authored(resource):
            return "ignored_own"
        if resource["resourceType"] not in (*WATCHED_TYPES, "Patient"):
            return "ignored_type"
        patient_id = patient_of(resource)
        if not patient_id:
            return "unattributed"
        self.worker.submit("patient", patient_id)
        return "scheduled"

    def status(self) -> dict[str, Any]:
        """Worker status plus delivery counts."""
        out = self.worker.status()
        out["received"] = dict(sorted(self.received.items()))
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
async def lifespan(app: FastAPI):
    """Start the worker with the server; drain it on shutdown."""
    ensure_json_logging()
    get_service(app)
    yield
    service = getattr(app.state, "webhook", None)
    if service is not None:
        from starlette.concurrency import run_in_threadpool

        drained = await run_in_threadpool(service.worker.shutdown, 30.0)
        log_event("webhook_shutdown", drained=drained, pending=len(service.worker.debouncer),
                  dead_letters=len(service.worker.dead_letters))


router = APIRouter(lifespan=lifespan)


def _ack(what: str, status: int = 200) -> JSONResponse:
    severity = "information" if status < 400 else "error"
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": "informational" if status < 400 else "invalid",
                       "diagnostics": what}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _authorized(request: Request) -> bool:
    secret = (getattr(request.app.state.settings, "extra", {}) or {}).get("webhook_secret")
    if not secret:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ValueError


def _record(service: WebhookService, outcome: str, method: str, rtype: str | None) -> None:
    service.received[outcome] += 1
    log_event("webhook_delivery", method=method, resource_type=rtype, outcome=outcome)


@router.put(BASE + "/{resource_type}/{resource_id}")
@router.post(BASE + "/{resource_type}")
async def deliver_resource(request: Request, resource_type: str, resource_id: str | None = None) -> JSONResponse:
    """A delivery with payload (HAPI: ``PUT {endpoint}/{Type}/{id}``); answered at once, processed later."""
    if not _authorized(request):
        return _ack("unauthorized", 401)
    service = get_service(request.app)
    body = await _read_json(request)
    if body is ValueError:
        _record(service, "invalid", request.method, resource_type)
        return _ack("body is not JSON", 400)
    if body is None:  # a payload-less delivery to a typed path: treat as a ping
        service.worker.submit("ping", "")
        _record(service, "ping", request.method, resource_type)
        return _ack("ping accepted")
    outcome = service.accept_resource(body, path_type=resource_type)
    _record(service, outcome, request.method, resource_type)
    if outcome == "invalid":
        return _ack("body is not a resource of the type in the path", 400)
    return _ack(outcome)


@router.delete(BASE + "/{resource_type}/{resource_id}")
async def deliver_delete(request: Request, resource_type: str, resource_id: str) -> JSONResponse:
    """A deletion: the patient is found from the resource's history on the worker thread."""
    if not _authorized(request):
        return _ack("unauthorized", 401)
    service = get_service(request.app)
    if resource_type in OWN_TYPES or resource_type not in WATCHED_TYPES:
        _record(service, "ignored_type", "DELETE", resource_type)
        return _ack("ignored")
    service.worker.submit("deleted", f"{resource_type}/{resource_id}")
    _record(service, "deleted", "DELETE", resource_type)
    return _ack("scheduled")


@router.post(BASE)
async def deliver_ping(request: Request) -> JSONResponse:
    """A payload-less notification (empty POST): re-query recently changed resources on the worker."""
    if not _authorized(request):
        return _ack("unauthorized", 401)
    service = get_service(request.app)
    body = await _read_json(request)
    if body is ValueError:
        _record(service, "invalid", "POST", None)
        return _ack("body is not JSON", 400)
    resources: list[Any] = []
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        resources = [e.get("resource") for e in body.get("entry", []) or [] if isinstance(e, dict)]
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


@router.get(BASE + "/status")
def webhook_status(request: Request) -> dict[str, Any]:
    """Queue, counts, dead letters and recent errors, without PHI."""
    return get_service(request.app).status()


@router.post(BASE + "/dead-letter/replay")
def replay_dead_letters(request: Request) -> Any:
    """Requeue every dead letter (after the FHIR server is back)."""
    if not _authorized(request):
        return _ack("unauthorized", 401)
    return {"replayed": get_service(request.app).worker.replay_dead_letters()}


# ---------------------------------------------------------------------------------------------- subscribe


def twin_observation_codes() -> list[str]:
    """Every Observation code the twin reads (adapter code tables, genomics included), without system.

    Codes only, because the adapters match codes across system spellings (http/https, case); a bare
    token matches any system, and LOINC codes do not collide with the few fhirtwin codes.
    """
    import csv
    from importlib import resources

    data = resources.files("fhirtwin.adapters").joinpath("data")
    text = data.joinpath("observation_codes.csv").read_text("utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    out: list[str] = []
    for row in rows:
        if (row.get("code") or "").strip() and (row.get("handler") or "").strip() != "exclude":
            out.append(row["code"].strip())
    genomics = json.loads(data.joinpath("genomics.json").read_text("utf-8"))
    for group, items in genomics.get("codes", {}).items():
        if group != "genomic_report":
            out += [item.split("|", 1)[-1] for item in items]
    return list(dict.fromkeys(out))


def subscription_criteria(twin_codes_only: bool = False, filters: Iterable[str] = ()) -> list[str]:
    """The criteria fhirtwin subscribes to: Observations (genomics 69548-6 included), Conditions, MedicationRequests.

    ``filters`` (``param=value``) are added to every criterion, e.g. ``_tag=…`` to limit to one source.
    """
    extra = [f for f in filters if f]
    observation = ["code=" + ",".join(twin_observation_codes())] if twin_codes_only else []
    return [f"{rtype}?" + "&".join(params + extra)
            for rtype, params in (("Observation", observation), ("Condition", []), ("MedicationRequest", []))]


def _subscription_key(criteria: str, endpoint: str, payload: bool) -> str:
    text = "\n".join((criteria, endpoint, "payload" if payload else "empty"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def subscription_resource(criteria: str, endpoint: str, *, payload: bool, headers: Iterable[str] = ()) -> dict:
    """One R4 rest-hook Subscription, tagged with its stable key (R4 Subscription has no identifier)."""
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload:
        channel["payload"] = FHIR_JSON
    if headers:
        channel["header"] = list(headers)
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": SUBSCRIPTION_TAG_SYSTEM, "code": _subscription_key(criteria, endpoint, payload)},
                         {"system": GENERATED_TAG[0], "code": GENERATED_TAG[1]}]},
        "status": "requested",
        "reason": "fhirtwin recomputes a patient's twin when data it reads changes",
        "criteria": criteria,
        "channel": channel,
    }


def _fhirtwin_subscriptions(client: Any) -> list[dict[str, Any]]:
    """fhirtwin's Subscriptions (generated tag plus a key tag), bypassing HAPI's search cache."""
    params = {"_tag": "|".join(GENERATED_TAG), "_count": 200}
    response = client.request("GET", "Subscription", params=params, headers={"Cache-Control": "no-cache"})
    return [r for r in client.iter_bundle_pages(response.json(), max_pages=20)
            if r.get("resourceType") == "Subscription"
            and any(t.get("system") == SUBSCRIPTION_TAG_SYSTEM for t in r.get("meta", {}).get("tag", []))]


@dataclass
class SubscriptionReport:
    """What ``ensure_subscriptions`` did: ids by action."""

    ids: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    turned_off: list[str] = field(default_factory=list)


def ensure_subscriptions(
    client: Any, endpoint: str, *, payload: bool = True, twin_codes_only: bool = False, headers: Iterable[str] = (),
    filters: Iterable[str] = (),
) -> SubscriptionReport:
    """Create or reactivate fhirtwin's Subscriptions for ``endpoint`` (idempotent); turn off stale ones.

    Each wanted Subscription is found by its key tag (criteria, endpoint, payload mode); a missing one is a
    conditional create on that tag, an ``off``/``error`` one or one with other headers is set back to
    ``requested``. fhirtwin Subscriptions to the same endpoint that are no longer wanted (e.g. the other
    payload mode) are set ``off`` so the endpoint is not notified twice.
    """
    headers = list(headers)
    report = SubscriptionReport()
    existing = _fhirtwin_subscriptions(client)
    wanted_keys: set[str] = set()
    for criteria in subscription_criteria(twin_codes_only, filters):
        wanted = subscription_resource(criteria, endpoint, payload=payload, headers=headers)
        key = wanted["meta"]["tag"][0]["code"]
        wanted_keys.add(key)
        found = next((s for s in existing if any(t.get("code") == key for t in s.get("meta", {}).get("tag", []))),
                     None)
        if found is None:
            stored = client.create(wanted, if_none_exist=f"_tag={SUBSCRIPTION_TAG_SYSTEM}|{key}")
            report.created.append(stored["id"])
        elif found.get("status") in ("off", "error") or found.get("channel", {}).get("header", []) != headers:
            stored = client.update({**wanted, "id": found["id"]})
            report.updated.append(stored["id"])
        else:
            stored = found
            report.unchanged.append(found["id"])
        report.ids.append(stored["id"])
    for sub in existing:
        if sub.get("channel", {}).get("endpoint") != endpoint or sub.get("status") == "off":
            continue
        if not any(t.get("code") in wanted_keys for t in sub.get("meta", {}).get("tag", [])):
            client.update({**sub, "status": "off"})
            report.turned_off.append(sub["id"])
    return report


def disable_subscriptions(client: Any, endpoint: str) -> list[str]:
    """Set every fhirtwin Subscription to ``endpoint`` to ``off``; returns their ids."""
    ids = []
    for sub in _fhirtwin_subscriptions(client):
        if sub.get("channel", {}).get("endpoint") == endpoint and sub.get("status") != "off":
            client.update({**sub, "status": "off"})
            ids.append(sub["id"])
    return ids


def wait_active(client: Any, ids: Iterable[str], *, timeout: float = 60.0, interval: float = 1.0,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                ) -> dict[str, str]:
    """Poll the Subscriptions until all are ``active`` (HAPI activates asynchronously) or ``timeout`` passes."""
    pending = list(ids)
    status: dict[str, str] = {}
    deadline = clock() + timeout
    while True:
        for sid in pending:
            status[sid] = str(client.read("Subscription", sid).get("status"))
        pending = [s for s in pending if status[s] != "active"]
        if not pending or clock() >= deadline or any(status[s] == "error" for s in pending):
            return status
        sleep(interval)
