"""The independent-generator corpus harness: Synthea output is deterministic, its ground truth parses,
and it loads into a HAPI server of its own (never the shared sandbox) with every Patient created.

Adapter recall and precision against this truth are not asserted here (see docs/corpus.md).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import date
from pathlib import Path

import pytest
import requests
from synthea_helpers import CORPUS_POPULATION, synthea_corpus, tiny_corpus, truth

from fhirtwin.sandbox.server import Sandbox
from fhirtwin.sandbox.synthea import Corpus, chunk_bundle, generate, load_synthea
from fhirtwin.sandbox.synthea_truth import ground_truth

pytestmark = pytest.mark.integration

LOAD_PORT = 8283
COUNTED_TYPES = ("Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")


def _patient_ids(corpus: Corpus) -> list[str]:
    with (corpus.csv_dir / "patients.csv").open(newline="") as handle:
        return [row["Id"] for row in csv.DictReader(handle)]


def _bundle_patient(path: Path) -> tuple[str, Counter[str]]:
    bundle = json.loads(path.read_bytes())
    types = Counter(entry["resource"]["resourceType"] for entry in bundle["entry"])
    (patient,) = [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    return patient, types


def test_generation_is_deterministic(tmp_path: Path) -> None:
    cached = tiny_corpus()
    settings = cached.settings
    again = Corpus.open(generate(tmp_path / "again", seed=settings.seed, population=settings.population,
                                 years_of_history=settings.years_of_history))
    assert _patient_ids(again) == _patient_ids(cached)
    bundles = sorted(p.name for p in cached.fhir_dir.glob("*.json"))
    assert sorted(p.name for p in again.fhir_dir.glob("*.json")) == bundles
    for name in bundles:
        assert (again.fhir_dir / name).read_bytes() == (cached.fhir_dir / name).read_bytes(), name
    names = sorted(p.name for p in cached.csv_dir.glob("*.csv"))
    assert names == sorted(p.name for p in again.csv_dir.glob("*.csv")) and "patients.csv" in names
    for name in names:
        assert (again.csv_dir / name).read_bytes() == (cached.csv_dir / name).read_bytes(), name


def test_truth_covers_every_generated_adult() -> None:
    corpus = synthea_corpus()
    facts = truth()
    ids = _patient_ids(corpus)
    assert len(ids) == CORPUS_POPULATION  # living patients only
    assert set(facts) == set(ids)
    bundles = dict(_bundle_patient(path) for path in corpus.patient_bundles())
    assert set(bundles) == set(ids)  # one bundle per patient, Patient.id = the CSV Id
    for t in facts.values():
        assert 40 <= t.age <= 79 and t.sex in {"male", "female"} and not t.deceased
        assert t.smoking in {"current", "former", "never", None}
        assert t.ckd_stage in {None, 1, 2, 3, 4, 5}
        assert t.ascvd == bool(t.ascvd_components)
        assert t.diabetes == bool(t.diabetes_evidence)
        if t.statin is not None:
            assert t.statin.dose_mg > 0 and t.statin.intensity in {"high", "moderate", "low", None}
            assert t.statin.agent in t.statin.description.lower()
    assert sum(t.has_sbp for t in facts.values()) > CORPUS_POPULATION // 2  # wellness visits measure BP


def test_truth_as_of_an_earlier_date_sees_less() -> None:
    corpus = synthea_corpus()
    now = truth()
    day = date.fromisoformat(corpus.settings.reference_date)
    earlier = ground_truth(corpus.csv_dir, as_of=day.replace(year=day.year - 5))
    assert set(earlier) == set(now)
    for pid, t in earlier.items():
        assert t.age == now[pid].age - 5
        assert now[pid].ascvd_components >= t.ascvd_components  # a history only grows
        assert now[pid].kidney_transplant or not t.kidney_transplant


def test_chunks_keep_every_entry_and_reference() -> None:
    corpus = tiny_corpus()
    largest = max(corpus.patient_bundles(), key=lambda p: p.stat().st_size)
    bundle = json.loads(largest.read_bytes())
    chunks = list(chunk_bundle(bundle, max_entries=50))
    assert len(chunks) > 1 and all(len(c["entry"]) <= 50 for c in chunks)
    seen: set[str] = set()
    for chunk in chunks:
        here = {e["fullUrl"] for e in chunk["entry"]}
        for entry in chunk["entry"]:
            assert entry["request"]["method"] == "PUT"
            text = json.dumps(entry["resource"])
            for ref in {r for r in here | seen if f'"{r}"' in text}:
                assert ref in here  # a urn:uuid only ever points into its own chunk
        seen |= here
    assert sum(len(c["entry"]) for c in chunks) == len(bundle["entry"])


def test_load_creates_every_patient(tmp_path: Path, sandbox: Sandbox) -> None:  # sandbox: jar already built
    corpus = tiny_corpus()
    box = Sandbox(port=LOAD_PORT, data_dir=tmp_path / "sandbox-data")
    try:
        base = box.start(timeout=600, quiet=True)
        report = load_synthea(base, corpus.folder, max_entries=100)
        expected = dict(_bundle_patient(path) for path in corpus.patient_bundles())
        assert sorted(report.patients) == sorted(expected)
        assert report.transactions > report.bundles  # some bundles were split
        http = requests.Session()
        http.headers.update({"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
        for pid, types in expected.items():
            patient = http.get(f"{base}/Patient/{pid}", timeout=30)
            assert patient.status_code == 200, pid
            assert patient.json()["meta"]["versionId"] == "1"
            for kind in COUNTED_TYPES:
                found = http.get(f"{base}/{kind}", params={"patient": pid, "_summary": "count"}, timeout=60)
                assert found.json()["total"] == types[kind], (pid, kind)
        smallest = min(corpus.patient_bundles(), key=lambda p: p.stat().st_size)
        pid = _bundle_patient(smallest)[0]
        again = load_synthea(base, corpus.folder, only=[pid])  # loading twice changes nothing
        assert again.patients == [pid]
        assert http.get(f"{base}/Patient/{pid}", timeout=30).json()["meta"]["versionId"] == "1"
        assert http.get(f"{base}/Patient", params={"_summary": "count"}, timeout=30).json()["total"] == len(expected)
    finally:
        box.stop()
