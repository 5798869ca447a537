"""JOSE primitives on ``cryptography`` alone: base64url, public JWKs, compact JWS signing and checking.

Why one module: SMART client assertions (RS384/ES384), Provenance signatures (ES256/ES384/RS256), the
test SMART simulator's id_token (RS256) and PKCE all need the same few lines; each caller keeps its own
policy (which algorithms, which header) and calls these for the bit-level work. No layer owns it, so
every layer may import it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

#: JWS ``alg`` → (key type, hash); EC coordinate sizes follow from the key's curve.
ALGORITHMS: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "RS256": ("RSA", hashes.SHA256),
    "RS384": ("RSA", hashes.SHA384),
    "ES256": ("EC", hashes.SHA256),
    "ES384": ("EC", hashes.SHA384),
}
#: cryptography curve name → (JWK ``crv``, coordinate size in bytes).
CURVES: dict[str, tuple[str, int]] = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48),
                                      "secp521r1": ("P-521", 66)}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: Any key ``cryptography`` loads; the functions here accept it and raise ValueError unless it is RSA or EC.
Key = PrivateKeyTypes | PublicKeyTypes


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url`; strict (RFC 7515 §2: the URL-safe alphabet, no padding, nothing else), so
    one value has one encoding. Raises ValueError otherwise."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public(key: Key) -> Key:
    return key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key


def public_jwk(key: Key) -> dict[str, str]:
    """The public members of an RSA or EC key's JWK (``kty`` with ``n``/``e`` or ``crv``/``x``/``y``)."""
    public = _public(key)
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        return {"kty": "RSA",
                "n": b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
                "e": b64url(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big"))}
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in CURVES:
            raise ValueError(f"unsupported EC curve {public.curve.name}")
        crv, size = CURVES[public.curve.name]
        ec_numbers = public.public_numbers()
        return {"kty": "EC", "crv": crv, "x": b64url(ec_numbers.x.to_bytes(size, "big")),
                "y": b64url(ec_numbers.y.to_bytes(size, "big"))}
    raise ValueError("only RSA and EC keys are supported")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> Any:
    """The public key of an RSA or EC JWK (inverse of :func:`public_jwk`); raises ValueError."""
    kty = jwk.get("kty")
    if kty == "RSA":
        n = int.from_bytes(b64url_decode(str(jwk["n"])), "big")
        e = int.from_bytes(b64url_decode(str(jwk["e"])), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "EC":
        names = {crv: name for name, (crv, _) in CURVES.items()}
        if jwk.get("crv") not in names:
            raise ValueError(f"unsupported EC curve {jwk.get('crv')}")
        curve = ec.SECP256R1() if jwk["crv"] == "P-256" else ec.SECP384R1() if jwk["crv"] == "P-384" else ec.SECP521R1()
        x = int.from_bytes(b64url_decode(str(jwk["x"])), "big")
        y = int.from_bytes(b64url_decode(str(jwk["y"])), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    raise ValueError("only RSA and EC JWKs are supported")


def _check(key: Key, alg: str) -> type[hashes.HashAlgorithm]:
    if alg not in ALGORITHMS:
        raise ValueError(f"unsupported JWS alg {alg!r}")
    kind, hash_cls = ALGORITHMS[alg]
    public = _public(key)
    if kind == "RSA" and not isinstance(public, rsa.RSAPublicKey):
        raise ValueError(f"{alg} needs an RSA key")
    if kind == "EC" and not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError(f"{alg} needs an EC key")
    return hash_cls


def sign(signing_input: bytes, key: Key, alg: str) -> bytes:
    """The raw JWS signature of ``signing_input`` (ECDSA as ``r‖s``, RFC 7518 §3.4)."""
    hash_cls = _check(key, alg)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, padding.PKCS1v15(), hash_cls())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{alg} signing needs a private key")
    size = CURVES[key.curve.name][1]
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_cls())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify(signing_input: bytes, signature: bytes, key: Key, alg: str) -> bool:
    """True if ``signature`` (raw, as :func:`sign` makes it) is valid for ``signing_input`` under ``key``."""
    hash_cls = _check(key, alg)
    public = _public(key)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, signing_input, padding.PKCS1v15(), hash_cls())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            size = CURVES[public.curve.name][1]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                       int.from_bytes(signature[size:], "big"))
            public.verify(der, signing_input, ec.ECDSA(hash_cls()))
        else:  # _check admits RSA and EC keys only
            raise ValueError("only RSA and EC keys are supported")
    except InvalidSignature:
        return False
    return True


def compact_jws(header: Mapping[str, Any], claims: Mapping[str, Any], key: Key) -> str:
    """``header.payload.signature`` of JSON ``claims`` with ``header['alg']`` (a signed JWT)."""
    signing_input = (b64url(json.dumps(dict(header), separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(dict(claims), separators=(",", ":")).encode()))
    return signing_input + "." + b64url(sign(signing_input.encode("ascii"), key, str(header.get("alg"))))
