"""Canonical JSON, detached JWS (ES256, ES384, RS256) and the signed target form: sign, verify, tamper."""

from __future__ import annotations

import base64
import copy
import os
import stat

import pytest

from fhirtwin.writeback import jws
from fhirtwin.writeback.signing import canonical_json, sign_targets, signed_payload, signing_form, verify_targets

TARGETS = [
    {"resourceType": "RiskAssessment", "identifier": [{"system": "s", "value": "k1"}], "status": "final",
     "subject": {"reference": "Patient/p1"}, "basis": [{"reference": "Observation/o1/_history/3"}],
     "prediction": [{"probabilityDecimal": 0.1234}]},
    {"resourceType": "CarePlan", "status": "draft", "intent": "proposal",
     "supportingInfo": [{"reference": "urn:uuid:aaaa"}], "note": [{"text": "café \"quoted\"\n"}]},
]
REFS = ["urn:uuid:aaaa", "urn:uuid:bbbb"]


def stored(targets: list[dict]) -> tuple[list[dict], list[str]]:
    """What the server gives back: ids assigned, urn references resolved, meta added, decimals reformatted."""
    out = copy.deepcopy(targets)
    out[0].update(id="ra-1", meta={"versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z", "source": "#x"})
    out[1].update(id="cp-1", meta={"versionId": "1", "tag": [{"system": "t", "code": "c"}]})
    out[1]["supportingInfo"] = [{"reference": "RiskAssessment/ra-1"}]
    out[0]["prediction"][0]["probabilityDecimal"] = 0.12340
    return out, ["RiskAssessment/ra-1/_history/1", "CarePlan/cp-1/_history/1"]


def test_canonical_json_sorts_keys_and_normalises_numbers() -> None:
    expected = '{"a":[0.1,1e-07,2],"b":1,"c":"é\\t"}'.encode()
    assert canonical_json({"b": 1.0, "a": [0.10, 1e-7, 2], "c": "é\t"}) == expected
    assert canonical_json({"x": 1e-5}) == b'{"x":0.00001}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_fast_canonical_json_writes_the_bytes_of_the_spelled_out_rule() -> None:
    """The standard-library fast path and the rule written out agree on awkward strings and numbers."""
    import random

    from fhirtwin.writeback.signing import _emit

    rng = random.Random(7)
    alphabet = ["a", "Z", "é", "\u2028", "\x00", "\x1f", "\x7f", "\"", "\\", "\n", "\t", "\b", "\f", "\r",
                "\U0001f600", "\ufeff", "/"]

    def value(depth: int) -> object:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        if kind == 1:
            return rng.choice([0.1, 10.0, -3.0, 1e20, 1e21, 1.5e-5, 1e-7, 123456789.125, 2.5e17, -0.0, 7, True,
                               None, 10**22])
        if kind == 2:
            return rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-8, 8)
        if kind in (3, 4):
            return rng.randrange(-10**6, 10**6)
        if kind in (5, 6):
            return {"".join(rng.choice(alphabet) for _ in range(3)): value(depth + 1) for _ in range(4)}
        return [value(depth + 1) for _ in range(3)]

    for _ in range(400):
        doc = value(0)
        assert canonical_json(doc) == _emit(doc).encode("utf-8")


def test_signing_form_maps_fellow_targets_and_drops_server_fields() -> None:
    before = signing_form(TARGETS[1], REFS)
    after_targets, after_refs = stored(TARGETS)
    after = signing_form(after_targets[1], after_refs)
    assert before == after
    assert before["supportingInfo"] == [{"reference": "urn:fhirtwin:target:0"}]
    assert "id" not in after and "meta" not in after
    assert signed_payload(TARGETS, REFS) == signed_payload(*stored(TARGETS))
    # inputs are signed verbatim, versions included
    assert signing_form(TARGETS[0], REFS)["basis"] == [{"reference": "Observation/o1/_history/3"}]


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256"])
def test_sign_then_verify_after_storage(alg: str) -> None:
    key = jws.generate_key(alg)
    data = sign_targets(TARGETS, REFS, key)
    compact = base64.b64decode(data).decode()
    assert compact.count(".") == 2 and compact.split(".")[1] == ""
    header = verify_targets(data, *stored(TARGETS), key.private_key.public_key())
    assert header["alg"] == alg and header["kid"] == key.kid


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
@pytest.mark.parametrize("tamper", ["value", "status", "basis-version", "note", "order"])
def test_any_change_to_signed_content_fails(alg: str, tamper: str) -> None:
    key = jws.generate_key(alg)
    data = sign_targets(TARGETS, REFS, key)
    targets, refs = stored(TARGETS)
    if tamper == "value":
        targets[0]["prediction"][0]["probabilityDecimal"] = 0.1235
    elif tamper == "status":
        targets[0]["status"] = "entered-in-error"
    elif tamper == "basis-version":
        targets[0]["basis"][0]["reference"] = "Observation/o1/_history/4"
    elif tamper == "note":
        targets[1]["note"][0]["text"] = "changed"
    else:
        targets, refs = targets[::-1], refs[::-1]
    with pytest.raises(jws.JwsError):
        verify_targets(data, targets, refs, key.private_key.public_key())


def test_meta_only_changes_still_verify() -> None:
    key = jws.generate_key()
    data = sign_targets(TARGETS, REFS, key)
    targets, refs = stored(TARGETS)
    targets[0]["meta"]["tag"] = [{"system": "https://fhirtwin.org/CodeSystem/fhirtwin", "code": "superseded"}]
    targets[0]["meta"]["versionId"] = "2"
    verify_targets(data, targets, refs, key.private_key.public_key())


def test_other_key_is_rejected() -> None:
    data = sign_targets(TARGETS, REFS, jws.generate_key())
    with pytest.raises(jws.JwsError, match="another key"):
        verify_targets(data, *stored(TARGETS), jws.generate_key().private_key.public_key())
    with pytest.raises(jws.JwsError, match="alg"):
        verify_targets(data, *stored(TARGETS), jws.generate_key("RS256").private_key.public_key())


def test_key_loading_env_and_dev_key(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(jws.ENV_KEY, raising=False)
    monkeypatch.delenv(jws.ENV_KEY_FILE, raising=False)
    with pytest.raises(jws.JwsError):
        jws.load_signing_key(None)
    dev = jws.load_signing_key(tmp_path)
    path = tmp_path / jws.DEV_KEY_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert jws.load_signing_key(tmp_path).kid == dev.kid and dev.alg == "ES256"
    rsa_key = jws.generate_key("RS256")
    from cryptography.hazmat.primitives import serialization

    pem = rsa_key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    monkeypatch.setenv(jws.ENV_KEY, pem.decode())
    assert jws.load_signing_key(tmp_path).alg == "RS256"
    monkeypatch.delenv(jws.ENV_KEY)
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(pem)
    monkeypatch.setenv(jws.ENV_KEY_FILE, str(key_file))
    assert jws.load_signing_key(tmp_path).kid == rsa_key.kid
    public = jws.load_public_key(rsa_key.public_pem())
    assert public.public_numbers() == rsa_key.private_key.public_key().public_numbers()
