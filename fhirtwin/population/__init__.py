"""Population scale: a whole panel as files, not as one process reading one patient at a time.

Why: a health system runs the twin over 100 k - 10 M patients. The steps here keep memory flat however
large the panel: :mod:`~fhirtwin.population.generate` writes a synthetic cohort as Bulk-Data-style NDJSON
(scale fixtures that need no server), and :mod:`~fhirtwin.population.stage` streams any NDJSON folder into
Parquet partitions that each hold whole patients, and :mod:`~fhirtwin.population.run` simulates those
partitions in parallel on Dask with a resumable ledger; :mod:`~fhirtwin.population.bulk` exports a population
from a FHIR server (a run may start from the server and, incrementally, simulate only what changed).
"""

from __future__ import annotations

from fhirtwin.population.generate import GenerateReport, write_cohort_ndjson
from fhirtwin.population.run import Ledger, PopulationReport, PopulationRunError, ServerSource, run_population
from fhirtwin.population.stage import (
    StageReport,
    bucket_of,
    iter_patient_records,
    list_partitions,
    read_shared,
    stage_ndjson,
)

__all__ = [
    "GenerateReport",
    "Ledger",
    "PopulationReport",
    "PopulationRunError",
    "ServerSource",
    "StageReport",
    "bucket_of",
    "iter_patient_records",
    "list_partitions",
    "read_shared",
    "run_population",
    "stage_ndjson",
    "write_cohort_ndjson",
]
