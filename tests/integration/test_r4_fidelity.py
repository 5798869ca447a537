"""R4 fidelity at the boundary: what the generator uploaded is what the server gives back, and the client keeps it.

For a spread of cohort patients (the sparsest, the richest and an even sample), every resource read with
``FhirClient.fetch_patient_record`` must equal the uploaded resource except the server-managed
``meta.versionId``, ``meta.lastUpdated`` and ``meta.source`` (numbers compared by value: ``72.50`` and
``72.5`` are the same decimal), must pass :func:`validate_resource`, and must come out of it unchanged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests

from fhirtwin.adapters.reads import RECORD_INCLUDES, RECORD_TYPES
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.models import validate_resource

pytestmark = pytest.mark.integration

SERVER_MANAGED_META = ("versionId", "lastUpdated", "source")
MIN_PATIENTS = 40


def _resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in bundle["entry"]]


def _spread(cohort: Any, n: int = 48) -> list[dict[str, Any]]:
    """The sparsest and richest records, plus an even sample across the cohort, without repeats."""
    by_size = sorted(cohort.bundles, key=lambda b: len(b["entry"]))
    step = max(1, len(cohort.bundles) // n)
    chosen = [by_size[0], by_size[1], by_size[-2], by_size[-1], *cohort.bundles[::step]]
    unique = {id(b): b for b in chosen}
    return list(unique.values())


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k not in SERVER_MANAGED_META}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def differences(sent: Any, got: Any, path: str = "") -> Iterator[str]:
    """Paths where two JSON values differ; numbers are equal when their decimal values are equal."""
    if _is_number(sent) and _is_number(got):
        if Decimal(str(sent)) != Decimal(str(got)):
            yield f"{path}: number {sent!r} came back as {got!r}"
    elif isinstance(sent, dict) and isinstance(got, dict):
        for key in sent.keys() - got.keys():
            yield f"{path}.{key}: lost"
        for key in got.keys() - sent.keys():
            yield f"{path}.{key}: added"
        for key in sent.keys() & got.keys():
            yield from differences(sent[key], got[key], f"{path}.{key}")
    elif isinstance(sent, list) and isinstance(got, list):
        if len(sent) != len(got):
            yield f"{path}: {len(sent)} items sent, {len(got)} returned"
        for i, (a, b) in enumerate(zip(sent, got, strict=False)):
            yield from differences(a, b, f"{path}[{i}]")
    elif type(sent) is not type(got) or sent != got:
        yield f"{path}: {sent!r} came back as {got!r}"


def test_the_comparison_itself_sees_changes() -> None:
    sent = {"a": [1, {"b": 72.50, "c": "x"}], "d": True}
    assert list(differences(sent, copy.deepcopy(sent))) == []
    assert list(differences(sent, {"a": [1, {"b": Decimal("72.5"), "c": "x"}], "d": True})) == []
    assert list(differences(sent, {"a": [1, {"b": 72.51, "c": "x"}], "d": True}))
    assert list(differences(sent, {"a": [1, {"b": 72.5}], "d": True})) == [".a[1].c: lost"]
    assert list(differences(sent, {"a": [1, {"b": 72.5, "c": "x"}], "d": 1}))  # bool is not a number
    assert list(differences(sent, {"a": [1, {"b": 72.5, "c": "x", "e": 0}], "d": True})) == [".a[1].e: added"]


TEST_TAG_SYSTEM = "https://fhirtwin.org/CodeSystem/fhirtwin-tests"


def test_records_come_back_exactly_as_uploaded(loaded_cohort: Any, base_url: str) -> None:
    client = FhirClient(base_url)
    bundles = _spread(loaded_cohort)
    assert len(bundles) >= MIN_PATIENTS
    sizes = sorted(len(b["entry"]) for b in loaded_cohort.bundles)
    assert min(len(b["entry"]) for b in bundles) == sizes[0]
    assert max(len(b["entry"]) for b in bundles) == sizes[-1]
    compared = 0
    types_seen: set[str] = set()
    problems: list[str] = []
    for bundle in bundles:
        uploaded = {(r["resourceType"], r["id"]): r for r in _resources(bundle)}
        patient_id = _resources(bundle)[0]["id"]
        record = client.fetch_patient_record(patient_id, RECORD_TYPES, include=RECORD_INCLUDES)
        # data that other tests add to a cohort patient carries a test tag; it was never uploaded by the cohort
        record = [r for r in record if not any(t.get("system") == TEST_TAG_SYSTEM
                                               for t in (r.get("meta") or {}).get("tag", []))]
        returned = {(r["resourceType"], r["id"]): r for r in record}
        assert len(returned) == len(record), f"patient {patient_id}: a resource came back twice"
        assert returned.keys() == uploaded.keys(), f"patient {patient_id}: resource set differs"
        for key, resource in returned.items():
            meta = resource.get("meta") or {}
            assert meta.get("versionId") and meta.get("lastUpdated"), f"{key}: server meta missing"
            problems.extend(f"{key[0]}/{key[1]}{d}" for d in differences(uploaded[key], _without_server_meta(resource)))
            before = copy.deepcopy(resource)
            assert validate_resource(resource) is resource
            assert resource == before and repr(resource) == repr(before), f"{key}: validation changed the dict"
            compared += 1
            types_seen.add(key[0])
    assert problems == [], problems[:20]
    assert compared >= 2_000
    assert {"Patient", "Observation", "Condition", "MedicationRequest", "DiagnosticReport"} <= types_seen


def _key_paths(node: Any, path: str = "") -> set[str]:
    """Every element path of a JSON value (list items by position), to compare what two parses kept."""
    out = {path}
    if isinstance(node, dict):
        for key, value in node.items():
            out |= _key_paths(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out |= _key_paths(value, f"{path}[{i}]")
    return out


def test_searchset_json_keeps_every_element(loaded_cohort: Any, base_url: str, http: requests.Session) -> None:
    richest = max(loaded_cohort.bundles, key=lambda b: len(b["entry"]))
    patient_id = _resources(richest)[0]["id"]
    response = http.get(f"{base_url}/Observation", params={"patient": patient_id, "_count": 1000})
    assert response.status_code == 200, response.text[:500]
    raw = response.content
    parsed = json.loads(raw)
    assert parsed["resourceType"] == "Bundle" and parsed["type"] == "searchset"
    again = json.loads(json.dumps(parsed))
    paths = _key_paths(parsed)
    assert _key_paths(again) == paths
    assert again == parsed
    # the client's dicts are the server's JSON, element for element
    client_bundle = FhirClient(base_url).search("Observation", {"patient": patient_id, "_count": 1000})
    entries = parsed.get("entry", [])
    assert len(entries) == sum(1 for r in _resources(richest) if r["resourceType"] == "Observation")
    assert len(entries) > 20
    client_resources = {r["id"]: r for r in (e["resource"] for e in client_bundle["entry"])}
    for entry in entries:
        resource = entry["resource"]
        assert _key_paths(client_resources[resource["id"]]) == _key_paths(resource)
        assert list(differences(resource, client_resources[resource["id"]])) == []
