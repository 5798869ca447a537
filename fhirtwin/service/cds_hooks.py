"""CDS Hooks 2.0 service: a ``patient-view`` card with the twin's cardiorenal risks at chart open.

Why a card: the clinician sees the 10-year risks with their 90 % intervals, what drives them and the best
option, without leaving the chart; the card links to the SMART patient page for what-ifs and offers the
draft CarePlan as a suggestion. The card is computed with a smaller ensemble (``CARD_DRAWS`` = 200 draws
instead of the service default) so that a call with complete prefetch stays well inside the spec's
"on the order of 500 ms"; the page and the written RiskAssessments use the full ensemble.

Data: ``prefetch`` is used when given; a key that is absent means "not provided" and is fetched from
``fhirServer`` with ``fhirAuthorization.access_token``; a key whose value is ``null`` means the client ran
the query and found nothing. Without prefetch and without ``fhirServer`` the service cannot read the
record and answers 412. Errors are JSON ``{"error": ..., "message": ...}``; messages name fields, never
values, and no stack trace leaves the service.

Indicator (see :mod:`fhirtwin.service.twin_view`): median 10-year total CVD < 7.5 % ``info``,
7.5 % to < 20 % ``warning``, >= 20 % ``critical`` (2019 ACC/AHA primary-prevention risk categories).
"""

from __future__ import annotations

import html
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fhirtwin.audit import Caller
from fhirtwin.engine import (
    Engine,
    EngineError,
    PatientNotFound,
    PatientRecord,
    TwinRun,
    UpstreamError,
    UpstreamUnauthorized,
    prefetch_templates,
)
from fhirtwin.fhir.client import FhirClient
from fhirtwin.service import twin_view
from fhirtwin.service.runtime import SERVICE_PURPOSE, ServiceSettings, audit_trail
from fhirtwin.service.security import AuthError
from fhirtwin.service.store import open_store
from fhirtwin.vocabulary import CONCEPTS, EXT_SCOPE_DECISION, coding

log = logging.getLogger("fhirtwin.service.cds_hooks")

router = APIRouter()

SERVICE_ID = "fhirtwin-cardiorenal-risk"
HOOK = "patient-view"
CARD_DRAWS = 200
SUMMARY_LIMIT = 139  # "fewer than 140 characters"

#: Prefetch templates (key -> FHIR query), derived from what the twin reads. ``REQUIRED_KEYS`` must be
#: available (prefetched or fetchable); the others only refine the forecast.
PREFETCH: dict[str, str] = prefetch_templates()
REQUIRED_KEYS = ("patient", "observations", "conditions", "medicationRequests", "medicationStatements")
#: The patient's active Consents (IHE PCF), checked before anything else of the record is used.
CONSENT_KEY = "consents"
CONSENT_QUERY = "Consent?patient={{context.patientId}}&status=active"

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
USER_REF = re.compile(r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}$")

#: Feedback bounds: items per call and the size of the free-text parts (the store keeps the newest 10,000 rows).
FEEDBACK_ITEMS_MAX = 100
FEEDBACK_ID_MAX = 128
FEEDBACK_REASON_MAX = 2000


