"""SMART App Launch 2.x (EHR and standalone) and the clinician's patient page.

Why this shape:

* Public client with PKCE S256 and a random ``state`` bound to a server-side session; tokens never leave
  the server (the browser holds only an opaque random session id in an HttpOnly cookie), and neither
  tokens nor codes are logged or rendered. The session id is replaced after the token exchange.
* Scopes are least-privilege SMART v2 (read/search of the record types the twin reads, create of the
  types fhirtwin writes); the granted ``scope`` from the token response is kept and shown.
* ``iss`` must be the service's own FHIR server or listed in ``settings.smart_issuers``: the app
  never follows an arbitrary ``iss`` (it would send the user's authorization to it).
* The page is CSP-friendly: no inline script or style, no external assets; charts are inline SVG drawn
  server side, what-ifs are recomputed on the server (``POST /patient/whatif``, same ensemble seed and
  size as the page, so differences are paired) and "write to chart" sends the proposal with the user's
  token. Both POSTs require the session's CSRF token in ``X-CSRF-Token``.

Settings (:class:`fhirtwin.service.runtime.ServiceSettings`): ``smart_client_id``, ``smart_issuers`` (extra
allowed FHIR bases) and ``frame_ancestors`` (CSP).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fhirtwin.audit import Caller
from fhirtwin.engine import BadRequest, EngineError, Forecast, TwinRun, UpstreamUnauthorized
from fhirtwin.fhir.client import FhirClient
from fhirtwin.jose import b64url, b64url_decode
from fhirtwin.keys import KeyPolicyError
from fhirtwin.service import twin_view
from fhirtwin.service.runtime import ServiceSettings, engine_for
from fhirtwin.service.store import Store, open_store

log = logging.getLogger("fhirtwin.service.smart")

router = APIRouter()

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
STATIC_FILES = {"patient.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}

COOKIE = "fhirtwin_session"
SESSION_TTL_S = 3600
PENDING_TTL_S = 600
# Consent.rs: the patient's active Consents are honoured before the record is read (fhirtwin.consent).
RECORD_SCOPES = ("patient/Patient.rs patient/Observation.rs patient/Condition.rs patient/MedicationRequest.rs "
                 "patient/MedicationStatement.rs patient/MolecularSequence.rs patient/Consent.rs")
# Writing a proposal reads fhirtwin's earlier results (r, s), creates the new ones (c) and tags the ones
# they supersede (u); nothing is ever deleted.
WRITE_SCOPES = "patient/RiskAssessment.crus patient/CarePlan.crus patient/Goal.crus patient/Provenance.c"
EHR_SCOPES = f"launch openid fhirUser {RECORD_SCOPES} {WRITE_SCOPES}"
STANDALONE_SCOPES = f"launch/patient openid fhirUser {RECORD_SCOPES} {WRITE_SCOPES}"


# ------------------------------------------------------------------------------------------------ PKCE


def new_code_verifier() -> str:
    """A PKCE code verifier: 86 characters from the unreserved set (RFC 7636 §4.1 allows 43-128)."""
    return secrets.token_urlsafe(64)


def code_challenge(verifier: str) -> str:
    """The S256 challenge: base64url(SHA-256(ASCII(verifier))), never ``plain``."""
    if not 43 <= len(verifier) <= 128:
        raise ValueError("a PKCE code verifier has 43 to 128 characters")
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_state() -> str:
    """An OAuth ``state`` with 256 bits of entropy (SMART asks for at least 122)."""
    return secrets.token_urlsafe(32)


def state_matches(expected: str | None, received: str | None) -> bool:
    """Constant-time comparison of the returned ``state`` with the one sent."""
    if not expected or not received:
        return False
    return hmac.compare_digest(expected.encode(), received.encode())


# --------------------------------------------------------------------------------------------- sessions


@dataclass
class Session:
    """One browser's launch: pending authorization, then the token and the cached twin run."""

    id: str
    created: float = field(default_factory=time.time)
    iss: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    verifier: str | None = None
    pending_since: float = 0.0
    token: dict[str, Any] | None = None
    patient: str | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    cache: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:  # never print tokens
        return f"Session(patient={'set' if self.patient else 'none'}, authorized={self.token is not None})"


#: The fields a session keeps in the service's store (the twin-run cache and the lock stay in the process).
PERSISTED_FIELDS = ("iss", "config", "state", "verifier", "pending_since", "token", "patient", "csrf")


