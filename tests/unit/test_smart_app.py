"""SMART App Launch: PKCE S256, authorize request, state checks, token exchange, server-side session.

The EHR's discovery document and token endpoint are stubbed with ``responses`` (no network)."""

from __future__ import annotations

import re
import string
from urllib.parse import parse_qs, urlparse

import pytest
import responses
from fastapi.testclient import TestClient

from fhirtwin.service import smart
from fhirtwin.service.app import ServiceSettings, create_app

ISS = "https://ehr.example.org/fhir"
AUTHORIZE = "https://ehr.example.org/auth/authorize"
TOKEN = "https://ehr.example.org/auth/token"
SECRET = "ACCESS-TOKEN-THAT-MUST-STAY-SERVER-SIDE"


def discovery(**overrides) -> dict:
    doc = {"authorization_endpoint": AUTHORIZE, "token_endpoint": TOKEN,
           "grant_types_supported": ["authorization_code"],
           "code_challenge_methods_supported": ["S256"], "capabilities": ["launch-ehr", "client-public"]}
    doc.update(overrides)
    return doc


@pytest.fixture()
def client() -> TestClient:
    app = create_app(ServiceSettings(fhir_server=ISS, public_url="http://testserver"))
    return TestClient(app, follow_redirects=False)


@pytest.fixture()
def ehr():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.GET, f"{ISS}/.well-known/smart-configuration", json=discovery())
        yield mock


def authorize_params(response) -> dict[str, str]:
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(AUTHORIZE + "?")
    return {k: v[0] for k, v in parse_qs(urlparse(location).query).items()}


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    assert smart.code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_code_verifiers_are_long_random_and_unreserved() -> None:
    allowed = set(string.ascii_letters + string.digits + "-._~")
    verifiers = {smart.new_code_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        assert 43 <= len(v) <= 128 and set(v) <= allowed
        assert "=" not in smart.code_challenge(v)
    with pytest.raises(ValueError):
        smart.code_challenge("too-short")


def test_state_comparison() -> None:
    state = smart.new_state()
    assert len(state) >= 43  # >= 256 bits in base64url
    assert smart.state_matches(state, state)
    assert not smart.state_matches(state, state[:-1] + ("A" if state[-1] != "A" else "B"))
    assert not smart.state_matches(state, None) and not smart.state_matches(None, state)


def test_ehr_launch_redirects_with_pkce_state_aud_and_least_privilege_scopes(client: TestClient, ehr) -> None:
    response = client.get("/launch", params={"iss": ISS, "launch": "xyz"})
    params = authorize_params(response)
    assert params["response_type"] == "code" and params["client_id"] == "fhirtwin"
    assert params["redirect_uri"] == "http://testserver/callback"
    assert params["aud"] == ISS and params["launch"] == "xyz"
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 43
    scopes = params["scope"].split()
    assert scopes[:3] == ["launch", "openid", "fhirUser"]
    assert "launch/patient" not in scopes
    assert {"patient/Observation.rs", "patient/RiskAssessment.crus", "patient/CarePlan.crus", "patient/Goal.crus",
            "patient/Provenance.c", "patient/MolecularSequence.rs"} <= set(scopes)
    assert not any(s.endswith((".read", ".write", ".*", ".cruds")) or s.startswith("user/") for s in scopes)
    cookie = response.headers["set-cookie"]
    assert smart.COOKIE in cookie and "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()


def test_standalone_launch_asks_for_patient_context(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS}))
    scopes = params["scope"].split()
    assert "launch/patient" in scopes and "launch" not in scopes and "launch" not in params


def test_unregistered_iss_is_refused_without_contacting_it(client: TestClient) -> None:
    with responses.RequestsMock() as mock:  # any outgoing request would fail the test
        response = client.get("/launch", params={"iss": "https://evil.example/fhir", "launch": "x"})
        assert len(mock.calls) == 0
    assert response.status_code == 400


def test_server_without_s256_is_refused(client: TestClient) -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, f"{ISS}/.well-known/smart-configuration",
                 json=discovery(code_challenge_methods_supported=["plain"]))
        response = client.get("/launch", params={"iss": ISS, "launch": "x"})
    assert response.status_code == 502 and "S256" in response.text


