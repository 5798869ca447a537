"""The ``fhirtwin`` command line: sandbox management and the demo run.

Heavy modules are imported inside the commands so that ``fhirtwin --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _sandbox(args: argparse.Namespace):
    from fhirtwin.sandbox.server import Sandbox

    return Sandbox.from_env(port=args.port, data_dir=args.data_dir)


def cmd_sandbox_start(args: argparse.Namespace) -> int:
    base_url = _sandbox(args).start(timeout=args.timeout)
    print(base_url)
    return 0


def cmd_sandbox_stop(args: argparse.Namespace) -> int:
    stopped = _sandbox(args).stop()
    print("stopped" if stopped else "not running")
    return 0


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    status = _sandbox(args).status()
    if args.json:
        print(json.dumps(status))
    else:
        state = "running" if status["running"] else "not running"
        print(f"{state}  {status['base_url']}  (data: {status['data_dir']})")
    return 0 if status["running"] or args.json else 3


def cmd_sandbox_reset(args: argparse.Namespace) -> int:
    running = _sandbox(args).reset(timeout=args.timeout)
    print("database wiped; " + ("restarted" if running else "not running"))
    return 0


def cmd_sandbox_load(args: argparse.Namespace) -> int:
    from fhirtwin.sandbox.load import load_sandbox

    sandbox = _sandbox(args)
    base_url = args.server or sandbox.start(timeout=args.timeout)
    options = {k: v for k, v in (("n_patients", args.patients), ("seed", args.seed)) if v is not None}
    report = load_sandbox(base_url, workers=args.workers, cohort_dir=sandbox.data_dir / "cohort",
                          force=args.force, **options)
    if report.skipped:
        print(f"{base_url} already holds this cohort ({report.patients} patients, {report.entries} resources); "
              "nothing to do (use --force to upload again)")
        return 0
    print(f"loaded {report.patients} patients ({report.entries} resources in {report.bundles} transactions, "
          f"{report.profiles} conformance and registration resources) into {base_url} in {report.seconds:.1f} s")
    return 0


def cmd_sandbox_smart(args: argparse.Namespace) -> int:
    """Run the SMART simulator (tests and local trials only) in front of the sandbox and print a launch URL."""
    import uvicorn

    from fhirtwin.sandbox.smart_simulator import create_simulator

    upstream = args.server or _sandbox(args).base_url
    public = f"http://127.0.0.1:{args.sim_port}"
    app_url = args.app_url.rstrip("/")
    app = create_simulator(upstream, public, redirect_uris=(f"{app_url}/callback",), default_patient=args.patient)
    print("SMART simulator (TEST ONLY: auto-approves, no login, in memory)")
    print(f"  FHIR base (iss): {public}/fhir   proxies {upstream}")
    print(f"  start the app:   fhirtwin serve --fhir-server {public}/fhir --port {app_url.rsplit(':', 1)[-1]}")
    print(f"  then open:       {app_url}/launch?iss={public}/fhir   (standalone launch, patient {args.patient})")
    uvicorn.run(app, host="127.0.0.1", port=args.sim_port, log_level="warning", access_log=False)
    return 0


def _client(args: argparse.Namespace):
    from fhirtwin.fhir.client import FhirClient

    return FhirClient(args.server, verify=not args.insecure)


def _date(text: str | None):
    from datetime import date

    return date.fromisoformat(text) if text else None


def cmd_state(args: argparse.Namespace) -> int:
    from fhirtwin.pipeline import read_twin, state_summary

    client = _client(args)
    state = read_twin(client, args.patient, _date(args.as_of))
    summary = state_summary(state)
    summary["requests"] = client.request_count
    summary["pages_followed"] = client.pages_followed
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    print(f"patient {state.patient_id}  as of {summary['reference_date']}  "
          f"({client.request_count} request(s), {client.pages_followed} page(s) followed)")
    for scale, variables in summary["scales"].items():
        print(f"  {scale}:")
        if not variables:
            print("    (no evidence)")
        for name, series in variables.items():
            last = series[-1]
            value = f"{last['value']:.4g}" if isinstance(last["value"], float) else str(last["value"])
            unit = f" {last['unit']}" if last.get("unit") not in (None, "1") else ""
            print(f"    {name:<30} {value + unit:<22} {len(series):>3} point(s), latest {str(last['time'])[:10]}")
    kinds: dict[str, int] = {}
    for entry in summary["ledger"]:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    print("  data-quality ledger: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "empty"))
    return 0


def _signing_key(args: argparse.Namespace):
    """The signing key: $FHIRTWIN_SIGNING_KEY / _FILE; a development key only for a loopback server."""
    from urllib.parse import urlsplit

    from fhirtwin.sandbox.server import Sandbox
    from fhirtwin.writeback.jws import load_signing_key

    host = urlsplit(getattr(args, "server", "") or "").hostname or ""
    local = host in ("127.0.0.1", "localhost", "::1")
    return load_signing_key(Sandbox.from_env().data_dir / "keys" if local else None)


def _patient_ids(client, args: argparse.Namespace) -> list[str]:
    if args.patient:
        return list(dict.fromkeys(args.patient))
    ids = [r["id"] for r in client.search_all("Patient", {"_elements": "id", "_count": 500}, max_pages=1000)
           if r.get("resourceType") == "Patient"]
    return sorted(ids)


def _run_one(client, patient_id: str, as_of, existing: dict | None = None):
    """Read and simulate one patient (one request: the record and its stored results); insufficient data is a
    TwinRun with an error. The stored fhirtwin results go to ``existing`` for the writer."""
    from fhirtwin.pipeline import read_twin_and_results, simulate_twin

    state, stored = read_twin_and_results(client, patient_id, as_of)
    if existing is not None:
        existing[patient_id] = stored
    return simulate_twin(state)


def cmd_run(args: argparse.Namespace) -> int:
    """read -> twin -> write for each patient; one transaction per patient (or --group per transaction)."""
    from fhirtwin.pipeline import WriteResult, write_predictions

    client = _client(args)
    key = _signing_key(args)
    ids = _patient_ids(client, args)
    results: list[WriteResult] = []
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115 - closed below
    step = max(1, args.group)
    try:
        for start in range(0, len(ids), step):
            runs, existing = [], {}
            for patient_id in ids[start : start + step]:
                try:
                    runs.append(_run_one(client, patient_id, _date(args.as_of), existing))
                except Exception as exc:  # noqa: BLE001 - one patient's failure never loses the others
                    results.append(WriteResult(patient_id, "failed",
                                               message=f"read/simulate failed: {type(exc).__name__}"))
            batch = write_predictions(client, runs, key, dry_run=args.dry_run or out is not None, group=step,
                                      existing=existing)
            for result in batch:
                if out is not None and result.bundle is not None:
                    out.write(json.dumps(result.bundle, separators=(",", ":")) + "\n")
                    result.status = "exported"
            results.extend(batch)
            counts = _counts(results)
            print(f"\r[{len(results)}/{len(ids)}] " + ", ".join(f"{k} {v}" for k, v in counts.items()), end="",
                  file=sys.stderr, flush=True)
    finally:
        if out is not None:
            out.close()
    print(file=sys.stderr)
    counts = _counts(results)
    failed = counts.get("failed", 0)
    if args.json:
        print(json.dumps({"summary": counts, "requests": client.request_count,
                          "patients": [r.to_json() for r in results]}, indent=1, default=str))
    else:
        for r in results:
            if r.status in ("failed", "skipped") or args.dry_run:
                print(f"  {r.patient_id}: {r.status} {r.message}")
        print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"; {sum(r.created for r in results)} resources created, {client.request_count} requests")
    if failed == 0:
        return 0
    return 2 if failed == len(results) else 1


def _counts(results) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a Provenance's JWS against its targets as they now stand on the server."""
    from fhirtwin.pipeline import verify_provenance
    from fhirtwin.writeback.jws import load_public_key

    client = _client(args)
    if args.key:
        with open(args.key, "rb") as handle:
            public_key = load_public_key(handle.read())
    else:
        public_key = _signing_key(args).private_key.public_key()
    try:
        report = verify_provenance(client, args.provenance, public_key)
    except Exception as exc:  # noqa: BLE001 - report, do not trace back
        print(f"fhirtwin verify: cannot check {args.provenance}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    stream = sys.stdout if report.valid else sys.stderr
    print(f"{args.provenance}: {report.message}", file=stream)
    for change in report.changed_versions:
        print(f"  newer version: {change}", file=stream)
    return 0 if report.valid else 1


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Create fhirtwin's rest-hook Subscriptions (idempotent), print their ids, wait until they are active."""
    from fhirtwin.service.webhook import disable_subscriptions, ensure_subscriptions, wait_active

    client = _client(args)
    if args.off:
        ids = disable_subscriptions(client, args.endpoint)
        for sid in ids:
            print(f"Subscription/{sid} off")
        print(f"{len(ids)} subscription(s) turned off", file=sys.stderr)
        return 0
    report = ensure_subscriptions(client, args.endpoint, payload=args.payload, twin_codes_only=args.twin_codes,
                                  headers=args.header or [], filters=args.filter or [])
    actions = {**{i: "created" for i in report.created}, **{i: "updated" for i in report.updated},
               **{i: "unchanged" for i in report.unchanged}}
    for sid in report.turned_off:
        print(f"Subscription/{sid} off (superseded)", file=sys.stderr)
    status = wait_active(client, report.ids, timeout=args.timeout)
    for sid in report.ids:
        print(f"Subscription/{sid} {actions[sid]} {status.get(sid)}")
    inactive = [sid for sid in report.ids if status.get(sid) != "active"]
    if inactive:
        print(f"fhirtwin subscribe: {len(inactive)} subscription(s) not active after {args.timeout:g} s",
              file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fhirtwin.service.app import ServiceSettings, create_app

    public_url = args.public_url or f"http://{args.host}:{args.port}"
    settings = ServiceSettings(fhir_server=args.fhir_server.rstrip("/"), public_url=public_url.rstrip("/"),
                               verify_tls=not args.insecure, signing_key_file=args.signing_key)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Load ``benchmarks/bench.py`` from the source checkout (it is not installed) and run it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not path.is_file():
        print(f"fhirtwin bench needs a source checkout: {path.name} not found next to the package", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("fhirtwin_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--server", args.server, "--patients", str(args.patients), "--concurrency", str(args.concurrency),
            "--cds-calls", str(args.cds_calls), *(["--json"] if args.json else []), *(["--keep"] if args.keep else [])]
    return module.main(argv)


def cmd_register(args: argparse.Namespace) -> int:
    """Upload fhirtwin's profiles, CodeSystem, ValueSets and OperationDefinition, its Organization and
    Devices to a FHIR server, once, with an administrator's (system) credentials. Every entry is a PUT
    to a stable id, so registering twice changes nothing."""
    from fhirtwin.pipeline import fhirtwin_registration
    from fhirtwin.sandbox.load import conformance_resources, put_entries

    resources = conformance_resources() + fhirtwin_registration()
    response = _client(args).transaction(put_entries(resources))
    statuses: dict[str, int] = {}
    for entry in response.get("entry", []):
        code = str(entry.get("response", {}).get("status", "")).split(" ")[0]
        statuses[code] = statuses.get(code, 0) + 1
    print(f"registered {len(resources)} resources on {args.server}: "
          + ", ".join(f"{n} x HTTP {code}" for code, n in sorted(statuses.items())))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fhirtwin.demo import run_demo

    return run_demo(port=args.port, data_dir=args.data_dir, patients=args.patients, show=args.show)


def build_parser() -> argparse.ArgumentParser:
    from fhirtwin import __version__

    parser = argparse.ArgumentParser(prog="fhirtwin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fhirtwin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", required=True, help="FHIR R4 base URL")
        p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")

    def sandbox_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=None, help="default 8080 or $FHIRTWIN_SANDBOX_PORT")
        p.add_argument("--data-dir", default=None, help="database and log folder (default sandbox/data)")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /metadata")

    sandbox = commands.add_parser("sandbox", help="the local HAPI FHIR R4 sandbox")
    actions = sandbox.add_subparsers(dest="action", required=True)
    for name, func, text in [
        ("start", cmd_sandbox_start, "build on first use, start in the background, print the base URL"),
        ("stop", cmd_sandbox_stop, "stop the sandbox process started from this data folder"),
        ("reset", cmd_sandbox_reset, "wipe the database (restarts the server if it was running)"),
    ]:
        p = actions.add_parser(name, help=text)
        sandbox_options(p)
        p.set_defaults(func=func)
    p = actions.add_parser("status", help="is it running, and where")
    sandbox_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_sandbox_status)
    p = actions.add_parser("load", help="upload profiles and the synthetic cohort (idempotent)")
    sandbox_options(p)
    p.add_argument("--server", default=None, help="load into this FHIR base URL instead of the sandbox")
    p.add_argument("--patients", type=int, default=None, help="cohort size (default 240)")
    p.add_argument("--seed", type=int, default=None, help="cohort seed (default fixed)")
    p.add_argument("--workers", type=int, default=4, help="parallel transactions")
    p.add_argument("--force", action="store_true", help="upload even if the server already holds this cohort")
    p.set_defaults(func=cmd_sandbox_load)

    state = commands.add_parser("state", help="read one patient and print the multi-scale TwinState")
    server_options(state)
    state.add_argument("--patient", required=True, help="Patient id")
    state.add_argument("--as-of", default=None, help="reference date (YYYY-MM-DD, default today)")
    state.add_argument("--json", action="store_true", help="print JSON (scales, ledger, requests, pages_followed)")
    state.set_defaults(func=cmd_state)

    run = commands.add_parser("run", help="read -> twin -> write RiskAssessment, CarePlan, signed Provenance")
    server_options(run)
    who = run.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", action="append", help="Patient id (repeat for several)")
    who.add_argument("--all", action="store_true", help="every Patient on the server")
    run.add_argument("--dry-run", action="store_true", help="write nothing; show what would be written")
    run.add_argument("--out", default=None, help="write transaction bundles as NDJSON to FILE instead of the server")
    run.add_argument("--group", type=int, default=1, help="patients per transaction (default 1)")
    run.add_argument("--as-of", default=None, help="reference date (YYYY-MM-DD, default today)")
    run.add_argument("--json", action="store_true", help="print per-patient results as JSON")
    run.set_defaults(func=cmd_run)

    verify = commands.add_parser("verify", help="check a Provenance signature against its targets on the server")
    server_options(verify)
    verify.add_argument("provenance", help="Provenance/ID")
    verify.add_argument("--key", default=None, help="public (or private) key PEM; default the signing key")
    verify.set_defaults(func=cmd_verify)

    serve = commands.add_parser("serve", help="the web service: $simulate, Subscription webhook, CDS Hooks, SMART")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--fhir-server", required=True, help="FHIR R4 base URL the service reads and writes")
    serve.add_argument("--public-url", default=None, help="URL clients use to reach this service")
    serve.add_argument("--signing-key", default=None, help="PEM private key for Provenance signatures")
    serve.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    subscribe = commands.add_parser("subscribe", help="create the rest-hook Subscriptions that feed the webhook")
    server_options(subscribe)
    subscribe.add_argument("--endpoint", required=True, help="webhook base URL, e.g. http://host:8765/hooks/fhir")
    subscribe.add_argument("--payload", action=argparse.BooleanOptionalAction, default=True,
                           help="deliver the resource (PUT endpoint/Type/id) or an empty ping (default payload)")
    subscribe.add_argument("--twin-codes", action="store_true", help="only Observations with codes the twin reads")
    subscribe.add_argument("--header", action="append", help="channel header, e.g. 'Authorization: Bearer …'")
    subscribe.add_argument("--filter", action="append", help="extra criteria parameter for every Subscription, "
                           "e.g. _tag=SYSTEM|CODE (repeat for several)")
    subscribe.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for status active")
    subscribe.add_argument("--off", action="store_true", help="turn off fhirtwin's Subscriptions to this endpoint")
    subscribe.set_defaults(func=cmd_subscribe)

    smart = actions.add_parser("smart", help="run the SMART launch simulator (tests and local trials only)")
    sandbox_options(smart)
    smart.add_argument("--server", default=None, help="FHIR base to proxy (default: the sandbox)")
    smart.add_argument("--sim-port", type=int, default=9090)
    smart.add_argument("--app-url", default="http://127.0.0.1:8765", help="where `fhirtwin serve` runs")
    smart.add_argument("--patient", default="ftp-0003", help="patient of a standalone launch")
    smart.set_defaults(func=cmd_sandbox_smart)

    bench = commands.add_parser("bench", help="measure the performance budgets against a live server")
    bench.add_argument("--server", default="http://127.0.0.1:8080/fhir", help="FHIR R4 base URL")
    bench.add_argument("--patients", type=int, default=40, help="patients in the throughput runs")
    bench.add_argument("--concurrency", type=int, default=2, help="workers on both throughput sides")
    bench.add_argument("--cds-calls", type=int, default=50, help="timed CDS Hooks calls")
    bench.add_argument("--keep", action="store_true", help="keep the patient copies the benchmark makes")
    bench.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    bench.set_defaults(func=cmd_bench)

    register = commands.add_parser("register", help="upload fhirtwin's profiles and Device to a FHIR server (once)")
    server_options(register)
    register.set_defaults(func=cmd_register)

    demo = commands.add_parser("demo", help="start the sandbox, load the cohort, run the twin, summarise")
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--data-dir", default=None)
    demo.add_argument("--patients", type=int, default=None, help="cohort size (default 240)")
    demo.add_argument("--show", type=int, default=10, help="patients to print in the summary")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fhirtwin.fhir.errors import FhirError
    from fhirtwin.sandbox.server import SandboxError
    from fhirtwin.writeback.jws import JwsError

    try:
        return int(args.func(args) or 0)
    except (SandboxError, FhirError, JwsError) as exc:
        print(f"fhirtwin: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
