"""Consent and audit against the live sandbox: a Consent denying treatment stops the engine before the record
read, and allowed reads and writes leave BALP AuditEvents on the server through the durable outbox.

The tests work on their own copies of a cohort patient (fixed ids, written with PUT: re-running changes
nothing), so the shared cohort and its Consents stay untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirtwin.audit import AuditTrail, Caller, OutboxSink
from fhirtwin.cli import main
from fhirtwin.consent import ConsentDenied, ConsentPolicy
from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.keys import signing_key_for
from fhirtwin.service.store import Store

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
SOURCE = "ftp-0006"
DENIED = "ftp-0006-consent-denied"
ALLOWED = "ftp-0006-consent-allowed"
CONSENT_ID = "fhirtwin-test-deny-treatment"
CALLER = Caller("consent-audit-test", user="test-clinician", network="127.0.0.1")


def copy_record(resources: list[dict[str, Any]], new_patient: str) -> list[dict[str, Any]]:
    """The patient's own resources under new ids, pointing at the new patient (shared ones, e.g. a
    Medication, are referred to, not copied)."""
    suffix = new_patient.removeprefix(SOURCE)
    own = [r for r in resources if r["resourceType"] == "Patient" or "Patient/" + SOURCE in json.dumps(r)]
    renames = {f"{r['resourceType']}/{r['id']}": f"{r['resourceType']}/{r['id'][:64 - len(suffix)]}{suffix}"
               for r in own}
    renames[f"Patient/{SOURCE}"] = f"Patient/{new_patient}"
    text = json.dumps([{k: v for k, v in r.items() if k != "meta"} for r in own])
    for old, new in renames.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    copies: list[dict[str, Any]] = json.loads(text)
    for resource in copies:
        resource["id"] = renames[f"{resource['resourceType']}/{resource['id']}"].split("/", 1)[1]
    return copies


@pytest.fixture(scope="module")
def copies(base_url: str, loaded_cohort) -> dict[str, str]:
    client = FhirClient(base_url)
    record = Engine(client).read(SOURCE, with_stored=False).resources
    entries = []
    for patient in (DENIED, ALLOWED):
        for resource in copy_record(record, patient):
            entries.append({"resource": resource,
                            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
    consent = {
        "resourceType": "Consent", "id": CONSENT_ID, "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{DENIED}"}, "dateTime": "2026-01-01",
        "policy": [{"uri": "https://fhirtwin.org/tests/privacy-policy"}],
        "provision": {"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                   "code": "TREAT"}]},
    }
    entries.append({"resource": consent, "request": {"method": "PUT", "url": f"Consent/{CONSENT_ID}"}})
    client.transaction(entries)
    return {"denied": DENIED, "allowed": ALLOWED}


class RecordingOutbox(OutboxSink):
    """The outbox sink, remembering the ids of the events it queued (to find them on the server)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.ids: list[str] = []

    def emit(self, event: dict[str, Any]) -> None:
        super().emit(event)
        self.ids.append(event["id"])


def engine(base_url: str, sink: OutboxSink, purpose: str = "TREAT") -> Engine:
    trail = AuditTrail(sink, caller=CALLER, purpose=purpose, site="fhirtwin-tests")
    return Engine(FhirClient(base_url), signing_key=signing_key_for(base_url), draws=200,
                  consent=ConsentPolicy(purpose), audit=trail)


