"""The synthetic cohort, loaded into the real sandbox, is found by standard searches."""

from __future__ import annotations

from collections import Counter

import pytest
import requests

from fhirtwin.fhir.client import FhirClient

pytestmark = pytest.mark.integration

MRN_SYSTEM = "https://fhirtwin.org/sid/synthetic-mrn"


def _resources(bundle: dict) -> list[dict]:
    return [entry["resource"] for entry in bundle["entry"]]


def _count(http: requests.Session, url: str, params: dict) -> int:
    response = http.get(url, params={**params, "_summary": "count"})
    assert response.status_code == 200, response.text
    return response.json()["total"]


def test_every_cohort_patient_is_on_the_server(loaded_cohort, base_url: str, http: requests.Session) -> None:
    assert len(loaded_cohort.bundles) >= 200
    assert _count(http, f"{base_url}/Patient", {"identifier": f"{MRN_SYSTEM}|"}) == len(loaded_cohort.bundles)
    assert _count(http, f"{base_url}/Patient", {}) >= 200


def _sample(cohort) -> list[dict]:
    """A spread of patients: the sparsest, the richest, and every 30th."""
    by_size = sorted(cohort.bundles, key=lambda b: len(b["entry"]))
    return [by_size[0], by_size[-1], *cohort.bundles[::30]]


@pytest.mark.parametrize("resource_type", ["Observation", "Condition", "MedicationRequest", "DiagnosticReport",
                                           "MedicationDispense", "Procedure"])
def test_counts_per_patient_match_the_bundles(resource_type, loaded_cohort, base_url, http) -> None:
    for bundle in _sample(loaded_cohort):
        patient_id = _resources(bundle)[0]["id"]
        expected = sum(1 for r in _resources(bundle) if r["resourceType"] == resource_type)
        found = _count(http, f"{base_url}/{resource_type}", {"patient": f"Patient/{patient_id}"})
        assert found == expected, f"{resource_type} for {patient_id}"


@pytest.mark.parametrize("code", ["69548-6", "85354-9", "2093-3", "14647-2", "4548-4", "2160-0", "9318-7",
                                  "72166-2", "84413-4", "102040-3", "98979-8"])
def test_counts_per_code_match_the_cohort(code, loaded_cohort, base_url, http) -> None:
    expected = Counter()
    for bundle in loaded_cohort.bundles:
        for resource in _resources(bundle):
            if resource["resourceType"] == "Observation":
                codes = {(c.get("system"), c.get("code")) for c in resource["code"].get("coding", [])}
                if ("http://loinc.org", code) in codes:
                    expected[code] += 1
    assert expected[code] > 0, "the cohort should contain this code"
    assert _count(http, f"{base_url}/Observation", {"code": f"http://loinc.org|{code}"}) == expected[code]


def test_variant_observations_exist_for_fh_and_apol1(loaded_cohort, base_url, http) -> None:
    bundle = http.get(f"{base_url}/Observation", params={"code": "http://loinc.org|69548-6", "_count": 500}).json()
    genes = set()
    for entry in bundle["entry"]:
        for component in entry["resource"].get("component", []):
            if any(c.get("code") == "48018-6" for c in component["code"].get("coding", [])):
                genes |= {c.get("display") or c.get("code") for c in component["valueCodeableConcept"]["coding"]}
    assert {"LDLR", "APOL1"} <= {g for g in genes if g} | {g.split(":")[-1] for g in genes if g}


def test_loading_again_creates_no_new_versions(loaded_cohort, base_url: str) -> None:
    client = FhirClient(base_url, timeout=(5, 300))

    def versions(response: dict) -> list[str]:
        return [entry["response"]["etag"].removeprefix("W/").strip('"') for entry in response["entry"]]

    for bundle in loaded_cohort.bundles[:3]:
        first = versions(client.transaction(bundle))
        again = versions(client.transaction(bundle))
        assert again == first, "an unchanged PUT must not create a new version"
