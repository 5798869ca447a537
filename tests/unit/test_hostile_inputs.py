"""Property-based tests: hostile variants of valid R4 resources against build_twin and validate_resource.

Valid fixtures (Patient, lab and BP-panel Observations, Condition, MedicationRequest) are mutated: keys
deleted, values replaced with random JSON (huge, negative, non-finite numbers, numbers as strings, nested
lists and objects, null), wrong types, unknown types in ``contained``, absurd units, future and malformed
dates, empty codings, status codes outside the R4 value sets, references to other patients. Then:

* ``build_twin`` never raises, never changes its input, accounts for every input (used or ledgered) and
  never uses a resource it rejected;
* ``validate_resource``/``check_emittable`` raise nothing but ``ResourceValidationError``, and
  ``validate_bundle_entries`` never raises for a Bundle of such entries;
* strict mode (``Engine(strict=True)``) never lets a resource that failed validation feed
  the twin, and ledgers each one as ``malformed``.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from datetime import date
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirtwin.adapters import build_twin, flatten_resources
from fhirtwin.engine import Engine
from fhirtwin.fhir.models import ResourceValidationError, check_emittable, validate_bundle_entries, validate_resource
from fhirtwin.twin import LedgerKind, TwinState

REF = date(2025, 1, 1)
PID = "p1"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
#: 250 examples per test keeps the suite fast; set HOSTILE_EXAMPLES higher for a deeper hunt.
SETTINGS = settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


FIXTURES: list[dict[str, Any]] = [
    {
        "resourceType": "Patient",
        "id": PID,
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00.000+00:00"},
        "gender": "male",
        "birthDate": "1960-04-12",
        "name": [{"family": "Synthetic-0001", "given": ["Test"]}],
    },
    {
        "resourceType": "Observation",
        "id": "tc",
        "meta": {"versionId": "2"},
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2093-3"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": "2024-03-03T08:00:00Z",
        "valueQuantity": _qty(201.5, "mg/dL"),
    },
    {
        "resourceType": "Observation",
        "id": "hdl",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2085-9"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": "2024-03-03T08:00:00Z",
        "valueQuantity": _qty(1.2, "mmol/L"),
    },
    {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": "2024-04-01",
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _qty(142, "mm[Hg]")},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": _qty(88, "mm[Hg]")},
        ],
    },
    {
        "resourceType": "Condition",
        "id": "dm",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "onsetDateTime": "2015-03-01",
    },
    {
        "resourceType": "MedicationRequest",
        "id": "statin",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "617312"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "authoredOn": "2020-01-01",
        "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                               "doseAndRate": [{"doseQuantity": {"value": 10, "unit": "mg", "code": "mg"}}]}],
    },
]

HOSTILE_STRINGS = [
    "", " ", "NaN", "nan", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "9" * 400, "-0", "0x1F",
    "72,5", "seventy", "2999-12-31", "2999-12-31T23:59:59Z", "2024-02-30", "2024-13-01", "2024-05-02T25:61:00Z",
    "0000-00-00", "2024-05-02T09:35:00", "10000-01-01", "-2024-01-01", "2024", "2024-05", "T10:00", "\x00",
    "Patient/p2", "\u202e", "a" * 2000, "final", "Patient/", "#", "urn:uuid:1",
]
NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 1e308, -1e308, 5e-324, -0.0, 0, -1]),
)
LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(HOSTILE_STRINGS))
JSONISH = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ODD_STATUS = st.one_of(
    st.sampled_from(["bogus", "FINAL", "final ", " final", "cancelled", "entered-in-error", "preliminary", "amended",
                     "corrected", "unknown", "draft", "on-hold", "stopped", "completed", "refuted", "provisional",
                     "resolved", "inactive", "", "registered"]),
    st.text(max_size=10),
)
DATES = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.dates().map(str), st.datetimes().map(lambda d: d.isoformat()),
                  NUMBERS, st.none())
UNITS = st.sampled_from(["furlongs/fortnight", "", "%%", "mg/dL/s", "kg", "mmol/L", "[iU]", "10*3/uL", "mg/dl",
                         "MG/DL", "umol/L", "mm[Hg]", "/min", "1", "{beats}/min", "g/L", "L", "\u00b5mol/L"])
REFERENCES = st.one_of(
    st.sampled_from(["Patient/p2", f"Patient/{PID}/_history/3", "https://other.example/fhir/Patient/p2",
                     f"https://other.example/fhir/Patient/{PID}", "Group/g1", "#contained", "", "Patient/",
                     "Patient", "urn:uuid:0b6e", f"Patient/{PID},p2", "Patient/p2/_history/1"]),
    st.text(max_size=15),
)
DATE_KEYS = {"effectiveDateTime", "issued", "onsetDateTime", "recordedDate", "authoredOn", "birthDate", "start",
             "end", "abatementDateTime", "effectiveInstant", "lastUpdated", "deceasedDateTime"}
OPS = ["delete", "replace", "wrong_type", "status", "contained", "unit", "number", "date", "coding", "subject"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(value, (*prefix, i)))
    return out


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    node = root
    for key in path[:-1]:
        node = node[key]
    return node


def _wrong_type(value: Any) -> Any:
    if isinstance(value, dict):
        return [value] if value else "not an object"
    if isinstance(value, list):
        return value[0] if value else {}
    if isinstance(value, str):
        return {"value": value}
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value) if abs(value) < 1e300 else [value]
    return 0


@st.composite
def hostile_resource(draw: st.DrawFn, fixture: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fixture with one to four hostile mutations."""
    res = copy.deepcopy(fixture if fixture is not None else draw(st.sampled_from(FIXTURES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPS))
        paths = _paths(res)
        if op in ("delete", "replace", "wrong_type") and paths:
            path = draw(st.sampled_from(paths))
            parent = _parent(res, path)
            if op == "delete":
                del parent[path[-1]]
            elif op == "replace":
                parent[path[-1]] = draw(JSONISH)
            else:
                parent[path[-1]] = _wrong_type(parent[path[-1]])
        elif op == "status":
            target = draw(st.sampled_from(["status", "clinicalStatus", "verificationStatus"]))
            if target == "status":
                res["status"] = draw(ODD_STATUS)
            else:
                res[target] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": draw(ODD_STATUS)}]}
        elif op == "contained":
            rtype = draw(st.one_of(st.sampled_from(["Foo", "MedicinalProduct", "SubscriptionTopic", "Medication",
                                                    "Patient", "", "observation"]), st.text(max_size=8), NUMBERS))
            res["contained"] = [{"resourceType": rtype, "id": "c1"}, *draw(st.lists(JSONISH, max_size=1))]
        elif op == "unit":
            quantities = [p for p in paths if p and p[-1] in ("valueQuantity", "doseQuantity")]
            if quantities:
                q = _get(res, draw(st.sampled_from(quantities)))
                if isinstance(q, dict):
                    unit = draw(UNITS)
                    q["unit"] = unit
                    q["code"] = draw(st.sampled_from([unit, "", "mg/dL", "xyz"]))
                    q["value"] = draw(st.one_of(NUMBERS, st.sampled_from(HOSTILE_STRINGS)))
        elif op == "number":
            numeric = [p for p in paths if isinstance(_get(res, p), int | float) and not isinstance(_get(res, p), bool)]
            if numeric:
                path = draw(st.sampled_from(numeric))
                _parent(res, path)[path[-1]] = draw(st.one_of(
                    NUMBERS, st.floats(-1e4, 1e4), NUMBERS.map(str), st.sampled_from(HOSTILE_STRINGS)))
        elif op == "date":
            dated = [p for p in paths if p and p[-1] in DATE_KEYS]
            if dated:
                path = draw(st.sampled_from(dated))
                _parent(res, path)[path[-1]] = draw(DATES)
            else:
                res["effectiveDateTime"] = draw(DATES)
        elif op == "coding":
            codings = [p for p in paths if p and p[-1] == "coding"]
            if codings:
                path = draw(st.sampled_from(codings))
                _parent(res, path)[path[-1]] = draw(st.sampled_from(
                    [[], [{}], [{"system": None}], [{"code": ""}], [{"code": None, "system": LOINC}], [[]], "2093-3",
                     [{"system": LOINC, "code": "2093-3"}, {"system": LOINC, "code": "8480-6"}]]))
        elif op == "subject":
            key = "patient" if res.get("resourceType") == "MolecularSequence" else "subject"
            res[key] = draw(st.one_of(REFERENCES.map(lambda r: {"reference": r}), JSONISH))
    return res


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    return _parent(root, path)[path[-1]]


@st.composite
def hostile_record(draw: st.DrawFn) -> list[Any]:
    """A patient's record: every fixture once, some of them mutated, in random order, sometimes in a Bundle."""
    record: list[Any] = []
    for fixture in FIXTURES:
        if draw(st.booleans()):
            record.append(draw(hostile_resource(fixture)))
        else:
            record.append(copy.deepcopy(fixture))
    record = draw(st.permutations(record))
    if draw(st.integers(0, 9)) == 0:
        record.append(draw(JSONISH))  # not even a resource
    if draw(st.booleans()):
        return [{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in record]}]
    return list(record)


