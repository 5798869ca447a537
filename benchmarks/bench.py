"""``fhirtwin bench``: the performance budgets measured in one run against a live FHIR server.

Run: ``fhirtwin bench [--server URL] [--patients N] [--json]`` (or ``python benchmarks/bench.py ...``).
``benchmarks/`` is not installed with the package: the CLI loads this file from the source checkout
(``<repo>/benchmarks/bench.py``, next to ``fhirtwin/``), the way ``fhirtwin.sandbox.load`` finds
``profiles/``.

What it measures (budgets in brackets):

* ``read_requests_per_patient`` / ``write_requests_per_patient`` [<= 1 each]: client request counter
  around the record read and around the write, single-patient runs over 10 patients.
* ``client_cpu_ratio_vs_server_ingest`` [<= 0.25]: fhirtwin's CPU per patient on the run path (read -> twin
  -> simulate -> write: ``client_cpu_ms_per_patient``) over the server's CPU to ingest the same patient's
  results (``server_ingest_cpu_ms_per_patient``, the server on this machine). Also reported, without a
  budget: ``throughput_ratio_vs_hapi_ingest``, patients per second of the run path (``--concurrency``
  workers, one session each) divided by the rate at which the same server ingests the same transaction
  bundles posted directly with the same concurrency (on a shared 2-core machine both sides compete for the
  same cores, so that ratio measures the machine more than fhirtwin). So that both
  sides do the same server work (conditional creates that create), the run path works on fresh copies
  of cohort patients (made before timing, deleted afterwards), and the direct side posts the bundles a
  dry run prepared for those copies with every prediction key replaced by a fresh one (otherwise every
  conditional create would match what the run path just wrote).
* ``ensemble_ms_per_patient`` [<= 20] and ``ensemble_speedup_vs_naive`` [>= 100]: ``bench_ensemble.measure``
  pinned to one core.
* ``cds_p50_ms`` / ``cds_p95_ms`` [p95 <= 150]: CDS Hooks ``patient-view`` with complete prefetch through
  a ``fhirtwin serve`` subprocess (prefetch built against the server once, calls timed after a warm-up).
* ``offline_patients_per_s_per_core`` [>= 25], ``dask_speedup_2_workers_vs_1`` [>= 1.6] and, with
  ``--population-scale 10000,100000``, ``population_peak_rss_ratio_100k_vs_10k`` [<= 1.5]: see
  ``bench_population.py``.
* peak RSS of this process and of the service, the machine, and versions.

With ``--json`` the last line of stdout is one JSON object. Results are appended to
``benchmarks/RESULTS.md``. Not a test: never collected by pytest, nothing asserts on wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_SERVER = "http://127.0.0.1:8080/fhir"
COHORT_PREFIX = "ftp-"
CDS_SERVICE = "fhirtwin-cardiorenal-risk"
BUDGETS = {
    "read_requests_per_patient": ("<=", 1),
    "write_requests_per_patient": ("<=", 1),
    "client_cpu_ratio_vs_server_ingest": ("<=", 0.25),
    "offline_patients_per_s_per_core": (">=", 25),
    "population_peak_rss_ratio_100k_vs_10k": ("<=", 1.5),
    "dask_speedup_2_workers_vs_1": (">=", 1.6),
    "ensemble_ms_per_patient": ("<=", 20),
    "ensemble_speedup_vs_naive": (">=", 100),
    "cds_p95_ms": ("<=", 150),
}


# ------------------------------------------------------------------------------------------- environment


def machine() -> dict[str, Any]:
    """Cores, CPU model and memory: the numbers mean little without them."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {"cores": os.cpu_count(), "cpu_model": model, "memory_gb": mem_gb, "os": platform.platform()}


def versions(client: Any) -> dict[str, Any]:
    """Python, fhirtwin, numpy and the server's software version (CapabilityStatement)."""
    import numpy

    import fhirtwin

    software = client.capabilities().get("software") or {}
    return {"python": platform.python_version(), "fhirtwin": fhirtwin.__version__, "numpy": numpy.__version__,
            "server": f"{software.get('name', '?')} {software.get('version', '?')}"}


