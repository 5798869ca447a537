"""Load fhirtwin's conformance resources and the synthetic cohort into a FHIR server.

Every entry is a PUT to a stable id, so loading twice creates nothing new: HAPI treats an update
with unchanged content as a no-op and keeps the version. Bundles are posted by a few workers in
parallel; a transaction of PUTs is idempotent, so a failed post is retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from fhirtwin.sandbox.cohort import DEFAULT_PATIENTS, DEFAULT_SEED, generate_cohort, write_cohort

FHIR_JSON = "application/fhir+json"
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


def load_sandbox(
    base_url: str,
    *,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = DEFAULT_SEED,
    workers: int = 4,
    cohort_dir: Path | None = None,
) -> LoadReport:
    """Upload the profiles, then the cohort (one transaction per patient); write ground truth locally."""
    started = time.monotonic()
    cohort = generate_cohort(n_patients=n_patients, seed=seed)
    if cohort_dir is not None:
        write_cohort(cohort, cohort_dir)
    session = requests.Session()
    profiles = conformance_resources()
    if profiles:
        post_transaction(session, base_url, _transaction(profiles))

    def post(bundle: dict) -> int:
        with requests.Session() as worker_session:
            post_transaction(worker_session, base_url, bundle)
        return len(bundle.get("entry", []))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = sum(pool.map(post, cohort.bundles))
    return LoadReport(
        patients=len(cohort.truth),
        bundles=len(cohort.bundles),
        entries=entries,
        profiles=len(profiles),
        seconds=time.monotonic() - started,
    )
