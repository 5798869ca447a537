"""Hostile requests at every door of the service: no 5xx, and every error body typed.

A hypothesis suite sends requests to ``$simulate`` (POST and GET), the Subscription webhook (PUT, POST,
DELETE, status, replay), CDS Hooks (discovery, service call, feedback), the SMART pages (launch, callback,
patient page and its API, static files), ``/model-card``, ``/health`` and unknown paths: random methods,
content types and headers; bodies built from valid ones (Parameters, a CDS request with complete prefetch,
record resources, Bundles, feedback) with hostile changes at every level (wrong JSON types, deleted keys,
non-list ``meta.tag`` and ``Bundle.entry``, birth dates in 2030 or 1800, huge strings and numbers, deep
nesting, unicode) and hostile bytes (NaN/Infinity literals, numbers too long to parse, duplicate keys,
invalid UTF-8, UTF-16, truncation, bodies over the size limit). The FHIR server of ``$simulate`` is replaced at
the client boundary by a stub answering from a (hostile) record, as ``test_service_operations`` does; the
SMART configuration is stubbed with ``responses``. Every response must be below 500, except 502/504 where the
service had to read a FHIR server the request named (documented for an unreachable server), and every
error must be typed: CDS Hooks error JSON under ``/cds-services``, the HTML error page of the SMART browser
pages or the ``{"error": ...}`` JSON of their page API, an OperationOutcome (``application/fhir+json``)
everywhere else. The suite runs once with ``dev_no_auth`` (deep paths) and once with authentication on.

Seeded (``derandomize=True``): 2,000 requests with doors open and 500 with authentication in the default run.
Full run (10,000 + 2,500)::

    FHIRTWIN_FUZZ_EXAMPLES=10000 .venv/bin/pytest tests/unit/test_hostile_requests.py -q

The limits themselves (413 over 1 MiB, 400 nested deeper than 64, typed 404/405/422 and last-resort 500)
have their own tests below.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
import responses
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from test_hostile_inputs import _wrong_type
from writeback_fixtures import versioned_resources

from fhirtwin.fhir import errors as fe
from fhirtwin.service import cds_hooks, limits, runtime
from fhirtwin.service.app import ServiceSettings, create_app
from fhirtwin.service.runtime import WebhookOptions
from fhirtwin.service.security import AuthSettings
from fhirtwin.writeback.jws import generate_key

EXAMPLES = int(os.environ.get("FHIRTWIN_FUZZ_EXAMPLES", "2000"))
FHIR_BASE = "https://fhir.example.org/fhir"
FHIR_JSON = "application/fhir+json"
SERVICE = f"/cds-services/{cds_hooks.SERVICE_ID}"
WEBHOOK_SECRET = "fuzz-webhook-secret"
SECRET_MARKER = "SECRET-TOKEN-0451"
PID = "ftp-0001"

# ----------------------------------------------------------------------------------------- the record


def fuzz_record() -> list[dict[str, Any]]:
    """The first cohort patient, trimmed to the newest Observation per code (a full run, a small body)."""
    patient_id, resources = versioned_resources()
    assert patient_id == PID
    newest: dict[str, dict[str, Any]] = {}
    kept: list[dict[str, Any]] = []
    for resource in resources:
        if resource["resourceType"] != "Observation":
            kept.append(resource)
            continue
        code = json.dumps(resource.get("code"), sort_keys=True)
        when = str(resource.get("effectiveDateTime", ""))
        if code not in newest or when > str(newest[code].get("effectiveDateTime", "")):
            newest[code] = resource
    return kept + list(newest.values())


RECORD = fuzz_record()
#: The patient's active Consent (a privacy permit: the record may be used for treatment).
CONSENT = {"resourceType": "Consent", "id": "consent-1", "status": "active",
           "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                 "code": "patient-privacy"}]},
           "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
           "patient": {"reference": f"Patient/{PID}"}, "dateTime": "2024-01-01",
           "provision": {"type": "permit", "period": {"start": "2024-01-01"}}}


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def prefetch_of(record: list[dict[str, Any]]) -> dict[str, Any]:
    """Complete prefetch for the service's templates (as its discovery document lists them)."""
    out: dict[str, Any] = {"patient": record[0]}
    for key, template in cds_hooks.discovery()["services"][0]["prefetch"].items():
        if key != "patient":
            rtype = template.split("?", 1)[0]
            out[key] = searchset([r for r in [*record, copy.deepcopy(CONSENT)] if r["resourceType"] == rtype])
    return out


