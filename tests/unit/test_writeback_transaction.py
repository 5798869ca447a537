"""The per-patient transaction: conditional creates, signed Provenance, supersede and reinstate logic."""

from __future__ import annotations

import copy
import json

import pytest
from writeback_fixtures import NOW, changed_run, cohort_run

from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.vocabulary import AUTO_VERSION_EXT, EXT_SUPERSEDES, SUPERSEDED_TAG
from fhirtwin.writeback.device import device_id
from fhirtwin.writeback.jws import JwsError, generate_key
from fhirtwin.writeback.signing import verify_targets
from fhirtwin.writeback.transaction import (
    build_patient_write,
    full_url,
    is_superseded,
    key_of,
    merge_bundles,
    versioned_provenance_update,
)

KEY = generate_key()
BASE = "https://ehr.example.org/fhir"


def _write(run=None, existing=(), **options):
    run = run or cohort_run()
    return build_patient_write(run.plan, run.state, key=KEY, existing=existing, now=NOW, **options)


def _store(write) -> list[dict]:
    """Emulate the server: assign ids/versions to the POSTed results, resolve urn references."""
    ids = {}
    stored = []
    for n, entry in enumerate(write.bundle["entry"]):
        if entry["request"]["method"] == "POST":
            ids[entry["fullUrl"]] = f"{entry['resource']['resourceType']}/id{n}"
    for entry in write.bundle["entry"]:
        if entry["request"]["method"] != "POST":
            continue
        text = str(entry["resource"])
        resource = copy.deepcopy(entry["resource"])
        for urn, ref in ids.items():
            if urn in text:
                resource = eval(repr(resource).replace(urn, ref))  # noqa: S307 - test data only
        resource["id"] = ids[entry["fullUrl"]].split("/")[1]
        resource["meta"] = {**resource["meta"], "versionId": "1"}
        stored.append(resource)
    return stored


def test_bundle_shape_and_conditional_creates() -> None:
    write = _write()
    entries = write.bundle["entry"]
    methods = [(e["request"]["method"], e["resource"]["resourceType"]) for e in entries]
    assert methods[:2] == [("PUT", "Organization"), ("PUT", "Device")]
    assert [m for m in methods if m[0] == "POST"] == [("POST", "RiskAssessment")] * 4 + [("POST", "Goal")] * 2 + [
        ("POST", "CarePlan"), ("POST", "Provenance")]
    for entry in entries:
        if entry["request"]["method"] == "POST":
            assert entry["fullUrl"].startswith("urn:uuid:")
            assert entry["request"]["ifNoneExist"].startswith(("identifier=https://fhirtwin.org/sid/prediction|",
                                                               "_tag=https://fhirtwin.org/sid/run|"))
    def unsigned(bundle: dict) -> dict:
        out = copy.deepcopy(bundle)
        out["entry"][-1]["resource"]["signature"][0].pop("data")  # ECDSA signatures are randomised
        return out

    assert unsigned(write.bundle) == unsigned(_write().bundle)  # same inputs and time: same bundle
    assert write.superseded == [] and write.reinstate == []


def test_provenance_targets_entities_and_signature_survive_storage() -> None:
    write = _write()
    provenance = write.results[-1]
    targets = [e for e in write.bundle["entry"] if e["request"]["method"] == "POST"][:-1]
    assert [t["reference"] for t in provenance["target"]] == [e["fullUrl"] for e in targets]
    sources = sorted(cohort_run().plan.baseline.sources)
    assert [e["what"]["reference"] for e in provenance["entity"]] == sources
    assert {e["role"] for e in provenance["entity"]} == {"source"}
    assert provenance["agent"][0]["who"]["reference"].startswith("Device/")
    stored = _store(write)
    refs = [f"{r['resourceType']}/{r['id']}/_history/1" for r in stored[:-1]]
    public = KEY.private_key.public_key()
    verify_targets(provenance["signature"][0]["data"], stored[:-1], refs, public)
    stored[0]["prediction"][0]["probabilityDecimal"] = 0.999
    with pytest.raises(JwsError):
        verify_targets(provenance["signature"][0]["data"], stored[:-1], refs, public)


