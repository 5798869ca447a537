"""The service's embedded store: one SQLite file for everything that must outlive a process.

What it holds and why:

* the Subscription webhook queue (a delivery answered 200 is stored first, so a crash, even SIGKILL inside
  the debounce window, never loses it), its dead letters and the counts of the status page;
* CDS Hooks card feedback (capped: the oldest rows go, so unauthenticated traffic cannot grow it forever);
* SMART sessions, so a restart or a second process keeps users logged in. They hold access tokens: the file
  (and SQLite's ``-wal``/``-shm`` files, which take its mode) is created ``0600`` in a ``0700`` folder;
* a JWT ``jti`` replay cache and an outbox for AuditEvents waiting to be written.

Durability: WAL journal with ``synchronous=FULL``. With WAL, ``NORMAL`` survives a process crash but a commit
may roll back after a power loss or OS crash (https://www.sqlite.org/pragma.html#pragma_synchronous); a
delivery the FHIR server saw acknowledged is never sent again, so the acknowledgement waits for the fsync.

Several service processes may share one store: the same file on a local disk (SQLite's locking is not
reliable on NFS or other network file systems, https://www.sqlite.org/wal.html — WAL needs shared memory).
Writers take the write lock up front (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout``; a worker claims
due tasks with a lease, so two processes never run one task at once, and a task whose lease ran out (its
process died) becomes claimable again. A lease must outlast the longest task (default 300 s). Times of the
queue are wall-clock seconds (``time.time()``), comparable between processes.

One ``Store`` has one connection guarded by a re-entrant lock: safe across threads; ``transaction()`` groups
several calls into one commit. :func:`open_store` gives each process one ``Store`` per file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fhirtwin.service.runtime import ServiceSettings

SCHEMA_VERSION = 1
FILE_NAME = "service.sqlite3"
DEFAULT_LEASE_S = 300.0
DEAD_LETTER_LIMIT = 500
FEEDBACK_LIMIT = 10_000
LAST_ERRORS_KEPT = 10
OUTBOX_LEASE_S = 60.0
OUTBOX_MAX_BACKOFF_S = 3600.0

TaskKey = tuple[str, str]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_task (
    kind TEXT NOT NULL, value TEXT NOT NULL,
    due REAL NOT NULL, first_event REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT, lease_until REAL,
    again INTEGER NOT NULL DEFAULT 0,  -- an event arrived while the task ran: run it once more
    PRIMARY KEY (kind, value));
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, value TEXT NOT NULL,
    attempts INTEGER NOT NULL, error TEXT NOT NULL, first_failed TEXT NOT NULL, last_failed TEXT NOT NULL,
    UNIQUE (kind, value));
CREATE TABLE IF NOT EXISTS counter (
    scope TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS last_error (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, error TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS smart_session (
    id TEXT PRIMARY KEY, created REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jti_seen (
    issuer TEXT NOT NULL, jti TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (issuer, jti));
CREATE INDEX IF NOT EXISTS jti_seen_expiry ON jti_seen (expires_at);
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, resource TEXT NOT NULL, created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, last_error TEXT);
"""


@dataclass(frozen=True)
class Task:
    """A claimed webhook task: its key, when it was due, its first event and the attempts made before."""

    kind: str
    value: str
    due: float
    first_event: float
    attempts: int

    @property
    def key(self) -> TaskKey:
        return (self.kind, self.value)


@dataclass
class DeadLetter:
    """A task given up after its retries: kept (with the raw key, for replay) but shown without PHI."""

    key: TaskKey
    attempts: int
    error: str
    first_failed: str
    last_failed: str

    def public(self) -> dict[str, Any]:
        """What ``/status`` shows: kind, salted hash of the key, attempts, error class and status."""
        from fhirtwin.service.runtime import patient_hash

        return {"kind": self.key[0], "ref": patient_hash(self.key[1]), "attempts": self.attempts,
                "error": self.error, "first_failed": self.first_failed, "last_failed": self.last_failed}


# ------------------------------------------------------------------------------------------------ paths


def default_store_path() -> Path:
    """``$FHIRTWIN_STATE_DIR/service.sqlite3``; the folder defaults to ``~/.local/state/fhirtwin``."""
    folder = os.environ.get("FHIRTWIN_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state",
                                                                  "fhirtwin")
    return Path(folder) / FILE_NAME


