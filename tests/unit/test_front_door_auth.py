"""Every front door refuses callers it cannot identify (one test per finding of the attack on ``serve``).

Tokens are minted with PyJWT, an implementation independent of the service's own JOSE code, and the JWKS
documents are PyJWT's JWK export of the test keys, so a verifier that only agrees with itself would fail here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.testclient import TestClient
from test_cds_hooks import prefetch_for
from test_service_operations import FakeFhir
from writeback_fixtures import versioned_resources

from fhirtwin.sandbox.cohort import generate_cohort
from fhirtwin.service import cds_hooks, runtime
from fhirtwin.service.app import ServiceSettings, create_app
from fhirtwin.service.security import AuthSettings, CdsClient, ConfigError, check_dev_mode, granted, load_config

PUBLIC = "https://twin.example.org"
IDP = "https://idp.example.org"
EHR = "https://ehr.example.org"
EHR_FHIR = "https://ehr.example.org/fhir"
CDS_URL = f"{PUBLIC}/cds-services/{cds_hooks.SERVICE_ID}"
WRITE = "system/Patient.r system/RiskAssessment.cu system/CarePlan.cu system/Provenance.c"
SECRET = "a-webhook-secret-of-some-length"


def jwks_of(*keys: tuple[Any, str, str]) -> dict[str, Any]:
    """A JWKS (PyJWT's export) of (private key, kid, alg) triples."""
    out = []
    for key, kid, alg in keys:
        algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
        out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return {"keys": out}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"idp": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ehr": ec.generate_private_key(ec.SECP384R1()),
            "other": ec.generate_private_key(ec.SECP384R1())}


