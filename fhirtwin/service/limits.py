"""Request limits and typed errors for every door of the service.

Why a pure ASGI middleware (not ``BaseHTTPMiddleware``): it sees the body bytes before any handler parses
them, can refuse them without buffering more than the limit, and does not change how handlers stream.

* A body over ``max_body_bytes`` (default 1 MiB) is refused with 413: a ``Content-Length`` over the limit
  before anything is read, a streamed body as soon as the running count passes it.
* A JSON body nested deeper than ``max_depth`` (default 64) is refused with 400 before a handler runs
  ``json.loads`` (CPython's decoder recurses, and so does everything that walks the parsed tree). The check
  is an iterative scan of the bytes: brackets outside strings.
* Every error body is typed by the door: under ``/cds-services`` the CDS Hooks error JSON
  (``{"error", "message"}``), elsewhere a FHIR OperationOutcome (``application/fhir+json``). The SMART
  browser pages keep their HTML error page, and their page API (``/patient/whatif``, ``/patient/write``)
  its ``{"error": ...}`` JSON, which the page's script shows. Any other error body (a bare 404, a
  framework ``{"detail": ...}``) is rewritten into the door's type with the same status and headers.
* An exception no handler caught becomes a typed 500 without a traceback. It is the last resort: bad
  input is meant to be refused with a 4xx by the layer that understands it.

:func:`install` adds the middleware and the handlers that type FastAPI's own 404/405/422 answers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhirtwin.engine import operation_outcome
from fhirtwin.service.runtime import ensure_json_logging, log_event

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "RequestLimits", "error_response", "install", "json_too_deep"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 64
FHIR_JSON = "application/fhir+json"
CDS_PREFIX = "/cds-services"
#: SMART browser pages (HTML error page) and the page's own JSON API (``{"error": ...}``, read by patient.js).
BROWSER_PAGES = ("/launch", "/callback", "/patient")
PAGE_API = ("/patient/whatif", "/patient/write")

#: OperationOutcome issue type per HTTP status (R4 IssueType value set); anything else 4xx: invalid.
_ISSUE_CODES = {401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported", 406: "not-supported",
                409: "conflict", 410: "deleted", 412: "conflict", 413: "too-long", 415: "not-supported",
                422: "processing", 429: "throttled", 502: "transient", 503: "transient", 504: "timeout"}
#: CDS Hooks error codes, in the style of ``cds_hooks.error_response``.
_CDS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 412: "precondition_failed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "bad_request", 429: "too_many_requests",
              500: "internal_error", 502: "fhir_server_error", 503: "unavailable", 504: "fhir_server_timeout"}

# A JSON string (escapes included) or a bracket: group 1 opens, group 2 closes. Strings are skipped whole.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|([\[{])|([\]}])', re.DOTALL)


def json_too_deep(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text nests arrays/objects deeper than ``max_depth`` (no recursion, no parsing).

    UTF-16 and UTF-32 bodies, which ``json.loads`` accepts, are transcoded first. Malformed JSON may be
    over-counted; it is refused by the parser anyway."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        body = body.decode(encoding, "replace").encode("utf-8", "surrogatepass")
    depth = 0
    for token in _JSON_TOKENS.finditer(body):
        if token.lastindex == 1:
            depth += 1
            if depth > max_depth:
                return True
        elif token.lastindex == 2:
            depth -= 1
    return False


# ---------------------------------------------------------------------------------------------- bodies


def _door(path: str) -> str:
    if path == CDS_PREFIX or path.startswith(CDS_PREFIX + "/"):
        return "cds"
    if path in PAGE_API:
        return "page_api"
    if path in BROWSER_PAGES:
        return "page"
    return "fhir"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"HTTP {status}"


def error_body(path: str, status: int, message: str) -> tuple[dict[str, Any], str]:
    """The typed error body for a door and its media type: CDS error JSON or an OperationOutcome."""
    if _door(path) == "cds":
        return {"error": _CDS_CODES.get(status, "internal_error" if status >= 500 else "bad_request"),
                "message": message}, "application/json"
    code = _ISSUE_CODES.get(status, "exception" if status >= 500 else "invalid")
    return operation_outcome(message, code=code), FHIR_JSON


def error_response(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A typed error response for the door that ``path`` belongs to."""
    body, media = error_body(path, status, message)
    return JSONResponse(body, status_code=status, media_type=media, headers=headers)


