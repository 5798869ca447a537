"""$simulate, the shared engine and the Subscription webhook without a network.

The FHIR server is replaced only at the client boundary (a small object with the FhirClient methods the
engine calls), so parsing, error mapping, debounce, retry and dead letters run for real.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from starlette.testclient import TestClient
from writeback_fixtures import versioned_resources

from fhirtwin import engine
from fhirtwin.engine import BadRequest, InsufficientPatientData, PatientRecord
from fhirtwin.fhir import errors as fe
from fhirtwin.fhir import subscriptions
from fhirtwin.service import operations, runtime, webhook
from fhirtwin.service.app import ServiceSettings, create_app
from fhirtwin.service.jobs import Debouncer, Permanent, WebhookWorker
from fhirtwin.service.operations import parse_parameters, parse_query
from fhirtwin.service.runtime import WebhookOptions
from fhirtwin.service.store import Store
from fhirtwin.vocabulary import is_fhirtwin_generated
from fhirtwin.writeback.jws import generate_key

FHIR_JSON = "application/fhir+json"


def params(*items: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(items)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFhir:
    """The FhirClient methods the engine uses, answering from an in-memory record."""

    def __init__(self, record: list[dict] | None = None, error: Exception | None = None) -> None:
        self.record = record or []
        self.error = error
        self.transactions: list[dict] = []
        self.updates: list[dict] = []

    def capabilities(self) -> dict:
        return {"resourceType": "CapabilityStatement", "software": {"name": "Some other FHIR server"}}

    def update(self, resource: dict) -> dict:
        self.updates.append(resource)
        return resource

    def search_all(self, rtype: str, params: dict, **_: object) -> list[dict]:
        """Searches answer from the record (the consent check asks for the patient's Consents)."""
        return [r for r in self.record if r.get("resourceType") == rtype]

    def fetch_patient_record(self, patient_id: str, types: object, **_: object) -> list[dict]:
        if self.error is not None:
            raise self.error
        return self.record

    def batch(self, entries: list[dict]) -> dict:
        return {"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": []},
             "response": {"status": "200 OK"}} for _ in entries]}

    def transaction(self, bundle: dict) -> dict:
        self.transactions.append(bundle)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created" if e["request"]["method"] == "POST" else "200 OK",
                          "location": f"{e['resource']['resourceType']}/{i}/_history/1"}}
            for i, e in enumerate(bundle["entry"])]}


@pytest.fixture()
def settings(tmp_path) -> ServiceSettings:
    key = generate_key("ES256").private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "key.pem"
    path.write_bytes(key)
    return ServiceSettings(fhir_server="http://fhir.invalid/fhir", draws=100, signing_key_file=str(path),
                           dev_no_auth=True, store_path=str(tmp_path / "service.sqlite3"))


@pytest.fixture()
def record() -> tuple[str, list[dict]]:
    return versioned_resources()


def app_with(settings: ServiceSettings, fake: FakeFhir, monkeypatch) -> TestClient:
    monkeypatch.setattr(runtime, "shared_client", lambda _settings: fake)
    return TestClient(create_app(settings), raise_server_exceptions=False)


# ------------------------------------------------------------------------------------------- Parameters


def test_parameters_defaults_and_values() -> None:
    assert parse_parameters(None) == {"write": True, "scenario": None, "horizon_years": None}
    assert parse_parameters(params()) == {"write": True, "scenario": None, "horizon_years": None}
    got = parse_parameters(params({"name": "write", "valueBoolean": False},
                                  {"name": "scenario", "valueString": " statin-high-intensity "},
                                  {"name": "horizon", "valueDecimal": 8.0}))
    assert got == {"write": False, "scenario": "statin-high-intensity", "horizon_years": 8}
    assert parse_parameters(params({"name": "horizon", "valueInteger": 20}))["horizon_years"] == 20.0
    months = parse_parameters(params({"name": "horizon", "valueDuration": {"value": 60, "code": "mo",
                                                                             "system": "http://unitsofmeasure.org"}}))
    assert months["horizon_years"] == pytest.approx(5.0)