def _peak_rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def server_pid(server: str) -> int | None:
    """The pid of the process listening on the server's port when it runs on this machine (via ``ss``)."""
    import re
    from urllib.parse import urlsplit

    parts = urlsplit(server)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        text = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=5).stdout  # noqa: S607
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].rsplit(":", 1)[-1] == str(port):
            found = re.search(r"pid=(\d+)", line)
            return int(found.group(1)) if found else None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------------------- cohort copies


def _rewrite_refs(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v, refs) for k, v in node.items()}
        ref = node.get("reference")
        if isinstance(ref, str) and ref in refs:
            out["reference"] = refs[ref]
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, refs) for v in node]
    return node


def copy_record(client: Any, record: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Post a copy of one patient's record under server-assigned ids; the new Patient id and all refs."""
    refs = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid4()}" for r in record}
    entries = []
    for r in record:
        body = _rewrite_refs({k: v for k, v in r.items() if k not in ("id", "meta", "text")}, refs)
        entries.append({"fullUrl": refs[f"{r['resourceType']}/{r['id']}"], "resource": body,
                        "request": {"method": "POST", "url": r["resourceType"]}})
    response = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    created = ["/".join(e["response"]["location"].split("/_history")[0].split("/")[-2:]) for e in response["entry"]]
    patient = next(c for c in created if c.startswith("Patient/"))
    return patient.split("/", 1)[1], created


def delete_copy(client: Any, created: list[str], patient_id: str, provenance_queries: Iterable[str]) -> None:
    """Delete a copied patient, everything written for it and its Provenances, in one transaction."""
    from fhirtwin.fhir.client import batch_results

    searches = [f"{t}?subject=Patient/{patient_id}&_elements=id&_count=500"
                for t in ("RiskAssessment", "Goal", "CarePlan")] + [f"{q}&_elements=id" for q in provenance_queries]
    entries = [{"request": {"method": "GET", "url": u}} for u in searches]
    found: list[str] = []
    for result in batch_results(client.batch(entries), entries):
        for e in (result.resource or {}).get("entry", []):
            found.append(f"{e['resource']['resourceType']}/{e['resource']['id']}")
    found.sort(key=lambda ref: not ref.startswith("Provenance/"))
    doomed = list(dict.fromkeys(found + created))
    client.transaction([{"request": {"method": "DELETE", "url": ref}} for ref in doomed])


def salted(write: Any, salt: str) -> dict[str, Any]:
    """The write's bundle with every prediction key and the run key replaced by a fresh one."""
    text = json.dumps(write.bundle)
    for key in [*write.keys.values(), write.run_key]:
        text = text.replace(key, hashlib.sha256(f"{key}:{salt}".encode()).hexdigest()[:32])
    return json.loads(text)


def _provenance_query(bundle: dict[str, Any]) -> str:
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")
    return f"Provenance?{entry['request']['ifNoneExist']}"


def _parallel(func: Callable[[Any, Any], Any], items: Sequence[Any], workers: int, make_client: Callable[[], Any]
              ) -> list[Any]:
    """``func(client, item)`` over ``items`` with ``workers`` threads, one client (HTTP session) each."""
    local = threading.local()

    def run(item: Any) -> Any:
        if not hasattr(local, "client"):
            local.client = make_client()
        return func(local.client, item)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(run, items))


# ------------------------------------------------------------------------------------------- run path


def run_patient(client: Any, patient_id: str, key: Any) -> dict[str, Any]:
    """The run path for one patient, with its stage times and request counts."""
    from fhirtwin.engine import Engine

    engine = Engine(client, signing_key=key)
    t0, n0 = time.perf_counter(), client.request_count
    record = engine.read(patient_id)
    t1, n1 = time.perf_counter(), client.request_count
    run = engine.simulate(engine.twin(record), stored=record.stored)
    t2 = time.perf_counter()
    [result] = list(engine.write([run]))
    t3, n3 = time.perf_counter(), client.request_count
    return {"status": result.status, "created": result.created, "read_requests": n1 - n0,
            "write_requests": n3 - n1, "read_s": t1 - t0, "simulate_s": t2 - t1, "write_s": t3 - t2}


def prepare(client: Any, patient_id: str, key: Any) -> Any:
    """Dry run: the PatientWrite the run path would send (None when the patient cannot be simulated)."""
    from fhirtwin.engine import Engine

    engine = Engine(client, signing_key=key)
    run = engine.run(patient_id)
    return engine.prepare(run) if run.plan is not None else None


