"""The typed-model boundary: R4 JSON checked with R4B models, R4/R4B differences guarded, dicts untouched."""

from __future__ import annotations

import copy
import importlib
import pkgutil
import subprocess
import sys
from typing import Any

import pytest

from fhirtwin.fhir.models import (
    R4_ONLY_TYPES,
    R4_RESOURCE_TYPES,
    R4B_ONLY_TYPES,
    R4B_RESTRUCTURED_TYPES,
    ResourceValidationError,
    check_emittable,
    model_class,
    validate_bundle_entries,
    validate_resource,
)

XHTML = '<div xmlns="http://www.w3.org/1999/xhtml">generated</div>'
META = {"versionId": "2", "lastUpdated": "2024-05-02T10:11:12.345+00:00", "source": "#a1b2c3"}


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "ldl-1",
        "meta": dict(META),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "13457-7"}], "text": "LDL-C"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-05-02T09:35:00.000+01:00",
        "issued": "2024-05-02T10:00:00.000+00:00",
        "valueQuantity": {"value": 72.50, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        **extra,
    }


READ_AND_WRITTEN: list[dict[str, Any]] = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "meta": dict(META),
        "text": {"status": "generated", "div": XHTML},
        "identifier": [{"system": "https://fhirtwin.org/sid/synthetic-mrn", "value": "0001"}],
        "name": [{"family": "Synthetic-0001", "given": ["Test", None], "_given": [None, {"extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier", "valueCode": "CL"}]}]}],
        "gender": "female",
        "birthDate": "1974-12",
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                      "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
    },
    observation(),
    {
        "resourceType": "Observation",
        "id": "bp-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2024-05-02T09:00:00Z", "end": "2024-05-02T09:05:00Z"},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
             "valueQuantity": {"value": 142, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                               "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
             "valueQuantity": {"value": 88, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                               "code": "mm[Hg]"}},
        ],
    },
    {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                           "condition-ver-status", "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": "2019-03",
        "recordedDate": "2019-04-01",
    },
    {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "contained": [{"resourceType": "Medication", "id": "med",
                       "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                            "code": "617312"}]}}],
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "#med"},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2023-01-15",
        "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                               "doseAndRate": [{"doseQuantity": {"value": 40, "unit": "mg"}}]}],
    },
    {
        "resourceType": "MedicationStatement",
        "id": "ms1",
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "860975"}]},
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2022-06-01"},
    },
    {"resourceType": "Medication", "id": "m1", "code": {"text": "atorvastatin 40 mg"}},
    {
        "resourceType": "MolecularSequence",
        "id": "ms-1",
        "type": "dna",
        "coordinateSystem": 0,
        "patient": {"reference": "Patient/p1"},
        "referenceSeq": {"genomeBuild": "GRCh38", "chromosome": {"coding": [{"code": "19"}]},
                         "strand": "watson", "windowStart": 11089000, "windowEnd": 11134000},
        "variant": [{"start": 11100223, "end": 11100224, "observedAllele": "A", "referenceAllele": "G"}],
    },
    {
        "resourceType": "DiagnosticReport",
        "id": "dr1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "57698-3"}]},
        "subject": {"reference": "Patient/p1"},
        "result": [{"reference": "Observation/ldl-1"}],
    },
    {"resourceType": "Encounter", "id": "e1", "status": "finished",
     "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
     "subject": {"reference": "Patient/p1"}},
    {
        "resourceType": "RiskAssessment",
        "id": "ra1",
        "identifier": [{"system": "https://fhirtwin.org/sid/run", "value": "abc"}],
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "occurrenceDateTime": "2025-01-01T00:00:00Z",
        "basis": [{"reference": "Observation/ldl-1/_history/2"}],
        "prediction": [{"outcome": {"text": "ASCVD"}, "probabilityDecimal": 0.0732,
                        "whenRange": {"high": {"value": 10, "unit": "a", "system": "http://unitsofmeasure.org",
                                               "code": "a"}}}],
    },
    {
        "resourceType": "CarePlan",
        "id": "cp1",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": "Patient/p1"},
        "activity": [{"detail": {"status": "not-started", "code": {"text": "high-intensity statin"}}}],
    },
    {
        "resourceType": "Provenance",
        "id": "prov1",
        "target": [{"reference": "RiskAssessment/ra1/_history/1"}],
        "recorded": "2025-01-01T00:00:00.000+00:00",
        "reason": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                "code": "TREAT"}]}],
        "agent": [{"who": {"reference": "Device/fhirtwin"}}],
        "entity": [{"role": "source", "what": {"reference": "Observation/ldl-1/_history/2"}}],
        "signature": [{"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
                       "when": "2025-01-01T00:00:00Z", "who": {"reference": "Device/fhirtwin"},
                       "sigFormat": "application/jose", "data": "ZXlKaGJHY2lPaUpGVXpJMU5pSjku"}],
    },
    {"resourceType": "Device", "id": "fhirtwin", "deviceName": [{"name": "fhirtwin", "type": "model-name"}],
     "version": [{"value": "0.1.0"}]},
    {"resourceType": "Subscription", "id": "sub1", "status": "requested", "reason": "new data",
     "criteria": "Observation?code=http://loinc.org|13457-7",
     "channel": {"type": "rest-hook", "endpoint": "https://example.org/hook", "payload": "application/fhir+json"}},
    {"resourceType": "Basic", "id": "fhirtwin-cohort-marker",
     "code": {"coding": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "cohort-marker"}]}},
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]},
]


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"http://x/fhir/{r['resourceType']}/{r.get('id', '')}", "resource": r,
                       "search": {"mode": "match"}} for r in resources]}


