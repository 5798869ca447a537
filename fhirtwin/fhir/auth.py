"""Authentication for :class:`fhirtwin.fhir.client.FhirClient`: static bearer tokens and SMART Backend Services.

SMART Backend Services (SMART App Launch 2.x, "asymmetric client authentication") is the system-to-system
flow used for population runs and Bulk Data: the client signs a short-lived JWT (``private_key_jwt``)
with its private key and trades it for an access token with the ``client_credentials`` grant. The JWT is
made with ``cryptography`` only (RS384 = RSASSA-PKCS1-v1_5 + SHA-384, ES384 = ECDSA P-384 + SHA-384 with
the signature as raw ``r||s``), so no JOSE library is needed.

Scopes are exactly what the caller passes (least privilege: there is no default). Tokens never appear in
logs, reprs or exception messages.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import AuthBase

from fhirtwin import jose
from fhirtwin.fhir.errors import FhirAuthError, FhirError, FhirValidationError
from fhirtwin.jose import b64url, compact_jws

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "BearerToken",
    "SmartBackendServices",
    "b64url",
    "discover_smart_configuration",
    "load_private_key",
    "public_jwk",
    "public_jwks",
    "sign_jwt",
]

log = logging.getLogger("fhirtwin.fhir")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART caps the client assertion lifetime at five minutes.
MAX_ASSERTION_LIFETIME_S = 300
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(pem: bytes | str, password: bytes | None = None) -> PrivateKey:
    """Load an RSA or EC private key from PEM; other key types are refused."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = serialization.load_pem_private_key(data, password=password)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("only RSA and EC private keys are supported")
    return key


def _check_key_alg(key: PrivateKey, alg: str) -> None:
    if alg == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RS384 needs an RSA private key")
        if key.key_size < 2048:
            raise ValueError("RSA keys shorter than 2048 bits are refused")
    elif alg == "ES384":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise ValueError("ES384 needs an EC private key on curve P-384")
    else:
        raise ValueError("alg must be 'RS384' or 'ES384' (the algorithms SMART Backend Services requires)")


def sign_jwt(header: Mapping[str, Any], claims: Mapping[str, Any], key: PrivateKey) -> str:
    """Compact JWS of ``claims`` with ``header['alg']`` (RS384 or ES384)."""
    _check_key_alg(key, str(header.get("alg")))
    return compact_jws(header, claims, key)


def public_jwk(
    key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str, alg: str
) -> dict[str, str | list[str]]:
    """Public JWK of ``key`` (RSA ``n``/``e``; EC ``crv``/``x``/``y``) to register with the server."""
    return {**jose.public_jwk(key), "kid": kid, "alg": alg, "use": "sig", "key_ops": ["verify"]}


def public_jwks(*keys: tuple[PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey, str, str]) -> dict[str, Any]:
    """A JWKS document ``{"keys": [...]}`` from ``(key, kid, alg)`` triples (publish at the ``jku`` URL)."""
    return {"keys": [public_jwk(key, kid, alg) for key, kid, alg in keys]}


