"""Bulk Data ``$export`` as the source of a population run: kick-off, poll, download to an NDJSON folder.

Why a class of its own: a population export runs for minutes to hours against a server that throttles,
whose tokens expire and whose jobs fail; the result must be a folder ``fhirtwin population stage`` reads
(``<Type>.<n>.ndjson``), plus what an incremental run needs next time (``transactionTime``, deletions).

Protocol (FHIR Bulk Data Access IG v2.0.0, https://hl7.org/fhir/uv/bulkdata/STU2/export.html):

* kick-off ``GET [base]/$export``, ``[base]/Patient/$export`` or ``[base]/Group/[id]/$export`` with
  ``Prefer: respond-async`` and ``Accept: application/fhir+json``; parameters ``_outputFormat``, ``_type``,
  ``_since``, ``_typeFilter``; the answer is ``202 Accepted`` with ``Content-Location`` (the status URL), or
  an error status with an OperationOutcome (:class:`BulkKickoffError`). ``Cache-Control: no-cache`` is
  sent too: HAPI otherwise hands back an earlier identical job's files, which would hide new data;
* status polls answer ``202`` (with optional ``X-Progress`` and ``Retry-After``, both honoured) until the
  job completes (``200`` and the JSON manifest); ``429`` means "poll less often" and is waited out; a
  ``5xx`` whose OperationOutcome has a transient issue code, 502/503/504 and lost connections are retried
  a bounded number of times; any other error status is the job's failure (:class:`BulkJobFailed`). The
  whole wait is bounded (``max_wait``); past it the job is cancelled (:class:`BulkExportTimeout`);
* the manifest's ``output`` files (one resource type per file), ``error`` files (OperationOutcomes about
  the export: counted and kept, not fatal) and ``deleted`` files (transaction Bundles of ``DELETE`` entries,
  for ``_since`` exports) are downloaded streaming to disk; ``requiresAccessToken`` decides whether the
  token goes with them (each file request asks the client's auth for the token, so an expired token is
  renewed between files, and a 401 on a file refreshes it once);
* ``DELETE`` on the status URL cancels a job (done on KeyboardInterrupt and on timeout);
* a job whose status URL was recorded by a process that died is polled again (``run(status_url=...)``); when
  the server no longer has the job or its files, a new one is kicked off.

A ``_since`` export holds only what changed, not a changed patient's whole record: :func:`read_whole_records`
reads those records by FHIR search (the batched read of :meth:`fhirtwin.fhir.client.FhirClient.fetch_patients_records`,
Consent included) for an incremental population run.

HAPI 8.8 leaves ``deleted`` out of ``_since`` manifests altogether, so an incremental run would never learn of
a deletion. When a ``_since`` manifest has no ``deleted`` key, the deletions are read from each exported
type's history instead (``[type]/_history?_since=``, newest entry first; a resource counts as deleted when
its newest entry is a ``DELETE``) and written as ``deleted/Bundle.history.ndjson`` in the IG's shape.

Patient and Group exports carry only Patient-compartment types (HAPI refuses ``Medication`` there with
HAPI-0512, and the IG defines those levels by the compartment). The types the twin reads by reference
(``fhirtwin.adapters.reads.REFERENCED_TYPES``: Medication) are then read by id, for exactly the references
the exported records hold, and written as ``<Type>.1.ndjson`` like any other output.

Folder layout (a valid ``fhirtwin population stage`` input; it appears only when complete)::

    Patient.1.ndjson, Observation.1.ndjson, Observation.2.ndjson, ...   the output, per type
    error/OperationOutcome.<n>.ndjson                                     the manifest's error files
    deleted/Bundle.<n>.ndjson                                             the manifest's deleted files
    manifest.json                                                         the manifest, as the server sent it
    export.json                                                           what was asked and what came back
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin

import requests

from fhirtwin.adapters.reads import RECORD_INCLUDES, RECORD_TYPES, REFERENCED_TYPES
from fhirtwin.fhir.client import FhirClient, next_link, parse_retry_after, patient_reference_id
from fhirtwin.fhir.errors import (
    BulkExportError,
    FhirConnectionError,
    FhirError,
    FhirHttpError,
    FhirNotFound,
    FhirThrottled,
    FhirTimeout,
    same_origin,
)
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.vocabulary import is_fhirtwin_generated
from fhirtwin.writeback.transaction import RESULT_TYPES

__all__ = [
    "BulkDownloadError",
    "BulkExport",
    "BulkExportResult",
    "BulkExportTimeout",
    "BulkJobFailed",
    "BulkKickoffError",
    "BulkManifestError",
    "ExportFile",
    "RecordsRead",
    "default_types",
    "deleted_references",
    "read_whole_records",
    "touched_patients",
]

log = logging.getLogger("fhirtwin.population")

NDJSON = "application/fhir+ndjson"
#: Resource types a population run reads from a Patient's compartment: the twin's record types; Consent,
#: because the run checks each patient's Consents; and the result types, because fhirtwin's own earlier results
#: are what a new result supersedes, as in ``fhirtwin run`` (they are never twin inputs, and a change of them
#: never makes a patient "changed").
COMPARTMENT_TYPES: tuple[str, ...] = ("Patient", *RECORD_TYPES, "Consent", *RESULT_TYPES)
#: OperationOutcome issue codes that mean "try again later" (IG: a status poll failing for a reason other
#: than the job's failure SHOULD use a transient code).
TRANSIENT_CODES = frozenset({"transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
                             "throttled"})
TRANSIENT_STATUSES = frozenset({502, 503, 504})
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
#: Ids per ``_id`` search when reading referenced resources.
ID_CHUNK = 100


def default_types() -> tuple[str, ...]:
    """The ``_type`` list the twin needs: every type it reads, and Consent; derived, never listed twice.

    The same at every level: patient and group exports leave REFERENCED_TYPES out of ``_type`` and read them by id.
    """
    return (*COMPARTMENT_TYPES, *REFERENCED_TYPES)


# ------------------------------------------------------------------------------------------------ errors


class BulkKickoffError(BulkExportError):
    """The server refused to start the export (bad parameter, unsupported type, not allowed)."""


class BulkJobFailed(BulkExportError):
    """The status endpoint reported the export job as failed (or it vanished)."""


class BulkExportTimeout(BulkExportError):
    """The export did not complete within ``max_wait``; the job was cancelled."""


class BulkManifestError(BulkExportError):
    """The completion manifest is not usable (no output list, no transactionTime, bad file entries)."""


class BulkDownloadError(BulkExportError):
    """An output, error or deleted file could not be downloaded (after the retries allowed)."""


# ------------------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class ExportFile:
    """One downloaded file: ``kind`` is output/error/deleted/referenced, ``path`` relative to the folder."""

    kind: str
    type: str
    path: str
    lines: int
    bytes: int


@dataclass
class BulkExportResult:
    """What an export produced; ``transaction_time`` is the ``_since`` of the next incremental export."""

    out_dir: str
    level: str
    types: list[str]
    since: str | None
    transaction_time: str
    requires_access_token: bool
    output: list[ExportFile] = field(default_factory=list)
    errors: list[ExportFile] = field(default_factory=list)
    deleted: list[ExportFile] = field(default_factory=list)
    #: resources per type in the output files (referenced resources read by id included)
    resources: dict[str, int] = field(default_factory=dict)
    #: OperationOutcomes in the error files
    error_outcomes: int = 0
    #: resources the deleted files name
    deleted_resources: int = 0
    #: references (``Medication/x``) the records hold that the server did not return
    unresolved_references: int = 0
    polls: int = 0
    throttled_polls: int = 0
    export_seconds: float = 0.0
    download_seconds: float = 0.0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ export


class BulkExport:
    """One Bulk Data export through ``client`` (retries, auth refresh and TLS are the client's).

    ``level`` is ``system``, ``patient`` or ``group`` (with ``group_id``); ``types`` defaults to
    :func:`default_types`; ``since`` (a FHIR instant, with time zone) makes it incremental. ``max_wait``
    bounds kick-off to manifest; polls without ``Retry-After`` back off from ``poll_interval`` by x1.5 up
    to ``max_poll_interval``. ``on_progress(text)`` sees each ``X-Progress``.
    """

    def __init__(
        self,
        client: FhirClient,
        level: str = "system",
        group_id: str | None = None,
        types: Iterable[str] | None = None,
        since: str | datetime | None = None,
        *,
        type_filters: Iterable[str] = (),
        max_wait: float = 4 * 3600.0,
        poll_interval: float = 2.0,
        max_poll_interval: float = 60.0,
        min_poll_interval: float = 1.0,
        max_transient_failures: int = 10,
        download_attempts: int = 3,
        deletions_from_history: bool = True,
        on_progress: Callable[[str], object] | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if level not in ("system", "patient", "group"):
            raise ValueError("level must be 'system', 'patient' or 'group'")
        if level == "group" and not group_id:
            raise ValueError("a group export needs group_id")
        if level != "group" and group_id:
            raise ValueError("group_id is only for level='group'")
        self.client = client
        self.level = level
        self.group_id = group_id
        self.types = list(dict.fromkeys(types if types is not None else default_types()))
        for resource_type in self.types:
            if not _RESOURCE_TYPE.match(resource_type):
                raise ValueError(f"{resource_type!r} is not a FHIR resource type")
        self.since = _instant(since) if since is not None else None
        self.type_filters = list(type_filters)
        self.max_wait = max_wait
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.min_poll_interval = min_poll_interval
        self.max_transient_failures = max_transient_failures
        self.download_attempts = download_attempts
        self.deletions_from_history = deletions_from_history
        self.on_progress = on_progress
        self.sleep = sleep or client.sleep
        self.clock = clock
        self.polls = 0
        self.throttled_polls = 0

    # ---------------------------------------------------------------------------- the parts

    @property
    def kickoff_types(self) -> list[str]:
        """``_type`` as sent: at patient/group level without the types outside the compartment."""
        if self.level == "system":
            return self.types
        return [t for t in self.types if t not in REFERENCED_TYPES]

    @property
    def resolved_types(self) -> list[str]:
        """Types read by id after a patient/group export (the records' references to them)."""
        if self.level == "system":
            return []
        return [t for t in self.types if t in REFERENCED_TYPES]

    def kick_off(self) -> str:
        """Start the job; returns the status URL (absolute)."""
        if self.level == "system":
            path = "$export"
        elif self.level == "patient":
            path = "Patient/$export"
        else:
            path = f"Group/{quote(str(self.group_id), safe='')}/$export"
        params: list[tuple[str, str]] = [("_outputFormat", NDJSON)]
        if self.kickoff_types:
            params.append(("_type", ",".join(self.kickoff_types)))
        if self.since:
            params.append(("_since", self.since))
        params.extend(("_typeFilter", f) for f in self.type_filters)
        headers = {"Prefer": "respond-async", "Accept": "application/fhir+json", "Cache-Control": "no-cache"}
        throttled = 0
        while True:
            try:
                # retry_safe=False: a kick-off whose answer was lost may have started a job (a second one would
                # be an orphan); only a 429, which started nothing, is sent again
                response = self.client.request("GET", path, params=params, headers=headers, retry_safe=False)
                break
            except FhirThrottled as exc:
                throttled += 1
                if throttled > self.max_transient_failures or (exc.retry_after or 0) > self.max_wait:
                    raise BulkKickoffError("export kick-off throttled", method="GET", url=self.client.url(path),
                                           status=exc.status, outcome=exc.outcome) from exc
                self.sleep(max(self.min_poll_interval, exc.retry_after or self.poll_interval * throttled))
            except FhirHttpError as exc:
                raise BulkKickoffError("export kick-off refused", method="GET", url=self.client.url(path),
                                       status=exc.status, outcome=exc.outcome) from exc
        status_url = response.headers.get("Content-Location")
        response.close()
        if response.status_code != 202 or not status_url:
            raise BulkKickoffError("export kick-off did not answer 202 Accepted with a Content-Location",
                                   method="GET", url=self.client.url(path), status=response.status_code)
        return urljoin(self.client.base_url + "/", status_url)

    def wait(self, status_url: str) -> tuple[dict[str, Any], bytes]:
        """Poll until the manifest arrives; returns it parsed and as sent. Cancels the job on timeout."""
        deadline = self.clock() + self.max_wait
        delay = self.poll_interval
        transient = 0
        while True:
            pause: float
            try:
                response = self.client.request("GET", status_url, headers={"Accept": "application/json"},
                                               retry_safe=False)
            except FhirThrottled as exc:  # "poll less often": not a failure, bounded by the deadline only
                self.throttled_polls += 1
                pause = exc.retry_after if exc.retry_after is not None else delay
                delay = min(self.max_poll_interval, delay * 1.5)
            except (FhirHttpError, FhirTimeout, FhirConnectionError) as exc:
                if not _is_transient(exc):
                    raise BulkJobFailed("export job failed", method="GET", url=status_url, status=exc.status,
                                        outcome=exc.outcome) from exc
                transient += 1
                if transient > self.max_transient_failures:
                    raise BulkJobFailed(f"status endpoint failing ({transient} times in a row)", method="GET",
                                        url=status_url, status=exc.status, outcome=exc.outcome) from exc
                log.warning("bulk export status poll failed (%s); retrying", type(exc).__name__)
                pause = delay
                delay = min(self.max_poll_interval, delay * 1.5)
            else:
                self.polls += 1
                transient = 0
                if response.status_code == 200:
                    raw = response.content
                    return _parse_manifest(raw, status_url), raw
                if response.status_code != 202:
                    response.close()
                    raise BulkJobFailed("unexpected status while polling", method="GET", url=status_url,
                                        status=response.status_code)
                progress = (response.headers.get("X-Progress") or "").strip()[:200]
                if progress:
                    log.info("bulk export in progress: %s", progress)
                    if self.on_progress is not None:
                        self.on_progress(progress)
                retry_after = _retry_after(response)
                response.close()
                pause = retry_after if retry_after is not None else delay
                delay = min(self.max_poll_interval, delay * 1.5)
            pause = max(self.min_poll_interval, pause)
            if self.clock() + pause > deadline:
                self.cancel(status_url)
                raise BulkExportTimeout(f"export not complete within {self.max_wait:.0f} s; job cancelled",
                                        method="GET", url=status_url)
            self.sleep(pause)

    def cancel(self, status_url: str) -> bool:
        """``DELETE`` the status URL (cancels a running job, frees a finished one's files); True if accepted."""
        try:
            response = self.client.request("DELETE", status_url, retry_safe=False)
        except FhirError as exc:
            log.warning("bulk export cancel failed: %s", type(exc).__name__)
            return False
        response.close()
        return True

    def download(self, manifest: Mapping[str, Any], folder: Path) -> BulkExportResult:
        """Every file of ``manifest`` into ``folder`` (streamed), then the referenced resources by id."""
        requires_token = _requires_token(manifest)
        started = time.monotonic()
        result = BulkExportResult(out_dir=str(folder), level=self.level, types=self.types, since=self.since,
                                  transaction_time=str(manifest["transactionTime"]),
                                  requires_access_token=requires_token)
        for kind, sub, default_type, files in (("output", "", None, result.output),
                                               ("error", "error", "OperationOutcome", result.errors),
                                               ("deleted", "deleted", "Bundle", result.deleted)):
            numbers: dict[str, int] = {}
            for item in manifest.get(kind) or []:
                resource_type = str(item.get("type") or default_type)
                numbers[resource_type] = numbers.get(resource_type, 0) + 1
                relative = f"{sub}/" if sub else ""
                relative += f"{resource_type}.{numbers[resource_type]}.ndjson"
                lines, size = self._download(str(item["url"]), folder / relative, requires_token, resource_type)
                files.append(ExportFile(kind, resource_type, relative, lines, size))
        if self.since and "deleted" not in manifest and self.deletions_from_history:
            from_history = self._deleted_from_history(folder)
            if from_history is not None:
                result.deleted.append(from_history)
        for resource_type in self.resolved_types:
            written, unresolved = self._read_referenced(resource_type, folder)
            result.unresolved_references += unresolved
            if written is not None:
                result.output.append(written)
        for item in result.output:
            result.resources[item.type] = result.resources.get(item.type, 0) + item.lines
        result.resources = dict(sorted(result.resources.items()))
        result.error_outcomes = sum(f.lines for f in result.errors)
        if result.error_outcomes:
            log.warning("bulk export reported %d OperationOutcome(s) in its error files", result.error_outcomes)
        result.deleted_resources = sum(1 for _ in deleted_references(folder))
        result.bytes = sum(f.bytes for f in (*result.output, *result.errors, *result.deleted))
        result.download_seconds = round(time.monotonic() - started, 3)
        return result

    # ---------------------------------------------------------------------------- the whole export

    def run(self, out_dir: str | os.PathLike[str], *, status_url: str | None = None,
            on_status_url: Callable[[str], object] | None = None) -> BulkExportResult:
        """Kick off, wait, download into ``out_dir`` (new or empty; written beside it, renamed when complete).

        ``status_url`` (of a job this export started before, e.g. by a crashed process) is polled instead of
        kicking off; when the server no longer knows that job a new one is kicked off. ``on_status_url``
        sees the status URL as soon as the job exists (to record it). KeyboardInterrupt cancels the
        server's job (DELETE) and leaves no folder behind.
        """
        target = Path(out_dir)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target.name} is not an empty folder; choose a new one")
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)  # our own leftover of an interrupted export
        partial.mkdir(parents=True)
        try:
            started = time.monotonic()
            result: BulkExportResult | None = None
            if status_url is not None:
                try:
                    manifest, raw = self.wait(status_url)
                    export_seconds = time.monotonic() - started
                    result = self.download(manifest, partial)
                except (BulkJobFailed, BulkDownloadError) as exc:  # the job or its files expired
                    log.warning("bulk export: the recorded job is gone (%s, HTTP %s); starting a new one",
                                type(exc).__name__, exc.status)
                    shutil.rmtree(partial)
                    partial.mkdir(parents=True)
                    status_url = None
            if result is None:
                status_url = self.kick_off()
                if on_status_url is not None:
                    on_status_url(status_url)
                manifest, raw = self.wait(status_url)
                export_seconds = time.monotonic() - started
                result = self.download(manifest, partial)
            (partial / "manifest.json").write_bytes(raw)
        except KeyboardInterrupt:
            if status_url is not None:
                self.cancel(status_url)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        result.out_dir = str(target)
        result.polls, result.throttled_polls = self.polls, self.throttled_polls
        result.export_seconds = round(export_seconds, 3)
        summary = {"format": "fhirtwin-bulk-export/1", "group_id": self.group_id,
                   "kickoff_types": self.kickoff_types, **result.to_json()}
        summary.pop("out_dir")
        (partial / "export.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if target.exists():
            target.rmdir()
        partial.rename(target)
        log.info("bulk export done files=%d resources=%d errors=%d deleted=%d", len(result.output),
                 sum(result.resources.values()), result.error_outcomes, result.deleted_resources)
        return result

    # ---------------------------------------------------------------------------- helpers

    def _download(self, url: str, path: Path, send_auth: bool, resource_type: str) -> tuple[int, int]:
        """Stream one file to ``path`` (via ``path.part``); returns (non-blank lines, bytes)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.request("GET", url, headers={"Accept": NDJSON}, stream=True,
                                               send_auth=send_auth, allow_redirects=True)
            except FhirError as exc:
                raise BulkDownloadError(f"{resource_type} file could not be downloaded", method="GET", url=url,
                                        status=exc.status, outcome=exc.outcome) from exc
            counter = _LineCounter()
            try:
                with open(part, "wb") as handle:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        handle.write(chunk)
                        counter.feed(chunk)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                part.unlink(missing_ok=True)
                if attempt >= self.download_attempts:
                    raise BulkDownloadError(f"{resource_type} file download broke off {attempt} time(s) "
                                            f"({type(exc).__name__})", method="GET", url=url) from None
                log.warning("bulk file download broke off (%s); again", type(exc).__name__)
                self.sleep(min(self.max_poll_interval, self.poll_interval * 2 ** (attempt - 1)))
                continue
            finally:
                response.close()
            os.replace(part, path)
            return counter.close(), path.stat().st_size

    def _read_referenced(self, resource_type: str, folder: Path) -> tuple[ExportFile | None, int]:
        """Read the ``resource_type`` resources the output's records reference; (file or None, unresolved)."""
        wanted = sorted(_referenced_ids(folder, resource_type))
        if not wanted:
            return None, 0
        relative = f"{resource_type}.1.ndjson"
        found: set[str] = set()
        part = folder / (relative + ".part")
        with open(part, "w", encoding="utf-8") as handle:
            for start in range(0, len(wanted), ID_CHUNK):
                chunk = wanted[start:start + ID_CHUNK]
                params = {"_id": ",".join(chunk), "_count": len(chunk)}
                for resource in self.client.search_all(resource_type, params, use_post=True):
                    rid = resource.get("id")
                    if resource.get("resourceType") != resource_type or rid not in chunk or rid in found:
                        continue
                    found.add(str(rid))
                    handle.write(json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n")
        os.replace(part, folder / relative)
        unresolved = len(wanted) - len(found)
        if unresolved:
            log.warning("bulk export: %d %s reference(s) not found on the server", unresolved, resource_type)
        return ExportFile("output", resource_type, relative, len(found), (folder / relative).stat().st_size), unresolved


    def _deleted_from_history(self, folder: Path) -> ExportFile | None:
        """Resources of the exported types whose newest history entry since ``since`` is a DELETE."""
        deleted: list[str] = []
        for resource_type in self.types:
            newest_seen: set[str] = set()
            query = urlencode({"_since": self.since, "_count": 1000})
            bundle: dict[str, Any] | None = self.client.follow(f"{resource_type}/_history?{query}")
            while bundle is not None:
                for entry in bundle.get("entry") or []:
                    request = entry.get("request") if isinstance(entry, dict) else None
                    if not isinstance(request, dict):
                        continue
                    key = _reference_key(str(request.get("url") or ""))
                    if key is None or key in newest_seen:
                        continue
                    newest_seen.add(key)
                    if str(request.get("method", "")).upper() == "DELETE":
                        deleted.append(key)
                following = next_link(bundle)
                bundle = self.client.follow(following) if following else None
        if not deleted:
            return None
        relative = "deleted/Bundle.history.ndjson"
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = 0
        with open(path, "w", encoding="utf-8") as handle:
            for start in range(0, len(deleted), ID_CHUNK):
                entries = [{"request": {"method": "DELETE", "url": key}} for key in deleted[start:start + ID_CHUNK]]
                handle.write(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}) + "\n")
                lines += 1
        log.info("bulk export: %d deletion(s) read from history (the manifest has no deleted list)", len(deleted))
        return ExportFile("deleted", "Bundle", relative, lines, path.stat().st_size)


