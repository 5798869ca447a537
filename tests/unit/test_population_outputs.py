"""A population run validates nothing per resource at run time, so its output is validated here instead: every
resource of every bundle is valid R4 and emittable, and every Provenance signature verifies over its targets
(and fails when a target changes). And a run whose source holds fhirtwin's earlier results (as a server's
export does) supersedes them exactly as the engine's own write path does."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.causal.graph import GRAPH_URI, graph_bytes, load_graph
from fhirtwin.engine import Engine
from fhirtwin.fhir.models import check_emittable, validate_resource
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import run_population
from fhirtwin.vocabulary import SUPERSEDED_TAG, has_tag
from fhirtwin.writeback.jws import JwsError, SigningKey
from fhirtwin.writeback.signing import verify_targets


@pytest.fixture(scope="module")
def key(deployment_key: SigningKey) -> SigningKey:
    return deployment_key


AS_OF = date(2026, 6, 30)
#: LOINC LDL-C codes (direct, calculated, mass and moles): the generator varies them on purpose
LDL = ("18262-6", "2089-1", "13457-7", "22748-8")
RECORDED = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ndjson")
    write_cohort_ndjson(folder, 24, seed=41)
    return folder


def _run(source: Path, out: Path, as_of: date, recorded: datetime) -> list[dict[str, Any]]:
    report = run_population(source, out, serial=True, draws=100, as_of=as_of, recorded=recorded, buckets=2)
    assert report.failed == 0
    lines = [line for path in sorted(Path(out).glob("runs/*/bundles/*.ndjson"))
             for line in path.read_text("utf-8").splitlines() if line.strip()]
    assert len(lines) == report.bundles_now > 0
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def bundles(key: SigningKey, source: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(source, tmp_path_factory.mktemp("run"), AS_OF, RECORDED)


def _patient(bundle: dict[str, Any]) -> str:
    return str(next(e["resource"]["subject"]["reference"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == "RiskAssessment").split("/")[1])


def _stored(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of a bundle as a server stores them: ids and versions assigned, urn references resolved."""
    created = [e for e in bundle["entry"] if e["request"]["method"] == "POST"
               and e["resource"]["resourceType"] in ("RiskAssessment", "Goal", "CarePlan")]
    ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/stored-{n}" for n, e in enumerate(created)}
    out = []
    for entry in created:
        text = json.dumps(entry["resource"])
        for urn, ref in ids.items():
            text = text.replace(json.dumps(urn), json.dumps(ref))
        resource = json.loads(text)
        resource["id"] = ids[entry["fullUrl"]].split("/")[1]
        resource.setdefault("meta", {})["versionId"] = "1"
        out.append(resource)
    return out


def _unsigned(bundle: dict[str, Any]) -> dict[str, Any]:
    copied = copy.deepcopy(bundle)
    for entry in copied["entry"]:
        for signature in entry["resource"].get("signature", []):
            signature.pop("data")  # ECDSA signatures differ on every signing
    return copied


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