def test_rerun_with_existing_results_supersedes_nothing() -> None:
    first = _write()
    again = _write(existing=_store(first))
    assert again.superseded == [] and again.reinstate == []
    assert [e["request"]["method"] for e in again.bundle["entry"]].count("PUT") == 2  # Device, Organization


def test_changed_inputs_supersede_previous_results() -> None:
    old = _store(_write())
    write = _write(changed_run(), existing=old)
    assert set(write.keys.values()).isdisjoint({key_of(r) for r in old})
    supersede = [e for e in write.bundle["entry"] if e["request"]["method"] == "PUT" and "ifMatch" in e["request"]]
    assert len(supersede) == len(old) - 1  # every result except the old Provenance
    for entry in supersede:
        assert is_superseded(entry["resource"]) and entry["request"]["ifMatch"] == 'W/"1"'
        stored = next(r for r in old if r["id"] == entry["resource"]["id"])
        assert {k: v for k, v in entry["resource"].items() if k != "meta"} == {
            k: v for k, v in stored.items() if k != "meta"}, "only the tag changes: status stays as it was"
    new_ras = [r for r in write.results if r["resourceType"] == "RiskAssessment"]
    assert all([e["valueReference"]["reference"] for e in r["extension"] if e["url"] == EXT_SUPERSEDES]
               and all(e["valueReference"]["reference"].startswith("RiskAssessment/id")
                       for e in r["extension"] if e["url"] == EXT_SUPERSEDES) for r in new_ras)
    revisions = [e for e in write.results[-1]["entity"] if e["role"] == "revision"]
    assert len(revisions) == len(supersede) and all("/_history/1" in e["what"]["reference"] for e in revisions)
    # already superseded results are left alone
    tagged = [copy.deepcopy(r) for r in old]
    for r in tagged:
        r["meta"].setdefault("tag", []).append(dict(SUPERSEDED_TAG))
    assert _write(changed_run(), existing=tagged).superseded == []


def test_inputs_back_to_an_earlier_state_reinstate_it() -> None:
    old = _store(_write())
    for r in old:
        r["meta"].setdefault("tag", []).append(dict(SUPERSEDED_TAG))
    write = _write(existing=old)
    assert len(write.reinstate) == len(old) - 1 and write.superseded == []


def test_merge_bundles_keeps_shared_puts_once() -> None:
    a, b = _write(), _write(changed_run())
    merged = merge_bundles([a, b])
    urls = [e["fullUrl"] for e in merged["entry"]]
    assert urls.count(full_url("Device", device_id(MechanisticTwin.name, MechanisticTwin.version), None)) == 1
    assert len(merged["entry"]) == len(a.bundle["entry"]) + len(b.bundle["entry"]) - 2


def test_full_urls_are_absolute_or_urn_never_relative() -> None:
    old = _store(_write())
    for base in (None, BASE, BASE + "/"):
        write = _write(changed_run(), existing=old, base_url=base)
        puts = [e for e in write.bundle["entry"] if e["request"]["method"] == "PUT"]
        assert len(puts) == 2 + len(old) - 1  # Organization, Device and the superseded results
        for entry in write.bundle["entry"]:
            assert entry["fullUrl"].startswith(("urn:uuid:", "https://")), entry["fullUrl"]
        for entry in puts:
            ref = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
            assert entry["request"]["url"] == ref
            if base:  # a PUT of a known resource: its absolute URL on the server
                assert entry["fullUrl"] == f"{BASE}/{ref}"
            else:  # deterministic urn:uuid of Type/id
                assert entry["fullUrl"] == full_url(*ref.split("/"), None) == full_url(*ref.split("/"), None)
    assert full_url("Device", "a", None) != full_url("Organization", "a", None)