@pytest.mark.parametrize("resource", [*READ_AND_WRITTEN, searchset(*READ_AND_WRITTEN)],
                         ids=lambda r: f"{r['resourceType']}-{r.get('id', '')}")
def test_valid_resources_validate_and_stay_untouched(resource: dict[str, Any]) -> None:
    before = copy.deepcopy(resource)
    assert validate_resource(resource) is resource
    assert resource == before
    assert repr(resource) == repr(before)  # same key order, same value types (72.50 stays a float)
    check_emittable(resource)


def test_synthetic_cohort_resources_validate_unchanged() -> None:
    cohort_mod = pytest.importorskip("fhirtwin.sandbox.cohort")
    cohort = cohort_mod.generate_cohort(n_patients=6, seed=cohort_mod.DEFAULT_SEED)
    seen_types = set()
    for bundle in cohort.bundles:
        before = copy.deepcopy(bundle)
        for resource, error in validate_bundle_entries(bundle):
            assert error is None, error
            seen_types.add(resource["resourceType"])
        assert bundle == before
    assert {"Patient", "Observation", "Condition", "MedicationRequest"} <= seen_types


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"status": None}, "status"),
        ({"effectiveDateTime": "2024-13-45"}, "effectiveDateTime"),
        ({"effectiveDateTime": "2024-05-02T09:35:00"}, "effectiveDateTime"),  # time without zone
        ({"valueQuantity": {"value": "seventy"}}, "valueQuantity.value"),
        ({"valueQuantity": {"value": float("nan")}}, "valueQuantity.value"),
        ({"code": {"coding": [{"code": " leading-space"}]}}, "code.coding[0].code"),
        ({"code": None}, "code"),
        ({"category": []}, "category"),
        ({"subject": {}}, "subject"),
        ({"subject": "Patient/p1"}, "subject"),
        ({"unknownElement": 1}, "unknownElement"),
        ({"valueString": "also a value"}, ""),  # two value[x] choices
        ({"id": "has spaces"}, "id"),
        ({"meta": {"lastUpdated": "yesterday"}}, "meta.lastUpdated"),
        ({"contained": [{"resourceType": "Patient", "id": "c", "gender": 5}]}, "contained[0].gender"),
        ({"contained": [{"id": "no-type"}]}, "contained[0].resourceType"),
        ({"component": [[{"code": {"text": "x"}}]]}, "component[0]"),
    ],
)
def test_invalid_resources_raise_with_the_location(change: dict[str, Any], location: str) -> None:
    resource = observation(**change)
    before = copy.deepcopy(resource)
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(resource)
    err = info.value
    assert (err.resource_type, err.resource_id) == ("Observation", None if "id" in change else "ldl-1")
    assert location in err.locations, err.issues
    assert resource == before


