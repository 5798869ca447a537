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

from functools import cache

from fhirtwin.sandbox.synthea import Corpus, as_read_from_a_server, generate, patient_records
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

__all__ = ["as_read_from_a_server", "patient_records", "synthea_corpus", "tiny_corpus", "truth"]
