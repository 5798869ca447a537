"""BALP AuditEvents: valid R4, the pattern's elements, the sinks, and that the engine audits reads and writes."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import responses
from test_consent import _searchset

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.audit import (
    CLIENT_ID_SYSTEM,
    USER_ID_SYSTEM,
    AuditTrail,
    AuditUnavailable,
    Caller,
    JsonLinesSink,
    OutboxSink,
    Outcome,
    patient_read_event,
    patient_write_event,
)
from fhirtwin.consent import ConsentDenied, ConsentPolicy
from fhirtwin.engine import Engine, PatientNotFound
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.models import check_emittable, validate_resource

BASE = "https://fhir.example.org/r4"
OBSERVER = "Device/fhirtwin-mechanistic-0-1-0"
USER = Caller("smart-app", user="Practitioner/dr-1", network="10.1.2.3")
SYSTEM = Caller("backend-service")


def codes(event: dict[str, Any], path: str) -> set[str]:
    node: Any = event
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else node[key]
    return {f"{c['system']}|{c['code']}" for c in (node if isinstance(node, list) else [node])}


def agent(event: dict[str, Any], code: str) -> dict[str, Any]:
    return next(a for a in event["agent"] if a["type"]["coding"][0]["code"] == code)


def entity(event: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [e for e in event["entity"] if e["role"]["code"] == role]


# ---------------------------------------------------------------------------------------------- builders


def test_read_event_is_valid_r4_with_the_balp_patient_query_elements() -> None:
    queries = ["Consent?patient=Patient/p1&status=active", "Patient/p1", "Observation?patient=p1"]
    event = patient_read_event("p1", caller=USER, purpose="TREAT", observer=OBSERVER, queries=queries,
                               server=BASE, site="fhirtwin.example.org")
    validate_resource(event)
    check_emittable(event)
    assert event["meta"]["profile"] == ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery"]
    assert codes(event, "type") == {"http://terminology.hl7.org/CodeSystem/audit-event-type|rest"}
    assert "http://hl7.org/fhir/restful-interaction|search-type" in codes(event, "subtype")
    assert event["action"] == "E" and event["outcome"] == "0"
    user = agent(event, "IRCP")
    assert user["requestor"] is True
    assert user["who"] == {"identifier": {"system": USER_ID_SYSTEM, "value": "Practitioner/dr-1"}}
    assert codes(user, "purposeOfUse.0.coding") == {"http://terminology.hl7.org/CodeSystem/v3-ActReason|TREAT"}
    client = agent(event, "110153")
    assert client["requestor"] is False
    assert client["who"]["identifier"] == {"system": CLIENT_ID_SYSTEM, "value": "smart-app"}
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    server = agent(event, "110152")
    assert server["requestor"] is False and server["network"] == {"address": "fhir.example.org", "type": "1"}
    assert event["source"]["observer"] == {"reference": OBSERVER}
    assert codes(event["source"], "type") == {"http://terminology.hl7.org/CodeSystem/security-source-type|4"}
    [patient] = entity(event, "1")
    assert patient["what"] == {"reference": "Patient/p1"} and patient["type"]["code"] == "1"
    [query] = entity(event, "24")
    assert base64.b64decode(query["query"]).decode().splitlines() == queries


def test_without_a_user_the_client_is_the_requestor() -> None:
    event = patient_read_event("p1", caller=SYSTEM, purpose="HRESCH", observer=OBSERVER, queries=["Patient/p1"])
    validate_resource(event)
    [requestor] = [a for a in event["agent"] if a["requestor"]]
    assert requestor["type"]["coding"][0]["code"] == "110153"
    assert codes(requestor, "purposeOfUse.0.coding") == {"http://terminology.hl7.org/CodeSystem/v3-ActReason|HRESCH"}
    assert codes(event, "purposeOfEvent.0.coding") == {"http://terminology.hl7.org/CodeSystem/v3-ActReason|HRESCH"}


def test_refused_read_is_a_minor_failure_without_the_success_profile() -> None:
    event = AuditTrail(ListSink(), caller=SYSTEM, observer=OBSERVER).patient_read(
        "p1", queries=["Consent?patient=Patient/p1&status=active"], error=ConsentDenied("TREAT", patient_id="p1"))
    validate_resource(event)
    assert event["outcome"] == "4" and "meta" not in event
    assert event["outcomeDesc"].startswith("ConsentDenied:") and "p1" not in event["outcomeDesc"]


def test_write_event_names_the_patient_and_every_written_resource() -> None:
    entries = [
        {"request": {"method": "PUT", "url": "RiskAssessment/ra-1"}, "resource": {}},
        {"request": {"method": "PUT", "url": "CarePlan/cp-1"}, "resource": {}},
        {"request": {"method": "POST", "url": "Provenance"}, "resource": {}},
    ]
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": f"{BASE}/RiskAssessment/ra-1/_history/1"}},
        {"response": {"status": "200 OK", "location": "CarePlan/cp-1/_history/3"}},
        {"response": {"status": "201 Created", "location": "Provenance/77/_history/1"}},
    ]}
    event = patient_write_event("p1", caller=USER, purpose="TREAT", observer=OBSERVER, entries=entries,
                                response=response, server=BASE)
    validate_resource(event)
    check_emittable(event)
    assert event["action"] == "C" and event["outcome"] == "0"
    assert {"http://hl7.org/fhir/restful-interaction|transaction", "http://hl7.org/fhir/restful-interaction|create",
            "http://hl7.org/fhir/restful-interaction|update"} <= codes(event, "subtype")
    assert agent(event, "AUT")["requestor"] is True
    assert [e["what"]["reference"] for e in entity(event, "4")] == [
        "RiskAssessment/ra-1/_history/1", "CarePlan/cp-1/_history/3", "Provenance/77/_history/1"]
    assert entity(event, "1")[0]["what"] == {"reference": "Patient/p1"}


def test_failed_write_names_what_it_tried_to_write() -> None:
    entries = [{"request": {"method": "PUT", "url": "Goal/g-1"}}, {"request": {"method": "POST", "url": "Provenance"}}]
    event = patient_write_event("p1", caller=SYSTEM, purpose="TREAT", observer=OBSERVER, entries=entries,
                                server=BASE, outcome=Outcome.SERIOUS_FAILURE, outcome_desc="UpstreamError: failed")
    validate_resource(event)
    assert event["outcome"] == "8" and "meta" not in event
    # logical references: nothing may exist, and a server enforcing referential integrity must still take it
    assert [e["what"] for e in entity(event, "4")] == [
        {"type": "Goal", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"{BASE}/Goal/g-1"}}]


# ---------------------------------------------------------------------------------------------- sinks


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class MemoryOutbox:
    """The durable store's outbox, in memory (the real one is SQLite)."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[str, dict[str, Any]]] = {}
        self.errors: dict[int, list[str]] = {}
        self.next_id = 1

    def outbox_put(self, kind: str, resource: dict[str, Any]) -> int:
        self.items[self.next_id] = (kind, json.loads(json.dumps(resource)))
        self.next_id += 1
        return self.next_id - 1

    def outbox_take(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        return [(i, r) for i, (_, r) in sorted(self.items.items())[:limit]]

    def outbox_done(self, ids: Sequence[int]) -> None:
        for i in ids:
            del self.items[i]

    def outbox_failed(self, outbox_id: int, error: str) -> None:
        self.errors.setdefault(outbox_id, []).append(error)


class BatchServer:
    """Answers a batch: the entries whose index is in ``fail`` get a 422 with an OperationOutcome."""

    def __init__(self, fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.fail = fail
        self.batches: list[list[dict[str, Any]]] = []

    def batch(self, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        self.batches.append(list(entries))
        return {"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "422 Unprocessable Entity", "outcome": {
                "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}}}
            if i in self.fail else {"response": {"status": "201 Created"}} for i in range(len(entries))]}


def test_outbox_flush_puts_each_event_to_its_own_id_and_keeps_failures() -> None:
    outbox = MemoryOutbox()
    trail = AuditTrail(OutboxSink(outbox), caller=SYSTEM, observer=OBSERVER)
    events = [trail.patient_read(f"p{i}", queries=[f"Patient/p{i}"]) for i in range(3)]
    assert [kind for kind, _ in outbox.items.values()] == ["AuditEvent"] * 3
    server = BatchServer(fail={1})
    report = OutboxSink(outbox).flush(server, limit=10)
    assert (report.sent, report.failed) == (2, 1)
    [batch] = server.batches
    assert [e["request"] for e in batch] == [{"method": "PUT", "url": f"AuditEvent/{e['id']}"} for e in events]
    assert list(outbox.items) == [2] and outbox.errors == {2: ["HTTP 422, issues invalid"]}
    assert "p1" not in outbox.errors[2][0]
    report = OutboxSink(outbox).flush(BatchServer(), limit=10)
    assert (report.sent, report.failed) == (1, 0) and not outbox.items


def test_outbox_flush_when_the_server_is_down_keeps_everything() -> None:
    from fhirtwin.fhir.errors import FhirConnectionError

    class Down:
        def batch(self, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
            raise FhirConnectionError("ConnectionError after 5 attempt(s)", method="POST", url=BASE)

    outbox = MemoryOutbox()
    AuditTrail(OutboxSink(outbox), caller=SYSTEM, observer=OBSERVER).patient_read("p1", queries=["Patient/p1"])
    report = OutboxSink(outbox).flush(Down())
    assert (report.sent, report.failed) == (0, 1) and list(outbox.items) == [1]
    assert outbox.errors == {1: ["FhirConnectionError"]}
    assert OutboxSink(outbox).flush(BatchServer()).sent == 1


def test_json_lines_sink_appends_one_event_per_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(JsonLinesSink(path), caller=USER, observer=OBSERVER)
    trail.patient_read("p1", queries=["Patient/p1"])
    trail.for_caller(SYSTEM, "HRESCH").patient_write("p2", entries=[{"request": {"method": "PUT", "url": "Goal/g"}}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["entity"][0]["what"]["reference"] for e in lines] == ["Patient/p1", "Patient/p2"]
    assert [e["purposeOfEvent"][0]["coding"][0]["code"] for e in lines] == ["TREAT", "HRESCH"]


def test_a_failing_sink_refuses_the_audited_action() -> None:
    class Broken:
        def emit(self, event: dict[str, Any]) -> None:
            raise OSError("disk full")

    with pytest.raises(AuditUnavailable) as caught:
        AuditTrail(Broken(), caller=SYSTEM, observer=OBSERVER).patient_read("p1", queries=[])
    assert caught.value.http_status == 503


def test_default_observer_is_the_registered_device() -> None:
    from fhirtwin.engine import Engine as _Engine

    devices = {f"Device/{d['id']}" for d in _Engine().registration() if d["resourceType"] == "Device"}
    assert AuditTrail(ListSink()).observer in devices


# ---------------------------------------------------------------------------------------------- engine


@pytest.fixture
def client() -> FhirClient:
    return FhirClient(BASE, sleep=lambda s: None, rng=random.Random(1), max_retries=0)


@responses.activate
def test_engine_audits_each_read_once(client: FhirClient) -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "200 OK"}, "resource": patient},
        *[{"response": {"status": "200 OK"}, "resource": _searchset([])}] * len(RECORD_TYPES)]})
    sink = ListSink()
    Engine(client, audit=AuditTrail(sink, caller=USER, observer=OBSERVER)).read("p1", with_stored=False)
    [event] = sink.events
    assert event["outcome"] == "0" and entity(event, "1")[0]["what"]["reference"] == "Patient/p1"
    assert agent(event, "110152")["who"]["identifier"]["value"] == BASE


