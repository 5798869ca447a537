"""Population scale: a whole panel as files, not as one process reading one patient at a time.

Why: a health system runs the twin over 100 k - 10 M patients. The steps here keep memory flat however
large the panel: :mod:`~fhirtwin.population.generate` writes a synthetic cohort as Bulk-Data-style NDJSON
(scale fixtures that need no server), and :mod:`~fhirtwin.population.stage` streams any NDJSON folder into
Parquet partitions that each hold whole patients, the unit a later simulate step works on.
"""

from __future__ import annotations

from fhirtwin.population.generate import GenerateReport, write_cohort_ndjson
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
    "StageReport",
    "bucket_of",
    "iter_patient_records",
    "list_partitions",
    "read_shared",
    "stage_ndjson",
    "write_cohort_ndjson",
]