def store_path_for(settings: ServiceSettings) -> Path:
    """The store file of a service: ``settings.store_path`` or the default."""
    return Path(settings.store_path).expanduser() if settings.store_path else default_store_path()


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def open_store(settings: ServiceSettings) -> Store:
    """The process's ``Store`` for the settings' file (opened once per process and file)."""
    path = store_path_for(settings).resolve()
    key = (os.getpid(), str(path))  # a forked child never shares its parent's connection
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(path)
        return store


def _private_file(path: Path) -> None:
    """Create the folder (0700 when new) and the file (0600), and make an existing file 0600."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ store


class Store:
    """The SQLite store (see the module docstring). Every method is one transaction unless grouped."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        _private_file(self.path)
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        with self.transaction():  # statement by statement: executescript() would commit on its own
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -------------------------------------------------------------------------------------- webhook tasks

    def put_task(self, key: TaskKey, *, now: float, window: float, max_wait: float) -> bool:
        """Record an event for ``key`` with the debounce rule; True when it starts a new run.

        New key: due ``now + window``. Pending key: due pushed to ``now + window`` but at most ``max_wait``
        after its first event. A key waiting for a retry keeps its backoff. A key being processed is marked to
        run once more (the running attempt may have read the data before this change)."""
        kind, value = key
        max_wait = max(max_wait, window)
        with self.transaction() as db:
            row = db.execute("SELECT first_event, attempts, lease_until, again FROM webhook_task "
                             "WHERE kind = ? AND value = ?", key).fetchone()
            if row is None:
                db.execute("INSERT INTO webhook_task (kind, value, due, first_event) VALUES (?, ?, ?, ?)",
                           (kind, value, now + window, now))
                return True
            first_event, attempts, lease_until, again = row
            if lease_until is not None and lease_until > now:
                if not again:
                    db.execute("UPDATE webhook_task SET due = ?, first_event = ?, again = 1 "
                               "WHERE kind = ? AND value = ?", (now + window, now, kind, value))
                    return True
            elif attempts:
                return False
            db.execute("UPDATE webhook_task SET due = ? WHERE kind = ? AND value = ?",
                       (min(now + window, first_event + max_wait), kind, value))
            return False

    def claim_due(self, now: float, worker_id: str, lease_s: float = DEFAULT_LEASE_S, *, limit: int = 50,
                  everything: bool = False, exclude: Collection[TaskKey] = ()) -> list[Task]:
        """Claim (lease to ``worker_id`` until ``now + lease_s``) the tasks due at ``now`` — all unleased ones
        when ``everything`` — oldest due first, at most ``limit``, skipping ``exclude``. Atomic across
        processes: a task is never leased to two live workers."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT kind, value, due, first_event, attempts FROM webhook_task "
                "WHERE (? OR due <= ?) AND (lease_until IS NULL OR lease_until <= ?) ORDER BY due, rowid",
                (everything, now, now)).fetchall()
            tasks = [Task(*row) for row in rows if (row[0], row[1]) not in exclude][:limit]
            db.executemany("UPDATE webhook_task SET lease_owner = ?, lease_until = ?, again = 0 "
                           "WHERE kind = ? AND value = ?",
                           [(worker_id, now + lease_s, t.kind, t.value) for t in tasks])
        return tasks

    def done(self, key: TaskKey, *, owner: str | None = None) -> None:
        """The task ran: forget it, or (an event came meanwhile) release it to run again at its new due time.
        With ``owner``, only while that worker still holds the lease."""
        mine, params = ("", ()) if owner is None else (" AND lease_owner = ?", (owner,))
        with self.transaction() as db:
            db.execute(f"DELETE FROM webhook_task WHERE kind = ? AND value = ? AND again = 0{mine}", (*key, *params))
            db.execute("UPDATE webhook_task SET lease_owner = NULL, lease_until = NULL, again = 0, attempts = 0 "
                       f"WHERE kind = ? AND value = ?{mine}", (*key, *params))

    def retry(self, key: TaskKey, due: float, *, owner: str | None = None) -> int:
        """The task failed and will run again at ``due``: count the attempt, drop the lease; returns attempts."""
        mine, params = ("", ()) if owner is None else (" AND lease_owner = ?", (owner,))
        with self.transaction() as db:
            db.execute("UPDATE webhook_task SET attempts = attempts + 1, due = ?, lease_owner = NULL, "
                       f"lease_until = NULL, again = 0 WHERE kind = ? AND value = ?{mine}", (due, *key, *params))
            row = db.execute("SELECT attempts FROM webhook_task WHERE kind = ? AND value = ?", key).fetchone()
        return int(row[0]) if row else 0

    def next_due(self) -> float | None:
        """When the next task becomes claimable (its due time, or its lease's end), or None when none waits."""
        row = self._read("SELECT MIN(MAX(due, COALESCE(lease_until, due))) FROM webhook_task")
        return None if row[0][0] is None else float(row[0][0])

    def tasks(self, limit: int = 1000) -> list[Task]:
        """The stored tasks, oldest due first (for operators and tests; ``claim_due`` is how work is taken)."""
        rows = self._read("SELECT kind, value, due, first_event, attempts FROM webhook_task ORDER BY due, rowid "
                          "LIMIT ?", (limit,))
        return [Task(*row) for row in rows]

    def task_counts(self) -> dict[str, int]:
        """``pending`` (all stored tasks), ``retrying`` (with failed attempts) and ``leased`` (being run)."""
        pending, retrying, leased = self._read(
            "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0), COALESCE(SUM(lease_owner IS NOT NULL), 0) "
            "FROM webhook_task")[0]
        return {"pending": int(pending), "retrying": int(retrying), "leased": int(leased)}

    # --------------------------------------------------------------------------------------- dead letters

    def dead_letter(self, key: TaskKey, attempts: int, error: str, at: str, *,
                    limit: int = DEAD_LETTER_LIMIT) -> None:
        """Keep a given-up task (a known key adds its attempts); only the newest ``limit`` letters are kept."""
        with self.transaction() as db:
            db.execute("INSERT INTO dead_letter (kind, value, attempts, error, first_failed, last_failed) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, value) DO UPDATE SET "
                       "attempts = attempts + excluded.attempts, error = excluded.error, "
                       "last_failed = excluded.last_failed", (*key, attempts, error, at, at))
            db.execute("DELETE FROM dead_letter WHERE id NOT IN "
                       "(SELECT id FROM dead_letter ORDER BY id DESC LIMIT ?)", (max(limit, 0),))

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        rows = self._read("SELECT kind, value, attempts, error, first_failed, last_failed FROM dead_letter "
                          "ORDER BY id")
        return [DeadLetter((kind, value), attempts, error, first, last)
                for kind, value, attempts, error, first, last in rows]

    def replay_dead_letters(self, *, now: float, window: float, max_wait: float) -> list[TaskKey]:
        """Move every dead letter back onto the queue in one transaction; returns their keys."""
        with self.transaction() as db:
            keys = [(k, v) for k, v in db.execute("SELECT kind, value FROM dead_letter ORDER BY id")]
            db.execute("DELETE FROM dead_letter")
            for key in keys:
                self.put_task(key, now=now, window=window, max_wait=max_wait)
        return keys

    # -------------------------------------------------------------------------------------- status counts

    def count(self, scope: str, name: str, n: int = 1) -> None:
        """Add ``n`` to a persisted counter."""
        with self.transaction() as db:
            db.execute("INSERT INTO counter (scope, name, value) VALUES (?, ?, ?) "
                       "ON CONFLICT (scope, name) DO UPDATE SET value = value + excluded.value", (scope, name, n))

    def counts(self, scope: str) -> dict[str, int]:
        """The counters of a scope, by name."""
        return {name: int(value) for name, value in
                self._read("SELECT name, value FROM counter WHERE scope = ? ORDER BY name", (scope,))}

    def add_error(self, kind: str, error: str, at: str, *, keep: int = LAST_ERRORS_KEPT) -> None:
        """Remember a failure (kind and error class only, no PHI); the newest ``keep`` are kept."""
        with self.transaction() as db:
            db.execute("INSERT INTO last_error (kind, error, at) VALUES (?, ?, ?)", (kind, error, at))
            db.execute("DELETE FROM last_error WHERE id NOT IN (SELECT id FROM last_error ORDER BY id DESC LIMIT ?)",
                       (keep,))

    def last_errors(self) -> list[dict[str, str]]:
        """The remembered failures, oldest first."""
        return [{"kind": kind, "error": error, "at": at}
                for kind, error, at in self._read("SELECT kind, error, at FROM last_error ORDER BY id")]

    # ------------------------------------------------------------------------------------------- feedback

    def feedback_add(self, items: Iterable[dict[str, Any]], *, now: float | None = None,
                     limit: int = FEEDBACK_LIMIT) -> None:
        """Store CDS Hooks card feedback; beyond ``limit`` rows the oldest are dropped."""
        received = time.time() if now is None else now
        with self.transaction() as db:
            db.executemany("INSERT INTO feedback (received, data) VALUES (?, ?)",
                           [(received, json.dumps(item, separators=(",", ":"))) for item in items])
            db.execute("DELETE FROM feedback WHERE id <= (SELECT MAX(id) FROM feedback) - ?", (max(limit, 0),))

    def feedback(self) -> list[dict[str, Any]]:
        """Stored feedback, oldest first."""
        return [json.loads(data) for (data,) in self._read("SELECT data FROM feedback ORDER BY id")]

    # ------------------------------------------------------------------------------------- SMART sessions

    def session_put(self, session_id: str, created: float, data: dict[str, Any]) -> None:
        """Insert or replace a session (its JSON-able fields; tokens included, hence the 0600 file)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO smart_session (id, created, data) VALUES (?, ?, ?)",
                       (session_id, created, json.dumps(data, separators=(",", ":"))))

    def session_get(self, session_id: str) -> tuple[float, dict[str, Any]] | None:
        """``(created, data)`` of a stored session, or None. The caller applies its TTL."""
        rows = self._read("SELECT created, data FROM smart_session WHERE id = ?", (session_id,))
        return (float(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def session_delete(self, session_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM smart_session WHERE id = ?", (session_id,))

    def session_purge(self, created_before: float) -> int:
        """Delete sessions created before ``created_before``; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM smart_session WHERE created < ?", (created_before,)).rowcount

    # ------------------------------------------------------------------------------------ JWT replay cache

    def seen_jti(self, issuer: str, jti: str, expires_at: float, *, now: float | None = None) -> bool:
        """Record a token id; True when ``(issuer, jti)`` was already seen and has not expired (a replay).
        Rows are dropped once ``expires_at`` has passed (the token itself is refused by then)."""
        current = time.time() if now is None else now
        with self.transaction() as db:
            db.execute("DELETE FROM jti_seen WHERE expires_at <= ?", (current,))
            inserted = db.execute("INSERT OR IGNORE INTO jti_seen (issuer, jti, expires_at) VALUES (?, ?, ?)",
                                  (issuer, jti, expires_at)).rowcount
        return inserted == 0

    # -------------------------------------------------------------------------------------- audit outbox

    def outbox_put(self, kind: str, resource: dict[str, Any]) -> int:
        """Queue a resource (an AuditEvent) for writing; returns its id."""
        with self.transaction() as db:
            cursor = db.execute("INSERT INTO audit_outbox (kind, resource, created) VALUES (?, ?, ?)",
                                (kind, json.dumps(resource, separators=(",", ":")), time.time()))
            return int(cursor.lastrowid or 0)

    def outbox_take(self, limit: int = 50, *, now: float | None = None,
                    lease_s: float = OUTBOX_LEASE_S) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` queued resources, oldest first, hidden from other takers for ``lease_s`` seconds
        (call ``outbox_done`` or ``outbox_failed``; a taker that dies just lets the lease run out)."""
        current = time.time() if now is None else now
        with self.transaction() as db:
            rows = db.execute("SELECT id, resource FROM audit_outbox WHERE not_before <= ? ORDER BY id LIMIT ?",
                              (current, limit)).fetchall()
            db.executemany("UPDATE audit_outbox SET not_before = ? WHERE id = ?",
                           [(current + lease_s, row_id) for row_id, _ in rows])
        return [(int(row_id), json.loads(resource)) for row_id, resource in rows]

    def outbox_done(self, ids: Iterable[int]) -> None:
        """Forget written resources."""
        with self.transaction() as db:
            db.executemany("DELETE FROM audit_outbox WHERE id = ?", [(i,) for i in ids])

    def outbox_failed(self, outbox_id: int, error: str, *, now: float | None = None) -> None:
        """A write failed: keep the resource, retry after ``2**attempts`` seconds (at most an hour)."""
        current = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT attempts FROM audit_outbox WHERE id = ?", (outbox_id,)).fetchone()
            if row is None:
                return
            attempts = int(row[0]) + 1
            db.execute("UPDATE audit_outbox SET attempts = ?, last_error = ?, not_before = ? WHERE id = ?",
                       (attempts, error[:500], current + min(2.0 ** attempts, OUTBOX_MAX_BACKOFF_S), outbox_id))

    def outbox_size(self) -> int:
        """How many resources wait in the outbox."""
        return int(self._read("SELECT COUNT(*) FROM audit_outbox")[0][0])


__all__ = ["DEAD_LETTER_LIMIT", "DEFAULT_LEASE_S", "FEEDBACK_LIMIT", "DeadLetter", "Store", "Task", "TaskKey",
           "default_store_path", "open_store", "store_path_for"]