class BearerToken(AuthBase):
    """A static access token (tests, sandbox, tokens obtained elsewhere)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"


class SmartBackendServices(AuthBase):
    """SMART Backend Services client: ``client_credentials`` grant with a ``private_key_jwt`` assertion.

    The access token is cached and fetched again ``refresh_margin`` seconds before it expires, or at
    once after :meth:`invalidate` (which :class:`~fhirtwin.fhir.client.FhirClient` calls on a 401).
    Thread-safe: concurrent requests share one token fetch.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key: PrivateKey | bytes | str,
        kid: str,
        scope: str,
        *,
        alg: str = "RS384",
        jku: str | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        assertion_lifetime: int = MAX_ASSERTION_LIFETIME_S,
        refresh_margin: float = 30.0,
        timeout: float | tuple[float, float] = (5, 30),
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(token_url)
        if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
            raise ValueError("token_url must use https (plain http only for loopback)")
        if not scope or not scope.strip():
            raise ValueError("scope is required (request only what the job needs, e.g. 'system/Observation.rs')")
        if not 0 < assertion_lifetime <= MAX_ASSERTION_LIFETIME_S:
            raise ValueError("assertion_lifetime must be in (0, 300] seconds")
        self.token_url = token_url
        self.client_id = client_id
        self.key = private_key if not isinstance(private_key, (bytes, str)) else load_private_key(private_key)
        _check_key_alg(self.key, alg)
        self.kid = kid
        self.scope = scope
        self.alg = alg
        self.jku = jku
        self.session = session if session is not None else requests.Session()
        self.clock = clock
        self.assertion_lifetime = assertion_lifetime
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self.verify = verify
        self.token_requests = 0
        self.granted_scope: str | None = None
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_discovery(
        cls,
        fhir_base_url: str,
        client_id: str,
        private_key: PrivateKey | bytes | str,
        kid: str,
        scope: str,
        **kwargs: Any,
    ) -> SmartBackendServices:
        """Build the client with the ``token_endpoint`` found in ``.well-known/smart-configuration``."""
        config = discover_smart_configuration(
            fhir_base_url, session=kwargs.get("session"), verify=kwargs.get("verify", True)
        )
        return cls(config["token_endpoint"], client_id, private_key, kid, scope, **kwargs)

    def __repr__(self) -> str:
        return f"SmartBackendServices(token_url={self.token_url!r}, client_id={self.client_id!r}, alg={self.alg!r})"

    def client_assertion(self) -> str:
        """A fresh signed client assertion (new ``jti`` each time, ``exp`` at most five minutes ahead)."""
        now = int(self.clock())
        header: dict[str, Any] = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        if self.jku:
            header["jku"] = self.jku
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + self.assertion_lifetime,
            "jti": secrets.token_urlsafe(32),
        }
        return sign_jwt(header, claims, self.key)

    def invalidate(self) -> None:
        """Forget the cached token so the next request fetches a new one (e.g. after a 401)."""
        with self._lock:
            self._token = None
            self._expires_at = 0.0

    def access_token(self) -> str:
        """The cached access token, fetched or refreshed when missing or about to expire."""
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at - self.refresh_margin:
                self._fetch_token()
            assert self._token is not None
            return self._token

    def _fetch_token(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        requested_at = self.clock()
        self.token_requests += 1
        try:
            response = self.session.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                verify=self.verify,
            )
        except requests.Timeout:
            raise FhirAuthError("token request timed out", method="POST", url=self.token_url) from None
        except requests.ConnectionError:
            raise FhirAuthError("token endpoint unreachable", method="POST", url=self.token_url) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            oauth_error = body.get("error") if isinstance(body, dict) else None
            raise FhirAuthError(
                "token request refused",
                oauth_error=str(oauth_error) if oauth_error else None,
                method="POST",
                url=self.token_url,
                status=response.status_code,
            )
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise FhirAuthError("token response has no access_token", method="POST", url=self.token_url)
        if str(body.get("token_type", "")).lower() != "bearer":
            raise FhirAuthError("token_type is not bearer", method="POST", url=self.token_url)
        try:
            expires_in = float(body.get("expires_in", MAX_ASSERTION_LIFETIME_S))
        except (TypeError, ValueError):
            expires_in = float(MAX_ASSERTION_LIFETIME_S)
        self._token = token
        self._expires_at = requested_at + expires_in
        self.granted_scope = body.get("scope")
        log.info("smart token obtained expires_in=%.0f scope_granted=%s", expires_in, self.granted_scope)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.access_token()}"
        return request


def discover_smart_configuration(
    base_url: str,
    *,
    session: requests.Session | None = None,
    timeout: float | tuple[float, float] = (5, 30),
    verify: bool | str = True,
) -> dict[str, Any]:
    """Read ``[base]/.well-known/smart-configuration``; raises if it is missing or has no token endpoint."""
    url = base_url.rstrip("/") + "/.well-known/smart-configuration"
    http = session if session is not None else requests.Session()
    try:
        response = http.get(url, headers={"Accept": "application/json"}, timeout=timeout, verify=verify)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise FhirError(f"smart-configuration unreachable ({type(exc).__name__})", method="GET", url=url) from None
    if response.status_code != 200:
        raise FhirError("smart-configuration not available", method="GET", url=url, status=response.status_code)
    try:
        config = response.json()
    except ValueError:
        raise FhirValidationError("smart-configuration is not JSON", method="GET", url=url) from None
    if not isinstance(config, dict) or not isinstance(config.get("token_endpoint"), str):
        raise FhirValidationError("smart-configuration has no token_endpoint", method="GET", url=url)
    return config