class JwksServer:
    """A loopback HTTP server answering one JWKS document and counting every request (an SSRF listener)."""

    def __init__(self, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def listener(keys) -> Any:
    server = JwksServer(jwks_of((keys["other"], "jku-key", "ES384")))
    yield server
    server.close()


@pytest.fixture()
def settings(tmp_path, keys, listener) -> ServiceSettings:
    from cryptography.hazmat.primitives import serialization

    idp_jwks = tmp_path / "idp.json"
    idp_jwks.write_text(json.dumps(jwks_of((keys["idp"], "idp-1", "RS384"))))
    ehr_jwks = tmp_path / "ehr.json"
    ehr_jwks.write_text(json.dumps(jwks_of((keys["ehr"], "ehr-1", "ES384"))))
    pem = keys["other"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    (tmp_path / "sign.pem").write_bytes(pem)
    auth = AuthSettings(issuer=IDP, jwks=str(idp_jwks),
                        cds_clients=(CdsClient(issuer=EHR, jwks=str(ehr_jwks), jku=(f"{listener.url}/allowed",),
                                               fhir_servers=(EHR_FHIR,)),),
                        webhook_secret=SECRET)
    return ServiceSettings(fhir_server="http://fhir.invalid/fhir", public_url=PUBLIC, draws=100, auth=auth,
                           signing_key_file=str(tmp_path / "sign.pem"), store_path=str(tmp_path / "store.sqlite3"))


def bearer(keys, scope: str = WRITE, **override: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {"iss": IDP, "aud": f"{PUBLIC}/fhir", "sub": "integration-engine", "client_id": "integration-engine",
              "exp": now + 300, "nbf": now - 5, "iat": now, "scope": scope, **override}
    claims = {k: v for k, v in claims.items() if v is not None}
    token = jwt.encode(claims, keys["idp"], algorithm="RS384", headers={"kid": "idp-1"})
    return {"Authorization": f"Bearer {token}"}


def cds_token(keys, *, key: str = "ehr", kid: str | None = "ehr-1", headers: dict | None = None,
              **override: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {"iss": EHR, "sub": "ehr-client", "aud": CDS_URL, "exp": now + 300, "iat": now,
              "jti": str(uuid.uuid4()), **override}
    claims = {k: v for k, v in claims.items() if v is not None}
    head = {**({"kid": kid} if kid else {}), **(headers or {})}
    return {"Authorization": "Bearer " + jwt.encode(claims, keys[key], algorithm="ES384", headers=head)}


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature (PyJWT refuses to help, as it should)."""
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


# ------------------------------------------------------------------------------------------- $simulate


@pytest.fixture()
def simulate_app(settings, monkeypatch) -> tuple[TestClient, FakeFhir, str]:
    patient_id, resources = versioned_resources()
    fake = FakeFhir(resources)
    monkeypatch.setattr(runtime, "shared_client", lambda _settings: fake)
    return TestClient(create_app(settings), raise_server_exceptions=False), fake, patient_id


def parameters(write: bool = True, **extra: Any) -> dict[str, Any]:
    items = [{"name": "write", "valueBoolean": write}]
    items += [{"name": "horizon", "valueDecimal": v} for k, v in extra.items() if k == "horizon"]
    return {"resourceType": "Parameters", "parameter": items}


def test_simulate_refuses_an_unauthenticated_write(simulate_app) -> None:
    """Finding 1: $simulate wrote with no credentials."""
    client, fake, patient_id = simulate_app
    response = client.post(f"/fhir/Patient/{patient_id}/$simulate", json=parameters())
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert fake.transactions == []


def test_simulate_refuses_a_cross_site_form_even_with_a_token(simulate_app, keys) -> None:
    """Finding 1: an empty body with any Content-Type wrote (a cross-site form can send one)."""
    client, fake, patient_id = simulate_app
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        response = client.post(f"/fhir/Patient/{patient_id}/$simulate", content=b"",
                               headers={**bearer(keys), "Content-Type": content_type})
        assert response.status_code == 415, content_type
        assert response.json()["resourceType"] == "OperationOutcome"
    assert fake.transactions == []


def test_simulate_refuses_duplicate_and_fractional_parameters(simulate_app, keys) -> None:
    """Finding 1: duplicate ``write`` keys wrote; fractional horizons multiplied a patient's results."""
    client, fake, patient_id = simulate_app
    duplicated = {"resourceType": "Parameters", "parameter": [{"name": "write", "valueBoolean": False},
                                                               {"name": "write", "valueBoolean": True}]}
    assert client.post(f"/fhir/Patient/{patient_id}/$simulate", json=duplicated,
                       headers=bearer(keys)).status_code == 400
    for horizon in (10.5, 10.000001, 7.25):
        response = client.post(f"/fhir/Patient/{patient_id}/$simulate", json=parameters(horizon=horizon),
                               headers=bearer(keys))
        assert response.status_code == 400, horizon
    assert fake.transactions == []


def test_simulate_get_needs_a_read_token_and_writes_need_write_scopes(simulate_app, keys) -> None:
    """Finding 1: ``GET $simulate`` returned any patient's results to anyone."""
    client, fake, patient_id = simulate_app
    url = f"/fhir/Patient/{patient_id}/$simulate"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=bearer(keys, scope="system/Observation.rs")).status_code == 403
    read_only = bearer(keys, scope="system/Patient.rs")
    got = client.get(url, headers=read_only)
    assert got.status_code == 200 and got.json()["type"] == "transaction"
    refused = client.post(url, json=parameters(), headers=read_only)
    assert refused.status_code == 403
    assert "system/RiskAssessment.cu" in refused.headers["www-authenticate"]
    assert fake.transactions == []
    written = client.post(url, json=parameters(), headers=bearer(keys))
    assert written.status_code == 200, written.text
    assert len(fake.transactions) == 1


@pytest.mark.parametrize("case", ["wrong_issuer", "wrong_audience", "expired", "not_yet_valid", "alg_none",
                                  "hs256_with_public_key", "garbage", "other_key", "no_exp", "user_scopes",
                                  "deeply_nested_header", "padded_signature", "infinite_exp"])
def test_simulate_refuses_bad_bearer_tokens(simulate_app, keys, case) -> None:
    client, fake, patient_id = simulate_app
    now = int(time.time())
    if case == "wrong_issuer":
        headers = bearer(keys, iss="https://attacker.example")
    elif case == "wrong_audience":
        headers = bearer(keys, aud="https://other-service.example/fhir")
    elif case == "expired":
        headers = bearer(keys, exp=now - 3600, iat=now - 7200, nbf=now - 7200)
    elif case == "not_yet_valid":
        headers = bearer(keys, nbf=now + 3600)
    elif case == "alg_none":
        headers = {"Authorization": "Bearer " + unsigned(
            {"iss": IDP, "aud": f"{PUBLIC}/fhir", "exp": now + 300, "scope": WRITE}, {"alg": "none", "kid": "idp-1"})}
    elif case == "hs256_with_public_key":
        # the classic confusion attack: the RSA public key's PEM used as an HMAC secret
        from cryptography.hazmat.primitives import serialization
        pem = keys["idp"].public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        import hashlib
        import hmac as hmac_module
        head = unsigned({"iss": IDP, "aud": f"{PUBLIC}/fhir", "exp": now + 300, "scope": WRITE},
                        {"alg": "HS256", "kid": "idp-1"})[:-1]
        signature = hmac_module.new(pem, head.encode(), hashlib.sha256).digest()
        import base64
        headers = {"Authorization": "Bearer " + head + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()}
    elif case == "garbage":
        headers = {"Authorization": "Bearer not-a-token"}
    elif case == "user_scopes":  # a clinician's token cannot make the service act with its own credentials
        headers = bearer(keys, scope="user/*.cruds")
    elif case == "deeply_nested_header":  # parsed before the signature is checked: must be a 401, not a 500
        import base64
        headers = {"Authorization": "Bearer " + base64.urlsafe_b64encode(b"[" * 1000).rstrip(b"=").decode()
                   + ".e30.x"}
    elif case == "padded_signature":  # one token, one encoding
        headers = {"Authorization": bearer(keys)["Authorization"] + "=="}
    elif case == "infinite_exp":
        token = jwt.encode({"iss": IDP, "aud": f"{PUBLIC}/fhir", "scope": WRITE}, keys["idp"], algorithm="RS384",
                           headers={"kid": "idp-1"})
        head, payload, _ = token.split(".")
        import base64

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        claims = base64.urlsafe_b64encode(b'{"iss":"%s","aud":"%s/fhir","scope":"%s","exp":Infinity}'
                                          % (IDP.encode(), PUBLIC.encode(), WRITE.encode())).rstrip(b"=").decode()
        signature = keys["idp"].sign(f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA384())
        headers = {"Authorization": f"Bearer {head}.{claims}."
                   + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()}
    elif case == "other_key":
        token = jwt.encode({"iss": IDP, "aud": f"{PUBLIC}/fhir", "exp": now + 300, "scope": WRITE}, keys["other"],
                           algorithm="ES384", headers={"kid": "idp-1"})
        headers = {"Authorization": f"Bearer {token}"}
    else:
        headers = bearer(keys, exp=None)
    response = client.post(f"/fhir/Patient/{patient_id}/$simulate", json=parameters(), headers=headers)
    assert response.status_code == (403 if case == "user_scopes" else 401), (case, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"
    assert fake.transactions == []


# ------------------------------------------------------------------------------------------- CDS Hooks


@pytest.fixture(scope="module")
def cds_body() -> dict[str, Any]:
    bundle = generate_cohort(n_patients=3).bundles[0]
    record = [e["resource"] for e in bundle["entry"]]
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/p1", "patientId": record[0]["id"]},
            "prefetch": prefetch_for(record)}


@pytest.fixture()
def cds_client(settings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_cds_call_with_a_registered_clients_jwt_gets_cards(cds_client, keys, cds_body) -> None:
    response = cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=cds_body, headers=cds_token(keys))
    assert response.status_code == 200, response.text
    assert response.json()["cards"]


@pytest.mark.parametrize("case", ["none", "alg_none", "expired", "garbage", "no_kid", "unknown_kid", "wrong_aud",
                                  "unregistered_iss", "old_iat", "no_jti", "jku_not_allowed", "wrong_key",
                                  "just_expired", "huge_exp"])
def test_cds_call_refuses_bad_client_jwts(cds_client, keys, cds_body, case) -> None:
    """Finding 2: no token, ``alg=none``, expired and garbage tokens all got cards."""
    now = int(time.time())
    headers = {
        "none": lambda: {},
        "alg_none": lambda: {"Authorization": "Bearer " + unsigned(
            {"iss": EHR, "aud": CDS_URL, "exp": now + 300, "iat": now, "jti": "x"}, {"alg": "none", "kid": "ehr-1"})},
        "expired": lambda: cds_token(keys, exp=now - 600, iat=now - 900),
        "garbage": lambda: {"Authorization": "Bearer eyJhbGciOi.garbage.x"},
        "no_kid": lambda: cds_token(keys, kid=None),
        "unknown_kid": lambda: cds_token(keys, kid="ehr-2"),
        "wrong_aud": lambda: cds_token(keys, aud=f"{PUBLIC}/cds-services/another-service"),
        "unregistered_iss": lambda: cds_token(keys, iss="https://attacker.example"),
        "old_iat": lambda: cds_token(keys, iat=now - 3600, exp=now + 300),
        "no_jti": lambda: cds_token(keys, jti=None),
        "jku_not_allowed": lambda: cds_token(keys, key="other", kid="jku-key",
                                             headers={"jku": "https://attacker.example/jwks"}),
        "wrong_key": lambda: cds_token(keys, key="other"),
        # within the clock skew but past exp: the replay cache would no longer know its jti
        "just_expired": lambda: cds_token(keys, exp=now - 30, iat=now - 60),
        "huge_exp": lambda: cds_token(keys, exp=10 ** 400),
    }[case]()
    response = cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=cds_body, headers=headers)
    assert response.status_code == 401, (case, response.text)
    assert set(response.json()) == {"error", "message"}
    assert "cards" not in response.json()


def test_cds_jwt_replay_is_refused(cds_client, keys, cds_body) -> None:
    headers = cds_token(keys)
    assert cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=cds_body, headers=headers).status_code == 200
    again = cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=cds_body, headers=headers)
    assert again.status_code == 401
    assert "replay" in again.json()["message"]


