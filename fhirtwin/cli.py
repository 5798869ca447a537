"""The ``fhirtwin`` command line: the sandbox, the twin of one patient or many, the web service.

Every command that reads, simulates or writes goes through :class:`fhirtwin.engine.Engine`. Errors are one
line on stderr, never a traceback. Exit codes: 0 success; 1 some patients failed or a signature is invalid;
2 bad usage, bad input or nothing could be done (server down, unknown patient, no signing key); 3 the
sandbox is not running (``sandbox status``). Heavy modules are imported inside the commands so that
``fhirtwin --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any, NoReturn
from urllib.parse import urlsplit

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_NOT_RUNNING = 0, 1, 2, 3
DEFAULT_SANDBOX_PORT = 8080
#: The purposes ``run --purpose-of-use`` accepts: fhirtwin.consent.PURPOSES (not imported: --help stays fast).
PURPOSES_OF_USE = ("BTG", "ETREAT", "HOPERAT", "HPAYMT", "HRESCH", "PUBHLTH", "TREAT")


class CliError(Exception):
    """A failure the user can fix; printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------- argument types


def fhir_base(text: str) -> str:
    """A FHIR base URL: http(s), a host, and a path (``…/fhir``); trailing slash dropped."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/fhir)")
    if "@" in parts.netloc or "\\" in parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r}: a FHIR base URL carries no user information (credentials go "
                                         "in the authorization, never in the URL)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535 or not a number
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port") from None
    if not parts.path.strip("/"):
        raise argparse.ArgumentTypeError(f"{text!r} has no path: a FHIR base URL ends with its base path, "
                                         "e.g. http://127.0.0.1:8080/fhir")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: a FHIR base URL has no query or fragment")
    return text.strip().rstrip("/")


def iso_date(text: str) -> date:
    """A calendar date ``YYYY-MM-DD``."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def counterfactual_action(kind: str) -> Callable[[str], Any]:
    """The argparse type of ``--set`` / ``--shift``: ``VAR=VALUE[@START:END]``, a window in years relative to the
    reference date (negative = past; START empty = now, END empty = open); VAR is a settable path of
    :mod:`fhirtwin.causal.counterfactual` (imported only when the option is used: ``--help`` stays fast)."""

    def parse(text: str) -> Any:
        from fhirtwin.causal.counterfactual import SETTABLE, SetValue, Shift, UnsupportedIntervention

        variable, equals, rest = text.partition("=")
        variable = variable.strip()
        if not equals or not variable:
            raise argparse.ArgumentTypeError(f"{text!r} is not VAR=VALUE[@START:END]")
        if variable not in SETTABLE:
            raise argparse.ArgumentTypeError(f"{variable!r} cannot be set; settable: {', '.join(SETTABLE)}")
        value_text, at, window = rest.partition("@")
        start_text, colon, end_text = window.partition(":")
        if at and not colon:
            raise argparse.ArgumentTypeError(f"{text!r}: the window is @START:END in years (END empty = open)")
        try:
            value = float(value_text)
            start = float(start_text) if start_text.strip() else 0.0
            end = float(end_text) if end_text.strip() else float("inf")
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: VALUE, START and END are numbers") from None
        try:
            return (Shift if kind == "shift" else SetValue)(variable, value, start, end)
        except UnsupportedIntervention as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return value


def default_sandbox_port() -> int:
    """The sandbox port: ``$FHIRTWIN_SANDBOX_PORT``, else 8080."""
    try:
        return int(os.environ.get("FHIRTWIN_SANDBOX_PORT", DEFAULT_SANDBOX_PORT))
    except ValueError:
        return DEFAULT_SANDBOX_PORT


def _sandbox_url() -> str:
    return f"http://127.0.0.1:{default_sandbox_port()}/fhir"


# ------------------------------------------------------------------------------------------- helpers


def _sandbox(args: argparse.Namespace) -> Any:
    from fhirtwin.sandbox.server import Sandbox

    return Sandbox.from_env(port=args.port, data_dir=args.data_dir)


#: Environment variables of the client credentials (a deployment sets them once instead of per command).
ENV_CLIENT_ID, ENV_CLIENT_KEY = "FHIRTWIN_CLIENT_ID", "FHIRTWIN_CLIENT_KEY_FILE"


def needed_scopes(*, writes: bool) -> str:
    """The SMART v2 system scopes a command needs, and no more: search-and-read of what the twin reads, the
    Consents, fhirtwin's results and Provenances (and the Groups an export names); with ``writes``, create and
    update of what a write sends."""
    from fhirtwin.adapters.reads import READ_TYPES
    from fhirtwin.writeback.transaction import RESULT_TYPES

    reads = sorted({*READ_TYPES, *RESULT_TYPES, "Consent", "Provenance", "Group"})
    scopes = [f"system/{t}.rs" for t in reads]
    if writes:
        scopes += [f"system/{t}.cu" for t in sorted({*RESULT_TYPES, "Provenance", "Device", "Organization"})]
    return " ".join(scopes)


def _client(args: argparse.Namespace, *, writes: bool = False) -> Any:
    """The FHIR client of a command; with client credentials (``--client-id`` or ``$FHIRTWIN_CLIENT_ID``) it
    authorizes by SMART Backend Services, asking only for :func:`needed_scopes` unless ``--scope`` says."""
    from fhirtwin.fhir.client import FhirClient

    verify = not getattr(args, "insecure", False)
    client_id = getattr(args, "client_id", None) or os.environ.get(ENV_CLIENT_ID)
    if not client_id:
        return FhirClient(args.server, verify=verify)
    from fhirtwin.fhir.auth import SmartBackendServices, load_private_key
    from fhirtwin.fhir.errors import FhirError
    from fhirtwin.writeback.jws import thumbprint

    key_file = getattr(args, "client_key", None) or os.environ.get(ENV_CLIENT_KEY)
    if not key_file:
        raise CliError(f"--client-id needs the client's private key: --client-key PEM (or ${ENV_CLIENT_KEY})")
    try:
        with open(key_file, "rb") as handle:
            key = load_private_key(handle.read())
    except OSError as exc:
        raise CliError(f"cannot read the client key ({type(exc).__name__})") from None
    except (ValueError, TypeError):
        raise CliError("the client key is not a PEM RSA or EC private key") from None
    from cryptography.hazmat.primitives.asymmetric import ec

    alg = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
    kid = getattr(args, "client_kid", None) or thumbprint(key.public_key())
    scope = getattr(args, "scope", None) or needed_scopes(writes=writes)
    token_url = getattr(args, "token_url", None)
    try:
        auth = (SmartBackendServices(token_url, client_id, key, kid, scope, alg=alg, verify=verify) if token_url
                else SmartBackendServices.from_discovery(args.server, client_id, key, kid, scope, alg=alg,
                                                         verify=verify))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except FhirError as exc:
        raise CliError(f"the server's SMART configuration could not be read ({exc}); give --token-url") from None
    return FhirClient(args.server, verify=verify, auth=auth)


def _engine(args: argparse.Namespace, *, signed: bool = False, draws: int | None = None) -> Any:
    from fhirtwin.engine import Engine
    from fhirtwin.keys import signing_key_for

    key = signing_key_for(args.server) if signed else None
    return Engine(_client(args, writes=signed), signing_key=key, draws=draws or 1000)  # a signing engine writes