@pytest.mark.parametrize("body", [
    {"resourceType": "Patient"},
    [1, 2],
    params({"name": "wirte", "valueBoolean": False}),
    params({"name": "write", "valueBoolean": False}, {"name": "write", "valueBoolean": True}),
    params({"name": "write", "valueString": "false"}),
    params({"name": "write"}),
    params({"name": "horizon", "valueBoolean": True}),
    params({"name": "horizon", "valueDecimal": 7.5}),  # whole years only: horizons cannot multiply results
    params({"name": "horizon", "valueDuration": {"value": 61, "code": "mo"}}),
    params({"name": "horizon", "valueDuration": {"value": 5, "code": "h"}}),
    params({"name": "scenario", "valueString": "  "}),
    {"resourceType": "Parameters", "parameter": {"name": "write"}},
])
def test_bad_parameters_are_refused(body) -> None:
    with pytest.raises(BadRequest):
        parse_parameters(body)


def test_query_form_is_read_only() -> None:
    assert parse_query({"scenario": "baseline", "horizon": "12"}) == {
        "write": False, "scenario": "baseline", "horizon_years": 12.0}
    for bad in ({"write": "true"}, {"horizon": "ten"}, {"horizon": "nan"}, {"horizon": "10.000001"},
                {"colour": "red"}):
        with pytest.raises(BadRequest):
            parse_query(bad)


# ------------------------------------------------------------------------------------------- $simulate


