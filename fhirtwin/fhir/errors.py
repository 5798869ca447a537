"""Errors raised by the FHIR transport layer, and URL redaction shared by errors and logs.

Every failure raises; nothing in ``fhirtwin.fhir`` returns None to mean "it did not work". Errors carry
the HTTP status, the method, a *redacted* URL (scheme, host and path kept; query values replaced by
``***`` because search parameters carry patient ids and identifiers; never credentials) and the
OperationOutcome the server sent. The string form of an error names issue codes only, not the server's
free-text diagnostics (those can quote identifiers); read ``err.issues`` when you need them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

__all__ = [
    "EntryResult",
    "FhirAuthError",
    "FhirConflict",
    "FhirConnectionError",
    "FhirError",
    "FhirGone",
    "FhirHttpError",
    "FhirNotFound",
    "FhirPagingLimit",
    "FhirServerError",
    "FhirThrottled",
    "FhirTimeout",
    "FhirTransactionError",
    "FhirUnauthorized",
    "FhirValidationError",
    "BulkExportError",
    "NdjsonFormatError",
    "error_for_status",
    "path_template",
    "redact_url",
]

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_FIXED_SEGMENTS = frozenset({"metadata", ".well-known", "smart-configuration"})


def redact_url(url: str) -> str:
    """Keep scheme, host and path of ``url``; replace every query value by ``***``; drop user info.

    Query strings of FHIR searches are where patient ids, identifiers and names travel, so they must not
    reach exception messages or logs. Parameter names are kept because they help debugging.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def path_template(url: str, base_url: str) -> str:
    """Reduce ``url`` to a log-safe template relative to ``base_url``, e.g. ``Patient/{id}/_history/{vid}``.

    Logs keep the resource type and operation names (useful for metrics) but never ids. URLs outside the
    base (file servers, foreign hosts) become ``{external}`` plus their templated path.
    """
    path = urlsplit(url).path
    base_path = urlsplit(base_url).path.rstrip("/")
    if not (same_origin(url, base_url) and (path == base_path or path.startswith(base_path + "/"))):
        return "{external}"
    out: list[str] = []
    expect_type = True
    previous = ""
    for segment in (s for s in path[len(base_path) :].split("/") if s):
        if previous == "_history":
            out.append("{vid}")
        elif (
            segment.startswith(("$", "_"))
            or segment in _FIXED_SEGMENTS
            or (expect_type and _RESOURCE_TYPE.match(segment))
        ):
            out.append(segment)
        else:
            out.append("{id}")
        expect_type = False
        previous = segment
    return "/".join(out) or "/"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port)


def same_origin(url: str, other: str) -> bool:
    """True when both URLs share scheme, host and port (the rule for sending credentials to a URL)."""
    return _origin(url) == _origin(other)


def outcome_issues(body: Any) -> list[dict[str, Any]]:
    """The ``issue`` list of an OperationOutcome dict, or [] when ``body`` is not one."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue")
        if isinstance(issues, list):
            return [i for i in issues if isinstance(i, dict)]
    return []


class FhirError(Exception):
    """Base of every error raised by ``fhirtwin.fhir``."""

    #: An earlier attempt of the same request lost its response (reset, timeout or 5xx before a retry), so
    #: the server may have carried it out: a refusal of the retry says nothing about that attempt.
    after_uncertain_attempt: bool = False

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        url: str | None = None,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        self.method = method
        self.url = redact_url(url) if url else None
        self.status = status
        self.outcome = outcome
        self.issues: list[dict[str, Any]] = outcome_issues(outcome)
        codes = ",".join(str(i.get("code", "?")) for i in self.issues)
        where = f"{method} {self.url}" if method and self.url else (self.url or "")
        text = message
        if where:
            text += f" [{where}]"
        if status is not None:
            text += f" status={status}"
        if codes:
            text += f" issues={codes}"
        super().__init__(text)


class FhirHttpError(FhirError):
    """The server answered with an HTTP error status (4xx/5xx)."""


class FhirUnauthorized(FhirHttpError):
    """401/403: missing, expired or insufficient credentials or scopes."""


class FhirNotFound(FhirHttpError):
    """404: the resource or endpoint does not exist."""


class FhirGone(FhirHttpError):
    """410: the resource was deleted."""


class FhirConflict(FhirHttpError):
    """409/412: version conflict (If-Match) or a conditional request matched several resources."""


class FhirThrottled(FhirHttpError):
    """429 still returned after the retry budget, or a Retry-After longer than the client accepts."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class FhirServerError(FhirHttpError):
    """5xx from the server (after retries, where the request was safe to retry)."""


class FhirTimeout(FhirError):
    """The server did not answer in time (after retries, where safe)."""


class FhirConnectionError(FhirError):
    """The connection could not be made or broke (after retries, where safe)."""


class FhirPagingLimit(FhirError):
    """A search had more pages than the caller allowed; results so far were already yielded."""


class FhirValidationError(FhirError, ValueError):
    """A payload is not valid FHIR R4 JSON (bad JSON, wrong shape, failed model validation)."""


class FhirAuthError(FhirError):
    """The authorization server refused or failed a token request (OAuth 2.0 error code attached)."""

    def __init__(self, message: str, *, oauth_error: str | None = None, **kwargs: Any) -> None:
        self.oauth_error = oauth_error
        super().__init__(message + (f" oauth_error={oauth_error}" if oauth_error else ""), **kwargs)


class NdjsonFormatError(FhirValidationError):
    """A line of an NDJSON file is not one JSON resource; names the file and the 1-based line number."""

    def __init__(self, message: str, *, file: str, line: int) -> None:
        self.file = file
        self.line = line
        super().__init__(f"{file}:{line}: {message}")


class BulkExportError(FhirError):
    """A Bulk Data export failed, was cancelled, or did not finish within the allowed time."""


@dataclass(frozen=True)
class EntryResult:
    """Outcome of one entry of a batch/transaction response, in request order."""

    index: int
    status: int
    request: str
    location: str | None = None
    etag: str | None = None
    resource: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    issues: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True for 2xx (and 304) statuses."""
        return 200 <= self.status < 300 or self.status == 304


class FhirTransactionError(FhirHttpError):
    """A transaction failed as a whole; ``failures`` lists the failing entries the server identified."""

    def __init__(self, message: str, *, failures: list[EntryResult] | None = None, **kwargs: Any) -> None:
        self.failures = list(failures or [])
        super().__init__(message, **kwargs)


def error_for_status(
    status: int,
    *,
    method: str,
    url: str,
    outcome: dict[str, Any] | None,
    retry_after: float | None = None,
) -> FhirHttpError:
    """Map an HTTP error status to the most specific error class."""
    kwargs: dict[str, Any] = {"method": method, "url": url, "status": status, "outcome": outcome}
    if status in (401, 403):
        return FhirUnauthorized("not authorized", **kwargs)
    if status == 404:
        return FhirNotFound("not found", **kwargs)
    if status == 410:
        return FhirGone("gone (deleted)", **kwargs)
    if status in (409, 412):
        return FhirConflict("conflict", **kwargs)
    if status == 429:
        return FhirThrottled("throttled", retry_after=retry_after, **kwargs)
    if status >= 500:
        return FhirServerError("server error", **kwargs)
    return FhirHttpError("request failed", **kwargs)