class SessionStore:
    """Server-side sessions keyed by an opaque random id, kept in the service's store
    (:mod:`fhirtwin.service.store`) so a restart or another process sharing the store keeps users logged in.
    The stored rows hold access tokens: the store file is private to the service's user (0600)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._live: dict[str, Session] = {}  # this process's objects, for their cache of the twin run
        self._lock = threading.Lock()

    def create(self) -> Session:
        """A fresh session with a new random id."""
        session = Session(id=secrets.token_urlsafe(32))
        self.store.session_purge(time.time() - SESSION_TTL_S)
        self.save(session)
        with self._lock:
            self._purge()
            self._live[session.id] = session
        return session

    def save(self, session: Session) -> None:
        """Persist a session's fields after a change (state used up, token received)."""
        self.store.session_put(session.id, session.created, {name: getattr(session, name) for name in PERSISTED_FIELDS})

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value, if any."""
        if not session_id:
            return None
        row = self.store.session_get(session_id)
        if row is None or time.time() - row[0] > SESSION_TTL_S:
            if row is not None:
                self.store.session_delete(session_id)
            with self._lock:
                self._live.pop(session_id, None)
            return None
        created, data = row
        with self._lock:
            session = self._live.get(session_id)
            if session is None:
                session = self._live[session_id] = Session(id=session_id)
        session.created = created
        for name in PERSISTED_FIELDS:
            if name in data:
                setattr(session, name, data[name])
        return session

    def rotate(self, session: Session) -> Session:
        """Give the session a new id (after login: defeats session fixation)."""
        old_id = session.id
        session.id = secrets.token_urlsafe(32)
        session.created = time.time()
        with self.store.transaction():
            self.store.session_delete(old_id)
            self.save(session)
        with self._lock:
            self._live.pop(old_id, None)
            self._live[session.id] = session
        return session

    def _purge(self) -> None:
        now = time.time()
        for sid in [s for s, v in self._live.items() if now - v.created > SESSION_TTL_S]:
            del self._live[sid]


def sessions(request: Request) -> SessionStore:
    """The app's session store (created on first use)."""
    store = getattr(request.app.state, "smart_sessions", None)
    if store is None:
        store = request.app.state.smart_sessions = SessionStore(open_store(request.app.state.settings))
    return store


def _set_cookie(response: Response, request: Request, session: Session) -> None:
    secure = request.app.state.settings.public_url.startswith("https://")
    response.set_cookie(COOKIE, session.id, max_age=SESSION_TTL_S, httponly=True, samesite="lax", secure=secure,
                        path="/")


def _security_headers(response: Response, request: Request) -> Response:
    ancestors = request.app.state.settings.frame_ancestors
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def error_page(request: Request, status: int, title: str, message: str) -> Response:
    """A plain error page (the message never contains tokens, codes or record values)."""
    response = templates.TemplateResponse(request, "error.html", {"title": title, "message": message},
                                          status_code=status)
    return _security_headers(response, request)


# ----------------------------------------------------------------------------------------------- launch


def allowed_issuer(settings: ServiceSettings, iss: str) -> bool:
    """Only the configured FHIR server and explicitly listed issuers may start a launch."""
    allowed = {settings.fhir_server, *settings.smart_issuers, *settings.auth.fhir_servers}
    return iss.rstrip("/") in {a.rstrip("/") for a in allowed}


def client_id(settings: ServiceSettings) -> str:
    """The SMART client id registered for this deployment."""
    return settings.smart_client_id


def redirect_uri(settings: ServiceSettings) -> str:
    """The registered redirect URI: ``{public_url}/callback``."""
    return f"{settings.public_url.rstrip('/')}/callback"


