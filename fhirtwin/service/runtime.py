"""What every door of the web service shares: its settings, the engine they call, and PHI-free logs.

Why here and not in the doors: one FHIR connection pool per server, one signing key per deployment
(from :mod:`fhirtwin.keys`, never from the sandbox) and one log format, whichever door a request uses.
The work itself is :class:`fhirtwin.engine.Engine`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhirtwin.audit import AuditTrail, Caller, OutboxSink
from fhirtwin.consent import ConsentPolicy
from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.keys import KeyPolicyError, SigningKey, signing_key_for
from fhirtwin.service.security import AuthSettings, Principal

log = logging.getLogger("fhirtwin.service")


@dataclass(frozen=True)
class WebhookOptions:
    """Debounce and retry of Subscription deliveries (seconds; see ``fhirtwin.service.jobs``)."""

    window: float = 2.0
    max_wait: float = 10.0
    max_attempts: int = 4
    backoff: float = 1.0


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service finds its FHIR server, how it presents itself and who may use it."""

    fhir_server: str
    public_url: str = "http://127.0.0.1:8765"
    verify_tls: bool = True
    draws: int = 1000
    horizon_years: float = 10.0
    signing_key_file: str | None = None
    #: SMART: the client id registered with the EHR, extra FHIR bases allowed as ``iss``, CSP frame-ancestors.
    smart_client_id: str = "fhirtwin"
    smart_issuers: tuple[str, ...] = ()
    frame_ancestors: str = "'self'"
    webhook: WebhookOptions = field(default_factory=WebhookOptions)
    #: Who may call which door: the token issuer and its JWKS, CDS clients, allow-lists, the webhook secret.
    auth: AuthSettings = field(default_factory=AuthSettings)
    #: Development only: every door answers without credentials (``fhirtwin serve --dev-no-auth``, loopback only).
    dev_no_auth: bool = False
    #: The embedded SQLite store (webhook queue, dead letters, sessions, feedback, replay cache, audit outbox);
    #: None: ``$FHIRTWIN_STATE_DIR/service.sqlite3`` (default ``~/.local/state/fhirtwin``).
    store_path: str | None = None


# ---------------------------------------------------------------------------------------------- engine

_cache_lock = threading.Lock()
_clients: dict[tuple[str, bool], FhirClient] = {}
_keys: dict[tuple[str | None, str], SigningKey] = {}


def shared_client(settings: ServiceSettings) -> FhirClient:
    """The FhirClient for ``settings.fhir_server`` (one connection pool per server and TLS mode)."""
    cache_key = (settings.fhir_server.rstrip("/"), bool(settings.verify_tls))
    with _cache_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = FhirClient(cache_key[0], verify=cache_key[1])
        return client


def signing_key(settings: ServiceSettings, server: str | None = None) -> SigningKey:
    """The Provenance key for writes to ``server`` (default the service's FHIR server):
    ``settings.signing_key_file`` for every server, else the key policy for that server (a SMART launch
    from another issuer never borrows the development key of a loopback ``fhir_server``)."""
    server = server or settings.fhir_server
    cache_key = (settings.signing_key_file, server if not settings.signing_key_file else "")
    with _cache_lock:
        key = _keys.get(cache_key)
        if key is None:
            if settings.signing_key_file:
                with open(settings.signing_key_file, "rb") as handle:
                    pem = handle.read()
                try:
                    key = SigningKey.from_pem(pem)
                except (ValueError, TypeError) as exc:
                    raise KeyPolicyError(f"{settings.signing_key_file} is not a PEM private key") from exc
            else:
                key = signing_key_for(server)
            _keys[cache_key] = key
        return key


#: The purpose of use of every door: predictions for the care of the patient (v3-ActReason TREAT).
SERVICE_PURPOSE = "TREAT"
def audit_trail(settings: ServiceSettings) -> AuditTrail:
    """The deployment's audit trail: BALP AuditEvents into the store's outbox (one Store per file, see
    :func:`fhirtwin.service.store.open_store`), flushed to the FHIR server by :class:`AuditFlusher`."""
    from fhirtwin.service.store import open_store

    return AuditTrail(OutboxSink(open_store(settings)), purpose=SERVICE_PURPOSE, site=settings.public_url)


def engine_for(settings: ServiceSettings, *, client: Any = None, draws: int | None = None,
               signed: bool = True, caller: Caller | None = None) -> Engine:
    """The engine a door uses: the shared client (or ``client``, e.g. with a user's token), the key for the
    server that client writes to (``signed=False``: read-only, no key needed), the ensemble settings, and
    the deployment's consent policy and audit trail for ``caller`` (default: the service itself)."""
    source = client if client is not None else shared_client(settings)
    server = getattr(source, "base_url", None)
    key = signing_key(settings, server if isinstance(server, str) else None) if signed else None
    return Engine(source, signing_key=key, draws=draws or settings.draws, horizon_years=settings.horizon_years,
                  audit=audit_trail(settings).for_caller(caller or Caller("fhirtwin")),
                  consent=ConsentPolicy(SERVICE_PURPOSE))


def caller_of(principal: Principal, network: str | None = None) -> Caller:
    """The audit agent of an authenticated caller."""
    return Caller(client_id=principal.client, user=principal.user, network=network)


class AuditFlusher:
    """Sends the outbox's AuditEvents to the FHIR server every ``interval`` seconds (and once at stop), on
    its own thread: an audited request never waits for the audit repository, and nothing is lost if the
    server is down (the outbox keeps the events until they are accepted)."""

    def __init__(self, settings: ServiceSettings, interval: float = 5.0) -> None:
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def flush(self) -> None:
        """One flush; failures are logged (without PHI) and retried at the next tick."""
        sink = audit_trail(self.settings).sink
        if not isinstance(sink, OutboxSink):
            return
        try:
            report = sink.flush(shared_client(self.settings), limit=100)
        except Exception as exc:  # noqa: BLE001 - the next tick retries; the events stay in the outbox
            log_event("audit_flush_failed", level=logging.WARNING, error=type(exc).__name__)
            return
        if report.sent or report.failed:
            log_event("audit_flush", sent=report.sent, failed=report.failed)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
        self.flush()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="fhirtwin-audit", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after a last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


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
