"""Load fhirtwin's conformance resources and the synthetic cohort into a FHIR server.

Every entry is a PUT to a stable id, so loading twice creates nothing new: HAPI treats an update
with unchanged content as a no-op and keeps the version. Bundles are posted by a few workers in
parallel, each with its own FhirClient; a transaction of PUTs is idempotent, so the client's retry
rule repeats it on throttling and server errors.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.errors import FhirGone, FhirNotFound
from fhirtwin.sandbox.cohort import DEFAULT_PATIENTS, DEFAULT_SEED, Cohort, bundle_json, generate_cohort, write_cohort
from fhirtwin.vocabulary import CODESYSTEM, COHORT_FINGERPRINT_SYSTEM

MARKER_ID = "fhirtwin-cohort-marker"
MARKER_SYSTEM = COHORT_FINGERPRINT_SYSTEM
LOAD_TIMEOUT = (5, 300)  # a patient's transaction of ~200 PUTs can take seconds on a busy server


@dataclass(frozen=True)
class LoadReport:
    patients: int
    bundles: int
    entries: int
    profiles: int
    seconds: float
    skipped: bool = False


def put_entries(resources: Iterable[dict]) -> list[dict]:
    """Transaction entries that PUT each resource to its own id (idempotent, retry-safe)."""
    return [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]


def fingerprint(cohort: Cohort, profiles: list[dict]) -> str:
    """A digest of everything a load would write, so an unchanged load can be skipped."""
    digest = hashlib.sha256()
    for bundle in cohort.bundles:
        digest.update(bundle_json(bundle).encode())
    for resource in profiles:
        digest.update(json.dumps(resource, sort_keys=True).encode())
    return digest.hexdigest()


def _marker(digest: str) -> dict:
    """A Basic resource recording which cohort and profiles the server holds."""
    return {
        "resourceType": "Basic",
        "id": MARKER_ID,
        "identifier": [{"system": MARKER_SYSTEM, "value": digest}],
        "code": {"coding": [{"system": CODESYSTEM, "code": "cohort-marker"}]},
    }


def loaded_fingerprint(client: FhirClient) -> str | None:
    """The fingerprint of the last complete load into this server, or None if there was none."""
    try:
        marker = client.read("Basic", MARKER_ID)
    except (FhirNotFound, FhirGone):
        return None
    identifiers = marker.get("identifier", [])
    return next((i.get("value") for i in identifiers if i.get("system") == MARKER_SYSTEM), None)


def load_sandbox(
    base_url: str,
    *,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = DEFAULT_SEED,
    workers: int = 4,
    cohort_dir: Path | None = None,
    force: bool = False,
) -> LoadReport:
    """Upload the profiles, then the cohort (one transaction per patient); write ground truth locally.

    A marker resource records the fingerprint of a complete load; when the server already holds
    exactly this cohort and these profiles the upload is skipped unless ``force`` is set.
    """
    started = time.monotonic()
    cohort = generate_cohort(n_patients=n_patients, seed=seed)
    if cohort_dir is not None:
        write_cohort(cohort, cohort_dir)
    from fhirtwin.engine import Engine
    from fhirtwin.keys import signing_key_for
    from fhirtwin.progress import progress

    client = FhirClient(base_url, timeout=LOAD_TIMEOUT)

    profiles = Engine(client, signing_key=signing_key_for(base_url)).registration()
    digest = fingerprint(cohort, profiles)
    entries_total = sum(len(b.get("entry", [])) for b in cohort.bundles)
    if not force and loaded_fingerprint(client) == digest:
        return LoadReport(len(cohort.truth), len(cohort.bundles), entries_total, len(profiles),
                          time.monotonic() - started, skipped=True)
    if profiles:
        client.transaction(put_entries(profiles))

    def post(bundle: dict) -> int:
        FhirClient(base_url, timeout=LOAD_TIMEOUT).transaction(bundle)
        return len(bundle.get("entry", []))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = sum(progress(pool.map(post, cohort.bundles), total=len(cohort.bundles), unit="patient",
                               desc="load"))
    client.transaction(put_entries([_marker(digest)]))
    return LoadReport(
        patients=len(cohort.truth),
        bundles=len(cohort.bundles),
        entries=entries,
        profiles=len(profiles),
        seconds=time.monotonic() - started,
    )