def test_simulate_without_write_returns_the_transaction_and_writes_nothing(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    fake = FakeFhir(resources)
    client = app_with(settings, fake, monkeypatch)
    response = client.post(f"/fhir/Patient/{patient_id}/$simulate",
                           content=json.dumps(params({"name": "write", "valueBoolean": False})),
                           headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR_JSON)
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert {"RiskAssessment", "CarePlan", "Goal", "Provenance"} <= set(types)
    assert fake.transactions == []
    # the GET form is the same what-if
    assert client.get(f"/fhir/Patient/{patient_id}/$simulate").json()["type"] == "transaction"
    assert fake.transactions == []


def test_simulate_with_write_returns_the_transaction_response(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    fake = FakeFhir(resources)
    response = app_with(settings, fake, monkeypatch).post(f"/fhir/Patient/{patient_id}/$simulate",
                                                          headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 200
    assert response.json()["type"] == "transaction-response"
    assert len(fake.transactions) == 1
    # not HAPI: no HAPI-only meta extension, and the Provenance is put again with versioned targets
    assert "hapifhir.io" not in json.dumps(fake.transactions[0])
    [provenance] = fake.updates
    assert provenance["resourceType"] == "Provenance" and provenance["id"]
    assert all("/_history/" in t["reference"] for t in provenance["target"])


def test_scenario_restricts_the_plan(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    fake = FakeFhir(resources)
    eng = runtime.engine_for(settings, client=fake)
    base = eng.simulate_patient(patient_id, write=False, scenario="baseline")
    assert base.run.require_plan().options == () and len(base.resources("RiskAssessment")) >= 1
    full = eng.simulate_patient(patient_id, write=False)
    name = full.run.require_plan().options[0].scenario.name
    one = eng.simulate_patient(patient_id, write=False, scenario=name.upper())
    assert [o.scenario.name for o in one.run.require_plan().options] == [name]
    with pytest.raises(BadRequest):
        eng.simulate_patient(patient_id, write=True, scenario=name)
    with pytest.raises(BadRequest):
        eng.simulate_patient(patient_id, write=False, horizon_years=2)


@pytest.mark.parametrize(("error", "status", "code"), [
    (fe.FhirNotFound("not found", status=404), 404, "not-found"),
    (fe.FhirGone("gone", status=410), 404, "not-found"),
    (fe.FhirServerError("server error", status=500, method="GET", url="http://fhir.invalid/fhir/Patient/secret-id"),
     502, "transient"),
    (fe.FhirConnectionError("refused"), 502, "transient"),
    (fe.FhirTimeout("timed out"), 504, "timeout"),
])
def test_fhir_failures_become_operation_outcomes(settings, monkeypatch, error, status, code) -> None:
    response = app_with(settings, FakeFhir(error=error), monkeypatch).post(
        "/fhir/Patient/secret-id/$simulate", json=params({"name": "write", "valueBoolean": False}))
    assert response.status_code == status
    assert response.headers["content-type"].startswith(FHIR_JSON)
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code and outcome["issue"][0]["severity"] == "error"
    assert "secret-id" not in response.text and "Traceback" not in response.text


def test_insufficient_data_names_what_is_missing(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    patient_only = [r for r in resources if r["resourceType"] == "Patient"]
    response = app_with(settings, FakeFhir(patient_only), monkeypatch).get(f"/fhir/Patient/{patient_id}/$simulate")
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["code"] == "incomplete"
    assert "ldl_cholesterol_mg_dl" in issue["diagnostics"] and "systolic_bp_mm_hg" in issue["diagnostics"]


def test_bad_requests_and_unexpected_errors(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    client = app_with(settings, FakeFhir(resources), monkeypatch)
    url = f"/fhir/Patient/{patient_id}/$simulate"
    for body in (b"{not json", json.dumps({"resourceType": "Bundle"}).encode()):
        response = client.post(url, content=body, headers={"Content-Type": FHIR_JSON})
        assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"
    assert client.get(url, params={"write": "true"}).status_code == 400
    assert client.get(url, params={"horizon": "50"}).json()["issue"][0]["expression"] == ["horizon"]
    assert client.get(url, params={"scenario": "no-such-thing"}).status_code == 400
    assert client.get("/fhir/Patient/bad id!/$simulate").status_code == 400

    def explode(*args, **kwargs):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr(operations, "engine_for", explode)
    response = client.get(url)
    assert response.status_code == 500
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "boom" not in response.text and "Traceback" not in response.text


def test_engine_raises_insufficient_data_with_missing_list(settings, record, monkeypatch) -> None:
    patient_id, resources = record
    eng = runtime.engine_for(settings, client=FakeFhir())
    with pytest.raises(InsufficientPatientData) as info:
        eng.simulate_patient(patient_id, write=False,
                             record=PatientRecord(patient_id, [r for r in resources if r["resourceType"] == "Patient"]))
    assert "ldl_cholesterol_mg_dl (or triglycerides < 400 mg/dL for Friedewald)" in info.value.missing
    with pytest.raises(BadRequest):
        eng.simulate_patient(patient_id, write=False, record=PatientRecord(patient_id, []))


# ------------------------------------------------------------------------------------------- logging


def test_json_log_lines_carry_fields_and_hash_patients() -> None:
    record = logging.LogRecord("fhirtwin.service", logging.INFO, __file__, 1, "simulate", None, None)
    record.event = "simulate"
    record.fields = {"patient": runtime.patient_hash("ftp-0001"), "duration_ms": 12}
    line = json.loads(runtime.JsonLineFormatter().format(record))
    assert line["event"] == "simulate" and line["duration_ms"] == 12 and line["level"] == "info"
    assert "ftp-0001" not in json.dumps(line)
    assert runtime.patient_hash("ftp-0001") == runtime.patient_hash("ftp-0001") != runtime.patient_hash("ftp-0002")


# ------------------------------------------------------------------------------------------- webhook filters


def test_fhirtwin_authored_resources_are_recognised() -> None:
    obs = {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}
    assert not is_fhirtwin_generated(obs) and engine.is_watched(obs)
    tagged = {**obs, "meta": {"tag": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin",
                                       "code": "fhirtwin-generated"}]}}
    assert is_fhirtwin_generated(tagged) and not engine.is_watched(tagged)
    assert is_fhirtwin_generated({**obs, "identifier": [{"system": "https://fhirtwin.org/sid/prediction",
                                                         "value": "abc"}]})
    for rtype in ("RiskAssessment", "CarePlan", "Goal", "Provenance", "Device", "Organization", "Subscription"):
        assert not engine.is_watched({"resourceType": rtype, "subject": {"reference": "Patient/p1"}})
    for rtype in ("Patient", "MedicationStatement", "MedicationRequest", "Medication", "MolecularSequence"):
        assert engine.is_watched({"resourceType": rtype})
    other = {"system": "http://other", "code": "fhirtwin-generated"}
    assert not is_fhirtwin_generated({**obs, "meta": {"tag": [other]}})
    assert webhook.patient_of(obs) == "p1"
    assert webhook.patient_of({"resourceType": "MedicationRequest",
                               "subject": {"reference": "http://x/fhir/Patient/p2/_history/3"}}) == "p2"
    assert webhook.patient_of({"resourceType": "Observation"}) is None


# ------------------------------------------------------------------------------------------- debounce


def test_debouncer_merges_a_burst_and_caps_the_wait() -> None:
    d = Debouncer(window=2.0, max_wait=5.0)
    assert d.add("p1", 0.0) is True
    assert d.add("p1", 1.0) is False and d.add("p1", 1.5) is False
    assert d.pop_due(3.0) == [] and d.next_due() == 3.5
    assert d.pop_due(3.5) == ["p1"] and len(d) == 0
    # a stream of events every second is still processed max_wait after the first one
    for t in range(0, 10):
        d.add("busy", float(t))
        if d.pop_due(float(t)):
            break
    assert t == 5
    d.add("a", 0.0)
    d.add("b", 0.5)
    assert d.pop_due(100.0) == ["a", "b"]


@pytest.fixture()
def store(tmp_path) -> Store:
    return Store(tmp_path / "service.sqlite3")


def _worker(handlers, clock, store, **kw) -> WebhookWorker:
    return WebhookWorker(handlers, store=store, window=2.0, max_wait=10.0, max_attempts=3, backoff=1.0, clock=clock,
                         **kw)


def test_several_deliveries_become_one_recompute(store) -> None:
    clock, calls = FakeClock(), []
    worker = _worker({"patient": lambda pid: (calls.append(pid), ("written", []))[1]}, clock, store)
    for _ in range(5):
        worker.submit("patient", "p1")
        clock.now += 0.3
    worker.submit("patient", "p2")
    assert worker.run_pending() == 0 and calls == []
    clock.now += 2.0
    assert worker.run_pending() == 2
    assert calls == ["p1", "p2"]
    status = worker.status()
    assert status["counts"]["merged"] == 4 and status["counts"]["done_written"] == 2 and status["pending"] == 0


def test_failures_are_retried_with_backoff_then_dead_lettered_without_phi(store) -> None:
    clock, calls = FakeClock(), []

    def flaky(pid: str):
        calls.append(clock.now)
        raise engine.UpstreamError("FHIR server error during write transaction", upstream_status=503)

    worker = _worker({"patient": flaky}, clock, store)
    worker.submit("patient", "ftp-0042")
    clock.now += 2.0
    worker.run_pending()
    assert worker.status()["retrying"] == 1 and worker.status()["pending"] == 1
    worker.submit("patient", "ftp-0042")  # a new delivery does not cut the backoff short
    clock.now += 0.5
    assert worker.run_pending() == 0
    clock.now += 0.5
    assert worker.run_pending() == 1  # first retry after 1 s
    clock.now += 1.9
    assert worker.run_pending() == 0
    clock.now += 0.1
    assert worker.run_pending() == 1  # second retry after 2 s; third attempt fails -> dead letter
    assert [round(b - a, 1) for a, b in zip(calls, calls[1:], strict=False)] == [1.0, 2.0]
    status = worker.status()
    assert status["pending"] == 0 and status["retrying"] == 0
    assert status["counts"]["dead_lettered"] == 1 and status["counts"]["retries"] == 2
    (letter,) = status["dead_letters"]
    assert letter["attempts"] == 3 and letter["error"].startswith("UpstreamError 502")
    assert "ftp-0042" not in json.dumps(status)
    # after the cause is fixed, a replay processes it
    worker.handlers["patient"] = lambda pid: ("written", [])
    assert worker.replay_dead_letters() == 1
    clock.now += 2.0
    assert worker.run_pending() == 1 and worker.status()["dead_letters"] == []


def test_permanent_failures_are_not_retried_and_pings_fan_out(store) -> None:
    clock, done = FakeClock(), []

    def gone(pid: str):
        raise Permanent("PatientNotFound")

    worker = _worker({"patient": lambda pid: (done.append(pid), ("unchanged", []))[1],
                      "ping": lambda _: ("requeried", ["p1", "p2"]), "deleted": gone}, clock, store)
    worker.submit("ping", "")
    worker.submit("ping", "")
    worker.submit("deleted", "Observation/9")
    clock.now += 2.0
    assert worker.run_pending() == 2
    assert worker.status()["counts"]["dead_lettered"] == 1
    clock.now += 2.0
    worker.run_pending()
    assert done == ["p1", "p2"]


def test_shutdown_drains_pending_work(store) -> None:
    clock, done = FakeClock(), []
    worker = _worker({"patient": lambda pid: (done.append(pid), ("written", []))[1]}, clock, store)
    worker.start()
    worker.submit("patient", "p1")  # due in 2 s of the fake clock, which never advances
    assert worker.shutdown(timeout=10) is True
    assert done == ["p1"] and worker.status()["pending"] == 0 and worker.status()["running"] is False


# ------------------------------------------------------------------------------------------- webhook routes


@pytest.fixture()
def hook_app(settings):
    app = create_app(replace(settings, webhook=WebhookOptions(window=60.0)))
    service = webhook.WebhookService(app.state.settings)
    seen: list[str] = []
    service.worker.handlers = {"patient": lambda pid: (seen.append(pid), ("written", []))[1],
                               "ping": lambda _: (seen.append("ping"), ("requeried", []))[1],
                               "deleted": lambda ref: (seen.append(ref), ("resolved", []))[1]}
    app.state.webhook = service
    yield TestClient(app), service, seen
    service.worker.shutdown(5)


def test_webhook_schedules_patients_and_ignores_own_writes(hook_app) -> None:
    client, service, seen = hook_app
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/ftp-0099"}}
    for _ in range(3):
        assert client.put("/hooks/fhir/Observation/o1", json=obs).status_code == 200
    own = {"resourceType": "RiskAssessment", "id": "r1", "subject": {"reference": "Patient/ftp-0099"}}
    assert client.put("/hooks/fhir/RiskAssessment/r1", json=own).json()["issue"][0]["diagnostics"] == "ignored_type"
    tagged = {**obs, "meta": {"tag": [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin",
                                       "code": "fhirtwin-generated"}]}}
    assert client.put("/hooks/fhir/Observation/o1", json=tagged).status_code == 200
    assert client.put("/hooks/fhir/Condition/o1", json=obs).status_code == 400  # type differs from the path
    assert client.put("/hooks/fhir/Observation/o1", content=b"{", headers={"Content-Type": FHIR_JSON}
                      ).status_code == 400
    assert client.post("/hooks/fhir", content=b"").status_code == 200  # payload-less ping
    assert client.delete("/hooks/fhir/Observation/o1").status_code == 200
    status = client.get("/hooks/fhir/status").json()
    assert status["pending"] == 3  # one patient, one ping, one deletion
    assert status["received"] == {"deleted": 1, "ignored_own": 1, "ignored_type": 1, "invalid": 2, "ping": 1,
                                  "scheduled": 3}
    assert "ftp-0099" not in json.dumps(status)
    service.worker.shutdown(5)
    assert sorted(seen) == ["Observation/o1", "ftp-0099", "ping"]


# ------------------------------------------------------------------------------------------- subscribe


class FakeSubscriptions:
    def __init__(self) -> None:
        self.store: dict[str, dict] = {}

    def request(self, method, path, params, headers):
        system, code = params["_tag"].split("|")
        found = [s for s in self.store.values() if {"system": system, "code": code} in s["meta"]["tag"]]
        return SimpleNamespace(json=lambda: {"resourceType": "Bundle", "entry": [{"resource": r} for r in found]})

    def iter_bundle_pages(self, bundle, max_pages):
        return [e["resource"] for e in bundle["entry"]]

    def create(self, resource, *, if_none_exist=None):
        sid = str(len(self.store) + 1)
        self.store[sid] = {**resource, "id": sid}
        return self.store[sid]

    def update(self, resource):
        self.store[resource["id"]] = dict(resource)
        return self.store[resource["id"]]

    def read(self, rtype, sid):
        return {**self.store[sid], "status": "active" if self.store[sid]["status"] == "requested" else
                self.store[sid]["status"]}


def test_ensure_subscriptions_is_idempotent_and_switches_payload_mode() -> None:
    fake = FakeSubscriptions()
    endpoint = "http://127.0.0.1:9999/hooks/fhir"
    wanted = engine.subscription_criteria()
    first = subscriptions.ensure_subscriptions(fake, endpoint, wanted, payload=True)
    n = len(wanted)
    assert len(first.created) == n and first.ids == first.created
    criteria = sorted(s["criteria"] for s in fake.store.values())
    assert criteria == sorted(f"{t}?" for t in engine.WATCHED_TYPES)
    assert all(s["channel"] == {"type": "rest-hook", "endpoint": endpoint, "payload": FHIR_JSON}
               for s in fake.store.values())
    again = subscriptions.ensure_subscriptions(fake, endpoint, wanted, payload=True)
    assert again.created == [] and sorted(again.unchanged) == sorted(first.ids) and len(fake.store) == n
    assert subscriptions.wait_active(fake, again.ids, sleep=lambda s: None) == {i: "active" for i in again.ids}
    ping = subscriptions.ensure_subscriptions(fake, endpoint, wanted, payload=False)
    assert len(ping.created) == n and sorted(ping.turned_off) == sorted(first.ids)
    assert all("payload" not in fake.store[i]["channel"] for i in ping.ids)
    assert sorted(subscriptions.disable_subscriptions(fake, endpoint)) == sorted(ping.ids)
    [coded] = [c for c in engine.subscription_criteria(twin_codes_only=True) if c.startswith("Observation?")]
    assert coded.startswith("Observation?code=") and "13457-7" in coded and "69548-6" in coded


# ------------------------------------------------------------------------------------------- payload-less pings


class FakeChanged:
    """Answers ``_lastUpdated=ge…`` searches from a list of changed resources."""

    def __init__(self, resources: list[dict]) -> None:
        self.resources = resources
        self.queries: list[tuple[str, dict, dict]] = []

    def request(self, method, path, params, headers):
        self.queries.append((path, params, headers))
        since = webhook._parse_instant(params["_lastUpdated"][2:])
        found = [r for r in self.resources if r["resourceType"] == path
                 and webhook._parse_instant(r["meta"]["lastUpdated"]) >= since]
        return SimpleNamespace(json=lambda: {"resourceType": "Bundle", "entry": [{"resource": r} for r in found]})

    def iter_bundle_pages(self, bundle, max_pages):
        return [e["resource"] for e in bundle["entry"]]


def _changed(rtype: str, rid: str, patient: str, when: str, **extra) -> dict:
    return {"resourceType": rtype, "id": rid, "subject": {"reference": f"Patient/{patient}"},
            "meta": {"versionId": "1", "lastUpdated": when, **extra}}


def test_ping_requeries_changes_since_the_last_look(settings, monkeypatch) -> None:
    fake = FakeChanged([
        _changed("Observation", "o1", "p1", "2030-01-01T10:00:00.000Z"),
        _changed("Condition", "c1", "p2", "2030-01-01T10:00:05.000Z"),
        _changed("Observation", "o2", "p3", "2030-01-01T10:00:05.000Z",
                 tag=[{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "fhirtwin-generated"}]),
    ])
    monkeypatch.setattr(webhook, "shared_client", lambda _settings: fake)
    service = webhook.WebhookService(settings)
    service._watermark = webhook._parse_instant("2030-01-01T09:59:00Z")
    assert service.requery("") == ("requeried", ["p1", "p2"])  # fhirtwin's own resource is skipped
    assert [q[0] for q in fake.queries] == list(engine.WATCHED_TYPES)
    assert all(q[2] == {"Cache-Control": "no-cache"} for q in fake.queries)
    assert fake.queries[0][1]["_lastUpdated"] == "ge2030-01-01T09:59:00.000Z"
    # nothing new: the resources at the watermark are not reported again
    assert service.requery("") == ("requeried", [])
    assert fake.queries[-1][1]["_lastUpdated"] == "ge2030-01-01T10:00:05.000Z"
    fake.resources.append(_changed("MedicationRequest", "m1", "p4", "2030-01-01T10:00:05.000Z"))
    assert service.requery("") == ("requeried", ["p4"])