def audit_events(http: requests.Session, base_url: str, patient: str, ids: list[str]) -> list[dict[str, Any]]:
    bundle = http.get(f"{base_url}/AuditEvent", params={"entity": f"Patient/{patient}", "_id": ",".join(ids),
                                                        "_count": "50"}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def results_of(http: requests.Session, base_url: str, patient: str) -> int:
    return int(http.get(f"{base_url}/RiskAssessment", params={"subject": f"Patient/{patient}",
                                                              "_summary": "count"}).json()["total"])


def test_denied_patient_gets_only_the_consent_search_and_an_audited_refusal(
        copies: dict[str, str], base_url: str, http: requests.Session, tmp_path: Path) -> None:
    store = Store(tmp_path / "service.sqlite3")
    sink = RecordingOutbox(store)
    treating = engine(base_url, sink)
    client = treating.source
    before = client.request_count
    with pytest.raises(ConsentDenied) as caught:
        treating.simulate_patient(copies["denied"], write=True)
    assert caught.value.consent == f"Consent/{CONSENT_ID}"
    assert client.request_count - before == 1  # the Consent search and nothing else
    assert results_of(http, base_url, copies["denied"]) == 0
    outcome = caught.value.outcome()
    assert outcome["issue"][0]["code"] == "forbidden" and copies["denied"] not in json.dumps(outcome)

    assert store.outbox_size() == 1
    report = sink.flush(client)
    assert (report.sent, report.failed) == (1, 0) and store.outbox_size() == 0
    [event] = audit_events(http, base_url, copies["denied"], sink.ids)
    assert event["outcome"] == "4" and event["action"] == "E"
    assert event["outcomeDesc"].startswith("ConsentDenied")

    # the Consent denies treatment only: a research engine reads the same patient
    research = engine(base_url, RecordingOutbox(store), purpose="HRESCH")
    assert research.read(copies["denied"], with_stored=False).patient_id == copies["denied"]


def test_allowed_read_and_write_land_on_the_server_as_audit_events(
        copies: dict[str, str], base_url: str, http: requests.Session, tmp_path: Path) -> None:
    store = Store(tmp_path / "service.sqlite3")
    sink = RecordingOutbox(store)
    treating = engine(base_url, sink)
    simulation = treating.simulate_patient(copies["allowed"], write=True)
    assert simulation.commit is not None and results_of(http, base_url, copies["allowed"]) >= 1
    assert store.outbox_size() == 2  # the read and the write; nothing sent yet

    report = sink.flush(treating.source)
    assert (report.sent, report.failed) == (2, 0) and store.outbox_size() == 0
    events = {e["action"]: e for e in audit_events(http, base_url, copies["allowed"], sink.ids)}
    assert set(events) == {"E", "C"} and all(e["outcome"] == "0" for e in events.values())
    written = {e["what"]["reference"].split("/_history")[0] for e in events["C"]["entity"]
               if e["role"]["code"] == "4"}
    assert any(ref.startswith("RiskAssessment/") for ref in written)
    assert any(ref.startswith("Provenance/") for ref in written)
    requestor = next(a for a in events["C"]["agent"] if a["requestor"])
    assert requestor["who"]["identifier"]["value"] == "test-clinician"
    assert requestor["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"

    # the server's own validator accepts the event as R4 (the BALP profile is not loaded there: left out)
    event = {k: v for k, v in events["C"].items() if k not in ("meta", "id")}
    validated = http.post(f"{base_url}/AuditEvent/$validate", json=event, headers={"Content-Type": FHIR_JSON})
    errors = [i for i in validated.json().get("issue", []) if i["severity"] in ("error", "fatal")]
    assert validated.status_code == 200 and errors == []


def test_run_counts_consent_denied_patients_and_writes_an_audit_log(
        copies: dict[str, str], base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    capsys.readouterr()
    code = main(["run", "--server", base_url, "--patient", copies["denied"], "--patient", copies["allowed"],
                 "--purpose-of-use", "TREAT", "--audit-log", str(log), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["summary"]["consent-denied"] == 1 and out["summary"].get("failed", 0) == 0
    statuses = {p["patient_id"]: p["status"] for p in out["patients"]}
    assert statuses[copies["denied"]] == "consent-denied"
    assert statuses[copies["allowed"]] in ("written", "unchanged")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    seen = sorted((e["entity"][0]["what"]["reference"], e["action"], e["outcome"]) for e in events)
    denied, allowed = f"Patient/{copies['denied']}", f"Patient/{copies['allowed']}"
    assert [s for s in seen if s[0] == denied] == [(denied, "E", "4")]  # the refused read, nothing else
    assert [s for s in seen if s[0] == allowed and s[1] == "E"] == [(allowed, "E", "0")]
    assert [s[2] for s in seen if s[0] == allowed and s[1] in ("C", "U")] == ["0"]  # one audited write