def test_a_source_with_earlier_results_is_superseded_as_the_engine_supersedes(
        bundles: list[dict[str, Any]], source: Path, key: SigningKey, tmp_path: Path) -> None:
    """An export holds fhirtwin's earlier results and a changed LDL-C: the next run supersedes those results, and
    its bundle is the engine's own for the same record and stored results, byte for byte but the signatures."""
    first = bundles[0]
    patient = _patient(first)
    stored = _stored(first)
    folder = tmp_path / "export"
    shutil.copytree(source, folder)
    observations = [json.loads(line) for line in (folder / "Observation.ndjson").read_text("utf-8").splitlines()]
    ldl = [o for o in observations if o["subject"]["reference"] == f"Patient/{patient}"
           and any(c.get("code") in LDL for c in o["code"].get("coding", [])) and "valueQuantity" in o]
    ldl[-1]["valueQuantity"]["value"] = round(ldl[-1]["valueQuantity"]["value"] * 1.4, 1)
    ldl[-1].setdefault("meta", {})["versionId"] = "2"  # as a server versions a changed resource
    (folder / "Observation.ndjson").write_text("".join(json.dumps(o) + "\n" for o in observations), "utf-8")
    for resource in stored:
        with open(folder / f"{resource['resourceType']}.ndjson", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(resource) + "\n")
    later, recorded = AS_OF, datetime(2026, 10, 1, 9, 0, tzinfo=UTC)
    second = {_patient(b): b for b in _run(folder, tmp_path / "run", later, recorded)}[patient]

    superseding = [e for e in second["entry"] if e["request"]["method"] == "PUT"
                   and e["resource"]["resourceType"] in ("RiskAssessment", "Goal", "CarePlan")]
    assert {e["request"]["url"] for e in superseding} == {f"{r['resourceType']}/{r['id']}" for r in stored}
    assert all(has_tag(e["resource"], SUPERSEDED_TAG) for e in superseding)
    provenance = next(e["resource"] for e in second["entry"] if e["resource"]["resourceType"] == "Provenance")
    assert sorted(e["what"]["reference"] for e in provenance["entity"] if e["role"] == "revision") == sorted(
        f"{r['resourceType']}/{r['id']}/_history/1" for r in stored)

    engine = Engine(NdjsonSource(folder), signing_key=key, draws=100)
    record = engine.read(patient, with_stored=False)
    run = engine.run(patient, record=type(record)(patient, record.resources, stored), as_of=later)
    prepared = engine.prepare(run, now=recorded).bundle
    assert _unsigned(second) == _unsigned(prepared)
    # the run names the declared causal graph it was made under (version and SHA-256 of the shipped file)
    graph = load_graph()
    policies = next(e["resource"] for e in prepared["entry"] if e["resource"]["resourceType"] == "Provenance")["policy"]
    assert policies[-1] == f"{GRAPH_URI}?version={graph.version}&sha256={graph.sha256}"
    assert hashlib.sha256(graph_bytes()).hexdigest() == graph.sha256


def test_a_patient_now_out_of_scope_has_its_earlier_results_retired_as_the_engine_retires_them(
        bundles: list[dict[str, Any]], source: Path, key: SigningKey, tmp_path: Path) -> None:
    """A planned patient's record now says 90 years old (outside PREVENT's 30-79): the run writes nothing new for
    the patient but retires the earlier results, with the engine's own retirement, byte for byte but the
    signature; a patient with nothing current gets no line."""
    first = bundles[1]
    patient = _patient(first)
    stored = _stored(first)
    folder = tmp_path / "export"
    shutil.copytree(source, folder)
    patients = [json.loads(line) for line in (folder / "Patient.ndjson").read_text("utf-8").splitlines()]
    for resource in patients:
        if resource["id"] == patient:
            resource["birthDate"] = "1936-03-01"
            resource.setdefault("meta", {})["versionId"] = "2"
    (folder / "Patient.ndjson").write_text("".join(json.dumps(p) + "\n" for p in patients), "utf-8")
    for resource in stored:
        with open(folder / f"{resource['resourceType']}.ndjson", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(resource) + "\n")
    recorded = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)
    second = {_patient(b): b for b in _run(folder, tmp_path / "run", AS_OF, recorded)}
    retirement = second[patient]
    assert {e["request"]["url"] for e in retirement["entry"] if e["request"]["method"] == "PUT"
            and e["resource"]["resourceType"] in ("RiskAssessment", "Goal", "CarePlan")} == {
        f"{r['resourceType']}/{r['id']}" for r in stored}
    assert not [e for e in retirement["entry"] if e["request"]["method"] == "POST"
                and e["resource"]["resourceType"] != "Provenance"]

    engine = Engine(NdjsonSource(folder), signing_key=key, draws=100)
    record = engine.read(patient, with_stored=False)
    run = engine.run(patient, record=type(record)(patient, record.resources, stored), as_of=AS_OF)
    assert run.plan is None and run.scope is not None and not run.scope.in_scope
    expected = engine.prepare_retirement(patient, stored, now=recorded)
    assert expected is not None and _unsigned(retirement) == _unsigned(expected.bundle)
    assert set(second) == {_patient(b) for b in bundles}  # nobody else retired, nobody new
