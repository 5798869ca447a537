"""Population write-back: a run's signed bundles sent to its FHIR server, several patients per transaction.

Why: :mod:`fhirtwin.population.run` writes one signed transaction Bundle per planned patient
(``runs/<run id>/bundles/<partition>.ndjson``) but sends nothing. One transaction per patient costs a round
trip and a server commit each; here the bundle files are streamed (one line in memory per queued patient)
and ``bundle_size`` patients go in one transaction (:func:`fhirtwin.writeback.transaction.merge_bundles`).
The entries they share (the Organization, the model's Device, the signing-key Device: the same ``PUT`` in
every patient's bundle) are sent once, in a transaction of their own before the first group, and left out
of the groups: a transaction never holds a resource twice, and concurrent transactions never update the
same resource (HAPI answers 409 to the second).

* **Concurrency with back-pressure**: ``writers`` threads take groups from a queue of ``writers`` slots;
  reading stops while it is full, so memory stays flat however large the run.
* **Retries**: the client already retries 429/502/503/504 and lost connections (honouring ``Retry-After``):
  every entry is a ``PUT`` or a conditional create, so the transaction is safe to repeat. When its budget
  is spent, the group is tried again after the server's ``Retry-After`` (or a backoff), ``retries`` times;
  then the write stops (the server is unavailable) and a later call resumes. A refusal that names the
  content (400, 404, 409, 412, 413, 422) splits the group in halves until the patient it belongs to is
  alone, so one bad patient never blocks the others: that patient is ``failed`` (401/403 stop the write).
* **Lost responses** are resolved by :meth:`fhirtwin.engine.Engine.transact` (reused, not copied): the
  transaction's content found on the server by its deterministic identifiers is a success.
* **Never twice**: each patient's state is kept in the run's ledger (``ledger.sqlite3``, table
  ``population_writes``, keyed by run id and patient id: run key, server, state, the server's
  ``Type/id/_history/n`` of every entry, entries created). A patient is marked ``sending`` before its
  transaction and ``written`` after it, so a killed writer resumes where it stopped and a finished write
  sends nothing again, nor is a patient sent whose bundle (same run key) another run of the ledger wrote to
  the same server (an incremental run's unchanged patients). A resent transaction creates nothing twice
  either (conditional creates); a superseding ``PUT`` (``ifMatch``) that conflicts is looked up on the server
  instead (an earlier attempt, lost or killed, may have committed it).
* **The run's server only**: the bundles' ``fullUrl`` s and signing key are for the run's ``target``, so
  any other server is refused, as is a run without a target. TLS verification is the client's (on).
* **HAPI versions references only when told**: population bundles are built without the server at hand
  (``hapi=False``). On a HAPI server the ``auto-version-references-at-path`` meta extension is added to the
  new RiskAssessments (``basis``) and Provenances (``target``, ``entity.what``) as
  :func:`~fhirtwin.writeback.transaction.build_patient_write` writes it (``meta`` is not signed), otherwise
  HAPI strips the input versions the signature covers; other servers get the Provenance ``PUT`` again with
  versioned targets, as :meth:`~fhirtwin.engine.Engine.commit` does.
* **Departed patients**: an incremental run lists the patients no longer in its population
  (``runs/<run id>/retired.ndjson``); after the bundles, each one's current results are retired as every door
  retires them (:meth:`~fhirtwin.engine.Engine.retire`: a fresh search, the results tagged superseded with
  ``ifMatch``, a signed currency Provenance; the signing key by the run's key policy). Safe to repeat; the
  ledger marks each ``retired``.

``--ndjson DIR`` (:func:`write_import_ndjson`) writes the same resources as one NDJSON file per type for a
server's bulk ``$import`` instead. An import has no conditional semantics (no ``ifNoneExist``, no
``ifMatch``): each created resource gets the id of its deterministic ``urn:uuid`` (a UUID v5 of its
prediction key or run tag) and references between them become ``Type/id``, so importing twice overwrites
the same resources instead of duplicating them, and the ``PUT``-by-id resources (Organization, Devices,
superseded results) are safe to import as they are. The business identifiers and run tags stay as in the
bundles; the signatures still verify (references between targets are signed as placeholders). Do not mix
both paths on one server: a transaction lets the server assign ids, an import keeps these.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fhirtwin.population.run import LEDGER_FILE, RUNS_DIR, Ledger, RunRow
from fhirtwin.vocabulary import RUN_TAG_SYSTEM
from fhirtwin.writeback.transaction import (
    RESULT_TYPES,
    PatientWrite,
    confirmation_reads,
    confirmed_response,
    for_hapi,
    merge_bundles,
    versioned_provenance_update,
)

if TYPE_CHECKING:
    from fhirtwin.engine import Transacted

DEFAULT_BUNDLE_SIZE = 10
DEFAULT_WRITERS = 2
DEFAULT_RETRIES = 3
#: The longest Retry-After waited for; a longer one stops the write (resume later).
MAX_WAIT = 600.0
#: Statuses that refuse a transaction's content: split the group to find the patient it belongs to.
CONTENT_REFUSALS = frozenset({400, 404, 409, 412, 413, 422})
SENDING, WRITTEN, FAILED, RETIRED = "sending", "written", "failed", "retired"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS population_writes (
    run_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    server TEXT NOT NULL,
    run_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('sending', 'written', 'failed', 'retired')),
    locations TEXT,
    created INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (run_id, patient_id)
);
"""