def authorize_url(config: dict[str, Any], *, settings: ServiceSettings, iss: str, state: str, verifier: str,
                  launch: str | None) -> str:
    """The authorization request URL (EHR launch with ``launch``, standalone without)."""
    params = {
        "response_type": "code",
        "client_id": client_id(settings),
        "redirect_uri": redirect_uri(settings),
        "scope": EHR_SCOPES if launch else STANDALONE_SCOPES,
        "state": state,
        "aud": iss,
        "code_challenge": code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    if launch:
        params["launch"] = launch
    return f"{config['authorization_endpoint']}?{urlencode(params)}"


@router.get("/launch")
def launch(request: Request, iss: str | None = None, launch: str | None = None) -> Response:
    """EHR launch (``iss`` + ``launch``) or standalone launch (``iss`` or none: the configured server)."""
    from fhirtwin.fhir.auth import discover_smart_configuration
    from fhirtwin.fhir.errors import FhirError

    settings = request.app.state.settings
    iss = (iss or settings.fhir_server).rstrip("/")
    if not iss.startswith(("https://", "http://")) or not allowed_issuer(settings, iss):
        return error_page(request, 400, "Launch refused", "The launching FHIR server (iss) is not registered here.")
    try:
        config = discover_smart_configuration(iss, verify=settings.verify_tls)
    except FhirError:
        return error_page(request, 502, "Launch failed", "The FHIR server's SMART configuration is not available.")
    if not isinstance(config.get("authorization_endpoint"), str):
        return error_page(request, 502, "Launch failed", "The SMART configuration has no authorization endpoint.")
    if "S256" not in (config.get("code_challenge_methods_supported") or []):
        return error_page(request, 502, "Launch failed", "The authorization server does not support PKCE S256.")
    store = sessions(request)
    session = store.create()
    session.iss, session.config = iss, config
    session.state, session.verifier, session.pending_since = new_state(), new_code_verifier(), time.time()
    store.save(session)
    url = authorize_url(config, settings=settings, iss=iss, state=session.state, verifier=session.verifier,
                        launch=launch)
    response = RedirectResponse(url, status_code=302)
    _set_cookie(response, request, session)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    log.info("SMART launch started (%s)", "ehr" if launch else "standalone")
    return response


@router.get("/callback")
def callback(request: Request, code: str | None = None, state: str | None = None, error: str | None = None) -> Response:
    """Authorization response: check ``state``, exchange the code (PKCE verifier), keep the token server side."""
    settings = request.app.state.settings
    store = sessions(request)
    session = store.get(request.cookies.get(COOKIE))
    if session is None or session.state is None:
        return error_page(request, 400, "No launch in progress", "Start again from the EHR or the launch page.")
    expected, verifier = session.state, session.verifier
    session.state = session.verifier = None  # one answer per authorization request
    store.save(session)
    if not state_matches(expected, state):
        log.warning("SMART callback rejected: state mismatch")
        return error_page(request, 400, "Launch rejected", "The authorization response does not match this launch "
                          "(state mismatch).")
    if time.time() - session.pending_since > PENDING_TTL_S:
        return error_page(request, 400, "Launch expired", "The authorization took too long; start again.")
    if error or not code:
        reason = error if error and error.replace("_", "").isalnum() else "no code"
        return error_page(request, 400, "Authorization refused", f"The authorization server answered: {reason}.")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri(settings),
            "code_verifier": verifier, "client_id": client_id(settings)}
    try:
        answer = requests.post(session.config["token_endpoint"], data=form, headers={"Accept": "application/json"},
                               timeout=(5, 30), verify=settings.verify_tls)
    except requests.RequestException:
        return error_page(request, 502, "Token exchange failed", "The authorization server could not be reached.")
    try:
        token = answer.json()
    except ValueError:
        token = {}
    if answer.status_code != 200 or not isinstance(token, dict) or not token.get("access_token"):
        oauth_error = token.get("error") if isinstance(token, dict) else None
        reason = oauth_error if isinstance(oauth_error, str) and oauth_error.replace("_", "").isalnum() else "error"
        log.warning("SMART token exchange failed: HTTP %s %s", answer.status_code, reason)
        return error_page(request, 502, "Token exchange failed", f"The authorization server answered: {reason}.")
    if str(token.get("token_type", "")).lower() != "bearer" or not isinstance(token.get("patient"), str):
        return error_page(request, 502, "Launch incomplete", "The token response has no bearer token or no patient "
                          "in context.")
    session.token = {k: token[k] for k in ("access_token", "token_type", "expires_in", "scope", "patient",
                                            "need_patient_banner") if k in token}
    session.token["received"] = time.time()
    session.patient = token["patient"]
    session.cache.clear()
    store.rotate(session)
    response = RedirectResponse("/patient", status_code=303)
    _set_cookie(response, request, session)
    response.headers["Referrer-Policy"] = "no-referrer"
    log.info("SMART launch authorized")
    return response


# ------------------------------------------------------------------------------------------ patient page