# Ledger kinds that, without a variable, mean the whole resource was not used (default BuildOptions).
WHOLE_REJECTIONS = {LedgerKind.WRONG_SUBJECT, LedgerKind.ENTERED_IN_ERROR, LedgerKind.REFUTED,
                    LedgerKind.UNSUPPORTED, LedgerKind.NOT_FINAL, LedgerKind.MALFORMED}


def _key(resource: Any) -> str | None:
    if isinstance(resource, dict) and isinstance(resource.get("id"), str) and resource["id"] \
            and isinstance(resource.get("resourceType"), str) and resource["resourceType"]:
        return f"{resource['resourceType']}/{resource['id']}"
    return None


def _other_patient(resource: dict[str, Any]) -> bool:
    """Independent oracle: the resource's subject/patient is a Patient other than PID (or it is one)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") != PID
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            match = re.search(r"(?:^|/)Patient/([^/]+)(?:/_history/[^/]*)?$", ref["reference"])
            if match:
                return match.group(1) != PID
    return False


def assert_accounted(state: TwinState, inputs: list[Any], *, rejected_before: set[str] = frozenset()) -> None:
    """Every input is used or ledgered; a resource rejected as a whole is the source of no Evidence."""
    used = {s.unversioned for s in state.sources()}
    ledger_sources = state.ledger.sources()
    ledgered = {src.split("/_history/")[0] for src in ledger_sources}
    keys = Counter(_key(r) for r in inputs)
    for position, resource in enumerate(inputs):
        key = _key(resource)
        if key is None:
            assert any(src == f"input[{position}]" or src.endswith(f"/?[{position}]") for src in ledger_sources), \
                position
            continue
        assert key in used or key in ledgered, key
        if keys[key] > 1:
            continue  # the same Type/id twice: one version is used, the other ledgered as duplicate
        whole = [e for e in state.ledger.entries(source=key) if e.variable is None and e.kind in WHOLE_REJECTIONS
                 and not (resource.get("resourceType") == "Patient" and e.kind is LedgerKind.MALFORMED)]
        if whole or key in rejected_before or _other_patient(resource):
            assert key not in used, (key, whole)


@SETTINGS
@given(record=hostile_record())
def test_build_twin_survives_hostile_records_and_accounts_for_every_input(record: list[Any]) -> None:
    before = repr(record)
    state = build_twin(PID, record, REF)
    assert repr(record) == before, "build_twin changed its input"
    assert_accounted(state, flatten_resources(record))
    for ev in state.all_evidence():
        assert ev.source.unversioned != "Patient/p2"
        assert not (isinstance(ev.value, float) and ev.value != ev.value), f"NaN evidence for {ev.variable}"


@SETTINGS
@given(resource=hostile_resource())
def test_build_twin_with_one_hostile_resource(resource: dict[str, Any]) -> None:
    patient = copy.deepcopy(FIXTURES[0])
    state = build_twin(PID, [patient, resource], REF)
    assert_accounted(state, [patient, resource])
    assert state.demographics.source is not None or resource.get("id") == PID


@SETTINGS
@given(resource=st.one_of(hostile_resource(), JSONISH))
def test_validate_resource_raises_only_its_own_error(resource: Any) -> None:
    before = repr(resource)
    try:
        assert validate_resource(resource) is resource
    except ResourceValidationError as exc:
        assert exc.issues and all(isinstance(i.location, str) and i.message for i in exc.issues)
    try:
        check_emittable(resource)
    except ResourceValidationError as exc:
        assert exc.issues
    assert repr(resource) == before


@SETTINGS
@given(resources=st.lists(st.one_of(hostile_resource(), JSONISH), min_size=1, max_size=4))
def test_validate_bundle_entries_never_sinks_the_bundle(resources: list[Any]) -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    before = repr(bundle)
    results = validate_bundle_entries(bundle)
    assert len(results) == len(resources)
    for (got, error), sent in zip(results, resources, strict=True):
        assert got is sent
        assert error is None or isinstance(error, ResourceValidationError)
    assert repr(bundle) == before


@settings(max_examples=50, deadline=None)
@given(resource=hostile_resource())
def test_validation_is_deterministic(resource: dict[str, Any]) -> None:
    """Same input, same verdict and issues (the cached model lookups carry no state between calls)."""
    try:
        validate_resource(resource)
        first = None
    except ResourceValidationError as exc:
        first = exc.issues
    try:
        validate_resource(copy.deepcopy(resource))
        second = None
    except ResourceValidationError as exc:
        second = exc.issues
    assert first == second


class _Source:
    """An in-memory record source (the engine's record source), for strict mode without a server."""

    def __init__(self, record: list[Any]) -> None:
        self.record = record

    def fetch_patient_record(self, patient_id: str, types: Any, **_: Any) -> list[dict[str, Any]]:
        return self.record

    def fetch_patients_records(self, patient_ids: Any, types: Any, **_: Any) -> dict[str, list[dict[str, Any]]]:
        return {pid: self.record for pid in patient_ids}


@SETTINGS
@given(record=hostile_record())
def test_strict_mode_never_uses_what_it_rejected(record: list[Any]) -> None:
    inputs = flatten_resources(record)
    failed: set[str] = set()
    for resource in inputs:
        try:
            validate_resource(resource)
        except ResourceValidationError:
            key = _key(resource)
            if key is not None:
                failed.add(key)
    engine = Engine(_Source(record), strict=True)
    state = engine.twin(engine.read(PID, with_stored=False), REF)
    strict = {e.source.split("/_history/")[0] for e in state.ledger.entries(kind=LedgerKind.MALFORMED)
              if e.message.startswith("failed R4 validation")}
    assert failed <= strict
    assert not failed & {s.unversioned for s in state.sources()}
    assert_accounted(state, inputs, rejected_before=failed)