class StubFhir:
    """The FhirClient methods the engine calls, answering like HAPI from ``record`` (which a test may make
    hostile); an unknown patient is FhirNotFound, as a 404 read of the Patient is."""

    base_url = FHIR_BASE
    request_count = 0

    def __init__(self, record: list[dict[str, Any]]) -> None:
        self.record = record
        self.consents: list[Any] = [copy.deepcopy(CONSENT)]

    def search_all(self, resource_type: str, params: object, **_: object) -> Iterator[Any]:
        if resource_type == "Consent":
            yield from copy.deepcopy(self.consents)

    def capabilities(self) -> dict[str, Any]:
        return {"resourceType": "CapabilityStatement", "software": {"name": "HAPI FHIR Server"}}

    def fetch_patient_record(self, patient_id: str, types: object, **_: object) -> list[dict[str, Any]]:
        if patient_id != PID:
            raise fe.FhirNotFound("not found", status=404)
        return copy.deepcopy(self.record)

    def batch(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": searchset([]), "response": {"status": "200 OK"}} for _ in entries]}

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": f"{e['resource']['resourceType']}/t{i}/_history/1"}}
            for i, e in enumerate(bundle["entry"])]}

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        return resource

    def operation(self, *_: object, **__: object) -> dict[str, Any]:
        return {"resourceType": "Parameters"}


# ----------------------------------------------------------------------------------------- strategies

HOSTILE_STRINGS = [
    "", " ", "NaN", "Infinity", "-Infinity", "1e999", "9" * 400, "-0", "seventy", "2030-01-01", "1800-01-01",
    "1899-12-31", "0001-01-01", "9999-12-31", "2024-02-30", "2024-13-01", "2024-05-02T25:61:00Z", "2024",
    "-2024-01-01", "\x00", "\u202e", "\ud7ff\ufffd", "💥" * 5, "a" * 3000, "Patient/p2", "Patient/", "#",
    "urn:uuid:1", "final", "../../etc/passwd", "<script>x</script>", "${jndi:x}", "' OR 1=1 --",
]
HOSTILE_DATES = ["2030-01-01", "2099-12-31", "1800-01-01", "1899-12-31", "0001-01-01", "9999-12-31", "2024-02-30",
                 "1960", "1960-04", "2030-01-01T00:00:00Z", "not a date", "", "1960-04-12T99:00:00"]
NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 1e308, -1e308, 5e-324, -0.0, 0, -1]),
)
LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(HOSTILE_STRINGS))
JSONISH = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
DATE_KEYS = {"birthDate", "effectiveDateTime", "issued", "onsetDateTime", "recordedDate", "authoredOn", "start",
             "end", "abatementDateTime", "lastUpdated", "deceasedDateTime", "outcomeTimestamp", "occurrenceDateTime"}
