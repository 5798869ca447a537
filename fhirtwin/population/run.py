"""Population runs: staged partitions simulated in parallel on Dask, with a ledger that survives crashes.

Why: a panel of 100 k patients is hours of CPU; one process reading one patient at a time uses one core and
starts over after a crash. Here each Parquet partition of whole patients (:mod:`fhirtwin.population.stage`)
is one task. A task builds each patient's twin, runs the engine with every scenario (as ``fhirtwin run``
does), and writes two files per partition:

* ``runs/<run id>/summaries/<partition>.parquet``: one row per patient (:data:`SUMMARY_SCHEMA`): median and
  90 % interval of each outcome at 5 and 10 years, the guideline risk category, the best proposal, and the
  scope or insufficient-data status;
* ``runs/<run id>/bundles/<partition>.ndjson``: the signed transaction Bundle of each patient with a plan,
  one a line, prepared by :meth:`fhirtwin.engine.Engine.prepare` (the deterministic identifiers of every
  write path), for a server's ``$import`` or a later write-back step.

Raw ensemble draws never leave the worker: a task returns a :class:`PartitionResult` of counts (and the
ids of the patients it carried over). Both files
are written under temporary names and renamed, so a killed task leaves no half file.

The ledger (``ledger.sqlite3``, WAL) holds each run (model version, source, settings, creation time), each
partition's state (``pending``, ``running``, ``done``, ``failed``; attempts; output paths) and each
patient's input hash and status. Only the driver writes it. ``resume`` skips done partitions whose files
exist and redoes the rest, including partitions a killed run left ``running``; a redone partition's files
replace the earlier ones and its patients' rows are replaced, so nothing is lost or counted twice.

A run's settings (draws, reference date, recorded time, target server) are fixed when it is created and
read back on resume: every partition of a run signs the same ``recorded`` instant and simulates the same
question, whichever attempt computed it.

A run's source is a folder (NDJSON or staged) or a FHIR server: the run exports the twin's types by Bulk
``$export`` (:mod:`fhirtwin.population.bulk`) into ``export/<run id>/`` and stages that. The ledger's
``exports`` table holds what was asked, the job's status URL as soon as the kick-off answered, and, when
complete, the ``transactionTime`` and the manifest's facts (resources per type, error outcomes, deleted
resources). A resume never exports again once the ledger (or the complete folder) says the export is done;
a resume of a run interrupted while the job ran polls the recorded status URL, and kicks off a new job only
when the server no longer has that one or its files.

An incremental run (``incremental_from``) keeps the earlier run's settings and compares each patient's
input hash with the earlier run's ledger: an unchanged patient's summary row and bundle line are copied
from the earlier run's files (the run's outputs stay complete), a changed or new patient is simulated, and
a patient the earlier run had but this population lacks is ``retired`` (ledger row with partition ``''``;
``runs/<run id>/retired.ndjson`` lists its results by their conditional-create identifiers, for write-back
to mark ``entered-in-error``). From a server, the export is ``_since`` the earlier export's
``transactionTime``; since such an export holds only the changed resources, each changed patient's whole
record is read by FHIR search (the batched record read every twin uses, robust on HAPI and on any R4 server,
unlike ``_typeFilter``/``patient`` follow-up exports) and the earlier staged folder is restaged with those
records, without deleted patients or patients who left the Group. Each run's row names the run it follows
and its counts: simulated, carried over, retired.

Signing keys never travel in the task graph: each worker resolves the key itself with the key policy
(:mod:`fhirtwin.keys`: ``FHIRTWIN_SIGNING_KEY(_FILE)``, else the key store for the target server) and the
task refuses to sign when the worker's key id differs from the run's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fhirtwin.keys import KeyPolicyError
from fhirtwin.population.stage import FORMAT as STAGE_FORMAT
from fhirtwin.population.stage import (
    MAX_BUCKETS,
    PATIENTS_PER_PARTITION,
    bucket_of,
    iter_patient_records,
    list_partitions,
    partition_name,
    read_shared,
    resource_owners,
    stage_ndjson,
    staged_buckets,
    staged_patients,
)

if TYPE_CHECKING:
    from fhirtwin.fhir.client import FhirClient

LEDGER_FILE = "ledger.sqlite3"
DEFAULT_DRAWS = 1000
RUNS_DIR = "runs"
STAGE_DIR = "stage"
EXPORT_DIR = "export"
#: Patients of the run an incremental run follows that are no longer in the population, with their results.
RETIRED_FILE = "retired.ndjson"
#: Outcomes summarised per patient (the mechanistic twin's competing-risk outcomes).
SUMMARY_OUTCOMES = ("total_cvd", "ascvd", "heart_failure", "kidney_failure", "death")
SUMMARY_YEARS = (5, 10)
#: Partitions per worker when staging on the fly without ``buckets``: enough to keep every worker busy
#: until the end (the last partitions finish unevenly), few enough that per-task overhead stays small.
PARTITIONS_PER_WORKER = 4
PLANNED, OUT_OF_SCOPE, INSUFFICIENT, FAILED = "planned", "out-of-scope", "insufficient-data", "failed"
CONSENT_DENIED = "consent-denied"
#: Ledger status of a patient the run an incremental run follows had and this run's population has not.
RETIRED = "retired"
_TEMP_MARK = ".tmp-"


def _summary_schema() -> pa.Schema:
    fields = [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("input_hash", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("scope", pa.string()),
        pa.field("missing", pa.list_(pa.string())),
        pa.field("message", pa.string()),
        pa.field("risk_outcome", pa.string()),
        pa.field("risk_category_code", pa.string()),
        pa.field("risk_category", pa.string()),
        # the engine's own model inputs (subgroups for the population report); null when a run had none
        pa.field("sex", pa.string()),
        pa.field("age_years", pa.float64()),
        pa.field("diabetes", pa.bool_()),
        pa.field("egfr", pa.float64()),
        pa.field("race", pa.string()),
    ]
    for outcome in SUMMARY_OUTCOMES:
        for years in SUMMARY_YEARS:
            fields += [pa.field(f"{outcome}_{years}y_{stat}", pa.float64()) for stat in ("median", "p05", "p95")]
    fields += [
        pa.field("best_proposal", pa.string()),
        pa.field("best_arr_median", pa.float64()),
        pa.field("best_net_benefit_median", pa.float64()),
        pa.field("best_nnt", pa.float64()),
        pa.field("options", pa.int32()),
        pa.field("medication_flags", pa.int32()),
        pa.field("run_key", pa.string()),
        pa.field("result_keys", pa.list_(pa.string())),
    ]
    return pa.schema(fields)


#: One row per patient in ``summaries/<partition>.parquet``.
SUMMARY_SCHEMA = _summary_schema()


class PopulationRunError(ValueError):
    """A run cannot start or resume (unknown run id, conflicting settings, source not usable)."""


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class RunSettings:
    """What fixes a run's results besides the records; stored in the ledger and reused on resume."""

    draws: int
    as_of: str
    recorded: str
    target: str | None
    fhirtwin_version: str
    models: tuple[str, ...]
    seed: int = 0
    horizon_years: float = 10.0
    outcome: str = "total_cvd"
    #: v3-ActReason purpose of use checked against each patient's active Consents (:mod:`fhirtwin.consent`)
    purpose: str = "TREAT"
    #: The optional model components on (:mod:`fhirtwin.sim.components`), fixed on the driver so every worker
    #: uses the same set whatever its own environment says.
    components: tuple[str, ...] = ()
    #: Version of the learned residual the run uses (``fhirtwin.hybrid``), None for the mechanistic twin alone;
    #: every worker must have the same artifact configured.
    learned_residual: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["models"] = list(self.models)
        out["components"] = list(self.components)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        return cls(**{**data, "models": tuple(data["models"]), "components": tuple(data.get("components", ()))})

    def digest_basis(self) -> dict[str, Any]:
        """The settings that change a patient's numbers (``recorded`` and ``target`` only change the bundle)."""
        return {k: v for k, v in self.to_json().items() if k not in ("recorded", "target")}