def test_hapi_auto_version_extension_only_for_hapi() -> None:
    hapi = _write()
    other = _write(hapi=False)
    assert AUTO_VERSION_EXT in json.dumps(hapi.bundle)
    assert AUTO_VERSION_EXT not in json.dumps(other.bundle)
    for write in (hapi, other):  # input versions are written either way
        for resource in write.results:
            refs = [b["reference"] for b in resource.get("basis", [])]
            refs += [e["what"]["reference"] for e in resource.get("entity", [])]
            assert all("/_history/" in r for r in refs)


def test_for_hapi_turns_a_bundle_for_any_server_into_the_hapi_bundle() -> None:
    """A population run builds for any server; adapting it for HAPI gives what hapi=True builds, byte for byte
    (the signature aside: ECDSA is randomised), and the adapted bundle's signature still verifies."""
    from fhirtwin.writeback.transaction import for_hapi

    def unsigned(bundle: dict) -> dict:
        out = copy.deepcopy(bundle)
        for entry in out["entry"]:
            for signature in entry["resource"].get("signature", []):
                signature.pop("data")
        return out

    first = _write(existing=_store(_write()), hapi=False)  # a superseding write: POSTs, PUTs and revisions
    adapted = for_hapi(first.bundle)
    assert unsigned(adapted) == unsigned(_write(existing=_store(_write()), hapi=True).bundle)
    assert adapted != first.bundle and AUTO_VERSION_EXT not in json.dumps(first.bundle)
    provenance = adapted["entry"][-1]["resource"]
    by_url = {e["fullUrl"]: e["resource"] for e in adapted["entry"]}
    refs = [t["reference"] for t in provenance["target"]]
    verify_targets(provenance["signature"][0]["data"], [by_url[r] for r in refs], refs, KEY.private_key.public_key())


def _response(write, provenance_status: str = "201 Created", absolute: bool = False) -> dict:
    """A transaction-response Bundle as a server answers ``write`` (entries in request order)."""
    entries = []
    for n, entry in enumerate(write.bundle["entry"]):
        resource = entry["resource"]
        rid = resource.get("id") or f"srv{n}"
        location = f"{resource['resourceType']}/{rid}/_history/1"
        status = provenance_status if resource["resourceType"] == "Provenance" else (
            "201 Created" if entry["request"]["method"] == "POST" else "200 OK")
        entries.append({"response": {"status": status,
                                     "location": f"{BASE}/{location}" if absolute else location}})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


def test_versioned_provenance_update_versions_the_targets_from_the_response() -> None:
    write = _write(hapi=False)
    sent = write.results[-1]
    for absolute in (False, True):
        body = versioned_provenance_update(write, _response(write, absolute=absolute))
        assert body is not None and body["resourceType"] == "Provenance"
        prov_n = len(write.bundle["entry"]) - 1
        assert body["id"] == f"srv{prov_n}"
        expected = [f"{e['resource']['resourceType']}/srv{n}/_history/1"
                    for n, e in enumerate(write.bundle["entry"]) if e["request"]["method"] == "POST"][:-1]
        assert [t["reference"] for t in body["target"]] == expected
        # everything else as sent (the signature covers the targets, not the Provenance)
        assert {k: v for k, v in body.items() if k not in ("target", "id")} == {
            k: v for k, v in sent.items() if k != "target"}
        assert AUTO_VERSION_EXT not in json.dumps(body)
    assert sent["target"][0]["reference"].startswith("urn:uuid:")  # the write itself is not modified


def test_versioned_provenance_update_nothing_to_do() -> None:
    write = _write(hapi=False)
    assert versioned_provenance_update(write, _response(write, provenance_status="200 OK")) is None  # matched
    assert versioned_provenance_update(write, {"resourceType": "Bundle", "entry": []}) is None
    unversioned = _response(write)
    for entry in unversioned["entry"]:
        entry["response"]["location"] = entry["response"]["location"].split("/_history")[0]
    assert versioned_provenance_update(write, unversioned) is None
