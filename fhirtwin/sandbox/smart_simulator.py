"""A SMART App Launch authorization-server SIMULATOR for tests — never for production.

Why: the SMART launch of fhirtwin's patient page must be tested end to end (discovery, authorize with
PKCE S256 and state, token with launch context, bearer-protected FHIR calls) without an EHR. This small
FastAPI app plays the EHR: it *is* the ``iss`` (``{sim}/fhir``) and reverse-proxies ``/fhir/*`` to the
local HAPI sandbox after checking the bearer token it issued.

What it does:

* ``GET {sim}/fhir/.well-known/smart-configuration`` — discovery (S256 only, never ``plain``).
* ``POST {sim}/launch-context`` with ``{"patient": "<id>"}`` — issues an opaque ``launch`` value, as an EHR
  does before opening the app's launch URL (``GET {sim}/launch-context?patient=<id>`` works too).
* ``GET {sim}/authorize`` — auto-approves (no login page, no consent): checks ``response_type=code``, the
  registered ``client_id`` and exact ``redirect_uri``, ``aud`` = its FHIR base, ``code_challenge_method=S256``
  and a ``code_challenge``; takes the patient from the ``launch`` it issued (EHR launch) or, for a standalone
  launch with ``launch/patient``, from ``patient=`` or the configured default patient; redirects with
  ``code`` and the unchanged ``state``.
* ``POST {sim}/token`` — ``authorization_code`` grant: the code (single use, 2 minutes), ``client_id``,
  ``redirect_uri`` and the PKCE S256 check of ``code_verifier``; answers ``access_token``, ``token_type``,
  ``expires_in``, ``scope`` (as requested), ``patient``, ``need_patient_banner`` and, with ``openid``, an
  RS256 ``id_token`` signed by a key generated at start (JWKS at ``{sim}/jwks``), with ``no-store`` headers.
* ``{sim}/fhir/*`` — any method, proxied to the upstream FHIR base when the bearer token is valid (401
  otherwise); upstream base URLs in responses are rewritten to ``{sim}/fhir``. Scopes are NOT enforced and
  the patient compartment is NOT checked: tests of the app, not of an authorization server.

Not acceptable for real use: in-memory state, auto-approval, no user authentication, no scope
enforcement, no TLS, a throw-away signing key. An unsigned or HS256 ``id_token`` would not be acceptable
for real use either (a client cannot verify it against the issuer's published keys).

Tests start it with uvicorn on a free loopback port (see ``run_in_thread``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fhirtwin.jose import b64url, compact_jws, public_jwk

CODE_LIFETIME_S = 120
TOKEN_LIFETIME_S = 3600
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "upgrade",
               "proxy-authenticate", "proxy-authorization", "te", "trailer", "host", "authorization"}


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge of a verifier (RFC 7636 §4.2)."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass
class SimulatorState:
    """Everything the simulator remembers (in memory)."""

    launches: dict[str, dict[str, Any]] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxied: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_simulator(
    upstream_fhir: str,
    public_url: str,
    *,
    client_id: str = "fhirtwin",
    redirect_uris: tuple[str, ...] = (),
    default_patient: str | None = None,
) -> FastAPI:
    """The simulator app. ``public_url`` is where it is reached (its FHIR base is ``{public_url}/fhir``)."""
    upstream = upstream_fhir.rstrip("/")
    public = public_url.rstrip("/")
    fhir_base = f"{public}/fhir"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = secrets.token_hex(8)
    state = SimulatorState()
    http = requests.Session()
    app = FastAPI(title="SMART simulator (tests only)", docs_url=None, redoc_url=None)
    app.state.sim = state

    def oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": error, "error_description": description}, status_code=status,
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def id_token(subject: str, nonce_claims: dict[str, Any]) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": kid}
        claims = {"iss": fhir_base, "sub": subject, "aud": client_id, "iat": now, "exp": now + 300,
                  "fhirUser": f"{fhir_base}/Practitioner/{subject}", **nonce_claims}
        return compact_jws(header, claims, key)

    @app.get("/fhir/.well-known/smart-configuration")
    def smart_configuration() -> JSONResponse:
        return JSONResponse({
            "issuer": fhir_base,
            "jwks_uri": f"{public}/jwks",
            "authorization_endpoint": f"{public}/authorize",
            "token_endpoint": f"{public}/token",
            "grant_types_supported": ["authorization_code"],
            "token_endpoint_auth_methods_supported": ["none"],
            "response_types_supported": ["code"],
            "scopes_supported": ["openid", "fhirUser", "launch", "launch/patient", "patient/*.cruds"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": ["launch-ehr", "launch-standalone", "client-public", "sso-openid-connect",
                             "context-ehr-patient", "context-standalone-patient", "permission-patient",
                             "permission-v2"],
        })

    @app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return {"keys": [{**public_jwk(key), "kid": kid, "alg": "RS256", "use": "sig"}]}

    def new_launch(patient: str) -> dict[str, str]:
        launch = secrets.token_urlsafe(16)
        with state.lock:
            state.launches[launch] = {"patient": patient}
        return {"launch": launch, "iss": fhir_base}

    @app.post("/launch-context")
    async def launch_context_post(request: Request) -> JSONResponse:
        body = await request.json()
        patient = body.get("patient") if isinstance(body, dict) else None
        if not isinstance(patient, str) or not patient:
            return JSONResponse({"error": "patient is required"}, status_code=400)
        return JSONResponse(new_launch(patient))

    @app.get("/launch-context")
    def launch_context_get(patient: str) -> JSONResponse:
        return JSONResponse(new_launch(patient))

    @app.get("/authorize")
    def authorize(request: Request) -> Response:
        q = request.query_params
        if q.get("client_id") != client_id:
            return PlainTextResponse("unknown client_id", status_code=400)
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uris and redirect_uri not in redirect_uris:
            return PlainTextResponse("redirect_uri is not registered for this client", status_code=400)
        if not redirect_uri.startswith(("http://", "https://")):
            return PlainTextResponse("redirect_uri is required", status_code=400)

        def fail(error: str, description: str) -> RedirectResponse:
            params = {"error": error, "error_description": description}
            if q.get("state"):
                params["state"] = q["state"]
            return RedirectResponse(f"{redirect_uri}?{urlencode(params)}", status_code=302)

        if q.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
        if q.get("aud", "").rstrip("/") != fhir_base:
            return fail("invalid_request", "aud must be this server's FHIR base URL")
        if not q.get("state"):
            return fail("invalid_request", "state is required")
        scopes = q.get("scope", "").split()
        patient: str | None = None
        if "launch" in scopes:
            with state.lock:
                context = state.launches.get(q.get("launch", ""))
            if context is None:
                return fail("invalid_request", "unknown launch value")
            patient = context["patient"]
        elif "launch/patient" in scopes:
            patient = q.get("patient") or default_patient
            if not patient:
                return fail("invalid_request", "no patient to select for launch/patient")
        code = secrets.token_urlsafe(24)
        with state.lock:
            state.codes[code] = {"client_id": client_id, "redirect_uri": redirect_uri,
                                 "challenge": q["code_challenge"], "scope": " ".join(scopes), "patient": patient,
                                 "expires": time.time() + CODE_LIFETIME_S}
        return RedirectResponse(f"{redirect_uri}?{urlencode({'code': code, 'state': q['state']})}", status_code=302)

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        # parsed here (python-multipart is not a dependency): application/x-www-form-urlencoded only
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return oauth_error("invalid_request", "the token request must be application/x-www-form-urlencoded")
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("ascii", "replace")).items()}
        if form.get("grant_type") != "authorization_code":
            return oauth_error("unsupported_grant_type", "only authorization_code is supported")
        with state.lock:
            grant = state.codes.pop(str(form.get("code", "")), None)  # single use, even when it fails
        if grant is None or grant["expires"] < time.time():
            return oauth_error("invalid_grant", "unknown, used or expired code")
        if form.get("client_id") != grant["client_id"]:
            return oauth_error("invalid_client", "client_id does not match the code", 401)
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return oauth_error("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = str(form.get("code_verifier", ""))
        if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(s256(verifier), grant["challenge"]):
            return oauth_error("invalid_grant", "code_verifier does not match the code_challenge (S256)")
        access_token = secrets.token_urlsafe(32)
        with state.lock:
            state.tokens[access_token] = {"patient": grant["patient"], "scope": grant["scope"],
                                          "expires": time.time() + TOKEN_LIFETIME_S}
        body: dict[str, Any] = {"access_token": access_token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S,
                                "scope": grant["scope"], "need_patient_banner": True}
        if grant["patient"]:
            body["patient"] = grant["patient"]
        if "openid" in grant["scope"].split():
            body["id_token"] = id_token("sim-practitioner", {})
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    @app.api_route("/fhir", methods=["GET", "POST"])
    async def proxy_base(request: Request) -> Response:
        return await proxy("", request)

    @app.api_route("/fhir/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(path: str, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        token_value = auth[7:] if auth.lower().startswith("bearer ") else ""
        with state.lock:
            grant = state.tokens.get(token_value)
            valid = grant is not None and grant["expires"] > time.time()
            if valid:
                state.proxied += 1
            else:
                state.refused += 1
        if not valid:
            return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "login", "diagnostics": "missing or invalid bearer token"}]},
                status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = (f"{upstream}/{path}" if path else upstream) + (f"?{request.url.query}" if request.url.query else "")
        upstream_response = await run_in_threadpool(http.request, request.method, url, headers=headers, data=body,
                                                    timeout=(5, 120))
        content = upstream_response.content.replace(upstream.encode(), fhir_base.encode())
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_HEADERS}
        if "Location" in out_headers:
            out_headers["Location"] = out_headers["Location"].replace(upstream, fhir_base)
        if "Content-Location" in out_headers:
            out_headers["Content-Location"] = out_headers["Content-Location"].replace(upstream, fhir_base)
        return Response(content, status_code=upstream_response.status_code, headers=out_headers)

    return app


def run_in_thread(app: FastAPI, port: int, host: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Serve ``app`` with uvicorn in a daemon thread; returns (server, thread). Stop with ``server.should_exit``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the SMART simulator did not start")
    return server, thread