def bench_server(server: str, patients: int, concurrency: int, keep: bool, log: Callable[[str], None]
                 ) -> dict[str, Any]:
    """Request counts and the end-to-end vs direct-ingest throughput on fresh copies of cohort patients."""
    from fhirtwin.engine import Engine
    from fhirtwin.fhir.client import FhirClient
    from fhirtwin.keys import signing_key_for

    def make_client() -> FhirClient:
        return FhirClient(server)

    client = make_client()
    key = signing_key_for(server)
    out: dict[str, Any] = {"hapi_version": versions(client)}
    ids = sorted(r["id"] for r in client.search_all("Patient", {"_elements": "id", "_count": 500}, max_pages=100)
                 if str(r.get("id", "")).startswith(COHORT_PREFIX))
    counted = 10
    need = patients + counted
    log(f"choosing {need} cohort patients with enough data to simulate")
    sources: list[str] = []
    for start in range(0, len(ids), 20):
        chunk = ids[start: start + 20]
        plans = _parallel(lambda c, pid: prepare(c, pid, key) is not None, chunk, concurrency, make_client)
        sources += [pid for pid, ok in zip(chunk, plans, strict=True) if ok]
        if len(sources) >= need:
            break
    sources = sources[:need]
    if len(sources) < need:
        raise SystemExit(f"only {len(sources)} simulable cohort patients on {server}; need {need}")
    log(f"copying {need} patients (fresh ids)")
    records = {r.patient_id: r.resources for r in Engine(client).read_many(sources)}
    copies = _parallel(lambda c, pid: copy_record(c, records[pid]), sources, concurrency, make_client)
    copy_ids = [pid for pid, _ in copies]
    prov_queries: dict[str, list[str]] = {pid: [] for pid in copy_ids}
    try:
        # single-patient runs: request counts (and warm-up of the run path)
        log(f"request counts over {counted} single-patient runs")
        single = [run_patient(client, pid, key) for pid in copy_ids[:counted]]
        out["read_requests_per_patient"] = sum(r["read_requests"] for r in single) / counted
        out["write_requests_per_patient"] = sum(r["write_requests"] for r in single) / counted
        out["single_statuses"] = sorted({r["status"] for r in single})

        # dry run on the throughput copies: the exact bundles the run path will send
        timed = copy_ids[counted:]
        log(f"dry run on {len(timed)} copies")
        writes = _parallel(lambda c, pid: prepare(c, pid, key), timed, concurrency, make_client)
        salt = uuid.uuid4().hex
        direct = [salted(w, salt) for w in writes]
        for pid, w, b in zip(timed, writes, direct, strict=True):
            prov_queries[pid] += [_provenance_query(w.bundle), _provenance_query(b)]

        log(f"end-to-end run on {len(timed)} patients, {concurrency} workers")
        spid = server_pid(server)
        c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
        e2e = _parallel(lambda c, pid: run_patient(c, pid, key), timed, concurrency, make_client)
        e2e_s = time.perf_counter() - t0
        e2e_cpu, e2e_server_cpu = time.process_time() - c0, _delta(cpu_seconds(spid), s0)

        log(f"direct post of the same {len(direct)} bundles (fresh keys), {concurrency} workers")

        def post(c: FhirClient, bundle: dict[str, Any]) -> tuple[float, int]:
            s = time.perf_counter()
            response = c.transaction(bundle)
            return time.perf_counter() - s, sum(1 for e in response["entry"] if e["response"]["status"][:3] == "201")

        c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
        posted = _parallel(post, direct, concurrency, make_client)
        ingest_s = time.perf_counter() - t0
        ingest_cpu, ingest_server_cpu = time.process_time() - c0, _delta(cpu_seconds(spid), s0)
    finally:
        if not keep:
            log("deleting the copies and everything written for them")
            cleanup = [(pid, created, prov_queries[pid]) for pid, created in copies]
            failures = 0
            for pid, created, queries in cleanup:
                try:
                    delete_copy(client, created, pid, queries or _provenances_of(client, pid))
                except Exception:  # noqa: BLE001 - cleanup is best effort; report, never hide the results
                    failures += 1
            out["cleanup_failures"] = failures

    e2e_rate = len(timed) / e2e_s
    ingest_rate = len(direct) / ingest_s
    out.update({
        "throughput_patients": len(timed),
        "concurrency": concurrency,
        "e2e_patients_per_s": e2e_rate,
        "ingest_patients_per_s": ingest_rate,
        "throughput_ratio_vs_hapi_ingest": e2e_rate / ingest_rate,
        "e2e_created": sum(r["created"] for r in e2e),
        "ingest_created": sum(n for _, n in posted),
        "e2e_statuses": sorted({r["status"] for r in e2e}),
        "e2e_stage_ms_mean": {s: 1e3 * sum(r[f"{s}_s"] for r in e2e) / len(e2e) for s in ("read", "simulate", "write")},
        "ingest_transaction_ms_p50": 1e3 * _pct([t for t, _ in posted], 0.5),
        # CPU per patient (ms): fhirtwin's own process, and the server's when it runs on this machine
        "e2e_client_cpu_ms_per_patient": 1e3 * e2e_cpu / len(timed),
        "e2e_server_cpu_ms_per_patient": None if e2e_server_cpu is None else 1e3 * e2e_server_cpu / len(timed),
        "ingest_client_cpu_ms_per_patient": 1e3 * ingest_cpu / len(direct),
        "ingest_server_cpu_ms_per_patient": (None if ingest_server_cpu is None
                                             else 1e3 * ingest_server_cpu / len(direct)),
    })
    # fhirtwin's CPU for a patient end to end against the server's CPU to ingest that patient's results
    out["client_cpu_ms_per_patient"] = out["e2e_client_cpu_ms_per_patient"]
    out["server_ingest_cpu_ms_per_patient"] = out["ingest_server_cpu_ms_per_patient"]
    if out["server_ingest_cpu_ms_per_patient"]:
        out["client_cpu_ratio_vs_server_ingest"] = (out["client_cpu_ms_per_patient"]
                                                    / out["server_ingest_cpu_ms_per_patient"])
    return out


