"""Detached JWS (RFC 7515 Appendix F) with ``cryptography`` only: ES256 (default), ES384, RS256.

Why by hand: the Provenance signature needs the compact form ``header..signature`` over bytes that
fhirtwin canonicalises itself (see ``signing.py``); the primitives of :mod:`fhirtwin.jose` avoid a JOSE
dependency and any model dump. Keys come from ``FHIRTWIN_SIGNING_KEY`` (PEM text) or
``FHIRTWIN_SIGNING_KEY_FILE`` (path), else a development key generated once in a folder the caller
names (the sandbox data folder, which is never committed).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhirtwin import jose
from fhirtwin.jose import b64url, b64url_decode

ENV_KEY = "FHIRTWIN_SIGNING_KEY"
ENV_KEY_FILE = "FHIRTWIN_SIGNING_KEY_FILE"
DEV_KEY_NAME = "fhirtwin-dev-signing-key.pem"

_EC = {"P-256": "ES256", "P-384": "ES384"}  # curves the Provenance signature accepts, and their alg


class JwsError(ValueError):
    """A signature is malformed, made with another key, or does not match the content."""


def public_jwk(key: Any) -> dict[str, str]:
    """Public JWK of an EC (P-256/P-384) or RSA key (private or public)."""
    try:
        jwk = jose.public_jwk(key)
    except ValueError as exc:
        raise JwsError(str(exc)) from exc
    if jwk["kty"] == "EC" and jwk["crv"] not in _EC:
        raise JwsError(f"unsupported curve {jwk['crv']}")
    return jwk


def thumbprint(key: Any) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the ``kid`` of a key."""
    jwk = public_jwk(key)
    members = {k: jwk[k] for k in (("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n"))}
    return b64url(hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest())


def algorithm_for(key: Any) -> str:
    """The JWS ``alg`` a key signs with: ES256/ES384 by curve, RS256 for RSA."""
    jwk = public_jwk(key)
    return _EC[jwk["crv"]] if jwk["kty"] == "EC" else "RS256"


@dataclass(frozen=True)
class SigningKey:
    """A private key with its algorithm and key id."""

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str
    kid: str

    @classmethod
    def from_private(cls, key: Any) -> SigningKey:
        return cls(key, algorithm_for(key), thumbprint(key))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> SigningKey:
        data = pem.encode() if isinstance(pem, str) else pem
        return cls.from_private(serialization.load_pem_private_key(data, password=None))

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(alg: str = "ES256") -> SigningKey:
    """A fresh key for ``alg`` (ES256, ES384 or RS256)."""
    if alg == "ES256":
        return SigningKey.from_private(ec.generate_private_key(ec.SECP256R1()))
    if alg == "ES384":
        return SigningKey.from_private(ec.generate_private_key(ec.SECP384R1()))
    if alg == "RS256":
        return SigningKey.from_private(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    raise JwsError(f"unsupported alg {alg!r}")


def load_signing_key(dev_key_dir: Path | None = None) -> SigningKey:
    """The signing key: ``$FHIRTWIN_SIGNING_KEY`` (PEM), ``$FHIRTWIN_SIGNING_KEY_FILE``, else a dev key.

    The development key (ES256) is created on first use as ``dev_key_dir/fhirtwin-dev-signing-key.pem``
    with mode 0600; without a ``dev_key_dir`` a missing key is an error, never a silent fresh key.
    """
    pem = os.environ.get(ENV_KEY)
    if pem:
        return SigningKey.from_pem(pem)
    path = os.environ.get(ENV_KEY_FILE)
    if path:
        return SigningKey.from_pem(Path(path).read_bytes())
    if dev_key_dir is None:
        raise JwsError(f"no signing key: set {ENV_KEY} or {ENV_KEY_FILE}")
    dev = Path(dev_key_dir) / DEV_KEY_NAME
    if not dev.exists():
        dev.parent.mkdir(parents=True, exist_ok=True)
        key = generate_key("ES256")
        pem_bytes = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
        fd = os.open(dev, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem_bytes)
    return SigningKey.from_pem(dev.read_bytes())


def load_public_key(pem: bytes) -> Any:
    """A public key from PEM (a private-key PEM is accepted and its public half used)."""
    if b"PRIVATE KEY" in pem:
        return serialization.load_pem_private_key(pem, password=None).public_key()
    return serialization.load_pem_public_key(pem)


def sign_detached(payload: bytes, key: SigningKey, extra_header: dict[str, Any] | None = None) -> str:
    """Compact detached JWS ``header..signature`` over ``payload`` (Appendix F: payload left out)."""
    header = {"alg": key.alg, "kid": key.kid, **(extra_header or {})}
    protected = b64url(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    signing_input = f"{protected}.{b64url(payload)}".encode("ascii")
    raw = jose.sign(signing_input, key.private_key, key.alg)
    return f"{protected}..{b64url(raw)}"


def header_of(jws: str) -> dict[str, Any]:
    """The protected header of a compact JWS (not verified)."""
    try:
        header: dict[str, Any] = json.loads(b64url_decode(jws.split(".")[0]))
    except (ValueError, IndexError) as exc:
        raise JwsError("malformed JWS header") from exc
    return header


def verify_detached(jws: str, payload: bytes, public_key: Any) -> dict[str, Any]:
    """Check a detached JWS against ``payload``; returns the header, raises :class:`JwsError` if invalid."""
    parts = jws.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise JwsError("not a detached compact JWS (expected header..signature)")
    header = header_of(jws)
    alg = header.get("alg")
    if alg != algorithm_for(public_key):
        raise JwsError(f"JWS alg {alg!r} does not match the verification key")
    if header.get("kid") not in (None, thumbprint(public_key)):
        raise JwsError("JWS was signed with another key (kid differs)")
    signing_input = f"{parts[0]}.{b64url(payload)}".encode("ascii")
    if not jose.verify(signing_input, b64url_decode(parts[2]), public_key, alg):
        raise JwsError("signature does not match the signed content")
    return header