def test_errors_never_echo_values() -> None:
    secret = "Jane-Doe-1970-SSN-123456789"
    resource = observation(effectiveDateTime=secret, valueQuantity={"value": secret},
                           code={"coding": [{"code": f" {secret}"}]}, status=[secret],
                           subject={"reference": "Patient/p1", "display": secret, "extra": secret})
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(resource)
    text = str(info.value) + repr(info.value.issues) + repr(info.value.resource_id)
    assert len(info.value.issues) >= 5
    assert secret not in text and "Jane" not in text and "123456789" not in text


def test_not_a_resource_at_all() -> None:
    for value in (None, [], "Observation", 3):
        with pytest.raises(ResourceValidationError):
            validate_resource(value)
    for value in ({}, {"resourceType": 7}, {"resourceType": "NoSuchType", "id": "x"},
                  {"resourceType": "Resource"}, {"resourceType": "DomainResource"}):
        with pytest.raises(ResourceValidationError) as info:
            validate_resource(value)
        assert "resourceType" in info.value.locations


def test_absurdly_deep_json_is_refused_without_recursion_errors() -> None:
    deep: dict[str, Any] = {"url": "https://example.org/x", "valueString": "leaf"}
    for _ in range(5_000):
        deep = {"url": "https://example.org/x", "extension": [deep]}
    resource = observation(extension=[deep])
    for check in (validate_resource, check_emittable):
        with pytest.raises(ResourceValidationError) as info:
            check(resource)
        assert "nested deeper" in str(info.value)
    shallow = observation(extension=[{"url": "https://example.org/x", "extension": [
        {"url": "https://example.org/y", "valueString": "leaf"}]}])
    assert validate_resource(shallow) is shallow


def test_bundle_with_unknown_nested_type_fails_that_entry_only() -> None:
    good = observation()
    unknown = {"resourceType": "Foo", "id": "f1"}
    r4_only = {"resourceType": "MedicinalProduct", "id": "mp1", "name": [{"productName": "x"}]}
    bad = observation(id="bad-1", status=None)
    bundle = searchset(good, unknown, r4_only, bad, READ_AND_WRITTEN[0])
    before = copy.deepcopy(bundle)

    results = validate_bundle_entries(bundle)

    assert [r for r, _ in results] == [e["resource"] for e in bundle["entry"]]
    assert all(r is e["resource"] for (r, _), e in zip(results, bundle["entry"], strict=True))
    errors = [err for _, err in results]
    assert errors[0] is None and errors[2] is None and errors[4] is None
    assert errors[1] is not None and errors[1].locations == ["resourceType"]
    assert errors[1].resource_type == "Foo"
    assert errors[3] is not None and "status" in errors[3].locations
    assert bundle == before
    # the whole Bundle, by contrast, fails, naming the entries (no bare KeyError)
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(bundle)
    assert "entry[1].resource.resourceType" in info.value.locations
    assert "entry[3].resource.status" in info.value.locations
    assert not any(loc.startswith(("entry[0]", "entry[2]", "entry[4]")) for loc in info.value.locations)


def test_validate_bundle_entries_refuses_non_bundles() -> None:
    with pytest.raises(ResourceValidationError):
        validate_bundle_entries(observation())
    with pytest.raises(ResourceValidationError):
        validate_bundle_entries({"resourceType": "Bundle", "type": "searchset", "entry": {"resource": {}}})
    assert validate_bundle_entries({"resourceType": "Bundle", "type": "searchset", "total": 0}) == []


