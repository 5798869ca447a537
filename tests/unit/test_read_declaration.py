"""What the twin reads is declared once (fhirtwin.adapters.reads); every door that reads or watches covers it.

A type missing from the record read, the Subscription criteria or the CDS prefetch is a stale twin nobody
notices: these tests fail when one of them stops covering a type of ``READ_TYPES``.
"""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import responses

from fhirtwin.adapters.reads import READ_TYPES
from fhirtwin.engine import Engine, subscription_criteria
from fhirtwin.fhir.client import FhirClient
from fhirtwin.service import cds_hooks

BASE = "https://fhir.example.org/r4"

#: Target type of each ``_include`` (``SourceType:param``) the doors may use; an include not listed here
#: fails the tests below until its target is added (the test cannot guess what it brings in).
INCLUDE_TARGETS = {
    "MedicationRequest:medication": "Medication",
    "MedicationStatement:medication": "Medication",
    "MedicationDispense:medication": "Medication",
}


def covered_types(urls: list[str]) -> set[str]:
    """Types a list of relative read URLs brings in: each URL's own type and the targets of its ``_include``s."""
    out: set[str] = set()
    for url in urls:
        parts = urlsplit(url)
        out.add(parts.path.split("/")[0])
        out |= {INCLUDE_TARGETS[value] for name, value in parse_qsl(parts.query) if name == "_include"}
    return out


def test_the_declaration_names_the_patient_and_the_referenced_medication() -> None:
    assert {"Patient", "Medication", "Observation", "MedicationRequest"} <= READ_TYPES


def test_cds_prefetch_covers_every_read_type() -> None:
    [service] = cds_hooks.discovery()["services"]
    prefetch = service["prefetch"]
    covered = covered_types(list(prefetch.values()))
    assert covered >= READ_TYPES, f"not prefetched: {sorted(READ_TYPES - covered)}"
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert "Medication" not in {urlsplit(u).path for u in prefetch.values()}  # via _include only


@pytest.mark.parametrize("kwargs", [{}, {"twin_codes_only": True}, {"filters": ["_tag=https://src|a"]}])
def test_subscription_criteria_cover_every_read_type(kwargs: dict[str, Any]) -> None:
    criteria = subscription_criteria(**kwargs)
    types = [c.split("?", 1)[0] for c in criteria]
    assert set(types) >= READ_TYPES, f"not watched: {sorted(READ_TYPES - set(types))}"
    assert len(types) == len(set(types)), "one criterion per type"
    assert "Medication" in types and "Patient" in types  # own criteria: no _include in a Subscription


def _answer_batch(request: Any) -> tuple[int, dict[str, str], str]:
    """A batch-response with the Patient for a Patient read/search and an empty searchset for the rest."""
    sent = json.loads(request.body)
    entries = []
    for entry in sent["entry"]:
        url = entry["request"]["url"]
        patients = [{"resourceType": "Patient", "id": pid}
                    for pid in dict(parse_qsl(urlsplit(url).query)).get("_id", "").split(",") if pid]
        if url.startswith("Patient/"):
            resource: dict[str, Any] = {"resourceType": "Patient", "id": url.split("/")[1]}
        else:
            resource = {"resourceType": "Bundle", "type": "searchset",
                        "entry": [{"resource": p, "search": {"mode": "match"}} for p in patients]}
        entries.append({"response": {"status": "200 OK"}, "resource": resource})
    return 200, {"Content-Type": "application/fhir+json"}, json.dumps(
        {"resourceType": "Bundle", "type": "batch-response", "entry": entries})


@responses.activate
@pytest.mark.parametrize("read", [
    lambda engine: [engine.read("p1")],
    lambda engine: [engine.read("p1", with_stored=False)],
    lambda engine: list(engine.read_many(["p1", "p2"])),
], ids=["read", "read-without-stored", "read_many"])
def test_engine_read_asks_for_every_read_type(read: Any) -> None:
    responses.add_callback(responses.POST, BASE, callback=_answer_batch)
    client = FhirClient(BASE, sleep=lambda s: None, rng=random.Random(1), max_retries=0)
    records = read(Engine(client))
    assert records and all(r.resources[0]["resourceType"] == "Patient" for r in records)
    [call] = responses.calls  # one batch request
    urls = [e["request"]["url"] for e in json.loads(call.request.body)["entry"]]
    covered = covered_types(urls)
    assert covered >= READ_TYPES, f"not read: {sorted(READ_TYPES - covered)}"
