"""Privacy consent: before fhirtwin reads or writes a patient's record, it honours active FHIR Consents that deny
this deployment's purpose of use.

Why here: every door reads through :class:`fhirtwin.engine.Engine`, so one check before the record read
covers the service, CDS Hooks, the Subscription worker and ``fhirtwin run`` alike. The only request made
for a patient before the decision is the Consent search itself (``Consent?patient=X&status=active``); a
denied patient gets no record read and no write (:class:`ConsentDenied`, HTTP 403).

The rule (FHIR R4 Consent, https://hl7.org/fhir/R4/consent.html, as profiled by IHE Privacy Consent on FHIR
(PCF), https://profiles.ihe.net/ITI/PCF/ — FoundationConsent and IntermediateConsent):

* only Consents with ``status = active`` and ``scope`` = ``patient-privacy``
  (http://terminology.hl7.org/CodeSystem/consentscope) count; a Consent without a scope is counted too
  (R4 makes scope 1..1; counting it errs on the side of the patient);
* a Consent whose base ``provision.period`` does not cover now is not in force (PCF: the period is a sunset;
  empty means no expiry);
* a provision *applies* when its ``period`` covers now, its ``purpose`` list is empty (= every purpose) or
  holds the deployment's purpose (v3-ActReason, e.g. ``TREAT``, ``HRESCH``), and its ``actor`` list is empty
  (PCF: "if empty then all in the community") or names one of the references that identify this deployment;
* the patient is **denied** when the base provision is ``deny`` and applies, unless a nested ``permit``
  provision (PCF: nested provisions are exceptions to the base) applies as well; or when any nested ``deny``
  provision applies, whatever the base says;
* fhirtwin uses a patient's record whole (it does not redact parts), so a deny provision scoped to some data
  (``data``, ``dataPeriod``, ``securityLabel``, ``class``, ``code``) still withholds the whole patient, and a
  permit scoped to some data does not lift a deny;
* a period that cannot be parsed counts as covering now for a deny and as not covering now for a permit;
* several Consents: any one denying is a denial.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fhirtwin.engine import EngineError

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
PRIVACY_SCOPE = "patient-privacy"
#: Purposes of use a deployment may declare (v3-ActReason, https://terminology.hl7.org/CodeSystem-v3-ActReason.html).
PURPOSES: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "HOPERAT": "healthcare operations",
    "HPAYMT": "healthcare payment",
    "HRESCH": "healthcare research",
    "PUBHLTH": "public health",
    "BTG": "break the glass",
}
#: Provision elements that restrict it to part of the record.
DATA_SCOPED = ("data", "dataPeriod", "securityLabel", "class", "code")
#: How many patients one Consent search names (the search is paged beyond that).
CHUNK = 20


class ConsentDenied(EngineError):
    """An active Consent denies this use of the patient's record: nothing beyond the Consent search is read.

    The message names neither the patient nor the Consent (it may reach a log or a client); ``patient_id``
    and ``consent`` are there for a caller who may say them (the CLI, the audit trail).
    """

    http_status = 403
    issue_code = "forbidden"

    def __init__(self, purpose: str, *, patient_id: str | None = None, consent: str | None = None) -> None:
        super().__init__(f"the patient's privacy consent does not permit this use (purpose of use {purpose})")
        self.purpose = purpose
        self.patient_id = patient_id
        self.consent = consent

    def outcome(self) -> dict[str, Any]:
        outcome = super().outcome()
        outcome["issue"][0]["details"] = {"coding": [purpose_coding(self.purpose)],
                                          "text": "denied by the patient's privacy consent"}
        return outcome


def purpose_coding(purpose: str) -> dict[str, str]:
    """The v3-ActReason Coding of a purpose of use (the same in AuditEvents and in Consent matching)."""
    coding = {"system": ACT_REASON, "code": purpose}
    if purpose in PURPOSES:
        coding["display"] = PURPOSES[purpose]
    return coding


@dataclass(frozen=True)
class ConsentPolicy:
    """What this deployment does with records: its purpose of use and the references that name it as a
    Consent actor (an Organization or Device reference); ``TREAT`` for the service and CDS Hooks, ``HRESCH``
    for population and research runs."""

    purpose: str = "TREAT"
    recipients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.purpose or ""):
            raise ValueError(f"purpose of use must be a v3-ActReason code (TREAT, HRESCH), not {self.purpose!r}")

    def denying(self, consents: Iterable[Any], now: datetime | None = None) -> str | None:
        """``Consent/id`` (or ``Consent`` when it has no id) of the first consent that denies, else None."""
        when = now or datetime.now(UTC)
        for consent in consents:
            if isinstance(consent, Mapping) and self._denies(consent, when):
                return f"Consent/{consent['id']}" if isinstance(consent.get("id"), str) else "Consent"
        return None

    def denials(self, client: Any, patient_ids: Sequence[str], now: datetime | None = None) -> dict[str, ConsentDenied]:
        """Search the active Consents of ``patient_ids`` (one search per :data:`CHUNK` patients) and return the
        denied ones. The search is a POST ``_search`` so that patient ids stay out of URLs and access logs."""
        ids = list(dict.fromkeys(patient_ids))
        found: dict[str, list[dict[str, Any]]] = {pid: [] for pid in ids}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            params = {"patient": ",".join(f"Patient/{pid}" for pid in chunk), "status": "active", "_count": 100}
            for consent in client.search_all("Consent", params, use_post=True):
                owner = _patient_of(consent)
                if owner in found:  # a server ignoring a parameter must not attribute a Consent to the wrong patient
                    found[owner].append(consent)
                elif owner is None:  # the server matched it to this search but its patient is unreadable:
                    for pid in chunk:  # it may be any of them, so it counts for each (fail closed)
                        found[pid].append(consent)
        out: dict[str, ConsentDenied] = {}
        for pid, consents in found.items():
            denying = self.denying(consents, now)
            if denying is not None:
                out[pid] = ConsentDenied(self.purpose, patient_id=pid, consent=denying)
        return out

    # -- the rule (see the module docstring)

    def _denies(self, consent: Mapping[str, Any], now: datetime) -> bool:
        if consent.get("status") != "active" or not _privacy_scope(consent.get("scope")):
            return False
        base = consent.get("provision")
        if not isinstance(base, Mapping) or _covers(base.get("period"), now) is False:
            return False
        nested = [p for p in _list(base.get("provision")) if isinstance(p, Mapping)]
        if base.get("type") == "deny" and self._applies(base, now, deny=True):
            lifted = any(p.get("type") == "permit" and self._applies(p, now, deny=False)
                         and not any(p.get(k) for k in DATA_SCOPED) for p in nested)
            if not lifted:
                return True
        return any(self._nested_deny(p, now) for p in nested)

    def _nested_deny(self, provision: Mapping[str, Any], now: datetime) -> bool:
        if provision.get("type") == "deny" and self._applies(provision, now, deny=True):
            return True
        return any(self._nested_deny(p, now) for p in _list(provision.get("provision")) if isinstance(p, Mapping))

    def _applies(self, provision: Mapping[str, Any], now: datetime, *, deny: bool) -> bool:
        covers = _covers(provision.get("period"), now)
        if covers is False or (covers is None and not deny):
            return False
        purposes = [c for c in _list(provision.get("purpose")) if isinstance(c, Mapping)]
        if purposes and not any(c.get("code") == self.purpose and c.get("system") in (ACT_REASON, None)
                                for c in purposes):
            return False
        actors = [a for a in _list(provision.get("actor")) if isinstance(a, Mapping)]
        if actors:
            named = {str((a.get("reference") or {}).get("reference", "")) for a in actors}
            return bool(named & set(self.recipients))
        return True


# ---------------------------------------------------------------------------------------------- helpers


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _patient_of(consent: Any) -> str | None:
    patient = consent.get("patient") if isinstance(consent, Mapping) else None
    reference = patient.get("reference") if isinstance(patient, Mapping) else None
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" else None


def _privacy_scope(scope: Any) -> bool:
    """patient-privacy, or no scope at all (see the module docstring)."""
    if not isinstance(scope, Mapping):
        return True
    codings = [c for c in _list(scope.get("coding")) if isinstance(c, Mapping)]
    return not codings or any(c.get("code") == PRIVACY_SCOPE and c.get("system") in (CONSENT_SCOPE, None)
                              for c in codings)


_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _bounds(text: Any) -> tuple[datetime, datetime] | None:
    """The first and last instant a FHIR dateTime denotes (``2022`` spans the year), None if unparseable."""
    if not isinstance(text, str):
        return None
    match = _PARTIAL.match(text.strip())
    try:
        if match:
            year, month, day = int(match[1]), int(match[2] or 1), int(match[3] or 1)
            start = datetime(year, month, day, tzinfo=UTC)
            try:
                if match[3]:
                    end = start + timedelta(days=1)
                elif match[2]:
                    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
                else:
                    end = datetime(year + 1, 1, 1, tzinfo=UTC)
            except (ValueError, OverflowError):  # the calendar's last day, month or year (9999-12-31)
                return start, datetime.max.replace(tzinfo=UTC)
            return start, end - timedelta(microseconds=1)
        instant = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if instant.tzinfo is None:
        return None  # FHIR requires a zone when a time is given
    return instant, instant


def _covers(period: Any, now: datetime) -> bool | None:
    """Whether ``period`` covers ``now``: True, False, or None when a bound cannot be parsed."""
    if not isinstance(period, Mapping):
        return True
    start, end = period.get("start"), period.get("end")
    lo = _bounds(start) if start is not None else None
    hi = _bounds(end) if end is not None else None
    if (start is not None and lo is None) or (end is not None and hi is None):
        return None
    return (lo is None or lo[0] <= now) and (hi is None or now <= hi[1])
