"""One transaction per patient run (or several runs merged), repeatable and superseding.

* Every result (RiskAssessment per outcome, Goals, CarePlan) is a ``POST`` with
  ``ifNoneExist: identifier=https://fhirtwin.org/sid/prediction|<key>``; the key hashes patient, model
  and version, the sorted versioned inputs, scenario, horizon and kind (``identifiers.py``). A rerun, a
  retried request or a Subscription echo therefore creates nothing. The Provenance (R4: no identifier)
  is conditional on its run tag ``https://fhirtwin.org/sid/run|<digest of the target keys>``.
* The Device and Organization are ``PUT`` to stable ids (an unchanged body is a no-op).
* ``fullUrl``: results created in the run get ``urn:uuid:`` (the server assigns their ids); entries that
  ``PUT`` a resource with a known id (Device, Organization, superseded results) get the absolute URL of
  that resource on the server (``base_url`` + ``Type/id``), or, when the base is not known, a ``urn:uuid:``
  derived deterministically from ``Type/id`` (:func:`full_url`). Relative ``fullUrl``s are not allowed in
  a Bundle (R4 Bundle.entry.fullUrl).
* Versioned references: ``RiskAssessment.basis`` and ``Provenance.entity.what`` are written with the input
  versions (``_history/N``). HAPI strips versions from references unless told otherwise, so for a HAPI
  server (``hapi=True``) each resource carries HAPI's ``auto-version-references-at-path`` meta extension,
  and HAPI also fills in the versions of the Provenance ``target``s it assigns. Other servers keep the
  versions as written and ignore the HAPI extension, which is then not written; the Provenance targets
  (``urn:uuid`` references the server resolves to unversioned ids) are made versioned afterwards with
  :func:`versioned_provenance_update` from the transaction response.
* **Supersede**: when inputs changed, the keys change, new results are created, and every earlier
  fhirtwin result of the patient that is not part of the new set gets the meta tag
  ``https://fhirtwin.org/CodeSystem/fhirtwin|superseded`` (a ``PUT`` of the stored body plus the tag,
  ``ifMatch`` on its version, in the same transaction). Its status stays ``final``: R4 ObservationStatus
  has no "superseded", ``amended`` describes a corrected resource and ``entered-in-error`` one that was
  wrong — the old assessment was right for its inputs. The new RiskAssessment links the old one with the
  ``supersedes`` extension and the Provenance lists it as entity role ``revision``. Because signed
  content excludes ``meta``, the old Provenance still verifies. Current results:
  ``RiskAssessment?subject=Patient/X&_tag:not=https://fhirtwin.org/CodeSystem/fhirtwin|superseded``
  (one per outcome; add ``&code=https://fhirtwin.org/CodeSystem/fhirtwin|risk-total-cvd`` for one).
* HAPI merges tags on update, so a tag cannot be removed inside a transaction: if inputs return to an
  earlier state (an input deleted again), the earlier results are current again and are listed in
  ``PatientWrite.reinstate`` for the caller to clear with ``$meta-delete`` after the transaction.
* **Signed currency**: which results are current is decided by signed Provenances, never by a tag alone.
  Each Provenance signs its targets, the results it supersedes (``revisions``) and its ``recorded`` time;
  the current results of a patient are the targets minus the revisions of the newest one. A transaction
  that changes currency without creating a run Provenance (a retirement; a rerun whose results all exist
  but which supersedes or reinstates) carries a **currency Provenance** (activity ``UPDATE``): targets =
  the results current afterwards (for a retirement: the retired results, which are also its revisions).
* **Lost responses**: every entry is conditional (``ifNoneExist``, ``ifMatch``) or an idempotent ``PUT``,
  so a transaction is retried; a retry after a commit whose response was lost fails on the ``ifMatch``
  (409/412). :func:`confirmation_reads` and :func:`confirmed_response` decide from the deterministic
  identifiers, the run tags and the superseded tags whether the transaction's content is on the server.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhirtwin.vocabulary import (
    AUTO_VERSION_EXT,
    OUTCOMES,
    PREDICTION_ID_SYSTEM,
    RUN_TAG_SYSTEM,
    SUPERSEDED_TAG,
)
from fhirtwin.writeback.careplan import build_care_plan, build_goals, care_plan_key, goal_keys
from fhirtwin.writeback.contracts import PlanLike, StateLike
from fhirtwin.writeback.device import DEFAULT_ORGANIZATION, device_id, device_resource, organization_resource
from fhirtwin.writeback.identifiers import if_none_exist, run_key
from fhirtwin.writeback.jws import SigningKey
from fhirtwin.writeback.provenance import build_provenance
from fhirtwin.writeback.riskassessment import build_risk_assessment, risk_key

RESULT_TYPES = ("RiskAssessment", "Goal", "CarePlan")


@dataclass
class PatientWrite:
    """The transaction for one patient and what it means."""

    patient_id: str
    bundle: dict[str, Any]
    keys: dict[str, str]
    run_key: str
    superseded: list[str] = field(default_factory=list)
    reinstate: list[str] = field(default_factory=list)
    #: ``ifNoneExist`` queries of entries that create (their resource was not stored when the write was built)
    expect_created: list[str] = field(default_factory=list)

    @property
    def results(self) -> list[dict[str, Any]]:
        """The resources this run may create (RiskAssessments, Goals, CarePlan, Provenance)."""
        return [e["resource"] for e in self.bundle["entry"] if e["request"]["method"] == "POST"]


def _urn(key: str, kind: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'https://fhirtwin.org/{kind}/{key}')}"


def full_url(resource_type: str, resource_id: str, base_url: str | None) -> str:
    """``fullUrl`` of an entry that writes ``Type/id``: absolute on ``base_url``, else a ``urn:uuid:`` of it."""
    ref = f"{resource_type}/{resource_id}"
    if base_url:
        return f"{base_url.rstrip('/')}/{ref}"
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, ref)}"


def key_of(resource: dict[str, Any]) -> str | None:
    """The fhirtwin prediction key of a stored resource, if it has one."""
    return next((i.get("value") for i in resource.get("identifier", []) or []
                 if i.get("system") == PREDICTION_ID_SYSTEM), None)


def is_superseded(resource: dict[str, Any]) -> bool:
    """True when the resource carries fhirtwin's superseded tag."""
    return any(t.get("system") == SUPERSEDED_TAG["system"] and t.get("code") == SUPERSEDED_TAG["code"]
               for t in resource.get("meta", {}).get("tag", []))


