"""Scale fixtures: the synthetic cohort written as Bulk-Data-style NDJSON, patient by patient.

Why: population runs are tested on 100 k patients without a server, so the fixture must be written in
constant memory. Each patient is generated alone (:func:`fhirtwin.sandbox.cohort.generate_patient`, the same
resources as :func:`~fhirtwin.sandbox.cohort.generate_cohort`), its resources are appended to one file per
resource type (``Patient.ndjson``, ``Observation.ndjson``, ...) and it is dropped before the next one.

With ``workers > 1`` each process writes a contiguous block of patients to its own files
(``Observation.1.ndjson``, ``Observation.2.ndjson``, ...), the file naming of Bulk Data exports that
:class:`fhirtwin.fhir.ndjson.NdjsonSource` and :mod:`fhirtwin.population.stage` read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO

from fhirtwin.sandbox.cohort import DEFAULT_SEED, generate_patient

DEFAULT_REFERENCE_DATE = "2026-06-30"
_WRITE_BUFFER = 256 << 10


@dataclass(frozen=True)
class GenerateReport:
    """What was written: patient count, resources per type, and the file names (relative to the folder)."""

    patients: int
    resources: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    truth_file: str | None = None


def write_cohort_ndjson(
    out_dir: str | os.PathLike[str],
    n_patients: int,
    seed: int = DEFAULT_SEED,
    reference_date: str | date = DEFAULT_REFERENCE_DATE,
    *,
    workers: int = 1,
    truth: bool = False,
    on_patient: Callable[[], object] | None = None,
) -> GenerateReport:
    """Write patients ``1..n_patients`` as one NDJSON file per resource type into ``out_dir``.

    ``truth`` adds ``truth.ndjson`` (one ground-truth object per patient; not a FHIR file, so NDJSON readers
    skip it). ``on_patient`` is called after each patient (progress bars; only with ``workers == 1``).
    Refuses a folder that already holds NDJSON, so two cohorts are never mixed.
    """
    if n_patients < 0:
        raise ValueError("n_patients must be >= 0")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if any(p.name.endswith((".ndjson", ".ndjson.gz")) for p in folder.iterdir()):
        raise FileExistsError(f"{folder.name} already holds NDJSON files; choose an empty folder")
    ref = reference_date.isoformat() if isinstance(reference_date, date) else reference_date
    workers = max(1, min(workers, n_patients))
    if workers == 1:
        counts = _write_block(folder, 1, n_patients, seed, ref, None, truth, on_patient)
    else:
        step = -(-n_patients // workers)
        blocks = [(lo, min(lo + step - 1, n_patients)) for lo in range(1, n_patients + 1, step)]
        counts = Counter()
        with ProcessPoolExecutor(max_workers=len(blocks)) as pool:
            futures = [pool.submit(_write_block, folder, lo, hi, seed, ref, part, truth, None)
                       for part, (lo, hi) in enumerate(blocks, start=1)]
            for future in futures:
                counts.update(future.result())
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".ndjson") and p.name[0].isupper())
    return GenerateReport(
        patients=n_patients,
        resources=dict(sorted(counts.items())),
        files=files,
        truth_file=next((p.name for p in sorted(folder.glob("truth*.ndjson"))), None) if truth else None,
    )


def _write_block(
    folder: Path, first: int, last: int, seed: int, reference_date: str, part: int | None, truth: bool,
    on_patient: Callable[[], object] | None,
) -> Counter[str]:
    """Patients ``first..last`` into ``<Type>[.<part>].ndjson``; at most one patient is in memory."""
    suffix = f".{part}.ndjson" if part is not None else ".ndjson"
    handles: dict[str, IO[str]] = {}
    counts: Counter[str] = Counter()
    ref = date.fromisoformat(reference_date)
    truth_handle = (open(folder / f"truth{suffix}", "w", encoding="utf-8", buffering=_WRITE_BUFFER)  # noqa: SIM115
                    if truth else None)
    try:
        for k in range(first, last + 1):
            bundle, patient_truth = generate_patient(k, seed, ref)
            for entry in bundle["entry"]:
                resource = entry["resource"]
                rtype = resource["resourceType"]
                handle = handles.get(rtype)
                if handle is None:
                    handle = handles[rtype] = open(  # noqa: SIM115 - closed in finally
                        folder / f"{rtype}{suffix}", "w", encoding="utf-8", buffering=_WRITE_BUFFER)
                handle.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False))
                handle.write("\n")
                counts[rtype] += 1
            if truth_handle is not None:
                truth_handle.write(json.dumps(patient_truth, sort_keys=True, separators=(",", ":")) + "\n")
            if on_patient is not None:
                on_patient()
    finally:
        for handle in handles.values():
            handle.close()
        if truth_handle is not None:
            truth_handle.close()
    return counts
