"""One key policy for every writer (CLI, service, benchmark) and one way for a verifier to find the key.

Signing (:func:`signing_key_for`), in order:

1. ``FHIRTWIN_SIGNING_KEY`` (PEM text) or ``FHIRTWIN_SIGNING_KEY_FILE`` (a PEM path): a deployment's key.
2. The key store, keyed by the FHIR server's base URL: ``$FHIRTWIN_KEY_STORE`` (default
   ``$XDG_DATA_HOME/fhirtwin/keys``, i.e. ``~/.local/share/fhirtwin/keys``) holds one PEM per server,
   named by a digest of the normalised base URL. An operator places a key there for a real server.
3. A development key (ES256) generated into the store, only when the server is on loopback
   (127.0.0.0/8, ``::1``, ``localhost``): a sandbox never needs set-up, a real server never gets a
   throw-away key silently.

Verification never reads an environment variable: the key is published as a FHIR ``Device`` (one per
key, id ``fhirtwin-key-<digest of kid>``, identifier ``https://fhirtwin.org/sid/signing-key|<kid>``,
the public JWK in the ``signing-key`` extension), registered with fhirtwin's other resources by
``fhirtwin register`` and written with every full write. A verifier reads the ``kid`` from the JWS
header, reads that Device and checks that the JWK's RFC 7638 thumbprint *is* the ``kid`` before
trusting it. The trust anchor is therefore whoever may write Devices on that server; ``verify --key``
pins a key out of band instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from urllib3.util import parse_url

from fhirtwin import jose
from fhirtwin.vocabulary import EXT_SIGNING_KEY, SIGNING_KEY_ID_SYSTEM, meta
from fhirtwin.writeback.jws import (
    ENV_KEY,
    ENV_KEY_FILE,
    JwsError,
    SigningKey,
    generate_key,
    load_public_key,
    thumbprint,
)

__all__ = ["JwsError", "KeyPolicyError", "SigningKey", "is_loopback", "key_device", "key_device_id", "key_store",
           "load_public_key", "public_key_from_device", "signing_key_for", "store_path"]

ENV_KEY_STORE = "FHIRTWIN_KEY_STORE"


class KeyPolicyError(RuntimeError):
    """No signing key may be used for this server (the message says how to provide one)."""


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is a loopback address or ``localhost``.

    A URL with user information or a backslash in its authority is never loopback: parsers disagree
    on where such a host ends (``http://evil.example\\@127.0.0.1/`` connects to evil.example), and
    the host that decides must be the one the HTTP client connects to.
    """
    netloc = urlsplit(url).netloc
    if "@" in netloc or "\\" in netloc:
        return False
    host = (urlsplit(url).hostname or "").lower()
    if host != (parse_url(url).host or "").strip("[]").lower():
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_store() -> Path:
    """The key store folder (``$FHIRTWIN_KEY_STORE``, else under ``$XDG_DATA_HOME`` or ``~/.local/share``)."""
    configured = os.environ.get(ENV_KEY_STORE)
    if configured:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fhirtwin" / "keys"


def _normalised(base_url: str) -> str:
    parts = urlsplit(base_url.strip())
    return f"{parts.scheme.lower()}://{(parts.netloc or '').lower()}{parts.path.rstrip('/')}"


def store_path(base_url: str, store: Path | None = None) -> Path:
    """Where the key store keeps the key for ``base_url`` (scheme, host, port and path count)."""
    digest = hashlib.sha256(_normalised(base_url).encode()).hexdigest()[:24]
    return (store or key_store()) / f"{digest}.pem"


def _write_private(path: Path, key: SigningKey) -> None:
    """Write the key whole or not at all: a temporary file, then a hard link to the final name (never
    replaces a key another process made first, never exposes a half-written PEM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".new-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.chmod(temporary, 0o600)
        with contextlib.suppress(FileExistsError):  # another process made it first: use that one
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _load(pem: bytes | str, where: str) -> SigningKey:
    try:
        return SigningKey.from_pem(pem)
    except (ValueError, TypeError, JwsError) as exc:
        raise KeyPolicyError(f"{where} is not a PEM private key (EC P-256/P-384 or RSA)") from exc


def signing_key_for(base_url: str, *, store: Path | None = None) -> SigningKey:
    """The key that signs results written to ``base_url`` (see the module docstring for the order)."""
    pem = os.environ.get(ENV_KEY)
    if pem:
        return _load(pem, ENV_KEY)
    path_text = os.environ.get(ENV_KEY_FILE)
    if path_text:
        try:
            return _load(Path(path_text).read_bytes(), ENV_KEY_FILE)
        except OSError as exc:
            raise KeyPolicyError(f"{ENV_KEY_FILE} cannot be read: {exc.strerror}") from exc
    path = store_path(base_url, store)
    if not path.exists():
        if not is_loopback(base_url):
            raise KeyPolicyError(f"no signing key for {_normalised(base_url)}: set {ENV_KEY_FILE} (or {ENV_KEY}), "
                                 f"or place a PEM private key at {path}")
        _write_private(path, generate_key("ES256"))
    return _load(path.read_bytes(), f"the key store's key for {_normalised(base_url)}")


# ----------------------------------------------------------------------------------------- publication


def key_device_id(kid: str) -> str:
    """The id of the Device that publishes the public key ``kid`` (a valid FHIR id)."""
    return "fhirtwin-key-" + hashlib.sha256(kid.encode()).hexdigest()[:40]


def key_device(key: SigningKey, *, model_device: str, organization: str) -> dict[str, Any]:
    """The Device that publishes ``key``'s public JWK, part of the model Device (``parent``)."""
    jwk = jose.public_jwk(key.private_key)
    return {
        "resourceType": "Device",
        "id": key_device_id(key.kid),
        "meta": {"tag": meta("fhirtwin-device")["tag"]},
        "extension": [{"url": EXT_SIGNING_KEY, "valueString": json.dumps(jwk, sort_keys=True)}],
        "identifier": [{"system": SIGNING_KEY_ID_SYSTEM, "value": key.kid}],
        "status": "active",
        "manufacturer": "fhirtwin",
        "deviceName": [{"name": f"fhirtwin signing key {key.alg}", "type": "user-friendly-name"}],
        "owner": {"reference": organization},
        "parent": {"reference": model_device},
    }


def public_key_from_device(device: dict[str, Any], kid: str) -> Any:
    """The public key a key Device publishes, checked against ``kid`` (raises :class:`JwsError`)."""
    texts = [str(e.get("valueString")) for e in device.get("extension") or []
             if isinstance(e, dict) and e.get("url") == EXT_SIGNING_KEY]
    for text in texts:
        try:
            jwk = json.loads(text)
            key = jose.public_key_from_jwk(jwk) if isinstance(jwk, dict) else None
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
        if key is None:
            continue
        if thumbprint(key) == kid:
            return key
    raise JwsError("the published key does not match the signature's kid")
