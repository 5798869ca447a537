"""NDJSON -> Parquet staging: a folder of Bulk Data NDJSON streamed into partitions of whole patients.

Why: a population run simulates a partition's patients together, so each partition must hold every resource
of its patients, and staging must not hold the export in memory. Lines are read one at a time; rows wait in
per-partition buffers whose total size is capped (``max_buffer_bytes``), and the largest buffer is written
out as a Parquet row group whenever the cap would be passed.

Layout of a staged folder::

    manifest.json                   format, bucket count, resources per type, source file names
    patients/bucket-00017.parquet   every resource of the patients with bucket_of(patient id) == 17
    shared.parquet                  resources that name no patient (Medication, Practitioner, ...)

A resource's patient is its own id for a Patient, else its ``subject`` or ``patient`` reference to a Patient
(:func:`fhirtwin.fhir.client.patient_reference_id`). Columns (:data:`SCHEMA`; all nullable but the first
four of a patient row):

* ``patient_id``, ``resource_type``, ``resource_id``;
* ``resource_json``: the NDJSON line itself (without its line break), so every resource round-trips exactly;
* ``status``: the resource's ``status`` when it is a string;
* ``code_system``, ``code``: the first coding of ``code`` (or of ``medicationCodeableConcept``);
* ``effective``: the clinically relevant time as written (ISO 8601 sorts as text): Observation and
  DiagnosticReport ``effective[x]`` (a Period's start) or ``issued``, Condition ``onset[x]`` or
  ``recordedDate``, Procedure ``performed[x]``, MedicationRequest ``authoredOn``, MedicationDispense
  ``whenHandedOver``, MedicationStatement ``effective[x]``;
* ``value``, ``unit``: an Observation's ``valueQuantity`` (the UCUM ``code``, else ``unit``); components
  (blood-pressure panels) stay in ``resource_json``.

An incremental run stages on top of an earlier staged folder (``base``): the earlier partitions are copied
row group by row group without the patients named in ``drop_patients`` (changed or deleted), then the new
NDJSON (the changed patients' whole records) is staged into the same buckets; shared resources of the new
NDJSON replace the earlier ones with the same ``Type/id``. The result is again a complete snapshot.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fhirtwin.adapters.reads import RECORD_INCLUDES
from fhirtwin.fhir.client import patient_reference_id
from fhirtwin.fhir.errors import NdjsonFormatError
from fhirtwin.fhir.ndjson import NdjsonSource

FORMAT = "fhirtwin-stage/1"
#: Partitions are sized for about this many patients when the bucket count is not given.
PATIENTS_PER_PARTITION = 1000
#: Each bucket keeps one Parquet file open while staging, so this also bounds open files.
MAX_BUCKETS = 1024
DEFAULT_MAX_BUFFER_BYTES = 256 << 20
#: Buffer accounting per row on top of the line's length: the Python objects of the typed columns (measured
#: about 330 bytes for an Observation row with interned systems, codes and units), so the cap is real memory.
ROW_OVERHEAD_BYTES = 400
SHARED_FILE = "shared.parquet"
PATIENTS_DIR = "patients"

SCHEMA = pa.schema([
    pa.field("patient_id", pa.string()),
    pa.field("resource_type", pa.string(), nullable=False),
    pa.field("resource_id", pa.string(), nullable=False),
    pa.field("resource_json", pa.string(), nullable=False),
    pa.field("status", pa.string()),
    pa.field("code_system", pa.string()),
    pa.field("code", pa.string()),
    pa.field("effective", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("unit", pa.string()),
])
_COLUMNS = SCHEMA.names

_EFFECTIVE = {
    "Observation": ("effectiveDateTime", "effectiveInstant", "effectivePeriod", "issued"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod"),
    "MedicationRequest": ("authoredOn",),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod", "dateAsserted"),
}


def bucket_of(patient_id: str, buckets: int) -> int:
    """The partition of a patient: CRC-32 of the id's UTF-8 bytes modulo ``buckets`` (stable across runs)."""
    return zlib.crc32(patient_id.encode("utf-8")) % buckets


