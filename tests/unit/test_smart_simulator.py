"""The SMART test simulator enforces what the app must do: PKCE S256, exact redirect_uri, single-use codes,
state passthrough, bearer tokens on the FHIR proxy (the upstream is never reached in these tests)."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlparse

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fastapi.testclient import TestClient

from fhirtwin.sandbox.smart_simulator import create_simulator, s256
from fhirtwin.service.smart import code_challenge, new_code_verifier

SIM = "http://testserver"
REDIRECT = "http://app.example/callback"


@pytest.fixture()
def sim() -> TestClient:
    app = create_simulator("http://127.0.0.1:9/fhir", SIM, redirect_uris=(REDIRECT,), default_patient="p-default")
    return TestClient(app, follow_redirects=False)


def authorize(sim: TestClient, verifier: str, **overrides: str):
    launch = sim.post("/launch-context", json={"patient": "p-1"}).json()["launch"]
    params = {"response_type": "code", "client_id": "fhirtwin", "redirect_uri": REDIRECT, "scope": "launch openid",
              "state": "st-123", "aud": f"{SIM}/fhir", "code_challenge": code_challenge(verifier),
              "code_challenge_method": "S256", "launch": launch}
    params.update(overrides)
    return sim.get("/authorize", params=params)


def redirect_query(response) -> dict[str, str]:
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlparse(location).query).items()}


def token(sim: TestClient, code: str, verifier: str, redirect_uri: str = REDIRECT):
    return sim.post("/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                                    "code_verifier": verifier, "client_id": "fhirtwin"})


def test_discovery_offers_s256_only(sim: TestClient) -> None:
    config = sim.get("/fhir/.well-known/smart-configuration").json()
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["authorization_endpoint"] == f"{SIM}/authorize" and config["token_endpoint"] == f"{SIM}/token"
    assert "launch-ehr" in config["capabilities"]


def test_same_s256_as_the_app() -> None:
    verifier = new_code_verifier()
    assert s256(verifier) == code_challenge(verifier)


def test_full_grant_with_launch_context_and_signed_id_token(sim: TestClient) -> None:
    verifier = new_code_verifier()
    query = redirect_query(authorize(sim, verifier))
    assert query["state"] == "st-123"
    answer = token(sim, query["code"], verifier)
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["patient"] == "p-1" and body["token_type"] == "Bearer" and body["scope"] == "launch openid"
    header_b64, claims_b64, sig_b64 = body["id_token"].split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    assert header["alg"] == "RS256"
    jwk = sim.get("/jwks").json()["keys"][0]
    n = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big")
    e = int.from_bytes(base64.urlsafe_b64decode(jwk["e"] + "=="), "big")
    rsa.RSAPublicNumbers(e, n).public_key().verify(base64.urlsafe_b64decode(sig_b64 + "=="),
                                                   f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                                                   hashes.SHA256())
    # codes are single use
    assert token(sim, query["code"], verifier).json()["error"] == "invalid_grant"


def test_wrong_verifier_is_refused(sim: TestClient) -> None:
    query = redirect_query(authorize(sim, new_code_verifier()))
    answer = token(sim, query["code"], new_code_verifier())
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_redirect_uri_must_match(sim: TestClient) -> None:
    verifier = new_code_verifier()
    assert authorize(sim, verifier, redirect_uri="http://evil.example/cb").status_code == 400
    query = redirect_query(authorize(sim, verifier))
    assert token(sim, query["code"], verifier, redirect_uri="http://app.example/other").status_code == 400


@pytest.mark.parametrize("override, error", [
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"aud": "http://other/fhir"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"launch": "unknown"}, "invalid_request"),
])
def test_authorize_errors_redirect_with_state(sim: TestClient, override: dict, error: str) -> None:
    query = redirect_query(authorize(sim, new_code_verifier(), **override))
    assert query["error"] == error and query["state"] == "st-123" and "code" not in query


def test_standalone_launch_picks_the_default_patient(sim: TestClient) -> None:
    verifier = new_code_verifier()
    query = redirect_query(authorize(sim, verifier, scope="launch/patient openid", launch=""))
    assert token(sim, query["code"], verifier).json()["patient"] == "p-default"


def test_fhir_proxy_needs_a_valid_bearer_token(sim: TestClient) -> None:
    assert sim.get("/fhir/Patient/p-1").status_code == 401
    assert sim.get("/fhir/Patient/p-1", headers={"Authorization": "Bearer made-up"}).status_code == 401
    assert sim.post("/fhir", json={"resourceType": "Bundle"}).status_code == 401