def test_cds_jku_is_followed_only_when_allow_listed(cds_client, keys, cds_body, listener) -> None:
    token = cds_token(keys, key="other", kid="jku-key", headers={"jku": f"{listener.url}/allowed"})
    response = cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=cds_body, headers=token)
    assert response.status_code == 200, response.text


def test_cds_fhir_server_outside_the_allow_list_gets_no_token(cds_client, keys, cds_body, listener) -> None:
    """Finding 3: ``fhirServer`` accepted any URL and the EHR's token was sent to it."""
    body = {**cds_body, "prefetch": {}, "fhirServer": f"{listener.url}/fhir",
            "fhirAuthorization": {"access_token": "the-ehrs-token", "token_type": "Bearer", "expires_in": 300,
                                  "scope": "patient/*.rs", "subject": "fhirtwin"}}
    before = len(listener.requests)
    response = cds_client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=body, headers=cds_token(keys))
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert len(listener.requests) == before, "the service contacted a fhirServer that is not allow-listed"


def test_cds_feedback_needs_a_client_jwt(cds_client, keys) -> None:
    """Finding 7: unauthenticated feedback was kept in memory without bound."""
    body = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                          "outcomeTimestamp": "2026-11-27T10:00:00Z"}]}
    url = f"/cds-services/{cds_hooks.SERVICE_ID}/feedback"
    assert cds_client.post(url, json=body).status_code == 401
    assert cds_client.post(url, json=body, headers=cds_token(keys)).status_code == 200


