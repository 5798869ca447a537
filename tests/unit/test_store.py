"""The embedded store's rules: debounce, exclusive claims with leases (across processes), caps, the jti replay
cache, the audit outbox, private files, and what survives reopening the file."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time

import pytest

from fhirtwin.service.jobs import Debouncer, WebhookWorker
from fhirtwin.service.runtime import ServiceSettings
from fhirtwin.service.smart import SESSION_TTL_S, SessionStore
from fhirtwin.service.store import Store, default_store_path, open_store


@pytest.fixture()
def path(tmp_path):
    return tmp_path / "service.sqlite3"


@pytest.fixture()
def store(path) -> Store:
    return Store(path)


# ------------------------------------------------------------------------------------------------ tasks


def test_put_task_follows_the_debounce_rule(store: Store) -> None:
    assert store.put_task(("patient", "p1"), now=0.0, window=2.0, max_wait=5.0) is True
    assert store.put_task(("patient", "p1"), now=1.0, window=2.0, max_wait=5.0) is False
    assert store.next_due() == 3.0
    assert store.claim_due(2.9, "w") == []
    for t in (2.5, 3.5, 4.5):  # a steady stream is still run max_wait after its first event
        store.put_task(("patient", "p1"), now=t, window=2.0, max_wait=5.0)
    assert store.next_due() == 5.0
    [task] = store.claim_due(5.0, "w")
    assert task.key == ("patient", "p1") and task.first_event == 0.0 and task.attempts == 0


def test_the_stored_rule_matches_the_in_memory_debouncer(store: Store) -> None:
    rng = random.Random(7)
    debouncer = Debouncer(window=2.0, max_wait=6.0)
    now = 0.0
    for _ in range(300):
        now += rng.choice([0.0, 0.3, 0.7, 1.5, 2.5])
        key = ("patient", rng.choice("abc"))
        assert store.put_task(key, now=now, window=2.0, max_wait=6.0) == debouncer.add(key, now)
        claimed = sorted(t.key for t in store.claim_due(now, "w", limit=10))
        assert claimed == sorted(debouncer.pop_due(now))
        for key in claimed:
            store.done(key)


def test_a_retry_keeps_its_backoff_and_counts_attempts(store: Store) -> None:
    key = ("patient", "p1")
    store.put_task(key, now=0.0, window=1.0, max_wait=5.0)
    store.claim_due(1.0, "w")
    assert store.retry(key, 9.0, owner="w") == 1
    assert store.put_task(key, now=2.0, window=1.0, max_wait=5.0) is False
    assert store.next_due() == 9.0 and store.task_counts() == {"pending": 1, "retrying": 1, "leased": 0}
    [task] = store.claim_due(9.0, "w")
    assert task.attempts == 1


def test_an_event_during_a_run_runs_the_task_once_more(store: Store) -> None:
    key = ("patient", "p1")
    store.put_task(key, now=0.0, window=1.0, max_wait=5.0)
    store.claim_due(1.0, "w", lease_s=60)
    assert store.put_task(key, now=1.5, window=1.0, max_wait=5.0) is True  # the running attempt may be stale
    store.done(key, owner="w")
    assert store.task_counts()["pending"] == 1 and store.next_due() == 2.5
    [task] = store.claim_due(2.5, "w")
    store.done(task.key, owner="w")
    assert store.task_counts()["pending"] == 0


def test_an_expired_lease_makes_a_task_claimable_again(path) -> None:
    first, second = Store(path), Store(path)
    key = ("patient", "p1")
    first.put_task(key, now=0.0, window=1.0, max_wait=5.0)
    assert [t.key for t in first.claim_due(1.0, "dead-worker", lease_s=10.0)] == [key]
    assert second.claim_due(5.0, "live-worker") == []  # leased
    assert second.next_due() == 11.0
    assert [t.key for t in second.claim_due(11.0, "live-worker", lease_s=10.0)] == [key]
    first.done(key, owner="dead-worker")  # too late: it no longer holds the lease
    assert second.task_counts() == {"pending": 1, "retrying": 0, "leased": 1}
    second.done(key, owner="live-worker")
    assert first.task_counts()["pending"] == 0


def test_two_connections_never_claim_one_task(path) -> None:
    stores = [Store(path), Store(path)]
    for n in range(200):
        stores[0].put_task(("patient", f"p{n}"), now=0.0, window=0.0, max_wait=0.0)
    claimed: list[list[tuple[str, str]]] = [[], []]

    def claim(i: int) -> None:
        while batch := stores[i].claim_due(1.0, f"w{i}", limit=3):
            claimed[i].extend(t.key for t in batch)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = claimed[0] + claimed[1]
    assert len(everything) == 200 and len(set(everything)) == 200


CLAIMER = """
import json, sys, time
from fhirtwin.service.store import Store
store = Store(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
keys = []
while batch := store.claim_due(1.0, sys.argv[2], limit=1):
    keys.extend(t.key for t in batch)
    time.sleep(0.005)  # as if running the task: the other processes get their turns
print(json.dumps(keys), flush=True)
"""


def test_processes_sharing_the_file_never_claim_one_task(store: Store, path) -> None:
    for n in range(300):
        store.put_task(("patient", f"p{n}"), now=0.0, window=0.0, max_wait=0.0)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(path), f"proc{i}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:  # start claiming together
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    everything = [tuple(k) for keys in results for k in keys]
    assert len(everything) == 300 and len(set(everything)) == 300
    assert sum(1 for keys in results if keys) >= 2, "the processes did not overlap; nothing was tested"


# ------------------------------------------------------------------------------------- the worker, durable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_task_submitted_before_a_crash_is_run_by_the_next_process(path) -> None:
    clock, done = FakeClock(), []
    crashed = WebhookWorker({"patient": lambda pid: ("written", [])}, store=Store(path), clock=clock)
    crashed.submit("patient", "p1")  # acknowledged; the process dies before the window ends
    restarted = WebhookWorker({"patient": lambda pid: (done.append(pid), ("written", []))[1]}, store=Store(path),
                              clock=clock)
    assert restarted.status()["pending"] == 1 and restarted.status()["counts"] == {"scheduled_patient": 1}
    clock.now += 2.0
    assert restarted.run_pending() == 1 and done == ["p1"]


def test_a_task_claimed_by_a_killed_worker_is_rerun_after_its_lease(path) -> None:
    clock, done = FakeClock(), []
    killed = WebhookWorker({}, store=Store(path), clock=clock, lease_s=30.0)
    killed.submit("patient", "p1")
    clock.now += 2.0
    assert [t.key for t in killed.store.claim_due(clock(), killed.worker_id, killed.lease_s)] == [("patient", "p1")]
    other = WebhookWorker({"patient": lambda pid: (done.append(pid), ("written", []))[1]}, store=Store(path),
                          clock=clock)
    assert other.run_pending() == 0  # still leased by the (dead) worker
    clock.now += 30.0
    assert other.run_pending() == 1 and done == ["p1"] and other.status()["pending"] == 0


def test_a_failure_while_draining_stays_queued_for_the_next_start(path) -> None:
    clock = FakeClock()

    def down(pid: str):
        raise ConnectionError("FHIR server down")

    worker = WebhookWorker({"patient": down}, store=Store(path), clock=clock, max_attempts=4)
    worker.submit("patient", "p1")
    assert worker.shutdown(timeout=10) is True
    status = worker.status()
    assert status["pending"] == 1 and status["retrying"] == 1 and status["dead_letters"] == []
    assert status["last_errors"][-1]["error"] == "ConnectionError"


# ------------------------------------------------------------------------------- dead letters and status


def test_dead_letters_are_capped_merged_and_replayed(store: Store) -> None:
    for n in range(5):
        store.dead_letter(("patient", f"p{n}"), 4, "UpstreamError 502", f"2026-01-0{n + 1}", limit=3)
    store.dead_letter(("patient", "p4"), 2, "Permanent", "2026-02-01", limit=3)
    letters = store.dead_letters()
    assert [d.key[1] for d in letters] == ["p2", "p3", "p4"]
    assert letters[-1].attempts == 6 and letters[-1].error == "Permanent"
    assert letters[-1].first_failed == "2026-01-05" and letters[-1].last_failed == "2026-02-01"
    assert "p4" not in json.dumps(letters[-1].public())
    assert store.replay_dead_letters(now=0.0, window=1.0, max_wait=5.0) == [("patient", "p2"), ("patient", "p3"),
                                                                            ("patient", "p4")]
    assert store.dead_letters() == [] and store.task_counts()["pending"] == 3


def test_counts_and_errors_survive_reopening(path) -> None:
    store = Store(path)
    store.count("webhook", "done_written", 3)
    store.count("webhook", "done_written")
    store.count("webhook_received", "scheduled")
    for n in range(12):
        store.add_error("patient", f"Error{n}", "2026-01-01T00:00:00+00:00")
    store.close()
    reopened = Store(path)
    assert reopened.counts("webhook") == {"done_written": 4}
    assert reopened.counts("webhook_received") == {"scheduled": 1}
    errors = reopened.last_errors()
    assert len(errors) == 10 and errors[0]["error"] == "Error2" and errors[-1]["error"] == "Error11"


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.put_task(("patient", "p1"), now=0.0, window=1.0, max_wait=1.0)
        store.count("webhook", "scheduled_patient")
        raise RuntimeError("crash before the commit")
    assert store.task_counts()["pending"] == 0 and store.counts("webhook") == {}


# -------------------------------------------------------------------------------------- feedback, jti, outbox


def test_feedback_is_capped_oldest_first(store: Store) -> None:
    store.feedback_add([{"card": f"c{n}"} for n in range(8)], limit=5)
    assert [f["card"] for f in store.feedback()] == ["c3", "c4", "c5", "c6", "c7"]
    store.feedback_add([{"card": "c8"}], limit=5)
    assert [f["card"] for f in store.feedback()] == ["c4", "c5", "c6", "c7", "c8"]


def test_a_jti_is_a_replay_until_it_expires(store: Store) -> None:
    assert store.seen_jti("https://issuer", "abc", expires_at=100.0, now=10.0) is False
    assert store.seen_jti("https://issuer", "abc", expires_at=100.0, now=20.0) is True
    assert store.seen_jti("https://other", "abc", expires_at=100.0, now=20.0) is False
    assert store.seen_jti("https://issuer", "abc", expires_at=300.0, now=101.0) is False  # the old row expired
    assert Store(store.path).seen_jti("https://issuer", "abc", expires_at=300.0, now=102.0) is True


def test_the_outbox_hands_out_each_resource_until_done(store: Store) -> None:
    ids = [store.outbox_put("audit", {"resourceType": "AuditEvent", "id": str(n)}) for n in range(3)]
    first = store.outbox_take(2, now=0.0)
    assert [i for i, _ in first] == ids[:2] and first[0][1] == {"resourceType": "AuditEvent", "id": "0"}
    assert [i for i, _ in store.outbox_take(10, now=1.0)] == [ids[2]]  # the first two are taken
    store.outbox_done([ids[0], ids[2]])
    store.outbox_failed(ids[1], "UpstreamError 503", now=2.0)
    assert store.outbox_take(10, now=3.9) == []  # backoff: 2 s after the first failure
    assert [i for i, _ in store.outbox_take(10, now=4.0)] == [ids[1]]
    assert store.outbox_size() == 1
    assert [i for i, _ in Store(store.path).outbox_take(10, now=100.0)] == [ids[1]]  # a dead taker's lease ends
    store.outbox_done([ids[1]])
    assert store.outbox_size() == 0


# --------------------------------------------------------------------------------------- files and sessions


def test_the_default_file_is_private_and_in_wal_mode(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FHIRTWIN_STATE_DIR", str(tmp_path / "state"))
    store = open_store(ServiceSettings(fhir_server="http://127.0.0.1:9/fhir"))
    assert store.path == default_store_path().resolve() == (tmp_path / "state" / "service.sqlite3").resolve()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    store.count("webhook", "x")
    assert stat.S_IMODE(os.stat(f"{store.path}-wal").st_mode) == 0o600
    assert store._read("PRAGMA journal_mode")[0][0] == "wal"
    assert open_store(ServiceSettings(fhir_server="http://127.0.0.1:9/fhir")) is store


def test_an_existing_file_is_made_private(path) -> None:
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    Store(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_smart_sessions_survive_a_restart_and_expire(path) -> None:
    before = SessionStore(Store(path))
    session = before.create()
    session.iss, session.state = "https://ehr.example/fhir", "s1"
    before.save(session)
    session.token, session.patient = {"access_token": "t0k3n", "received": time.time()}, "p1"
    launch_id = session.id
    before.rotate(session)
    after = SessionStore(Store(path))  # another process, or this one restarted
    restored = after.get(session.id)
    assert restored is not None and restored is not session
    assert restored.token == session.token and restored.patient == "p1" and restored.csrf == session.csrf
    assert restored.iss == "https://ehr.example/fhir"
    assert after.get("no-such-session") is None and after.get(launch_id) is None
    stale = before.create()
    before.store.session_put(stale.id, time.time() - SESSION_TTL_S - 1, {"patient": "p2"})
    assert after.get(stale.id) is None and after.store.session_get(stale.id) is None