def _wait_quiet(pid: int | None, limit_s: float = 20.0) -> None:
    """Wait until a local server uses < 10 % of a core (its post-write indexing would skew one-core timings)."""
    deadline = time.monotonic() + limit_s
    while pid is not None and time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        used = _delta(cpu_seconds(pid), before)
        if used is None or used < 0.05:
            return


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _provenances_of(client: Any, patient_id: str) -> list[str]:
    """Provenance searches for a copy's results (by their targets)."""
    found = []
    for rtype in ("RiskAssessment",):
        bundle = client.search(rtype, {"subject": f"Patient/{patient_id}", "_elements": "id", "_count": 500})
        found += [f"Provenance?target={rtype}/{e['resource']['id']}" for e in bundle.get("entry", [])]
    return found


# ------------------------------------------------------------------------------------------- ensemble


def bench_ensemble_one_core() -> dict[str, Any]:
    """bench_ensemble.measure pinned to one core (1,000 draws x 10 years x all outcomes)."""
    import bench_ensemble

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        m = bench_ensemble.measure(1000, 40, 30)
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
    return {"ensemble_ms_per_patient": m["fast_ms"], "ensemble_speedup_vs_naive": m["speedup"],
            "ensemble_naive_ms_per_draw": m["reference_ms_per_draw"]}