def test_cds_client_cannot_make_the_service_read_its_own_server(settings, keys, cds_body) -> None:
    """A registered client without its own fhirServer list may not name the service's FHIR server: the
    service would read it for them (a confused deputy)."""
    client = TestClient(create_app(replace(settings, fhir_server=EHR_FHIR.replace("ehr", "internal"), auth=replace(
        settings.auth, cds_clients=(replace(settings.auth.cds_clients[0], fhir_servers=()),)))))
    body = {**cds_body, "prefetch": {}, "fhirServer": EHR_FHIR.replace("ehr", "internal")}
    response = client.post(f"/cds-services/{cds_hooks.SERVICE_ID}", json=body, headers=cds_token(keys))
    assert response.status_code == 403 and response.json()["error"] == "forbidden"


def test_cds_discovery_stays_public(cds_client) -> None:
    assert cds_client.get("/cds-services").status_code == 200


# ------------------------------------------------------------------------------------------- webhook


def test_webhook_needs_the_secret_or_a_write_token(settings, keys, monkeypatch) -> None:
    """Finding 4: a forged delivery triggered a recompute; dead-letter replay worked unauthenticated."""
    from fhirtwin.service.runtime import WebhookOptions

    app = create_app(replace(settings, webhook=WebhookOptions(window=3600.0, max_wait=3600.0)))
    with TestClient(app, raise_server_exceptions=False) as client:
        obs = {"resourceType": "Observation", "id": "1", "subject": {"reference": "Patient/p"}}
        assert client.put("/hooks/fhir/Observation/1", json=obs).status_code == 401
        assert client.put("/hooks/fhir/Observation/1", json=obs,
                          headers={"Authorization": "Bearer wrong-secret-of-some-length"}).status_code == 401
        assert client.post("/hooks/fhir", json={}).status_code == 401
        assert client.delete("/hooks/fhir/Observation/1").status_code == 401
        assert client.post("/hooks/fhir/dead-letter/replay").status_code == 401
        assert client.get("/hooks/fhir/status").status_code == 401
        assert client.post("/hooks/fhir/dead-letter/replay",
                           headers=bearer(keys, scope="system/Patient.r")).status_code == 403
        assert client.get("/hooks/fhir/status", headers=bearer(keys, scope="system/Patient.r")).status_code == 403
        status = client.get("/hooks/fhir/status", headers=bearer(keys, scope="system/Subscription.r")).json()
        assert not any(v for k, v in status["counts"].items() if k.startswith("scheduled")), status
        ok = client.put("/hooks/fhir/Observation/1", json=obs, headers={"Authorization": f"Bearer {SECRET}"})
        assert ok.status_code == 200
        by_token = client.put("/hooks/fhir/Observation/2", json={**obs, "id": "2"}, headers=bearer(keys))
        assert by_token.status_code == 200
        status = client.get("/hooks/fhir/status", headers=bearer(keys, scope="system/Subscription.r")).json()
        assert status["pending"] == 1  # the two deliveries are one patient's recompute


