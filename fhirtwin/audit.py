"""Audit: one FHIR R4 AuditEvent for every read of a patient's record and every write, following IHE Basic
Audit Log Patterns (BALP, https://profiles.ihe.net/ITI/BALP/).

Why: a clinical service must be able to say who looked at or changed which patient's record, when, for what
purpose and with what result. The events go to a sink: the service's durable outbox (flushed to the FHIR
server as a batch, retried until it lands) or a JSON-lines file. Nothing of this module writes to a Python
log: an AuditEvent names the patient by reference, which is exactly what logs must not do.

Shape of the events (BALP PatientQuery and PatientCreate/PatientUpdate, R4 AuditEvent
https://hl7.org/fhir/R4/auditevent.html):

* ``type`` = audit-event-type ``rest``; ``subtype`` = restful-interaction codes (``search-type`` and ``batch``
  for the record read, ``transaction`` plus ``create``/``update`` for a write); ``action`` E (query), C or U;
* ``outcome`` 0 success, 4 minor failure (refused: consent, not found), 8 serious failure (the server
  failed), with ``outcomeDesc`` saying why (no patient data);
* agents: the caller — the user when known (v3-ParticipationType IRCP for reads, AUT for writes), else the
  OAuth client (DICOM DCM 110153 Source Role ID) — is ``requestor = true`` and carries the ``purposeOfUse``
  (v3-ActReason); the FHIR server is DCM 110152 Destination Role ID;
* ``source.observer`` is the fhirtwin Device (security-source-type 4, Application Server);
* entities: the Patient (audit-entity-type 1 Person, object-role 1 Patient), the query (type 2 System Object,
  role 24 Query, the requests base64-encoded in ``query``) for reads, and each written resource (type 2,
  role 4 Domain Resource) for writes. BALP: one AuditEvent per patient, also when one request read several.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

from fhirtwin.consent import purpose_coding
from fhirtwin.engine import EngineError

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition"
PROFILE_PATIENT_QUERY = f"{BALP}/IHE.BasicAudit.PatientQuery"
PROFILE_PATIENT_CREATE = f"{BALP}/IHE.BasicAudit.PatientCreate"
PROFILE_PATIENT_UPDATE = f"{BALP}/IHE.BasicAudit.PatientUpdate"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
#: Identifier systems of the caller (an OAuth client id; a user named by a token subject, not a reference).
CLIENT_ID_SYSTEM = "https://fhirtwin.org/sid/oauth-client"
USER_ID_SYSTEM = "https://fhirtwin.org/sid/user"
URI_SYSTEM = "urn:ietf:rfc:3986"
#: The outbox ``kind`` of an AuditEvent.
OUTBOX_KIND = "AuditEvent"


class Outcome(IntEnum):
    """R4 AuditEventOutcome (http://hl7.org/fhir/audit-event-outcome)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


def outcome_of(exc: BaseException | None) -> Outcome:
    """Success without an error; a refusal (4xx) is a minor failure, anything else a serious one."""
    if exc is None:
        return Outcome.SUCCESS
    status = getattr(exc, "http_status", 500)
    return Outcome.MINOR_FAILURE if isinstance(status, int) and 400 <= status < 500 else Outcome.SERIOUS_FAILURE


@dataclass(frozen=True)
class Caller:
    """Who asked for the read or write: the OAuth client and, when the token names one, the user.

    ``user`` is a FHIR reference (``Practitioner/123``, from ``fhirUser``) or a token subject; ``network`` is
    the caller's address as the service saw it (an IP address or host name).
    """

    client_id: str
    user: str | None = None
    network: str | None = None


# ---------------------------------------------------------------------------------------------- builders


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _network(address: str) -> dict[str, str]:
    """R4 network type: 2 IP address, 5 URI, 1 machine name."""
    if "://" in address:
        return {"address": address, "type": "5"}
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return {"address": address, "type": "1"}
    return {"address": address, "type": "2"}


def _agents(caller: Caller, purpose: str, server: str | None, *, user_role: tuple[str, str]) -> list[dict[str, Any]]:
    purpose_of_use = [{"coding": [purpose_coding(purpose)]}]
    client: dict[str, Any] = {"type": {"coding": [_coding(DICOM, "110153", "Source Role ID")]},
                              "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": caller.client_id}},
                              "requestor": caller.user is None}
    if caller.network:
        client["network"] = _network(caller.network)
    agents = [client]
    if caller.user:
        agents.insert(0, {"type": {"coding": [_coding(PARTICIPATION, *user_role)]},
                          "who": {"identifier": {"system": USER_ID_SYSTEM, "value": caller.user}}, "requestor": True,
                          "purposeOfUse": purpose_of_use})
    else:
        client["purposeOfUse"] = purpose_of_use
    if server:
        agents.append({"type": {"coding": [_coding(DICOM, "110152", "Destination Role ID")]},
                       "who": {"identifier": {"system": URI_SYSTEM, "value": server}},
                       "requestor": False, "network": _network(urlsplit(server).hostname or server)})
    return agents


