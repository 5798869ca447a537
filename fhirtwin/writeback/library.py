"""The model card of one model version as a FHIR R4 ``Library`` (its canonical URL and the resource).

Why a Library: R4 has no model-card resource. A Library is a versioned, canonical knowledge artefact
whose ``content`` attachments carry documents; its ``type`` comes from the LibraryType code system
(http://terminology.hl7.org/CodeSystem/library-type), whose codes are logic-library ("a shareable library
of formalized knowledge"), model-definition ("a definition of an information model", i.e. a data model
such as QDM, not a predictive model), asset-collection ("a collection of knowledge assets") and
module-definition. A model card is a collection of documents about the software, so ``asset-collection``.

Every RiskAssessment names its card with the ``model-card`` extension (valueCanonical), every Provenance
in ``policy``, and the Device in the same extension: all three use :func:`model_card_url`, which needs no
server lookup, so a write never depends on the Library being registered. The id and URL contain the
model version, so each version has its own card, and ``fhirtwin register`` PUTs it to that id (an
unchanged card is a no-op on the server).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from fhirtwin.vocabulary import CANONICAL_BASE, GENERATED_TAG, MODEL_CARD_URI

LIBRARY_TYPE = "http://terminology.hl7.org/CodeSystem/library-type"


def library_id(model: str, model_version: str) -> str:
    """``fhirtwin-model-card-fhirtwin-mechanistic-0.3.0``: a valid FHIR id (letters, digits, '-', '.')."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", f"fhirtwin-model-card-{model}-{model_version}")[:64]


def model_card_url(model: str, model_version: str) -> str:
    """The card's canonical URL; it ends with the Library's id, as canonical URLs of FHIR artefacts do."""
    return f"{CANONICAL_BASE}/Library/{library_id(model, model_version)}"


def _computable_name(model: str, model_version: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", model)
    version = re.sub(r"[^A-Za-z0-9]+", "_", model_version).strip("_")
    return "".join(w[:1].upper() + w[1:] for w in words if w) + "ModelCard" + (f"_{version}" if version else "")


def attachment(data: bytes, content_type: str, title: str) -> dict[str, Any]:
    """An R4 Attachment with the data inline (base64), its size and its SHA-1 hash (base64), as R4 defines."""
    return {"contentType": content_type, "data": base64.b64encode(data).decode("ascii"), "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),  # noqa: S324 - R4 says SHA-1
            "title": title}


def card_json_bytes(card: Mapping[str, Any]) -> bytes:
    """The card serialised deterministically (the rule's order), so an unchanged card is an unchanged Library."""
    return (json.dumps(card, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _text(card: Mapping[str, Any], key: str) -> str:
    entry = card.get("attributes", {}).get(key, {})
    value = entry.get("value") if isinstance(entry, Mapping) else None
    return value if isinstance(value, str) else ""


def library_resource(card: Mapping[str, Any], html_text: str, *, citations: Sequence[str] = (),
                     usage: str | None = None) -> dict[str, Any]:
    """The Library for an assembled card (``fhirtwin.model_card.model_card``) and its rendered HTML.

    ``usage`` (Library.usage) is the cautioned out-of-scope use in words; ``citations`` become
    ``relatedArtifact`` citations next to the Markdown model card.
    """
    model, version = str(card["model"]["name"]), str(card["model"]["version"])
    title = f"Model card and HTI-1 source attributes: {model} {version}"
    resource: dict[str, Any] = {
        "resourceType": "Library",
        "id": library_id(model, version),
        "meta": {"tag": [dict(GENERATED_TAG)]},
        "text": {"status": "generated",
                 "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{escape(title)}. The source attributes '
                        "are in the attached JSON and HTML.</p></div>"},
        "url": model_card_url(model, version),
        "version": version,
        "name": _computable_name(model, version),
        "title": title,
        "status": "active",
        "type": {"coding": [{"system": LIBRARY_TYPE, "code": "asset-collection", "display": "Asset Collection"}]},
        "publisher": "fhirtwin",
        "description": (f"Source attributes of the predictive decision support intervention {model} {version} "
                        f"(fhirtwin {card['model']['software_version']}), one per attribute of 45 CFR "
                        "170.315(b)(11)(iv)(B), with the value and where it is documented."),
    }
    purpose = _text(card, "intended_use")
    if purpose:
        resource["purpose"] = purpose
    usage = usage or _text(card, "cautioned_out_of_scope_use")
    if usage:
        resource["usage"] = usage
    resource["relatedArtifact"] = [{"type": "documentation", "display": "Model card (Markdown)",
                                    "url": MODEL_CARD_URI}]
    resource["relatedArtifact"] += [{"type": "citation", "citation": c} for c in citations]
    resource["content"] = [
        attachment(card_json_bytes(card), "application/json", f"{library_id(model, version)}.json"),
        attachment(html_text.encode("utf-8"), "text/html", f"{library_id(model, version)}.html"),
    ]
    return resource