# ------------------------------------------------------------------------------------------------ whole records


@dataclass
class RecordsRead:
    """What :func:`read_whole_records` wrote: patients found and patients the server no longer has."""

    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    resources: dict[str, int] = field(default_factory=dict)


def read_whole_records(client: FhirClient, patient_ids: Iterable[str], out_dir: str | os.PathLike[str], *,
                       chunk_size: int = 20) -> RecordsRead:
    """Each patient's whole record, as an export of :data:`COMPARTMENT_TYPES` holds it, into an NDJSON folder.

    Why: a ``_since`` export returns only a patient's changed resources, and a twin needs the whole record.
    The records are read by FHIR search, ``chunk_size`` patients per batch (``Observation?patient=a,b,c``
    with the Medications the records reference ``_include`` d), the read every twin of one patient uses; a
    patient the server no longer has (deleted after the export) is ``missing``. Each resource is written
    once (``<Type>.ndjson``); the folder appears only when complete.
    """
    types = {t: RECORD_TYPES.get(t, "patient") for t in COMPARTMENT_TYPES if t != "Patient"}
    target = Path(out_dir)
    partial = target.with_name(target.name + ".partial")
    for folder in (partial, target):
        if folder.exists():
            shutil.rmtree(folder)  # our own leftover: the step is redone whole
    partial.mkdir(parents=True)
    result = RecordsRead()
    written: set[tuple[str, str]] = set()
    handles: dict[str, Any] = {}
    ids = list(dict.fromkeys(patient_ids))
    try:
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            try:
                records = client.fetch_patients_records(chunk, types, include=RECORD_INCLUDES, chunk_size=chunk_size)
            except FhirNotFound:  # one of them is gone: read them one by one to learn which
                records = {}
                for patient_id in chunk:
                    try:
                        records.update(client.fetch_patients_records([patient_id], types, include=RECORD_INCLUDES))
                    except FhirNotFound:
                        result.missing.append(patient_id)
            for patient_id, resources in records.items():
                result.found.append(patient_id)
                for resource in resources:
                    key = (str(resource.get("resourceType")), str(resource.get("id")))
                    if key in written or not _RESOURCE_TYPE.match(key[0]):
                        continue
                    written.add(key)
                    if key[0] not in handles:
                        handles[key[0]] = open(partial / f"{key[0]}.ndjson", "w", encoding="utf-8")  # noqa: SIM115
                    handles[key[0]].write(json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n")
                    result.resources[key[0]] = result.resources.get(key[0], 0) + 1
    finally:
        for handle in handles.values():
            handle.close()
    partial.rename(target)
    result.resources = dict(sorted(result.resources.items()))
    return result


def touched_patients(folder: str | os.PathLike[str]) -> tuple[set[str], set[str]]:
    """(patient ids, shared ``Type/id`` s) the output files of an export folder hold resources of."""
    patients: set[str] = set()
    shared: set[str] = set()
    for resource_type, paths in NdjsonSource(folder).files.items():
        for path in paths:
            for resource in _output_lines(path):
                if is_fhirtwin_generated(resource):
                    continue  # our own results (a write-back's) change no twin
                owner = patient_reference_id(resource) if isinstance(resource, dict) else None
                if owner is not None:
                    patients.add(owner)
                elif isinstance(resource, dict) and isinstance(resource.get("id"), str):
                    shared.add(f"{resource_type}/{resource['id']}")
    return patients, shared


def _output_lines(path: Path) -> Iterator[Any]:
    """The JSON value of each line of an export's output file (a line that is not JSON: BulkManifestError)."""
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except ValueError:
                raise BulkManifestError(f"output file {path.name} holds a line that is not JSON") from None


# ------------------------------------------------------------------------------------------------ reading


def deleted_references(folder: str | os.PathLike[str]) -> Iterator[str]:
    """``Type/id`` of every resource the ``deleted`` files of an export folder name (for incremental runs)."""
    for path in sorted((Path(folder) / "deleted").glob("*.ndjson")):
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    bundle = json.loads(raw)
                except ValueError:
                    raise BulkManifestError(f"deleted file {path.name} line {line_no} is not JSON") from None
                entries = bundle.get("entry") if isinstance(bundle, dict) else None
                for entry in entries if isinstance(entries, list) else []:
                    request = entry.get("request") if isinstance(entry, dict) else None
                    if not isinstance(request, dict) or str(request.get("method", "")).upper() != "DELETE":
                        continue
                    key = _reference_key(str(request.get("url") or ""))
                    if key is not None:
                        yield key


def _referenced_ids(folder: Path, resource_type: str) -> set[str]:
    """Ids of ``resource_type`` named by the include elements (RECORD_INCLUDES) of the output files."""
    elements: dict[str, list[str]] = {}
    for item in RECORD_INCLUDES:
        source_type, param = item.split(":", 1)
        elements.setdefault(source_type, []).append(f"{param}Reference")
    ids: set[str] = set()
    for source_type, names in elements.items():
        for path in sorted(folder.glob(f"{source_type}.*.ndjson")):
            for resource in _output_lines(path):
                for name in names:
                    target = resource.get(name) if isinstance(resource, dict) else None
                    reference = target.get("reference") if isinstance(target, dict) else None
                    key = _reference_key(reference) if isinstance(reference, str) else None
                    if key is not None and key.startswith(resource_type + "/"):
                        ids.add(key.split("/", 1)[1])
    return ids


def _reference_key(reference: str) -> str | None:
    """``Type/id`` of a literal reference (absolute, versioned); contained ``#x`` and malformed ones: None."""
    if reference.startswith("#"):
        return None
    parts = reference.split("?", 1)[0].split("/_history")[0].rstrip("/").split("/")
    if len(parts) < 2 or not _RESOURCE_TYPE.match(parts[-2]) or not parts[-1]:
        return None
    return f"{parts[-2]}/{parts[-1]}"


class _LineCounter:
    """Counts non-blank lines of a byte stream fed in chunks."""

    def __init__(self) -> None:
        self.lines = 0
        self._open_line = False

    def feed(self, chunk: bytes) -> None:
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            if self._open_line or piece.strip():
                self.lines += 1
            self._open_line = False
        if pieces[-1].strip():
            self._open_line = True

    def close(self) -> int:
        if self._open_line:
            self.lines += 1
            self._open_line = False
        return self.lines


def _instant(value: str | datetime) -> str:
    """A FHIR instant for ``_since`` (a datetime needs a time zone: a local time is ambiguous)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("since needs a time zone")
        return value.isoformat()
    text = value.strip()
    if not _INSTANT.match(text):
        raise ValueError(f"{value!r} is not a FHIR instant (e.g. 2026-01-31T12:00:00Z)")
    return text


def _retry_after(response: requests.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"), time.time())


def _is_transient(exc: FhirError) -> bool:
    if isinstance(exc, FhirTimeout | FhirConnectionError):
        return True
    if exc.status in TRANSIENT_STATUSES:
        return True
    return bool(exc.status and exc.status >= 500 and any(i.get("code") in TRANSIENT_CODES for i in exc.issues))


def _requires_token(manifest: Mapping[str, Any]) -> bool:
    value = manifest.get("requiresAccessToken", True)
    if not isinstance(value, bool):
        raise BulkManifestError("manifest requiresAccessToken is not a boolean")
    return value


def _parse_manifest(raw: bytes, status_url: str) -> dict[str, Any]:
    """The manifest, checked: an output list, a transactionTime, and file entries with absolute URLs."""
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BulkManifestError("export manifest is not JSON", url=status_url) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
        raise BulkManifestError("export manifest has no output list", url=status_url)
    if not isinstance(manifest.get("transactionTime"), str) or not manifest["transactionTime"]:
        raise BulkManifestError("export manifest has no transactionTime", url=status_url)
    requires_token = _requires_token(manifest)
    for kind in ("output", "error", "deleted"):
        items = manifest.get(kind) or []
        if not isinstance(items, list):
            raise BulkManifestError(f"export manifest {kind} is not a list", url=status_url)
        for item in items:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise BulkManifestError(f"export manifest {kind} entry without an absolute url", url=status_url)
            resource_type = item.get("type")
            if (kind == "output" or resource_type is not None) and not (
                    isinstance(resource_type, str) and _RESOURCE_TYPE.match(resource_type)):
                raise BulkManifestError(f"export manifest {kind} entry without a valid type", url=status_url)
            if requires_token and not same_origin(url, status_url):
                raise BulkManifestError("export manifest needs the access token for a file on another origin; "
                                        "refusing to send it there", url=status_url)
    return manifest