class PopulationWriteError(ValueError):
    """A write cannot start or go on (unknown run, another server, server unavailable, access refused)."""


@dataclass
class WriteReport:
    """What one call did. ``written`` counts patients committed now; ``transactions`` every one sent
    (retries and the halves of split groups included)."""

    run_id: str
    destination: str
    patients: int = 0
    written: int = 0
    already_written: int = 0
    failed: int = 0
    confirmed: int = 0
    created: int = 0
    transactions: int = 0
    retries: int = 0
    splits: int = 0
    #: results superseded on the server for patients who left the population (runs/RUN_ID/retired.ndjson)
    retired: int = 0
    #: partitions of the run not done (their patients have no bundles yet: resume the run, then write again)
    partitions_not_done: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the run


def locate_run(path: str | os.PathLike[str], run_id: str | None) -> tuple[Path, str]:
    """``(output folder, run id)`` from an output folder and ``run_id``, or from ``OUT/runs/RUN_ID`` alone."""
    folder = Path(path)
    if (folder / LEDGER_FILE).is_file():
        if run_id is None:
            raise PopulationWriteError(f"{folder.name} is a population output folder: name the run with --run RUN_ID "
                                       "(or give OUT/runs/RUN_ID)")
        return folder, run_id
    out = folder.parent.parent
    if folder.parent.name == RUNS_DIR and (out / LEDGER_FILE).is_file():
        if run_id is not None and run_id != folder.name:
            raise PopulationWriteError(f"--run {run_id} is not the run folder {folder.name}")
        return out, folder.name
    raise PopulationWriteError(f"{folder.name} is neither a population output folder (with {LEDGER_FILE}) nor "
                               f"its {RUNS_DIR}/RUN_ID folder")


def _run_and_bundle_files(out: Path, run_id: str) -> tuple[RunRow, list[Path], int]:
    """The run, the bundle files of its done partitions (in partition order), and how many are not done."""
    with Ledger(out / LEDGER_FILE) as ledger:
        run = ledger.run(run_id)
        if run is None:
            raise PopulationWriteError(f"no run {run_id!r} in {out.name}/{LEDGER_FILE}")
        partitions = ledger.partitions(run_id)
    files = [out / row.bundles_path for row in partitions.values()
             if row.state == "done" and row.bundles_path and (out / row.bundles_path).is_file()]
    return run, files, len(partitions) - len(files)