def partition_name(bucket: int) -> str:
    """The name (file stem) of a bucket's partition: ``bucket-00017``."""
    return f"bucket-{bucket:05d}"


@dataclass
class StageReport:
    """Counts of a staging run; ``peak_buffered_bytes`` never exceeds the ``max_buffer_bytes`` it was given."""

    buckets: int
    patients: int = 0
    resources: dict[str, int] = field(default_factory=dict)
    shared_resources: int = 0
    partitions: int = 0
    row_groups: int = 0
    peak_buffered_bytes: int = 0
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES


class _Buffer:
    """Rows of one output file waiting to be written as a row group."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[tuple[Any, ...]] = []
        self.bytes = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: tuple[Any, ...], size: int) -> None:
        self.rows.append(row)
        self.bytes += size

    def flush(self) -> int:
        """Write the buffered rows as one row group; returns how many bytes were released."""
        if not self.rows:
            return 0
        columns = zip(*self.rows, strict=True)
        table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)],
                                     schema=SCHEMA)
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd")
        self.writer.write_table(table)
        released, self.bytes = self.bytes, 0
        self.rows = []
        return released


class _Stager:
    """Routes rows to per-bucket buffers and keeps their total under ``max_buffer_bytes``."""

    def __init__(self, root: Path, buckets: int, max_buffer_bytes: int) -> None:
        self.root = root
        self.buckets = buckets
        self.max_buffer_bytes = max_buffer_bytes
        self.buffers: dict[int, _Buffer] = {}
        self.shared = _Buffer(root / SHARED_FILE)
        self.buffered = 0
        self.report = StageReport(buckets=buckets, max_buffer_bytes=max_buffer_bytes)

    def add(self, patient_id: str | None, row: tuple[Any, ...]) -> None:
        size = len(row[3]) + ROW_OVERHEAD_BYTES
        if patient_id is None:
            buffer = self.shared
            self.report.shared_resources += 1
        else:
            buffer = self._bucket(bucket_of(patient_id, self.buckets))
        buffer.add(row, size)
        self.buffered += size
        while self.buffered > self.max_buffer_bytes:
            self._flush(max((*self.buffers.values(), self.shared), key=lambda b: b.bytes))
        self.report.peak_buffered_bytes = max(self.report.peak_buffered_bytes, self.buffered)

    def _bucket(self, bucket: int) -> _Buffer:
        if bucket not in self.buffers:
            self.buffers[bucket] = _Buffer(self.root / PATIENTS_DIR / f"{partition_name(bucket)}.parquet")
        return self.buffers[bucket]

    def copy(self, buffer: _Buffer, table: pa.Table) -> None:
        """Rows of an earlier staged folder, written as they are (after the buffer's own rows)."""
        if table.num_rows == 0:
            return
        if buffer.bytes:
            self._flush(buffer)
        if buffer.writer is None:
            buffer.path.parent.mkdir(parents=True, exist_ok=True)
            buffer.writer = pq.ParquetWriter(buffer.path, SCHEMA, compression="zstd")
        buffer.writer.write_table(table.select(_COLUMNS).cast(SCHEMA))
        self.report.row_groups += 1

    def _flush(self, buffer: _Buffer) -> None:
        self.buffered -= buffer.flush()
        self.report.row_groups += 1

    def close(self) -> None:
        for buffer in (*self.buffers.values(), self.shared):
            if buffer.bytes:
                self._flush(buffer)
            if buffer.writer is not None:
                buffer.writer.close()
        self.report.partitions = sum(1 for b in self.buffers.values() if b.writer is not None)


def stage_ndjson(
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    buckets: int | None = None,
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    on_resource: Callable[[], object] | None = None,
    base: str | os.PathLike[str] | None = None,
    drop_patients: Collection[str] = (),
    drop_shared: Collection[str] = (),
) -> StageReport:
    """Stage every ``<Type>[.<n>].ndjson[.gz]`` file of ``source_dir`` into ``out_dir`` (see the module doc).

    ``buckets`` defaults to one per :data:`PATIENTS_PER_PARTITION` patients (counted from the Patient files,
    at most :data:`MAX_BUCKETS`). The output appears under ``out_dir`` only when complete (it is written
    beside it and renamed), so an interrupted run leaves nothing half-staged. A malformed line raises
    :class:`~fhirtwin.fhir.errors.NdjsonFormatError` naming the file and line.

    With ``base`` (an earlier staged folder; its bucket count is kept) the result is ``base`` updated: its
    patients minus ``drop_patients`` and minus every patient whose Patient ``source_dir`` holds, plus
    ``source_dir``'s records; its shared resources minus ``drop_shared`` (``Type/id``) and those
    ``source_dir`` replaces.
    """
    source = NdjsonSource(source_dir)
    if max_buffer_bytes < 1:
        raise ValueError("max_buffer_bytes must be >= 1")
    base_buckets = staged_buckets(base) if base is not None else None
    if base_buckets is not None and buckets not in (None, base_buckets):
        raise ValueError(f"staging on an earlier folder keeps its {base_buckets} buckets")
    if buckets is None:
        buckets = base_buckets or max(1, min(MAX_BUCKETS, math.ceil(_count_lines(source.files.get("Patient", []))
                                                                    / PATIENTS_PER_PARTITION)))
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target.name} is not empty; choose a new folder")
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # our own leftover of an interrupted run
    partial.mkdir(parents=True)

    stager = _Stager(partial, buckets, max_buffer_bytes)
    resources: dict[str, int] = {}
    sources: list[str] = []
    if base is not None:
        replaced = {*drop_patients, *(r["id"] for _, r in _iter_files(source.files.get("Patient", []), "Patient"))}
        _copy_base_patients(stager, Path(base), replaced, resources)
        sources.append(f"{Path(base).name} (earlier stage, {len(replaced)} patient(s) replaced or dropped)")
    new_shared: set[str] = set()
    for resource_type, paths in source.files.items():
        for path in paths:
            sources.append(path.name)
            for text, resource in _iter_lines(path, resource_type):
                owner = patient_reference_id(resource)
                patient_id = sys.intern(owner) if owner is not None else None
                if patient_id is None:
                    new_shared.add(f"{resource_type}/{resource['id']}")
                stager.add(patient_id, _row(patient_id, resource_type, text, resource))
                resources[resource_type] = resources.get(resource_type, 0) + 1
                if on_resource is not None:
                    on_resource()
    if base is not None:
        _copy_base_shared(stager, Path(base), {*drop_shared, *new_shared}, resources)
    stager.close()
    report = stager.report
    report.resources = dict(sorted(resources.items()))
    report.patients = resources.get("Patient", 0)
    manifest = {
        "format": FORMAT,
        "buckets": buckets,
        "partitioning": "crc32(utf-8 patient id) mod buckets",
        "patients": report.patients,
        "resources": report.resources,
        "shared_resources": report.shared_resources,
        "sources": sources,
        "columns": _COLUMNS,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if target.exists():
        target.rmdir()
    partial.rename(target)
    return report


def staged_buckets(stage_dir: str | os.PathLike[str]) -> int:
    """The bucket count of a complete staged folder (its manifest)."""
    try:
        manifest = json.loads((Path(stage_dir) / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"{Path(stage_dir).name} is not a complete staged folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("buckets"),
                                                                                            int):
        raise ValueError(f"{Path(stage_dir).name} is not a complete staged folder")
    return int(manifest["buckets"])


def _count_types(table: pa.Table, resources: dict[str, int]) -> None:
    for item in pc.value_counts(table["resource_type"]).to_pylist():
        resources[item["values"]] = resources.get(item["values"], 0) + int(item["counts"])


def _copy_base_patients(stager: _Stager, base: Path, dropped: set[str], resources: dict[str, int]) -> None:
    """Every patient row of ``base`` whose patient is not ``dropped``, one row group at a time."""
    drop = pa.array(sorted(dropped), type=pa.string())
    for path in list_partitions(base):
        bucket = int(path.stem.rsplit("-", 1)[1])
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.invert(pc.is_in(table["patient_id"], value_set=drop)))
            stager.copy(stager._bucket(bucket), table)
            _count_types(table, resources)


def _copy_base_shared(stager: _Stager, base: Path, dropped: set[str], resources: dict[str, int]) -> None:
    """The shared resources of ``base`` except the ``Type/id`` s in ``dropped``."""
    path = base / SHARED_FILE
    if not path.exists():
        return
    table = pq.read_table(path)
    keys = pc.binary_join_element_wise(table["resource_type"], table["resource_id"], "/")
    table = table.filter(pc.invert(pc.is_in(keys, value_set=pa.array(sorted(dropped), type=pa.string()))))
    stager.copy(stager.shared, table)
    stager.report.shared_resources += table.num_rows
    _count_types(table, resources)


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _count_lines(paths: Iterable[Path]) -> int:
    count = 0
    for path in paths:
        with _open(path) as handle:
            count += sum(1 for raw in handle if raw.strip())
    return count


def _iter_files(paths: Iterable[Path], resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in paths:
        yield from _iter_lines(path, resource_type)


def _iter_lines(path: Path, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line text, parsed resource) for each non-blank line; bad lines raise with file name and line number."""
    with _open(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                resource = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise NdjsonFormatError(f"not valid JSON ({exc.__class__.__name__})", file=path.name,
                                        line=line_no) from None
            if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
                raise NdjsonFormatError(f"line is not a {resource_type} resource", file=path.name, line=line_no)
            if not isinstance(resource.get("id"), str) or not resource["id"]:
                raise NdjsonFormatError("resource has no id", file=path.name, line=line_no)
            yield text, resource


def _row(patient_id: str | None, resource_type: str, text: str, resource: dict[str, Any]) -> tuple[Any, ...]:
    """One row in :data:`SCHEMA` order."""
    status = resource.get("status")
    concept = resource.get("code") or resource.get("medicationCodeableConcept")
    code_system = code = None
    if isinstance(concept, dict):
        codings = concept.get("coding")
        if isinstance(codings, list) and codings and isinstance(codings[0], dict):
            code_system, code = _text(codings[0].get("system")), _text(codings[0].get("code"))
    value = unit = None
    quantity = resource.get("valueQuantity") if resource_type == "Observation" else None
    if isinstance(quantity, dict):
        raw_value = quantity.get("value")
        if isinstance(raw_value, int | float) and not isinstance(raw_value, bool):
            value = float(raw_value)
        unit = _text(quantity.get("code")) or _text(quantity.get("unit"))
    return (patient_id, resource_type, resource["id"], text, _text(status), code_system, code,
            _effective(resource_type, resource), value, unit)


def _text(value: Any) -> str | None:
    """A string element, interned: systems, codes, statuses and units repeat across millions of rows."""
    return sys.intern(value) if isinstance(value, str) else None


def _effective(resource_type: str, resource: dict[str, Any]) -> str | None:
    for key in _EFFECTIVE.get(resource_type, ()):
        value = resource.get(key)
        if isinstance(value, dict):
            value = value.get("start")
        if isinstance(value, str):
            return value
    return None


# ------------------------------------------------------------------------------------------------ reading


def list_partitions(stage_dir: str | os.PathLike[str]) -> list[Path]:
    """The patient partitions of a staged folder, in bucket order (empty buckets have no file)."""
    return sorted((Path(stage_dir) / PATIENTS_DIR).glob("bucket-*.parquet"))


def staged_patients(stage_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Patient id -> partition name of every patient (with a Patient resource) of a staged folder."""
    found: dict[str, str] = {}
    for path in list_partitions(stage_dir):
        table = pq.read_table(path, columns=["patient_id", "resource_type"])
        ids = table.filter(pc.equal(table["resource_type"], "Patient"))["patient_id"].to_pylist()
        found.update((str(pid), path.stem) for pid in ids)
    return found


def resource_owners(stage_dir: str | os.PathLike[str], references: Iterable[str]) -> dict[str, str]:
    """``Type/id`` -> patient id for the given references that a staged folder holds as patient rows."""
    wanted = sorted({r for r in references if "/" in r})
    if not wanted:
        return {}
    value_set = pa.array(wanted, type=pa.string())
    found: dict[str, str] = {}
    for path in list_partitions(stage_dir):
        table = pq.read_table(path, columns=["patient_id", "resource_type", "resource_id"])
        keys = pc.binary_join_element_wise(table["resource_type"], table["resource_id"], "/")
        mask = pc.is_in(keys, value_set=value_set)
        for key, owner in zip(keys.filter(mask).to_pylist(), table["patient_id"].filter(mask).to_pylist(),
                              strict=True):
            found[str(key)] = str(owner)
    return found


class SharedResources:
    """The resources that name no patient, looked up by reference (``Medication/abc``); parsed on use."""

    def __init__(self, texts: dict[str, str]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    def __contains__(self, reference: object) -> bool:
        return reference in self._texts

    def get(self, reference: str) -> dict[str, Any] | None:
        """The resource a ``Type/id`` reference (absolute URLs and ``/_history`` allowed) names, if staged."""
        key = _reference_key(reference)
        text = self._texts.get(key) if key else None
        return json.loads(text) if text is not None else None


def read_shared(stage_dir: str | os.PathLike[str]) -> SharedResources:
    """The shared table of a staged folder (read once and passed to :func:`iter_patient_records`)."""
    path = Path(stage_dir) / SHARED_FILE
    if not path.exists():
        return SharedResources({})
    table = pq.read_table(path, columns=["resource_type", "resource_id", "resource_json"])
    keys = (f"{t}/{i}" for t, i in zip(table["resource_type"].to_pylist(), table["resource_id"].to_pylist(),
                                       strict=True))
    return SharedResources(dict(zip(keys, table["resource_json"].to_pylist(), strict=True)))


def iter_patient_records(
    partition: str | os.PathLike[str],
    *,
    shared: SharedResources | None = None,
    include: Iterable[str] = RECORD_INCLUDES,
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(patient_id, record)`` for each patient of one partition, in patient id order.

    A record is the Patient, then the patient's other resources in staging order, then the shared resources
    its ``include`` elements reference (``MedicationRequest:medication`` -> ``medicationReference``), each
    once -- the shape of :meth:`fhirtwin.fhir.ndjson.NdjsonSource.fetch_patient_record`. Resources of a
    patient id that has no Patient resource are not yielded. ``shared`` defaults to the partition's folder's
    shared table; pass it when reading many partitions.
    """
    path = Path(partition)
    if shared is None:
        shared = read_shared(path.parent.parent)
    elements: dict[str, list[str]] = {}
    for item in include:
        source_type, param = item.split(":", 1)
        elements.setdefault(source_type, []).append(f"{param}Reference")
    table = pq.read_table(path, columns=["patient_id", "resource_type", "resource_json"])
    rank = pc.cast(pc.not_equal(table["resource_type"], "Patient"), pa.int8())
    table = table.append_column("rank", rank)
    order = pc.sort_indices(table, sort_keys=[("patient_id", "ascending"), ("rank", "ascending")])
    patient_ids = pc.take(table["patient_id"], order).to_pylist()
    ranks = pc.take(table["rank"], order).to_pylist()
    texts = pc.take(table["resource_json"], order)
    start = 0
    while start < len(patient_ids):
        end = start
        while end < len(patient_ids) and patient_ids[end] == patient_ids[start]:
            end += 1
        if ranks[start] == 0:
            record = [json.loads(t) for t in texts.slice(start, end - start).to_pylist()]
            record.extend(_included(record, elements, shared))
            yield patient_ids[start], record
        start = end


def _included(
    record: list[dict[str, Any]], elements: dict[str, list[str]], shared: SharedResources
) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    for resource in record:
        for element in elements.get(resource.get("resourceType", ""), ()):
            target = resource.get(element)
            reference = target.get("reference") if isinstance(target, dict) else None
            key = _reference_key(reference) if isinstance(reference, str) else None
            if key is None or key in seen:
                continue
            seen.add(key)
            found = shared.get(key)
            if found is not None:
                yield found


def _reference_key(reference: str) -> str | None:
    """``Type/id`` of a literal reference (``#contained`` and malformed references give None)."""
    parts = reference.split("/_history")[0].rstrip("/").split("/")
    if len(parts) < 2 or not parts[-2] or not parts[-1] or reference.startswith("#"):
        return None
    return f"{parts[-2]}/{parts[-1]}"
