"""FHIR R4 REST client on ``requests.Session``: CRUD, search with paging, batch/transaction, operations.

Results are the server's JSON as plain dicts: the raw dict is the source of truth (signatures and
round-trips need it byte-faithful), typed models are applied at the edges by callers.

Retry rule (the one place it is decided: :func:`is_retry_safe`)
----------------------------------------------------------------
A request is retried on 429, 502, 503, 504, on timeouts and on connection errors **only if repeating it
cannot create or change anything twice**:

* GET and HEAD;
* PUT (update and conditional update are idempotent in FHIR);
* POST to ``[type]/_search`` or ``[base]/_search`` (a search);
* POST create carrying ``If-None-Exist`` (conditional create: a repeat finds the first result);
* POST of a batch or transaction Bundle whose every entry is GET/HEAD, PUT, or POST with
  ``request.ifNoneExist``;
* an operation the caller explicitly declares safe (``operation(..., retry_safe=True)``).

Everything else (plain POST create, DELETE, PATCH, other operations) is sent exactly once. Waits use
exponential backoff with full jitter (``uniform(0, min(max_backoff, backoff * 2**n))``) unless the server
sends ``Retry-After`` (seconds or HTTP-date), which is honoured as given; a Retry-After longer than
``max_retry_after`` stops retrying at once (:class:`FhirThrottled` with ``retry_after`` set).

Paging cap: :meth:`FhirClient.search_all` *raises* :class:`FhirPagingLimit` when a further page exists
after ``max_pages`` pages, after yielding the resources already fetched, so a truncated result is never
mistaken for a complete one.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict, overload
from urllib.parse import quote, urljoin, urlsplit

import requests
from requests.auth import AuthBase

from fhirtwin import __version__
from fhirtwin.fhir.errors import (
    EntryResult,
    FhirConnectionError,
    FhirError,
    FhirNotFound,
    FhirPagingLimit,
    FhirThrottled,
    FhirTimeout,
    FhirTransactionError,
    FhirValidationError,
    error_for_status,
    outcome_issues,
    path_template,
    same_origin,
)

__all__ = [
    "ClientHooks",
    "FhirClient",
    "RequestHook",
    "ResponseHook",
    "batch_results",
    "check_transaction_response",
    "is_retry_safe",
    "parse_retry_after",
    "patient_reference_id",
]

log = logging.getLogger("fhirtwin.fhir")

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
SAFE_ENTRY_METHODS = frozenset({"GET", "HEAD", "PUT"})

RequestHook = Callable[[requests.PreparedRequest], None]
ResponseHook = Callable[[requests.Response], None]


class ClientHooks(TypedDict, total=False):
    """Hooks by kind: ``request`` hooks get each PreparedRequest before it is sent, ``response`` hooks each Response."""

    request: Iterable[RequestHook]
    response: Iterable[ResponseHook]

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None


def is_retry_safe(method: str, url: str, headers: Mapping[str, str] | None = None, body: Any = None) -> bool:
    """Decide whether a request may be sent again after a failure (see the module docstring)."""
    method = method.upper()
    if method in ("GET", "HEAD", "PUT"):
        return True
    if method != "POST":
        return False
    path = urlsplit(url).path.rstrip("/")
    if path.endswith("/_search"):
        return True
    if headers and any(k.lower() == "if-none-exist" for k in headers):
        return True
    if isinstance(body, dict) and body.get("resourceType") == "Bundle" and body.get("type") in ("batch", "transaction"):
        return all(_entry_is_repeatable(e) for e in body.get("entry") or [])
    return False


def _entry_is_repeatable(entry: Any) -> bool:
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict):
        return False
    method = str(request.get("method", "")).upper()
    return method in SAFE_ENTRY_METHODS or (method == "POST" and bool(request.get("ifNoneExist")))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _status_code(status_line: Any) -> int:
    """Numeric status from a Bundle ``entry.response.status`` such as ``"201 Created"``."""
    try:
        return int(str(status_line).strip().split(" ", 1)[0])
    except ValueError:
        return 0


def batch_results(
    response_bundle: Mapping[str, Any], request_entries: Sequence[Mapping[str, Any]] = ()
) -> list[EntryResult]:
    """Per-entry results of a batch/transaction response, in request order, with status and outcome.

    ``request_entries`` (the sent entries) only supply a log-safe label of each request.
    """
    results: list[EntryResult] = []
    for index, entry in enumerate(response_bundle.get("entry") or []):
        response = entry.get("response") or {}
        outcome = response.get("outcome")
        resource = entry.get("resource")
        if outcome is None and isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            outcome = resource
        label = ""
        if index < len(request_entries):
            req = request_entries[index].get("request") or {}
            label = f"{req.get('method', '')} {str(req.get('url', '')).split('?', 1)[0].split('/', 1)[0]}".strip()
        results.append(
            EntryResult(
                index=index,
                status=_status_code(response.get("status")),
                request=label,
                location=response.get("location"),
                etag=response.get("etag"),
                resource=resource if isinstance(resource, dict) else None,
                outcome=outcome,
                issues=outcome_issues(outcome),
            )
        )
    return results


def check_transaction_response(
    response_bundle: Mapping[str, Any], request_entries: Sequence[Mapping[str, Any]] = ()
) -> list[EntryResult]:
    """Raise :class:`FhirTransactionError` naming every failing entry; otherwise return all entry results.

    A conformant server fails a transaction as a whole with an HTTP error, but some report failures per
    entry inside a 200 ``transaction-response``; both are errors for fhirtwin.
    """
    results = batch_results(response_bundle, request_entries)
    failures = [r for r in results if not r.ok]
    if failures:
        first = failures[0]
        raise FhirTransactionError(
            f"transaction failed at entry {first.index} ({first.request or 'request'}): {len(failures)} failing",
            failures=failures,
            status=first.status,
            outcome=first.outcome,
        )
    return results


def patient_reference_id(resource: Mapping[str, Any]) -> str | None:
    """Id of the Patient a resource belongs to (``subject``/``patient`` reference, or a Patient's own id)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return str(rid) if rid is not None else None
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            found = _reference_id(ref["reference"], "Patient")
            if found is not None:
                return found
    return None


def _reference_id(reference: str, resource_type: str) -> str | None:
    """``Patient/1``, ``https://x/fhir/Patient/1`` and ``Patient/1/_history/2`` all give ``1``."""
    parts = reference.split("?", 1)[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return parts[-1]
    return None


class FhirClient:
    """A FHIR R4 server reached over HTTPS with retries, paging, hooks and request counting.

    ``auth`` is any ``requests`` auth object (see :mod:`fhirtwin.fhir.auth`); if it has an
    ``invalidate()`` method, a 401 makes the client drop the cached token and repeat the request once.
    ``request_count`` and ``request_counts`` (per method) count every HTTP request sent to the server,
    retries and pages included (token requests of the auth object are not counted).
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: AuthBase | None = None,
        timeout: float | tuple[float, float] = (5, 60),
        verify: bool | str = True,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        page_limit: int = 100,
        hooks: ClientHooks | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError("base_url must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.session = session if session is not None else requests.Session()
        self.auth = auth
        self.timeout = timeout
        self.verify = verify
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.page_limit = page_limit
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.request_hooks: list[RequestHook] = []
        self.response_hooks: list[ResponseHook] = []
        hooks = hooks or {}
        for kind in hooks:
            if kind not in ("request", "response"):
                raise ValueError(f"unknown hook kind {kind!r}; use 'request' or 'response'")
        for request_hook in hooks.get("request", ()):
            self.add_hook("request", request_hook)
        for response_hook in hooks.get("response", ()):
            self.add_hook("response", response_hook)
        self.request_counts: Counter[str] = Counter()
        self.pages_followed = 0  # paging links followed (each is also counted in request_counts)
        self._lock = threading.Lock()
        self._capabilities: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plumbing

    @overload
    def add_hook(self, kind: Literal["request"], func: RequestHook) -> None: ...

    @overload
    def add_hook(self, kind: Literal["response"], func: ResponseHook) -> None: ...

    def add_hook(self, kind: str, func: Callable[[Any], None]) -> None:
        """Register ``func`` for ``"request"`` (gets the PreparedRequest) or ``"response"`` (gets the Response)."""
        if kind == "request":
            self.request_hooks.append(func)
        elif kind == "response":
            self.response_hooks.append(func)
        else:
            raise ValueError(f"unknown hook kind {kind!r}; use 'request' or 'response'")

    @property
    def request_count(self) -> int:
        """Total HTTP requests sent to the server by this client (retries and paging included)."""
        return sum(self.request_counts.values())

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` relative to the base (absolute URLs pass through unchanged)."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_safe: bool | None = None,
        stream: bool = False,
        send_auth: bool = True,
        allow_redirects: bool = False,
    ) -> requests.Response:
        """Send one logical request (with the retries it is allowed) and return a 2xx/3xx response.

        Raises the :class:`FhirHttpError` subclass matching an error status, :class:`FhirTimeout` or
        :class:`FhirConnectionError`. ``retry_safe=None`` applies :func:`is_retry_safe`.
        """
        method = method.upper()
        url = self.url(path)
        if send_auth and not same_origin(url, self.base_url):
            raise FhirError("refusing to send credentials to a URL outside the FHIR server", method=method, url=url)
        all_headers = {"Accept": FHIR_JSON, "Accept-Encoding": "gzip", "User-Agent": f"fhirtwin/{__version__}"}
        body_bytes: Any = data
        if json_body is not None:
            body_bytes = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            all_headers["Content-Type"] = FHIR_JSON
        all_headers.update(headers or {})
        if retry_safe is None:
            retry_safe = is_retry_safe(method, url, all_headers, json_body)
        template = path_template(url, self.base_url)
        attempt = 0
        refreshed_auth = False
        uncertain = False  # an earlier attempt may have reached the server and been carried out
        while True:
            attempt += 1
            prepared = self.session.prepare_request(
                requests.Request(
                    method,
                    url,
                    params=params,
                    data=body_bytes,
                    headers=all_headers,
                    auth=self.auth if send_auth else None,
                )
            )
            if not send_auth:
                prepared.headers.pop("Authorization", None)
            for request_hook in self.request_hooks:
                request_hook(prepared)
            settings = self.session.merge_environment_settings(prepared.url, {}, stream, self.verify, None)
            started = time.monotonic()
            with self._lock:
                self.request_counts[method] += 1
            try:
                response = self.session.send(
                    prepared, timeout=self.timeout, allow_redirects=allow_redirects, **settings
                )
            except (requests.Timeout, requests.ConnectionError) as exc:
                timed_out = isinstance(exc, requests.Timeout)
                log.warning("fhir %s %s failed: %s attempt=%d", method, template, type(exc).__name__, attempt)
                if retry_safe and attempt <= self.max_retries:
                    uncertain = True
                    self.sleep(self._backoff_delay(attempt))
                    continue
                error_cls = FhirTimeout if timed_out else FhirConnectionError
                # "from None": the requests exception text contains the full URL with query values.
                lost = error_cls(
                    f"{type(exc).__name__} after {attempt} attempt(s)", method=method, url=prepared.url or url
                )
                lost.after_uncertain_attempt = uncertain
                raise lost from None
            elapsed_ms = (time.monotonic() - started) * 1000
            log.info(
                "fhir %s %s status=%d duration_ms=%.0f attempt=%d",
                method,
                template,
                response.status_code,
                elapsed_ms,
                attempt,
            )
            for response_hook in self.response_hooks:
                response_hook(response)
            status = response.status_code
            if status == 401 and send_auth and not refreshed_auth and hasattr(self.auth, "invalidate"):
                refreshed_auth = True
                self.auth.invalidate()  # type: ignore[union-attr]
                response.close()
                continue
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock())
                if (
                    retry_safe
                    and attempt <= self.max_retries
                    and (retry_after is None or retry_after <= self.max_retry_after)
                ):
                    delay = retry_after if retry_after is not None else self._backoff_delay(attempt)
                    log.warning(
                        "fhir %s %s status=%d retry in %.2fs attempt=%d", method, template, status, delay, attempt
                    )
                    response.close()
                    uncertain = uncertain or status >= 500  # a 429 was not carried out; a 5xx may have been
                    self.sleep(delay)
                    continue
                if status == 429:
                    throttled = FhirThrottled(
                        f"throttled after {attempt} attempt(s)",
                        retry_after=retry_after,
                        method=method,
                        url=prepared.url or url,
                        status=status,
                        outcome=_json_or_none(response),
                    )
                    throttled.after_uncertain_attempt = uncertain
                    raise throttled
            if status >= 400:
                failed = error_for_status(status, method=method, url=prepared.url or url,
                                          outcome=_json_or_none(response))
                failed.after_uncertain_attempt = uncertain
                raise failed
            return response

    def _backoff_delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**(attempt-1))]."""
        return self.rng.uniform(0, min(self.max_backoff, self.backoff * (2 ** (attempt - 1))))

    def _json(
        self,
        method: str,
        path: str,
        **kwargs: Any,
    ) -> dict[str, Any]:
        response = self.request(method, path, **kwargs)
        body = _json_or_none(response)
        if body is None:
            if response.content:
                raise FhirValidationError(
                    "response body is not JSON", method=method, url=response.url, status=response.status_code
                )
            return {}
        if not isinstance(body, dict):
            raise FhirValidationError(
                "response body is not a JSON object", method=method, url=response.url, status=response.status_code
            )
        return body

    # ------------------------------------------------------------------ interactions

    def capabilities(self, *, refresh: bool = False) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``), cached after the first call."""
        if self._capabilities is None or refresh:
            self._capabilities = self._json("GET", "metadata")
        return self._capabilities

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [type]/[id]``; raises :class:`FhirNotFound` / :class:`FhirGone`."""
        return self._json("GET", f"{_seg(resource_type)}/{_seg(resource_id)}")

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """``GET [type]/[id]/_history/[vid]``: the exact version a prediction was based on."""
        return self._json("GET", f"{_seg(resource_type)}/{_seg(resource_id)}/_history/{_seg(version_id)}")

    def search(self, resource_type: str, params: Params = None, *, use_post: bool = False) -> dict[str, Any]:
        """First page of a search as a searchset Bundle dict.

        ``use_post=True`` sends ``POST [type]/_search`` with a form body, keeping identifiers out of URLs
        (and thus out of proxy and server access logs).
        """
        if use_post:
            return self._json(
                "POST",
                f"{_seg(resource_type)}/_search",
                data=list(_param_items(params)),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        return self._json("GET", _seg(resource_type), params=list(_param_items(params)))

    def search_all(
        self,
        resource_type: str,
        params: Params = None,
        *,
        max_pages: int | None = None,
        use_post: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Every resource of a search, following ``link[relation=next]``; raises FhirPagingLimit at the cap.

        OperationOutcome entries with ``search.mode = outcome`` are not yielded.
        """
        first = self.search(resource_type, params, use_post=use_post)
        yield from self.iter_bundle_pages(first, max_pages=max_pages)

    def iter_bundle_pages(self, bundle: dict[str, Any], *, max_pages: int | None = None) -> Iterator[dict[str, Any]]:
        """Resources of ``bundle`` and of its following pages (``bundle`` counts as page 1)."""
        cap = self.page_limit if max_pages is None else max_pages
        pages = 1
        while True:
            yield from bundle_resources(bundle)
            next_url = next_link(bundle)
            if next_url is None:
                return
            if pages >= cap:
                raise FhirPagingLimit(f"search has more than {cap} page(s); raise max_pages or narrow the search")
            bundle = self.follow(next_url)
            pages += 1

    def follow(self, url: str) -> dict[str, Any]:
        """GET a paging link (must be on the FHIR server's origin, since it carries our credentials)."""
        with self._lock:
            self.pages_followed += 1
        return self._json("GET", urljoin(self.base_url + "/", url))

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | Params = None, prefer: str = "representation"
    ) -> dict[str, Any]:
        """``POST [type]``; with ``if_none_exist`` a conditional create (retry-safe, see module docstring).

        Returns the stored resource (``Prefer: return=representation``); if the server sends no body, a
        stub ``{resourceType, id, meta.versionId}`` read from the Location header.
        """
        resource_type = _resource_type(resource)
        headers = {"Prefer": f"return={prefer}"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist if isinstance(if_none_exist, str) else _query(if_none_exist)
        response = self.request("POST", _seg(resource_type), json_body=dict(resource), headers=headers)
        return _body_or_location_stub(response, resource_type)

    def update(
        self, resource: Mapping[str, Any], *, if_match: str | None = None, prefer: str = "representation"
    ) -> dict[str, Any]:
        """``PUT [type]/[id]``; ``if_match`` is a version id (or a full ETag) for optimistic locking."""
        resource_type = _resource_type(resource)
        rid = resource.get("id")
        if not rid:
            raise FhirValidationError("update needs resource.id; use conditional_update to match by search")
        headers = {"Prefer": f"return={prefer}"}
        if if_match:
            headers["If-Match"] = if_match if if_match.startswith(("W/", '"')) else f'W/"{if_match}"'
        path = f"{_seg(resource_type)}/{_seg(str(rid))}"
        response = self.request("PUT", path, json_body=dict(resource), headers=headers)
        return _body_or_location_stub(response, resource_type)

    def conditional_update(
        self, resource: Mapping[str, Any], criteria: Params, *, prefer: str = "representation"
    ) -> dict[str, Any]:
        """``PUT [type]?criteria``: 0 matches creates, 1 updates, several raise :class:`FhirConflict` (412)."""
        resource_type = _resource_type(resource)
        if not criteria:
            raise ValueError("conditional_update needs search criteria")
        response = self.request(
            "PUT",
            _seg(resource_type),
            params=list(_param_items(criteria)),
            json_body=dict(resource),
            headers={"Prefer": f"return={prefer}"},
        )
        return _body_or_location_stub(response, resource_type)

    def delete(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``DELETE [type]/[id]``; returns the server's OperationOutcome, or {} when it sends no body."""
        return self._json("DELETE", f"{_seg(resource_type)}/{_seg(resource_id)}")

    def batch(self, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """POST a ``batch`` Bundle; returns the batch-response Bundle (use :func:`batch_results` per entry)."""
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [dict(e) for e in entries]}
        return self._json("POST", "", json_body=bundle)

    def transaction(self, bundle_or_entries: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """POST a ``transaction`` Bundle; raises :class:`FhirTransactionError` if it or any entry failed."""
        if isinstance(bundle_or_entries, Mapping):
            bundle = dict(bundle_or_entries)
            if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
                raise FhirValidationError("transaction() needs a Bundle of type 'transaction' or a list of entries")
        else:
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [dict(e) for e in bundle_or_entries]}
        entries = bundle.get("entry") or []
        try:
            response = self._json("POST", "", json_body=bundle)
        except FhirError as exc:
            if exc.status is None:
                raise
            rejected = FhirTransactionError(
                "transaction rejected", method="POST", url=self.base_url, status=exc.status, outcome=exc.outcome
            )
            rejected.after_uncertain_attempt = exc.after_uncertain_attempt
            raise rejected from exc
        check_transaction_response(response, entries)
        return response

    def operation(
        self,
        name: str,
        *,
        resource_type: str | None = None,
        resource_id: str | None = None,
        params: Params = None,
        parameters: Mapping[str, Any] | None = None,
        method: str | None = None,
        retry_safe: bool | None = None,
    ) -> dict[str, Any]:
        """Invoke ``$name`` at system, type or instance level.

        Simple ``params`` go in the query string with GET; a ``Parameters`` resource goes in a POST body.
        POST operations are not retried unless ``retry_safe=True`` (the caller knows the operation).
        """
        op = name if name.startswith("$") else f"${name}"
        path = "/".join(_seg(p) for p in (resource_type, resource_id) if p) + ("/" if resource_type else "") + op
        if method is None:
            method = "POST" if parameters is not None else "GET"
        method = method.upper()
        if method == "GET":
            return self._json("GET", path, params=list(_param_items(params)), retry_safe=retry_safe)
        return self._json(
            method,
            path,
            params=list(_param_items(params)),
            json_body=dict(parameters) if parameters is not None else {"resourceType": "Parameters"},
            retry_safe=bool(retry_safe),
        )

    # ------------------------------------------------------------------ patient records

    def fetch_patient_record(
        self,
        patient_id: str,
        types: Mapping[str, str] | Iterable[str],
        *,
        include: Iterable[str] = (),
        count: int = 1000,
        max_pages: int | None = None,
        strategy: str = "batch",
        extra_searches: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """One patient's record (Patient first) in one HTTP request when it fits in one page per type.

        ``types`` maps each resource type to the search parameter naming the patient (a plain list means
        ``patient``); the caller decides what a record is (``fhirtwin.adapters.reads``). ``include``
        (``Type:param``) adds ``_include`` to that type's search, so referenced resources such as a
        Medication come in the same request.

        ``strategy="batch"`` sends a batch Bundle of ``Patient/<id>`` plus one search per type and then
        follows only the paging that a type's size requires. ``strategy="everything"`` uses
        ``Patient/<id>/$everything`` (check ``supports_everything()`` first). Raises FhirNotFound if the
        patient does not exist and the entry's error for a failing search (never a partial record).
        ``extra_searches`` (relative search URLs, batch strategy only) ride in the same batch so that a
        caller needing more than the record (e.g. its own earlier results) pays no extra request; their
        resources are appended after the record's and the caller tells them apart.
        """
        _check_patient_id(patient_id)
        type_params = _type_params(types)
        extra = list(extra_searches)
        if extra and strategy != "batch":
            raise ValueError("extra_searches needs strategy='batch'")
        if strategy == "everything":
            bundle = self.operation(
                "everything",
                resource_type="Patient",
                resource_id=patient_id,
                params={"_type": ",".join(["Patient", *type_params]), "_count": count},
            )
            return _dedupe(self.iter_bundle_pages(bundle, max_pages=max_pages))
        if strategy != "batch":
            raise ValueError("strategy must be 'batch' or 'everything'")
        entries = [{"request": {"method": "GET", "url": f"Patient/{_seg(patient_id)}"}}]
        for resource_type, param in type_params.items():
            query = _query([(param, patient_id), ("_count", count), *_includes(include, resource_type)])
            entries.append({"request": {"method": "GET", "url": f"{_seg(resource_type)}?{query}"}})
        for url in extra:
            if not isinstance(url, str) or "?" not in url or url.startswith(("/", "http:", "https:")):
                raise ValueError("extra_searches are relative search URLs: 'Type?param=value'")
            entries.append({"request": {"method": "GET", "url": url}})
        results = self._batch_read(entries)
        patient = results[0].resource
        if not patient or patient.get("resourceType") != "Patient":
            raise FhirValidationError("batch entry for the Patient did not return a Patient", status=results[0].status)
        record: list[dict[str, Any]] = [patient]
        for result in results[1:]:
            record.extend(self.iter_bundle_pages(result.resource or {}, max_pages=max_pages))
        return _dedupe(record)

    def fetch_patients_records(
        self,
        patient_ids: Iterable[str],
        types: Mapping[str, str] | Iterable[str],
        *,
        include: Iterable[str] = (),
        chunk_size: int = 20,
        count: int = 1000,
        max_pages: int | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Records of several patients: one batch per ``chunk_size`` patients (``Observation?patient=a,b,c``).

        Returns ``{patient_id: [Patient, ...]}`` in input order. A requested patient the server does not
        have raises :class:`FhirNotFound`; a resource that cannot be attributed to a requested patient
        raises :class:`FhirValidationError` (it would otherwise be silently lost). A resource that came
        through ``include`` (no patient of its own) joins every record of the chunk that refers to it.
        """
        ids = list(dict.fromkeys(patient_ids))
        for patient_id in ids:
            _check_patient_id(patient_id)
        type_params = _type_params(types)
        records: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            joined = ",".join(chunk)
            entries = [{"request": {"method": "GET", "url": f"Patient?{_query({'_id': joined, '_count': count})}"}}]
            for resource_type, param in type_params.items():
                query = _query([(param, joined), ("_count", count), *_includes(include, resource_type)])
                entries.append({"request": {"method": "GET", "url": f"{_seg(resource_type)}?{query}"}})
            results = self._batch_read(entries)
            seen: set[tuple[str, str]] = set()
            included: list[dict[str, Any]] = []
            for result in results:
                for resource in self.iter_bundle_pages(result.resource or {}, max_pages=max_pages):
                    key = (str(resource.get("resourceType")), str(resource.get("id")))
                    if key in seen:
                        continue
                    seen.add(key)
                    owner = patient_reference_id(resource)
                    if owner is None and resource.get("resourceType") not in type_params:
                        included.append(resource)
                        continue
                    if owner not in records:
                        raise FhirValidationError(
                            f"{resource.get('resourceType')} returned for the chunk is not attributable to a "
                            "requested patient"
                        )
                    records[owner].append(resource)
            for resource in included:
                ref = f"{resource.get('resourceType')}/{resource.get('id')}"
                for patient_id in chunk:
                    if any(ref in references(r) for r in records[patient_id]):
                        records[patient_id].append(resource)
            missing = [i for i in chunk if not records[i] or records[i][0].get("resourceType") != "Patient"]
            if missing:
                raise FhirNotFound(f"{len(missing)} requested patient(s) not found on the server")
        return records

    def supports_everything(self) -> bool:
        """Whether the CapabilityStatement lists ``Patient/$everything``."""
        for rest in self.capabilities().get("rest") or []:
            for res in rest.get("resource") or []:
                names = {op.get("name") for op in res.get("operation") or []}
                if res.get("type") == "Patient" and names & {"everything", "patient-everything"}:
                    return True
        return False

    def _batch_read(self, entries: list[dict[str, Any]]) -> list[EntryResult]:
        """Send a GET-only batch and raise the first failing entry's error (with its OperationOutcome)."""
        response = self.batch(entries)
        results = batch_results(response, entries)
        if len(results) != len(entries):
            raise FhirValidationError(
                f"batch-response has {len(results)} entries for {len(entries)} requests", method="POST"
            )
        for result in results:
            if not result.ok:
                resource_type = str(entries[result.index]["request"]["url"]).split("?", 1)[0].split("/", 1)[0]
                raise error_for_status(
                    result.status,
                    method="GET",
                    url=self.url(resource_type),
                    outcome=result.outcome,
                )
        return results


# ---------------------------------------------------------------------- helpers


def bundle_resources(bundle: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Resources of a Bundle's entries, skipping ``search.mode = outcome`` OperationOutcomes."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if (entry.get("search") or {}).get("mode") == "outcome":
            continue
        yield resource


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """URL of ``link[relation=next]`` or None."""
    for link in bundle.get("link") or []:
        if link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _json_or_none(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _body_or_location_stub(response: requests.Response, resource_type: str) -> dict[str, Any]:
    body = _json_or_none(response)
    if isinstance(body, dict) and body.get("resourceType") == resource_type:
        return body
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    if location:
        parts = urlsplit(location).path.rstrip("/").split("/")
        if "_history" in parts:
            i = parts.index("_history")
            if i >= 1 and i + 1 < len(parts):
                return {"resourceType": resource_type, "id": parts[i - 1], "meta": {"versionId": parts[i + 1]}}
        if len(parts) >= 2 and parts[-2] == resource_type:
            return {"resourceType": resource_type, "id": parts[-1]}
    if isinstance(body, dict):
        return body
    raise FhirValidationError(
        "server returned neither the resource nor a Location", url=response.url, status=response.status_code
    )


def _resource_type(resource: Mapping[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise FhirValidationError("resource has no resourceType")
    return resource_type


def _seg(value: str) -> str:
    """Percent-encode one path segment (ids are caller data; never let them add path segments)."""
    return quote(str(value), safe="$-_.")


def _param_items(params: Params) -> Iterator[tuple[str, str]]:
    if not params:
        return
    items = params.items() if isinstance(params, Mapping) else params
    for key, value in items:
        if isinstance(value, (list, tuple)):
            for v in value:
                yield key, str(v)
        else:
            yield key, str(value)


def _query(params: Params) -> str:
    return "&".join(f"{quote(k, safe='_:.-')}={quote(v, safe=',|:/_.-')}" for k, v in _param_items(params))


def _type_params(types: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    if isinstance(types, Mapping):
        return {k: str(v) for k, v in types.items()}
    return {t: "patient" for t in types}


def _includes(include: Iterable[str], resource_type: str) -> list[tuple[str, str]]:
    """The ``_include`` parameters that belong to ``resource_type``'s search."""
    return [("_include", i) for i in include if i.split(":", 1)[0] == resource_type]


def references(node: Any) -> set[str]:
    """Every relative ``Type/id`` a resource refers to (versions and bases stripped)."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            parts = ref.split("/_history")[0].rstrip("/").split("/")
            if len(parts) >= 2:
                found.add("/".join(parts[-2:]))
        for value in node.values():
            if isinstance(value, dict | list):
                found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def _check_patient_id(patient_id: Any) -> None:
    """Refuse ids that would silently widen a search (empty, None, or containing the OR separator)."""
    if not isinstance(patient_id, str) or not patient_id or "," in patient_id:
        raise ValueError("patient id must be a non-empty string without ','")


def _dedupe(resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeats of the same (type, id), keeping the first; order is preserved."""
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    for resource in resources:
        key = (str(resource.get("resourceType")), str(resource.get("id")))
        if resource.get("id") is not None and key in seen:
            continue
        seen.add(key)
        out.append(resource)
    return out
