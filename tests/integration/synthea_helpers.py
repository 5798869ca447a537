"""The Synthea corpus for tests: generated once per settings, cached on disk, reused by every run.

Tests in ``tests/integration`` import from here (pytest puts a test file's folder on ``sys.path``):

    from synthea_helpers import synthea_corpus, truth

    corpus = synthea_corpus()          # a Corpus: corpus.fhir_dir (bundles), corpus.csv_dir (ground truth)
    for pid, t in truth().items():     # Truth per Patient.id, as of the corpus's export date
        ...

The first call generates ``CORPUS_POPULATION`` living adults aged 40–79 with seed ``CORPUS_SEED``
into ``sandbox/data/synthea-<seed>-<population>-<digest>/`` (about a minute on two cores, after a
first Maven fetch of Synthea); later calls and later runs reuse that folder. ``FHIRTWIN_SYNTHEA_CACHE``
moves the cache elsewhere. To load the corpus into a server use
``fhirtwin.sandbox.synthea.load_synthea(base_url, synthea_corpus().folder)`` — on a server of its
own: the full corpus is tens of thousands of resources (see docs/corpus.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from typing import Any

from fhirtwin.sandbox.synthea import Corpus, generate
from fhirtwin.sandbox.synthea_truth import Truth, ground_truth

CORPUS_SEED = 7341
CORPUS_POPULATION = 40
TINY_SEED = 7342
TINY_POPULATION = 2
TINY_YEARS_OF_HISTORY = 3  # smaller bundles: quick to load into a server inside a test


@cache
def synthea_corpus() -> Corpus:
    """The shared test corpus (generated on first use, then read from the cache folder)."""
    return Corpus.open(generate(seed=CORPUS_SEED, population=CORPUS_POPULATION))


@cache
def truth() -> dict[str, Truth]:
    """Ground truth of :func:`synthea_corpus`, keyed by Synthea patient id (= ``Patient.id``)."""
    return ground_truth(synthea_corpus().csv_dir)


@cache
def tiny_corpus() -> Corpus:
    """A two-patient corpus with three years of history, small enough to load inside a test."""
    return Corpus.open(generate(seed=TINY_SEED, population=TINY_POPULATION, years_of_history=TINY_YEARS_OF_HISTORY))


def as_read_from_a_server(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """A Synthea transaction bundle's resources as a FHIR server returns them after ingest: every
    ``urn:uuid`` reference rewritten to ``Type/id`` (Synthea gives each resource its id) and a
    ``meta.versionId``. No clinical content is touched."""
    refs = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", []) if str(e.get("fullUrl", "")).startswith("urn:uuid:")}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            if isinstance(node.get("reference"), str) and node["reference"] in refs:
                out["reference"] = refs[node["reference"]]
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    resources = []
    for entry in bundle.get("entry", []):
        resource = rewrite(entry["resource"])
        resource.setdefault("meta", {})["versionId"] = "1"
        resources.append(resource)
    return resources


def patient_records(corpus: Corpus) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(Patient.id, resources)`` for every patient bundle of a corpus, as read from a server."""
    for path in sorted(corpus.fhir_dir.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        resources = as_read_from_a_server(bundle)
        patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
        if patient is not None:  # hospital and practitioner bundles hold no Patient
            yield str(patient["id"]), resources