def _counts_text(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing"


# ------------------------------------------------------------------------------------------- sandbox


def cmd_sandbox_start(args: argparse.Namespace) -> int:
    print(_sandbox(args).start(timeout=args.timeout))
    return EXIT_OK


def cmd_sandbox_stop(args: argparse.Namespace) -> int:
    print("stopped" if _sandbox(args).stop(timeout=args.timeout) else "not running")
    return EXIT_OK


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    status = _sandbox(args).status()
    if args.json:
        print(json.dumps(status))
        return EXIT_OK
    state = "running" if status["running"] else "not running"
    print(f"{state}  {status['base_url']}  (data: {status['data_dir']})")
    return EXIT_OK if status["running"] else EXIT_NOT_RUNNING


def cmd_sandbox_reset(args: argparse.Namespace) -> int:
    running = _sandbox(args).reset(timeout=args.timeout)
    print("database wiped; " + ("restarted" if running else "not running"))
    return EXIT_OK


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
        return EXIT_OK
    print(f"loaded {report.patients} patients ({report.entries} resources in {report.bundles} transactions, "
          f"{report.profiles} conformance and registration resources) into {base_url} in {report.seconds:.1f} s")
    return EXIT_OK


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
    port = app_url.rsplit(":", 1)[-1]
    print(f"  start the app:   fhirtwin serve --dev-no-auth --fhir-server {public}/fhir --port {port}")
    print(f"  then open:       {app_url}/launch?iss={public}/fhir   (standalone launch, patient {args.patient})")
    uvicorn.run(app, host="127.0.0.1", port=args.sim_port, log_level="warning", access_log=False)
    return EXIT_OK


# ------------------------------------------------------------------------------------------- twin


def cmd_state(args: argparse.Namespace) -> int:
    from fhirtwin.engine import state_summary

    engine = _engine(args)
    state = engine.twin(engine.read(args.patient, with_stored=False), args.as_of)
    client = engine.source
    summary = state_summary(state)
    summary["requests"] = client.request_count
    summary["pages_followed"] = client.pages_followed
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return EXIT_OK
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
    kinds = Counter(entry["kind"] for entry in summary["ledger"])
    print("  data-quality ledger: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "empty"))
    return EXIT_OK


def cmd_sequence(args: argparse.Namespace) -> int:
    """The optimal yearly treatment sequence of one patient; prints it, ``--out`` writes the timed CarePlan."""
    from fhirtwin.engine import EngineError

    engine = _engine(args)
    try:
        run = engine.run(args.patient, as_of=args.as_of)
        plan, care_plan = engine.sequence(run, draws=args.draws)
    except EngineError as exc:
        raise CliError(f"fhirtwin sequence: {exc.message}") from None
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(care_plan, handle, indent=1)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return EXIT_OK

    def per_1000(v: dict[str, float]) -> str:
        return f"{1000 * v['expected']:.1f} (90 % {1000 * v['p05']:.1f} to {1000 * v['p95']:.1f})"

    print(f"patient {plan.patient_id}: optimal {plan.horizon_years}-year sequence ({plan.draws} draws)")
    for step in plan.steps or ():
        print(f"  year {step.year}: {step.label}" + (f" ({step.condition})" if step.condition else ""))
    if not plan.steps:
        print("  no change from current care is expected to help more than it costs")
    print(f"  net benefit per 1,000 vs current care: {per_1000(plan.net_benefit)}")
    for name, value in plan.comparators.items():
        print(f"    {name}: {per_1000(value)}")
    for note in plan.notes:
        print(f"  note: {note}")
    if args.out:
        print(f"written: {args.out} (draft CarePlan, intent proposal, one activity per timed step)")
    return EXIT_OK


def counterfactual_summary(run: Any, answer: Any, *, scenario: str | None, draws: int, seed: int) -> dict[str, Any]:
    """The plain dict of a counterfactual: per outcome the factual and counterfactual medians at the horizon and
    the paired difference with its 90 % interval, the actions and the notes."""
    import math

    import numpy as np

    from fhirtwin.causal.counterfactual import Shift

    outcomes = {}
    for name, factual in answer.factual.items():
        if ":" in name:  # hazard:<outcome> and path:<variable> are per-month detail, not outcomes
            continue
        outcomes[name] = {"factual_median": float(np.median(factual[:, -1])),
                          "counterfactual_median": float(np.median(answer.counterfactual[name][:, -1])),
                          "difference": answer.difference(name)}
    reference = run.state.reference_date
    return {
        "patient": run.patient_id,
        "reference_date": None if reference is None else str(reference)[:10],
        "horizon_years": run.require_plan().horizon_years,
        "draws": draws, "seed": seed, "scenario": scenario or "baseline",
        "actions": [{"kind": "shift" if isinstance(a, Shift) else "set", "variable": a.variable, "value": a.value,
                     "start_years": a.start_years, "end_years": a.end_years if math.isfinite(a.end_years) else None}
                    for a in answer.actions],
        "outcomes": outcomes,
        "notes": list(answer.notes),
    }


def cmd_counterfactual(args: argparse.Namespace) -> int:
    """One patient's forecast with and without do() actions on biomarker paths, paired draw by draw."""
    from fhirtwin.engine import EngineError

    if not args.actions:
        raise CliError("fhirtwin counterfactual: give at least one --set or --shift")
    engine = _engine(args, draws=args.draws)
    try:  # the counterfactual needs the fitted twin, not the ranking of every intervention: plan the baseline only
        run = engine.run(args.patient, as_of=args.as_of, scenario="baseline", draws=args.draws)
        answer = engine.counterfactual(run, args.actions, scenario=args.scenario, draws=args.draws)
    except EngineError as exc:
        raise CliError(f"fhirtwin counterfactual: {exc.message}") from None
    summary = counterfactual_summary(run, answer, scenario=args.scenario, draws=args.draws, seed=engine.seed)
    if args.json:
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    horizon = f"{summary['horizon_years']:g}"
    print(f"patient {summary['patient']}: counterfactual vs factual, {horizon}-year risk "
          f"({summary['draws']} paired draws, scenario {summary['scenario']})")
    for a in summary["actions"]:
        end = "open" if a["end_years"] is None else f"{a['end_years']:g}"
        verb = "shift by" if a["kind"] == "shift" else "set to"
        print(f"  do: {a['variable']} {verb} {a['value']:g} in years [{a['start_years']:g}, {end})")
    print(f"  {'outcome':<16} {'factual':>8} {'counterfactual':>15}  difference (90 % interval)")
    for name, o in summary["outcomes"].items():
        d = o["difference"]
        print(f"  {name:<16} {o['factual_median']:>8.4f} {o['counterfactual_median']:>15.4f}  "
              f"{d['median']:+.4f} ({d['p05']:+.4f} to {d['p95']:+.4f})")
    for note in summary["notes"]:
        print(f"  note: {note}")
    return EXIT_OK


def _patient_ids(engine: Any, args: argparse.Namespace) -> list[str]:
    if args.patient:
        return list(dict.fromkeys(args.patient))
    client = engine.source
    return sorted(r["id"] for r in client.search_all("Patient", {"_elements": "id", "_count": 500}, max_pages=1000)
                  if r.get("resourceType") == "Patient")


def _checkpoint(args: argparse.Namespace) -> Any:
    """The run checkpoint, or None: used for --all and several patients, never for --dry-run or --out."""
    from pathlib import Path

    from fhirtwin.writeback.checkpoint import Checkpoint, CheckpointError

    many = args.all or len(set(args.patient or ())) > 1
    if args.no_checkpoint or args.dry_run or args.out is not None or not many:
        return None
    try:
        return Checkpoint.for_server(args.server, Path(args.state_dir) if args.state_dir else None)
    except CheckpointError as exc:
        raise CliError(f"fhirtwin run: {exc}") from exc


def _run_settings(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What fixes a patient's results besides the record (part of the checkpoint's input digest)."""
    from fhirtwin import __version__
    from fhirtwin.sim.model import registered_models

    return {"fhirtwin": __version__, "models": sorted(f"{m.name} {m.version}" for m in registered_models()),
            "draws": engine.draws, "horizon": engine.horizon_years, "seed": engine.seed, "outcome": engine.outcome,
            "as_of": args.as_of, "components": sorted(engine.components),
            "learned_residual": engine.learned_residual.version if engine.learned_residual is not None else None}


def cmd_run(args: argparse.Namespace) -> int:
    """read -> twin -> write for each patient; one transaction per patient (or --group per transaction).

    With a checkpoint (``--all`` or several patients), a patient whose inputs are unchanged and whose
    recorded results are still current is ``checkpointed``: read, not simulated, not written.

    Each patient's active Consents are honoured for ``--purpose-of-use`` before the record is read; a denied
    patient is counted as ``consent-denied``, neither read nor written. ``--audit-log`` appends one BALP
    AuditEvent per record read and per write to a JSON-lines file.
    """
    from fhirtwin.audit import AuditTrail, Caller, JsonLinesSink
    from fhirtwin.consent import ConsentDenied, ConsentPolicy
    from fhirtwin.engine import EngineError, WriteResult
    from fhirtwin.progress import progress
    from fhirtwin.writeback.checkpoint import input_digest

    exporting = args.out is not None
    engine = _engine(args, signed=True)
    checkpoint = _checkpoint(args)
    settings = _run_settings(engine, args)
    digests: dict[str, str] = {}
    simulated = 0
    if not args.ignore_consent:
        engine.consent = ConsentPolicy(args.purpose_of_use)
    if args.audit_log:
        engine.audit = AuditTrail(JsonLinesSink(args.audit_log), caller=Caller("fhirtwin-cli"),
                                  purpose=args.purpose_of_use)
    ids = _patient_ids(engine, args)
    results: list[WriteResult] = []
    ledger: Counter[str] = Counter()
    out = open(args.out, "w", encoding="utf-8") if exporting else None  # noqa: SIM115 - closed below
    step = max(1, args.group)
    try:
        for start in progress(range(0, len(ids), step), total=-(-len(ids) // step), unit="group", desc="run"):
            runs = []
            for patient_id in ids[start:start + step]:
                try:
                    record = engine.read(patient_id)
                    if checkpoint is not None:
                        digests[patient_id] = input_digest(record.resources, settings)
                        done = checkpoint.skip(patient_id, digests[patient_id], record.stored)
                        if done is not None:
                            results.append(WriteResult(patient_id, "checkpointed", provenance=done.provenance,
                                                       outputs=done.outputs))
                            continue
                    runs.append(engine.run(patient_id, record=record, as_of=args.as_of))
                    simulated += 1
                    ledger.update(f"{e.kind.value} {e.source.split('/')[0]}" for e in runs[-1].state.ledger
                                  if e.kind.value in ("malformed", "unsupported", "unmapped"))
                except ConsentDenied:
                    results.append(WriteResult(patient_id, "consent-denied", message="denied by the patient's "
                                               f"privacy consent for {args.purpose_of_use}"))
                except EngineError as exc:  # this patient failed (unknown, unreadable): the others go on
                    message = f"Patient {patient_id} not found" if getattr(exc, "patient_id", None) else exc.message
                    results.append(WriteResult(patient_id, "failed", message=message))
            for result in engine.write(runs, dry_run=args.dry_run or exporting, group=step):
                if out is not None and result.bundle is not None:
                    out.write(json.dumps(result.bundle, separators=(",", ":")) + "\n")
                    result.status = "exported"
                if checkpoint is not None and result.patient_id in digests:
                    if result.status in ("written", "unchanged", "skipped"):
                        checkpoint.record(result.patient_id, digests[result.patient_id], result.outputs,
                                          result.provenance)
                    else:
                        checkpoint.forget(result.patient_id)
                results.append(result)
    finally:
        if out is not None:
            out.close()
        if checkpoint is not None:
            checkpoint.close()
    counts = Counter(r.status for r in results)
    if args.json:
        print(json.dumps({"summary": dict(counts), "simulated": simulated, "requests": engine.source.request_count,
                          "checkpoint": str(checkpoint.path) if checkpoint is not None else None,
                          "patients": [r.to_json() for r in results]}, indent=1, default=str))
    else:
        for r in results:
            if r.status in ("failed", "skipped", "consent-denied") or args.dry_run:
                print(f"  {r.patient_id}: {r.status} {r.message}")
        print(f"summary: {_counts_text(counts)}; {simulated} simulated, {sum(r.created for r in results)} "
              f"resources created, {engine.source.request_count} requests")
        if counts.get("checkpointed"):
            print(f"checkpoint: {counts['checkpointed']} patient(s) unchanged since they were last written, not "
                  "simulated (--no-checkpoint runs them all)")
        if ledger:
            print("data-quality ledger (resources not used, by kind and type): "
                  + ", ".join(f"{n} {what}" for what, n in ledger.most_common()))
    failed = counts.get("failed", 0)
    if failed == 0:
        return EXIT_OK
    return EXIT_ERROR if failed == len(results) else EXIT_PARTIAL


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a Provenance's JWS against its targets, or (--patient) which of a patient's results are current."""
    from fhirtwin.keys import load_public_key

    public_key = None
    if args.key:
        try:
            with open(args.key, "rb") as handle:
                public_key = load_public_key(handle.read())
        except OSError as exc:
            raise CliError(f"cannot read --key {args.key}: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:
            raise CliError(f"--key {args.key} is not a PEM public or private key") from exc
    if (args.provenance is None) == (args.patient is None):
        raise CliError("verify needs Provenance/ID or --patient ID (one of them)")
    if args.patient is not None:
        patient = _engine(args).verify_patient(args.patient, public_key, anchor=_anchor(args))
        stream = sys.stdout if patient.valid else sys.stderr
        print(f"Patient {args.patient}: {patient.message}", file=stream)
        for problem in patient.problems:
            print(f"  {problem}", file=stream)
        if public_key is None:  # the keys came from Devices on the same server: a writer there could add one
            print("  note: signing keys were taken from the server's own Devices; pin the deployment's key with "
                  "--key to detect a writer who can also publish keys", file=sys.stderr)
        return EXIT_OK if patient.valid else EXIT_PARTIAL
    report = _engine(args).verify(args.provenance, public_key)
    stream = sys.stdout if report.valid else sys.stderr
    print(f"{args.provenance}: {report.message}", file=stream)
    for change in report.changed_versions:
        print(f"  newer version: {change}", file=stream)
    return EXIT_OK if report.valid else EXIT_PARTIAL


def _anchor(args: argparse.Namespace) -> str | None:
    """The last Provenance this machine wrote for ``args.patient`` (from the run checkpoint), if it has one."""
    from pathlib import Path

    from fhirtwin.writeback.checkpoint import Checkpoint, CheckpointError, checkpoint_path

    path = checkpoint_path(args.server, Path(args.state_dir) if args.state_dir else None)
    if not path.is_file():
        return None
    try:
        with Checkpoint(path) as checkpoint:
            done = checkpoint.get(args.patient)
    except CheckpointError as exc:
        raise CliError(f"fhirtwin verify: {exc}") from exc
    return done.provenance if done is not None else None


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Create fhirtwin's rest-hook Subscriptions (idempotent), print their ids, wait until they are active."""
    from fhirtwin.engine import subscription_criteria
    from fhirtwin.fhir.subscriptions import disable_subscriptions, ensure_subscriptions, wait_active

    client = _client(args)
    if args.off:
        ids = disable_subscriptions(client, args.endpoint)
        for sid in ids:
            print(f"Subscription/{sid} off")
        print(f"{len(ids)} subscription(s) turned off", file=sys.stderr)
        return EXIT_OK
    criteria = subscription_criteria(twin_codes_only=args.twin_codes, filters=args.filter or [])
    headers = list(args.header or [])
    if args.secret_file:
        from fhirtwin.service.security import ConfigError, read_secret

        try:
            headers.append(f"Authorization: Bearer {read_secret(args.secret_file, '--secret-file')}")
        except ConfigError as exc:
            raise CliError(f"fhirtwin subscribe: {exc}") from exc
    report = ensure_subscriptions(client, args.endpoint, criteria, payload=args.payload, headers=headers)
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
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from fhirtwin.service.app import create_app
    from fhirtwin.service.runtime import ServiceSettings, WebhookOptions, signing_key
    from fhirtwin.service.security import AuthSettings, ConfigError, check_dev_mode, load_config, read_secret

    try:
        auth = load_config(args.config) if args.config else AuthSettings()
        if args.webhook_secret_file:
            auth = dataclasses.replace(auth, webhook_secret=read_secret(args.webhook_secret_file,
                                                                           "--webhook-secret-file"))
        if args.dev_no_auth:
            check_dev_mode(args.host)
            if args.public_url:  # behind a proxy, a loopback listener still serves the world
                check_dev_mode(urlsplit(args.public_url).hostname or "")
        elif not (auth.issuer or auth.cds_clients or auth.webhook_secret):
            raise ConfigError("no credentials are configured: give --config (token issuer, CDS clients) or "
                              "--webhook-secret-file; --dev-no-auth opens every door on a loopback host")
    except ConfigError as exc:
        raise CliError(f"fhirtwin serve: {exc}") from exc
    if args.dev_no_auth:
        print("fhirtwin serve: WARNING --dev-no-auth: every door answers without credentials (development only)",
              file=sys.stderr)
    public_url = args.public_url or f"http://{args.host}:{args.port}"
    settings = ServiceSettings(fhir_server=args.fhir_server, public_url=public_url.rstrip("/"),
                               verify_tls=not args.insecure, signing_key_file=args.signing_key, auth=auth,
                               dev_no_auth=args.dev_no_auth, store_path=args.store)
    if args.webhook_window:
        window = float(args.webhook_window)
        settings = dataclasses.replace(settings, webhook=WebhookOptions(
            window=window, max_wait=max(window, WebhookOptions.max_wait)))
    signing_key(settings)  # fail now, in one line, rather than at the first write
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Load ``benchmarks/bench.py`` from the source checkout (it is not installed) and run it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not path.is_file():
        raise CliError("fhirtwin bench needs a source checkout: benchmarks/bench.py not found next to the package")
    spec = importlib.util.spec_from_file_location("fhirtwin_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--server", args.server, "--patients", str(args.patients), "--concurrency", str(args.concurrency),
            "--cds-calls", str(args.cds_calls), "--population", str(args.population),
            *(["--population-scale", args.population_scale] if args.population_scale else []),
            *(["--json"] if args.json else []), *(["--keep"] if args.keep else [])]
    return int(module.main(argv))


def cmd_validate_trial(args: argparse.Namespace) -> int:
    """Replicate one trial; the last line is the JSON result with --json."""
    from fhirtwin.validation.spec import load_spec
    from fhirtwin.validation.trial import replicate

    result = replicate(load_spec(args.spec), n_virtual=args.n_virtual, draws=args.draws)
    if not args.json:
        lo, hi = result.hazard_ratio_interval90
        print(f"{result.name} ({result.outcome}, {result.follow_up_years:g} y, {result.n_virtual} virtual patients): "
              f"control {100 * result.control_cumulative_incidence:.1f} % vs published "
              f"{100 * result.published['control_cumulative_incidence']:.1f} %; HR {result.hazard_ratio:.2f} "
              f"(90 % {lo:.2f}-{hi:.2f}) vs published {result.published['hazard_ratio']:.2f} "
              f"{tuple(result.published['hazard_ratio_ci95'])}; inside the CI: "
              f"{'yes' if result.hr_within_published_ci95 else 'no'}")
        for note in result.notes:
            print(f"  note: {note}")
    print(json.dumps(result.to_json()) if args.json else "", end="\n" if args.json else "")
    return 0


def cmd_validate_trials(args: argparse.Namespace) -> int:
    """Replicate every spec in a folder and write the table, JSON and forest plot."""
    from fhirtwin.validation.report import markdown_table, run_trials, write_report

    results = run_trials(args.folder, n_virtual=args.n_virtual, draws=args.draws)
    paths = write_report(results, args.out)
    print(markdown_table(results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_validate_cohort(args: argparse.Namespace) -> int:
    """Event-level calibration and subgroup flags on a virtual cohort; writes calibration.md and .json."""
    from fhirtwin.validation.calibration import build_report, summary, write

    report = build_report(args.n, seed=args.seed, draws=args.draws, coverage_patients=min(240, args.n))
    paths = write(report, args.out)
    if args.json:
        print(json.dumps({"overall": [r.to_json() for r in report.overall],
                          "flagged": [r.to_json() for r in report.flagged],
                          "written": [str(p) for p in paths.values()]}))
    else:
        print(summary(report) + "written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_validate_governance(args: argparse.Namespace) -> int:
    """Each optional component on vs off on a virtual cohort with markers; writes the engine's defaults."""
    from pathlib import Path

    from fhirtwin.model_card import source_validation_dir
    from fhirtwin.sim import components
    from fhirtwin.validation.governance import markdown, run, write

    if not args.verdicts and source_validation_dir() is None:
        raise CliError("fhirtwin validate governance: not a source checkout; give --verdicts FILE (an installed "
                       "package's defaults change only with a release)")
    report = run(args.n, seed=args.seed, draws=args.draws)
    verdicts = Path(args.verdicts) if args.verdicts else Path(components.__file__).with_name(components.VERDICTS_FILE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(report, verdicts, out / "governance.md")
    print(markdown(report))
    print(f"written: {verdicts}, {out / 'governance.md'}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Upload fhirtwin's profiles, terminology and OperationDefinition, its Organization, Devices and public
    signing key to a FHIR server, once, with an administrator's credentials. Every entry is a PUT to a
    stable id, so registering twice changes nothing."""
    from fhirtwin.sandbox.load import put_entries

    engine = _engine(args, signed=True)
    resources = engine.registration()
    conformance = [r for r in resources if r["resourceType"] in
                   ("StructureDefinition", "CodeSystem", "ValueSet", "OperationDefinition")]
    if not conformance:
        raise CliError("no conformance resources found in the installed package: nothing registered")
    response = engine.source.transaction(put_entries(resources))
    statuses = Counter(str(e.get("response", {}).get("status", "")).split(" ")[0]
                       for e in response.get("entry", []))
    kinds = Counter(r["resourceType"] for r in resources if r not in conformance)
    print(f"registered {len(resources)} resources on {args.server} ({len(conformance)} profiles and terminology, "
          + ", ".join(f"{n} {rtype}" for rtype, n in sorted(kinds.items())) + "): "
          + ", ".join(f"{n} x HTTP {code}" for code, n in sorted(statuses.items())))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from fhirtwin.demo import run_demo

    return run_demo(port=args.port, data_dir=args.data_dir, patients=args.patients, show=args.show)


# ------------------------------------------------------------------------------------------- population


def cmd_population_generate(args: argparse.Namespace) -> int:
    """The synthetic cohort as Bulk-Data-style NDJSON, one file per type, in constant memory."""
    from tqdm import tqdm

    from fhirtwin.population.generate import write_cohort_ndjson

    with tqdm(total=args.patients, unit="patient", file=sys.stderr, disable=not sys.stderr.isatty(),
              leave=False) as bar:
        report = write_cohort_ndjson(args.out, args.patients, seed=args.seed, workers=args.workers,
                                     truth=args.truth, on_patient=lambda: bar.update())
    if args.json:
        print(json.dumps({"patients": report.patients, "resources": report.resources, "files": report.files}))
    else:
        print(f"{report.patients} patients, {sum(report.resources.values())} resources in "
              f"{len(report.files)} files under {args.out}")
    return EXIT_OK


def cmd_population_stage(args: argparse.Namespace) -> int:
    """NDJSON folder -> Parquet partitions of whole patients."""
    from tqdm import tqdm

    from fhirtwin.population.stage import stage_ndjson

    with tqdm(unit="resource", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:
        report = stage_ndjson(args.source, args.out, buckets=args.buckets,
                              max_buffer_bytes=args.buffer_mb << 20, on_resource=lambda: bar.update())
    if args.json:
        print(json.dumps({"patients": report.patients, "resources": report.resources, "buckets": report.buckets,
                          "partitions": report.partitions, "row_groups": report.row_groups,
                          "shared_resources": report.shared_resources}))
    else:
        print(f"{report.patients} patients, {sum(report.resources.values())} resources -> {report.partitions} "
              f"partitions ({report.row_groups} row groups) under {args.out}")
    return EXIT_OK


def cmd_population_export(args: argparse.Namespace) -> int:
    """Bulk Data $export of the types the twin reads into an NDJSON folder (the input of population stage)."""
    from fhirtwin.population.bulk import BulkExport

    level = "group" if args.group else "patient" if args.patients_level else "system"
    progress = (lambda text: print(f"  {text}", file=sys.stderr)) if sys.stderr.isatty() else None
    export = BulkExport(_client(args), level, group_id=args.group, since=args.since, max_wait=args.max_wait,
                        on_progress=progress)
    result = export.run(args.out)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{sum(result.resources.values())} resources in {len(result.output)} files under {args.out} "
              f"({', '.join(f'{n} {t}' for t, n in result.resources.items()) or 'none'}); "
              f"{result.error_outcomes} error outcome(s), {result.deleted_resources} deleted; "
              f"transactionTime {result.transaction_time} (the next --since)")
    return EXIT_OK


def cmd_population_run(args: argparse.Namespace) -> int:
    """Staged partitions simulated in parallel on Dask; per-patient summaries and signed bundles per partition.

    Without SOURCE, ``--server`` is also the source: the run exports the population (``--group``,
    ``--patients-level``, ``--since``) before staging it. ``--incremental-from RUN_ID`` reuses that run's
    results for every patient whose input did not change.
    """
    from tqdm import tqdm

    from fhirtwin.population.run import LEDGER_FILE, ServerSource, run_population

    exporting = args.group is not None or args.patients_level or args.since is not None or args.by_search
    if args.source is not None and exporting:
        raise CliError("--group, --patients-level and --since choose what to export; they go without SOURCE")
    if args.source is None and args.resume is None and args.server is None:
        raise CliError("population run needs SOURCE (a folder of NDJSON or a staged folder), --server URL to export "
                       "from, or --resume RUN_ID")
    server = None
    if args.source is None and args.server is not None:
        level = "group" if args.group else "patient" if args.patients_level else "system"
        server = ServerSource(_client(args), level, group_id=args.group, since=args.since, by_search=args.by_search,
                              max_wait=args.max_wait)
    with tqdm(unit="partition", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:
        report = run_population(args.source, args.out, scheduler=args.scheduler, workers=args.workers,
                                serial=args.serial, resume=args.resume, draws=args.draws, as_of=args.as_of,
                                target=args.server, buckets=args.buckets, purpose=args.purpose_of_use,
                                server=server if args.resume is None or args.server is not None else None,
                                incremental_from=args.incremental_from, on_partition=lambda _: bar.update())
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        if report.export is not None:
            print(f"export: {sum(report.export.get('resources', {}).values())} resources, "
                  f"{report.export.get('deleted_resources', 0)} deleted, {report.export.get('error_outcomes', 0)} "
                  f"error outcome(s); transactionTime {report.export.get('transaction_time')}"
                  + ("" if report.export.get("exported_now") else " (exported before)"))
        print(f"run {report.run_id}: {report.partitions} partitions ({report.done_now} done now, "
              f"{report.already_done} already done, {report.failed} failed); patients: "
              f"{_counts_text(report.patients)}; {report.simulated_now} simulated in {report.simulate_seconds:.1f} s "
              f"on {report.workers} worker(s)")
        if report.incremental_from is not None:
            print(f"incremental from {report.incremental_from}: {report.lineage.get('simulated', 0)} simulated, "
                  f"{report.lineage.get('carried_over', 0)} carried over, {report.lineage.get('retired', 0)} retired")
        for name, error in sorted(report.errors.items()):
            print(f"  {name}: failed: {error}", file=sys.stderr)
        print(f"summaries and bundles under {args.out}/runs/{report.run_id}; ledger {args.out}/{LEDGER_FILE}"
              + (f" (resume with --resume {report.run_id})" if report.failed else ""))
    if report.failed:
        return EXIT_PARTIAL
    return EXIT_PARTIAL if report.patients.get("failed") else EXIT_OK


def cmd_population_residual(args: argparse.Namespace) -> int:
    """Train the hybrid's learned residual on a staged population; writes a versioned artifact folder."""
    from pathlib import Path

    from fhirtwin.hybrid.data import dataset_from_stage
    from fhirtwin.hybrid.train import fit_residual

    data = dataset_from_stage(args.stage_dir, source=args.source or Path(args.stage_dir).name, draws=args.draws)
    artifact = fit_residual(data, args.learner, seed=args.seed).save(args.out)
    on = {b: r.shrinkage for b, r in artifact.biomarkers.items()}
    print(f"residual {artifact.version} ({args.learner}) written to {args.out}; shrinkage by biomarker: "
          + ", ".join(f"{b} {v:.2f}" for b, v in on.items()))
    print(f"deploy with FHIRTWIN_HYBRID_ARTIFACT={args.out} (switch off with FHIRTWIN_HYBRID=off)")
    return EXIT_OK


def cmd_population_report(args: argparse.Namespace) -> int:
    """A run's aggregate Parquet and self-contained HTML page (aggregates only, no patient named)."""
    from fhirtwin.population.report import write_population_report

    files = write_population_report(args.run_dir, args.out)
    if args.json:
        print(json.dumps({"html": str(files.html), "parquet": str(files.parquet), "patients": files.patients}))
    else:
        print(f"{files.patients} patients: report {files.html}, aggregates {files.parquet}")
    return EXIT_OK


def cmd_population_write(args: argparse.Namespace) -> int:
    """A run's signed bundles to the FHIR server they were made for (resumable), or NDJSON for $import."""
    from tqdm import tqdm

    from fhirtwin.population.writeback import locate_run, write_import_ndjson, write_population

    out, run_id = locate_run(args.run_dir, args.run)
    if args.ndjson is not None:
        report = write_import_ndjson(out, run_id, args.ndjson)
    else:
        with tqdm(unit="patient", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:
            report = write_population(out, run_id, server=args.server, client=_client(args, writes=True),
                                      bundle_size=args.bundle_size, writers=args.writers, on_group=bar.update)
    if args.json:
        print(json.dumps(report.to_json()))
    elif args.ndjson is not None:
        print(f"run {run_id}: {report.patients} patients, {report.created} resources in {len(report.files)} files "
              f"under {args.ndjson} (for $import)")
    else:
        for patient_id, message in sorted(report.failures.items()):
            print(f"  {patient_id}: failed {message}")
        print(f"run {run_id}: {report.written} patients written now, {report.already_written} already written, "
              f"{report.failed} failed; {report.created} resources created in {report.transactions} transactions "
              f"({report.seconds:.1f} s)")
    if report.partitions_not_done:
        print(f"{report.partitions_not_done} partition(s) of the run are not done: resume the run, then write again",
              file=sys.stderr)
    return EXIT_PARTIAL if report.failed else EXIT_OK


# ------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fhirtwin import __version__

    parser = _Parser(prog="fhirtwin", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"fhirtwin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sandbox_url = _sandbox_url()

    def auth_options(p: argparse.ArgumentParser) -> None:
        group = p.add_argument_group("authorization", "SMART Backend Services, for a server that requires it "
                                     "(client credentials, a JWT signed with the client's key)")
        group.add_argument("--client-id", default=None, help=f"the registered client id (or ${ENV_CLIENT_ID})")
        group.add_argument("--client-key", default=None, metavar="PEM",
                           help=f"the client's private key, RSA (RS384) or EC P-384 (ES384) (or ${ENV_CLIENT_KEY})")
        group.add_argument("--client-kid", default=None, help="that key's kid in the client's registered JWKS "
                           "(default: its RFC 7638 thumbprint)")
        group.add_argument("--token-url", default=None, help="the token endpoint (default: from the server's "
                           ".well-known/smart-configuration)")
        group.add_argument("--scope", default=None, help="scopes to ask for (default: exactly what the command "
                           "needs: system/<Type>.rs of what it reads, .cu of what it writes)")

    def server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", type=fhir_base, required=True,
                       help=f"FHIR R4 base URL, e.g. {sandbox_url} (the sandbox)")
        p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")
        auth_options(p)

    def sandbox_options(p: argparse.ArgumentParser, *, timeout_for: str) -> None:
        p.add_argument("--port", type=port_number, default=None,
                       help=f"sandbox port (default {default_sandbox_port()}: $FHIRTWIN_SANDBOX_PORT or 8080)")
        p.add_argument("--data-dir", default=None,
                       help="database, log and key folder (default sandbox/data, or sandbox/data-PORT)")
        p.add_argument("--timeout", type=float, default=300.0, help=f"seconds to wait for {timeout_for} "
                       "(default 300)")

    sandbox = commands.add_parser("sandbox", help="the local HAPI FHIR R4 sandbox")
    actions = sandbox.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, func, text, waits in [
        ("start", cmd_sandbox_start, "build on first use, start in the background, print the base URL",
         "the server to answer /metadata"),
        ("stop", cmd_sandbox_stop, "stop the sandbox process started from this data folder",
         "the process to exit after SIGTERM (then SIGKILL)"),
        ("reset", cmd_sandbox_reset, "wipe the database (restarts the server if it was running)",
         "the restarted server to answer /metadata"),
    ]:
        p = actions.add_parser(name, help=text)
        sandbox_options(p, timeout_for=waits)
        p.set_defaults(func=func)
    p = actions.add_parser("status", help="is it running, and where (exit 3 when not running)")
    sandbox_options(p, timeout_for="nothing (status does not wait)")
    p.add_argument("--json", action="store_true", help="print one JSON object (exit 0 either way)")
    p.set_defaults(func=cmd_sandbox_status)
    p = actions.add_parser("load", help="upload profiles and the synthetic cohort (idempotent)")
    sandbox_options(p, timeout_for="the sandbox to start")
    p.add_argument("--server", type=fhir_base, default=None, help="load into this FHIR base URL instead of the sandbox")
    p.add_argument("--patients", type=positive_int, default=None, help="cohort size (default 240)")
    p.add_argument("--seed", type=int, default=None, help="cohort seed (default 20261127)")
    p.add_argument("--workers", type=positive_int, default=4, help="parallel transactions (default 4)")
    p.add_argument("--force", action="store_true", help="upload even if the server already holds this cohort")
    p.set_defaults(func=cmd_sandbox_load)
    smart = actions.add_parser("smart", help="run the SMART launch simulator (tests and local trials only)")
    sandbox_options(smart, timeout_for="nothing (the simulator does not wait)")
    smart.add_argument("--server", type=fhir_base, default=None, help="FHIR base to proxy (default: the sandbox)")
    smart.add_argument("--sim-port", type=port_number, default=9090, help="simulator port (default 9090)")
    smart.add_argument("--app-url", default="http://127.0.0.1:8765",
                       help="where `fhirtwin serve` runs (default http://127.0.0.1:8765)")
    smart.add_argument("--patient", default="ftp-0003", help="patient of a standalone launch (default ftp-0003)")
    smart.set_defaults(func=cmd_sandbox_smart)

    state = commands.add_parser("state", help="read one patient and print the multi-scale TwinState")
    server_options(state)
    state.add_argument("--patient", required=True, help="Patient id")
    state.add_argument("--as-of", type=iso_date, default=None, help="reference date YYYY-MM-DD (default today)")
    state.add_argument("--json", action="store_true", help="print JSON (scales, ledger, requests, pages_followed)")
    state.set_defaults(func=cmd_state)

    run = commands.add_parser("run", help="read -> twin -> write RiskAssessment, CarePlan, signed Provenance")
    server_options(run)
    who = run.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", action="append", help="Patient id (repeat for several)")
    who.add_argument("--all", action="store_true", help="every Patient on the server")
    run.add_argument("--dry-run", action="store_true", help="write nothing; show what would be written")
    run.add_argument("--out", default=None, help="write transaction bundles as NDJSON to FILE instead of the server")
    run.add_argument("--group", type=positive_int, default=1, help="patients per transaction (default 1)")
    run.add_argument("--as-of", type=iso_date, default=None, help="reference date YYYY-MM-DD (default today)")
    run.add_argument("--json", action="store_true", help="print per-patient results as JSON")
    run.add_argument("--purpose-of-use", default="TREAT", choices=PURPOSES_OF_USE,
                     help="v3-ActReason purpose checked against each patient's active Consents (default TREAT: "
                     "the results go to the chart for the patient's care; HRESCH for research runs)")
    run.add_argument("--ignore-consent", action="store_true",
                     help="do not search Consents (only for servers without Consent; never for real patients)")
    run.add_argument("--audit-log", default=None, metavar="FILE",
                     help="append one BALP AuditEvent per record read and per write to FILE (JSON lines)")
    run.add_argument("--no-checkpoint", action="store_true", help="simulate every patient, neither reading nor "
                     "updating the checkpoint (with --all or several patients, patients whose inputs are unchanged "
                     "and whose results are still current are otherwise skipped)")
    run.add_argument("--state-dir", default=None, help="folder of the checkpoint (default $FHIRTWIN_STATE_DIR, "
                     "else ~/.local/state/fhirtwin; one file per FHIR server)")
    run.set_defaults(func=cmd_run)

    seq = commands.add_parser("sequence", help="optimal yearly treatment sequence for one patient (exact dynamic "
                              "programming over the twin); prints it, --out writes the timed draft CarePlan")
    server_options(seq)
    seq.add_argument("--patient", required=True, help="Patient id")
    seq.add_argument("--as-of", type=iso_date, default=None, help="reference date YYYY-MM-DD (default today)")
    seq.add_argument("--draws", type=positive_int, default=200, help="ensemble draws (default 200)")
    seq.add_argument("--out", default=None, help="write the draft CarePlan (FHIR R4 JSON) to this file")
    seq.add_argument("--json", action="store_true", help="print the sequence as JSON")
    seq.set_defaults(func=cmd_sequence)

    cf = commands.add_parser("counterfactual", help="one patient's risks had a biomarker path been set or shifted "
                             "(do() on the twin, paired with the factual forecast; nothing is written)")
    server_options(cf)
    cf.add_argument("--patient", required=True, help="Patient id")
    cf.add_argument("--set", dest="actions", action="append", type=counterfactual_action("set"), default=[],
                    metavar="VAR=VALUE[@START:END]", help="hold VAR at VALUE in the window (years from the reference "
                    "date, negative = past; default now to open end); VAR: ldl_cholesterol_mg_dl, systolic_bp_mm_hg, "
                    "egfr_ml_min_1_73m2 (repeatable, applied in order)")
    cf.add_argument("--shift", dest="actions", action="append", type=counterfactual_action("shift"),
                    metavar="VAR=DELTA[@START:END]", help="move VAR's own path by DELTA in the window "
                    "(e.g. ldl_cholesterol_mg_dl=-38.67: 1 mmol/L lower)")
    cf.add_argument("--scenario", default=None, help="treatments in both worlds: an intervention code or label as "
                    "for $simulate (default baseline: current care)")
    cf.add_argument("--as-of", type=iso_date, default=None, help="reference date YYYY-MM-DD (default today)")
    cf.add_argument("--draws", type=positive_int, default=1000, help="ensemble draws (default 1000)")
    cf.add_argument("--json", action="store_true", help="print the result as JSON")
    cf.set_defaults(func=cmd_counterfactual)

    verify = commands.add_parser("verify", help="check a Provenance signature against its targets on the server, "
                                 "or which results of a patient are current")
    server_options(verify)
    verify.add_argument("provenance", nargs="?", default=None, help="Provenance/ID")
    verify.add_argument("--patient", default=None, help="instead: check that the patient's current results are those "
                        "of the newest valid signed Provenance and every superseded one is a signed revision")
    verify.add_argument("--key", default=None, help="pin this public (or private) key PEM instead of the key the "
                        "server publishes for the signature's kid (default: the published key)")
    verify.add_argument("--state-dir", default=None, help="folder of the run checkpoint whose last Provenance per "
                        "patient anchors --patient (default $FHIRTWIN_STATE_DIR, else ~/.local/state/fhirtwin)")
    verify.set_defaults(func=cmd_verify)

    serve = commands.add_parser("serve", help="the web service: $simulate, Subscription webhook, CDS Hooks, SMART")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8765, help="listen port (default 8765)")
    serve.add_argument("--fhir-server", type=fhir_base, required=True,
                       help=f"FHIR R4 base URL the service reads and writes, e.g. {sandbox_url}")
    serve.add_argument("--public-url", default=None, help="URL clients use to reach this service "
                       "(default http://HOST:PORT)")
    serve.add_argument("--signing-key", default=None, help="PEM private key for Provenance signatures (default: "
                       "$FHIRTWIN_SIGNING_KEY(_FILE), else the key store; a loopback server gets a development key)")
    serve.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")
    serve.add_argument("--config", default=None, help="TOML file with the [auth] table: token issuer and JWKS, "
                       "CDS clients, FHIR server allow-list, webhook secret file (see the README)")
    serve.add_argument("--webhook-secret-file", default=None, help="file holding the secret Subscription "
                       "deliveries carry as 'Authorization: Bearer <secret>' (fhirtwin subscribe --secret-file)")
    serve.add_argument("--store", default=None, help="SQLite file for the durable queue, sessions and audit outbox "
                       "(default $FHIRTWIN_STATE_DIR/service.sqlite3)")
    serve.add_argument("--dev-no-auth", action="store_true", help="development only: every door answers without "
                       "credentials; allowed only on a loopback --host")
    serve.add_argument("--webhook-window", type=positive_int, default=None, help="seconds the webhook waits for "
                       "more changes to a patient before one recompute (default 2)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="server log level (default info)")
    serve.set_defaults(func=cmd_serve)

    subscribe = commands.add_parser("subscribe", help="create the rest-hook Subscriptions that feed the webhook")
    server_options(subscribe)
    subscribe.add_argument("--endpoint", required=True, help="webhook base URL, e.g. http://host:8765/hooks/fhir")
    subscribe.add_argument("--payload", action=argparse.BooleanOptionalAction, default=True,
                           help="deliver the resource (PUT endpoint/Type/id) or an empty ping (default payload)")
    subscribe.add_argument("--twin-codes", action="store_true", help="only Observations with codes the twin reads")
    subscribe.add_argument("--header", action="append", help="channel header, e.g. 'X-Tenant: north'")
    subscribe.add_argument("--secret-file", default=None, help="file holding the webhook secret: deliveries carry "
                           "'Authorization: Bearer <secret>' (the same file as serve --webhook-secret-file)")
    subscribe.add_argument("--filter", action="append", help="extra criteria parameter for every Subscription, "
                           "e.g. _tag=SYSTEM|CODE (repeat for several)")
    subscribe.add_argument("--timeout", type=float, default=60.0,
                           help="seconds to wait for the Subscriptions to become active (default 60)")
    subscribe.add_argument("--off", action="store_true", help="turn off fhirtwin's Subscriptions to this endpoint")
    subscribe.set_defaults(func=cmd_subscribe)

    bench = commands.add_parser("bench", help="measure the performance budgets against a live server")
    bench.add_argument("--server", type=fhir_base, default=sandbox_url,
                       help=f"FHIR R4 base URL (default {sandbox_url})")
    bench.add_argument("--patients", type=positive_int, default=40, help="patients in the throughput runs (default 40)")
    bench.add_argument("--concurrency", type=positive_int, default=2, help="workers on both sides (default 2)")
    bench.add_argument("--cds-calls", type=positive_int, default=50, help="timed CDS Hooks calls (default 50)")
    bench.add_argument("--population", type=int, default=1000, help="generated patients in the offline population "
                       "measurement (default 1000; 0 skips it)")
    bench.add_argument("--population-scale", default="", metavar="SMALL,LARGE", help="two panel sizes for the "
                       "population memory ratio, e.g. 10000,100000 (about an hour on two cores; default: not measured)")
    bench.add_argument("--keep", action="store_true", help="keep the patient copies the benchmark makes")
    bench.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    bench.set_defaults(func=cmd_bench)

    validate = commands.add_parser("validate", help="published trials in silico; event-level, subgroup calibration")
    kinds = validate.add_subparsers(dest="what", required=True, parser_class=_Parser)
    one = kinds.add_parser("trial", help="one trial spec (format fhirtwin-trial/1)")
    one.add_argument("spec", help="path of the trial spec JSON")
    one.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    many = kinds.add_parser("trials", help="every spec in a folder -> table, JSON and forest plot")
    many.add_argument("folder", help="folder of trial specs (*.json)")
    many.add_argument("--out", default="docs/validation", help="where to write the report (default docs/validation)")
    for p in (one, many):
        p.add_argument("--n-virtual", type=positive_int, default=None,
                       help="virtual patients per trial (default: the spec's n_virtual)")
        p.add_argument("--draws", type=positive_int, default=100, help="ensemble draws per patient (default 100)")
    one.set_defaults(func=cmd_validate_trial)
    many.set_defaults(func=cmd_validate_trials)
    cohort = kinds.add_parser("cohort", help="event-level calibration and subgroup fairness on a virtual cohort")
    cohort.add_argument("--n", type=positive_int, default=20000, help="virtual patients (default 20000)")
    cohort.add_argument("--seed", type=int, default=2026, help="generator seed (default 2026)")
    cohort.add_argument("--draws", type=positive_int, default=40, help="ensemble draws per patient (default 40)")
    cohort.add_argument("--out", default="docs/validation", help="where to write the report (default docs/validation)")
    cohort.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    cohort.set_defaults(func=cmd_validate_cohort)
    governance = kinds.add_parser("governance", help="each optional component on vs off: subgroup calibration "
                                  "decides its default (writes components.json and governance.md)")
    governance.add_argument("--n", type=positive_int, default=6000, help="virtual patients (default 6000)")
    governance.add_argument("--seed", type=int, default=2026, help="generator seed (default 2026)")
    governance.add_argument("--draws", type=positive_int, default=40, help="ensemble draws per patient (default 40)")
    governance.add_argument("--verdicts", default="", help="where to write components.json (default: the one the "
                            "engine reads, next to fhirtwin/sim/components.py)")
    governance.add_argument("--out", default="docs/validation", help="where to write governance.md")
    governance.set_defaults(func=cmd_validate_governance)

    register = commands.add_parser("register", help="upload fhirtwin's profiles, Devices and public key (once)")
    server_options(register)
    register.set_defaults(func=cmd_register)

    population = commands.add_parser("population", help="population scale: NDJSON scale fixtures, Parquet "
                                     "staging, parallel runs")
    steps = population.add_subparsers(dest="step", required=True, parser_class=_Parser)
    gen = steps.add_parser("generate", help="write N synthetic patients as NDJSON (one file per type, flat memory)")
    gen.add_argument("--patients", type=positive_int, required=True, help="number of patients")
    gen.add_argument("--seed", type=int, default=20261127, help="cohort seed (default 20261127)")
    gen.add_argument("--out", required=True, help="empty folder for <Type>.ndjson files")
    gen.add_argument("--workers", type=positive_int, default=1, help="processes, each writing <Type>.<n>.ndjson "
                     "for a block of patients (default 1: <Type>.ndjson)")
    gen.add_argument("--truth", action="store_true", help="also write truth.ndjson (ground truth per patient)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_population_generate)
    stage = steps.add_parser("stage", help="stream an NDJSON folder into Parquet partitions of whole patients")
    stage.add_argument("source", help="folder of <Type>[.<n>].ndjson[.gz] files (Bulk Data export layout)")
    stage.add_argument("--out", required=True, help="new folder for the staged Parquet")
    stage.add_argument("--buckets", type=positive_int, default=None,
                       help="patient partitions (default: one per 1000 patients, at most 1024)")
    stage.add_argument("--buffer-mb", type=positive_int, default=256, help="cap of buffered rows (default 256)")
    stage.add_argument("--json", action="store_true", help="print one JSON object")
    stage.set_defaults(func=cmd_population_stage)
    export = steps.add_parser("export", help="Bulk Data $export of the types the twin reads into an NDJSON folder "
                              "(the input of stage and run)")
    server_options(export)
    scope = export.add_mutually_exclusive_group()
    scope.add_argument("--group", default=None, metavar="ID", help="export Group/ID's members (default: system level)")
    scope.add_argument("--patients-level", action="store_true", help="export at Patient level (all patients)")
    export.add_argument("--since", default=None, metavar="INSTANT", help="incremental: only resources changed "
                        "after this FHIR instant (the transactionTime of the previous export)")
    export.add_argument("--out", required=True, help="new folder: <Type>.<n>.ndjson, error/, deleted/, manifest.json")
    export.add_argument("--max-wait", type=float, default=4 * 3600.0, help="seconds to wait for the server's "
                        "export before cancelling it (default 14400)")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(func=cmd_population_export)
    prun = steps.add_parser("run", help="simulate a population in parallel on Dask: per-patient summaries (Parquet) "
                            "and signed transaction bundles (NDJSON), with a resumable ledger")
    prun.add_argument("source", nargs="?", default=None, help="folder of NDJSON (staged into OUT/stage/RUN_ID first) "
                      "or a staged folder (fhirtwin population stage); not needed with --resume")
    prun.add_argument("--out", required=True, help="output folder: ledger.sqlite3, runs/RUN_ID/{summaries,bundles}")
    prun.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler, e.g. "
                      "tcp://host:8786 (default: an in-process cluster; OUT and the staged folder must be visible "
                      "to every worker)")
    prun.add_argument("--workers", type=positive_int, default=None,
                      help="worker processes of the in-process cluster, one thread each (default: the cores)")
    prun.add_argument("--serial", action="store_true", help="no Dask: partitions one after another in this process")
    prun.add_argument("--resume", default=None, metavar="RUN_ID", help="continue a run: done partitions are kept, "
                      "the others (pending, failed, left running by a crash) are simulated again")
    prun.add_argument("--draws", type=positive_int, default=None, help="ensemble draws per scenario (default 1000)")
    prun.add_argument("--as-of", type=iso_date, default=None, help="reference date YYYY-MM-DD (default today)")
    prun.add_argument("--server", type=fhir_base, default=None, help="FHIR base the bundles are for: their "
                      "fullUrls and the signing key from the key store (default: the key in "
                      "$FHIRTWIN_SIGNING_KEY_FILE and urn:uuid fullUrls); without SOURCE also the server the run "
                      "exports the population from (Bulk $export into OUT/export/RUN_ID)")
    pscope = prun.add_mutually_exclusive_group()
    pscope.add_argument("--group", default=None, metavar="ID", help="with --server and no SOURCE: export Group/ID's "
                        "members (default: system level)")
    pscope.add_argument("--patients-level", action="store_true", help="with --server and no SOURCE: export at "
                        "Patient level")
    prun.add_argument("--since", default=None, metavar="INSTANT", help="with --server and no SOURCE: export only "
                      "resources changed after this FHIR instant (an --incremental-from run finds it itself)")
    prun.add_argument("--max-wait", type=float, default=4 * 3600.0, help="seconds to wait for the server's export "
                      "before cancelling it (default 14400)")
    prun.add_argument("--by-search", action="store_true", help="with --server and no SOURCE: read the population "
                      "by FHIR search instead of Bulk $export (a server without Bulk Data; into OUT/search/)")
    prun.add_argument("--incremental-from", default=None, metavar="RUN_ID", help="an earlier run in OUT: keep its "
                      "settings, simulate only patients whose input changed or who are new, carry the others' "
                      "rows and bundles over, retire patients no longer there (listed in runs/RUN_ID/retired.ndjson); "
                      "with --server the export is _since that run's export's transactionTime")
    prun.add_argument("--buckets", type=positive_int, default=None, help="partitions when staging NDJSON "
                      "(default: 4 per worker or one per 1000 patients, whichever is more)")
    prun.add_argument("--purpose-of-use", default=None, choices=PURPOSES_OF_USE, help="v3-ActReason purpose "
                      "checked against the active Consents in each record (default TREAT, or the earlier run's with "
                      "--incremental-from; HRESCH for research; export Consent with the records)")
    prun.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")
    auth_options(prun)
    prun.add_argument("--json", action="store_true", help="print one JSON object")
    prun.set_defaults(func=cmd_population_run)
    residual = steps.add_parser("residual", help="train the hybrid twin's learned residual on a staged population "
                                "(versioned artifact; see docs/hybrid.md)")
    residual.add_argument("stage_dir", help="a folder written by `fhirtwin population stage`")
    residual.add_argument("--out", required=True, help="folder for the artifact (artifact.json, arrays.npz)")
    residual.add_argument("--learner", choices=("gnn", "gbm"), default="gnn", help="scale graph network (default) "
                          "or gradient boosting")
    residual.add_argument("--draws", type=positive_int, default=200, help="mechanistic draws per patient (200)")
    residual.add_argument("--seed", type=int, default=0, help="seed of the splits and the learner (default 0)")
    residual.add_argument("--source", default=None, help="name of the data source recorded in the artifact "
                          "(default: the folder's name)")
    residual.set_defaults(func=cmd_population_residual)
    preport = steps.add_parser("report", help="population report of a run: risk distributions by outcome and "
                               "subgroup, proposals, statuses, run metrics (HTML + aggregate Parquet)")
    preport.add_argument("run_dir", help="the run's folder, OUT/runs/RUN_ID")
    preport.add_argument("--out", default=None, metavar="FILE.html",
                         help="HTML page to write (default RUN_DIR/population-report.html); the aggregates go to "
                         "RUN_DIR/population-summary.parquet")
    preport.add_argument("--json", action="store_true", help="print one JSON object")
    preport.set_defaults(func=cmd_population_report)
    pwrite = steps.add_parser("write", help="send a run's signed bundles to the FHIR server they were made for, "
                              "several patients per transaction, resumable (or --ndjson for $import)")
    pwrite.add_argument("run_dir", metavar="RUN_DIR_OR_OUT", help="the run's folder OUT/runs/RUN_ID, or OUT with --run")
    pwrite.add_argument("--run", default=None, metavar="RUN_ID", help="the run, when RUN_DIR_OR_OUT is OUT")
    where = pwrite.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", type=fhir_base, help="the FHIR base the run was made for (population run "
                       "--server); any other is refused")
    where.add_argument("--ndjson", default=None, metavar="DIR", help="instead: an empty folder for <Type>.ndjson "
                       "files a server's $import takes (resources with deterministic ids, no conditional writes)")
    pwrite.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (never in production)")
    auth_options(pwrite)
    pwrite.add_argument("--bundle-size", type=positive_int, default=10, help="patients per transaction (default 10)")
    pwrite.add_argument("--writers", type=positive_int, default=2, help="transactions in flight (default 2)")
    pwrite.add_argument("--json", action="store_true", help="print one JSON object")
    pwrite.set_defaults(func=cmd_population_write)

    demo = commands.add_parser("demo", help="start the sandbox, load the cohort, run the twin, summarise")
    demo.add_argument("--port", type=port_number, default=None,
                      help=f"sandbox port (default {default_sandbox_port()}: $FHIRTWIN_SANDBOX_PORT or 8080)")
    demo.add_argument("--data-dir", default=None, help="sandbox data folder (default sandbox/data)")
    demo.add_argument("--patients", type=positive_int, default=None, help="cohort size (default 240)")
    demo.add_argument("--show", type=positive_int, default=10, help="patients to print in the summary (default 10)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    """The message for an expected failure: what went wrong and, for a dead server, what to check."""
    import requests

    from fhirtwin.engine import PatientNotFound
    from fhirtwin.fhir.errors import FhirConnectionError

    server = getattr(args, "server", None) or getattr(args, "fhir_server", None)
    if isinstance(exc, PatientNotFound) and exc.patient_id:
        return f"Patient {exc.patient_id} not found on {server}"
    chain = [exc, exc.__cause__, getattr(exc.__cause__, "__cause__", None)]
    if any(isinstance(e, requests.ConnectionError | FhirConnectionError) for e in chain):
        return f"cannot connect: is the FHIR server running at {server}?"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "connect" in text.lower() and server:
        return f"{text} (is the FHIR server running at {server}?)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    import requests

    # the command reports failures itself, in one line; library warnings (retries) stay out of the terminal
    logging.getLogger("fhirtwin").addHandler(logging.NullHandler())

    from fhirtwin.engine import EngineError
    from fhirtwin.fhir.errors import FhirError
    from fhirtwin.keys import JwsError, KeyPolicyError
    from fhirtwin.sandbox.server import SandboxError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fhirtwin: interrupted", file=sys.stderr)
        return 130
    except (CliError, EngineError, FhirError, KeyPolicyError, SandboxError, JwsError, OSError, ValueError,
            requests.RequestException) as exc:
        print(f"fhirtwin: {_one_line(exc, args)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