def _versioned(resource: dict[str, Any]) -> str:
    ref = f"{resource['resourceType']}/{resource['id']}"
    version = resource.get("meta", {}).get("versionId")
    return f"{ref}/_history/{version}" if version else ref


def _supersede_entry(resource: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    body = copy.deepcopy(resource)
    tags = body.setdefault("meta", {}).setdefault("tag", [])
    tags.append(dict(SUPERSEDED_TAG))
    request: dict[str, Any] = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    version = resource.get("meta", {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url(resource["resourceType"], resource["id"], base_url), "resource": body,
            "request": request}


def build_retirement(existing: Iterable[dict[str, Any]], base_url: str | None = None, *, patient_id: str,
                     key: SigningKey, model: tuple[str, str], organization_id: str = DEFAULT_ORGANIZATION,
                     now: datetime | None = None, hapi: bool = True) -> PatientWrite | None:
    """The transaction that supersedes every current fhirtwin result of a patient, or None if there is none.

    For a patient who has left the population the results were made for (e.g. a myocardial infarction is
    now recorded): the earlier primary-prevention results must stop being current, and nothing replaces
    them. Same mechanism as superseding by a newer run (a tag added with ``ifMatch``), so a retry is safe,
    plus a currency Provenance signing the retirement (``superseded`` lists the retired results), made by
    the Device of ``model`` (name, version; ``PUT`` in the same transaction, as for a run).
    """
    current = sorted((r for r in existing
                      if r.get("resourceType") in RESULT_TYPES and key_of(r) and not is_superseded(r)),
                     key=lambda r: (r["resourceType"], r["id"]))  # a fixed order, whichever read found them
    if not current:
        return None
    device = device_resource(model[0], model[1], organization_id)
    provenance = build_currency_provenance(current, current, device_reference=f"Device/{device['id']}",
                                           organization_reference=f"Organization/{organization_id}", key=key,
                                           recorded=now or datetime.now(UTC), hapi=hapi)
    entries = [{"fullUrl": full_url(r["resourceType"], r["id"], base_url), "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
               for r in (organization_resource(organization_id), device)]
    entries += [_supersede_entry(r, base_url) for r in current] + [_provenance_entry(provenance)]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return PatientWrite(patient_id, bundle, {}, provenance["meta"]["tag"][1]["code"],
                        [_versioned(r) for r in current], [], [_provenance_condition(provenance)])


def build_patient_write(
    plan: PlanLike,
    state: StateLike,
    *,
    key: SigningKey,
    existing: Iterable[dict[str, Any]] = (),
    now: datetime | None = None,
    organization_id: str = DEFAULT_ORGANIZATION,
    include_device: bool = True,
    base_url: str | None = None,
    hapi: bool = True,
    policies: Sequence[str] = (),
) -> PatientWrite:
    """The transaction Bundle for one patient's Plan.

    ``existing`` are the fhirtwin results already stored for this patient (RiskAssessment, Goal, CarePlan;
    current and superseded), as read by the caller; they decide what is superseded or reinstated.
    ``base_url`` is the server's base URL: entries that ``PUT`` a known resource get its absolute URL as
    ``fullUrl`` (``urn:uuid:`` of ``Type/id`` when None). ``hapi`` says whether the server is HAPI FHIR
    (its CapabilityStatement ``software.name`` contains "HAPI"): only then is HAPI's
    ``auto-version-references-at-path`` meta extension written; otherwise call
    :func:`versioned_provenance_update` with the transaction response. ``policies``: further
    ``Provenance.policy`` URIs (see :func:`build_provenance`).
    """
    moment = now or datetime.now(UTC)
    now = moment.replace(microsecond=0)
    forecast = plan.baseline
    patient_id = forecast.patient_id
    device_ref = f"Device/{device_id(forecast.model, forecast.model_version)}"
    org_ref = f"Organization/{organization_id}"
    outcomes = [o for o in OUTCOMES if o in forecast.cif]

    keys: dict[str, str] = {f"RiskAssessment/{o}": risk_key(forecast, o) for o in outcomes}
    keys.update({f"Goal/{name}": k for name, k in goal_keys(plan).items()})
    keys["CarePlan"] = care_plan_key(plan)
    wanted = set(keys.values())

    stored = [r for r in existing if r.get("resourceType") in RESULT_TYPES and key_of(r)]
    # in a fixed order (a search and an export list them differently): the Provenance lists them so
    to_supersede = sorted((r for r in stored if key_of(r) not in wanted and not is_superseded(r)),
                          key=lambda r: (r["resourceType"], r["id"]))
    reinstate = sorted({f"{r['resourceType']}/{r['id']}" for r in stored if key_of(r) in wanted and is_superseded(r)})
    old_ra_by_code: dict[str | None, list[str]] = {}
    for r in to_supersede:
        if r["resourceType"] == "RiskAssessment":
            code = next((c.get("code") for c in r.get("code", {}).get("coding", [])), None)
            old_ra_by_code.setdefault(code, []).append(f"RiskAssessment/{r['id']}")

    ra_refs = {o: _urn(keys[f"RiskAssessment/{o}"], "RiskAssessment") for o in outcomes}
    goal_refs = {name: _urn(keys[f"Goal/{name}"], "Goal") for name in goal_keys(plan)}
    targets: list[tuple[str, dict[str, Any]]] = []
    for outcome in outcomes:
        ra = build_risk_assessment(plan, state, outcome, occurrence=now, device_reference=device_ref,
                                   supersedes=old_ra_by_code.get(OUTCOMES[outcome][2], ()))
        if hapi:
            ra["meta"]["extension"] = _auto_version(HAPI_VERSION_PATHS["RiskAssessment"])
        targets.append((ra_refs[outcome], ra))
    goals = build_goals(plan, state, ra_refs, now)
    targets += [(goal_refs[name], goal) for name, goal in goals.items()]
    care_plan = build_care_plan(plan, state, ra_refs=ra_refs, goal_refs=goal_refs, occurrence=now,
                                device_reference=device_ref)
    cp_ref = _urn(keys["CarePlan"], "CarePlan")
    targets.append((cp_ref, care_plan))

    rkey = run_key(keys.values())
    provenance = build_provenance(targets, forecast.sources, device_reference=device_ref,
                                  organization_reference=org_ref, key=key, recorded=moment, run_key=rkey,
                                  revisions=[_versioned(r) for r in to_supersede], hapi=hapi,
                                  version_paths=HAPI_VERSION_PATHS["Provenance"], policies=policies)
    stored_keys = {key_of(r) for r in stored}
    new_keys = [k for k in keys.values() if k not in stored_keys]
    expect_created = [if_none_exist(k) for k in new_keys]
    if new_keys:
        expect_created.append(_provenance_condition(provenance))

    entries: list[dict[str, Any]] = []
    if include_device:
        for resource in (organization_resource(organization_id),
                         device_resource(forecast.model, forecast.model_version, organization_id)):
            url = f"{resource['resourceType']}/{resource['id']}"
            entries.append({"fullUrl": full_url(resource["resourceType"], resource["id"], base_url),
                            "resource": resource, "request": {"method": "PUT", "url": url}})
    for (ref, resource), kind in zip(targets, [*[f"RiskAssessment/{o}" for o in outcomes],
                                               *[f"Goal/{n}" for n in goals], "CarePlan"], strict=True):
        entries.append({"fullUrl": ref, "resource": resource,
                        "request": {"method": "POST", "url": resource["resourceType"],
                                    "ifNoneExist": if_none_exist(keys[kind])}})
    entries.append({"fullUrl": _urn(rkey, "Provenance"), "resource": provenance,
                    "request": {"method": "POST", "url": "Provenance",
                                "ifNoneExist": f"_tag={provenance['meta']['tag'][1]['system']}|{rkey}"}})
    entries += [_supersede_entry(r, base_url) for r in to_supersede]
    if not new_keys and (to_supersede or reinstate):  # no new run Provenance: sign the change of currency
        by_key = {key_of(r): r for r in stored}
        currency = build_currency_provenance([by_key[k] for k in keys.values()], to_supersede,
                                             device_reference=device_ref, organization_reference=org_ref,
                                             key=key, recorded=moment, hapi=hapi, sources=forecast.sources)
        entries.append(_provenance_entry(currency))
        expect_created.append(_provenance_condition(currency))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return PatientWrite(patient_id, bundle, keys, rkey, [_versioned(r) for r in to_supersede], reinstate,
                        expect_created)


def _provenance_condition(provenance: dict[str, Any]) -> str:
    run_tag = next(t for t in provenance["meta"]["tag"] if t.get("system") == RUN_TAG_SYSTEM)
    return f"_tag={RUN_TAG_SYSTEM}|{run_tag['code']}"


def _provenance_entry(provenance: dict[str, Any]) -> dict[str, Any]:
    condition = _provenance_condition(provenance)
    return {"fullUrl": _urn(condition, "Provenance"), "resource": provenance,
            "request": {"method": "POST", "url": "Provenance", "ifNoneExist": condition}}


def build_currency_provenance(current: Sequence[dict[str, Any]], superseded: Sequence[dict[str, Any]], *,
                              device_reference: str, organization_reference: str, key: SigningKey,
                              recorded: datetime, hapi: bool = True, sources: Sequence[str] = ()) -> dict[str, Any]:
    """The signed Provenance of a change of currency that creates no result (see the module docstring).

    ``current`` are stored results current after the transaction (its targets), ``superseded`` stored
    results it tags (its revisions), ``sources`` the inputs that make ``current`` current again (entities
    with role ``source``). A retirement passes the retired results as both targets and revisions (its
    revisions are then its entities). The run tag hashes the targets, the revisions and the time, so a
    retry of the same transaction matches it and a later change of currency gets a Provenance of its own.
    """
    refs = [f"{r['resourceType']}/{r['id']}" for r in current]
    revisions = [_versioned(r) for r in superseded]
    stamp = recorded.isoformat(timespec="milliseconds")
    ckey = run_key(["currency", stamp, *refs, *(f"revision {ref}" for ref in revisions)])
    return build_provenance(list(zip(refs, current, strict=True)), sources, device_reference=device_reference,
                            organization_reference=organization_reference, key=key, recorded=recorded,
                            run_key=ckey, revisions=revisions, hapi=hapi, activity=("UPDATE", "revise"),
                            version_paths=HAPI_CURRENCY_PATHS)


#: The paths HAPI versions (its auto-version-references-at-path meta extension) on what a write creates.
HAPI_VERSION_PATHS: dict[str, tuple[str, ...]] = {"RiskAssessment": ("basis",), "Provenance": ("target", "entity.what")}
#: A currency Provenance (activity UPDATE) versions its entities only: its targets are PUT, current versions.
HAPI_CURRENCY_PATHS = ("entity.what",)


def _auto_version(paths: Sequence[str]) -> list[dict[str, Any]]:
    return [{"url": AUTO_VERSION_EXT, "valueString": path} for path in paths]


def for_hapi(bundle: dict[str, Any]) -> dict[str, Any]:
    """A bundle built with ``hapi=False`` as ``hapi=True`` would have built it (a copy; ``meta`` is not signed,
    so the Provenance signature still holds): the auto-version extension on every resource it creates."""
    entries = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        paths = HAPI_VERSION_PATHS.get(resource["resourceType"]) if entry["request"]["method"] == "POST" else None
        if paths:
            activity = next((c.get("code") for c in (resource.get("activity") or {}).get("coding") or []), None)
            if resource["resourceType"] == "Provenance" and activity != "CREATE":
                paths = HAPI_CURRENCY_PATHS
            entry = {**entry, "resource": {**resource, "meta": {**(resource.get("meta") or {}),
                                                                "extension": _auto_version(paths)}}}
        entries.append(entry)
    return {**bundle, "entry": entries}


def merge_bundles(writes: Sequence[PatientWrite]) -> dict[str, Any]:
    """One transaction for several patients (batch runs): entries concatenated, shared PUTs once."""
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for write in writes:
        for entry in write.bundle["entry"]:
            if entry["request"]["method"] == "PUT" and entry["fullUrl"] in seen:
                continue
            seen.add(entry["fullUrl"])
            entries.append(entry)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _location_reference(location: str) -> str | None:
    """``Type/id/_history/N`` from a response ``location`` (absolute or relative), None without a version."""
    parts = location.split("?")[0].rstrip("/").split("/")
    if len(parts) < 4 or parts[-2] != "_history":
        return None
    return "/".join(parts[-4:])


def versioned_provenance_update(write: PatientWrite, response: dict[str, Any]) -> dict[str, Any] | None:
    """The Provenance body to ``PUT`` again so that its targets are versioned, or None.

    For servers other than HAPI (``build_patient_write(..., hapi=False)``): the server resolves the
    ``urn:uuid`` target references of the Provenance to the ids it assigned, without versions. This reads
    the transaction-response Bundle ``response`` (entries in request order, ``response.location`` =
    ``Type/id/_history/N``, absolute or relative) and returns the Provenance as sent with every ``target``
    that pointed at an entry of this write replaced by that entry's versioned reference and ``id`` set
    from the Provenance's own location; the caller ``PUT``s it to ``Provenance/<id>``. The signature needs
    no change: it covers the targets' content, not the Provenance. Returns None when there is nothing to
    change: the Provenance was not created (its status is not ``201``: the conditional create matched the
    Provenance of an identical earlier run, whose targets were set then) or no target maps to a versioned
    location. With ``hapi=True`` HAPI versions the targets itself and the update is not needed.
    A pure function: no I/O.
    """
    entries = write.bundle["entry"]
    answers = response.get("entry", []) or []
    locations: dict[str, str] = {}
    provenance_entry = None
    provenance_location = None
    for entry, answer in zip(entries, answers, strict=False):
        result = (answer or {}).get("response") or {}
        location = result.get("location")
        if not location:
            continue
        versioned = _location_reference(location)
        if entry["resource"]["resourceType"] == "Provenance":
            if str(result.get("status", "")).startswith("201"):
                provenance_entry, provenance_location = entry, versioned
        elif versioned:
            locations[entry["fullUrl"]] = versioned
    if provenance_entry is None or provenance_location is None:
        return None
    body: dict[str, Any] = copy.deepcopy(provenance_entry["resource"])
    changed = False
    for target in body.get("target", []):
        new = locations.get(target.get("reference", ""))
        if new and target["reference"] != new:
            target["reference"] = new
            changed = True
    if not changed:
        return None
    body["id"] = provenance_location.split("/")[1]
    meta = body.get("meta", {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    return body


# ---------------------------------------------------------------------------------------------- lost responses


def confirmation_reads(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """GET entries (a batch) that show whether ``bundle`` committed: one per entry, in its order.

    A conditional create is looked up by its ``ifNoneExist`` query, a version-checked ``PUT`` by reading
    the resource; an unconditional ``PUT`` (Device, Organization: the same body every time) is read too.
    """
    reads = []
    for entry in bundle["entry"]:
        request = entry["request"]
        if request["method"] == "POST" and request.get("ifNoneExist"):
            url = f"{request['url']}?{request['ifNoneExist']}"
        else:
            url = str(request["url"])
        reads.append({"request": {"method": "GET", "url": url}})
    return reads


def _found(answer: dict[str, Any]) -> dict[str, Any] | None:
    """The one resource a confirmation read found (a read, or a search with exactly one match)."""
    resource = answer.get("resource")
    if not isinstance(resource, dict) or not str((answer.get("response") or {}).get("status", "")).startswith("200"):
        return None
    if resource.get("resourceType") != "Bundle":
        return resource
    matches = [e.get("resource") for e in resource.get("entry") or []
               if (e.get("search") or {}).get("mode", "match") == "match"]
    return matches[0] if len(matches) == 1 and isinstance(matches[0], dict) else None


def _tags(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(str(t.get("system")), str(t.get("code"))) for t in (resource.get("meta") or {}).get("tag") or []}


def confirmed_response(bundle: dict[str, Any], answers: dict[str, Any],
                       expect_created: Iterable[str] = ()) -> dict[str, Any] | None:
    """The transaction-response ``bundle`` would have had, if the server holds all of its content; else None.

    ``answers`` is the batch-response to :func:`confirmation_reads`. Committed means: every conditional
    create finds exactly one resource, every version-checked ``PUT`` finds its resource carrying every tag
    the ``PUT`` sent (the ``superseded`` tag), every other ``PUT`` finds its resource. Entries whose
    ``ifNoneExist`` is in ``expect_created`` are reported ``201 Created`` (the lost attempt created them).
    """
    created = set(expect_created)
    entries = answers.get("entry") or []
    if len(entries) != len(bundle["entry"]):
        return None
    out = []
    for sent, answer in zip(bundle["entry"], entries, strict=True):
        found = _found(answer or {})
        if found is None or found.get("resourceType") != sent["resource"]["resourceType"]:
            return None
        request = sent["request"]
        if request.get("ifMatch") and not _tags(sent["resource"]) <= _tags(found):
            return None
        version = (found.get("meta") or {}).get("versionId")
        location = f"{found['resourceType']}/{found.get('id')}" + (f"/_history/{version}" if version else "")
        status = "201 Created" if request.get("ifNoneExist") in created else "200 OK"
        out.append({"response": {"status": status, "location": location}})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}
