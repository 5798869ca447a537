"""The signed Provenance of one run for one patient.

``target`` = everything written in the run (versioned after storage: HAPI resolves the ``urn:uuid``
references and, through its auto-version meta extension, stores the version it assigned; other servers
get the versions with ``transaction.versioned_provenance_update``), ``entity`` =
every input (versioned reference, role ``source``) plus superseded earlier results (role ``revision``),
``agent`` = the fhirtwin Device (author, on behalf of the Organization) and the Organization
(custodian), ``signature`` = the detached JWS defined in ``signing.py``, ``policy`` = the model card (and the declared
causal graph the engine ran under, when the caller names it).

Why ``policy`` for the model card: R4 defines ``Provenance.policy`` (0..*, uri) as the policy or plan the
activity was defined by, which is what a model card with its intended use and scope is
for the run. An ``entity`` would say the card was an input the targets were derived from (roles
derivation, revision, quotation, source, removal), which it is not, and its ``what`` is a Reference that a
server must resolve; the policy URI needs no Library on the server. The URI is the canonical URL of the
model card Library of the model version that made the targets, read from their ``model-card`` extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fhirtwin.vocabulary import (
    AUTO_VERSION_EXT,
    DATA_OPERATION,
    EXT_MODEL_CARD,
    MODEL_CARD_URI,
    PARTICIPANT_TYPE,
    RUN_TAG_SYSTEM,
    SIGNATURE_TYPE,
    coding,
    meta,
)
from fhirtwin.writeback.jws import SigningKey
from fhirtwin.writeback.signing import sign_targets


def _instant(moment: datetime) -> str:
    """An R4 instant; milliseconds kept when there are any (``recorded`` orders Provenances)."""
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def model_card_policies(targets: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The model cards (canonical URLs) the targets name, in order; the Markdown card URI when none does."""
    cards: list[str] = []
    for _, resource in targets:
        for ext in resource.get("extension") or []:
            value = ext.get("valueCanonical") if isinstance(ext, dict) and ext.get("url") == EXT_MODEL_CARD else None
            if isinstance(value, str) and value not in cards:
                cards.append(value)
    return cards or [MODEL_CARD_URI]


def build_provenance(
    targets: Sequence[tuple[str, dict[str, Any]]],
    sources: Sequence[str],
    *,
    device_reference: str,
    organization_reference: str,
    key: SigningKey,
    recorded: datetime,
    run_key: str,
    revisions: Sequence[str] = (),
    hapi: bool = True,
    activity: tuple[str, str] = ("CREATE", "create"),
    version_paths: Sequence[str] = (),
    policies: Sequence[str] = (),
) -> dict[str, Any]:
    """Provenance for ``targets`` (fullUrl, resource as sent), signed over their canonical form, the
    ``revisions`` it supersedes, its ``recorded`` time and its ``policy`` list (see ``signing.py``).

    ``hapi``: write HAPI's auto-version meta extension at ``version_paths`` (only HAPI knows it; the paths
    are in :data:`fhirtwin.writeback.transaction.HAPI_VERSION_PATHS`). ``activity`` is a v3-DataOperation
    code and display. ``policies``: further policy URIs the run was made under, after the model cards (the
    engine names its declared causal graph, version and SHA-256).
    """
    target_refs = [ref for ref, _ in targets]
    run_meta = meta("fhirtwin-provenance", {"system": RUN_TAG_SYSTEM, "code": run_key})
    if hapi and version_paths:
        run_meta["extension"] = [{"url": AUTO_VERSION_EXT, "valueString": path} for path in version_paths]
    entities = [{"role": "source", "what": {"reference": ref}} for ref in sorted(sources)]
    entities += [{"role": "revision", "what": {"reference": ref}} for ref in revisions]
    policy = [*model_card_policies(targets), *(p for p in policies if p)]
    occurred = _instant(recorded.replace(microsecond=0))
    recorded_at = _instant(recorded.replace(microsecond=recorded.microsecond // 1000 * 1000))
    return {
        "resourceType": "Provenance",
        "meta": run_meta,
        "target": [{"reference": ref} for ref in target_refs],
        "occurredDateTime": occurred,
        "recorded": recorded_at,
        "policy": policy,
        "activity": {"coding": [coding(activity[0], DATA_OPERATION, activity[1])]},
        "agent": [
            {"type": {"coding": [coding("author", PARTICIPANT_TYPE, "Author")]},
             "who": {"reference": device_reference}, "onBehalfOf": {"reference": organization_reference}},
            {"type": {"coding": [coding("custodian", PARTICIPANT_TYPE, "Custodian")]},
             "who": {"reference": organization_reference}},
        ],
        "entity": entities,
        "signature": [{
            "type": [coding("1.2.840.10065.1.12.1.1", SIGNATURE_TYPE, "Author's Signature")],
            "when": recorded_at,
            "who": {"reference": device_reference},
            "onBehalfOf": {"reference": organization_reference},
            "targetFormat": "application/fhir+json",
            "sigFormat": "application/jose",
            "data": sign_targets([r for _, r in targets], target_refs, key, revisions=revisions,
                                 recorded=recorded_at, policies=policy),
        }],
    }
