"""Who may use which door: bearer tokens, CDS Hooks client JWTs, webhook secrets and the FHIR server allow-list.

Why one module: every door asks the same question ("who is this, and may they do that?") and a hospital's
security review reads one place. The doors only call the app's :class:`Guard` (``bearer``, ``webhook``,
``cds_call``, ``fhir_server_allowed``) and turn an :class:`AuthError` into their own typed error body.

* ``$simulate`` and the webhook: an OAuth 2.0 bearer token that is a JWT from the configured issuer, checked
  against the issuer's JWKS (signature, ``iss``, ``aud``, ``exp``, ``nbf``), with SMART v2 scopes
  (``system/RiskAssessment.c`` … for writes, ``system/Patient.r`` for reads). The webhook may instead carry the
  per-Subscription secret (``Authorization: Bearer <secret>``) that ``fhirtwin subscribe --secret-file`` sets.
* CDS Hooks 2.0 ("Trusting CDS Clients"): the client's JWT must name a ``kid`` found in the registered
  client's JWKS (a ``jku`` header only when that URL is on the client's allow-list), ``iss`` a registered
  client, ``aud`` exactly this service's URL, ``exp``/``iat`` current and ``jti`` never seen before.
* Algorithms are RS256/RS384/ES256/ES384 only: never ``none`` and never HMAC, whose "key" a verifier would
  have to share (RFC 8725 §3.1-3.2).
* ``fhirServer`` of a CDS call and ``iss`` of a SMART launch must be on an allow-list, so the EHR's token is
  never sent to a server the hospital did not name.
* ``--dev-no-auth`` opens every door, for development on a loopback address only (:func:`check_dev_mode`).

Configuration is a TOML file (``fhirtwin serve --config``; see the README), parsed by :func:`load_config`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from fhirtwin import jose

#: Signature algorithms accepted on incoming JWTs (CDS Hooks 2.0 requires ES384 and RS384 support).
ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
#: Clock skew tolerated on ``exp``/``nbf``/``iat`` (seconds).
CLOCK_SKEW_S = 60
#: A CDS client JWT older than this (by ``iat``) is refused even before its ``exp``: they are per-call tokens.
CDS_MAX_AGE_S = 600
#: JWKS documents are re-read after this many seconds, or at once for an unknown ``kid`` (at most every 30 s).
JWKS_TTL_S = 300
_JWKS_MIN_REFRESH_S = 30
_JWKS_MAX_BYTES = 256 * 1024
_TOKEN_MAX_CHARS = 16 * 1024
_SEGMENT_MAX_CHARS = 8 * 1024
#: Time claims beyond this (the year 5138) are not real times.
_MAX_TIME = 1e11

#: The SMART v2 scopes each use needs (resource type → permissions, any of system/ or user/ context).
READ_SCOPES: dict[str, str] = {"Patient": "r"}
WRITE_SCOPES: dict[str, str] = {"Patient": "r", "RiskAssessment": "cu", "CarePlan": "cu", "Provenance": "c"}
#: The webhook's status page describes Subscription deliveries (no patient data).
STATUS_SCOPES: dict[str, str] = {"Subscription": "r"}
#: SMART v1 permission words and what they mean in v2 letters.
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


class AuthError(Exception):
    """A request that may not pass: ``status`` 401 (who are you?) or 403 (you may not), a message that names
    the rule without echoing the token, and the RFC 6750 ``error`` code for ``WWW-Authenticate``."""

    def __init__(self, status: int, message: str, *, error: str = "invalid_token", scope: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error
        self.scope = scope

    def www_authenticate(self) -> str:
        """The ``WWW-Authenticate`` header of a 401/403 answer (RFC 6750 §3)."""
        value = f'Bearer realm="fhirtwin", error="{self.error}"'
        if self.scope:
            value += f', scope="{self.scope}"'
        return value


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client (``client_id``/``azp``/``sub``), how it proved it, and its scopes."""

    client: str
    via: str  # "bearer", "cds-jwt", "webhook-secret" or "development"
    issuer: str | None = None
    scopes: frozenset[str] = frozenset()
    #: The end user when the token names one (SMART ``fhirUser``), for the audit trail.
    user: str | None = None