def test_unknown_type_in_contained_is_an_issue_not_a_key_error() -> None:
    resource = observation(contained=[{"resourceType": "Medication", "id": "ok", "code": {"text": "x"}},
                                      {"resourceType": "NotAThing", "id": "n"}])
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(resource)
    assert info.value.locations == ["contained[1].resourceType"]


@pytest.mark.parametrize("rtype", sorted(R4_ONLY_TYPES))
def test_r4_only_types_get_structural_checks(rtype: str) -> None:
    good = {"resourceType": rtype, "id": "r4-only", "meta": dict(META), "text": {"status": "generated", "div": XHTML},
            "extension": [{"url": "https://example.org/x", "valueString": "y"}], "someR4Element": {"text": "kept"}}
    before = copy.deepcopy(good)
    assert validate_resource(good) is good
    assert good == before
    # also when nested in a Bundle or contained, where fhir.resources alone raises a bare KeyError
    assert validate_resource(searchset(good)) is not None
    validate_resource(observation(contained=[good]))
    for broken, location in (({"id": "bad id"}, "id"), ({"meta": {"lastUpdated": "x"}}, "meta.lastUpdated"),
                             ({"someR4Element": None}, "someR4Element"), ({"extension": [{}]}, "extension[0]")):
        with pytest.raises(ResourceValidationError) as info:
            validate_resource({**good, **broken})
        assert location in info.value.locations
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(observation(contained=[{**good, "id": "bad id"}]))
    assert "contained[0].id" in info.value.locations


@pytest.mark.parametrize("rtype", sorted(R4B_RESTRUCTURED_TYPES))
def test_restructured_types_are_not_judged_by_the_r4b_model(rtype: str) -> None:
    # R4 4.0.1 Evidence/EvidenceVariable shape (exposureBackground, characteristic.definitionReference…)
    r4_shape = {"resourceType": rtype, "id": "ev", "status": "active",
                "exposureBackground": {"reference": "EvidenceVariable/bg"},
                "characteristic": [{"definitionReference": {"reference": "Group/g"}}]}
    assert validate_resource(r4_shape) is r4_shape


def test_r4_only_meta_choice_is_checked_as_meta() -> None:
    ok = observation(extension=[{"url": "https://example.org/m", "valueMeta": {"versionId": "3"}}])
    assert validate_resource(ok) is ok
    assert ok["extension"][0]["valueMeta"] == {"versionId": "3"}
    bad = observation(extension=[{"url": "https://example.org/m", "valueMeta": {"lastUpdated": "soon"}}])
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(bad)
    assert info.value.locations == ["extension[0].valueMeta.lastUpdated"]