class CdsError(Exception):
    """An error answered to the CDS client with a status and a value-free message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def error_response(status: int, error: str, message: str) -> JSONResponse:
    """The JSON error body used by every CDS endpoint."""
    return JSONResponse({"error": error, "message": message}, status_code=status)


# --------------------------------------------------------------------------------------------- request


class FhirAuthorization(BaseModel):
    """``fhirAuthorization``: every field the spec marks required, ``patient`` optional."""

    model_config = ConfigDict(extra="allow")
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    scope: str
    subject: str
    patient: str | None = None

    def __repr__(self) -> str:  # never print the token
        return "FhirAuthorization(<redacted>)"


class PatientViewContext(BaseModel):
    """``patient-view`` context."""

    model_config = ConfigDict(extra="allow")
    userId: str  # noqa: N815 - spec field name
    patientId: str  # noqa: N815
    encounterId: str | None = None  # noqa: N815

    @field_validator("userId")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_REF.match(value):
            raise ValueError("userId must be Practitioner/, PractitionerRole/, Patient/ or RelatedPerson/ + id")
        return value

    @field_validator("patientId")
    @classmethod
    def _patient(cls, value: str) -> str:
        if not FHIR_ID.match(value):
            raise ValueError("patientId is not a FHIR id")
        return value


class HookRequest(BaseModel):
    """A CDS Hooks 2.0 service request for ``patient-view``."""

    model_config = ConfigDict(extra="allow")
    hook: str
    hookInstance: str  # noqa: N815
    fhirServer: str | None = None  # noqa: N815
    fhirAuthorization: FhirAuthorization | None = None  # noqa: N815
    context: PatientViewContext
    prefetch: dict[str, dict[str, Any] | None] | None = None

    @field_validator("hookInstance")
    @classmethod
    def _instance(cls, value: str) -> str:
        uuid.UUID(value)  # raises ValueError for anything that is not a UUID
        return value

    @field_validator("fhirServer")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("fhirServer must be an absolute http(s) URL")
        return value.rstrip("/") if value else value


def _validation_message(exc: ValidationError) -> str:
    """Field locations and reasons only (pydantic's ``input`` is never echoed)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_request(body: Any, service_id: str) -> HookRequest:
    """Validate a service request, raising :class:`CdsError` (400) with a value-free message."""
    if not isinstance(body, dict):
        raise CdsError(400, "bad_request", "request body must be a JSON object")
    try:
        req = HookRequest.model_validate(body)
    except ValidationError as exc:
        raise CdsError(400, "bad_request", _validation_message(exc)) from None
    if req.hook != HOOK:
        raise CdsError(400, "bad_request", f"service {service_id} answers the {HOOK} hook only")
    if req.fhirAuthorization is not None and req.fhirServer is None:
        raise CdsError(400, "bad_request", "fhirAuthorization requires fhirServer")
    auth = req.fhirAuthorization
    if auth is not None and auth.patient is not None and auth.patient != req.context.patientId:
        raise CdsError(400, "bad_request", "fhirAuthorization.patient differs from context.patientId")
    return req


# --------------------------------------------------------------------------------------------- record


def render_template(template: str, context: PatientViewContext) -> str:
    """A prefetch template with its context tokens filled in (patient-view: patientId, userId, encounterId)."""
    query = template.replace("{{context.patientId}}", context.patientId)
    query = query.replace("{{context.userId}}", context.userId)
    if context.encounterId:
        query = query.replace("{{context.encounterId}}", context.encounterId)
    return query


def _resources_of(key: str, value: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The resources of one prefetch value (a resource or a searchset Bundle); 400 for a malformed Bundle."""
    if value is None:
        return []
    if value.get("resourceType") == "Bundle":
        entries = value.get("entry") or []
        if not isinstance(entries, list):
            raise CdsError(400, "bad_request", f"prefetch.{key}: Bundle.entry must be an array")
        return [e["resource"] for e in entries
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and not (isinstance(e.get("search"), dict) and e["search"].get("mode") == "outcome")]
    return [value]


def _fhir_client(settings: ServiceSettings, req: HookRequest) -> FhirClient:
    from fhirtwin.fhir.auth import BearerToken

    assert req.fhirServer is not None
    auth = BearerToken(req.fhirAuthorization.access_token) if req.fhirAuthorization else None
    return FhirClient(req.fhirServer, auth=auth, verify=settings.verify_tls, timeout=(3, 20), max_retries=1)


def gather_record(settings: ServiceSettings, req: HookRequest) -> tuple[PatientRecord, list[str]]:
    """The patient's record from prefetch, completed from ``fhirServer``; also the optional keys missing.

    Raises :class:`CdsError` 412 when a required key is neither prefetched nor fetchable.
    """
    from fhirtwin.fhir.client import batch_results, patient_reference_id, references

    patient_id = req.context.patientId
    prefetch = req.prefetch or {}
    missing = [k for k in PREFETCH if k not in prefetch]
    if req.fhirServer is None and any(k in missing for k in REQUIRED_KEYS):
        raise CdsError(412, "precondition_failed",
                       "prefetch incomplete and no fhirServer: cannot read "
                       + ", ".join(k for k in REQUIRED_KEYS if k in missing))
    resources: list[dict[str, Any]] = []
    for key, value in prefetch.items():
        if key in PREFETCH:
            resources += _resources_of(key, value)
    optional_missing: list[str] = []
    if missing and req.fhirServer is None:
        optional_missing = missing
    elif missing:
        client = _fhir_client(settings, req)
        if not prefetch:
            resources = Engine(client).read(patient_id, with_stored=False).resources
        else:
            entries = [{"request": {"method": "GET", "url": render_template(PREFETCH[k], req.context)}}
                       for k in missing]
            for key, result in zip(missing, batch_results(client.batch(entries), entries), strict=False):
                if result.status in (401, 403):
                    raise CdsError(412, "precondition_failed", f"fhirServer refused the {key} query")
                if not result.ok:
                    if key in REQUIRED_KEYS:
                        raise CdsError(502, "fhir_server_error", f"fhirServer failed the {key} query")
                    optional_missing.append(key)
                    continue
                if result.resource and result.resource.get("resourceType") == "Bundle":
                    resources += list(client.iter_bundle_pages(result.resource, max_pages=20))
                elif result.resource:
                    resources.append(result.resource)
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if not patients or patients[0].get("id") != patient_id:
        raise CdsError(412, "precondition_failed", "the patient resource for context.patientId is not available")
    record = [patients[0]]
    seen = {("Patient", patient_id)}
    unowned: list[dict[str, Any]] = []
    for r in resources:
        rkey = (str(r.get("resourceType")), str(r.get("id")))
        if r.get("resourceType") == "Patient" or (r.get("id") is not None and rkey in seen):
            continue
        seen.add(rkey)
        owner = patient_reference_id(r)
        if owner is None:
            unowned.append(r)  # an _include'd Medication: kept only if the record refers to it
        elif owner != patient_id:
            raise CdsError(400, "bad_request", f"prefetch holds a {r.get('resourceType')} of another patient")
        else:
            record.append(r)
    referred = set().union(*(references(r) for r in record))
    for r in unowned:
        if f"{r.get('resourceType')}/{r.get('id')}" not in referred:
            raise CdsError(400, "bad_request", f"prefetch holds a {r.get('resourceType')} the record does not use")
        record.append(r)
    return PatientRecord(patient_id, record), optional_missing


# --------------------------------------------------------------------------------------------- cards


def _summary(text: str) -> str:
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1].rstrip() + "…"


def _medication_flag_lines(run: TwinRun) -> list[str]:
    """Pharmacogenomic flags on current medications: every card shows them, with a forecast or without one."""
    if not run.medication_flags:
        return []
    return ["", "**Pharmacogenomic medication safety (CPIC)**", ""] + [
        f"- {html.escape(flag.text())} [{html.escape(flag.source)}]" for flag in run.medication_flags]


def build_cards(run: TwinRun, settings: ServiceSettings, *, optional_missing: Sequence[str] = (),
                draws: int = CARD_DRAWS) -> list[dict[str, Any]]:
    """The card(s) for one twin run (one card; an info card when data are insufficient)."""
    public = settings.public_url.rstrip("/")
    source = {"label": "fhirtwin digital twin", "url": f"{public}/model-card",
              "topic": coding("cardiorenal-risk")}
    link = {"label": "Open the fhirtwin patient page (risks, trajectories, what-ifs)", "url": f"{public}/launch",
            "type": "smart"}
    card_link = {"label": "Model card (HTI-1 decision support source attributes)", "url": f"{public}/model-card",
                 "type": "absolute"}
    if run.plan is None and run.scope is not None and not run.scope.in_scope:
        return [{"uuid": str(uuid.uuid4()), "summary": _summary("fhirtwin: no primary-prevention forecast (out of "
                                                                  "scope)"),
                 "indicator": "info", "source": source, "links": [link, card_link],
                 "detail": f"{html.escape(CONCEPTS[run.scope.code])}. The equations fhirtwin is anchored on (PREVENT, "
                           "KFRE) were derived in people without this condition, so no number is shown."
                           + "\n".join(["", *_medication_flag_lines(run)]),
                 "extension": {EXT_SCOPE_DECISION: coding(run.scope.code)}}]
    if run.plan is None:
        return [{"uuid": str(uuid.uuid4()), "summary": "fhirtwin: not enough data for a cardiorenal risk forecast",
                 "indicator": "info", "source": source, "links": [link, card_link],
                 "detail": "The twin could not be built: " + html.escape(str(run.error)) + "\n\n"
                           "Nothing is imputed; record the missing measurements to get a forecast."
                           + "\n".join(["", *_medication_flag_lines(run)])}]
    forecast = run.plan.baseline
    horizon = f"{run.plan.horizon_years:g}-y"
    r = twin_view.risks(forecast)
    total = r["total_cvd"]
    indicator = twin_view.indicator_for(forecast)
    best = run.plan.options[0] if run.plan.options else None
    summary = (f"{horizon} total CVD risk {100 * total['median']:.0f}% "
               f"(90% {100 * total['p05']:.0f}–{100 * total['p95']:.0f}%)")
    if best is not None and best.arr["median"] > 0:
        summary += f"; best option −{100 * best.arr['median']:.1f} points"
    lines = [f"**{horizon} risk (median, 90 % interval; {draws}-draw ensemble)**", "",
             "| Outcome | Risk |", "|---|---|"]
    lines += [f"| {twin_view.SHOWN_OUTCOMES[o]} | {twin_view.interval_text(v)} |" for o, v in r.items()]
    if forecast.drivers:
        lines += ["", "**Main drivers**", ""]
        for d in twin_view.main_drivers(forecast, 4):
            lines.append(f"- {d.factor} {d.value} (vs {d.reference}): {100 * d.contribution:+.1f} points of "
                         f"{twin_view.SHOWN_OUTCOMES.get(d.outcome, d.outcome).lower()} risk")
    if forecast.scales:
        lines += ["", "**What each scale contributed**", ""]
        lines += [f"- {s.text()}" for s in forecast.scales]
    if run.plan.options:
        lines += ["", "**Guideline-indicated options (ranked by net benefit after harms; ARR on total CVD)**", ""]
        for o in run.plan.options[:3]:
            nnt = f", NNT {o.nnt:.0f}" if o.nnt is not None and o.nnt_interval else ""
            lines.append(f"- {o.scenario.name}: ARR {100 * o.arr['median']:.1f} points "
                         f"(90 % {100 * o.arr['p05']:.1f}–{100 * o.arr['p95']:.1f}){nnt}; net benefit "
                         f"{1000 * o.net_benefit.get('median', 0.0):.0f} per 1,000")
    else:
        lines += ["", f"**{run.plan.notes[0] if run.plan.notes else 'No drug indicated'}**"]
    if run.plan.excluded:
        lines += ["", "Not proposed: " + "; ".join(f"{e.candidate} ({e.reason})" for e in run.plan.excluded[:4])]
    lines += _medication_flag_lines(run)
    caveats = ["not provided: " + ", ".join(optional_missing)] if optional_missing else []
    counts = twin_view.ledger_counts(run.state)
    if counts:
        caveats.append("data-quality ledger: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    caveats += list(forecast.caveats)
    if caveats:
        lines += ["", "**Data quality and caveats**", ""] + [f"- {c}" for c in caveats[:8]]
    lines += ["", twin_view.INDICATOR_TEXT + " A proposal for clinician review, not an order."]
    card: dict[str, Any] = {"uuid": str(uuid.uuid4()), "summary": _summary(summary), "indicator": indicator,
                            "detail": "\n".join(lines), "source": source, "links": [link, card_link]}
    if run.scope is not None:
        card["extension"] = {EXT_SCOPE_DECISION: coding(run.scope.code)}
    if run.plan.options:
        card["suggestions"] = [{
            "label": "Create the draft CarePlan proposal for review",
            "uuid": str(uuid.uuid4()),
            "isRecommended": False,
            "actions": [{"type": "create", "description": "Draft CarePlan (intent proposal) with the ranked options",
                         "resource": Engine().draft_care_plan(run)}],
        }]
        card["selectionBehavior"] = "at-most-one"
    return [card]


# --------------------------------------------------------------------------------------------- routes


@router.get("/cds-services")
def discovery() -> dict[str, Any]:
    """CDS Hooks discovery: one ``patient-view`` service."""
    return {"services": [{
        "hook": HOOK,
        "id": SERVICE_ID,
        "title": "fhirtwin cardiorenal risk",
        "description": ("10-year total CVD, ASCVD, heart failure and kidney failure risk from the patient's "
                        "digital twin, with 90 % intervals, drivers and the best-ranked interventions."),
        "prefetch": {**PREFETCH, CONSENT_KEY: CONSENT_QUERY},
        "usageRequirements": ("Grant patient/*.rs for the prefetched types (Consent included: the patient's "
                              "active Consents are honoured before the record is used), or send complete prefetch."),
    }]}


async def _json_body(service_id: str, request: Request) -> Any:
    """The request's JSON body, or the CDS Hooks error answer for an unknown service, a caller that is not a
    registered CDS client (:meth:`fhirtwin.service.security.Guard.cds_call`) or a non-JSON body. The
    caller's registration is left in ``request.state.cds_client`` (it bounds the ``fhirServer`` allowed)."""
    from starlette.concurrency import run_in_threadpool

    if service_id != SERVICE_ID:
        return error_response(404, "not_found", "no such CDS service")
    try:
        request.state.cds_principal, request.state.cds_client = await run_in_threadpool(
            request.app.state.guard.cds_call, request.headers, service_id)
    except AuthError as exc:
        log.info("CDS call refused: %s", exc.error)
        response = error_response(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message)
        response.headers["WWW-Authenticate"] = exc.www_authenticate()
        return response
    try:
        return await request.json()
    except ValueError:
        return error_response(400, "bad_request", "request body is not JSON")


def consent_check(settings: ServiceSettings, req: HookRequest, trail: Any) -> None:
    """Honour the patient's active Consents before any of the record is used (raises ConsentDenied, audited).

    The Consents come from the ``consents`` prefetch, else from ``fhirServer``; without either the
    service cannot know the patient's choices and answers 412 rather than guess.
    """
    from fhirtwin.consent import ConsentDenied, ConsentPolicy

    patient_id = req.context.patientId
    prefetch = req.prefetch or {}
    if CONSENT_KEY in prefetch:
        consents = _resources_of(CONSENT_KEY, prefetch[CONSENT_KEY])
    elif req.fhirServer is not None:
        client = _fhir_client(settings, req)
        consents = list(client.search_all("Consent", {"patient": patient_id, "status": "active"}, max_pages=5))
    else:
        raise CdsError(412, "precondition_failed", "cannot check the patient's consent: prefetch 'consents' "
                       "or give fhirServer")
    denying = ConsentPolicy(SERVICE_PURPOSE).denying(consents)
    if denying is not None:
        denial = ConsentDenied(SERVICE_PURPOSE, patient_id=patient_id, consent=denying)
        trail.patient_read(patient_id, queries=[render_template(CONSENT_QUERY, req.context)],
                           server=req.fhirServer, error=denial)
        raise denial


def answer_call(request: Request, body: Any, service_id: str) -> JSONResponse:
    """The cards for one call, or its typed error (runs on a worker thread: the engine is CPU-bound)."""
    from fhirtwin.fhir.errors import FhirError, FhirNotFound, FhirUnauthorized

    settings = request.app.state.settings
    try:
        req = parse_request(body, service_id)
        if req.fhirServer is not None and not request.app.state.guard.fhir_server_allowed(
                req.fhirServer, request.state.cds_client):
            raise CdsError(403, "forbidden", "fhirServer is not on this service's allow-list for the client")
        caller = Caller(client_id=request.state.cds_principal.client, user=req.context.userId,
                        network=request.client.host if request.client else None)
        trail = audit_trail(settings).for_caller(caller)
        consent_check(settings, req, trail)
        record, optional_missing = gather_record(settings, req)
        trail.patient_read(req.context.patientId, server=req.fhirServer,
                           queries=[render_template(PREFETCH[k], req.context) for k in PREFETCH
                                    if k not in optional_missing])
        engine = Engine(draws=CARD_DRAWS, horizon_years=settings.horizon_years)
        run = engine.run(req.context.patientId, record=record)
        cards = build_cards(run, settings, optional_missing=optional_missing)
    except CdsError as exc:
        return error_response(exc.status, exc.error, exc.message)
    except PatientNotFound:
        return error_response(412, "precondition_failed", "the patient was not found on fhirServer")
    except UpstreamUnauthorized:
        return error_response(412, "precondition_failed", "fhirServer refused access with the given authorization")
    except UpstreamError as exc:
        log.warning("CDS call failed reading fhirServer: %s", exc.message)
        return error_response(502, "fhir_server_error", "fhirServer could not be read")
    except EngineError as exc:
        error = {403: "forbidden", 503: "unavailable"}.get(exc.http_status,
                                                           "bad_request" if exc.http_status < 500 else "internal_error")
        return error_response(exc.http_status, error, exc.message)
    except FhirUnauthorized:
        return error_response(412, "precondition_failed", "fhirServer refused access with the given authorization")
    except FhirNotFound:
        return error_response(412, "precondition_failed", "the patient was not found on fhirServer")
    except FhirError as exc:
        log.warning("CDS call failed reading fhirServer: %s", type(exc).__name__)
        return error_response(502, "fhir_server_error", "fhirServer could not be read")
    except Exception as exc:  # noqa: BLE001 - never a stack trace to the client
        log.exception("CDS call failed: %s", type(exc).__name__)
        return error_response(500, "internal_error", "the service failed to compute the card")
    return JSONResponse({"cards": cards})


@router.post("/cds-services/{service_id}")
async def call_service(service_id: str, request: Request) -> JSONResponse:
    """Answer a ``patient-view`` call with cards (or a JSON error)."""
    from starlette.concurrency import run_in_threadpool

    body = await _json_body(service_id, request)
    if isinstance(body, JSONResponse):
        return body
    return await run_in_threadpool(answer_call, request, body, service_id)


@router.post("/cds-services/{service_id}/feedback")
async def feedback(service_id: str, request: Request) -> JSONResponse:
    """Store card feedback (accepted/overridden) in the service's store, capped; answers 200 with nothing."""
    body = await _json_body(service_id, request)
    if isinstance(body, JSONResponse):
        return body
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        return error_response(400, "bad_request", "feedback must be a non-empty array")
    if len(items) > FEEDBACK_ITEMS_MAX:
        return error_response(400, "bad_request", f"at most {FEEDBACK_ITEMS_MAX} feedback items per call")
    clean = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("card"), str):
            return error_response(400, "bad_request", f"feedback[{i}].card is required")
        if len(item["card"]) > FEEDBACK_ID_MAX:
            return error_response(400, "bad_request", f"feedback[{i}].card is too long")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            return error_response(400, "bad_request", f"feedback[{i}].outcome must be accepted or overridden")
        accepted = item.get("acceptedSuggestions") if outcome == "accepted" else None
        if outcome == "accepted" and (not isinstance(accepted, list) or not accepted
                                      or not all(isinstance(a, dict) and isinstance(a.get("id"), str)
                                                 for a in accepted)):
            return error_response(400, "bad_request", f"feedback[{i}].acceptedSuggestions[].id is required")
        if not isinstance(item.get("outcomeTimestamp"), str):
            return error_response(400, "bad_request", f"feedback[{i}].outcomeTimestamp is required")
        if (len(item["outcomeTimestamp"]) > FEEDBACK_ID_MAX or len(accepted or []) > FEEDBACK_ITEMS_MAX
                or any(len(a["id"]) > FEEDBACK_ID_MAX for a in accepted or [])
                or len(json.dumps(item.get("overrideReason"))) > FEEDBACK_REASON_MAX):
            return error_response(400, "bad_request", f"feedback[{i}] is too large")
        clean.append({"service": service_id, "card": item["card"], "outcome": outcome,
                      "acceptedSuggestions": [a["id"] for a in accepted or []],
                      "overrideReason": item.get("overrideReason"), "outcomeTimestamp": item["outcomeTimestamp"]})
    from starlette.concurrency import run_in_threadpool

    try:
        await run_in_threadpool(open_store(request.app.state.settings).feedback_add, clean)
    except sqlite3.Error as exc:
        log.warning("CDS feedback not stored: %s", type(exc).__name__)
        return error_response(503, "unavailable", "feedback could not be stored; send it again later")
    return JSONResponse({}, status_code=200)


def stored_feedback(settings: ServiceSettings) -> list[dict[str, Any]]:
    """Feedback received so far, oldest first (persisted; the newest 10,000 items are kept)."""
    return open_store(settings).feedback()