# ------------------------------------------------------------------------------------------- settings


def test_scope_grammar() -> None:
    assert granted(["system/RiskAssessment.cu"], "RiskAssessment", "cu")
    assert granted(["system/*.cruds"], "CarePlan", "cu")
    assert granted(["system/RiskAssessment.write"], "RiskAssessment", "cu")  # SMART v1
    assert not granted(["user/RiskAssessment.cruds"], "RiskAssessment", "c")  # the service acts as itself
    assert not granted(["system/RiskAssessment.c"], "RiskAssessment", "cu")
    assert not granted(["patient/RiskAssessment.cruds"], "RiskAssessment", "c")
    assert not granted(["system/RiskAssessment.cu?subject=Patient/1"], "RiskAssessment", "c")
    assert not granted(["system/Risk.cruds"], "RiskAssessment", "c")


def test_dev_mode_only_on_loopback() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_dev_mode(host)
    for host in ("0.0.0.0", "10.0.0.5", "::", "twin.example.org"):
        with pytest.raises(ConfigError):
            check_dev_mode(host)


def test_config_file_is_strict(tmp_path) -> None:
    (tmp_path / "secret").write_text("short")
    bad = [
        '[auth]\nissuer = "https://idp.example.org"\n',  # issuer without jwks
        '[auth]\nissuer = "x"\njwks = "http://idp.example.org/jwks"\n',  # http off loopback
        '[auth]\ncolour = "red"\n',
        '[auth]\nwebhook_secret_file = "secret"\n',  # too short
        '[[auth.cds_clients]]\nissuer = "https://ehr.example.org"\njwks = "k.json"\njku = ["ftp://x"]\n',
    ]
    for text in bad:
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(ConfigError):
            load_config(tmp_path / "c.toml")
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "c.toml").write_text(
        '[auth]\nissuer = "https://idp.example.org"\njwks = "idp.json"\nfhir_servers = ["https://ehr.example.org/fhir"]\n'
        'webhook_secret_file = "secret"\n[[auth.cds_clients]]\nissuer = "https://ehr.example.org"\n'
        'jwks = "https://ehr.example.org/jwks.json"\n')
    auth = load_config(tmp_path / "c.toml")
    assert auth.jwks == str(tmp_path / "idp.json") and auth.webhook_secret == SECRET
    assert auth.cds_clients[0].jwks == "https://ehr.example.org/jwks.json"