def _source(observer: str, site: str | None) -> dict[str, Any]:
    source: dict[str, Any] = {"observer": {"reference": observer},
                              "type": [_coding(SOURCE_TYPE, "4", "Application Server")]}
    if site:
        source["site"] = site
    return source


def _what(reference: str, *, exists: bool, server: str | None) -> dict[str, Any]:
    """A literal reference to what exists on the server; a logical one (type and URL) to what may not, because
    servers enforcing referential integrity (HAPI) would refuse the whole AuditEvent."""
    if exists:
        return {"reference": reference}
    return {"type": reference.split("/", 1)[0],
            "identifier": {"system": URI_SYSTEM, "value": f"{server}/{reference}" if server else reference}}


def _patient_entity(patient_id: str, *, exists: bool = True, server: str | None = None) -> dict[str, Any]:
    return {"what": _what(f"Patient/{patient_id}", exists=exists, server=server),
            "type": _coding(ENTITY_TYPE, "1", "Person"), "role": _coding(OBJECT_ROLE, "1", "Patient")}


def _event(*, profile: str | None, subtype: list[dict[str, str]], action: str, outcome: Outcome,
           outcome_desc: str | None, purpose: str, agents: list[dict[str, Any]], source: dict[str, Any],
           entities: list[dict[str, Any]], recorded: datetime | None) -> dict[str, Any]:
    when = (recorded or datetime.now(UTC)).astimezone(UTC)
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": str(uuid.uuid4())}
    if profile and outcome is Outcome.SUCCESS:  # BALP's profiles fix outcome 0; a failure follows the pattern only
        event["meta"] = {"profile": [profile]}
    event.update({
        "type": _coding(EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": subtype,
        "action": action,
        "recorded": when.isoformat(timespec="milliseconds"),
        "outcome": str(int(outcome)),
    })
    if outcome_desc:
        event["outcomeDesc"] = outcome_desc
    event.update({"purposeOfEvent": [{"coding": [purpose_coding(purpose)]}], "agent": agents, "source": source,
                  "entity": entities})
    return event


def patient_read_event(patient_id: str, *, caller: Caller, purpose: str, observer: str, queries: Sequence[str],
                       server: str | None = None, site: str | None = None, outcome: Outcome = Outcome.SUCCESS,
                       outcome_desc: str | None = None, patient_exists: bool = True,
                       recorded: datetime | None = None) -> dict[str, Any]:
    """BALP PatientQuery: the record read (a batch of a Patient read and searches) of one patient.

    ``queries`` are the requests as sent (relative URLs); they are base64-encoded in ``entity.query`` as BALP
    asks, so the raw request is kept even when it is malformed. ``patient_exists=False`` (the read found no
    such Patient) names the patient by a logical reference.
    """
    raw = "\n".join(queries).encode("utf-8")
    query = {"type": _coding(ENTITY_TYPE, "2", "System Object"), "role": _coding(OBJECT_ROLE, "24", "Query"),
             "query": base64.b64encode(raw).decode("ascii")}
    return _event(profile=PROFILE_PATIENT_QUERY,
                  subtype=[_coding(INTERACTION, "search-type", "search type"), _coding(INTERACTION, "batch", "batch")],
                  action="E", outcome=outcome, outcome_desc=outcome_desc, purpose=purpose,
                  agents=_agents(caller, purpose, server, user_role=("IRCP", "information recipient")),
                  source=_source(observer, site), recorded=recorded,
                  entities=[_patient_entity(patient_id, exists=patient_exists, server=server), query])


def written_references(entries: Iterable[Mapping[str, Any]], response: Mapping[str, Any] | None) -> list[str]:
    """``Type/id/_history/v`` of what a transaction wrote (from the response), or ``Type/id`` of its PUTs
    when there is no response (the write failed)."""
    out: list[str] = []
    answers = list((response or {}).get("entry") or [])
    for index, entry in enumerate(entries):
        request = entry.get("request") or {}
        answer = (answers[index].get("response") or {}) if index < len(answers) else {}
        location = str(answer.get("location") or "")
        if location:
            parts = location.split("/")
            start = max(0, len(parts) - 4) if "_history" in parts else max(0, len(parts) - 2)
            out.append("/".join(parts[start:]))
        elif str(request.get("method", "")).upper() == "PUT" and "?" not in str(request.get("url", "")):
            out.append(str(request.get("url")))
    return out


def patient_write_event(patient_id: str, *, caller: Caller, purpose: str, observer: str,
                        entries: Sequence[Mapping[str, Any]], response: Mapping[str, Any] | None = None,
                        server: str | None = None, site: str | None = None, outcome: Outcome = Outcome.SUCCESS,
                        outcome_desc: str | None = None, written: Sequence[str] | None = None,
                        recorded: datetime | None = None) -> dict[str, Any]:
    """BALP PatientCreate / PatientUpdate: one transaction writing a patient's results.

    Entities: the Patient and every resource written (``written``, else read from ``entries`` and
    ``response``, see :func:`written_references`); after a failure they are logical references, since
    nothing may have been written.
    """
    methods = {str((e.get("request") or {}).get("method", "")).upper() for e in entries}
    subtype = [_coding(INTERACTION, "transaction", "transaction")]
    if "POST" in methods:
        subtype.append(_coding(INTERACTION, "create", "create"))
    if "PUT" in methods or not methods:  # no entries known: a retirement, which updates tags
        subtype.append(_coding(INTERACTION, "update", "update"))
    creates = "POST" in methods
    data = [{"what": _what(ref, exists=outcome is Outcome.SUCCESS, server=server),
             "type": _coding(ENTITY_TYPE, "2", "System Object"),
             "role": _coding(OBJECT_ROLE, "4", "Domain Resource")}
            for ref in (written if written is not None else written_references(entries, response))]
    return _event(profile=PROFILE_PATIENT_CREATE if creates else PROFILE_PATIENT_UPDATE, subtype=subtype,
                  action="C" if creates else "U", outcome=outcome, outcome_desc=outcome_desc, purpose=purpose,
                  agents=_agents(caller, purpose, server, user_role=("AUT", "author")),
                  source=_source(observer, site), entities=[_patient_entity(patient_id), *data], recorded=recorded)


# ---------------------------------------------------------------------------------------------- sinks


class AuditSink(Protocol):
    """Where AuditEvents go; ``emit`` must not return before the event is stored."""

    def emit(self, event: dict[str, Any]) -> None: ...


class Outbox(Protocol):
    """The durable outbox of the service's store (``fhirtwin.service.store``)."""

    def outbox_put(self, kind: str, resource: dict[str, Any], /) -> Any: ...

    def outbox_take(self, limit: int, /) -> list[tuple[int, dict[str, Any]]]: ...

    def outbox_done(self, ids: Sequence[int], /) -> Any: ...

    def outbox_failed(self, outbox_id: int, error: str, /) -> Any: ...


class AuditUnavailable(EngineError):
    """The audit sink could not store an event: the read or write it audits is not answered (fail closed)."""

    http_status = 503
    issue_code = "transient"


@dataclass(frozen=True)
class FlushReport:
    """What one outbox flush did."""

    sent: int = 0
    failed: int = 0


class OutboxSink:
    """Events into the durable outbox; :meth:`flush` sends them to the FHIR server.

    The flush POSTs one ``batch`` Bundle whose entries PUT each AuditEvent to its own (UUID) id, so a batch
    the client retries after a lost response, or an event the outbox offers again, never lands twice.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def emit(self, event: dict[str, Any]) -> None:
        self.outbox.outbox_put(OUTBOX_KIND, event)

    def flush(self, client: Any, *, limit: int = 100) -> FlushReport:
        """Send up to ``limit`` pending events in one batch; each is marked done or failed (with the reason,
        never the event's content)."""
        from fhirtwin.fhir import errors as fhir_errors
        from fhirtwin.fhir.client import batch_results

        items = self.outbox.outbox_take(limit)
        if not items:
            return FlushReport()
        entries = []
        for _, resource in items:
            rtype, rid = resource.get("resourceType", "AuditEvent"), resource.get("id")
            request = {"method": "PUT", "url": f"{rtype}/{rid}"} if rid else {"method": "POST", "url": str(rtype)}
            entries.append({"resource": resource, "request": request})
        try:
            response = client.batch(entries)
        except fhir_errors.FhirError as exc:
            status = getattr(exc, "status", None)
            for item_id, _ in items:
                self.outbox.outbox_failed(item_id, f"{type(exc).__name__}" + (f" (HTTP {status})" if status else ""))
            return FlushReport(failed=len(items))
        results = batch_results(response, entries)
        done: list[int] = []
        failed = 0
        for index, (item_id, _) in enumerate(items):
            result = results[index] if index < len(results) else None
            if result is not None and result.ok:
                done.append(item_id)
            else:
                failed += 1
                codes = ",".join(str(i.get("code", "?")) for i in (result.issues if result else []))
                self.outbox.outbox_failed(item_id, f"HTTP {result.status if result else 'no answer'}"
                                          + (f", issues {codes}" if codes else ""))
        if done:
            self.outbox.outbox_done(done)
        return FlushReport(sent=len(done), failed=failed)


class JsonLinesSink:
    """Events appended to a file, one JSON object per line, flushed to disk before :meth:`emit` returns."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------- the trail


def default_observer() -> str:
    """``Device/<id>`` of the registered fhirtwin model Device (the one ``fhirtwin register`` uploads)."""
    from fhirtwin.sim.model import MechanisticTwin
    from fhirtwin.writeback.device import device_id

    return f"Device/{device_id(MechanisticTwin.name, MechanisticTwin.version)}"


@dataclass(frozen=True)
class AuditTrail:
    """The engine's audit hook: a sink, the observer, and who is asking and why.

    One trail per deployment (the sink and observer); :meth:`for_caller` gives a copy for one request's
    caller and purpose sharing the same sink. The engine calls :meth:`patient_read` and
    :meth:`patient_write`; a sink that fails raises :class:`AuditUnavailable`, so nothing unaudited is answered.
    """

    sink: AuditSink
    caller: Caller = Caller("fhirtwin")
    purpose: str = "TREAT"
    observer: str = dataclasses.field(default_factory=default_observer)
    site: str | None = None

    def for_caller(self, caller: Caller, purpose: str | None = None) -> AuditTrail:
        """The same trail for another caller (and purpose of use)."""
        return dataclasses.replace(self, caller=caller, purpose=purpose or self.purpose)

    def patient_read(self, patient_id: str, *, queries: Sequence[str], server: str | None = None,
                     error: BaseException | None = None) -> dict[str, Any]:
        """Audit one patient's record read (``error``: the read failed or was refused)."""
        event = patient_read_event(patient_id, caller=self.caller, purpose=self.purpose, observer=self.observer,
                                   queries=queries, server=server, site=self.site, outcome=outcome_of(error),
                                   outcome_desc=_describe(error),
                                   patient_exists=getattr(error, "http_status", None) != 404)
        self._emit(event)
        return event

    def patient_write(self, patient_id: str, *, entries: Sequence[Mapping[str, Any]],
                      response: Mapping[str, Any] | None = None, server: str | None = None,
                      written: Sequence[str] | None = None, error: BaseException | None = None) -> dict[str, Any]:
        """Audit one transaction writing a patient's results (``error``: it failed)."""
        event = patient_write_event(patient_id, caller=self.caller, purpose=self.purpose, observer=self.observer,
                                    entries=entries, response=response, server=server, site=self.site,
                                    outcome=outcome_of(error), outcome_desc=_describe(error), written=written)
        self._emit(event)
        return event

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self.sink.emit(event)
        except Exception as exc:  # any sink failure: the audited action must not be answered
            raise AuditUnavailable(f"the audit trail could not record the event ({type(exc).__name__})") from exc


def _describe(error: BaseException | None) -> str | None:
    """An outcome description without patient data (EngineError messages never carry any)."""
    if error is None:
        return None
    if isinstance(error, EngineError):
        return f"{type(error).__name__}: {error.message}"
    return type(error).__name__