def iter_patient_writes(files: Sequence[Path]) -> Iterator[PatientWrite]:
    """Each bundle line of ``files`` as a :class:`PatientWrite`, one line at a time."""
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    where = f"{path.name}:{number}"
                    try:
                        bundle = json.loads(line)
                    except ValueError:
                        raise PopulationWriteError(f"{where} is not JSON (the run's bundle file is damaged: "
                                                   "resume the run after deleting it)") from None
                    yield _patient_write(bundle, where)


def _patient_write(bundle: Any, where: str) -> PatientWrite:
    patient_id = run_key = None
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("resource"), dict) and isinstance(e.get("request"), dict)
            and isinstance(e.get("fullUrl"), str) for e in entries):
        raise PopulationWriteError(f"{where} is not a fhirtwin patient transaction (entries with fullUrl, resource "
                                   "and request)")
    for entry in entries:
        resource = entry["resource"]
        subject = str((resource.get("subject") or {}).get("reference", ""))
        if patient_id is None and subject.startswith("Patient/"):
            patient_id = subject.split("/", 1)[1]
        if resource.get("resourceType") == "Provenance" and entry["request"].get("method") == "POST":
            run_key = next((t.get("code") for t in resource.get("meta", {}).get("tag", [])
                            if t.get("system") == RUN_TAG_SYSTEM), run_key)
    if bundle.get("type") != "transaction" or patient_id is None or run_key is None:
        raise PopulationWriteError(f"{where} is not a fhirtwin patient transaction (subject and run Provenance)")
    return PatientWrite(patient_id, bundle, {}, run_key)


def groups(writes: Iterator[PatientWrite], size: int) -> Iterator[list[PatientWrite]]:
    """``size`` patients at a time (the last group may be smaller)."""
    group: list[PatientWrite] = []
    for write in writes:
        group.append(write)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


# ------------------------------------------------------------------------------------------------ ledger


