"""CDS Hooks service: discovery, request validation, 412 without data, card shape from prefetch, feedback."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhirtwin.sandbox.cohort import generate_cohort
from fhirtwin.service import cds_hooks
from fhirtwin.service.app import ServiceSettings, create_app
from fhirtwin.service.twin_view import indicator_for

SERVICE = f"/cds-services/{cds_hooks.SERVICE_ID}"
PUBLIC = "https://twin.example.org"
#: The seven scales of the twin, in the order the card lists them (the issue names them).
SCALES = ("molecular", "cellular", "tissue", "organ", "clinical", "behavioral", "environmental")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    # the FHIR server is never contacted by these tests (prefetch only, or requests rejected before reading)
    store = tmp_path_factory.mktemp("cds") / "service.sqlite3"
    app = create_app(ServiceSettings(fhir_server="http://127.0.0.1:9/fhir", public_url=PUBLIC, dev_no_auth=True,
                                     store_path=str(store)))
    return TestClient(app)


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, Any]]]:
    cohort = generate_cohort(n_patients=6)
    out = {}
    for bundle in cohort.bundles:
        resources = [e["resource"] for e in bundle["entry"]]
        out[resources[0]["id"]] = resources
    return out


def searchset(resources: list[dict[str, Any]], included: list[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]
            + [{"resource": r, "search": {"mode": "include"}} for r in included]}


def prefetch_for(record: list[dict[str, Any]]) -> dict[str, Any]:
    """What a CDS client sends for the service's prefetch templates (from the patient's resources).

    Medications are ``_include``d with the MedicationRequests (the template's ``_include``).
    """
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in record:
        by_type.setdefault(r["resourceType"], []).append(r)
    return {
        "patient": by_type["Patient"][0],
        "observations": searchset(by_type.get("Observation", [])),
        "conditions": searchset(by_type.get("Condition", [])),
        "medicationRequests": searchset(by_type.get("MedicationRequest", []), by_type.get("Medication", [])),
        "medicationStatements": searchset(by_type.get("MedicationStatement", [])),
        "molecularSequences": searchset(by_type.get("MolecularSequence", [])),
        "medicationDispenses": searchset(by_type.get("MedicationDispense", [])),
        "diagnosticReports": searchset(by_type.get("DiagnosticReport", [])),
        "consents": searchset(by_type.get("Consent", [])),
        "procedures": searchset(by_type.get("Procedure", [])),
    }


def hook_request(patient_id: str, **extra: Any) -> dict[str, Any]:
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": patient_id}}
    body.update(extra)
    return body


def test_discovery_lists_the_patient_view_service_with_prefetch(client: TestClient) -> None:
    services = client.get("/cds-services").json()["services"]
    [service] = services
    assert service["hook"] == "patient-view" and service["id"] == cds_hooks.SERVICE_ID
    assert service["title"] and service["description"]
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    searches = ("observations", "conditions", "medicationRequests", "medicationStatements", "medicationDispenses",
                "molecularSequences", "diagnosticReports", "procedures")
    assert set(service["prefetch"]) == {"patient", "consents", *searches}
    assert service["prefetch"]["consents"] == "Consent?patient={{context.patientId}}&status=active"
    for key in searches:
        assert "patient={{context.patientId}}" in service["prefetch"][key]
    assert service["prefetch"]["medicationRequests"].endswith("&_include=MedicationRequest:medication")
    assert service["prefetch"]["medicationStatements"].endswith("&_include=MedicationStatement:medication")
    # genomic results (69548-6 variants, phenotypes) come with the observations: that query is not narrowed
    assert service["prefetch"]["observations"].startswith("Observation?")
    assert "code=" not in service["prefetch"]["observations"]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b.pop("hook"), "hook"),
    (lambda b: b.update(hook="order-sign"), "patient-view"),
    (lambda b: b.update(hookInstance="not-a-uuid"), "hookInstance"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b["context"].pop("patientId"), "patientId"),
    (lambda b: b["context"].update(patientId="a b"), "patientId"),
    (lambda b: b["context"].update(userId="Device/1"), "userId"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "patient/*.rs", "subject": "x"}), "fhirServer"),
    (lambda b: b.update(fhirServer="http://ehr.example/fhir",
                        fhirAuthorization={"access_token": "t", "token_type": "Bearer"}), "fhirAuthorization"),
    (lambda b: b.update(fhirServer="ftp://ehr.example/fhir"), "fhirServer"),
    (lambda b: b.update(prefetch={"patient": "Patient/1"}), "prefetch"),
])
def test_malformed_requests_are_400_with_a_json_error(client: TestClient, mutate: Any, fragment: str) -> None:
    body = hook_request("ftp-0001")
    mutate(body)
    response = client.post(SERVICE, json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "bad_request" and fragment in error["message"]
    assert "Traceback" not in response.text


def test_secret_values_are_never_echoed_in_errors(client: TestClient) -> None:
    body = hook_request("ftp-0001", fhirServer="http://ehr.example/fhir",
                        fhirAuthorization={"access_token": "SECRET-TOKEN-VALUE", "token_type": "bearer",
                                           "expires_in": 300, "scope": "s", "subject": "x"})
    response = client.post(SERVICE, json=body)
    assert response.status_code == 400
    assert "SECRET-TOKEN-VALUE" not in response.text


def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    response = client.post(SERVICE, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_unknown_service_is_404(client: TestClient) -> None:
    assert client.post("/cds-services/nope", json=hook_request("ftp-0001")).status_code == 404


def test_no_prefetch_and_no_fhir_server_is_412(client: TestClient) -> None:
    response = client.post(SERVICE, json=hook_request("ftp-0001"))
    assert response.status_code == 412
    assert response.json()["error"] == "precondition_failed"


def test_incomplete_prefetch_without_fhir_server_is_412(client: TestClient, records: dict) -> None:
    prefetch = prefetch_for(records["ftp-0001"])
    del prefetch["observations"]
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 412
    assert "observations" in response.json()["message"]


def test_prefetch_of_another_patient_is_rejected(client: TestClient, records: dict) -> None:
    prefetch = prefetch_for(records["ftp-0001"])
    prefetch["conditions"] = prefetch_for(records["ftp-0002"])["conditions"]
    assert prefetch["conditions"]["entry"], "the fixture patient needs conditions"
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 400


def test_prefetch_patient_must_be_the_context_patient(client: TestClient, records: dict) -> None:
    prefetch = prefetch_for(records["ftp-0001"])
    prefetch["patient"] = records["ftp-0002"][0]
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 412


def by_reference(record: list[dict[str, Any]], medication_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A copy of ``record`` whose first MedicationRequest names its drug through a Medication (returned too)."""
    record = copy.deepcopy(record)
    request = next(r for r in record if r["resourceType"] == "MedicationRequest")
    medication = {"resourceType": "Medication", "id": medication_id, "meta": {"versionId": "2"},
                  "code": request.pop("medicationCodeableConcept")}
    request["medicationReference"] = {"reference": f"Medication/{medication_id}"}
    return record, medication


def test_included_medication_the_record_refers_to_reaches_the_twin(client: TestClient, records: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    record, medication = by_reference(records["ftp-0001"], "med-by-ref")
    runs: list[Any] = []
    build_cards = cds_hooks.build_cards

    def spy(run: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        runs.append(run)
        return build_cards(run, *args, **kwargs)

    monkeypatch.setattr(cds_hooks, "build_cards", spy)
    prefetch = prefetch_for([*record, medication])
    assert prefetch["medicationRequests"]["entry"][-1] == {"resource": medication, "search": {"mode": "include"}}
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 200, response.text
    [card] = response.json()["cards"]
    check_card(card)
    [run] = runs
    # the drug was resolved through the Medication: it is a source of the twin, and nothing was left unresolved
    assert "Medication/med-by-ref/_history/2" in {s.reference for s in run.state.sources()}
    assert not [e for e in run.state.ledger.entries() if "Medication" in e.message and "not in the input" in e.message]


def test_included_medication_the_record_does_not_use_is_400(client: TestClient, records: dict) -> None:
    record, medication = by_reference(records["ftp-0001"], "med-by-ref")
    stray = {"resourceType": "Medication", "id": "med-stray", "code": copy.deepcopy(medication["code"])}
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch_for([*record, medication, stray])))
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "bad_request" and "Medication" in error["message"]
    assert "med-stray" not in response.text  # messages name types, never ids


def check_card(card: dict[str, Any]) -> None:
    uuid.UUID(card["uuid"])
    assert 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"] and card["source"]["url"] == f"{PUBLIC}/model-card"
    link, model_card = card["links"]
    assert link["type"] == "smart" and link["url"] == f"{PUBLIC}/launch" and link["label"]
    assert model_card["type"] == "absolute" and model_card["url"] == f"{PUBLIC}/model-card" and model_card["label"]


@pytest.mark.parametrize("patient_id", ["ftp-0001", "ftp-0002", "ftp-0003", "ftp-0004"])
def test_card_from_complete_prefetch(client: TestClient, records: dict, patient_id: str) -> None:
    response = client.post(SERVICE, json=hook_request(patient_id, prefetch=prefetch_for(records[patient_id])))
    assert response.status_code == 200, response.text
    [card] = response.json()["cards"]
    check_card(card)
    if "suggestions" not in card:  # insufficient data or nothing eligible: an info card without suggestion
        assert card["indicator"] in ("info", "warning", "critical")
        return
    assert "90 % interval" in card["detail"]
    assert "Data quality and caveats" in card["detail"]
    scale_lines = card["detail"].split("**What each scale contributed**")[1].strip().splitlines()[:7]
    assert [line.split(":")[0] for line in scale_lines] == [f"- {s}" for s in SCALES]
    assert card["selectionBehavior"] == "at-most-one"
    [suggestion] = card["suggestions"]
    uuid.UUID(suggestion["uuid"])
    [action] = suggestion["actions"]
    assert action["type"] == "create"
    care_plan = action["resource"]
    assert care_plan["resourceType"] == "CarePlan" and care_plan["status"] == "draft"
    assert care_plan["intent"] == "proposal"
    assert care_plan["subject"]["reference"] == f"Patient/{patient_id}"
    # the profile requires supportingInfo: the draft cites the inputs it used, never unwritten RiskAssessments
    inputs = {f"{r['resourceType']}/{r['id']}" for r in records[patient_id]}
    cited = [i["reference"] for i in care_plan["supportingInfo"]]
    assert cited and all(ref.split("/_history")[0] in inputs for ref in cited)
    [scale_note] = [n["text"] for n in care_plan["note"] if n["text"].startswith("What each scale")]
    assert all(f"{s}: " in scale_note for s in SCALES)


def test_indicator_is_one_of_the_three_and_the_card_states_its_rule(client: TestClient, records: dict) -> None:
    seen = set()
    for patient_id, record in records.items():
        card = client.post(SERVICE, json=hook_request(patient_id, prefetch=prefetch_for(record))).json()["cards"][0]
        if "total CVD risk" in card["summary"]:
            seen.add(card["indicator"])
            assert "PREVENT-ASCVD >= 10 %" in card["detail"]
    assert seen and seen <= {"info", "warning", "critical"}


class _Forecast:
    """Just enough of a Forecast: fixed 10-year medians, the guideline categories from the engine."""

    horizon_years = 10.0

    def __init__(self, ascvd: float, total: float) -> None:
        self.medians = {"ascvd": ascvd, "total_cvd": total}
        self.cif = self.medians

    def at_horizon(self, outcome: str, years: float | None = None) -> dict[str, float]:
        return {"median": self.medians[outcome]}

    def risk_category(self, outcome: str, years: float, p: float):
        from fhirtwin.sim.guidelines import risk_category

        return risk_category(outcome, years, p)


def test_indicator_thresholds() -> None:
    # literal 2026 ACC/AHA PREVENT-ASCVD cut-points (5 %, 10 %) and the 2025 AHA/ACC 7.5 % total-CVD threshold
    assert indicator_for(_Forecast(0.02, 0.05)) == "info"
    assert indicator_for(_Forecast(0.049, 0.0749)) == "info"
    assert indicator_for(_Forecast(0.04, 0.075)) == "warning"
    assert indicator_for(_Forecast(0.05, 0.06)) == "warning"
    assert indicator_for(_Forecast(0.0999, 0.30)) == "warning"
    assert indicator_for(_Forecast(0.10, 0.12)) == "critical"


def test_null_prefetch_value_means_queried_and_empty(client: TestClient, records: dict) -> None:
    prefetch = prefetch_for(records["ftp-0001"])
    prefetch["molecularSequences"] = None
    del prefetch["diagnosticReports"]  # optional key missing, no fhirServer: answered with a caveat
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 200
    [card] = response.json()["cards"]
    check_card(card)
    assert "not provided: diagnosticReports" in card.get("detail", "")
    assert "molecularSequences" not in card.get("detail", "")  # null is queried-and-empty, not missing


def test_insufficient_data_gives_an_info_card(client: TestClient, records: dict) -> None:
    prefetch = prefetch_for(records["ftp-0001"])
    prefetch["observations"] = searchset([])  # genomic Observations included: they come in this key
    response = client.post(SERVICE, json=hook_request("ftp-0001", prefetch=prefetch))
    assert response.status_code == 200
    [card] = response.json()["cards"]
    check_card(card)
    assert card["indicator"] == "info" and "suggestions" not in card
    assert "not enough data" in card["summary"]


def test_long_summaries_are_cut_below_140() -> None:
    text = cds_hooks._summary("x" * 300)
    assert len(text) < 140


def test_feedback_is_accepted_and_stored(client: TestClient) -> None:
    card, suggestion = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"feedback": [
        {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}],
         "outcomeTimestamp": "2026-11-27T10:00:00Z"},
        {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-11-27T10:01:00Z",
         "overrideReason": {"reason": {"code": "no-longer-relevant", "system": "https://example.org",
                                       "display": "No longer relevant"}, "userComment": "seen"}},
    ]}
    response = client.post(f"{SERVICE}/feedback", json=body)
    assert response.status_code == 200
    stored = [f for f in cds_hooks.stored_feedback(client.app.state.settings) if f["card"] == card]
    assert [f["outcome"] for f in stored] == ["accepted", "overridden"]
    assert stored[0]["acceptedSuggestions"] == [suggestion]


@pytest.mark.parametrize("item", [
    {"outcome": "accepted", "acceptedSuggestions": [{"id": "s"}], "outcomeTimestamp": "2026-11-27T10:00:00Z"},
    {"card": "c", "outcome": "maybe", "outcomeTimestamp": "2026-11-27T10:00:00Z"},
    {"card": "c", "outcome": "accepted", "outcomeTimestamp": "2026-11-27T10:00:00Z"},
    {"card": "c", "outcome": "overridden"},
])
def test_malformed_feedback_is_400(client: TestClient, item: dict) -> None:
    response = client.post(f"{SERVICE}/feedback", json={"feedback": [copy.deepcopy(item)]})
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_model_card_is_served(client: TestClient) -> None:
    response = client.get("/model-card", headers={"Accept": "text/markdown"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    assert "Model card" in response.text
    assert client.get("/model-card").json()["format"] == "fhirtwin-model-card/1"  # JSON by default