def _authorized(request: Request) -> Session | None:
    session = sessions(request).get(request.cookies.get(COOKIE))
    if session is None or session.token is None or not session.patient:
        return None
    expires = session.token.get("expires_in")
    if isinstance(expires, int | float) and time.time() > session.token["received"] + expires:
        return None
    return session


def _client(settings: ServiceSettings, session: Session) -> FhirClient:
    from fhirtwin.fhir.auth import BearerToken

    assert session.token is not None
    return FhirClient(session.iss, auth=BearerToken(session.token["access_token"]), verify=settings.verify_tls,
                      timeout=(5, 60), max_retries=2)


def session_caller(settings: ServiceSettings, session: Session) -> Caller:
    """The audit agent of a SMART session: this app's client id and the user the id_token names
    (``fhirUser``). The id_token came straight from the token endpoint over TLS, which OpenID Connect Core
    §3.1.3.7 accepts in place of checking its signature; it only names the user in the audit trail."""
    user = None
    id_token = (session.token or {}).get("id_token")
    if isinstance(id_token, str) and id_token.count(".") == 2:
        try:
            claims = json.loads(b64url_decode(id_token.split(".")[1]))
        except (ValueError, UnicodeDecodeError):
            claims = {}
        value = claims.get("fhirUser") if isinstance(claims, dict) else None
        user = value[:200] if isinstance(value, str) else None
    return Caller(client_id=settings.smart_client_id, user=user)


def twin_for(settings: ServiceSettings, session: Session) -> dict[str, Any]:
    """The session's twin run and eligible interventions (computed once per session, same seed and draws
    as a write, so the page shows the numbers a write stores)."""
    with session.lock:
        if "run" not in session.cache:
            if not session.patient:
                raise BadRequest("no patient in the launch context")
            engine = engine_for(settings, client=_client(settings, session), signed=False,
                                caller=session_caller(settings, session))
            run = engine.run(session.patient)
            session.cache["run"] = run
            session.cache["eligible"] = engine.eligible(run)
            session.cache["engine"] = engine
        return session.cache


def _charts(forecasts: list[tuple[str, Forecast]]) -> dict[str, str]:
    charts = {f"chart-risk-{o}": twin_view.risk_chart(forecasts, o) for o in twin_view.SHOWN_OUTCOMES
              if o in forecasts[0][1].cif}
    for variable in twin_view.SHOWN_TRAJECTORIES:
        svg = twin_view.trajectory_chart(forecasts, variable)
        if svg is not None:
            charts[f"chart-traj-{variable}"] = svg
    return charts


@router.get("/patient")
def patient_page(request: Request) -> Response:
    """Risks with 90 % intervals, trajectories, what-if toggles, the ledger and "write to chart"."""
    settings = request.app.state.settings
    session = _authorized(request)
    if session is None:
        return error_page(request, 401, "Not signed in", "Open this page through a SMART launch from the EHR.")
    try:
        cache = twin_for(settings, session)
    except UpstreamUnauthorized:
        return error_page(request, 403, "Access refused", "The FHIR server refused the record read for this token.")
    except EngineError as exc:
        if exc.http_status < 500:
            return error_page(request, exc.http_status, "Record not available", exc.message)
        return error_page(request, 502, "FHIR server error", "The patient's record could not be read.")
    run: TwinRun = cache["run"]
    context: dict[str, Any] = {
        "patient_id": session.patient, "csrf": session.csrf, "run": run, "error": run.error,
        "granted_scope": (session.token or {}).get("scope", ""),
        "ledger": twin_view.ledger_lines(run.state), "ledger_counts": twin_view.ledger_counts(run.state),
        "reference_date": run.state.reference_date, "outcomes": twin_view.SHOWN_OUTCOMES,
    }
    if run.plan is not None:
        forecast = run.plan.baseline
        context.update({
            "horizon": f"{run.plan.horizon_years:g}", "draws": forecast.draws,
            "risks": twin_view.risks(forecast), "charts": _charts([("current care", forecast)]),
            "eligible": cache["eligible"], "options": run.plan.options[:6], "excluded": run.plan.excluded,
            "notes": run.plan.notes, "caveats": forecast.caveats,
            "drivers": twin_view.main_drivers(forecast, 6), "scales": forecast.scales,
            "indicator": twin_view.indicator_for(forecast),
        })
    response = templates.TemplateResponse(request, "patient.html", context)
    return _security_headers(response, request)


def _check_csrf(request: Request, session: Session) -> bool:
    sent = request.headers.get("x-csrf-token", "")
    return bool(sent) and hmac.compare_digest(sent.encode(), session.csrf.encode())


