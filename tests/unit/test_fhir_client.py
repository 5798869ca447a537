"""FhirClient against faked HTTP (responses): headers, paging, retries, errors, hooks, batch record reads."""

from __future__ import annotations

import json
import logging
import random
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from responses import matchers

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.fhir.client import FhirClient, batch_results, check_transaction_response, is_retry_safe
from fhirtwin.fhir.errors import (
    FhirConflict,
    FhirConnectionError,
    FhirGone,
    FhirHttpError,
    FhirNotFound,
    FhirPagingLimit,
    FhirServerError,
    FhirThrottled,
    FhirTimeout,
    FhirTransactionError,
    FhirValidationError,
    path_template,
    redact_url,
)

BASE = "https://fhir.example.org/r4"
NOW = 1_800_000_000.0


class Sleeps(list):
    """Records requested sleeps instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps) -> FhirClient:
    return FhirClient(BASE, sleep=sleeps, clock=lambda: NOW, rng=random.Random(7), backoff=0.5, max_retries=3)


def outcome(code: str = "processing", diagnostics: str = "boom") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle: dict = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        "link": [{"relation": "self", "url": "x"}],
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def obs(i: int, patient: str = "p1") -> dict:
    return {"resourceType": "Observation", "id": f"o{i}", "subject": {"reference": f"Patient/{patient}"}}


# ------------------------------------------------------------------ headers, TLS, read


@responses.activate
def test_read_sends_fhir_headers_and_verifies_tls(client: FhirClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # an env CA bundle would replace True by its path
        monkeypatch.delenv(name, raising=False)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    patient = client.read("Patient", "p1")
    assert patient == {"resourceType": "Patient", "id": "p1"}
    sent = responses.calls[0].request
    assert sent.headers["Accept"] == "application/fhir+json"
    assert sent.headers["Accept-Encoding"] == "gzip"
    assert sent.req_kwargs["verify"] is True
    assert client.verify is True


@responses.activate
def test_body_requests_carry_fhir_content_type(client: FhirClient) -> None:
    responses.put(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"}})
    client.update({"resourceType": "Patient", "id": "p1"}, if_match="1")
    sent = responses.calls[0].request
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert sent.headers["If-Match"] == 'W/"1"'
    assert json.loads(sent.body) == {"resourceType": "Patient", "id": "p1"}


@responses.activate
def test_vread_and_ids_cannot_inject_path_segments(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/a%2Fb/_history/3", json={"resourceType": "Patient", "id": "a/b"})
    assert client.vread("Patient", "a/b", "3")["id"] == "a/b"


@responses.activate
def test_not_found_and_gone_raise_with_outcome(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", status=404, json=outcome("not-found", "Patient/p1 is not known"))
    responses.get(f"{BASE}/Patient/p2", status=410, json=outcome("deleted"))
    with pytest.raises(FhirNotFound) as err:
        client.read("Patient", "p1")
    assert err.value.status == 404
    assert err.value.method == "GET"
    assert err.value.issues[0]["code"] == "not-found"
    assert err.value.outcome["resourceType"] == "OperationOutcome"
    assert "is not known" not in str(err.value)  # diagnostics can quote identifiers
    with pytest.raises(FhirGone):
        client.read("Patient", "p2")


@responses.activate
def test_error_url_keeps_path_and_hides_query_values(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", status=400, json=outcome("invalid"))
    with pytest.raises(FhirHttpError) as err:
        client.search("Observation", {"patient": "secret-mrn-123", "code": "1234-5"})
    assert "secret-mrn-123" not in str(err.value)
    assert err.value.url == f"{BASE}/Observation?patient=***&code=***"


def test_redaction_helpers() -> None:
    assert redact_url("https://u:pw@h/fhir/Patient?name=Smith") == "https://h/fhir/Patient?name=***"
    assert path_template(f"{BASE}/Patient/123/_history/2", BASE) == "Patient/{id}/_history/{vid}"
    assert path_template(f"{BASE}/Observation/_search", BASE) == "Observation/_search"
    assert path_template("https://files.example.org/Patient/1", BASE) == "{external}"


@responses.activate
def test_logs_carry_no_identifiers(client: FhirClient, caplog: pytest.LogCaptureFixture) -> None:
    responses.get(f"{BASE}/Patient/secret-id", json={"resourceType": "Patient", "id": "secret-id"})
    responses.get(f"{BASE}/Observation", json=searchset([]))
    with caplog.at_level(logging.DEBUG, logger="fhirtwin.fhir"):
        client.read("Patient", "secret-id")
        client.search("Observation", {"patient": "secret-id"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Patient/{id}" in text and "status=200" in text
    assert "secret-id" not in text


# ------------------------------------------------------------------ paging


@responses.activate
def test_search_all_follows_three_pages(client: FhirClient) -> None:
    responses.get(
        f"{BASE}/Observation",
        json=searchset([obs(1), obs(2)], f"{BASE}?_getpages=abc&_getpagesoffset=2"),
        match=[matchers.query_param_matcher({"patient": "p1"})],
    )
    responses.get(
        f"{BASE}?_getpages=abc&_getpagesoffset=2",
        json=searchset([obs(3)], f"{BASE}?_getpages=abc&_getpagesoffset=3"),
        match=[matchers.query_param_matcher({"_getpages": "abc", "_getpagesoffset": "2"})],
    )
    responses.get(
        f"{BASE}?_getpages=abc&_getpagesoffset=3",
        json=searchset([obs(4)]),
        match=[matchers.query_param_matcher({"_getpages": "abc", "_getpagesoffset": "3"})],
    )
    ids = [r["id"] for r in client.search_all("Observation", {"patient": "p1"})]
    assert ids == ["o1", "o2", "o3", "o4"]
    assert client.request_count == 3


@responses.activate
def test_search_all_raises_at_page_cap_after_yielding_pages(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=searchset([obs(1)], f"{BASE}?_getpages=a&o=1"))
    responses.get(f"{BASE}?_getpages=a&o=1", json=searchset([obs(2)], f"{BASE}?_getpages=a&o=2"))
    seen: list[str] = []
    with pytest.raises(FhirPagingLimit):
        for resource in client.search_all("Observation", {"patient": "p1"}, max_pages=2):
            seen.append(resource["id"])
    assert seen == ["o1", "o2"]
    assert client.request_count == 2


@responses.activate
def test_paging_link_to_foreign_host_is_refused(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=searchset([obs(1)], "https://evil.example.com/steal?page=2"))
    with pytest.raises(Exception, match="credentials"):
        list(client.search_all("Observation", {"patient": "p1"}))
    assert len(responses.calls) == 1


@responses.activate
def test_search_post_uses_form_body_and_is_retried(client: FhirClient, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Observation/_search", status=503)
    responses.post(f"{BASE}/Observation/_search", json=searchset([obs(1)]))
    bundle = client.search("Observation", {"patient": "p1"}, use_post=True)
    assert bundle["entry"][0]["resource"]["id"] == "o1"
    assert parse_qs(responses.calls[1].request.body) == {"patient": ["p1"]}
    assert urlsplit(responses.calls[1].request.url).query == ""
    assert len(sleeps) == 1


# ------------------------------------------------------------------ retries


@responses.activate
def test_429_retry_after_seconds_then_success(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    assert client.read("Patient", "p1")["id"] == "p1"
    assert sleeps == [7.0]
    assert client.request_count == 2
    assert client.request_counts["GET"] == 2


@responses.activate
def test_429_retry_after_http_date(client: FhirClient, sleeps: Sleeps) -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 12, tz=UTC), usegmt=True)
    responses.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": when})
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert sleeps == [pytest.approx(12.0)]


@responses.activate
def test_503_then_success_uses_jittered_backoff(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", status=503)
    responses.get(f"{BASE}/Patient/p1", status=502)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0
    assert client.request_count == 3


@responses.activate
def test_429_exhausted_raises_throttled(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": "1"})
    with pytest.raises(FhirThrottled) as err:
        client.read("Patient", "p1")
    assert err.value.status == 429
    assert client.request_count == 4  # 1 + max_retries
    assert sleeps == [1.0, 1.0, 1.0]


@responses.activate
def test_retry_after_longer_than_limit_stops_at_once(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, sleep=sleeps, max_retry_after=60)
    responses.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": "3600"})
    with pytest.raises(FhirThrottled) as err:
        client.read("Patient", "p1")
    assert err.value.retry_after == 3600
    assert sleeps == []


@responses.activate
def test_5xx_exhausted_raises_server_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", status=503, json=outcome("transient"))
    with pytest.raises(FhirServerError) as err:
        client.read("Patient", "p1")
    assert err.value.issues[0]["code"] == "transient"


@responses.activate
def test_plain_post_create_is_never_retried(client: FhirClient, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Observation", status=503)
    with pytest.raises(FhirServerError):
        client.create(obs(1))
    assert len(responses.calls) == 1
    assert sleeps == []


@responses.activate
def test_plain_post_create_connection_error_not_retried(client: FhirClient) -> None:
    responses.post(f"{BASE}/Observation", body=requests.ConnectionError("reset"))
    with pytest.raises(FhirConnectionError):
        client.create(obs(1))
    assert client.request_count == 1


@responses.activate
def test_conditional_create_is_retried(client: FhirClient, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Observation", status=503)
    responses.post(f"{BASE}/Observation", status=201, json=obs(1))
    created = client.create(obs(1), if_none_exist={"identifier": "urn:sys|abc"})
    assert created["id"] == "o1"
    assert responses.calls[1].request.headers["If-None-Exist"] == "identifier=urn:sys|abc"
    assert client.request_count == 2


@responses.activate
def test_create_without_body_reads_location(client: FhirClient) -> None:
    responses.post(f"{BASE}/Observation", status=201, headers={"Location": f"{BASE}/Observation/42/_history/1"})
    assert client.create(obs(1)) == {"resourceType": "Observation", "id": "42", "meta": {"versionId": "1"}}


@responses.activate
def test_connection_errors_retried_then_raise(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", body=requests.ConnectionError("refused: /Patient/p1?x=secret"))
    with pytest.raises(FhirConnectionError) as err:
        client.read("Patient", "p1")
    assert client.request_count == 4
    assert len(sleeps) == 3
    assert "secret" not in str(err.value) and err.value.__cause__ is None


@responses.activate
def test_connection_error_then_success(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", body=requests.ConnectionError("refused"))
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    assert client.read("Patient", "p1")["id"] == "p1"


@responses.activate
def test_timeout_raises_fhir_timeout(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", body=requests.ReadTimeout("slow"))
    with pytest.raises(FhirTimeout):
        client.read("Patient", "p1")
    assert client.request_count == 4


def test_retry_safety_rule() -> None:
    assert is_retry_safe("GET", f"{BASE}/Patient/1")
    assert is_retry_safe("PUT", f"{BASE}/Patient/1")
    assert is_retry_safe("POST", f"{BASE}/Observation/_search")
    assert not is_retry_safe("POST", f"{BASE}/Observation")
    assert is_retry_safe("POST", f"{BASE}/Observation", {"If-None-Exist": "identifier=a|b"})
    assert not is_retry_safe("DELETE", f"{BASE}/Patient/1")
    get_batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "x"}}]}
    assert is_retry_safe("POST", BASE, {}, get_batch)
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "POST", "url": "RiskAssessment", "ifNoneExist": "identifier=a|b"}},
            {"request": {"method": "PUT", "url": "Provenance/x"}},
        ],
    }
    assert is_retry_safe("POST", BASE, {}, tx)
    tx["entry"].append({"request": {"method": "POST", "url": "Observation"}})
    assert not is_retry_safe("POST", BASE, {}, tx)


# ------------------------------------------------------------------ hooks, counts, 401


@responses.activate
def test_hooks_see_every_request_and_response() -> None:
    seen_requests: list[str] = []
    seen_statuses: list[int] = []
    client = FhirClient(
        BASE,
        sleep=lambda s: None,
        hooks={
            "request": [lambda p: seen_requests.append(p.method)],
            "response": [lambda r: seen_statuses.append(r.status_code)],
        },
    )
    responses.get(f"{BASE}/metadata", status=503)
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    client.capabilities()
    client.capabilities()  # cached: no request
    assert seen_requests == ["GET", "GET"]
    assert seen_statuses == [503, 200]
    assert client.request_count == 2
    with pytest.raises(ValueError):
        client.add_hook("bogus", print)


@responses.activate
def test_401_invalidates_refreshable_auth_once() -> None:
    class Rotating(requests.auth.AuthBase):
        def __init__(self) -> None:
            self.generation = 0

        def invalidate(self) -> None:
            self.generation += 1

        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            r.headers["Authorization"] = f"Bearer t{self.generation}"
            return r

    auth = Rotating()
    client = FhirClient(BASE, auth=auth)
    responses.get(f"{BASE}/Patient/p1", status=401)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert [c.request.headers["Authorization"] for c in responses.calls] == ["Bearer t0", "Bearer t1"]


# ------------------------------------------------------------------ batch / transaction


@responses.activate
def test_transaction_failure_in_response_names_failing_entry(client: FhirClient) -> None:
    responses.post(
        BASE,
        json={
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {"response": {"status": "201 Created", "location": "RiskAssessment/1/_history/1"}},
                {"response": {"status": "412 Precondition Failed", "outcome": outcome("multiple-matches")}},
            ],
        },
    )
    entries = [
        {
            "resource": {"resourceType": "RiskAssessment"},
            "request": {"method": "POST", "url": "RiskAssessment", "ifNoneExist": "identifier=a|1"},
        },
        {
            "resource": {"resourceType": "CarePlan"},
            "request": {"method": "POST", "url": "CarePlan", "ifNoneExist": "identifier=a|2"},
        },
    ]
    with pytest.raises(FhirTransactionError) as err:
        client.transaction(entries)
    assert [f.index for f in err.value.failures] == [1]
    assert err.value.failures[0].status == 412
    assert err.value.failures[0].issues[0]["code"] == "multiple-matches"
    assert err.value.failures[0].request == "POST CarePlan"
    sent = json.loads(responses.calls[0].request.body)
    assert sent["type"] == "transaction" and len(sent["entry"]) == 2


@responses.activate
def test_transaction_http_error_carries_outcome(client: FhirClient) -> None:
    responses.post(BASE, status=409, json=outcome("conflict", "entry 2 conflicts"))
    with pytest.raises(FhirTransactionError) as err:
        client.transaction([{"request": {"method": "POST", "url": "Observation"}, "resource": obs(1)}])
    assert err.value.status == 409
    assert err.value.issues[0]["code"] == "conflict"
    assert len(responses.calls) == 1


def test_transaction_rejects_non_transaction_bundle(client: FhirClient) -> None:
    with pytest.raises(FhirValidationError):
        client.transaction({"resourceType": "Bundle", "type": "batch"})


def test_batch_results_per_entry() -> None:
    response = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "1"}, "response": {"status": "200 OK", "etag": 'W/"3"'}},
            {"response": {"status": "404 Not Found", "outcome": outcome("not-found")}},
        ],
    }
    results = batch_results(response)
    assert [(r.status, r.ok) for r in results] == [(200, True), (404, False)]
    assert results[0].etag == 'W/"3"' and results[1].issues[0]["code"] == "not-found"
    with pytest.raises(FhirTransactionError):
        check_transaction_response(response)


@responses.activate
def test_conflict_on_update(client: FhirClient) -> None:
    responses.put(f"{BASE}/Patient/p1", status=412, json=outcome("conflict"))
    with pytest.raises(FhirConflict):
        client.update({"resourceType": "Patient", "id": "p1"}, if_match="1")


@responses.activate
def test_conditional_update_and_operation(client: FhirClient) -> None:
    responses.put(
        f"{BASE}/Device",
        json={"resourceType": "Device", "id": "d"},
        match=[matchers.query_param_matcher({"identifier": "s|v"})],
    )
    assert client.conditional_update({"resourceType": "Device"}, {"identifier": "s|v"})["id"] == "d"
    responses.post(f"{BASE}/Observation/$validate", status=503)
    with pytest.raises(FhirServerError):
        client.operation("validate", resource_type="Observation", parameters={"resourceType": "Parameters"})
    assert client.request_counts["POST"] == 1  # POST operations are not retried by default


# ------------------------------------------------------------------ patient records


def batch_response(*entries: tuple[int, dict | None]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"response": {"status": f"{status} X"}, **({"resource": res} if res is not None else {})}
            for status, res in entries
        ],
    }


@responses.activate
def test_fetch_patient_record_one_request_and_paging_of_one_entry(client: FhirClient) -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    cond = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}
    responses.post(
        BASE,
        json=batch_response(
            (200, patient),
            (200, searchset([obs(1), obs(2)], f"{BASE}?_getpages=obs&_getpagesoffset=2")),
            (200, searchset([cond])),
        ),
    )
    responses.get(f"{BASE}?_getpages=obs&_getpagesoffset=2", json=searchset([obs(3)]))
    record = client.fetch_patient_record("p1", types=["Observation", "Condition"])
    assert [(r["resourceType"], r["id"]) for r in record] == [
        ("Patient", "p1"),
        ("Observation", "o1"),
        ("Observation", "o2"),
        ("Observation", "o3"),
        ("Condition", "c1"),
    ]
    sent = json.loads(responses.calls[0].request.body)
    assert sent["type"] == "batch"
    assert [e["request"]["url"] for e in sent["entry"]] == [
        "Patient/p1",
        "Observation?patient=p1&_count=1000",
        "Condition?patient=p1&_count=1000",
    ]
    assert client.request_count == 2  # the batch + one page


@responses.activate
def test_fetch_patient_record_without_paging_is_one_request(client: FhirClient) -> None:
    responses.post(
        BASE,
        json=batch_response((200, {"resourceType": "Patient", "id": "p1"}),
                            *[(200, searchset([]))] * len(RECORD_TYPES)),
    )
    record = client.fetch_patient_record("p1", RECORD_TYPES)
    assert record == [{"resourceType": "Patient", "id": "p1"}]
    assert client.request_count == 1
    urls = [e["request"]["url"].split("?")[0] for e in json.loads(responses.calls[0].request.body)["entry"]]
    assert urls == [
        "Patient/p1",
        "Observation",
        "Condition",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationDispense",
        "MolecularSequence",
        "DiagnosticReport",
        "Procedure",
    ]


@pytest.mark.parametrize("bad", [None, "", "a,b"])
def test_fetch_patient_record_refuses_bad_ids(client: FhirClient, bad) -> None:
    with pytest.raises(ValueError):
        client.fetch_patient_record(bad, ["Observation"])
    with pytest.raises(ValueError):
        client.fetch_patients_records(["ok", bad], ["Observation"])


@responses.activate
def test_fetch_patient_record_missing_patient_raises(client: FhirClient) -> None:
    responses.post(BASE, json=batch_response((404, None), (200, searchset([]))))
    responses.calls.reset()
    with pytest.raises(FhirNotFound):
        client.fetch_patient_record("nope", types=["Observation"])


@responses.activate
def test_fetch_patients_records_groups_by_subject(client: FhirClient) -> None:
    pa = {"resourceType": "Patient", "id": "a"}
    pb = {"resourceType": "Patient", "id": "b"}
    observations = [obs(1, "a"), obs(2, "b"), {**obs(3, "a"), "subject": {"reference": f"{BASE}/Patient/a/_history/2"}}]
    conditions = [{"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/b"}}]
    responses.post(
        BASE,
        json=batch_response((200, searchset([pa, pb])), (200, searchset(observations)), (200, searchset(conditions))),
    )
    records = client.fetch_patients_records(["a", "b"], types=["Observation", "Condition"])
    assert {k: [r["id"] for r in v] for k, v in records.items()} == {"a": ["a", "o1", "o3"], "b": ["b", "o2", "c"]}
    assert client.request_count == 1
    sent = json.loads(responses.calls[0].request.body)
    assert [e["request"]["url"] for e in sent["entry"]] == [
        "Patient?_id=a,b&_count=1000",
        "Observation?patient=a,b&_count=1000",
        "Condition?patient=a,b&_count=1000",
    ]


@responses.activate
def test_fetch_patients_records_chunks_requests(client: FhirClient) -> None:
    def reply(request: requests.PreparedRequest) -> tuple[int, dict, str]:
        body = json.loads(request.body)
        ids = body["entry"][0]["request"]["url"].split("_id=")[1].split("&")[0].split(",")
        patients = [{"resourceType": "Patient", "id": i} for i in ids]
        return 200, {}, json.dumps(batch_response((200, searchset(patients)), (200, searchset([]))))

    responses.add_callback(responses.POST, BASE, callback=reply)
    records = client.fetch_patients_records([f"p{i}" for i in range(5)], types=["Observation"], chunk_size=2)
    assert list(records) == [f"p{i}" for i in range(5)]
    assert client.request_count == 3


@responses.activate
def test_fetch_patients_records_missing_patient_raises(client: FhirClient) -> None:
    responses.post(
        BASE, json=batch_response((200, searchset([{"resourceType": "Patient", "id": "a"}])), (200, searchset([])))
    )
    with pytest.raises(FhirNotFound):
        client.fetch_patients_records(["a", "b"], types=["Observation"])


@responses.activate
def test_everything_strategy_and_capability(client: FhirClient) -> None:
    responses.get(
        f"{BASE}/metadata",
        json={
            "resourceType": "CapabilityStatement",
            "rest": [{"resource": [{"type": "Patient", "operation": [{"name": "everything"}]}]}],
        },
    )
    responses.get(f"{BASE}/Patient/p1/$everything", json=searchset([{"resourceType": "Patient", "id": "p1"}, obs(1)]))
    assert client.supports_everything()
    record = client.fetch_patient_record("p1", types=["Observation"], strategy="everything")
    assert [r["id"] for r in record] == ["p1", "o1"]
    query = parse_qs(urlsplit(responses.calls[1].request.url).query)
    assert query["_type"] == ["Patient,Observation"]