HOSTILE_IDS = ["a b", "..", "x" * 65, "\u00e9", "p1,p2", f"{PID}/_history/1", "%00", "Patient", "-", "",
               "💥", "'", "<x>", "null", f"{PID}?_count=1"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
CONTENT_TYPES = [FHIR_JSON, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", "",
                 "application/fhir+json; fhirVersion=4.0", "*/*", "application/json; charset=utf-16"]
ACCEPTS = ["*/*", FHIR_JSON, "application/json", "text/html", "text/markdown", "image/png", "text/*;q=0",
           "application/json;q=abc", "", ",,,;;;"]
AUTHORIZATIONS = [None, f"Bearer {SECRET_MARKER}", f"Bearer {WEBHOOK_SECRET}", "Bearer", "Bearer ",
                  "Basic Zm9vOmJhcg==", f"Bearer eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.{SECRET_MARKER}",
                  "Bearer e30.e30.e30",
                  "Bearer %%%.###.$$$", "Bearer eyJraWQiOjF9.bm90IGpzb24.x", "Bearer a.b.c.d",
                  "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.eyJpc3MiOiJodHRwczovL2VociIsImp0aSI6MX0.AAAA"]
RESOURCE_TYPES = ["Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement", "Medication",
                  "RiskAssessment", "Bundle", "Parameters", "Foo", "", "patient", "Observation.x"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _at(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        root = root[key]
    return root


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


#: Structural changes (dates, non-list ``meta.tag``, non-list ``Bundle.entry``) weigh double: the likeliest 500s.
MUTATIONS = ["replace", "wrong_type", "delete", "date", "date", "tag", "tag", "entry", "entry", "deep", "huge",
             "number"]


@st.composite
def mutated(draw: st.DrawFn, template: Any, max_mutations: int = 3) -> Any:
    """A copy of ``template`` with up to ``max_mutations`` hostile changes anywhere in it."""
    tree = copy.deepcopy(template)
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = _paths(tree)
        if not paths:
            break
        op = draw(st.sampled_from(MUTATIONS))
        if op == "date":
            dated = [p for p in paths if p[-1] in DATE_KEYS] or paths
            path = dated[draw(st.integers(0, len(dated) - 1))]
            _at(tree, path[:-1])[path[-1]] = draw(st.sampled_from(HOSTILE_DATES) | JSONISH)
            continue
        if op in ("tag", "entry"):
            key = "meta" if op == "tag" else "entry"
            owners = [p for p in [(), *paths] if isinstance(_at(tree, p), dict)
                      and ("resourceType" in _at(tree, p) if op == "tag" else _at(tree, p).get("resourceType")
                           == "Bundle")]
            if owners:
                owner = _at(tree, owners[draw(st.integers(0, len(owners) - 1))])
                value = draw(st.sampled_from(["tag", {}, 7, [1, "x", None], None, [[{}]], {"system": "x"}]))
                if op == "tag":
                    owner[key] = {"tag": value, "security": value, "versionId": value}
                else:
                    owner[key] = value
                continue
            op = "replace"
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent = _at(tree, path[:-1])
        if op == "delete":
            del parent[path[-1]]
        elif op == "wrong_type":
            parent[path[-1]] = _wrong_type(parent[path[-1]])
        elif op == "deep":
            parent[path[-1]] = _nested(draw(st.integers(1, 40)), parent[path[-1]])
        elif op == "huge":
            parent[path[-1]] = draw(st.sampled_from(["x" * 200_000, "\u00e9" * 50_000, 10**399, [0] * 20_000]))
        elif op == "number":
            parent[path[-1]] = draw(NUMBERS)
        else:
            parent[path[-1]] = draw(JSONISH)
    return tree


RAW_MUTATIONS = ["none"] * 6 + ["dup_key", "literal", "bad_utf8", "truncate", "bom", "utf16", "deep_wrap",
                                 "garbage", "empty", "oversize"]


@st.composite
def body_bytes(draw: st.DrawFn, value: Any) -> bytes:
    """``value`` as JSON text, sometimes damaged at the byte level."""
    text = json.dumps(value).encode()
    raw = draw(st.sampled_from(RAW_MUTATIONS))
    if raw == "dup_key" and text.startswith(b"{"):
        key = draw(st.sampled_from([b'"resourceType":"Bundle",', b'"hook":7,', b'"parameter":{},', b'"entry":1,']))
        return b"{" + key + text[1:]
    if raw == "literal":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"1e-999",
                                        b"0x10", b"01", b"+1", b"true1", b'"\\ud800"', b'"\\u0000"']))
        at = next((i for i, c in enumerate(text) if c in b"0123456789"), None)
        return text[:at] + literal + text[at + 1:] if at is not None else literal
    if raw == "bad_utf8":
        at = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        return text[:at] + bad + text[at:]
    if raw == "truncate":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if raw == "bom":
        return b"\xef\xbb\xbf" + text
    if raw == "utf16":
        return text.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
    if raw == "deep_wrap":
        depth = draw(st.sampled_from([63, 65, 1000, 100_000]))
        return b"[" * depth + text + b"]" * depth
    if raw == "garbage":
        return draw(st.binary(max_size=64))
    if raw == "empty":
        return b""
    if raw == "oversize":
        return b'{"x":"' + b"a" * limits.MAX_BODY_BYTES + b'"}'
    return text


