"""SMART Backend Services auth: assertions verified independently with cryptography, token caching, JWKS."""

from __future__ import annotations

import base64
import json
import logging
from urllib.parse import parse_qs

import pytest
import responses
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fhirtwin.fhir.auth import (
    CLIENT_ASSERTION_TYPE,
    BearerToken,
    SmartBackendServices,
    discover_smart_configuration,
    public_jwk,
    public_jwks,
)
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.errors import FhirAuthError, FhirValidationError

TOKEN_URL = "https://auth.example.org/token"
BASE = "https://fhir.example.org/r4"
SCOPE = "system/Patient.rs system/Observation.rs"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def int_of(part: str) -> int:
    return int.from_bytes(unb64(part), "big")


def verify_jwt_with_jwk(token: str, jwk: dict) -> tuple[dict, dict]:
    """Independent check: rebuild the public key from the JWK, verify the signature, return header/claims."""
    head_b64, claims_b64, sig_b64 = token.split(".")
    signing_input = f"{head_b64}.{claims_b64}".encode()
    signature = unb64(sig_b64)
    header = json.loads(unb64(head_b64))
    if jwk["kty"] == "RSA":
        public = rsa.RSAPublicNumbers(int_of(jwk["e"]), int_of(jwk["n"])).public_key()
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA384())
    else:
        assert jwk["crv"] == "P-384" and len(signature) == 96
        public = ec.EllipticCurvePublicNumbers(int_of(jwk["x"]), int_of(jwk["y"]), ec.SECP384R1()).public_key()
        der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
        public.verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
    return header, json.loads(unb64(claims_b64))


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_client_assertion_header_claims_and_signature(alg: str, rsa_key, ec_key) -> None:
    key = rsa_key if alg == "RS384" else ec_key
    clock = Clock()
    auth = SmartBackendServices(
        TOKEN_URL, "fhirtwin-app", key, "key-1", SCOPE, alg=alg, jku="https://app.example.org/jwks", clock=clock
    )
    jwk = public_jwk(key, "key-1", alg)
    header, claims = verify_jwt_with_jwk(auth.client_assertion(), jwk)
    assert header == {"alg": alg, "kid": "key-1", "typ": "JWT", "jku": "https://app.example.org/jwks"}
    assert claims["iss"] == claims["sub"] == "fhirtwin-app"
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == int(clock.now)
    assert 0 < claims["exp"] - clock.now <= 300
    assert len(claims["jti"]) >= 32


def test_tampered_assertion_fails_verification(rsa_key) -> None:
    auth = SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE)
    head, claims, sig = auth.client_assertion().split(".")
    forged = json.loads(unb64(claims)) | {"sub": "someone-else"}
    forged_b64 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidSignature):
        verify_jwt_with_jwk(f"{head}.{forged_b64}.{sig}", public_jwk(rsa_key, "k", "RS384"))


def test_jti_unique_per_assertion(ec_key) -> None:
    auth = SmartBackendServices(TOKEN_URL, "app", ec_key, "k", SCOPE, alg="ES384")
    jtis = {json.loads(unb64(auth.client_assertion().split(".")[1]))["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_key_and_alg_checks(rsa_key, ec_key) -> None:
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "app", ec_key, "k", SCOPE, alg="RS384")
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE, alg="HS256")
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", "")  # no default scope
    with pytest.raises(ValueError):
        SmartBackendServices("http://auth.example.org/token", "app", rsa_key, "k", SCOPE)
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE, assertion_lifetime=301)


def test_pem_key_is_accepted(ec_key) -> None:
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    auth = SmartBackendServices(TOKEN_URL, "app", pem, "k", SCOPE, alg="ES384")
    verify_jwt_with_jwk(auth.client_assertion(), public_jwk(ec_key, "k", "ES384"))


def test_public_jwks_shapes(rsa_key, ec_key) -> None:
    jwks = public_jwks((rsa_key, "r", "RS384"), (ec_key, "e", "ES384"))
    rsa_jwk, ec_jwk = jwks["keys"]
    assert rsa_jwk["kty"] == "RSA" and rsa_jwk["e"] == "AQAB" and "d" not in rsa_jwk
    assert int_of(rsa_jwk["n"]) == rsa_key.public_key().public_numbers().n
    assert ec_jwk["kty"] == "EC" and ec_jwk["crv"] == "P-384"
    assert len(unb64(ec_jwk["x"])) == 48 and "=" not in ec_jwk["x"] + ec_jwk["y"] + rsa_jwk["n"]
    assert int_of(ec_jwk["y"]) == ec_key.public_key().public_numbers().y


