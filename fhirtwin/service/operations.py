"""The FHIR operation ``Patient/[id]/$simulate`` for integration engines.

Why an operation: an interface engine speaks FHIR, so it posts a ``Parameters`` resource and gets FHIR
back. As the OperationDefinition in ``profiles/operations`` declares a single out-parameter ``return`` of
type Bundle, the response body *is* that Bundle: the transaction Bundle that would be sent (``write=false``,
nothing is written) or the server's transaction-response Bundle (``write=true``). Errors are
OperationOutcomes: 400 bad Parameters, 404 unknown patient, 422 insufficient data (names what is missing),
502/504 FHIR server failure or timeout, 500 anything else — never a stack trace.

``GET`` with query parameters (``scenario``, ``horizon``) is the read-only convenience form (``write``
must be false there, as GET must not change state).

Every call needs a bearer token (:mod:`fhirtwin.service.security`): ``system/Patient.r`` to read, plus
``RiskAssessment.cu``, ``CarePlan.cu`` and ``Provenance.c`` to write. A POST body must be JSON (415
otherwise, so a cross-site form cannot post one). Horizons are whole years from 5 to 30: each horizon is a
distinct set of results, so a caller cannot multiply a patient's resources with fractional horizons.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fhirtwin.engine import BadRequest, EngineError, operation_outcome
from fhirtwin.service.runtime import caller_of, engine_for, ensure_json_logging, log_event, patient_hash
from fhirtwin.service.security import READ_SCOPES, WRITE_SCOPES, AuthError, Principal

router = APIRouter()


class UnsupportedMediaType(BadRequest):
    """A $simulate POST whose body is not declared JSON (415)."""

    http_status = 415

    def __init__(self) -> None:
        super().__init__("the body must be a Parameters resource as application/fhir+json or application/json")

FHIR_JSON = "application/fhir+json"
PARAMETER_NAMES = ("write", "scenario", "horizon")
_YEARS_PER_UNIT = {"a": 1.0, "year": 1.0, "years": 1.0, "mo": 1 / 12, "month": 1 / 12, "months": 1 / 12,
                   "wk": 7 / 365.25, "week": 7 / 365.25, "weeks": 7 / 365.25, "d": 1 / 365.25, "day": 1 / 365.25,
                   "days": 1 / 365.25}
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def fhir_response(body: dict[str, Any], status: int = 200) -> JSONResponse:
    """A JSON response with the FHIR media type."""
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def error_response(exc: EngineError) -> JSONResponse:
    """The OperationOutcome response for an engine error."""
    return fhir_response(exc.outcome(), exc.http_status)


def auth_error_response(exc: AuthError) -> JSONResponse:
    """401/403 as an OperationOutcome (code ``login``/``forbidden``) with the RFC 6750 challenge."""
    code = "login" if exc.status == 401 else "forbidden"
    response = fhir_response(operation_outcome(exc.message, code=code), exc.status)
    response.headers["WWW-Authenticate"] = exc.www_authenticate()
    return response


def whole_years(years: float, where: list[str]) -> int:
    """A horizon as whole years (BadRequest otherwise); the engine checks the 5-30 range."""
    if not math.isfinite(years) or abs(years - round(years)) > 1e-9:
        raise BadRequest("horizon must be a whole number of years (5 to 30)", expression=where)
    return int(round(years))


def _years_from_duration(value: Any) -> float:
    if not isinstance(value, dict) or not isinstance(value.get("value"), int | float):
        raise BadRequest("horizon valueDuration needs a numeric value", expression=["horizon"])
    unit = str(value.get("code") or value.get("unit") or "a").lower()
    if unit not in _YEARS_PER_UNIT:
        raise BadRequest("horizon valueDuration unit must be a, mo, wk or d (UCUM)", expression=["horizon"])
    return float(value["value"]) * _YEARS_PER_UNIT[unit]


def parse_parameters(body: Any) -> dict[str, Any]:
    """``{write, scenario, horizon_years}`` from a $simulate ``Parameters`` resource (raises BadRequest).

    ``write`` is valueBoolean (default true); ``scenario`` valueString or valueCode; ``horizon``
    valueDecimal or valueInteger (years) or valueDuration (a, mo, wk, d). Unknown or repeated parameters
    are refused, so that a misspelt ``wirte=false`` never writes.
    """
    out: dict[str, Any] = {"write": True, "scenario": None, "horizon_years": None}
    if body is None:
        return out
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the request body must be a FHIR Parameters resource")
    params = body.get("parameter", [])
    if not isinstance(params, list):
        raise BadRequest("Parameters.parameter must be an array")
    seen: set[str] = set()
    for i, param in enumerate(params):
        where = [f"Parameters.parameter[{i}]"]
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise BadRequest("every parameter needs a name", expression=where)
        name = param["name"]
        if name not in PARAMETER_NAMES:
            raise BadRequest(f"unknown parameter {name!r}; $simulate takes write, scenario, horizon",
                             expression=where)
        if name in seen:
            raise BadRequest(f"parameter {name!r} given more than once", expression=where)
        seen.add(name)
        values = {k: v for k, v in param.items() if k.startswith("value")}
        if len(values) != 1:
            raise BadRequest(f"parameter {name!r} needs exactly one value[x]", expression=where)
        (kind, value), = values.items()
        if name == "write":
            if kind != "valueBoolean" or not isinstance(value, bool):
                raise BadRequest("write must be a valueBoolean", expression=where)
            out["write"] = value
        elif name == "scenario":
            if kind not in ("valueString", "valueCode") or not isinstance(value, str) or not value.strip():
                raise BadRequest("scenario must be a non-empty valueString", expression=where)
            out["scenario"] = value.strip()
        else:
            if kind in ("valueDecimal", "valueInteger") and isinstance(value, int | float) \
                    and not isinstance(value, bool):
                years = float(value)
            elif kind == "valueDuration":
                years = _years_from_duration(value)
            else:
                raise BadRequest("horizon must be a valueDecimal or valueInteger (years) or a valueDuration",
                                 expression=where)
            out["horizon_years"] = whole_years(years, where)
    return out


def parse_query(query: dict[str, str]) -> dict[str, Any]:
    """The GET form: ``write`` (only false), ``scenario``, ``horizon`` (years) from the query string."""
    unknown = sorted(set(query) - set(PARAMETER_NAMES) - {"_format"})
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")
    write = query.get("write", "false").lower()
    if write not in ("false", "true"):
        raise BadRequest("write must be true or false", expression=["write"])
    if write == "true":
        raise BadRequest("GET never writes; POST a Parameters resource with write=true", expression=["write"])
    out: dict[str, Any] = {"write": False, "scenario": query.get("scenario") or None, "horizon_years": None}
    if "horizon" in query:
        try:
            years = float(query["horizon"])
        except ValueError as exc:
            raise BadRequest("horizon must be a number of years", expression=["horizon"]) from exc
        out["horizon_years"] = whole_years(years, ["horizon"])
    return out


def _run(request: Request, patient_id: str, options: dict[str, Any], principal: Principal) -> JSONResponse:
    settings = request.app.state.settings
    if not _ID.match(patient_id):
        raise BadRequest("invalid patient id (FHIR ids are 1-64 characters A-Z a-z 0-9 - .)")
    caller = caller_of(principal, request.client.host if request.client else None)
    simulation = engine_for(settings, caller=caller).simulate_patient(patient_id, write=options["write"],
                                                       scenario=options["scenario"],
                                                       horizon_years=options["horizon_years"])
    commit = simulation.commit
    log_event("simulate", patient=patient_hash(patient_id), write=options["write"],
              created=commit.created if commit else 0, superseded=len(simulation.write.superseded),
              reinstated=len(commit.reinstated) if commit else 0,
              scenarios=len(simulation.run.plan.options) if simulation.run.plan else 0,
              duration_ms=simulation.duration_ms)
    return fhir_response(commit.response if commit is not None else simulation.bundle)


def _guarded(request: Request, patient_id: str, method: str, parse: Any) -> JSONResponse:
    ensure_json_logging()
    try:
        principal = request.app.state.guard.bearer(request.headers, READ_SCOPES)  # who, before anything is parsed
        options = parse()
        if options["write"]:
            principal = request.app.state.guard.bearer(request.headers, WRITE_SCOPES)
        return _run(request, patient_id, options, principal)
    except AuthError as exc:
        log_event("simulate_refused", method=method, status=exc.status, error=exc.error)
        return auth_error_response(exc)
    except EngineError as exc:
        log_event("simulate_failed", method=method, status=exc.http_status, error=type(exc).__name__)
        return error_response(exc)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is an OperationOutcome, never a trace
        log_event("simulate_failed", method=method, status=500, error=type(exc).__name__)
        return fhir_response(operation_outcome("internal error while simulating", code="exception"), 500)


@router.post("/fhir/Patient/{patient_id}/$simulate")
async def simulate_post(patient_id: str, request: Request) -> JSONResponse:
    """Run the twin for one patient; the body is a ``Parameters`` resource (may be empty)."""
    raw = await request.body()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()

    def parse() -> dict[str, Any]:
        if media not in (FHIR_JSON, "application/json"):
            raise UnsupportedMediaType()
        if not raw.strip():
            return parse_parameters(None)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("the request body is not JSON") from exc
        return parse_parameters(body)

    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_guarded, request, patient_id, "POST", parse)


@router.get("/fhir/Patient/{patient_id}/$simulate")
def simulate_get(patient_id: str, request: Request) -> JSONResponse:
    """Read-only what-if: the Bundle that a write would send; nothing is written."""
    return _guarded(request, patient_id, "GET", lambda: parse_query(dict(request.query_params)))