class HostileRequest:
    """One request; ``reads_named_server``: the service may have to read a FHIR server the request named
    (502/504 allowed); ``record``: what the stub FHIR server answers with."""

    def __init__(self, method: str, url: str, headers: dict[str, str] | None = None, content: bytes | None = None,
                 *, params: list[tuple[str, str]] | None = None, reads_named_server: bool = False,
                 record: list[dict[str, Any]] | None = None, consents: list[Any] | None = None) -> None:
        self.method, self.url, self.headers, self.content = method, url, headers or {}, content
        self.params, self.reads_named_server, self.record = params or [], reads_named_server, record
        self.consents = consents

    def __repr__(self) -> str:  # short: hypothesis prints it for a failing example
        body = (self.content or b"")[:300]
        return (f"HostileRequest({self.method} {self.url[:200]} params={self.params[:5]!r} headers={self.headers!r} "
                f"body[{len(self.content or b'')}]={body!r})")


@st.composite
def headers(draw: st.DrawFn, content_type: str = FHIR_JSON) -> dict[str, str]:
    out = {"Content-Type": draw(st.sampled_from([content_type] * 4 + CONTENT_TYPES))}
    auth = draw(st.sampled_from(AUTHORIZATIONS))
    if auth is not None:
        out["Authorization"] = auth
    if draw(st.booleans()):
        out["Accept"] = draw(st.sampled_from(ACCEPTS))
    if draw(st.integers(0, 4)) == 0:
        out["Cookie"] = f"fhirtwin_session={draw(st.sampled_from(['x', '', 'a' * 500, '%00', SECRET_MARKER]))}"
    if draw(st.integers(0, 4)) == 0:
        out["X-CSRF-Token"] = draw(st.sampled_from(["", "forged", "a" * 1000]))
    return {k: v for k, v in out.items() if v or k != "Content-Type"}


def _method(draw: st.DrawFn, usual: str) -> str:
    return usual if draw(st.integers(0, 9)) else draw(st.sampled_from(METHODS))


def _id(draw: st.DrawFn, usual: str) -> str:
    return quote(usual if draw(st.integers(0, 4)) else draw(st.sampled_from(HOSTILE_IDS)), safe="")


def _query(draw: st.DrawFn, names: list[str]) -> list[tuple[str, str]]:
    keys = st.sampled_from([*names, "junk", "_format", ""])
    values = st.sampled_from(HOSTILE_STRINGS + HOSTILE_DATES + ["true", "false", "10", "5", "30", "1e3", "-1", "7.5",
                                                               "baseline", FHIR_BASE, "https://evil.example/fhir"])
    return draw(st.lists(st.tuples(keys, values), max_size=4))


PARAMETERS = {"resourceType": "Parameters", "parameter": [{"name": "write", "valueBoolean": False},
                                                         {"name": "horizon", "valueInteger": 10},
                                                         {"name": "scenario", "valueString": "baseline"}]}
FEEDBACK = {"feedback": [{"card": str(uuid.UUID(int=1)), "outcome": "accepted",
                          "acceptedSuggestions": [{"id": str(uuid.UUID(int=2))}],
                          "outcomeTimestamp": "2026-11-27T10:00:00Z"},
                         {"card": str(uuid.UUID(int=1)), "outcome": "overridden",
                          "overrideReason": {"reason": {"code": "x", "system": "https://example.org"}},
                          "outcomeTimestamp": "2026-11-27T10:01:00Z"}]}
MEDICATION = {"resourceType": "Medication", "id": "m1", "code": {"coding": [
    {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "617312"}]}}


def hook_request() -> dict[str, Any]:
    return {"hook": "patient-view", "hookInstance": str(uuid.UUID(int=3)),
            "context": {"userId": "Practitioner/example", "patientId": PID}, "prefetch": prefetch_of(RECORD)}


HOOK_REQUEST = hook_request()
DOORS = ["simulate_post"] * 4 + ["simulate_get"] * 2 + ["hook_put"] * 3 + ["hook_post_bundle"] * 2 + [
    "hook_post_type", "hook_delete", "hook_status", "hook_replay", "cds_discovery"] + ["cds_call"] * 5 + [
    "cds_feedback"] * 2 + ["launch", "callback", "patient_page", "page_api", "static", "model_card", "health",
                            "junk"]