def token_reply(token: str, expires_in: int = 300) -> dict:
    return {"access_token": token, "token_type": "bearer", "expires_in": expires_in, "scope": "system/Patient.rs"}


@responses.activate
def test_token_request_form_and_caching(rsa_key) -> None:
    clock = Clock()
    auth = SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE, clock=clock)
    responses.post(TOKEN_URL, json=token_reply("tok-1"))
    responses.post(TOKEN_URL, json=token_reply("tok-2"))
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client = FhirClient(BASE, auth=auth)
    client.read("Patient", "p1")
    clock.now += 200  # still valid (300 s - 30 s margin)
    client.read("Patient", "p1")
    token_calls = [c for c in responses.calls if c.request.url == TOKEN_URL]
    assert len(token_calls) == 1 and auth.token_requests == 1
    form = parse_qs(token_calls[0].request.body)
    assert form["grant_type"] == ["client_credentials"]
    assert form["scope"] == [SCOPE]
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE]
    verify_jwt_with_jwk(form["client_assertion"][0], public_jwk(rsa_key, "k", "RS384"))
    fhir_calls = [c for c in responses.calls if c.request.url.startswith(BASE)]
    assert [c.request.headers["Authorization"] for c in fhir_calls] == ["Bearer tok-1", "Bearer tok-1"]
    assert auth.granted_scope == "system/Patient.rs"
    # Within the refresh margin the token is renewed with a new assertion.
    clock.now += 75
    client.read("Patient", "p1")
    assert auth.token_requests == 2
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer tok-2"
    assert client.request_count == 3  # token requests are not FHIR requests


@responses.activate
def test_401_triggers_one_token_refresh(ec_key) -> None:
    auth = SmartBackendServices(TOKEN_URL, "app", ec_key, "k", SCOPE, alg="ES384", clock=Clock())
    responses.post(TOKEN_URL, json=token_reply("old"))
    responses.post(TOKEN_URL, json=token_reply("new"))
    responses.get(f"{BASE}/Patient/p1", status=401)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    FhirClient(BASE, auth=auth).read("Patient", "p1")
    assert auth.token_requests == 2
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer new"


@responses.activate
def test_token_error_raises_without_leaking(rsa_key, caplog: pytest.LogCaptureFixture) -> None:
    auth = SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE, clock=Clock())
    responses.post(TOKEN_URL, status=400, json={"error": "invalid_client", "error_description": "bad"})
    with pytest.raises(FhirAuthError) as err:
        auth.access_token()
    assert err.value.oauth_error == "invalid_client" and err.value.status == 400


@responses.activate
def test_token_never_logged(rsa_key, caplog: pytest.LogCaptureFixture) -> None:
    auth = SmartBackendServices(TOKEN_URL, "app", rsa_key, "k", SCOPE, clock=Clock())
    responses.post(TOKEN_URL, json=token_reply("very-secret-token"))
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    with caplog.at_level(logging.DEBUG):
        FhirClient(BASE, auth=auth).read("Patient", "p1")
    assert caplog.records  # something was logged ...
    assert all("very-secret-token" not in r.getMessage() for r in caplog.records)  # ... but not the token
    assert "very-secret-token" not in repr(auth)


@responses.activate
def test_bearer_token() -> None:
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    auth = BearerToken("abc")
    FhirClient(BASE, auth=auth).capabilities()
    assert responses.calls[0].request.headers["Authorization"] == "Bearer abc"
    assert "abc" not in repr(auth)


@responses.activate
def test_discover_smart_configuration(rsa_key) -> None:
    responses.get(
        f"{BASE}/.well-known/smart-configuration",
        json={"token_endpoint": TOKEN_URL, "capabilities": ["client-confidential-asymmetric"]},
    )
    config = discover_smart_configuration(BASE + "/")
    assert config["token_endpoint"] == TOKEN_URL
    auth = SmartBackendServices.from_discovery(BASE, "app", rsa_key, "k", SCOPE)
    assert auth.token_url == TOKEN_URL


@responses.activate
def test_discover_without_token_endpoint_raises() -> None:
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"capabilities": []})
    with pytest.raises(FhirValidationError):
        discover_smart_configuration(BASE)
