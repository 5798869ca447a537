"""fhirtwin's rest-hook Subscriptions on a FHIR R4 server: create idempotently, turn off, wait for active.

Why in the transport layer: this is FHIR administration with no domain knowledge; the caller says which
criteria it needs (``fhirtwin.engine.subscription_criteria`` derives them from what the twin reads).
R4 Subscriptions have no identifier, so each carries a tag whose code is a digest of criteria, endpoint and
payload mode: the tag finds it again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fhirtwin.fhir.client import FhirClient
from fhirtwin.vocabulary import GENERATED_TAG, SUBSCRIPTION_TAG_SYSTEM, token

FHIR_JSON = "application/fhir+json"


def _subscription_key(criteria: str, endpoint: str, payload: bool) -> str:
    text = "\n".join((criteria, endpoint, "payload" if payload else "empty"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def subscription_resource(criteria: str, endpoint: str, *, payload: bool, headers: Iterable[str] = ()) -> dict:
    """One R4 rest-hook Subscription, tagged with its stable key (R4 Subscription has no identifier)."""
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload:
        channel["payload"] = FHIR_JSON
    if headers:
        channel["header"] = list(headers)
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": SUBSCRIPTION_TAG_SYSTEM, "code": _subscription_key(criteria, endpoint, payload)},
                         {"system": GENERATED_TAG["system"], "code": GENERATED_TAG["code"]}]},
        "status": "requested",
        "reason": "fhirtwin recomputes a patient's twin when data it reads changes",
        "criteria": criteria,
        "channel": channel,
    }


def _fhirtwin_subscriptions(client: FhirClient) -> list[dict[str, Any]]:
    """fhirtwin's Subscriptions (generated tag plus a key tag), bypassing HAPI's search cache."""
    params = {"_tag": token(GENERATED_TAG), "_count": 200}
    response = client.request("GET", "Subscription", params=params, headers={"Cache-Control": "no-cache"})
    return [r for r in client.iter_bundle_pages(response.json(), max_pages=20)
            if r.get("resourceType") == "Subscription"
            and any(t.get("system") == SUBSCRIPTION_TAG_SYSTEM for t in r.get("meta", {}).get("tag", []))]


@dataclass
class SubscriptionReport:
    """What ``ensure_subscriptions`` did: ids by action."""

    ids: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    turned_off: list[str] = field(default_factory=list)


def ensure_subscriptions(
    client: FhirClient, endpoint: str, criteria: Iterable[str], *, payload: bool = True, headers: Iterable[str] = (),
) -> SubscriptionReport:
    """Create or reactivate fhirtwin's Subscriptions for ``endpoint`` (idempotent); turn off stale ones.

    Each wanted Subscription is found by its key tag (criteria, endpoint, payload mode); a missing one is a
    conditional create on that tag, an ``off``/``error`` one or one with other headers is set back to
    ``requested``. fhirtwin Subscriptions to the same endpoint that are no longer wanted (e.g. the other
    payload mode) are set ``off`` so the endpoint is not notified twice.
    """
    headers = list(headers)
    report = SubscriptionReport()
    existing = _fhirtwin_subscriptions(client)
    wanted_keys: set[str] = set()
    for criterion in criteria:
        wanted = subscription_resource(criterion, endpoint, payload=payload, headers=headers)
        key = wanted["meta"]["tag"][0]["code"]
        wanted_keys.add(key)
        found = next((s for s in existing if any(t.get("code") == key for t in s.get("meta", {}).get("tag", []))),
                     None)
        if found is None:
            stored = client.create(wanted, if_none_exist=f"_tag={SUBSCRIPTION_TAG_SYSTEM}|{key}")
            report.created.append(stored["id"])
        elif found.get("status") in ("off", "error") or found.get("channel", {}).get("header", []) != headers:
            stored = client.update({**wanted, "id": found["id"]})
            report.updated.append(stored["id"])
        else:
            stored = found
            report.unchanged.append(found["id"])
        report.ids.append(stored["id"])
    for sub in existing:
        if sub.get("channel", {}).get("endpoint") != endpoint or sub.get("status") == "off":
            continue
        if not any(t.get("code") in wanted_keys for t in sub.get("meta", {}).get("tag", [])):
            client.update({**sub, "status": "off"})
            report.turned_off.append(sub["id"])
    return report


def disable_subscriptions(client: FhirClient, endpoint: str) -> list[str]:
    """Set every fhirtwin Subscription to ``endpoint`` to ``off``; returns their ids."""
    ids = []
    for sub in _fhirtwin_subscriptions(client):
        if sub.get("channel", {}).get("endpoint") == endpoint and sub.get("status") != "off":
            client.update({**sub, "status": "off"})
            ids.append(sub["id"])
    return ids


def wait_active(client: FhirClient, ids: Iterable[str], *, timeout: float = 60.0, interval: float = 1.0,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                ) -> dict[str, str]:
    """Poll the Subscriptions until all are ``active`` (HAPI activates asynchronously) or ``timeout`` passes."""
    pending = list(ids)
    status: dict[str, str] = {}
    deadline = clock() + timeout
    while True:
        for sid in pending:
            status[sid] = str(client.read("Subscription", sid).get("status"))
        pending = [s for s in pending if status[s] != "active"]
        if not pending or clock() >= deadline or any(status[s] == "error" for s in pending):
            return status
        sleep(interval)