@responses.activate
def test_engine_audits_a_read_of_an_unknown_patient_as_failed(client: FhirClient) -> None:
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "404 Not Found"}},
        *[{"response": {"status": "200 OK"}, "resource": _searchset([])}] * len(RECORD_TYPES)]})
    sink = ListSink()
    with pytest.raises(PatientNotFound):
        Engine(client, audit=AuditTrail(sink, caller=USER, observer=OBSERVER)).read("p1", with_stored=False)
    assert [e["outcome"] for e in sink.events] == ["4"]
    assert entity(sink.events[0], "1")[0]["what"] == {
        "type": "Patient", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"{BASE}/Patient/p1"}}


@responses.activate
def test_engine_audits_a_consent_denial_and_reads_nothing_else(client: FhirClient) -> None:
    responses.post(f"{BASE}/Consent/_search", json=_searchset([{
        "resourceType": "Consent", "id": "c1", "status": "active", "patient": {"reference": "Patient/p1"},
        "provision": {"type": "deny"}}]))
    sink = ListSink()
    engine = Engine(client, audit=AuditTrail(sink, caller=USER, observer=OBSERVER), consent=ConsentPolicy("TREAT"))
    with pytest.raises(ConsentDenied):
        engine.read("p1")
    [event] = sink.events
    assert event["outcome"] == "4" and len(responses.calls) == 1
