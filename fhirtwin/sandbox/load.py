"""Load fhirtwin's conformance resources and the synthetic cohort into a FHIR server.

Every entry is a PUT to a stable id, so loading twice creates nothing new: HAPI treats an update
with unchanged content as a no-op and keeps the version. Bundles are posted by a few workers in
parallel; a transaction of PUTs is idempotent, so a failed post is retried.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from fhirtwin.sandbox.cohort import DEFAULT_PATIENTS, DEFAULT_SEED, Cohort, bundle_json, generate_cohort, write_cohort

FHIR_JSON = "application/fhir+json"
MARKER_ID = "fhirtwin-cohort-marker"
MARKER_SYSTEM = "https://fhirtwin.org/sid/cohort-fingerprint"
_RETRYABLE = {429, 500, 502, 503, 504}


class LoadError(RuntimeError):
    """A bundle could not be loaded; carries the server's answer."""


@dataclass(frozen=True)
class LoadReport:
    patients: int
    bundles: int
    entries: int
    profiles: int
    seconds: float
    skipped: bool = False


def profiles_dir() -> Path:
    """The repository's ``profiles/`` folder of conformance resources (JSON)."""
    return Path(__file__).resolve().parents[2] / "profiles"


def conformance_resources(folder: Path | None = None) -> list[dict]:
    """Every JSON conformance resource under ``profiles/`` (empty until profiles are written)."""
    folder = folder or profiles_dir()
    resources = []
    for path in sorted(folder.rglob("*.json")) if folder.exists() else []:
        resource = json.loads(path.read_text())
        if "resourceType" in resource and "id" in resource:
            resources.append(resource)
    return resources


def _transaction(resources: Iterable[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }


def post_transaction(session: requests.Session, base_url: str, bundle: dict, *, attempts: int = 4) -> dict:
    """POST one transaction of PUTs, retrying on throttling and server errors (safe: idempotent)."""
    body = json.dumps(bundle)
    for attempt in range(1, attempts + 1):
        try:
            response = session.post(base_url, data=body, timeout=(5, 300),
                                    headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt == attempts:
                raise LoadError(f"transaction failed after {attempts} attempts: {exc}") from exc
        else:
            if response.status_code < 300:
                return response.json()
            if response.status_code not in _RETRYABLE or attempt == attempts:
                raise LoadError(f"transaction rejected with HTTP {response.status_code}: {response.text[:2000]}")
        time.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


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
        "code": {"coding": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "cohort-marker"}]},
    }


def loaded_fingerprint(session: requests.Session, base_url: str) -> str | None:
    """The fingerprint of the last complete load into this server, or None if there was none."""
    response = session.get(f"{base_url}/Basic/{MARKER_ID}", headers={"Accept": FHIR_JSON}, timeout=(5, 30))
    if response.status_code in (404, 410):
        return None
    response.raise_for_status()
    identifiers = response.json().get("identifier", [])
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
    session = requests.Session()
    from fhirtwin.pipeline import fhirtwin_registration

    profiles = conformance_resources() + fhirtwin_registration()
    digest = fingerprint(cohort, profiles)
    entries_total = sum(len(b.get("entry", [])) for b in cohort.bundles)
    if not force and loaded_fingerprint(session, base_url) == digest:
        return LoadReport(len(cohort.truth), len(cohort.bundles), entries_total, len(profiles),
                          time.monotonic() - started, skipped=True)
    if profiles:
        post_transaction(session, base_url, _transaction(profiles))

    def post(bundle: dict) -> int:
        with requests.Session() as worker_session:
            post_transaction(worker_session, base_url, bundle)
        return len(bundle.get("entry", []))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = sum(pool.map(post, cohort.bundles))
    post_transaction(session, base_url, _transaction([_marker(digest)]))
    return LoadReport(
        patients=len(cohort.truth),
        bundles=len(cohort.bundles),
        entries=entries,
        profiles=len(profiles),
        seconds=time.monotonic() - started,
    )