@st.composite
def hostile_request(draw: st.DrawFn) -> HostileRequest:
    """One hostile request to a door drawn from ``DOORS``."""
    door = draw(st.sampled_from(DOORS))
    if door in ("simulate_post", "simulate_get"):
        record = [draw(mutated(r, 1)) if draw(st.integers(0, 5)) == 0 else r for r in RECORD]
        consents = [draw(mutated(CONSENT))] if draw(st.booleans()) else None
        url = f"/fhir/Patient/{_id(draw, PID)}/$simulate"
        if door == "simulate_get":
            return HostileRequest(_method(draw, "GET"), url, draw(headers()), record=record, consents=consents,
                                  params=_query(draw, ["write", "scenario", "horizon"]))
        return HostileRequest(_method(draw, "POST"), url, draw(headers()), draw(body_bytes(draw(mutated(PARAMETERS)))),
                              record=record, consents=consents)
    if door in ("hook_put", "hook_post_type"):
        resource = draw(mutated(draw(st.sampled_from([*RECORD[:3], RECORD[-1], MEDICATION]))))
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        rtype = rtype if isinstance(rtype, str) and draw(st.integers(0, 3)) else draw(st.sampled_from(RESOURCE_TYPES))
        url = f"/hooks/fhir/{quote(rtype[:64], safe='') or 'x'}"
        if door == "hook_put":
            url += f"/{_id(draw, 'r1')}"
        return HostileRequest(_method(draw, "PUT" if door == "hook_put" else "POST"), url, draw(headers()),
                              draw(body_bytes(resource)))
    if door == "hook_post_bundle":
        bundle = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": r} for r in RECORD[:4]]}
        return HostileRequest(_method(draw, "POST"), "/hooks/fhir", draw(headers()),
                              draw(body_bytes(draw(mutated(bundle)))))
    if door == "hook_delete":
        rtype = quote(draw(st.sampled_from(RESOURCE_TYPES)), safe="") or "x"
        return HostileRequest(_method(draw, "DELETE"), f"/hooks/fhir/{rtype}/{_id(draw, 'r1')}", draw(headers()))
    if door == "hook_status":
        return HostileRequest(_method(draw, "GET"), "/hooks/fhir/status", draw(headers()))
    if door == "hook_replay":
        return HostileRequest(_method(draw, "POST"), "/hooks/fhir/dead-letter/replay", draw(headers()),
                              draw(body_bytes(draw(JSONISH))))
    if door == "cds_discovery":
        return HostileRequest(_method(draw, "GET"), "/cds-services", draw(headers("application/json")))
    if door == "cds_call":
        body = draw(mutated(HOOK_REQUEST))
        named = False
        if draw(st.integers(0, 3)) == 0 and isinstance(body, dict):
            body["fhirServer"] = draw(st.sampled_from([FHIR_BASE, "ftp://x", "not a url", 42, None, {"a": 1},
                                                       "https://evil.example/fhir", "http://127.0.0.1:9/fhir"]))
            named = isinstance(body["fhirServer"], str) and body["fhirServer"].startswith("http")
        service = SERVICE if draw(st.integers(0, 9)) else f"/cds-services/{_id(draw, 'x')}"
        return HostileRequest(_method(draw, "POST"), service, draw(headers("application/json")),
                              draw(body_bytes(body)), reads_named_server=named)
    if door == "cds_feedback":
        return HostileRequest(_method(draw, "POST"), f"{SERVICE}/feedback", draw(headers("application/json")),
                              draw(body_bytes(draw(mutated(FEEDBACK)))))
    if door == "launch":
        return HostileRequest(_method(draw, "GET"), "/launch", draw(headers("")),
                              params=_query(draw, ["iss", "launch"]))
    if door == "callback":
        return HostileRequest(_method(draw, "GET"), "/callback", draw(headers("")),
                              params=_query(draw, ["code", "state", "error"]))
    if door == "patient_page":
        return HostileRequest(_method(draw, "GET"), "/patient", draw(headers("")))
    if door == "page_api":
        path = draw(st.sampled_from(["/patient/whatif", "/patient/write"]))
        return HostileRequest(_method(draw, "POST"), path, draw(headers("application/json")),
                              draw(body_bytes(draw(mutated({"interventions": [0, 1]})))))
    if door == "static":
        name = _id(draw, draw(st.sampled_from(["patient.js", "page.css", "patient.html", "..%2Fsmart.py"])))
        return HostileRequest(_method(draw, "GET"), f"/static/fhirtwin/{name}", draw(headers("")))
    if door == "model_card":
        return HostileRequest(_method(draw, "GET"), "/model-card", draw(headers("")), params=_query(draw, ["model"]))
    if door == "health":
        return HostileRequest(_method(draw, "GET"), "/health", draw(headers("")))
    junk = draw(st.sampled_from(["/", "/fhir", "/fhir/Patient", "/fhir/Patient/x/$everything", "/cds-services/",
                                 "/cds-services/a/b/c", "/hooks", "/docs", "/openapi.json", "/%00", "/💥",
                                 "/fhir/Patient/x/$simulate/extra", "/.well-known/smart-configuration"]))
    return HostileRequest(draw(st.sampled_from(METHODS)), quote(junk, safe="/$%"), draw(headers()),
                          draw(body_bytes(draw(JSONISH))))


