"""What the twin reads: the one declaration of resource types, patient search parameters and codes.

Why one home: the record read (FHIR search or NDJSON), the Subscription criteria that tell fhirtwin a
record changed, the CDS Hooks prefetch templates and the webhook's relevance filter must all cover the
same types; a type missing from any of them is a stale twin nobody notices. They all derive from here.
"""

from __future__ import annotations

import csv
import json
from functools import cache
from importlib import resources

#: Patient-compartment types read for one twin, with the search parameter that names the patient.
RECORD_TYPES: dict[str, str] = {
    "Observation": "patient",
    "Condition": "patient",
    "MedicationRequest": "patient",
    "MedicationStatement": "patient",
    "MedicationDispense": "patient",
    "MolecularSequence": "patient",
    "DiagnosticReport": "patient",
    "Procedure": "patient",
}

#: ``_include`` parameters of the record read: resources the record points at (a MedicationRequest's
#: ``medicationReference``) that belong to no patient compartment.
RECORD_INCLUDES: tuple[str, ...] = (
    "MedicationRequest:medication",
    "MedicationStatement:medication",
    "MedicationDispense:medication",
)

#: Types read only through a reference from a record type, and the searches that find who refers to them.
REFERENCED_TYPES: dict[str, tuple[str, ...]] = {
    "Medication": (
        "MedicationRequest?medication={ref}",
        "MedicationStatement?medication={ref}",
        "MedicationDispense?medication={ref}",
    ),
}

#: Every type whose change can change a twin (the Patient itself: birth date, sex, race, address).
READ_TYPES: frozenset[str] = frozenset({"Patient", *RECORD_TYPES, *REFERENCED_TYPES})


@cache
def observation_codes() -> tuple[str, ...]:
    """Every Observation code the twin maps (adapter code tables, genomics included), without system.

    Codes only, because the adapters match codes across system spellings (http/https, case); a bare
    token matches any system, and LOINC codes do not collide with the few fhirtwin codes.
    """
    data = resources.files("fhirtwin.adapters").joinpath("data")
    text = data.joinpath("observation_codes.csv").read_text("utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    out = [row["code"].strip() for row in rows
           if (row.get("code") or "").strip() and (row.get("handler") or "").strip() != "exclude"]
    genomics = json.loads(data.joinpath("genomics.json").read_text("utf-8"))
    for group, items in genomics.get("codes", {}).items():
        if group != "genomic_report":
            out += [item.split("|", 1)[-1] for item in items]
    return tuple(dict.fromkeys(out))
