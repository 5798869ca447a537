"""The key policy: which servers may get a generated key, how keys are stored and published, and that a
verifier trusts a published key only for its own kid and never crashes on what a server returns."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.engine import Engine
from fhirtwin.keys import (
    KeyPolicyError,
    is_loopback,
    key_device,
    key_device_id,
    public_key_from_device,
    signing_key_for,
    store_path,
)
from fhirtwin.writeback.jws import JwsError, generate_key


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:8080/fhir", True),
    ("http://127.5.5.5/fhir", True),
    ("http://[::1]:8080/fhir", True),
    ("http://localhost:8080/fhir", True),
    ("https://ehr.example.org/fhir", False),
    ("http://127.0.0.1.evil.example/fhir", False),
    ("http://localhost.example/fhir", False),
    ("http://0.0.0.0/fhir", False),
    ("http://evil.example\\@127.0.0.1:8080/fhir", False),  # the HTTP client would connect to evil.example
    ("http://user@127.0.0.1/fhir", False),
])
def test_only_real_loopback_hosts_are_loopback(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_a_remote_server_never_gets_a_generated_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FHIRTWIN_SIGNING_KEY", "FHIRTWIN_SIGNING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeyPolicyError):
        signing_key_for("https://ehr.example.org/fhir", store=tmp_path)
    with pytest.raises(KeyPolicyError):
        signing_key_for("http://evil.example\\@127.0.0.1:8080/fhir", store=tmp_path)
    assert not list(tmp_path.iterdir())
    local = signing_key_for("http://127.0.0.1:8080/fhir", store=tmp_path)
    assert signing_key_for("http://127.0.0.1:8080/fhir/", store=tmp_path).kid == local.kid  # same key store entry
    assert signing_key_for("http://127.0.0.1:8181/fhir", store=tmp_path).kid != local.kid  # another server
    assert oct(store_path("http://127.0.0.1:8080/fhir", tmp_path).stat().st_mode & 0o777) == "0o600"


def test_a_bad_key_is_a_policy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRTWIN_SIGNING_KEY", "not a pem")
    with pytest.raises(KeyPolicyError):
        signing_key_for("https://ehr.example.org/fhir")


def test_a_published_key_counts_only_for_its_own_kid() -> None:
    key, other = generate_key(), generate_key()
    device = key_device(key, model_device="Device/m", organization="Organization/o")
    assert device["id"] == key_device_id(key.kid)
    assert public_key_from_device(device, key.kid) is not None
    with pytest.raises(JwsError):
        public_key_from_device(device, other.kid)
    broken = {**device, "extension": [{"url": device["extension"][0]["url"], "valueString": "[1]"}]}
    with pytest.raises(JwsError):
        public_key_from_device(broken, key.kid)


class FakeServer:
    def __init__(self, resources: dict[str, dict[str, Any]]) -> None:
        self.resources = resources

    def read(self, rtype: str, rid: str) -> dict[str, Any]:
        from fhirtwin.fhir.errors import FhirNotFound

        if f"{rtype}/{rid}" not in self.resources:
            raise FhirNotFound("not found", status=404)
        return self.resources[f"{rtype}/{rid}"]

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:  # marks it a FHIR client
        raise AssertionError("verify never writes")


def _jws_data(header: Any) -> str:
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return base64.b64encode(f"{head}..c2ln".encode()).decode()


@pytest.mark.parametrize("provenance", [
    {"target": [{"reference": "RiskAssessment/1"}], "signature": [{"sigFormat": "application/jose",
                                                                 "data": _jws_data([1, 2])}]},
    {"target": [{"reference": "RiskAssessment"}], "signature": [{"sigFormat": "application/jose",
                                                               "data": _jws_data({"kid": "k"})}]},
    {"target": ["RiskAssessment/1"], "signature": [{"sigFormat": "application/jose", "data": _jws_data({})}]},
    {"target": [{}], "signature": [{"sigFormat": "application/jose", "data": "!!"}]},
    {"target": [{"reference": "RiskAssessment/1"}], "signature": "not a list"},
])
def test_verify_reports_malformed_provenances_instead_of_crashing(provenance: dict[str, Any]) -> None:
    server = FakeServer({"Provenance/p": {"resourceType": "Provenance", "id": "p", **provenance}})
    report = Engine(server).verify("Provenance/p")
    assert report.valid is False and report.message
