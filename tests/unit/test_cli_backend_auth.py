"""The CLI authorizes by SMART Backend Services when given client credentials: the token endpoint found by
discovery, a JWT assertion signed with the client's key (kid = its RFC 7638 thumbprint), only the scopes the
command needs, and the token on every FHIR request; without credentials nothing changes."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirtwin.cli import _client, build_parser, main, needed_scopes
from fhirtwin.writeback.jws import thumbprint

TOKEN = "tok-7f3a"  # noqa: S105 - a test token of the loopback server below


class AuthServer:
    """A loopback FHIR server behind SMART Backend Services: 401 without the token it issued."""

    def __init__(self) -> None:
        self.token_forms: list[dict[str, list[str]]] = []
        self.fhir_headers: list[str | None] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.endswith("/.well-known/smart-configuration"):
                    self._json(200, {"token_endpoint": f"{state.url}/token"})
                    return
                state.fhir_headers.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._json(401, {"resourceType": "OperationOutcome", "issue": []})
                    return
                self._json(200, {"resourceType": "CapabilityStatement", "software": {"name": "test"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                state.token_forms.append(form)
                self._json(200, {"access_token": TOKEN, "token_type": "bearer", "expires_in": 300,
                                 "scope": form["scope"][0]})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def auth_server() -> Iterator[AuthServer]:
    server = AuthServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture()
def client_key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "client.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


def _claims(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, claims, _ = jwt.split(".")

    def decode(part: str) -> dict[str, Any]:
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))

    return decode(header), decode(claims)


def test_a_write_command_asks_for_exactly_its_scopes_and_sends_the_token(
        auth_server: AuthServer, client_key: tuple[Path, ec.EllipticCurvePrivateKey]) -> None:
    path, key = client_key
    args = build_parser().parse_args(["population", "write", "out/runs/r1", "--server", f"{auth_server.url}/fhir",
                                      "--client-id", "fhirtwin-nightly", "--client-key", str(path)])
    client = _client(args, writes=True)
    assert client.capabilities()["software"]["name"] == "test"
    [form] = auth_server.token_forms
    assert form["grant_type"] == ["client_credentials"]
    scopes = form["scope"][0].split()
    assert scopes == needed_scopes(writes=True).split()
    assert "system/Observation.rs" in scopes and "system/RiskAssessment.cu" in scopes
    assert not [s for s in scopes if "*" in s] and "system/Observation.cu" not in scopes  # least privilege
    header, claims = _claims(form["client_assertion"][0])
    assert header["alg"] == "ES384" and header["kid"] == thumbprint(key.public_key())
    assert claims["iss"] == claims["sub"] == "fhirtwin-nightly" and claims["aud"] == f"{auth_server.url}/token"
    assert auth_server.fhir_headers == [f"Bearer {TOKEN}"]


def test_a_read_command_asks_for_no_write_scope(auth_server: AuthServer,
                                                client_key: tuple[Path, ec.EllipticCurvePrivateKey],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = client_key
    monkeypatch.setenv("FHIRTWIN_CLIENT_ID", "reader")
    monkeypatch.setenv("FHIRTWIN_CLIENT_KEY_FILE", str(path))
    args = build_parser().parse_args(["population", "export", "--server", f"{auth_server.url}/fhir", "--out", "x"])
    _client(args).capabilities()
    scopes = auth_server.token_forms[0]["scope"][0].split()
    assert scopes and all(s.endswith(".rs") for s in scopes)


def test_without_credentials_no_token_is_asked_and_a_bad_key_is_a_one_line_error(
        auth_server: AuthServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["population", "export", "--server", f"{auth_server.url}/fhir", "--out", "x"])
    assert _client(args).auth is None and auth_server.token_forms == []
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    code = main(["population", "export", "--server", f"{auth_server.url}/fhir", "--out", str(tmp_path / "o"),
                 "--client-id", "x", "--client-key", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "not a PEM" in err and "Traceback" not in err