def current_models() -> tuple[str, ...]:
    from fhirtwin.sim.model import registered_models

    return tuple(sorted(f"{m.name} {m.version}" for m in registered_models()))


def new_settings(*, draws: int, as_of: date | None, target: str | None, recorded: datetime | None = None,
                 purpose: str = "TREAT") -> RunSettings:
    from fhirtwin import __version__

    moment = (recorded or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    from fhirtwin.hybrid.artifact import configured_artifact
    from fhirtwin.sim.components import enabled_components

    residual = configured_artifact()
    return RunSettings(draws=draws, as_of=(as_of or moment.date()).isoformat(), recorded=moment.isoformat(),
                       target=target, fhirtwin_version=__version__, models=current_models(), purpose=purpose,
                       components=tuple(sorted(enabled_components())),
                       learned_residual=residual.version if residual is not None else None)


def resolve_signing_key(target: str | None) -> Any:
    """The key that signs a run's bundles: :func:`fhirtwin.keys.signing_key_for` the target server, or the
    deployment's key from the environment when the bundles have no target yet."""
    from fhirtwin.keys import signing_key_for
    from fhirtwin.writeback.jws import ENV_KEY, ENV_KEY_FILE

    if target is not None:
        return signing_key_for(target)
    if os.environ.get(ENV_KEY) or os.environ.get(ENV_KEY_FILE):
        return signing_key_for("http://offline.invalid/fhir")  # the environment's key wins over any store
    raise KeyPolicyError(f"a population run signs its bundles: set {ENV_KEY_FILE} (or {ENV_KEY}), or name the "
                         "FHIR server the results are for with --server (its key from the key store)")


# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class PartitionTask:
    """Everything a worker needs for one partition (paths must be visible to the worker)."""

    run_id: str
    partition: str
    partition_path: str
    stage_dir: str
    summary_path: str
    bundles_path: str
    settings: RunSettings
    kid: str
    previous: PreviousResults | None = None


@dataclass(frozen=True)
class PreviousResults:
    """What an incremental run's task may reuse: the earlier run's input hash of each of the partition's
    patients (from its ledger) and the earlier summary and bundle files that hold their rows."""

    run_id: str
    hashes: dict[str, str]
    summary_paths: tuple[str, ...]
    bundles_paths: tuple[str, ...]


@dataclass
class PartitionResult:
    """What a task sends back: counts and the ids of the patients carried over (the numbers are in the files)."""

    partition: str
    patients: int = 0
    #: patients whose earlier row and bundle were reused (input hash unchanged), not simulated
    carried: int = 0
    carried_ids: list[str] = field(default_factory=list)
    planned: int = 0
    out_of_scope: int = 0
    insufficient: int = 0
    consent_denied: int = 0
    failed: int = 0
    bundles: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0


class _Target:
    """The engine's source in a worker: no reads (records come from the partition), only the base URL the
    bundles' ``fullUrl`` s name (None: ``urn:uuid`` of each resource)."""

    def __init__(self, base_url: str | None) -> None:
        self.base_url = base_url


def input_hash(record: list[dict[str, Any]], settings: RunSettings) -> str:
    """SHA-256 over the settings that fix the numbers and every resource of the record (canonical JSON,
    in record order) but fhirtwin's own results: a patient whose hash is unchanged needs no new simulation."""
    from fhirtwin.vocabulary import is_fhirtwin_generated

    digest = hashlib.sha256(json.dumps(settings.digest_basis(), sort_keys=True).encode())
    for item in record:
        if is_fhirtwin_generated(item):
            continue
        digest.update(b"\n")
        digest.update(json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return digest.hexdigest()


def simulate_partition(task: PartitionTask) -> PartitionResult:
    """Simulate every patient of one partition and write its summary and bundle files (see the module doc).

    A patient whose active Consent (exported with the record) denies the run's purpose of use is a
    ``consent-denied`` row: no numbers, no bundle. A patient that fails is a ``failed`` row (with the
    error's type, or an engine error's message, which never holds PHI); the partition goes on.
    """
    from fhirtwin import __version__
    from fhirtwin.consent import ConsentPolicy
    from fhirtwin.engine import Engine

    started, cpu_started = time.monotonic(), time.process_time()
    settings = task.settings
    if settings.fhirtwin_version != __version__ or tuple(settings.models) != current_models():
        raise PopulationRunError(f"this worker runs fhirtwin {__version__} ({', '.join(current_models())}); the run "
                                 f"needs {settings.fhirtwin_version} ({', '.join(settings.models)})")
    key = resolve_signing_key(settings.target)
    if key.kid != task.kid:
        raise PopulationRunError("this worker's signing key is not the run's (check FHIRTWIN_SIGNING_KEY_FILE "
                                 "on the workers)")
    engine = Engine(_Target(settings.target), signing_key=key, draws=settings.draws,
                    horizon_years=settings.horizon_years, seed=settings.seed, outcome=settings.outcome,
                    components=settings.components)
    mine = engine.learned_residual.version if engine.learned_residual is not None else None
    if mine != settings.learned_residual:
        raise PopulationRunError(f"this worker's learned residual ({mine or 'none'}) is not the run's "
                                 f"({settings.learned_residual or 'none'}): set FHIRTWIN_HYBRID_ARTIFACT on the "
                                 "workers as on the driver")
    as_of = date.fromisoformat(settings.as_of)
    recorded = datetime.fromisoformat(settings.recorded)
    consent = ConsentPolicy(settings.purpose)
    result = PartitionResult(task.partition)
    rows: list[dict[str, Any]] = []
    shared = read_shared(task.stage_dir)
    earlier_rows, earlier_bundles = _earlier_outputs(task.previous, task.kid) if task.previous else ({}, {})
    with _atomic_text(Path(task.bundles_path)) as bundles:
        for patient_id, resources in iter_patient_records(task.partition_path, shared=shared):
            row: dict[str, Any] = {"patient_id": patient_id, "input_hash": input_hash(resources, settings)}
            earlier = earlier_rows.get(patient_id)
            if earlier is not None and earlier["input_hash"] == row["input_hash"] and (
                    earlier["status"] != PLANNED or patient_id in earlier_bundles):
                rows.append(earlier)  # unchanged input: the earlier row and bundle, as they were
                if patient_id in earlier_bundles:
                    bundles.write(earlier_bundles[patient_id] + "\n")
                    result.bundles += 1
                result.carried_ids.append(patient_id)
                continue
            try:
                bundle = _simulate_one(engine, consent, patient_id, resources, row, as_of, recorded, settings)
            except Exception as exc:  # noqa: BLE001 - one patient's failure must not lose the partition
                row = {"patient_id": patient_id, "input_hash": row["input_hash"], "status": FAILED,
                       "message": _error_text(exc)}
            else:
                if bundle is not None:
                    bundles.write(json.dumps(bundle, separators=(",", ":"), ensure_ascii=False) + "\n")
                    result.bundles += 1
            rows.append(row)
    result.carried = len(result.carried_ids)
    for row in rows:
        status = row["status"]
        result.patients += 1
        result.planned += status == PLANNED
        result.out_of_scope += status == OUT_OF_SCOPE
        result.insufficient += status == INSUFFICIENT
        result.consent_denied += status == CONSENT_DENIED
        result.failed += status == FAILED
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    with _atomic_path(Path(task.summary_path)) as temporary:
        pq.write_table(table, temporary, compression="zstd")
    result.cpu_seconds = time.process_time() - cpu_started
    result.wall_seconds = time.monotonic() - started
    result.peak_rss_bytes = _peak_rss()
    return result


def _earlier_outputs(previous: PreviousResults, kid: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The earlier run's summary rows (with the hash its ledger holds) and bundle lines of the candidates; a
    line signed with another key than ``kid`` (the key was rotated since) is left out: that patient is
    simulated and signed again."""
    rows: dict[str, dict[str, Any]] = {}
    wanted = pa.array(sorted(previous.hashes), type=pa.string())
    for path in previous.summary_paths:
        table = pq.read_table(path)
        table = table.filter(pc.is_in(table["patient_id"], value_set=wanted))
        for row in table.to_pylist():
            if previous.hashes.get(row["patient_id"]) == row["input_hash"]:
                rows[row["patient_id"]] = {name: row.get(name) for name in SUMMARY_SCHEMA.names}
    lines: dict[str, str] = {}
    for path in previous.bundles_paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = line.rstrip("\n")
                bundle = json.loads(text) if text else None
                patient_id = _bundle_patient(bundle) if bundle else None
                if patient_id in rows and bundle is not None and _signing_kids(bundle) == {kid}:
                    lines[patient_id] = text
    return rows, lines


def _signing_kids(bundle: dict[str, Any]) -> set[str]:
    """The ``kid`` of every Provenance signature of a bundle (from the JWS headers, not verified)."""
    import base64

    from fhirtwin.writeback.jws import header_of

    kids: set[str] = set()
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Provenance":
            continue
        for signature in resource.get("signature") or []:
            try:
                kids.add(str(header_of(base64.b64decode(signature["data"]).decode("ascii")).get("kid")))
            except (KeyError, TypeError, ValueError):  # JwsError is a ValueError
                kids.add("")
    return kids


def _bundle_patient(bundle: dict[str, Any]) -> str | None:
    """The patient a bundle is for (the subject of its results)."""
    from fhirtwin.fhir.client import patient_reference_id

    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        found = patient_reference_id(resource) if isinstance(resource, dict) else None
        if found is not None:
            return found
    return None


def _simulate_one(engine: Any, consent: Any, patient_id: str, resources: list[dict[str, Any]], row: dict[str, Any],
                  as_of: date, recorded: datetime, settings: RunSettings) -> dict[str, Any] | None:
    """Fill ``row`` for one patient and return the patient's transaction bundle (None: nothing to write)."""
    from fhirtwin.adapters.reads import READ_TYPES
    from fhirtwin.engine import PatientRecord
    from fhirtwin.vocabulary import is_fhirtwin_generated

    if consent.denying((r for r in resources if r.get("resourceType") == "Consent"), recorded):
        row.update(status=CONSENT_DENIED, message=f"denied by the patient's privacy consent for {settings.purpose}")
        return None
    # the types a record read returns are twin inputs (an export may hold others); fhirtwin's own earlier
    # results are what this run's results supersede, as on every other path
    readable = [r for r in resources if r.get("resourceType") in READ_TYPES or is_fhirtwin_generated(r)]
    run = engine.run(patient_id, record=PatientRecord.split(patient_id, readable, stored_read=True), as_of=as_of)
    row.update(_summary(run, settings.outcome))
    if run.plan is None:
        # as on every door: a patient now out of scope has its current results retired, nothing new
        retirement = (engine.prepare_retirement(patient_id, run.stored or [], now=recorded)
                      if row["status"] == OUT_OF_SCOPE else None)
        if retirement is None:
            return None
        row["run_key"] = retirement.run_key
        retired: dict[str, Any] = retirement.bundle
        return retired
    write = engine.prepare(run, now=recorded)
    row["run_key"] = write.run_key
    row["result_keys"] = sorted(f"{name}={value}" for name, value in write.keys.items())
    bundle: dict[str, Any] = write.bundle
    return bundle


def _summary(run: Any, outcome: str) -> dict[str, Any]:
    """One summary row from a TwinRun (only medians and intervals; the draws stay here)."""
    row: dict[str, Any] = {"scope": run.scope.code if run.scope is not None else None,
                           "medication_flags": len(run.medication_flags), **_characteristics(run)}
    if run.plan is None:
        out_of_scope = run.scope is not None and not run.scope.in_scope
        row["status"] = OUT_OF_SCOPE if out_of_scope else INSUFFICIENT
        row["missing"] = list(run.missing)
        row["message"] = run.error if out_of_scope else None
        return row
    plan = run.plan
    forecast = plan.baseline
    row["status"] = PLANNED
    for name in SUMMARY_OUTCOMES:
        if name not in forecast.cif:
            continue
        for years in SUMMARY_YEARS:
            if 12 * years > forecast.times_months[-1]:
                continue
            for stat, value in forecast.at_horizon(name, float(years)).items():
                row[f"{name}_{years}y_{stat}"] = value
    median = forecast.at_horizon(outcome, plan.horizon_years)["median"]
    category = forecast.risk_category(outcome, plan.horizon_years, median)
    row["risk_outcome"] = f"{outcome}_{plan.horizon_years:g}y"
    row["risk_category_code"] = category.code if category is not None else None
    row["risk_category"] = category.name if category is not None else None
    row["options"] = len(plan.options)
    if plan.options:
        best = plan.options[0]
        row["best_proposal"] = best.scenario.name
        row["best_arr_median"] = best.arr.get("median")
        row["best_net_benefit_median"] = best.net_benefit.get("median")
        row["best_nnt"] = best.nnt
    return row


def _characteristics(run: Any) -> dict[str, Any]:
    """Sex, age, diabetes, eGFR and race as the engine used them (its :class:`~fhirtwin.sim.inputs.PatientInputs`).

    Why: the population report groups by them. A run without fitted inputs (out of scope, insufficient data)
    keeps what the twin's demographics say (sex, race, completed years of age); the rest stays null.
    """
    inputs = run.model.inputs_ if run.model is not None else None
    if inputs is not None:
        return {"sex": inputs.sex, "age_years": float(inputs.age_years), "diabetes": bool(inputs.diabetes),
                "egfr": float(inputs.egfr_ml_min_1_73m2), "race": inputs.race}
    state = run.state
    try:
        age: float | None = float(state.age_years())
    except (LookupError, ValueError):  # no birth date or no reference date
        age = None
    return {"sex": state.demographics.sex, "age_years": age, "diabetes": None, "egfr": None,
            "race": state.demographics.race}


def _error_text(exc: BaseException) -> str:
    """An error for the summary: an engine error's message (written to hold no PHI), else only its type."""
    from fhirtwin.engine import EngineError

    return exc.message if isinstance(exc, EngineError) else type(exc).__name__


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` that becomes ``path`` (``os.replace``) only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def _atomic_text(path: Path) -> Iterator[Any]:
    with _atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        yield handle


# ------------------------------------------------------------------------------------------------ ledger


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model_version TEXT NOT NULL,
    source TEXT NOT NULL,
    stage_dir TEXT NOT NULL,
    settings TEXT NOT NULL,
    created TEXT NOT NULL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS partitions (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    partition TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    patients INTEGER,
    simulated INTEGER NOT NULL DEFAULT 0,
    summary_path TEXT,
    bundles_path TEXT,
    error TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (run_id, partition)
);
CREATE TABLE IF NOT EXISTS patients (
    run_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    partition TEXT NOT NULL,
    input_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (run_id, patient_id)
);
CREATE TABLE IF NOT EXISTS exports (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    server TEXT NOT NULL,
    level TEXT NOT NULL,
    group_id TEXT,
    since TEXT,
    state TEXT NOT NULL CHECK (state IN ('started', 'done')),
    status_url TEXT,
    transaction_time TEXT,
    facts TEXT,
    updated TEXT NOT NULL
);
"""
#: Columns added to tables of earlier ledgers: (table, column, declaration).
_ADDED_COLUMNS = (
    ("runs", "incremental_from", "TEXT"),
    ("runs", "simulated", "INTEGER"),
    ("runs", "carried_over", "INTEGER"),
    ("runs", "retired", "INTEGER"),
    # the run whose simulation a carried-over (or retired) patient's results come from; NULL: simulated here
    ("patients", "carried_from", "TEXT"),
)


@dataclass(frozen=True)
class RunRow:
    run_id: str
    model_version: str
    source: str
    stage_dir: str
    settings: RunSettings
    created: str
    finished: str | None
    incremental_from: str | None = None


@dataclass(frozen=True)
class ExportRow:
    """A server run's Bulk export: what was asked, the job's status URL once known, and what came back."""

    run_id: str
    server: str
    level: str
    group_id: str | None
    since: str | None
    state: str
    status_url: str | None
    transaction_time: str | None
    facts: dict[str, Any]


@dataclass(frozen=True)
class EarlierPatient:
    """A patient of the run an incremental run follows, as its ledger holds it."""

    partition: str
    input_hash: str
    status: str
    origin: str


@dataclass(frozen=True)
class PartitionRow:
    partition: str
    state: str
    attempts: int
    patients: int | None
    simulated: int
    summary_path: str | None
    bundles_path: str | None
    error: str | None


class Ledger:
    """The SQLite ledger of a population output folder (WAL: readers watch progress while the run writes)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        with self._db:
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_run(self, run_id: str, *, source: str, stage_dir: str, settings: RunSettings,
                   incremental_from: str | None = None) -> RunRow:
        with self._db:
            self._db.execute("INSERT INTO runs (run_id, model_version, source, stage_dir, settings, created, "
                             "incremental_from) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (run_id, ", ".join(settings.models), source, stage_dir,
                              json.dumps(settings.to_json(), sort_keys=True), _now(), incremental_from))
        found = self.run(run_id)
        assert found is not None
        return found

    def run(self, run_id: str) -> RunRow | None:
        row = self._db.execute("SELECT run_id, model_version, source, stage_dir, settings, created, finished, "
                               "incremental_from FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return RunRow(row[0], row[1], row[2], row[3], RunSettings.from_json(json.loads(row[4])), row[5], row[6],
                      row[7])

    def start_export(self, run_id: str, *, server: str, level: str, group_id: str | None, since: str | None) -> None:
        with self._db:
            self._db.execute("INSERT INTO exports (run_id, server, level, group_id, since, state, updated) "
                             "VALUES (?, ?, ?, ?, ?, 'started', ?)", (run_id, server, level, group_id, since, _now()))

    def export_polling(self, run_id: str, status_url: str) -> None:
        """The export job's status URL, recorded as soon as the server answered the kick-off."""
        with self._db:
            self._db.execute("UPDATE exports SET status_url = ?, updated = ? WHERE run_id = ?",
                             (status_url, _now(), run_id))

    def finish_export(self, run_id: str, facts: dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE exports SET state = 'done', transaction_time = ?, facts = ?, updated = ? "
                             "WHERE run_id = ?", (facts["transaction_time"], json.dumps(facts, sort_keys=True),
                                                  _now(), run_id))

    def add_export_facts(self, run_id: str, facts: dict[str, Any]) -> None:
        """Facts learnt after the export (an incremental run's changed and dropped patients)."""
        found = self.export(run_id)
        assert found is not None
        with self._db:
            self._db.execute("UPDATE exports SET facts = ?, updated = ? WHERE run_id = ?",
                             (json.dumps({**found.facts, **facts}, sort_keys=True), _now(), run_id))

    def export(self, run_id: str) -> ExportRow | None:
        row = self._db.execute("SELECT run_id, server, level, group_id, since, state, status_url, transaction_time, "
                               "facts FROM exports WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return ExportRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                         json.loads(row[8]) if row[8] else {})

    def earlier_patients(self, run_id: str) -> dict[str, EarlierPatient]:
        """The patients of ``run_id`` that are still in its population (every status but retired)."""
        rows = self._db.execute("SELECT patient_id, partition, input_hash, status, COALESCE(carried_from, run_id) "
                                "FROM patients WHERE run_id = ? AND status != ?", (run_id, RETIRED))
        return {r[0]: EarlierPatient(*r[1:]) for r in rows}

    def retire(self, run_id: str, patients: dict[str, EarlierPatient]) -> None:
        """Patients of the earlier run that this run's population no longer has (partition ``''``)."""
        with self._db:
            self._db.execute("DELETE FROM patients WHERE run_id = ? AND status = ?", (run_id, RETIRED))
            self._db.executemany("INSERT OR REPLACE INTO patients (run_id, patient_id, partition, input_hash, status, "
                                 "carried_from) VALUES (?, ?, '', ?, ?, ?)",
                                 [(run_id, pid, p.input_hash, RETIRED, p.origin) for pid, p in patients.items()])

    def runs(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT run_id FROM runs ORDER BY created, run_id")]

    def add_partitions(self, run_id: str, partitions: list[str]) -> None:
        """Register partitions as pending (those already known keep their state)."""
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO partitions (run_id, partition, state, updated) "
                                 "VALUES (?, ?, 'pending', ?)", [(run_id, p, _now()) for p in partitions])

    def partitions(self, run_id: str) -> dict[str, PartitionRow]:
        rows = self._db.execute("SELECT partition, state, attempts, patients, simulated, summary_path, "
                                "bundles_path, error FROM partitions WHERE run_id = ? ORDER BY partition",
                                (run_id,))
        return {r[0]: PartitionRow(*r) for r in rows}

    def mark_running(self, run_id: str, partition: str) -> None:
        with self._db:
            self._db.execute("UPDATE partitions SET state = 'running', attempts = attempts + 1, error = NULL, "
                             "updated = ? WHERE run_id = ? AND partition = ?", (_now(), run_id, partition))

    def mark_done(self, run_id: str, partition: str, result: PartitionResult, *, summary_path: str,
                  bundles_path: str, patients: list[tuple[str, str, str]], previous: str | None = None) -> None:
        """The partition's state and its patients' rows in one transaction (``patients``: id, hash, status).

        A patient in ``result.carried_ids`` keeps the origin of its results from the ``previous`` run's row.
        """
        carried = set(result.carried_ids)
        with self._db:
            self._db.execute("DELETE FROM patients WHERE run_id = ? AND partition = ?", (run_id, partition))
            self._db.executemany(
                "INSERT OR REPLACE INTO patients (run_id, patient_id, partition, input_hash, status, carried_from) "
                "VALUES (?, ?, ?, ?, ?, (SELECT COALESCE(p.carried_from, p.run_id) FROM patients p "
                "WHERE ? AND p.run_id = ? AND p.patient_id = ?))",
                [(run_id, pid, partition, digest, status, pid in carried, previous, pid)
                 for pid, digest, status in patients])
            self._db.execute("UPDATE partitions SET state = 'done', patients = ?, simulated = simulated + ?, "
                             "summary_path = ?, bundles_path = ?, error = NULL, updated = ? "
                             "WHERE run_id = ? AND partition = ?",
                             (result.patients, result.patients - result.carried, summary_path, bundles_path, _now(),
                              run_id, partition))

    def mark_failed(self, run_id: str, partition: str, error: str) -> None:
        with self._db:
            self._db.execute("UPDATE partitions SET state = 'failed', error = ?, updated = ? "
                             "WHERE run_id = ? AND partition = ?", (error, _now(), run_id, partition))

    def finish(self, run_id: str) -> None:
        """The run is complete: its finish time and its counts (simulated, carried over, retired)."""
        counts = self.lineage_counts(run_id)
        with self._db:
            self._db.execute("UPDATE runs SET finished = ?, simulated = ?, carried_over = ?, retired = ? "
                             "WHERE run_id = ?", (_now(), counts["simulated"], counts["carried_over"],
                                                  counts["retired"], run_id))

    def lineage_counts(self, run_id: str) -> dict[str, int]:
        """Patients simulated by this run, carried over from an earlier one, and retired."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(status != ? AND carried_from IS NULL), 0), "
            "COALESCE(SUM(status != ? AND carried_from IS NOT NULL), 0), COALESCE(SUM(status = ?), 0) "
            "FROM patients WHERE run_id = ?", (RETIRED, RETIRED, RETIRED, run_id)).fetchone()
        return {"simulated": int(row[0]), "carried_over": int(row[1]), "retired": int(row[2])}

    def patient_counts(self, run_id: str) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM patients WHERE run_id = ? GROUP BY status", (run_id,))
        return {str(status): int(n) for status, n in rows}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A sortable, unguessable run id: ``YYYYMMDDTHHMMSSZ-<6 hex>``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class PopulationReport:
    """What a run (or a resumed run) did; paths are relative to the output folder."""

    run_id: str
    out_dir: str
    partitions: int
    done_now: int = 0
    already_done: int = 0
    failed: int = 0
    patients: dict[str, int] = field(default_factory=dict)
    simulated_now: int = 0
    #: patients whose earlier results an incremental run reused in the partitions done now
    carried_now: int = 0
    bundles_now: int = 0
    workers: int = 0
    seconds: float = 0.0
    cluster_start_seconds: float = 0.0
    simulate_seconds: float = 0.0
    worker_cpu_seconds: float = 0.0
    peak_worker_rss_bytes: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    incremental_from: str | None = None
    #: the ledger's counts of the run so far: simulated, carried_over, retired
    lineage: dict[str, int] = field(default_factory=dict)
    #: a server run's export: transactionTime and the manifest's facts; ``exported_now`` False on a resume
    #: that found the export done
    export: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServerSource:
    """A run's population read from a FHIR server by Bulk ``$export`` (:class:`~fhirtwin.population.bulk.BulkExport`).

    ``level`` is ``system``, ``patient`` or ``group`` (with ``group_id``); ``since`` makes a first run's
    export incremental (an incremental run takes its ``_since`` from the earlier run's export instead).
    ``by_search`` is the fallback for a server without Bulk Data: the population's ids (the Group's members,
    or every Patient) and then each patient's whole record are read by FHIR search into an NDJSON folder
    (``OUT/search/<time>``), and the run is a folder run on it (an incremental run then compares every
    patient's input hash; ``since`` does not apply).
    """

    client: FhirClient
    level: str = "system"
    group_id: str | None = None
    since: str | None = None
    max_wait: float = 4 * 3600.0
    by_search: bool = False


SEARCH_DIR = "search"


def read_by_search(server: ServerSource, out: Path) -> Path:
    """The population's whole records read by FHIR search into a new NDJSON folder under ``out/search``."""
    from fhirtwin.population.bulk import read_whole_records

    if server.since is not None:
        raise PopulationRunError("--since needs a Bulk export; a population read by search is read whole")
    client = server.client
    if server.level == "group":
        if not server.group_id:
            raise PopulationRunError("a group population needs the Group's id")
        ids = sorted(_group_members(client, server.group_id))
    else:
        ids = sorted({str(r["id"]) for r in client.search_all("Patient", {"_elements": "id", "_count": 500})
                      if isinstance(r.get("id"), str)})
    folder = out / SEARCH_DIR / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    read = read_whole_records(client, ids, folder)
    if not read.found:
        raise PopulationRunError("the server returned no patient of the population")
    return folder


def is_staged(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is a complete staged folder (its manifest names the staging format)."""
    manifest = Path(folder) / "manifest.json"
    try:
        return bool(json.loads(manifest.read_text("utf-8")).get("format") == STAGE_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def run_population(
    source: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    serial: bool = False,
    resume: str | None = None,
    draws: int | None = None,
    as_of: date | None = None,
    target: str | None = None,
    buckets: int | None = None,
    recorded: datetime | None = None,
    purpose: str | None = None,
    server: ServerSource | None = None,
    incremental_from: str | None = None,
    on_partition: Callable[[PartitionResult], object] | None = None,
) -> PopulationReport:
    """Run (or ``resume``) a population run into ``out_dir`` and return what it did.

    ``source`` is a folder of NDJSON (staged into ``out_dir/stage/<run id>`` first; ``buckets`` partitions,
    default :data:`PARTITIONS_PER_WORKER` per worker or one per 1000 patients, whichever is more) or an
    already staged folder; or, instead, ``server``: the run exports the twin's types into
    ``out_dir/export/<run id>`` and stages that. On resume both come from the ledger (a server run whose
    export completed is not exported again; one interrupted while the job ran polls the recorded status URL,
    or kicks off anew when the server no longer has the job). Partitions run on the Dask cluster at
    ``scheduler``, else on an in-process ``LocalCluster`` of ``workers`` processes (default: the cores) with
    one thread each; ``serial`` runs them one after another in this process. ``draws`` (default
    :data:`DEFAULT_DRAWS`), ``as_of``, ``target``, ``purpose`` (default TREAT) and ``recorded`` fix a new
    run's settings (:class:`RunSettings`); a resumed run keeps its own and refuses different ones.
    ``purpose`` is the purpose of use checked against the Consents in each record.

    ``incremental_from`` (a run id of the same ledger) makes the run incremental: it keeps that run's settings
    unless given, and a patient whose input hash equals that run's gets that run's summary row and bundle
    instead of a simulation. With ``server`` the export is ``_since`` that run's export's ``transactionTime``
    and the population is that run's staged folder updated with the whole records of the changed patients
    (read by search: a ``_since`` export holds only the changed resources). Patients of that run that are
    no longer in the population are ``retired`` and their results listed in ``runs/<run id>/retired.ndjson``.
    The in-process cluster starts worker processes by ``spawn``: a script calling this needs the
    ``if __name__ == "__main__":`` guard.
    """
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    if resume is None and server is not None and server.by_search:
        source, server = read_by_search(server, out), None  # then a folder run like any other
    with Ledger(out / LEDGER_FILE) as ledger:
        if resume is not None:
            run = _resumed(ledger, out, resume, draws=draws, as_of=as_of, target=target, purpose=purpose,
                           incremental_from=incremental_from)
        else:
            run = _new_run(ledger, out, source, server, incremental_from, draws=draws, as_of=as_of, target=target,
                           recorded=recorded, purpose=purpose)
        settings = run.settings
        key = resolve_signing_key(settings.target)
        previous = ledger.run(run.incremental_from) if run.incremental_from else None
        stage_dir = Path(run.stage_dir)
        export_report: dict[str, Any] | None = None
        export = ledger.export(run.run_id)
        if not is_staged(stage_dir):
            if export is not None:
                export_report = _export_and_stage(ledger, out, run, export, server, previous, buckets, workers)
            else:
                source_dir = Path(run.source)
                if not source_dir.is_dir():
                    raise PopulationRunError("the run's NDJSON source folder is gone and its staging is incomplete")
                stage_ndjson(source_dir, stage_dir, buckets=buckets or _default_buckets(source_dir, workers))
        if export_report is None and export is not None:
            found = ledger.export(run.run_id)
            export_report = {**(found.facts if found else {}), "exported_now": False}
        names = {p.stem: p for p in list_partitions(stage_dir)}
        ledger.add_partitions(run.run_id, sorted(names))
        vanished = sorted(set(ledger.partitions(run.run_id)) - set(names))
        if vanished:
            raise PopulationRunError(f"the staged folder no longer holds partition(s) {', '.join(vanished[:5])}")
        run_dir = out / RUNS_DIR / run.run_id
        _remove_leftovers(run_dir)
        earlier: dict[str, PreviousResults] = {}
        if previous is not None:
            earlier = _retire_and_reuse(ledger, out, run, previous, stage_dir)
        known = ledger.partitions(run.run_id)
        todo = [name for name, row in known.items() if not _is_done(out, row)]
        report = PopulationReport(run.run_id, str(out), partitions=len(known),
                                  already_done=len(known) - len(todo), workers=1 if serial else workers,
                                  incremental_from=run.incremental_from, export=export_report)
        tasks = {name: PartitionTask(
            run_id=run.run_id, partition=name, partition_path=str(names[name].resolve()),
            stage_dir=str(stage_dir.resolve()), summary_path=str((run_dir / "summaries" / f"{name}.parquet").resolve()),
            bundles_path=str((run_dir / "bundles" / f"{name}.ndjson").resolve()), settings=settings, kid=key.kid,
            previous=earlier.get(name)) for name in todo}
        simulate_started = time.monotonic()

        def finished(name: str, result: PartitionResult | None, error: BaseException | None) -> None:
            task = tasks[name]
            if result is None:
                # our own errors say what to fix and hold no PHI; anything else is named by its type only
                text = str(error) if isinstance(error, PopulationRunError | KeyPolicyError) else type(error).__name__
                ledger.mark_failed(run.run_id, name, text)
                report.failed += 1
                report.errors[name] = text
                return
            rows = pq.read_table(task.summary_path, columns=["patient_id", "input_hash", "status"]).to_pylist()
            ledger.mark_done(run.run_id, name, result, summary_path=_relative(task.summary_path, out),
                             bundles_path=_relative(task.bundles_path, out),
                             patients=[(r["patient_id"], r["input_hash"], r["status"]) for r in rows],
                             previous=run.incremental_from)
            report.done_now += 1
            report.simulated_now += result.patients - result.carried
            report.carried_now += result.carried
            report.bundles_now += result.bundles
            report.worker_cpu_seconds += result.cpu_seconds
            report.peak_worker_rss_bytes = max(report.peak_worker_rss_bytes, result.peak_rss_bytes)
            if on_partition is not None:
                on_partition(result)

        if tasks:
            if serial:
                for name, task in tasks.items():
                    ledger.mark_running(run.run_id, name)
                    try:
                        outcome = simulate_partition(task)
                    except Exception as exc:  # noqa: BLE001 - a failed partition is recorded; the others go on
                        finished(name, None, exc)
                    else:
                        finished(name, outcome, None)
            else:
                report.workers, report.cluster_start_seconds = _run_on_dask(tasks, ledger, run.run_id, scheduler,
                                                                            workers, finished)
        report.simulate_seconds = time.monotonic() - simulate_started - report.cluster_start_seconds
        states = ledger.partitions(run.run_id)
        if all(row.state == "done" for row in states.values()):
            ledger.finish(run.run_id)
        report.patients = ledger.patient_counts(run.run_id)
        report.lineage = ledger.lineage_counts(run.run_id)
    report.seconds = time.monotonic() - started
    return report


def _resumed(ledger: Ledger, out: Path, run_id: str, *, draws: int | None, as_of: date | None, target: str | None,
             purpose: str | None, incremental_from: str | None) -> RunRow:
    """The run to resume, refusing settings that differ from its own."""
    run = ledger.run(run_id)
    if run is None:
        raise PopulationRunError(f"no run {run_id!r} in {out.name}/{LEDGER_FILE}")
    settings = run.settings
    asked = {"draws": draws, "as_of": as_of.isoformat() if as_of else None, "target": target, "purpose": purpose}
    differ = [k for k, v in asked.items() if v is not None and v != getattr(settings, k)]
    if incremental_from is not None and incremental_from != run.incremental_from:
        differ.append("incremental_from")
    if differ:
        raise PopulationRunError(f"run {run_id} was made with other settings ({', '.join(differ)}); a resumed "
                                 "run keeps its settings (start a new run instead)")
    return run


def _new_run(ledger: Ledger, out: Path, source: str | os.PathLike[str] | None, server: ServerSource | None,
             incremental_from: str | None, *, draws: int | None, as_of: date | None, target: str | None,
             recorded: datetime | None, purpose: str | None) -> RunRow:
    """A new run in the ledger (and its export, for a server run); an incremental run inherits its settings."""
    if (source is None) == (server is None):
        raise PopulationRunError("a new run needs either a SOURCE folder (NDJSON or staged) or a server to export "
                                 "from")
    if source is not None and not Path(source).is_dir():
        raise PopulationRunError(f"SOURCE {Path(source).name} is not a folder")
    previous = ledger.run(incremental_from) if incremental_from is not None else None
    if incremental_from is not None and previous is None:
        raise PopulationRunError(f"no run {incremental_from!r} in {out.name}/{LEDGER_FILE} to be incremental from")
    since = server.since if server is not None else None
    if previous is not None:
        inherited = previous.settings
        draws, purpose = draws or inherited.draws, purpose or inherited.purpose
        as_of = as_of or date.fromisoformat(inherited.as_of)
        target = target or inherited.target
        if server is not None:
            since = _incremental_since(ledger, previous, server)
    settings = new_settings(draws=draws or DEFAULT_DRAWS, as_of=as_of, target=target, recorded=recorded,
                            purpose=purpose or "TREAT")
    run_id = new_run_id()
    if server is not None:
        source_dir = out / EXPORT_DIR / run_id
        stage_dir = out / STAGE_DIR / run_id
    else:
        assert source is not None
        source_dir = Path(source).resolve()
        stage_dir = source_dir if is_staged(source_dir) else out / STAGE_DIR / run_id
    run = ledger.create_run(run_id, source=str(source_dir.resolve()), stage_dir=str(stage_dir.resolve()),
                            settings=settings, incremental_from=incremental_from)
    if server is not None:
        ledger.start_export(run_id, server=server.client.base_url, level=server.level, group_id=server.group_id,
                            since=since)
    return run


def _incremental_since(ledger: Ledger, previous: RunRow, server: ServerSource) -> str:
    """The ``_since`` of an incremental server run: the earlier run's export's transactionTime."""
    earlier = ledger.export(previous.run_id)
    if earlier is None or earlier.state != "done" or not earlier.transaction_time:
        raise PopulationRunError(f"run {previous.run_id} has no completed server export to be incremental from")
    if server.since is not None:
        raise PopulationRunError("an incremental run exports since the earlier run's transactionTime; drop --since")
    if (earlier.server, earlier.level, earlier.group_id) != (server.client.base_url, server.level, server.group_id):
        raise PopulationRunError(f"run {previous.run_id} exported another population (server, level or group); "
                                 "an incremental run exports the same one")
    if not is_staged(previous.stage_dir):
        raise PopulationRunError(f"the staged folder of run {previous.run_id} is gone; start a full run")
    return earlier.transaction_time


def _export_and_stage(ledger: Ledger, out: Path, run: RunRow, export: ExportRow, server: ServerSource | None,
                      previous: RunRow | None, buckets: int | None, workers: int) -> dict[str, Any]:
    """A server run's export (unless the ledger says it completed) and its staging; returns the export's facts."""
    from fhirtwin.population.bulk import BulkExport

    if server is not None and server.client.base_url != export.server:
        raise PopulationRunError(f"run {run.run_id} exports from another server")
    client = server.client if server is not None else _client_for(export.server)
    folder = out / EXPORT_DIR / run.run_id
    exported_now = False
    if export.state != "done":
        if (folder / "export.json").is_file():  # complete on disk; the process died before the ledger said so
            facts = json.loads((folder / "export.json").read_text("utf-8"))
        else:
            bulk = BulkExport(client, export.level, group_id=export.group_id, since=export.since,
                              max_wait=server.max_wait if server is not None else 4 * 3600.0)
            result = bulk.run(folder, status_url=export.status_url,
                              on_status_url=lambda url: ledger.export_polling(run.run_id, url))
            facts = result.to_json()
            exported_now = True
        facts.pop("out_dir", None)
        ledger.finish_export(run.run_id, facts)
    elif not (folder / "export.json").is_file():
        raise PopulationRunError(f"the export folder of run {run.run_id} is gone and its staging is incomplete; "
                                 "start a new run")
    if previous is None:
        stage_ndjson(folder, run.stage_dir, buckets=buckets or _default_buckets(folder, workers))
    else:
        changes = _stage_changes(client, export, folder, previous, Path(run.stage_dir))
        ledger.add_export_facts(run.run_id, changes)
    found = ledger.export(run.run_id)
    assert found is not None
    return {**found.facts, "exported_now": exported_now}


def _client_for(server: str) -> FhirClient:
    from fhirtwin.fhir.client import FhirClient

    return FhirClient(server)


def _stage_changes(client: FhirClient, export: ExportRow, folder: Path, previous: RunRow,
                   stage_dir: Path) -> dict[str, int]:
    """Stage an incremental export: the earlier run's staged folder with the changed patients' whole records.

    A patient changed when the export holds a resource of it, when a deleted resource was its (looked up in
    the earlier staged folder), or, at group level, when it joined the Group. A patient is dropped when its
    Patient was deleted, when it left the Group, or when the server no longer has it.
    """
    from fhirtwin.adapters.reads import REFERENCED_TYPES
    from fhirtwin.population.bulk import deleted_references, read_whole_records, touched_patients

    base = Path(previous.stage_dir)
    deleted = set(deleted_references(folder))
    dropped = {r.split("/", 1)[1] for r in deleted if r.startswith("Patient/")}
    owners = resource_owners(base, (r for r in deleted if not r.startswith("Patient/")))
    touched, _ = touched_patients(folder)
    changed = touched | set(owners.values())
    earlier = set(staged_patients(base))
    if export.level == "group" and export.group_id:
        members = _group_members(client, export.group_id)
        changed |= members - earlier
        dropped |= earlier - members
    dropped &= earlier  # the history names other deletions of the server too
    changed -= dropped
    records = folder / "records"
    read = read_whole_records(client, sorted(changed), records)
    dropped |= set(read.missing)
    for resource_type in REFERENCED_TYPES:  # changed shared resources of the export itself (system level)
        for index, path in enumerate(sorted(folder.glob(f"{resource_type}.*.ndjson")), start=1):
            shutil.copyfile(path, records / f"{resource_type}.{index}.ndjson")
    shared_deleted = {r for r in deleted if r.split("/", 1)[0] in REFERENCED_TYPES}
    stage_ndjson(records, stage_dir, base=base, drop_patients=dropped, drop_shared=shared_deleted)
    return {"changed_patients": len(changed), "records_read": len(read.found), "dropped_patients": len(dropped)}


def _group_members(client: FhirClient, group_id: str) -> set[str]:
    """Patient ids of a Group's active members."""
    group = client.read("Group", group_id)
    members: set[str] = set()
    for member in group.get("member") or []:
        entity = member.get("entity") if isinstance(member, dict) else None
        reference = entity.get("reference") if isinstance(entity, dict) else None
        parts = reference.split("/_history")[0].rstrip("/").split("/") if isinstance(reference, str) else []
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1] and member.get("inactive") is not True:
            members.add(parts[-1])
    return members


def _retire_and_reuse(ledger: Ledger, out: Path, run: RunRow, previous: RunRow,
                      stage_dir: Path) -> dict[str, PreviousResults]:
    """Retire the earlier run's patients this population lacks; per partition, what its task may reuse."""
    earlier = ledger.earlier_patients(previous.run_id)
    present = staged_patients(stage_dir)
    retired = {pid: p for pid, p in sorted(earlier.items()) if pid not in present}
    earlier_partitions = ledger.partitions(previous.run_id)
    _write_retired(out, run.run_id, retired, earlier_partitions)
    ledger.retire(run.run_id, retired)
    if previous.settings.target != run.settings.target:
        return {}  # the earlier bundles name and are signed for another server: every patient is simulated
    buckets = staged_buckets(stage_dir)
    grouped: dict[str, dict[str, str]] = {}
    sources: dict[str, set[str]] = {}
    for pid, patient in earlier.items():
        if pid not in present or patient.status == FAILED:
            continue
        name = partition_name(bucket_of(pid, buckets))
        grouped.setdefault(name, {})[pid] = patient.input_hash
        sources.setdefault(name, set()).add(patient.partition)
    reuse: dict[str, PreviousResults] = {}
    for name, hashes in grouped.items():
        rows = [earlier_partitions[p] for p in sorted(sources[name]) if p in earlier_partitions]
        usable = [r for r in rows if _is_done(out, r)]
        reuse[name] = PreviousResults(
            previous.run_id, hashes,
            summary_paths=tuple(str((out / str(r.summary_path)).resolve()) for r in usable),
            bundles_paths=tuple(str((out / str(r.bundles_path)).resolve()) for r in usable))
    return reuse


def _write_retired(out: Path, run_id: str, retired: dict[str, EarlierPatient],
                   partitions: dict[str, PartitionRow]) -> None:
    """``runs/<run id>/retired.ndjson``: per retired patient, the results its earlier bundle wrote (by their
    conditional-create identifiers: the server's ids are not known here) for write-back to mark
    ``entered-in-error``, with the Provenance run tag that names them together."""
    wanted: dict[str, dict[str, Any]] = {
        pid: {"patient_id": pid, "results_run": p.origin, "status": p.status, "results": [], "provenance_tag": None}
        for pid, p in retired.items()}
    for name in sorted({p.partition for p in retired.values()}):
        row = partitions.get(name)
        path = out / str(row.bundles_path) if row is not None and row.bundles_path else None
        if path is None or not path.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                patient_id = _bundle_patient(json.loads(line)) if line.strip() else None
                if patient_id in wanted:
                    wanted[patient_id].update(_bundle_results(json.loads(line)))
    with _atomic_text(out / RUNS_DIR / run_id / RETIRED_FILE) as handle:
        for item in wanted.values():
            handle.write(json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n")


def _bundle_results(bundle: dict[str, Any]) -> dict[str, Any]:
    """The results a transaction bundle creates (type and ``system|value`` identifier) and its run tag."""
    results: list[dict[str, str]] = []
    tag = None
    for entry in bundle.get("entry") or []:
        request = entry.get("request") or {}
        resource = entry.get("resource") or {}
        condition = str(request.get("ifNoneExist") or "")
        if request.get("method") != "POST":
            continue
        if resource.get("resourceType") == "Provenance" and condition.startswith("_tag="):
            tag = condition.removeprefix("_tag=")
        elif condition.startswith("identifier="):
            results.append({"resourceType": str(resource.get("resourceType")),
                            "identifier": condition.removeprefix("identifier=")})
    return {"results": results, "provenance_tag": tag}


#: Dask settings of the embedded cluster, each measured on the offline path. No statistical profiler: it samples
#: every thread every 10 ms (10-15 % of a worker's CPU), and nobody looks at the embedded cluster's dashboard.
#: No ``MALLOC_TRIM_THRESHOLD_`` (Dask sets 65536 by default to hand memory back to the OS): setting it turns
#: off glibc's adaptive mmap threshold, so every ensemble array (about 1 MB) was mapped, faulted in and unmapped
#: again, and a worker spent 74 instead of 44 ms of CPU per patient (None unsets a variable in Dask's config).
EMBEDDED_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}


def embedded_cluster(workers: int) -> Any:
    """The in-process ``LocalCluster`` of a run: ``workers`` processes with one thread each, configured by
    :data:`EMBEDDED_CLUSTER_CONFIG` (its worker processes are spawned with that configuration)."""
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set(EMBEDDED_CLUSTER_CONFIG):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                            silence_logs=logging.ERROR)


def _run_on_dask(tasks: dict[str, PartitionTask], ledger: Ledger, run_id: str, scheduler: str | None,
                 workers: int, finished: Callable[[str, PartitionResult | None, BaseException | None], None],
                 ) -> tuple[int, float]:
    """Submit one task per partition and record each as it completes; returns the cluster's worker threads
    and the seconds it took to start (or connect to) the cluster."""
    from distributed import Client, as_completed

    started = time.monotonic()
    cluster = embedded_cluster(workers) if scheduler is None else None
    try:
        with Client(cluster if cluster is not None else scheduler, set_as_default=False) as client:
            threads = sum(client.nthreads().values())
            startup = time.monotonic() - started
            futures = {}
            for name, task in tasks.items():
                ledger.mark_running(run_id, name)
                future = client.submit(simulate_partition, task, key=f"fhirtwin-{run_id}-{name}-{uuid.uuid4().hex[:8]}",
                                       pure=False)
                futures[future] = name
            for future in as_completed(futures, loop=client.loop):
                name = futures[future]
                error = future.exception()
                if error is not None:
                    finished(name, None, error)
                else:
                    finished(name, future.result(), None)
                future.release()
            return threads, startup
    finally:
        if cluster is not None:
            cluster.close()


def _is_done(out: Path, row: PartitionRow) -> bool:
    """Done and both files still there (a deleted output is redone)."""
    return (row.state == "done" and row.summary_path is not None and row.bundles_path is not None
            and (out / row.summary_path).is_file() and (out / row.bundles_path).is_file())


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files of tasks a crash interrupted (never visible under a final name)."""
    for folder in (run_dir / "summaries", run_dir / "bundles"):
        if folder.is_dir():
            for path in folder.iterdir():
                if _TEMP_MARK in path.name:
                    path.unlink(missing_ok=True)


def _relative(path: str, out: Path) -> str:
    return os.path.relpath(path, out.resolve())


def _default_buckets(source_dir: Path, workers: int) -> int:
    """Partitions for on-the-fly staging: at least :data:`PARTITIONS_PER_WORKER` per worker."""
    from fhirtwin.fhir.ndjson import NdjsonSource

    patients = 0
    for path in NdjsonSource(source_dir).files.get("Patient", []):
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as handle:
            patients += sum(1 for line in handle if line.strip())
    wanted = max(math.ceil(patients / PATIENTS_PER_PARTITION), PARTITIONS_PER_WORKER * workers)
    return max(1, min(MAX_BUCKETS, wanted, patients or 1))
