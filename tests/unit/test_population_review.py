"""Review findings on population runs and write-back, each shown by a test that failed before its fix:
incremental runs that carried bundles made for another server or signed by another key."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from test_population_writeback import BASE

from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import run_population
from fhirtwin.writeback.jws import ENV_KEY_FILE, SigningKey, generate_key

OTHER = "https://other-fhir.example.test/fhir"
AS_OF = date(2026, 6, 30)

pytestmark = pytest.mark.usefixtures("deployment_key")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(NDJSON folder, output folder, run id) of one small run made for BASE."""
    folder = tmp_path_factory.mktemp("review")
    write_cohort_ndjson(folder / "ndjson", 8, seed=7)
    report = run_population(folder / "ndjson", folder / "out", serial=True, draws=30, as_of=AS_OF,
                            recorded=datetime(2026, 7, 1, 9, 0, tzinfo=UTC), target=BASE, buckets=2)
    assert report.failed == 0
    return folder / "ndjson", folder / "out", report.run_id


@pytest.fixture()
def run(made: tuple[Path, Path, str], tmp_path: Path) -> tuple[Path, Path, str]:
    source, out, run_id = made
    shutil.copytree(out, tmp_path / "out")
    return source, tmp_path / "out", run_id


def bundles(out: Path, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted((out / "runs" / run_id / "bundles").glob("*.ndjson"))
            for line in path.read_text("utf-8").splitlines() if line.strip()]


def signing_kids(bundle: dict[str, Any]) -> set[str]:
    """The ``kid`` of every Provenance signature of a bundle (read from the JWS header, not verified)."""
    kids = set()
    for entry in bundle["entry"]:
        for signature in entry["resource"].get("signature", []):
            header = base64.b64decode(signature["data"]).decode().split(".")[0]
            kids.add(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])
    return kids


def pem_file(key: SigningKey, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return path


# ------------------------------------------------------------------------------------------------ incremental


def test_an_incremental_run_for_another_server_carries_no_bundle_made_for_the_first(
        run: tuple[Path, Path, str]) -> None:
    source, out, first = run
    report = run_population(source, out, serial=True, incremental_from=first, target=OTHER)
    assert report.failed == 0
    lines = bundles(out, report.run_id)
    assert len(lines) == len(bundles(out, first)) > 0
    text = json.dumps(lines)
    assert BASE not in text, "a bundle made for the first run's server was carried into a run for another"
    # what is written there is what a run made for OTHER writes
    assert {e["fullUrl"].rsplit("/", 2)[0] for b in lines for e in b["entry"]
            if e["request"]["method"] == "PUT"} == {OTHER}


def test_an_incremental_run_with_a_new_signing_key_carries_no_bundle_signed_by_the_old_one(
        run: tuple[Path, Path, str], deployment_key: SigningKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, out, first = run
    assert {k for b in bundles(out, first) for k in signing_kids(b)} == {deployment_key.kid}
    rotated = generate_key("ES256")
    monkeypatch.setenv(ENV_KEY_FILE, str(pem_file(rotated, tmp_path / "rotated.pem")))
    report = run_population(source, out, serial=True, incremental_from=first)
    assert report.failed == 0
    kids = {k for b in bundles(out, report.run_id) for k in signing_kids(b)}
    assert kids == {rotated.kid}, "bundles signed by the retired key were carried into the new run"