@dataclass(frozen=True)
class CdsClient:
    """A registered CDS client (an EHR): its ``iss``, its JWKS (https URL or file), the ``jku`` URLs it may
    name, and the FHIR servers it may name as ``fhirServer`` (empty: the service's global allow-list)."""

    issuer: str
    jwks: str
    jku: tuple[str, ...] = ()
    fhir_servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    """The identity provider for bearer tokens, the registered CDS clients and the allow-lists."""

    issuer: str | None = None
    jwks: str | None = None
    #: Expected ``aud`` of bearer tokens (default: the service's public URL and its ``/fhir`` base).
    audience: tuple[str, ...] = ()
    cds_clients: tuple[CdsClient, ...] = ()
    #: FHIR bases a CDS ``fhirServer`` or SMART ``iss`` may name (the service's own server is always allowed).
    fhir_servers: tuple[str, ...] = ()
    #: The per-Subscription secret the webhook accepts instead of a bearer JWT.
    webhook_secret: str | None = None


class ReplayCache(Protocol):
    """Remembers JWT ids until they expire (the embedded store implements it)."""

    def seen_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record ``jti``; True if it was already recorded (a replay)."""
        ...


# ---------------------------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """The security configuration is unusable (named field, reason); ``serve`` refuses to start."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (the only hosts ``--dev-no-auth`` may listen on)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_dev_mode(host: str) -> None:
    """Refuse ``--dev-no-auth`` on anything but a loopback address (raises ConfigError)."""
    if not is_loopback(host):
        raise ConfigError(f"--dev-no-auth is allowed only on a loopback host (127.0.0.1, ::1, localhost), "
                          f"not {host!r}")


