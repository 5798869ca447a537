"""NDJSON sources: Bulk Data export folders read like a FHIR server.

:class:`NdjsonSource` offers the read interface the adapters use on a live server
(``fetch_patient_record``, ``fetch_patients_records``, ``search_all(type, {"patient": id})``, ``read``)
over a folder of ``<Type>.ndjson`` / ``<Type>.<n>.ndjson`` files, optionally gzip-compressed
(``.ndjson.gz``). Files are streamed line by line; a malformed line raises
:class:`~fhirtwin.fhir.errors.NdjsonFormatError` with the file name and line number: bad data is never
silently skipped. Blank lines carry no data and are ignored.

The ``$export`` client that makes such folders is :mod:`fhirtwin.population.bulk`.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fhirtwin.fhir.client import (
    patient_reference_id,
)
from fhirtwin.fhir.errors import (
    FhirError,
    FhirNotFound,
    NdjsonFormatError,
)

__all__ = ["NdjsonSource"]

log = logging.getLogger("fhirtwin.fhir")

_FILE_NAME = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)(?:\.(?P<n>\d+))?\.ndjson(?P<gz>\.gz)?$")
NDJSON = "application/fhir+ndjson"


class NdjsonSource:
    """Read-only FHIR source over a Bulk Data export folder, with a lazily built per-patient offset index."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"not a folder: {self.folder.name}")
        files: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for path in self.folder.iterdir():
            match = _FILE_NAME.match(path.name)
            if match and path.is_file():
                files[match["type"]].append((int(match["n"] or 0), path))
        self.files: dict[str, list[Path]] = {t: [p for _, p in sorted(v)] for t, v in sorted(files.items())}
        # type -> patient id -> [(path, offset)]; built per type on first use
        self._index: dict[str, dict[str, list[tuple[Path, int]]]] = {}

    def types(self) -> list[str]:
        """Resource types that have at least one file."""
        return list(self.files)

    # -------------------------------------------------------------- streaming

    def iter_resources(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Every resource of one type, streamed in file order."""
        for path in self.files.get(resource_type, []):
            for _, _, resource in _iter_file(path, resource_type):
                yield resource

    def iter_patients(self) -> Iterator[dict[str, Any]]:
        """Every Patient resource."""
        return self.iter_resources("Patient")

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """The resource with that id; raises :class:`FhirNotFound`."""
        for resource in self.iter_resources(resource_type):
            if resource.get("id") == resource_id:
                return resource
        raise FhirNotFound(f"{resource_type} not found in the NDJSON folder")

    def search_all(
        self, resource_type: str, params: Mapping[str, Any] | None = None, *, max_pages: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subset of FHIR search: ``patient``/``subject`` (Patient references or ids, comma = OR) and ``_id``.

        Other parameters raise instead of being ignored (ignoring would return too much). ``_count`` and
        ``max_pages`` are accepted for interface parity and have no effect.
        """
        del max_pages
        wanted_patients: set[str] | None = None
        wanted_ids: set[str] | None = None
        for key, value in (params or {}).items():
            values = {v.strip() for v in str(value).split(",") if v.strip()}
            if key in ("patient", "subject"):
                wanted_patients = {v.rsplit("/", 1)[-1] for v in values}
            elif key == "_id":
                wanted_ids = values
            elif key != "_count":
                raise FhirError(f"search parameter {key!r} is not supported by NdjsonSource")
        if wanted_patients is not None and wanted_ids is None and resource_type != "Patient":
            index = self._type_index(resource_type)
            for patient_id in sorted(wanted_patients):
                yield from self._load(index.get(patient_id, []), resource_type)
            return
        for resource in self.iter_resources(resource_type):
            if wanted_ids is not None and resource.get("id") not in wanted_ids:
                continue
            if wanted_patients is not None and patient_reference_id(resource) not in wanted_patients:
                continue
            yield resource

    # -------------------------------------------------------------- patient records

    def fetch_patient_record(
        self, patient_id: str, types: Iterable[str] | Mapping[str, str], *, include: Iterable[str] = (),
        extra_searches: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """The Patient followed by its resources of ``types`` and what ``include`` (``Type:param``) adds.

        An ``include`` resolves the references of that type's resources to resources of the folder
        (e.g. a MedicationRequest's ``medicationReference``). ``extra_searches`` are accepted for parity
        with the FHIR client and add nothing: a folder holds no results of earlier runs.
        """
        del extra_searches
        patient_index = self._type_index("Patient")
        if patient_id not in patient_index:
            raise FhirNotFound("Patient not found in the NDJSON folder")
        record = list(self._load(patient_index[patient_id], "Patient"))[:1]
        includes = [i.split(":", 1) for i in include]
        for resource_type in _types(types):
            found = list(self._load(self._type_index(resource_type).get(patient_id, []), resource_type))
            record.extend(found)
            for source_type, param in includes:
                if source_type == resource_type:
                    record.extend(self._referenced(found, param))
        return record

    def _referenced(self, resources: list[dict[str, Any]], param: str) -> Iterator[dict[str, Any]]:
        """Resources the ``param`` element (``medication`` → ``medicationReference``) of each resource names."""
        seen: set[str] = set()
        for resource in resources:
            ref = (resource.get(f"{param}Reference") or {}).get("reference") if isinstance(
                resource.get(f"{param}Reference"), dict) else None
            if not isinstance(ref, str) or ref.count("/") < 1 or ref in seen:
                continue
            seen.add(ref)
            rtype, rid = ref.split("/_history")[0].split("/")[-2:]
            try:
                yield self.read(rtype, rid)
            except FhirNotFound:
                continue  # an unresolved reference is the adapters' to ledger

    def fetch_patients_records(
        self, patient_ids: Iterable[str], types: Iterable[str] | Mapping[str, str], *, include: Iterable[str] = ()
    ) -> dict[str, list[dict[str, Any]]]:
        """``{patient_id: record}`` for several patients, in input order."""
        return {pid: self.fetch_patient_record(pid, types, include=include) for pid in dict.fromkeys(patient_ids)}

    def iter_patient_records(
        self, types: Iterable[str] | Mapping[str, str], *, include: Iterable[str] = ()
    ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """``(patient_id, record)`` for every patient in the folder (population runs)."""
        for patient_id in list(self._type_index("Patient")):
            yield patient_id, self.fetch_patient_record(patient_id, types, include=include)

    def _type_index(self, resource_type: str) -> dict[str, list[tuple[Path, int]]]:
        if resource_type not in self._index:
            index: dict[str, list[tuple[Path, int]]] = defaultdict(list)
            for path in self.files.get(resource_type, []):
                for _, offset, resource in _iter_file(path, resource_type):
                    owner = patient_reference_id(resource)
                    if owner is not None:
                        index[owner].append((path, offset))
            self._index[resource_type] = dict(index)
        return self._index[resource_type]

    def _load(self, locations: list[tuple[Path, int]], resource_type: str) -> Iterator[dict[str, Any]]:
        by_file: dict[Path, list[int]] = defaultdict(list)
        for path, offset in locations:
            by_file[path].append(offset)
        for path, offsets in by_file.items():
            with _open(path) as handle:
                for offset in sorted(offsets):
                    handle.seek(offset)
                    yield _parse_line(handle.readline(), path, None, resource_type)


def _types(types: Iterable[str] | Mapping[str, str]) -> list[str]:
    return [t for t in types if t != "Patient"]


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _iter_file(path: Path, resource_type: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, byte offset, resource) for each non-blank line of an NDJSON file."""
    offset = 0
    with _open(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            yield line_no, start, _parse_line(raw, path, line_no, resource_type)


def _parse_line(raw: bytes, path: Path, line_no: int | None, resource_type: str) -> dict[str, Any]:
    where = line_no if line_no is not None else 0
    try:
        resource = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NdjsonFormatError(f"not valid JSON ({exc.__class__.__name__})", file=path.name, line=where) from None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise NdjsonFormatError("line is not a FHIR resource (no resourceType)", file=path.name, line=where)
    if resource["resourceType"] != resource_type:
        raise NdjsonFormatError(
            f"{resource['resourceType']} found in a {resource_type} file", file=path.name, line=where
        )
    return resource