def _session_for_post(request: Request) -> Any:
    """The signed-in session of a state-changing call, or the 401/403 answer (no session, bad CSRF)."""
    session = _authorized(request)
    if session is None:
        return JSONResponse({"error": "not signed in"}, status_code=401)
    if not _check_csrf(request, session):
        return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
    return session


@router.post("/patient/whatif")
async def whatif(request: Request) -> JSONResponse:
    """Risks and charts for a chosen set of eligible interventions (indices into the page's list)."""
    from starlette.concurrency import run_in_threadpool

    session = _session_for_post(request)
    if isinstance(session, JSONResponse):
        return session
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "body must be JSON"}, status_code=400)
    chosen = body.get("interventions") if isinstance(body, dict) else None
    if not isinstance(chosen, list) or not all(isinstance(i, int) for i in chosen):
        return JSONResponse({"error": "interventions must be a list of integers"}, status_code=400)
    return await run_in_threadpool(_whatif, request.app.state.settings, session, chosen)


def _whatif(settings: ServiceSettings, session: Session, chosen: list[int]) -> JSONResponse:
    cache = twin_for(settings, session)
    run: TwinRun = cache["run"]
    if run.plan is None:
        return JSONResponse({"error": "no forecast for this patient"}, status_code=409)
    eligible = cache["eligible"]
    if any(not 0 <= i < len(eligible) for i in chosen):
        return JSONResponse({"error": "unknown intervention"}, status_code=400)
    picked = [eligible[i] for i in sorted(set(chosen))]
    try:
        what_if = cache["engine"].what_if(run, picked)
    except BadRequest as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    forecast = what_if.forecast
    arr = {o: v for o, v in what_if.arr.items() if o in twin_view.SHOWN_OUTCOMES}
    series = [("current care", run.plan.baseline)] + ([("with selection", forecast)] if picked else [])
    return JSONResponse({
        "scenario": forecast.scenario.name,
        "interventions": [p.label for p in picked],
        "risks": twin_view.risks(forecast),
        "risks_text": {o: twin_view.interval_text(v) for o, v in twin_view.risks(forecast).items()},
        "arr": arr,
        "charts": _charts(series),
    })


def write_run(settings: ServiceSettings, session: Session) -> dict[str, Any]:
    """Write the proposal with the user's token through the engine (same draws and seed as the page, so the
    written numbers are the ones shown); answers status, created count and the Provenance."""
    if not session.patient:
        return {"status": "failed", "http_status": 400, "message": "no patient in the launch context"}
    try:
        # the user's token covers the patient's results only; fhirtwin's Devices are registered beforehand
        engine = engine_for(settings, client=_client(settings, session), caller=session_caller(settings, session))
        simulation = engine.simulate_patient(session.patient, write=True, include_device=False)
    except KeyPolicyError:
        return {"status": "failed", "http_status": 409,
                "message": "no signing key is configured for this EHR's FHIR server"}
    except EngineError as exc:
        return {"status": "failed", "http_status": 502 if exc.http_status >= 500 else exc.http_status,
                "message": exc.message}
    commit = simulation.commit
    created = commit.created if commit else 0
    return {"status": "written" if created else "unchanged", "created": created,
            "provenance": commit.provenance if commit else None}


@router.post("/patient/write")
async def write_to_chart(request: Request) -> JSONResponse:
    """Send the proposal to the EHR's FHIR server as the signed-in user; answers what was written."""
    from starlette.concurrency import run_in_threadpool

    session = _session_for_post(request)
    if isinstance(session, JSONResponse):
        return session
    settings = request.app.state.settings

    def work() -> JSONResponse:
        run = twin_for(settings, session)["run"]
        if run.plan is None:
            return JSONResponse({"status": "skipped", "message": "no forecast to write"}, status_code=409)
        body = write_run(settings, session)
        log.info("write to chart: %s", body["status"])
        return JSONResponse(body, status_code=body.pop("http_status", 200))

    return await run_in_threadpool(work)


@router.get("/static/fhirtwin/{name}")
def static_file(name: str) -> Response:
    """The page's script and stylesheet (served here: no CDN, CSP ``'self'``)."""
    if name not in STATIC_FILES:
        return Response(status_code=404)
    return Response((TEMPLATE_DIR / name).read_bytes(), media_type=STATIC_FILES[name],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