def _is_typed(path: str, content_type: str, body: bytes) -> bool:
    """Whether an error body already has its door's type (else the middleware rewrites it)."""
    door = _door(path)
    media = content_type.split(";", 1)[0].strip().lower()
    if door == "page" and media == "text/html":
        return True
    if media not in ("application/json", FHIR_JSON):
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    if not isinstance(parsed, dict):
        return False
    if door == "cds":
        return media == "application/json" and isinstance(parsed.get("error"), str) \
            and isinstance(parsed.get("message"), str)
    if door == "page_api" and isinstance(parsed.get("error"), str):
        return True
    return media == FHIR_JSON and parsed.get("resourceType") == "OperationOutcome" \
        and isinstance(parsed.get("issue"), list) and bool(parsed["issue"])


def _message_of(body: bytes, status: int) -> str:
    """A short message carried over from an untyped error body (its ``message``, ``error`` or ``detail``
    text, written for clients by the handler), else the status phrase."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("message", "error", "detail"):
            if isinstance(parsed.get(key), str) and parsed[key].strip():
                return str(parsed[key])[:200]
    return _phrase(status)


# ---------------------------------------------------------------------------------------------- middleware


class RequestLimits:
    """Pure ASGI middleware: body size and JSON depth limits, typed error bodies, a typed last-resort 500."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES,
                 max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        refused = self._declared_length_refused(scope)
        body = b""
        if refused is None:
            read = await self._read_body(receive)
            if isinstance(read, tuple):
                refused = read
            else:
                body = read
                if body and json_too_deep(body, self.max_depth):
                    refused = (400, f"JSON nested deeper than {self.max_depth} levels")
        if refused is not None:
            await _send_error(send, path, *refused)
            return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False
        held_start: Message | None = None
        held_body: list[bytes] = []

        async def typed_send(message: Message) -> None:
            nonlocal started, held_start
            if message["type"] == "http.response.start":
                started = True
                if int(message["status"]) >= 400:
                    held_start = message  # hold the error body until it is complete, to check its type
                    return
            elif message["type"] == "http.response.body" and held_start is not None:
                held_body.append(bytes(message.get("body", b"")))
                if message.get("more_body", False):
                    return
                start, held_start = held_start, None
                await _send_typed(send, path, start, b"".join(held_body))
                return
            await send(message)

        try:
            await self.app(scope, replay, typed_send)
        except Exception as exc:  # noqa: BLE001 - the last resort: a typed 500, never a traceback
            ensure_json_logging()
            log_event("unhandled_error", level=logging.ERROR, door=_door(path), method=scope.get("method"),
                      error=type(exc).__name__)
            if not started:
                await _send_error(send, path, 500, "internal error")
            elif held_start is not None:
                await _send_error(send, path, int(held_start["status"]), _phrase(int(held_start["status"])))

    def _declared_length_refused(self, scope: Scope) -> tuple[int, str] | None:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                text = value.decode("latin-1").strip()
                if not text.isdigit():
                    return 400, "Content-Length is not a number"
                if int(text) > self.max_body_bytes:
                    return 413, f"request body over {self.max_body_bytes} bytes"
        return None

    async def _read_body(self, receive: Receive) -> bytes | tuple[int, str]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the handler sees an empty body
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413, f"request body over {self.max_body_bytes} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _send_error(send: Send, path: str, status: int, message: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body, media = error_body(path, status, message)
    payload = json.dumps(body, separators=(",", ":")).encode()
    out = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-type", b"content-length")]
    out += [(b"content-type", media.encode()), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _send_typed(send: Send, path: str, start: Message, body: bytes) -> None:
    """Forward a held error response, rewritten into the door's type when it is not typed already."""
    headers = list(start.get("headers", []))
    content_type = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), "")
    if _is_typed(path, content_type, body):
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    status = int(start["status"])
    await _send_error(send, path, status, _message_of(body, status), headers)


# ---------------------------------------------------------------------------------------------- install


def _validation_message(exc: RequestValidationError) -> str:
    """Where and why a request failed FastAPI's validation, without echoing the input."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI, *, max_body_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Add the limits middleware and type FastAPI's own 404/405/422 answers (call it last in create_app,
    so that the middleware is the outermost one the application adds)."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else _phrase(exc.status_code)
        return error_response(request.url.path, exc.status_code, message, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.url.path, 400, _validation_message(exc))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, max_depth=max_depth)
