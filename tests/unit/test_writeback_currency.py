"""Signed currency, lost-response confirmation and the run checkpoint, without a server."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from test_writeback_transaction import KEY, _store, _write
from writeback_fixtures import NOW, changed_run, cohort_run

from fhirtwin.vocabulary import SUPERSEDED_TAG
from fhirtwin.writeback.checkpoint import Checkpoint, checkpoint_path, input_digest
from fhirtwin.writeback.jws import JwsError
from fhirtwin.writeback.signing import signature_header, verify_targets
from fhirtwin.writeback.transaction import (
    build_patient_write,
    build_retirement,
    confirmation_reads,
    confirmed_response,
    is_superseded,
)


def _tagged(resources: list[dict]) -> list[dict]:
    out = copy.deepcopy(resources)
    for resource in out:
        resource["meta"]["tag"].append(dict(SUPERSEDED_TAG))
        resource["meta"]["versionId"] = "2"
    return out


def _provenances(write) -> list[dict]:
    return [e["resource"] for e in write.bundle["entry"] if e["resource"]["resourceType"] == "Provenance"]


def test_the_signature_covers_the_superseded_results_and_the_recorded_time() -> None:
    first = _store(_write())
    second = _write(changed_run(), existing=first[:-1])
    [provenance] = _provenances(second)
    header = signature_header(provenance["signature"][0]["data"])
    assert header["revisions"] == sorted(f"{r['resourceType']}/{r['id']}" for r in first[:-1])
    assert header["recorded"] == provenance["recorded"]
    assert second.expect_created and all(q.startswith(("identifier=", "_tag=")) for q in second.expect_created)


def test_a_rerun_that_only_reinstates_signs_a_currency_provenance() -> None:
    stored = _store(_write())[:-1]
    run = cohort_run()
    write = build_patient_write(run.plan, run.state, key=KEY, existing=_tagged(stored), now=NOW + timedelta(seconds=1))
    assert write.reinstate and not write.superseded
    run_provenance, currency = _provenances(write)
    assert currency["activity"]["coding"][0]["code"] == "UPDATE"
    assert [t["reference"] for t in currency["target"]] == [f"{r['resourceType']}/{r['id']}" for r in stored]
    header = verify_targets(currency["signature"][0]["data"], _tagged(stored),
                            [t["reference"] for t in currency["target"]], KEY.private_key.public_key())
    assert header["revisions"] == []
    assert write.expect_created == [f"_tag={currency['meta']['tag'][1]['system']}|{currency['meta']['tag'][1]['code']}"]


def test_retirement_tags_every_current_result_and_signs_it() -> None:
    stored = _store(_write())[:-1]
    retirement = build_retirement(stored, patient_id="p", key=KEY, model=("m", "1"), now=NOW)
    assert retirement is not None and len(retirement.superseded) == len(stored)
    [provenance] = _provenances(retirement)
    header = signature_header(provenance["signature"][0]["data"])
    assert header["revisions"] == sorted(f"{r['resourceType']}/{r['id']}" for r in stored)
    assert sorted(header["revisions"]) == sorted(t["reference"] for t in provenance["target"])  # nothing current
    assert build_retirement(_tagged(stored), patient_id="p", key=KEY, model=("m", "1")) is None


def _server_answers(bundle: dict, stored: dict[str, dict]) -> dict:
    """A batch-response to the confirmation reads from a dict of what the 'server' holds."""
    entries = []
    for read in confirmation_reads(bundle):
        url = read["request"]["url"]
        if "?" in url:
            rtype, query = url.split("?", 1)
            value = query.split("|", 1)[1]
            hits = [r for r in stored.values() if r["resourceType"] == rtype
                    and (value in str(r.get("identifier")) or value in str(r["meta"].get("tag")))]
            entries.append({"resource": {"resourceType": "Bundle", "entry": [{"resource": r} for r in hits]},
                            "response": {"status": "200 OK"}})
        elif url in stored:
            entries.append({"resource": stored[url], "response": {"status": "200 OK"}})
        else:
            entries.append({"response": {"status": "404 Not Found"}})
    return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}


def test_confirmation_finds_a_committed_superseding_transaction_and_refuses_an_uncommitted_one() -> None:
    first = _store(_write())[:-1]
    write = build_patient_write(changed_run().plan, changed_run().state, key=KEY, existing=first, now=NOW)
    puts = {e["request"]["url"]: dict(e["resource"], id=e["request"]["url"].split("/")[1])
            for e in write.bundle["entry"] if e["request"]["method"] == "PUT"}
    created = {f"{r['resourceType']}/new-{r['id']}": dict(r, id=f"new-{r['id']}") for r in _store(write)}
    registration = {k: v for k, v in puts.items() if k.split("/")[0] not in ("RiskAssessment", "Goal", "CarePlan")}
    before = {**{f"{r['resourceType']}/{r['id']}": r for r in first}, **registration}
    assert confirmed_response(write.bundle, _server_answers(write.bundle, before), write.expect_created) is None
    after = {**before, **created, **{k: dict(v, meta={**v["meta"], "versionId": "2"}) for k, v in puts.items()}}
    response = confirmed_response(write.bundle, _server_answers(write.bundle, after), write.expect_created)
    assert response is not None
    statuses = [e["response"]["status"] for e in response["entry"]]
    posts = [e for e in write.bundle["entry"] if e["request"]["method"] == "POST"]
    assert statuses.count("201 Created") == len(posts)  # the lost attempt created every result and the Provenance
    # a superseded result whose tag is missing means the transaction did not commit
    untagged = {**after, **{f"{r['resourceType']}/{r['id']}": r for r in first}}
    assert not any(is_superseded(r) for r in first)
    assert confirmed_response(write.bundle, _server_answers(write.bundle, untagged), write.expect_created) is None


def test_checkpoint_skips_only_unchanged_inputs_with_current_outputs(tmp_path) -> None:
    stored = _store(_write())[:-1]
    outputs = [f"{r['resourceType']}/{r['id']}" for r in stored]
    record = [{"resourceType": "Patient", "id": "p", "meta": {"versionId": "1"}}]
    digest = input_digest(record, {"draws": 1000})
    assert input_digest(record, {"draws": 999}) != digest
    changed = [{**record[0], "meta": {"versionId": "2"}}]
    path = checkpoint_path("http://example.org/fhir", tmp_path)
    assert path != checkpoint_path("http://example.org/other/fhir", tmp_path)
    with Checkpoint(path) as checkpoint:
        assert checkpoint.skip("p", digest, stored) is None
        checkpoint.record("p", digest, outputs, "Provenance/1")
    with Checkpoint(path) as checkpoint:  # survives the process
        done = checkpoint.skip("p", digest, stored)
        assert done is not None and done.provenance == "Provenance/1"
        assert checkpoint.skip("p", input_digest(changed, {"draws": 1000}), stored) is None
        assert checkpoint.skip("p", digest, _tagged(stored[:1]) + stored[1:]) is None  # one no longer current
        assert checkpoint.skip("p", digest, None) is None
        checkpoint.forget("p")
        assert checkpoint.get("p") is None


def test_an_edited_revision_list_breaks_the_signature_check() -> None:
    """The revisions are in the signed header: the genuine signature verifies, the same signature under a
    header claiming other revisions does not (a signature cannot be re-used to hide other results)."""
    import base64
    import json as json_module

    from fhirtwin.jose import b64url, b64url_decode

    stored = _store(_write())[:-1]
    run = cohort_run()
    write = build_patient_write(run.plan, run.state, key=KEY, existing=_tagged(stored), now=NOW + timedelta(seconds=1))
    _, currency = _provenances(write)
    targets, refs = _tagged(stored), [t["reference"] for t in currency["target"]]
    data = currency["signature"][0]["data"]
    public = KEY.private_key.public_key()
    assert verify_targets(data, targets, refs, public)["revisions"] == []  # the genuine one verifies
    head, rest = base64.b64decode(data).decode().split(".", 1)
    header = json_module.loads(b64url_decode(head))
    header["revisions"] = [refs[0]]  # claim that a current result was superseded by this signature
    forged = base64.b64encode(f"{b64url(json_module.dumps(header).encode())}.{rest}".encode()).decode()
    with pytest.raises(JwsError):
        verify_targets(forged, targets, refs, public)



def test_a_refused_first_attempt_is_a_conflict_and_a_refused_retry_after_a_lost_response_is_unknown() -> None:
    """A 409/412 says nothing about an earlier attempt whose response was lost, but on a first attempt it is
    another writer's conflict: confirming it would report someone else's write as this one's success."""
    import requests
    import responses

    from fhirtwin.engine import outcome_unknown
    from fhirtwin.fhir.client import FhirClient

    base = "http://fhir.test/fhir"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, base, status=409, json={"resourceType": "OperationOutcome", "issue": []})
        with pytest.raises(Exception) as first:
            FhirClient(base, max_retries=2, sleep=lambda _s: None).transaction(bundle)
    assert first.value.status == 409 and not first.value.after_uncertain_attempt
    assert not outcome_unknown(first.value)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, base, body=requests.ConnectionError("reset"))
        mock.add(responses.POST, base, status=409, json={"resourceType": "OperationOutcome", "issue": []})
        with pytest.raises(Exception) as retried:
            FhirClient(base, max_retries=2, sleep=lambda _s: None).transaction(bundle)
    assert retried.value.status == 409 and retried.value.after_uncertain_attempt
    assert outcome_unknown(retried.value)