def test_state_mismatch_is_rejected_and_no_token_is_requested(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS, "launch": "xyz"}))
    ehr.add(responses.POST, TOKEN, json={"access_token": SECRET, "token_type": "Bearer", "patient": "p1",
                                         "scope": "launch", "expires_in": 3600})
    wrong = client.get("/callback", params={"code": "c1", "state": params["state"] + "x"})
    assert wrong.status_code == 400 and "state" in wrong.text
    assert not [c for c in ehr.calls if c.request.url.startswith(TOKEN)]
    # the state was single use: the right value no longer works either
    again = client.get("/callback", params={"code": "c1", "state": params["state"]})
    assert again.status_code == 400
    assert not [c for c in ehr.calls if c.request.url.startswith(TOKEN)]


def test_callback_without_a_launch_session_is_rejected(client: TestClient) -> None:
    response = client.get("/callback", params={"code": "c", "state": "s"})
    assert response.status_code == 400


def test_authorization_error_is_shown_without_echoing_input(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS, "launch": "xyz"}))
    response = client.get("/callback", params={"error": "<script>alert(1)</script>", "state": params["state"]})
    assert response.status_code == 400 and "<script>" not in response.text


def test_code_exchange_sends_the_verifier_and_keeps_the_token_server_side(client: TestClient, ehr) -> None:
    launch = client.get("/launch", params={"iss": ISS, "launch": "xyz"})
    params = authorize_params(launch)
    first_cookie = client.cookies.get(smart.COOKIE)
    ehr.add(responses.POST, TOKEN, json={"access_token": SECRET, "token_type": "Bearer", "patient": "p1",
                                         "scope": params["scope"], "expires_in": 3600, "id_token": "x.y.z"},
            headers={"Cache-Control": "no-store"})
    response = client.get("/callback", params={"code": "the-code", "state": params["state"]})
    assert response.status_code == 303 and response.headers["location"] == "/patient"
    [call] = [c for c in ehr.calls if c.request.url.startswith(TOKEN)]
    form = {k: v[0] for k, v in parse_qs(call.request.body).items()}
    assert form["grant_type"] == "authorization_code" and form["code"] == "the-code"
    assert form["redirect_uri"] == "http://testserver/callback" and form["client_id"] == "fhirtwin"
    assert smart.code_challenge(form["code_verifier"]) == params["code_challenge"]
    # the session id changes at login; the token never reaches the browser
    assert client.cookies.get(smart.COOKIE) not in (None, first_cookie)
    assert SECRET not in response.text and SECRET not in str(response.headers)
    assert SECRET not in client.cookies.get(smart.COOKIE)


def test_token_response_without_patient_context_is_refused(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS, "launch": "xyz"}))
    ehr.add(responses.POST, TOKEN, json={"access_token": SECRET, "token_type": "Bearer", "scope": "openid"})
    response = client.get("/callback", params={"code": "c", "state": params["state"]})
    assert response.status_code == 502 and SECRET not in response.text


def test_token_endpoint_error_is_reported_by_code_only(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS, "launch": "xyz"}))
    ehr.add(responses.POST, TOKEN, status=400, json={"error": "invalid_grant", "error_description": "secret detail"})
    response = client.get("/callback", params={"code": "c", "state": params["state"]})
    assert response.status_code == 502 and "invalid_grant" in response.text and "secret detail" not in response.text


def test_patient_page_and_posts_need_a_session(client: TestClient) -> None:
    assert client.get("/patient").status_code == 401
    assert client.post("/patient/whatif", json={"interventions": []}).status_code == 401
    assert client.post("/patient/write", json={}).status_code == 401


def test_posts_need_the_csrf_token(client: TestClient, ehr) -> None:
    params = authorize_params(client.get("/launch", params={"iss": ISS, "launch": "xyz"}))
    ehr.add(responses.POST, TOKEN, json={"access_token": SECRET, "token_type": "Bearer", "patient": "p1",
                                         "scope": "launch", "expires_in": 3600})
    client.get("/callback", params={"code": "c", "state": params["state"]})
    assert client.post("/patient/whatif", json={"interventions": []}).status_code == 403
    assert client.post("/patient/write", json={}, headers={"X-CSRF-Token": "forged"}).status_code == 403


def test_static_assets_are_local_and_the_page_template_has_no_inline_script() -> None:
    page = (smart.TEMPLATE_DIR / "patient.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page)
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers
    assert "http://" not in page and "https://" not in page
    assert "//" not in (smart.TEMPLATE_DIR / "page.css").read_text()


def test_static_files_are_served_and_others_are_not(client: TestClient) -> None:
    assert client.get("/static/fhirtwin/patient.js").status_code == 200
    assert client.get("/static/fhirtwin/../smart.py").status_code == 404
    assert client.get("/static/fhirtwin/patient.html").status_code == 404
