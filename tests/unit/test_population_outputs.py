"""A population run validates nothing per resource at run time, so its output is validated here instead: every
resource of every bundle is valid R4 and emittable, and every Provenance signature verifies over its targets
(and fails when a target changes)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.fhir.models import check_emittable, validate_resource
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import run_population
from fhirtwin.writeback.jws import JwsError, SigningKey
from fhirtwin.writeback.signing import verify_targets


@pytest.fixture(scope="module")
def key(deployment_key: SigningKey) -> SigningKey:
    return deployment_key


@pytest.fixture(scope="module")
def bundles(key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    source = tmp_path_factory.mktemp("ndjson")
    write_cohort_ndjson(source, 24, seed=41)
    out = tmp_path_factory.mktemp("run")
    report = run_population(source, out, serial=True, draws=100, as_of=date(2026, 6, 30),
                            recorded=datetime(2026, 7, 1, 9, 0, tzinfo=UTC), buckets=2)
    assert report.failed == 0
    lines = [line for path in sorted(Path(out).glob("runs/*/bundles/*.ndjson"))
             for line in path.read_text("utf-8").splitlines() if line.strip()]
    assert len(lines) == report.bundles_now > 0
    return [json.loads(line) for line in lines]


def test_every_resource_of_a_population_bundle_is_valid_r4(bundles: list[dict[str, Any]]) -> None:
    types: set[str] = set()
    for bundle in bundles:
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
        for entry in bundle["entry"]:
            validate_resource(entry["resource"])
            check_emittable(entry["resource"])
            types.add(entry["resource"]["resourceType"])
    assert {"RiskAssessment", "CarePlan", "Provenance", "Device"} <= types


def test_every_population_provenance_signature_verifies_and_breaks_on_a_change(
        bundles: list[dict[str, Any]], key: SigningKey) -> None:
    public = key.private_key.public_key()
    for bundle in bundles:
        by_url = {entry["fullUrl"]: entry["resource"] for entry in bundle["entry"]}
        provenance = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")
        refs = [target["reference"] for target in provenance["target"]]
        targets = [by_url[ref] for ref in refs]
        data = provenance["signature"][0]["data"]
        verify_targets(data, targets, refs, public)
        changed = json.loads(json.dumps(targets))
        changed[0]["status"] = "amended" if changed[0].get("status") != "amended" else "final"
        with pytest.raises(JwsError):
            verify_targets(data, changed, refs, public)
