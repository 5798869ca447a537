"""What a fhirtwin Provenance signs, exactly, so that anyone can verify it after the server stored it.

The signature (``Provenance.signature[0]``, one per Provenance) is a detached JWS (RFC 7515 Appendix F,
``header..signature``; ``Signature.data`` = standard base64 of that ASCII text, ``sigFormat``
``application/jose``) whose payload is the **target array**, built as follows:

1. Take the targets in ``Provenance.target`` order (the RiskAssessments, then the Goals, then the
   CarePlan). Each is the resource JSON as written (before sending) or as read back from the server
   (its current version).
2. From each target remove the server-managed or server-rewritten top-level elements ``id``, ``meta``
   (``versionId``, ``lastUpdated``, ``source``, tags, profiles, HAPI's auto-version extension) and
   ``text``. The id is assigned by the server on conditional create; the target stays bound to its
   content through its business identifier, which is signed.
3. Replace every ``reference`` string that points to another target of the same Provenance by
   ``urn:fhirtwin:target:<k>`` (k = 0-based position in ``Provenance.target``). Before sending, such
   references are the bundle's ``urn:uuid:`` fullUrls; after storage they are ``Type/id`` or
   ``Type/id/_history/n`` — both map to the same placeholder. All other references (inputs in
   ``basis``, the Patient, the Device) are signed verbatim, versions included.
4. Serialise the JSON array of these objects in canonical form (RFC 8785-style): UTF-8, no
   insignificant whitespace, object members sorted by key (code-point order), strings with the minimal
   JSON escapes, numbers as their shortest round-trip form with integral values written without a
   fraction and no exponent for 1e-6 <= |x| < 1e21 (so ``0.10`` and ``0.1``, ``10.0`` and ``10`` agree,
   as a server may reformat decimals).
5. The protected header holds ``alg`` (ES256 default; ES384, RS256 allowed), ``kid`` (RFC 7638
   thumbprint of the public key) and ``canon`` = :data:`CANONICALIZATION` naming this procedure, plus two
   private header parameters (RFC 7515 section 4.3) that sign what decides which results are current:
   ``revisions`` (the sorted ``Type/id`` of every result this Provenance supersedes, i.e. its entities
   with role ``revision``; ``[]`` when none) and ``recorded`` (``Provenance.recorded`` as written, which
   orders Provenances). Without them a ``superseded`` tag could be added by anyone with write access and
   hide current results from a verifier. A third, ``policy`` (``Provenance.policy`` as written: the model
   cards and the declared causal graph with its version and SHA-256), signs what the results were made
   under, so a verifier can trust the named graph and model card. Signatures made before these parameters
   existed lack them: their targets verify, the missing parts are unsigned.

Verification reads each target's current version, repeats steps 2–4 and checks the JWS: any change to
signed content (a value, a status, a note, an input reference) fails; tag or meta changes (such as
fhirtwin's own ``superseded`` tag) do not.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from fhirtwin.writeback.jws import SigningKey, header_of, sign_detached, verify_detached

CANONICALIZATION = "https://fhirtwin.org/fhir/canonicalization/targets-v1"
REMOVED = ("id", "meta", "text")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError("non-finite number cannot be canonicalised")
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = float.__repr__(value)  # not repr(): a float subclass (numpy's float64) may print its type name
    if "e" in text and 1e-6 <= abs(value) < 1e21:
        text = format(Decimal(text), "f")
    return text


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def canonical_json(value: Any) -> bytes:
    """Canonical UTF-8 JSON of plain data (dicts, lists, str, int, float, bool, None).

    The standard library's encoder writes exactly these bytes once integral floats are ints, provided no
    float prints with an exponent (its ``repr`` rule differs from step 4 there): that is the fast path;
    the rest goes through :func:`_emit`, which spells out step 4.
    """
    try:
        plain = _json_ready(value)
    except _ExponentFloat:
        return _emit(value).encode("utf-8")
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class _ExponentFloat(Exception):
    """A float whose ``repr`` has an exponent: the standard encoder would not write it canonically."""


def _json_ready(node: Any) -> Any:
    """A copy with integral floats as ints; raises :class:`_ExponentFloat` or ``TypeError``/``ValueError``."""
    if isinstance(node, str) or node is None or isinstance(node, bool | int):
        return node
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ValueError("non-finite number cannot be canonicalised")
        if node == int(node) and abs(node) < 1e21:
            return int(node)
        if "e" in float.__repr__(node):
            raise _ExponentFloat
        return node
    if isinstance(node, Mapping):
        if not all(isinstance(k, str) for k in node):
            raise TypeError("object keys must be strings")
        return {k: _json_ready(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_json_ready(v) for v in node]
    raise TypeError(f"cannot canonicalise {type(node).__name__}")


def _emit(node: Any) -> str:
    if node is None:
        return "null"
    if node is True:
        return "true"
    if node is False:
        return "false"
    if isinstance(node, int | float):
        return _number(node)
    if isinstance(node, str):
        return _string(node)
    if isinstance(node, Mapping):
        items = sorted(node.items(), key=lambda kv: kv[0])
        return "{" + ",".join(f"{_string(k)}:{_emit(v)}" for k, v in items) + "}"
    if isinstance(node, list | tuple):
        return "[" + ",".join(_emit(v) for v in node) + "]"
    raise TypeError(f"cannot canonicalise {type(node).__name__}")


def _target_key(reference: str) -> str:
    """``Type/id`` of a stored reference (drops a base URL and ``/_history/n``); urn:uuid unchanged."""
    if reference.startswith("urn:"):
        return reference
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def signing_form(resource: Mapping[str, Any], target_refs: Sequence[str]) -> dict[str, Any]:
    """Step 2 and 3 for one target: drop id/meta/text, replace references to fellow targets."""
    positions = {_target_key(ref): k for k, ref in enumerate(target_refs)}

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and _target_key(value) in positions:
                    out[key] = f"urn:fhirtwin:target:{positions[_target_key(value)]}"
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    prepared: dict[str, Any] = walk({k: v for k, v in resource.items() if k not in REMOVED})
    return prepared


def signed_payload(targets: Sequence[Mapping[str, Any]], target_refs: Sequence[str]) -> bytes:
    """Step 4: the canonical bytes of the target array."""
    if len(targets) != len(target_refs):
        raise ValueError("one resource per target reference is needed")
    return canonical_json([signing_form(t, target_refs) for t in targets])


def revision_keys(references: Iterable[str]) -> list[str]:
    """The signed form of a revision list: sorted, unique ``Type/id`` (bases and versions dropped)."""
    return sorted({_target_key(ref) for ref in references})


def sign_targets(targets: Sequence[Mapping[str, Any]], target_refs: Sequence[str], key: SigningKey, *,
                 revisions: Iterable[str] = (), recorded: str | None = None,
                 policies: Sequence[str] | None = None) -> str:
    """The base64 ``Signature.data`` for these targets, the results they supersede, the recording time and
    the policies (``Provenance.policy``) they were made under."""
    header: dict[str, Any] = {"canon": CANONICALIZATION, "revisions": revision_keys(revisions)}
    if recorded is not None:
        header["recorded"] = recorded
    if policies is not None:
        header["policy"] = list(policies)
    jws = sign_detached(signed_payload(targets, target_refs), key, header)
    return base64.b64encode(jws.encode("ascii")).decode("ascii")


def verify_targets(
    signature_data: str, targets: Sequence[Mapping[str, Any]], target_refs: Sequence[str], public_key: Any
) -> dict[str, Any]:
    """Check ``Signature.data`` against the targets; returns the JWS header or raises ``JwsError``."""
    from fhirtwin.writeback.jws import JwsError

    try:
        jws = base64.b64decode(signature_data, validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwsError("Signature.data is not base64 of a compact JWS") from exc
    if header_of(jws).get("canon") != CANONICALIZATION:
        raise JwsError("signature was made with an unknown canonicalization")
    return verify_detached(jws, signed_payload(targets, target_refs), public_key)


def signature_header(signature_data: str) -> dict[str, Any]:
    """The (unverified) JWS header inside ``Signature.data``: where a verifier reads the ``kid``."""
    from fhirtwin.writeback.jws import JwsError

    try:
        jws = base64.b64decode(signature_data, validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwsError("Signature.data is not base64 of a compact JWS") from exc
    return header_of(jws)
