"""The job queue behind the Subscription webhook: debounced per key, retried, dead-lettered, drained, durable.

Why separate from the HTTP handlers: the queue's rules (a lab panel of many Observations is one
recompute; a failing recompute is retried with backoff, then kept as a dead letter; shutdown drains) are
tested with a fake clock and no web server, and they know nothing about FHIR.

Why durable: the queue lives in the service's SQLite store (:mod:`fhirtwin.service.store`). ``submit``
returns only once the task is committed, so a delivery answered 200 survives a crash (even SIGKILL inside
the debounce window); a restarted process, or another one sharing the store, claims it. Tasks are leased
while they run, so processes sharing a store never run one task twice at once.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fhirtwin.service.runtime import log_event
from fhirtwin.service.store import DEFAULT_LEASE_S, DeadLetter, Store, Task, TaskKey

# ---------------------------------------------------------------------------------------------- debounce


class Debouncer:
    """The debounce rule in memory (the store's ``put_task`` applies the same rule to stored tasks).

    Per-key due times: each new event pushes the key ``window`` seconds later, but at most ``max_wait``
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

__all__ = ["DeadLetter", "Debouncer", "Permanent", "WebhookWorker"]

SCOPE = "webhook"
POLL_S = 1.0  # how often an idle worker looks for tasks another process stored or a dead process left


class Permanent(Exception):
    """A task failure that retrying cannot fix (recorded, not retried)."""


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
    """Debounced, retried, durable background processing of change notifications.

    ``handlers`` maps a task kind (``patient``, ``ping``, ``deleted``) to a callable taking the task's
    value and returning a status string (``written``, ``unchanged`` …) plus, for ``ping``/``deleted``,
    follow-up patient ids: ``(status, [patient ids])``. Raising :class:`Permanent` records a failure
    without retrying; any other exception is retried after ``backoff * 2**(attempt-1)`` seconds.

    Tasks, dead letters, counts and recent errors are kept in ``store``. ``clock`` gives the times stored
    with the tasks: wall-clock seconds by default (processes sharing a store compare them); tests pass a fake.
    """

    def __init__(
        self,
        handlers: dict[str, Callable[[str], tuple[str, list[str]]]],
        *,
        store: Store,
        window: float = 2.0,
        max_wait: float = 10.0,
        max_attempts: int = 4,
        backoff: float = 1.0,
        clock: Callable[[], float] = time.time,
        dead_letter_limit: int = 500,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.handlers = handlers
        self.store = store
        self.window = window
        self.max_wait = max(max_wait, window)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.clock = clock
        self.dead_letter_limit = dead_letter_limit
        self.lease_s = lease_s
        self.worker_id = secrets.token_hex(8)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False

    # -- producers (request threads)

    def submit(self, kind: str, value: str) -> None:
        """Store a task (debounced) and wake the worker; returns once the task is committed.

        Raises ``sqlite3.Error`` when the store cannot take it: the caller must not acknowledge the event."""
        with self.store.transaction():
            new = self.store.put_task((kind, value), now=self.clock(), window=self.window, max_wait=self.max_wait)
            self.store.count(SCOPE, f"scheduled_{kind}" if new else "merged")
        self._wake()

    # -- processing

    def run_pending(self, *, everything: bool = False) -> int:
        """Process the due tasks now (every unleased one when ``everything``), each at most once; returns how
        many ran. Tasks are claimed one at a time, so a lease only covers the task being run."""
        ran: set[TaskKey] = set()
        with self._cv:
            self._busy = True
        try:
            while True:
                claimed = self.store.claim_due(self.clock(), self.worker_id, self.lease_s, limit=1,
                                               everything=everything, exclude=ran)
                if not claimed:
                    return len(ran)
                ran.add(claimed[0].key)
                self._process(claimed[0])
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _process(self, task: Task) -> None:
        """Run one claimed task; a failure is retried or dead-lettered."""
        started = time.monotonic()
        try:
            status, follow_ups = self.handlers[task.kind](task.value)
        except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered, never lost
            self._failed(task, exc, permanent=isinstance(exc, Permanent))
            return
        duration_ms = int((time.monotonic() - started) * 1000)
        with self.store.transaction():  # follow-ups and completion commit together: a crash loses neither
            for patient_id in follow_ups:
                self.submit("patient", patient_id)
            self.store.done(task.key, owner=self.worker_id)
            self.store.count(SCOPE, f"done_{status}")
        log_event("webhook_task", kind=task.kind, status=status, follow_ups=len(follow_ups), duration_ms=duration_ms)

    def _failed(self, task: Task, exc: BaseException, *, permanent: bool) -> None:
        label = _error_label(exc)
        attempt = task.attempts + 1
        with self.store.transaction():
            self.store.count(SCOPE, "failed_attempts")
            self.store.add_error(task.kind, label, _now_iso())
            if permanent or attempt >= self.max_attempts:
                self.store.dead_letter(task.key, attempt, label, _now_iso(), limit=self.dead_letter_limit)
                self.store.done(task.key, owner=self.worker_id)
                self.store.count(SCOPE, "dead_lettered")
                outcome = "dead_letter"
            else:
                self.store.retry(task.key, self.clock() + self.backoff * 2 ** (attempt - 1), owner=self.worker_id)
                self.store.count(SCOPE, "retries")
                outcome = "retry"
        self._wake()
        log_event("webhook_task_failed", kind=task.kind, error=label, attempt=attempt, outcome=outcome,
                  level=30)

    def replay_dead_letters(self) -> int:
        """Put every dead letter back on the queue (after the cause was fixed); returns how many."""
        with self.store.transaction():
            keys = self.store.replay_dead_letters(now=self.clock(), window=self.window, max_wait=self.max_wait)
            for kind, _ in keys:
                self.store.count(SCOPE, f"scheduled_{kind}")
        self._wake()
        return len(keys)

    def drain(self) -> int:
        """Run every stored task once, follow-ups included; a task failing here keeps its retry in the store
        (the next start runs it). Returns how many ran."""
        return self.run_pending(everything=True)

    # -- thread

    def start(self) -> None:
        """Start the worker thread (idempotent); it first picks up tasks a stopped or killed process left."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fhirtwin-webhook", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        # lock order: the store's lock, then the condition; never the store while holding the condition
        while True:
            try:
                due = self.store.next_due()
            except sqlite3.Error as exc:
                log_event("webhook_store_error", error=type(exc).__name__, level=40)
                due = None
            with self._cv:
                if self._stopping:
                    break
                wait = POLL_S if due is None else min(due - self.clock(), POLL_S)
                if wait > 0:
                    self._cv.wait(timeout=wait)
                    continue
            try:
                self.run_pending()
            except sqlite3.Error as exc:  # the store is busy or unwritable: try again, never die
                log_event("webhook_store_error", error=type(exc).__name__, level=40)
                with self._cv:
                    self._cv.wait(timeout=POLL_S)
        self.drain()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop after draining the queue; True when the worker finished within ``timeout`` seconds."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            self.drain()
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def status(self) -> dict[str, Any]:
        """Counts, queue length, dead letters and recent errors — no PHI (hashes and error classes only).
        Everything but ``running``/``processing`` comes from the store, so it survives a restart."""
        tasks = self.store.task_counts()
        with self._cv:
            running, busy = bool(self._thread and self._thread.is_alive()), self._busy
        return {
            "running": running,
            "pending": tasks["pending"],
            "processing": busy,
            "retrying": tasks["retrying"],
            "counts": self.store.counts(SCOPE),
            "dead_letters": [d.public() for d in self.store.dead_letters()],
            "last_errors": self.store.last_errors(),
        }