# ------------------------------------------------------------------------------------------- CDS Hooks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_cds(server: str, calls: int, log: Callable[[str], None]) -> dict[str, Any]:
    """patient-view with complete prefetch through a ``fhirtwin serve`` subprocess."""
    import requests

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fhirtwin", "serve", "--fhir-server", server, "--port", str(port), "--dev-no-auth",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    http = requests.Session()
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                discovery = http.get(f"{url}/cds-services", timeout=2).json()
                break
            except (requests.ConnectionError, requests.Timeout, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("fhirtwin serve did not start") from None
                time.sleep(0.3)
        service = next(s for s in discovery["services"] if s["id"] == CDS_SERVICE)
        ids = [f"{COHORT_PREFIX}{k:04d}" for k in range(11, 21)]
        log(f"building prefetch for {len(ids)} patients against {server}")
        bodies = []
        for pid in ids:
            prefetch = {}
            for name, template in service["prefetch"].items():
                query = template.replace("{{context.patientId}}", pid)
                prefetch[name] = http.get(f"{server}/{query}", headers={"Accept": "application/fhir+json"},
                                          timeout=30).json()
            bodies.append({"hook": "patient-view", "hookInstance": "",
                           "context": {"userId": "Practitioner/bench", "patientId": pid}, "prefetch": prefetch})
        endpoint = f"{url}/cds-services/{CDS_SERVICE}"

        def call(body: dict[str, Any]) -> tuple[float, int]:
            body = {**body, "hookInstance": str(uuid.uuid4())}
            t0 = time.perf_counter()
            r = http.post(endpoint, json=body, timeout=60)
            return 1e3 * (time.perf_counter() - t0), r.status_code

        for body in bodies:  # warm-up: one call per patient
            call(body)
        log(f"timing {calls} patient-view calls")
        results = [call(bodies[i % len(bodies)]) for i in range(calls)]
        times = [t for t, _ in results]
        return {"cds_p50_ms": _pct(times, 0.5), "cds_p95_ms": _pct(times, 0.95), "cds_max_ms": max(times),
                "cds_calls": calls, "cds_non_200": sum(1 for _, s in results if s != 200),
                "peak_rss_mb_service": _peak_rss_mb(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------- report


def _verdict(key: str, value: Any) -> str:
    if key not in BUDGETS or not isinstance(value, (int, float)):
        return ""
    op, limit = BUDGETS[key]
    ok = value <= limit if op == "<=" else value >= limit
    return f"{'met' if ok else 'NOT MET'} ({op} {limit})"


def table(result: dict[str, Any]) -> str:
    """A readable table of the result."""
    lines = []
    for k, v in result.items():
        shown = f"{v:.3g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        lines.append(f"{k:<34} {shown:<40} {_verdict(k, v)}".rstrip())
    return "\n".join(lines)


def append_results(result: dict[str, Any], path: Path) -> None:
    """Append the run to RESULTS.md (date, machine, every value and its budget)."""
    m = result["machine"]
    head = "" if path.exists() else "# Benchmark results\n\nAppended by `fhirtwin bench` (benchmarks/bench.py).\n"
    rows = [f"| {k} | {v:.4g} | {_verdict(k, v)} |" if isinstance(v, float) else f"| {k} | {v} | {_verdict(k, v)} |"
            for k, v in result.items() if not isinstance(v, dict)]
    text = (f"{head}\n## {result['date']} — {m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GB\n\n"
            f"Versions: {json.dumps(result['versions'])}\n\n| metric | value | budget |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fhirtwin bench``; returns 0 when every budget is met, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="fhirtwin bench", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"FHIR R4 base URL (default {DEFAULT_SERVER})")
    parser.add_argument("--patients", type=int, default=40, help="patients in the throughput runs (default 40)")
    parser.add_argument("--concurrency", type=int, default=2, help="workers on both throughput sides (default 2)")
    parser.add_argument("--cds-calls", type=int, default=50)
    parser.add_argument("--population", type=int, default=1000,
                        help="generated patients in the offline population measurement (default 1000; 0 skips it)")
    parser.add_argument("--population-scale", default="",
                        help="two panel sizes for the population memory ratio, e.g. 10000,100000 (default: not "
                             "measured; 100k patients take about an hour on two cores)")
    parser.add_argument("--keep", action="store_true", help="keep the patient copies and their results")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")

    def log(text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "server": server}
    result.update(bench_server(server, args.patients, args.concurrency, args.keep, log))
    result["versions"] = result.pop("hapi_version")
    log("ensemble (one core), after the server has gone quiet")
    _wait_quiet(server_pid(server))
    result.update(bench_ensemble_one_core())
    result.update(bench_cds(server, args.cds_calls, log))
    if args.population:
        import bench_population

        log(f"offline population run of {args.population} generated patients (one worker, then two)")
        result.update(bench_population.measure_offline(args.population, log=log))
    if args.population_scale:
        import bench_population

        sizes = [int(n) for n in args.population_scale.split(",")]
        result.update(bench_population.measure_scale(sizes, log=log))
    result["peak_rss_mb_self"] = _peak_rss_mb_self()
    result["machine"] = machine()
    result["budgets_not_measured"] = [k for k in BUDGETS if not isinstance(result.get(k), (int, float))]
    result["budgets_met"] = all(_verdict(k, result[k]).startswith("met") for k in BUDGETS
                                if k not in result["budgets_not_measured"])
    if not args.no_record:
        append_results(result, HERE / "RESULTS.md")
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(table(result))
    return 0 if result["budgets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