# ----------------------------------------------------------------------------------------- checks


def typed_error(path: str, response: Any) -> str | None:
    """Why an error response is not typed for its door (None when it is)."""
    media = response.headers.get("content-type", "").split(";")[0].strip()
    if path in limits.BROWSER_PAGES and media == "text/html":
        return None if "<html" in response.text else "an HTML error without the error page"
    try:
        body = response.json()
    except ValueError:
        return f"{media or 'no content type'} body that is not JSON"
    if not isinstance(body, dict):
        return "JSON error body that is not an object"
    if path == "/cds-services" or path.startswith("/cds-services/"):
        ok = media == "application/json" and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
        return None if ok else "not CDS Hooks error JSON"
    if path in limits.PAGE_API and isinstance(body.get("error"), str):
        return None
    issues = body.get("issue")
    if media != FHIR_JSON or body.get("resourceType") != "OperationOutcome" or not isinstance(issues, list) \
            or not issues or not all(isinstance(i, dict) and i.get("severity") and i.get("code") for i in issues):
        return "not an OperationOutcome"
    return None


def problems(request: HostileRequest, response: Any) -> list[str]:
    """What is wrong with the answer to a hostile request (empty when nothing is)."""
    found = []
    status = response.status_code
    if status >= 500 and not (status in (502, 504) and request.reads_named_server):
        found.append(f"HTTP {status}")
    if "Traceback" in response.text or 'File "' in response.text:
        found.append("a traceback in the body")
    if SECRET_MARKER in response.text:
        found.append("the credential echoed")
    if status >= 400 and request.method != "HEAD":
        reason = typed_error(response.request.url.path, response)
        if reason:
            found.append(f"HTTP {status}: {reason}")
    return found


def send(client: TestClient, stub: StubFhir, request: HostileRequest) -> Any:
    stub.record = request.record if request.record is not None else RECORD
    stub.consents = request.consents if request.consents is not None else [copy.deepcopy(CONSENT)]
    return client.request(request.method, request.url, params=request.params or None, headers=request.headers,
                          content=request.content)


# ----------------------------------------------------------------------------------------- the apps


@dataclass
class Service:
    client: TestClient
    stub: StubFhir


def _smart_configuration() -> dict[str, Any]:
    return {"authorization_endpoint": f"{FHIR_BASE}/auth/authorize", "token_endpoint": f"{FHIR_BASE}/auth/token",
            "code_challenge_methods_supported": ["S256"], "capabilities": ["launch-ehr"]}


_STUBS: dict[str, StubFhir] = {}


def _service(tmp_path_factory: pytest.TempPathFactory, *, dev_no_auth: bool) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("hostile")
    key = folder / "key.pem"
    key.write_bytes(generate_key("ES256").private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    service_settings = ServiceSettings(
        fhir_server=FHIR_BASE, public_url="https://twin.example.org", draws=16, signing_key_file=str(key),
        dev_no_auth=dev_no_auth, store_path=str(folder / "service.sqlite3"),
        webhook=WebhookOptions(window=3600.0, max_wait=3600.0),  # deliveries are queued, never run here
        auth=AuthSettings(webhook_secret=WEBHOOK_SECRET))
    stub = _STUBS[str(service_settings.store_path)] = StubFhir(RECORD)
    with pytest.MonkeyPatch.context() as patch, responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        # both services live at once (module fixtures): each app must reach its own stub
        patch.setattr(runtime, "shared_client", lambda settings: _STUBS[str(settings.store_path)])
        patch.setattr(cds_hooks, "CARD_DRAWS", 16)
        mock.add(responses.GET, f"{FHIR_BASE}/.well-known/smart-configuration", json=_smart_configuration())
        mock.add(responses.POST, f"{FHIR_BASE}/auth/token", json={"error": "invalid_grant"}, status=400)
        yield Service(TestClient(create_app(service_settings), raise_server_exceptions=False,
                                 follow_redirects=False), stub)


@pytest.fixture(scope="module")
def open_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(tmp_path_factory, dev_no_auth=True)


@pytest.fixture(scope="module")
def guarded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(tmp_path_factory, dev_no_auth=False)


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


@FUZZ
@given(request=hostile_request())
def test_hostile_requests_with_doors_open(open_service: Service, request: HostileRequest) -> None:
    response = send(open_service.client, open_service.stub, request)
    assert not problems(request, response), (problems(request, response), response.text[:500])


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 1))
@given(request=hostile_request())
def test_hostile_requests_with_authentication(guarded_service: Service, request: HostileRequest) -> None:
    response = send(guarded_service.client, guarded_service.stub, request)
    assert not problems(request, response), (problems(request, response), response.text[:500])