def _key_source(value: Any, where: str, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be an https URL or a file path")
    if value.startswith(("https://", "http://")):
        _check_url(value, where)
        return value
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return  # a loopback identity provider (development and tests)
    raise ConfigError(f"{where} must be an https URL (http only on loopback): {url!r}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return tuple(v.strip() for v in value)


def read_secret(path: str, where: str) -> str:
    """A shared secret from a file (never the command line, where other users could read it)."""
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path!r} ({exc.strerror})") from exc
    if len(secret) < 16:
        raise ConfigError(f"{where}: the secret must have at least 16 characters")
    return secret


def load_config(path: str | os.PathLike[str]) -> AuthSettings:
    """The ``[auth]`` table of a TOML configuration file (relative key files resolve next to it)."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {str(file)!r} ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(file)!r} is not valid TOML: {exc}") from exc
    auth = data.get("auth", {})
    if not isinstance(auth, dict):
        raise ConfigError("[auth] must be a table")
    known = {"issuer", "jwks", "audience", "fhir_servers", "webhook_secret_file", "cds_clients"}
    unknown = sorted(set(auth) - known)
    if unknown:
        raise ConfigError(f"[auth] has unknown key(s): {', '.join(unknown)}")
    base = file.resolve().parent
    issuer = auth.get("issuer")
    if issuer is not None and (not isinstance(issuer, str) or not issuer.strip()):
        raise ConfigError("auth.issuer must be a string")
    jwks = _key_source(auth["jwks"], "auth.jwks", base) if "jwks" in auth else None
    if (issuer is None) != (jwks is None):
        raise ConfigError("auth.issuer and auth.jwks go together")
    clients = []
    raw_clients = auth.get("cds_clients", [])
    if not isinstance(raw_clients, list):
        raise ConfigError("auth.cds_clients must be an array of tables")
    for i, raw in enumerate(raw_clients):
        where = f"auth.cds_clients[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("issuer"), str):
            raise ConfigError(f"{where} needs an issuer")
        extra = sorted(set(raw) - {"issuer", "jwks", "jku", "fhir_servers"})
        if extra:
            raise ConfigError(f"{where} has unknown key(s): {', '.join(extra)}")
        jku = _strings(raw.get("jku"), f"{where}.jku")
        for url in jku:
            _check_url(url, f"{where}.jku")
        clients.append(CdsClient(issuer=raw["issuer"], jwks=_key_source(raw.get("jwks"), f"{where}.jwks", base),
                                 jku=jku, fhir_servers=_strings(raw.get("fhir_servers"), f"{where}.fhir_servers")))
    secret_file = auth.get("webhook_secret_file")
    secret = read_secret(str(base / secret_file), "auth.webhook_secret_file") if secret_file else None
    return AuthSettings(issuer=issuer, jwks=jwks, audience=_strings(auth.get("audience"), "auth.audience"),
                        cds_clients=tuple(clients),
                        fhir_servers=_strings(auth.get("fhir_servers"), "auth.fhir_servers"),
                        webhook_secret=secret)


# ---------------------------------------------------------------------------------------------- keys


class KeySet:
    """The public keys of one JWKS (an https URL or a file), cached; an unknown ``kid`` forces one re-read
    (at most every 30 s), so a key rotation is picked up without a restart and a flood cannot hammer the IdP."""

    def __init__(self, source: str, *, verify_tls: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.verify_tls = verify_tls
        self.clock = clock
        self._keys: dict[str, Any] = {}
        self._anonymous: list[Any] = []
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def _fetch(self) -> Any:
        if self.source.startswith(("https://", "http://")):
            response = requests.get(self.source, timeout=(3, 5), verify=self.verify_tls, stream=True,
                                    headers={"Accept": "application/json"}, allow_redirects=False)
            body = response.raw.read(_JWKS_MAX_BYTES + 1, decode_content=True)
            response.close()
            if response.status_code != 200 or len(body) > _JWKS_MAX_BYTES:
                raise AuthError(401, "the issuer's key set could not be read")
            return json.loads(body)
        return json.loads(Path(self.source).read_text(encoding="utf-8"))

    def _load(self) -> None:
        try:
            document = self._fetch()
        except (OSError, ValueError, requests.RequestException) as exc:
            self._loaded_at = self.clock()  # do not retry at once
            raise AuthError(401, "the issuer's key set could not be read") from exc
        keys: dict[str, Any] = {}
        anonymous: list[Any] = []
        entries = document.get("keys") if isinstance(document, dict) else None
        for jwk in entries if isinstance(entries, list) else []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                key = jose.public_key_from_jwk(jwk)
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(jwk.get("kid"), str):
                keys[jwk["kid"]] = (key, jwk.get("alg"))
            else:
                anonymous.append((key, jwk.get("alg")))
        self._keys, self._anonymous, self._loaded_at = keys, anonymous, self.clock()

    def key(self, kid: str | None) -> tuple[Any, str | None]:
        """The key (and its JWK ``alg``, if stated) for ``kid``; without a kid, the set's only key."""
        with self._lock:
            now = self.clock()
            stale = self._loaded_at is None or now - self._loaded_at > JWKS_TTL_S
            missing = kid is not None and kid not in self._keys
            if stale or (missing and now - (self._loaded_at or 0.0) > _JWKS_MIN_REFRESH_S):
                self._load()
            if kid is not None:
                if kid in self._keys:
                    return self._keys[kid]  # type: ignore[no-any-return]
                raise AuthError(401, "the token's kid is not in the issuer's key set")
            candidates = list(self._keys.values()) + self._anonymous
            if len(candidates) != 1:
                raise AuthError(401, "the token has no kid and the issuer's key set has more than one key")
            return candidates[0]  # type: ignore[no-any-return]


_key_sets: dict[tuple[str, bool], KeySet] = {}
_key_sets_lock = threading.Lock()


def key_set(source: str, *, verify_tls: bool = True) -> KeySet:
    """The process-wide cached KeySet of a JWKS source."""
    with _key_sets_lock:
        found = _key_sets.get((source, verify_tls))
        if found is None:
            found = _key_sets[(source, verify_tls)] = KeySet(source, verify_tls=verify_tls)
        return found


# ---------------------------------------------------------------------------------------------- tokens


def _segment(text: str, what: str) -> dict[str, Any]:
    """One JSON segment of a compact JWS, parsed before its signature is checked: so bounded in size and
    nesting (a deeply nested header must be a 401, not a recursion error)."""
    if len(text) > _SEGMENT_MAX_CHARS:
        raise AuthError(401, f"the token's {what} is too large")
    try:
        value = json.loads(jose.b64url_decode(text))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AuthError(401, f"the token's {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise AuthError(401, f"the token's {what} is not a JSON object")
    return value


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS (to pick the key); nothing in it is trusted yet."""
    if len(token) > _TOKEN_MAX_CHARS or token.count(".") != 2:
        raise AuthError(401, "the bearer token is not a compact JWS")
    return _segment(token.split(".", 1)[0], "header")


def verify_jwt(token: str, keys: Callable[[dict[str, Any]], tuple[Any, str | None]], *,
               issuers: Iterable[str], audiences: Iterable[str], now: float | None = None,
               max_age_s: float | None = None, require: Iterable[str] = ("exp",)) -> dict[str, Any]:
    """The claims of a JWT whose signature, ``iss``, ``aud``, ``exp``, ``nbf`` (and ``iat`` when
    ``max_age_s``) all check out; raises AuthError naming the first rule broken.

    ``keys`` maps the header to (public key, the JWK's stated ``alg`` or None); the header's ``alg`` must be
    in :data:`ALGORITHMS`, match the JWK's ``alg`` when stated, and suit the key type.
    """
    header = unverified_header(token)
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise AuthError(401, f"the token's alg must be one of {', '.join(ALGORITHMS)}")
    if "crit" in header:
        raise AuthError(401, "the token has critical header parameters this service does not understand")
    key, jwk_alg = keys(header)
    if jwk_alg is not None and jwk_alg != alg:
        raise AuthError(401, "the token's alg does not match its key")
    head, payload, signature = token.split(".")
    try:
        good = jose.verify(f"{head}.{payload}".encode("ascii"), jose.b64url_decode(signature), key, str(alg))
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuthError(401, "the token's alg does not suit its key") from exc
    if not good:
        raise AuthError(401, "the token's signature is not valid")
    claims = _segment(payload, "payload")
    now = time.time() if now is None else now
    for name in require:
        if name not in claims:
            raise AuthError(401, f"the token has no {name} claim")
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        # the range test also refuses NaN and infinities (every comparison with NaN is false)
        if name in claims and (not isinstance(value, int | float) or isinstance(value, bool)
                               or not 0 <= value < _MAX_TIME):
            raise AuthError(401, f"the token's {name} is not a time")
    if "exp" in claims and claims["exp"] <= now - CLOCK_SKEW_S:
        raise AuthError(401, "the token has expired")
    if "nbf" in claims and claims["nbf"] > now + CLOCK_SKEW_S:
        raise AuthError(401, "the token is not valid yet")
    if "iat" in claims and claims["iat"] > now + CLOCK_SKEW_S:
        raise AuthError(401, "the token was issued in the future")
    if max_age_s is not None and ("iat" not in claims or claims["iat"] < now - max_age_s):
        raise AuthError(401, "the token is too old")
    if claims.get("iss") not in set(issuers):
        raise AuthError(401, "the token's issuer is not trusted here")
    aud = claims.get("aud")
    given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    wanted = {a.rstrip("/") for a in audiences}
    if not any(isinstance(a, str) and a.rstrip("/") in wanted for a in given):
        raise AuthError(401, "the token's audience is not this service")
    return claims


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header (case-insensitive scheme), or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def granted(scopes: Iterable[str], resource_type: str, permissions: str) -> bool:
    """True if SMART scopes grant every letter of ``permissions`` (v2 ``cruds``) on ``resource_type``.

    Only ``system/`` scopes count: these doors read and write with the service's own credentials, so a
    ``user/`` or ``patient/`` scope (limited by what that user may see) cannot authorise them. Accepts the
    ``*`` resource and SMART v1 ``read``/``write``/``*``; a scope with a ``?`` restriction grants nothing here
    (the service cannot enforce the restriction).
    """
    have: set[str] = set()
    for scope in scopes:
        context, _, rest = scope.partition("/")
        if context != "system" or "?" in rest or "." not in rest:
            continue
        rtype, _, perms = rest.partition(".")
        if rtype not in (resource_type, "*"):
            continue
        have.update(_V1_PERMISSIONS.get(perms, perms if set(perms) <= set("cruds") else ""))
    return set(permissions) <= have


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str):
        return frozenset(scope.split())
    if isinstance(scope, list):
        return frozenset(s for s in scope if isinstance(s, str))
    return frozenset()


def _client_of(claims: Mapping[str, Any]) -> str:
    for name in ("client_id", "azp", "sub"):
        if isinstance(claims.get(name), str) and claims[name]:
            return str(claims[name])[:200]
    return "unknown"


# ---------------------------------------------------------------------------------------------- doors


@dataclass
class Guard:
    """The authentication policy of one running service (built once from its settings)."""

    auth: AuthSettings
    dev_no_auth: bool
    audiences: tuple[str, ...]
    service_url: str
    allowed_fhir_servers: tuple[str, ...]
    verify_tls: bool = True
    replay: ReplayCache | None = None
    _replay_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- bearer tokens ($simulate, webhook, replay, status)

    def bearer(self, headers: Mapping[str, str], needs: Mapping[str, str]) -> Principal:
        """The caller of a bearer-protected door, holding the scopes ``needs`` lists; raises AuthError."""
        if self.dev_no_auth:
            return Principal(client="development", via="development")
        token = bearer_token(headers)
        if token is None:
            raise AuthError(401, "this door needs an OAuth 2.0 bearer token", error="invalid_request")
        if not self.auth.issuer or not self.auth.jwks:
            raise AuthError(401, "no token issuer is configured for this service")
        keys = key_set(self.auth.jwks, verify_tls=self.verify_tls)
        claims = verify_jwt(token, lambda header: keys.key(header.get("kid") if isinstance(header.get("kid"), str)
                                                           else None),
                            issuers=[self.auth.issuer], audiences=self.audiences)
        scopes = _scopes(claims)
        missing = [f"system/{rtype}.{perms}" for rtype, perms in needs.items() if not granted(scopes, rtype, perms)]
        if missing:
            raise AuthError(403, "the token lacks the scope(s) " + " ".join(missing), error="insufficient_scope",
                            scope=" ".join(missing))
        user = claims.get("fhirUser")
        return Principal(client=_client_of(claims), via="bearer", issuer=self.auth.issuer, scopes=scopes,
                         user=user[:200] if isinstance(user, str) else None)

    def webhook(self, headers: Mapping[str, str]) -> Principal:
        """A Subscription delivery: the per-Subscription secret, else a bearer token with write scopes."""
        if self.dev_no_auth:
            return Principal(client="development", via="development")
        token = bearer_token(headers)
        secret = self.auth.webhook_secret
        if secret and token is not None and hmac.compare_digest(token.encode(), secret.encode()):
            return Principal(client="subscription", via="webhook-secret")
        if token is not None and token.count(".") != 2 and secret:
            raise AuthError(401, "the delivery's secret is not the configured one")
        return self.bearer(headers, WRITE_SCOPES)

    # -- CDS Hooks

    def cds_call(self, headers: Mapping[str, str], service_id: str) -> tuple[Principal, CdsClient | None]:
        """The registered CDS client whose JWT authorises this call (CDS Hooks 2.0), and its registration
        (None in development mode); raises AuthError."""
        if self.dev_no_auth:
            return Principal(client="development", via="development"), None
        token = bearer_token(headers)
        if token is None:
            raise AuthError(401, "a CDS client JWT is required", error="invalid_request")
        header = unverified_header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(401, "the CDS client JWT needs a kid")
        issuer = _segment(token.split(".")[1], "payload").get("iss")
        registered = next((c for c in self.auth.cds_clients if c.issuer == issuer), None)
        if registered is None:
            raise AuthError(401, "the CDS client is not registered here")
        jku = header.get("jku")
        if jku is not None and (not isinstance(jku, str) or jku not in registered.jku):
            raise AuthError(401, "the JWT's jku is not on the client's allow-list")
        keys = key_set(jku or registered.jwks, verify_tls=self.verify_tls)
        url = f"{self.service_url}/cds-services/{service_id}"
        claims = verify_jwt(token, lambda _header: keys.key(kid), issuers=[registered.issuer], audiences=[url],
                            max_age_s=CDS_MAX_AGE_S, require=("exp", "iat", "jti", "iss", "aud"))
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise AuthError(401, "the CDS client JWT needs a jti")
        if claims["exp"] <= time.time():
            raise AuthError(401, "the CDS client JWT has expired")  # no skew here: the replay cache must cover it
        if self.replay is not None and self.replay.seen_jti(registered.issuer, jti,
                                                             float(claims["exp"]) + CLOCK_SKEW_S):
            raise AuthError(401, "the CDS client JWT was already used (jti replay)")
        return Principal(client=_client_of(claims), via="cds-jwt", issuer=registered.issuer), registered

    def fhir_server_allowed(self, url: str, client: CdsClient | None = None) -> bool:
        """True if a CDS ``fhirServer`` may be contacted with the caller's token: one the client's registration
        lists, else one of ``auth.fhir_servers`` (in development: also the service's own server). The
        service's own server is never implied for a registered client: it would read it for them (a
        confused deputy)."""
        if client is not None and client.fhir_servers:
            allowed: tuple[str, ...] = client.fhir_servers
        elif self.dev_no_auth:
            allowed = self.allowed_fhir_servers
        else:
            allowed = self.auth.fhir_servers
        return url.rstrip("/") in {a.rstrip("/") for a in allowed}


def guard_for(settings: Any, replay: ReplayCache | None = None) -> Guard:
    """The Guard of a ``ServiceSettings``: audiences default to the public URL and its ``/fhir`` base."""
    auth: AuthSettings = settings.auth
    public = settings.public_url.rstrip("/")
    audiences = auth.audience or (public, f"{public}/fhir")
    allowed = (settings.fhir_server, *settings.smart_issuers, *auth.fhir_servers)
    return Guard(auth=auth, dev_no_auth=settings.dev_no_auth, audiences=tuple(audiences), service_url=public,
                 allowed_fhir_servers=tuple(allowed), verify_tls=settings.verify_tls, replay=replay)