@pytest.mark.parametrize("rtype", sorted(R4B_ONLY_TYPES))
def test_r4b_only_types_are_not_r4(rtype: str) -> None:
    resource = {"resourceType": rtype, "id": "x", "status": "active"}
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(resource)
    assert "resourceType" in info.value.locations
    with pytest.raises(ResourceValidationError) as info:
        check_emittable(resource)
    assert "resourceType" in info.value.locations
    with pytest.raises(ResourceValidationError) as info:
        check_emittable({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": resource}]})
    assert info.value.locations == ["entry[0].resource.resourceType"]
    with pytest.raises(ResourceValidationError) as info:
        check_emittable(observation(contained=[resource]))
    assert info.value.locations == ["contained[0].resourceType"]


@pytest.mark.parametrize(
    ("resource", "location"),
    [
        (observation(extension=[{"url": "https://example.org/r",
                                 "valueCodeableReference": {"concept": {"text": "x"}}}]),
         "extension[0].valueCodeableReference"),
        (observation(extension=[{"url": "https://example.org/r", "valueRatioRange": {
            "lowNumerator": {"value": 1}, "denominator": {"value": 2}}}]), "extension[0].valueRatioRange"),
        (observation(_status={"extension": [{"url": "https://example.org/r", "valueRatioRange": {
            "lowNumerator": {"value": 1}}}]}), "_status.extension[0].valueRatioRange"),
        ({"resourceType": "Parameters", "parameter": [{"name": "p", "valueCodeableReference": {
            "reference": {"reference": "Observation/1"}}}]}, "parameter[0].valueCodeableReference"),
        ({"resourceType": "PlanDefinition", "status": "draft",
          "subjectCanonical": "https://example.org/Group"}, "subjectCanonical"),
        ({"resourceType": "PlanDefinition", "status": "draft",
          "action": [{"title": "a", "subjectCanonical": "https://example.org/Group"}]},
         "action[0].subjectCanonical"),
        ({"resourceType": "ActivityDefinition", "status": "draft",
          "subjectCanonical": "https://example.org/Group"}, "subjectCanonical"),
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": observation(
            extension=[{"url": "u", "valueRatioRange": {"lowNumerator": {"value": 1}}}])}]},
         "entry[0].resource.extension[0].valueRatioRange"),
    ],
)
def test_check_emittable_refuses_r4b_only_elements(resource: dict[str, Any], location: str) -> None:
    before = copy.deepcopy(resource)
    with pytest.raises(ResourceValidationError) as info:
        check_emittable(resource)
    assert location in info.value.locations
    assert resource == before


def test_check_emittable_accepts_r4_content() -> None:
    for resource in READ_AND_WRITTEN:
        check_emittable(resource)
    # an element merely named like a datatype is not R4B content
    check_emittable({"resourceType": "Basic", "code": {"text": "x"},
                     "extension": [{"url": "https://example.org/CodeableReference", "valueString": "ok"}]})
    check_emittable({"resourceType": "MedicinalProduct", "id": "mp"})  # R4-only is fine on the R4 wire
    with pytest.raises(ResourceValidationError):
        check_emittable({"resourceType": "Nope"})


def test_type_lists_match_the_installed_r4b_package() -> None:
    import fhir.resources.R4B as r4b

    found = set()
    for info in pkgutil.iter_modules(r4b.__path__):
        module = importlib.import_module(f"fhir.resources.R4B.{info.name}")
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and obj.__module__ == module.__name__ and name.lower() == info.name
                    and hasattr(obj, "has_resource_base") and obj.has_resource_base()):
                found.add(name)
    found -= {"Resource", "DomainResource"}
    assert found - R4_RESOURCE_TYPES == R4B_ONLY_TYPES
    assert R4_RESOURCE_TYPES - found == R4_ONLY_TYPES
    assert found & R4_RESOURCE_TYPES >= R4B_RESTRUCTURED_TYPES
    assert not R4_ONLY_TYPES & R4B_ONLY_TYPES


def test_model_class_lookup_is_cached_and_refuses_non_r4b_models() -> None:
    first = model_class("Observation")
    before = model_class.cache_info().hits
    assert model_class("Observation") is first
    assert model_class.cache_info().hits == before + 1
    assert first.__module__ == "fhir.resources.R4B.observation"
    for rtype in ("MedicinalProduct", "Evidence", "SubscriptionTopic", "Nope"):
        with pytest.raises(KeyError):
            model_class(rtype)


def test_only_r4b_models_are_imported() -> None:
    code = (
        "import sys\n"
        "from fhirtwin.fhir.models import validate_resource\n"
        "for t in ('Observation', 'Patient', 'Condition', 'Bundle', 'CarePlan', 'Provenance'):\n"
        "    try:\n"
        "        validate_resource({'resourceType': t, 'id': 'x'})\n"
        "    except ValueError:\n"
        "        pass\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('fhir.resources')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "fhir.resources.R4B.observation" in out
    assert [m for m in out if m != "fhir.resources" and not m.startswith("fhir.resources.R4B")] == []