def test_a_corrupt_checkpoint_is_a_clear_error_and_a_bad_entry_just_runs_again(tmp_path) -> None:
    import sqlite3

    from fhirtwin.writeback.checkpoint import CheckpointError

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CheckpointError, match="--no-checkpoint"):
        Checkpoint(garbage)
    path = tmp_path / "ok.sqlite3"
    with Checkpoint(path) as checkpoint:
        checkpoint.record("p1", "d", ["RiskAssessment/1"], None)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE patient SET outputs = '{not json' WHERE id = 'p1'")
    with Checkpoint(path) as checkpoint:
        assert checkpoint.get("p1") is None


def test_the_signature_covers_the_policies_and_an_edited_policy_fails_verification() -> None:
    """Provenance.policy names the model card and the causal graph (version and SHA-256) the results were made
    under: it is in the signed header, and a Provenance whose policy was edited afterwards does not verify."""
    from test_keys import FakeServer

    from fhirtwin.causal.graph import graph_reference
    from fhirtwin.engine import Engine

    stored = _store(_write(policies=(graph_reference(),)))
    provenance = stored[-1]
    assert provenance["resourceType"] == "Provenance" and graph_reference() in provenance["policy"]
    assert signature_header(provenance["signature"][0]["data"])["policy"] == provenance["policy"]
    public = KEY.private_key.public_key()
    resources = {f"{r['resourceType']}/{r['id']}": r for r in stored}
    assert Engine(FakeServer(resources)).verify(f"Provenance/{provenance['id']}", public).valid
    edited = {**provenance, "policy": [*provenance["policy"][:-1], "https://example.org/another-graph|9.9.9"]}
    report = Engine(FakeServer({**resources, f"Provenance/{provenance['id']}": edited})).verify(
        f"Provenance/{provenance['id']}", public)
    assert not report.valid and "policy" in report.message


def test_a_signature_made_before_signed_policies_verifies_and_says_its_policy_is_unsigned() -> None:
    """Provenances signed before the ``policy`` header existed stay valid; the report says the part is unsigned."""
    from test_keys import FakeServer

    from fhirtwin.engine import Engine
    from fhirtwin.writeback.signing import sign_targets

    stored = _store(_write())
    provenance, targets = stored[-1], stored[:-1]
    refs = [t["reference"] for t in provenance["target"]]
    legacy = sign_targets(targets, refs, KEY, recorded=provenance["recorded"])  # no policies: the older form
    assert "policy" not in signature_header(legacy)
    old = {**provenance, "signature": [{**provenance["signature"][0], "data": legacy}]}
    resources = {f"{r['resourceType']}/{r['id']}": r for r in [*targets, old]}
    report = Engine(FakeServer(resources)).verify(f"Provenance/{old['id']}", KEY.private_key.public_key())
    assert report.valid and "policy list is not signed" in report.message
    current = {f"{r['resourceType']}/{r['id']}": r for r in stored}
    fresh = Engine(FakeServer(current)).verify(f"Provenance/{provenance['id']}", KEY.private_key.public_key())
    assert fresh.valid and "not signed" not in fresh.message