class WriteLedger:
    """The ``population_writes`` table of a run's ledger, shared by the writer threads (one lock)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def states(self, run_id: str) -> dict[str, tuple[str, str]]:
        """Patient id -> (state, run key) of every patient this run has tried to write."""
        with self._lock:
            rows = self._db.execute("SELECT patient_id, state, run_key FROM population_writes WHERE run_id = ?",
                                    (run_id,)).fetchall()
        return {pid: (state, key) for pid, state, key in rows}

    def written_elsewhere(self, run_id: str, server: str) -> dict[tuple[str, str], str | None]:
        """(patient id, run key) -> locations of what other runs of this ledger wrote to ``server`` (an
        incremental run carries unchanged patients' bundles over: they are on the server already)."""
        with self._lock:
            rows = self._db.execute("SELECT patient_id, run_key, locations FROM population_writes WHERE server = ? "
                                    "AND state = 'written' AND run_id != ?", (server, run_id)).fetchall()
        return {(pid, key): locations for pid, key, locations in rows}

    def retired(self, run_id: str, server: str, patient_id: str, results: int) -> None:
        """A departed patient's current results were retired (``results`` of them; 0: none was current)."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO population_writes (run_id, patient_id, server, run_key, state, created, updated) "
                "VALUES (?, ?, ?, '', 'retired', ?, ?) ON CONFLICT (run_id, patient_id) DO UPDATE SET "
                "server = excluded.server, state = 'retired', created = excluded.created, error = NULL, "
                "updated = excluded.updated",
                (run_id, patient_id, server, results, datetime.now(UTC).isoformat(timespec="seconds")))

    def carried_over(self, run_id: str, server: str, writes: Sequence[tuple[PatientWrite, str | None]]) -> None:
        self._upsert(run_id, server, [(w, WRITTEN, json.loads(loc) if loc else None, 0, None) for w, loc in writes],
                     attempt=0)

    def sending(self, run_id: str, server: str, writes: Sequence[PatientWrite]) -> None:
        self._upsert(run_id, server, [(w, SENDING, None, 0, None) for w in writes], attempt=1)

    def record(self, run_id: str, server: str, rows: Sequence[tuple[PatientWrite, str, list[str] | None, int,
                                                                    str | None]]) -> None:
        self._upsert(run_id, server, rows, attempt=0)

    def _upsert(self, run_id: str, server: str, rows: Sequence[tuple[PatientWrite, str, list[str] | None, int,
                                                                     str | None]], *, attempt: int) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO population_writes (run_id, patient_id, server, run_key, state, locations, created, "
                "attempts, error, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, patient_id) DO UPDATE SET server = excluded.server, run_key = "
                "excluded.run_key, state = excluded.state, locations = excluded.locations, created = "
                "excluded.created, attempts = attempts + excluded.attempts, error = excluded.error, "
                "updated = excluded.updated",
                [(run_id, w.patient_id, server, w.run_key, state, json.dumps(loc) if loc is not None else None,
                  created, attempt, error, now) for w, state, loc, created, error in rows])


# ------------------------------------------------------------------------------------------------ sending


@dataclass
class _Outcome:
    write: PatientWrite
    state: str
    locations: list[str] | None = None
    created: int = 0
    error: str | None = None
    confirmed: bool = False


class _Sender:
    """Sends one group (splitting and retrying as the module docstring says); thread-safe counters.

    The entries every patient shares (Organization, Devices: ``PUT`` s without ``ifMatch``) go once, in a
    transaction of their own before any group (:meth:`send_shared`), and are left out of the groups:
    concurrent transactions updating the same resource conflict (409 on HAPI)."""

    def __init__(self, engine: Any, *, hapi: bool, retries: int, sleep: Callable[[float], None]) -> None:
        self.engine = engine
        self.hapi = hapi
        self.retries = retries
        self.sleep = sleep
        self.shared: dict[str, dict[str, Any]] = {}  # fullUrl -> resource sent in the shared transaction
        self.shared_answers: dict[str, dict[str, Any]] = {}  # fullUrl -> its response entry
        self.shared_created = 0  # shared entries the server created (counted once, not with every patient)
        self._lock = threading.Lock()
        self.transactions = self.retries_used = self.splits = 0

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def send_shared(self, write: PatientWrite) -> None:
        """The shared entries of ``write`` in one transaction; later groups leave them out."""
        entries = [e for e in write.bundle["entry"] if shared_entry(e)]
        if not entries:
            return
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        sent = self._transact(bundle, [])
        if sent is None:
            raise PopulationWriteError("the FHIR server refused the Organization and Device entries every patient "
                                       "shares; nothing was written")
        self.shared = {e["fullUrl"]: e["resource"] for e in entries}
        self.shared_answers = dict(zip(self.shared, sent.response.get("entry") or [], strict=False))
        self.shared_created = sum(1 for answer in self.shared_answers.values()
                                  if str((answer.get("response") or {}).get("status", "")).startswith("201"))

    def send(self, group: list[PatientWrite]) -> list[_Outcome]:
        bundle = merge_bundles(group)
        bundle["entry"] = [e for e in bundle["entry"] if self.shared.get(e["fullUrl"]) != e["resource"]]
        if self.hapi:
            bundle = for_hapi(bundle)
        try:
            sent = self._transact(bundle, group)
        except _Refused as refused:
            return self._refused(group, refused.error, refused.status)
        outcomes = [self._written(write, bundle, sent.response if sent else {}) for write in group]
        for outcome in outcomes:
            outcome.confirmed = bool(sent and sent.confirmed)
        return outcomes

    def _transact(self, bundle: dict[str, Any], group: list[PatientWrite]) -> Transacted | None:
        """:meth:`Engine.transact` with the retries a server that cannot take the bundle now gets; None when it
        refuses the shared entries, :class:`_Refused` when it refuses a group's content."""
        from fhirtwin.engine import EngineError

        for attempt in range(self.retries + 1):
            self._count("transactions")
            try:
                sent = self.engine.transact(bundle, group, "population write")
            except EngineError as exc:
                status = getattr(exc, "upstream_status", None)
                if _refused_access(exc):
                    raise PopulationWriteError(f"the FHIR server refused access: {exc}") from exc
                if status in CONTENT_REFUSALS:
                    if not group:
                        return None
                    raise _Refused(exc, status) from exc
                if attempt == self.retries:
                    raise PopulationWriteError(f"the FHIR server is unavailable ({exc}); run the write again to "
                                               "resume") from exc
                wait = _retry_after(exc) or min(60.0, 2.0 ** attempt)
                if wait > MAX_WAIT:
                    raise PopulationWriteError(f"the FHIR server asks to wait {wait:.0f} s; run the write again "
                                               "later to resume") from exc
                self._count("retries_used")
                self.sleep(wait)
                continue
            return sent
        raise AssertionError("unreachable")

    def _refused(self, group: list[PatientWrite], exc: Exception, status: int) -> list[_Outcome]:
        if len(group) > 1:
            self._count("splits")
            half = len(group) // 2
            return self.send(group[:half]) + self.send(group[half:])
        write = group[0]
        # a conflict may be this write's own earlier attempt (lost, or killed before the ledger heard of it):
        # its content on the server is a success; another writer's content is not, and the patient fails
        if status in (409, 412):
            found = self._confirm(write)
            if found is not None:
                return [found]
        return [_Outcome(write, FAILED, error=str(exc))]

    def _confirm(self, write: PatientWrite) -> _Outcome | None:
        """A patient whose transaction conflicts (a superseding PUT's ``ifMatch``): committed by an earlier attempt?"""
        from fhirtwin.fhir.errors import FhirError

        client = self.engine.source
        try:
            response = confirmed_response(write.bundle, client.batch(confirmation_reads(write.bundle)))
        except FhirError:
            return None
        if response is None:
            return None
        outcome = self._written(write, write.bundle, response)
        outcome.confirmed = True
        return outcome

    def _written(self, write: PatientWrite, bundle: dict[str, Any], response: dict[str, Any]) -> _Outcome:
        """The patient's part of a (merged) response, in its bundle's order; on a server other than HAPI its
        Provenance ``PUT`` again with versioned targets (what :meth:`Engine.commit` does)."""
        from fhirtwin.engine import EngineError, upstream_error
        from fhirtwin.fhir.client import batch_results
        from fhirtwin.fhir.errors import FhirError

        answers = {**self.shared_answers, **dict(zip((e["fullUrl"] for e in bundle["entry"]),
                                                     response.get("entry") or [], strict=False))}
        part = {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [answers.get(e["fullUrl"], {}) for e in write.bundle["entry"]]}
        results = batch_results(part, write.bundle["entry"])
        outcome = _Outcome(write, WRITTEN, [r.location or "" for r in results],
                           sum(1 for e, r in zip(write.bundle["entry"], results, strict=True)
                               if r.status == 201 and e["fullUrl"] not in self.shared))
        if not self.hapi:
            try:
                update = versioned_provenance_update(write, part) or self._own_unversioned_provenance(write, part)
                if update is not None:
                    self.engine.source.update(update)
            except FhirError as exc:
                error: EngineError = upstream_error(exc, "versioning the Provenance targets")
                if _refused_access(error):  # as for the transaction: stop the write
                    raise PopulationWriteError(f"the FHIR server refused access: {error}") from exc
                outcome.state, outcome.error = FAILED, str(error)
        return outcome


    def _own_unversioned_provenance(self, write: PatientWrite, part: dict[str, Any]) -> dict[str, Any] | None:
        """The versioning update of a Provenance the response does not report created (a lost response confirmed,
        a resent transaction of a killed writer) when the stored one is this bundle's (same signature) and its
        targets are not versioned yet: its first attempt committed, the update after it never came."""
        position, sent = next(((i, e["resource"]) for i, e in enumerate(write.bundle["entry"])
                               if e["resource"].get("resourceType") == "Provenance"
                               and e["request"].get("method") == "POST"), (None, None))
        answers = list(part.get("entry") or [])
        if position is None or sent is None or position >= len(answers):
            return None
        location = str((answers[position].get("response") or {}).get("location") or "")
        parts = location.split("/_history")[0].rstrip("/").split("/")
        if len(parts) < 2 or parts[-2] != "Provenance":
            return None
        stored = self.engine.source.read("Provenance", parts[-1])
        if stored.get("signature") != sent.get("signature") or all(
                "/_history/" in str(t.get("reference", "")) for t in stored.get("target") or []):
            return None
        answers[position] = {**answers[position], "response": {**answers[position]["response"],
                                                                "status": "201 Created"}}
        return versioned_provenance_update(write, {**part, "entry": answers})


class _Refused(Exception):
    """The server refused a transaction's content (one of :data:`CONTENT_REFUSALS`)."""

    def __init__(self, error: Exception, status: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.status = status


def shared_entry(entry: dict[str, Any]) -> bool:
    """An entry every patient's bundle may hold: an unconditional ``PUT`` of something that is not a result."""
    request = entry["request"]
    return (request["method"] == "PUT" and not request.get("ifMatch")
            and entry["resource"]["resourceType"] not in RESULT_TYPES)


def _retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After, wherever in the error chain the client put it."""
    node: BaseException | None = exc
    while node is not None:
        wait = getattr(node, "retry_after", None)
        if isinstance(wait, int | float):
            return float(wait)
        node = node.__cause__
    return None


def write_population(
    out_dir: str | os.PathLike[str],
    run_id: str,
    *,
    server: str,
    client: Any = None,
    bundle_size: int = DEFAULT_BUNDLE_SIZE,
    writers: int = DEFAULT_WRITERS,
    retries: int = DEFAULT_RETRIES,
    sleep: Callable[[float], None] = time.sleep,
    on_group: Callable[[int], object] | None = None,
) -> WriteReport:
    """Send run ``run_id``'s bundles (output folder ``out_dir``) to ``server``; see the module docstring.

    ``client`` is a :class:`~fhirtwin.fhir.client.FhirClient` for ``server`` with the caller's auth (default:
    a plain one, TLS verified). ``bundle_size`` patients per transaction, ``writers`` transactions at once,
    ``retries`` further tries of a group the server could not take. ``on_group`` gets the patients of
    each finished group (progress bars). Raises :class:`PopulationWriteError` when the write cannot start or
    must stop; whatever was written until then is in the ledger, and the next call resumes.
    """
    from fhirtwin.engine import Engine
    from fhirtwin.fhir.client import FhirClient

    if bundle_size < 1 or writers < 1 or retries < 0:
        raise PopulationWriteError("bundle size and writers must be at least 1, retries at least 0")
    started = time.monotonic()
    out = Path(out_dir)
    run, files, not_done = _run_and_bundle_files(out, run_id)
    target = run.settings.target
    if target is None:
        raise PopulationWriteError(f"run {run_id} has no target server (its bundles use urn:uuid fullUrls and the "
                                   "environment's key): run it again with --server, or write --ndjson for $import")
    if target.rstrip("/") != server.rstrip("/"):
        raise PopulationWriteError(f"run {run_id} was signed for another FHIR server than {server}; its bundles "
                                   "can only be written there")
    client = client if client is not None else FhirClient(server)
    if str(getattr(client, "base_url", "")).rstrip("/") != server.rstrip("/"):
        raise PopulationWriteError("the client given is for another FHIR server")
    engine = Engine(client)
    hapi = _server_is_hapi(client)
    report = WriteReport(run_id, server.rstrip("/"), partitions_not_done=not_done)
    ledger = WriteLedger(out / LEDGER_FILE)
    try:
        known = ledger.states(run_id)
        elsewhere = ledger.written_elsewhere(run_id, report.destination)
        sender = _Sender(engine, hapi=hapi, retries=retries, sleep=sleep)

        def todo() -> Iterator[PatientWrite]:
            for write in iter_patient_writes(files):
                report.patients += 1
                if known.get(write.patient_id) == (WRITTEN, write.run_key):
                    report.already_written += 1
                elif (write.patient_id, write.run_key) in elsewhere:
                    ledger.carried_over(run_id, report.destination,
                                        [(write, elsewhere[write.patient_id, write.run_key])])
                    report.already_written += 1
                else:
                    yield write

        def handle(group: list[PatientWrite]) -> None:
            ledger.sending(run_id, report.destination, group)
            outcomes = sender.send(group)
            ledger.record(run_id, report.destination,
                          [(o.write, o.state, o.locations, o.created, o.error) for o in outcomes])
            with lock:
                for o in outcomes:
                    if o.state == WRITTEN:
                        report.written += 1
                        report.created += o.created
                        report.confirmed += o.confirmed
                    else:
                        report.failed += 1
                        report.failures[o.write.patient_id] = o.error or "failed"
            if on_group is not None:
                on_group(len(group))

        lock = threading.Lock()
        work = groups(todo(), bundle_size)
        first = next(work, None)
        if first is not None:
            sender.send_shared(first[0])
            report.created += sender.shared_created
            _pool(itertools.chain([first], work), handle, writers)
        departed = [pid for pid in _retired_patients(out, run_id) if known.get(pid, ("", ""))[0] != RETIRED]
        if departed:
            _retire(Engine(client, signing_key=_signing_key_for(target)), departed, ledger, report)
    finally:
        ledger.close()
    report.transactions, report.retries, report.splits = sender.transactions, sender.retries_used, sender.splits
    report.seconds = time.monotonic() - started
    return report


def _refused_access(error: Exception) -> bool:
    """401/403 from the server (credentials or scopes): the write stops, nothing is retried or marked failed."""
    from fhirtwin.engine import UpstreamUnauthorized

    return isinstance(error, UpstreamUnauthorized) or getattr(error, "upstream_status", None) in (401, 403)


def _retired_patients(out: Path, run_id: str) -> list[str]:
    """The patients an incremental run found gone from its population (``runs/RUN_ID/retired.ndjson``)."""
    from fhirtwin.population.run import RETIRED_FILE

    path = out / RUNS_DIR / run_id / RETIRED_FILE
    if not path.is_file():
        return []
    found = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                patient_id = json.loads(line)["patient_id"] if line.strip() else None
            except (ValueError, TypeError, KeyError):
                raise PopulationWriteError(f"{RETIRED_FILE}:{number} is damaged (run the incremental run again)"
                                           ) from None
            if isinstance(patient_id, str):
                found.append(patient_id)
    return found


def _signing_key_for(target: str) -> Any:
    """The key that signs a retirement, by the run's own key policy (``resolve_signing_key``)."""
    from fhirtwin.keys import KeyPolicyError
    from fhirtwin.population.run import resolve_signing_key

    try:
        return resolve_signing_key(target)
    except KeyPolicyError as exc:
        raise PopulationWriteError(f"retiring departed patients' results needs the signing key: {exc}") from exc


def _retire(engine: Any, patients: list[str], ledger: WriteLedger, report: WriteReport) -> None:
    """Supersede every current result of each departed patient (:meth:`fhirtwin.engine.Engine.retire`: a fresh
    search, a signed currency Provenance; safe to repeat). A patient that fails is reported; the others go on."""
    from fhirtwin.engine import EngineError, UpstreamUnauthorized

    for patient_id in patients:
        try:
            count = engine.retire(patient_id)
        except UpstreamUnauthorized as exc:
            raise PopulationWriteError(f"the server refused the retirement ({exc.message})") from exc
        except EngineError as exc:
            report.failed += 1
            report.failures[patient_id] = exc.message
            continue
        ledger.retired(report.run_id, report.destination, patient_id, count)
        report.retired += count


def _server_is_hapi(client: Any) -> bool:
    """Whether the server is HAPI FHIR, from its CapabilityStatement. Unlike the engine's check, an unreadable
    statement stops the write: taken for another server, HAPI would strip the input versions the signatures
    cover."""
    from fhirtwin.fhir.errors import FhirError

    try:
        statement = client.capabilities()
    except FhirError as exc:
        raise PopulationWriteError("the FHIR server's CapabilityStatement cannot be read (it decides how the "
                                   f"references are versioned; HTTP {exc.status}); run the write again") from exc
    software = statement.get("software") if isinstance(statement, dict) else None
    return "hapi" in str((software if isinstance(software, dict) else {}).get("name", "")).lower()


def _pool(work: Iterator[list[PatientWrite]], handle: Callable[[list[PatientWrite]], None], writers: int) -> None:
    """Run ``handle`` on each item of ``work`` in ``writers`` threads fed by a queue of ``writers`` slots.

    The first error of any writer stops the reading and is raised once the others have finished their
    current group (a killed writer: what was committed is in the ledger)."""
    slots: queue.Queue[list[PatientWrite] | None] = queue.Queue(maxsize=writers)
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        while True:
            item = slots.get()
            if item is None:
                return
            if stop.is_set():
                continue
            try:
                handle(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                stop.set()

    threads = [threading.Thread(target=worker, name=f"population-writer-{n}", daemon=True) for n in range(writers)]
    for thread in threads:
        thread.start()
    try:
        for item in work:
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                break
    finally:
        for _ in threads:
            slots.put(None)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------------------ $import


def write_import_ndjson(out_dir: str | os.PathLike[str], run_id: str, dest: str | os.PathLike[str]) -> WriteReport:
    """Run ``run_id``'s resources as ``dest/<Type>.ndjson`` for a server's ``$import`` (module docstring).

    Each resource is written once (shared ``PUT`` s too); the files appear under their final names only
    when complete. Refuses a folder that already holds NDJSON.
    """
    started = time.monotonic()
    out = Path(out_dir)
    _, files, not_done = _run_and_bundle_files(out, run_id)
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    if any(p.name.endswith(".ndjson") for p in folder.iterdir()):
        raise PopulationWriteError(f"{folder.name} already holds NDJSON files; choose an empty folder")
    report = WriteReport(run_id, str(folder), partitions_not_done=not_done)
    handles: dict[str, IO[str]] = {}
    seen: set[str] = set()
    try:
        for write in iter_patient_writes(files):
            report.patients += 1
            for resource in import_resources(write.bundle):
                ref = f"{resource['resourceType']}/{resource['id']}"
                if ref in seen:
                    continue
                seen.add(ref)
                handle = handles.get(resource["resourceType"])
                if handle is None:
                    handle = handles[resource["resourceType"]] = open(  # noqa: SIM115 - closed below
                        folder / f".{resource['resourceType']}.ndjson.partial", "w", encoding="utf-8")
                handle.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False) + "\n")
                report.created += 1
            report.written += 1
    except BaseException:
        for handle in handles.values():
            handle.close()
            Path(handle.name).unlink(missing_ok=True)
        raise
    for rtype, handle in handles.items():
        handle.close()
        os.replace(handle.name, folder / f"{rtype}.ndjson")
    report.files = sorted(f"{rtype}.ndjson" for rtype in handles)
    report.seconds = time.monotonic() - started
    return report


def import_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of one transaction as ``$import`` takes them: every one with an id, no ``urn:uuid``."""
    ids: dict[str, str] = {}
    for entry in bundle["entry"]:
        full_url, resource = str(entry.get("fullUrl", "")), entry["resource"]
        if full_url.startswith("urn:uuid:") and entry["request"]["method"] == "POST":
            ids[full_url] = f"{resource['resourceType']}/{full_url.removeprefix('urn:uuid:')}"
    out = []
    for entry in bundle["entry"]:
        resource = _replace_references(copy.deepcopy(entry["resource"]), ids)
        if entry["fullUrl"] in ids:
            resource["id"] = ids[entry["fullUrl"]].split("/", 1)[1]
        out.append(resource)
    return out


def _replace_references(node: Any, ids: dict[str, str]) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in ids:
                node[key] = ids[value]
            else:
                _replace_references(value, ids)
    elif isinstance(node, list):
        for item in node:
            _replace_references(item, ids)
    return node
