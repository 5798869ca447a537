"""The job queue behind the Subscription webhook: debounced per key, retried, dead-lettered, drained.

Why separate from the HTTP handlers: the queue's rules (a lab panel of many Observations is one
recompute; a failing recompute is retried with backoff, then kept as a dead letter; shutdown drains) are
tested with a fake clock and no web server, and they know nothing about FHIR.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhirtwin.service.runtime import log_event, patient_hash

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