# ----------------------------------------------------------------------------------------- the limits


@pytest.fixture()
def client(open_service: Service) -> TestClient:
    return open_service.client


def test_a_body_over_the_limit_is_413_by_door(client: TestClient) -> None:
    big = json.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "scenario", "valueString": "x" * limits.MAX_BODY_BYTES}]}).encode()
    response = client.post(f"/fhir/Patient/{PID}/$simulate", content=big, headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 413
    assert response.headers["content-type"] == FHIR_JSON
    assert response.json()["issue"][0]["code"] == "too-long"
    response = client.post(SERVICE, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"


def test_a_streamed_body_is_counted(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType": "Bundle", "entry": ['
        for _ in range(40):
            yield b'{"resource": {"resourceType": "Observation", "note": "' + b"y" * 32_000 + b'"}},'
        yield b"{}]}"

    response = client.post("/hooks/fhir", content=chunks(), headers={"Content-Type": FHIR_JSON})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413 and response.json()["resourceType"] == "OperationOutcome"
    small = client.post("/hooks/fhir", content=iter([b'{"resourceType":', b'"Bundle","entry":[]}']),
                        headers={"Content-Type": FHIR_JSON})
    assert small.status_code == 200


def test_json_nested_deeper_than_the_limit_is_400_before_the_handler(client: TestClient) -> None:
    for depth in (limits.MAX_JSON_DEPTH + 1, 100_000):
        body = b"[" * depth + b"]" * depth
        response = client.post(SERVICE, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json() == {"error": "bad_request",
                                   "message": f"JSON nested deeper than {limits.MAX_JSON_DEPTH} levels"}
        response = client.post(f"/fhir/Patient/{PID}/$simulate", content=body, headers={"Content-Type": FHIR_JSON})
        assert response.status_code == 400 and "nested deeper" in response.json()["issue"][0]["diagnostics"]
    # at the limit the handler answers (a JSON array is not a CDS request)
    body = b"[" * limits.MAX_JSON_DEPTH + b"]" * limits.MAX_JSON_DEPTH
    response = client.post(SERVICE, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested" not in response.json()["message"]


def test_depth_scan_skips_strings_and_reads_utf16() -> None:
    shallow = json.dumps({"a": "[[[[{{{{" * 50, "b": ['\\"[[[' * 30]}).encode()
    assert not limits.json_too_deep(shallow, 4)
    assert limits.json_too_deep(b'{"a": [[[["x"]]]]}', 4)
    assert not limits.json_too_deep(b'{"a": [[["x"]]]}', 4)
    deep = ("[" * 10 + "]" * 10).encode("utf-16")
    assert json.loads(deep) and limits.json_too_deep(deep, 9) and not limits.json_too_deep(deep, 10)


def test_framework_errors_are_typed_by_door(client: TestClient) -> None:
    missing = client.get("/no/such/door")
    assert missing.status_code == 404 and missing.headers["content-type"] == FHIR_JSON
    assert missing.json()["issue"][0]["code"] == "not-found"
    wrong_method = client.delete("/health")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
    assert wrong_method.json()["issue"][0]["code"] == "not-supported"
    cds = client.get(f"{SERVICE}/nope")
    assert cds.status_code in (404, 405) and set(cds.json()) == {"error", "message"}
    static = client.get("/static/fhirtwin/missing.js")
    assert static.status_code == 404 and static.json()["resourceType"] == "OperationOutcome"


def test_unhandled_exceptions_and_invalid_parameters_are_typed() -> None:
    app = create_app(ServiceSettings(fhir_server=FHIR_BASE, dev_no_auth=True))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail at /some/path")

    @app.get("/cds-services/x/boom")
    def cds_boom() -> None:
        raise RuntimeError("secret detail")

    @app.get("/count")
    def count(n: int) -> dict[str, int]:
        return {"n": n}

    client = TestClient(app)  # raising server exceptions: the middleware must not let one through
    invalid = client.get("/count", params={"n": "SECRET-not-a-number"})
    assert invalid.status_code == 400 and invalid.headers["content-type"] == FHIR_JSON
    assert "query.n" in invalid.json()["issue"][0]["diagnostics"] and "SECRET" not in invalid.text
    response = client.get("/boom")
    assert response.status_code == 500 and response.json()["issue"][0]["code"] == "exception"
    assert "secret" not in response.text
    response = client.get("/cds-services/x/boom")
    assert response.status_code == 500 and response.json() == {"error": "internal_error", "message": "internal error"}


def test_bundles_whose_entry_is_not_an_array_are_refused(client: TestClient) -> None:
    """Found by the suite: a webhook Bundle or a CDS prefetch searchset with ``"entry": 7`` was a 500."""
    response = client.post("/hooks/fhir", json={"resourceType": "Bundle", "type": "history", "entry": 7},
                           headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"
    body = copy.deepcopy(HOOK_REQUEST)
    body["prefetch"]["observations"]["entry"] = 7
    response = client.post(SERVICE, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "bad_request",
                               "message": "prefetch.observations: Bundle.entry must be an array"}


def test_consents_with_odd_patients_or_periods_are_not_a_500(open_service: Service) -> None:
    """Found by the suite: ``Consent.patient`` as a string or a list, and a period ending 9999-12-31, were 500s
    at ``$simulate``."""
    odd = [{"patient": "Patient/ftp-0001"}, {"patient": [{"reference": f"Patient/{PID}"}]}]
    odd += [{"provision": {"type": "deny", "period": {"end": end}}} for end in ("9999-12-31", "9999-12", "9999")]
    for change in odd:
        consent = {**copy.deepcopy(CONSENT), "provision": {"type": "deny"}, **change}
        request = HostileRequest("GET", f"/fhir/Patient/{PID}/$simulate", consents=[consent])
        response = send(open_service.client, open_service.stub, request)
        # every one denies: an unreadable patient counts for the searched patient (fail closed)
        assert response.status_code == 403 and not problems(request, response), (change, response.text[:200])


def test_the_checks_can_fail() -> None:
    """The suite's judge refuses what the doors must never answer."""

    class Answer:
        def __init__(self, request: HostileRequest, status: int, body: bytes, media: str) -> None:
            self.status_code, self.text, self.headers = status, body.decode(), {"content-type": media}
            self.request = SimpleNamespace(url=SimpleNamespace(path=request.url))

        def json(self) -> Any:
            return json.loads(self.text)

    hook = HostileRequest("POST", "/hooks/fhir")
    assert problems(hook, Answer(hook, 500, b'{"resourceType":"OperationOutcome","issue":[]}', FHIR_JSON))
    assert problems(hook, Answer(hook, 404, b'{"detail":"Not Found"}', "application/json"))
    assert problems(hook, Answer(hook, 400, b'{"resourceType":"OperationOutcome","issue":[]}', FHIR_JSON))
    assert not problems(hook, Answer(hook, 400, b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                                                b'"code":"invalid"}]}', FHIR_JSON))
    cds = HostileRequest("POST", SERVICE)
    assert problems(cds, Answer(cds, 400, b'{"detail":"x"}', "application/json"))
    assert problems(cds, Answer(cds, 502, b'{"error":"fhir_server_error","message":"m"}', "application/json"))
    named = HostileRequest("POST", SERVICE, reads_named_server=True)
    assert not problems(named, Answer(named, 502, b'{"error":"fhir_server_error","message":"m"}', "application/json"))
    page = HostileRequest("GET", "/launch")
    assert not problems(page, Answer(page, 400, b"<!doctype html><html>refused</html>", "text/html"))
    assert problems(page, Answer(page, 400, f"<html>{SECRET_MARKER}</html>".encode(), "text/html"))

