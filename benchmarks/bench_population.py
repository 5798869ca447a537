"""Population-scale budgets of ``fhirtwin bench``: the offline path (NDJSON in, results out) per core, Dask's
speed-up on two workers, and peak memory at two panel sizes.

Run: ``python benchmarks/bench_population.py [--patients 1000] [--scale 10000,100000] [--draws 1000]``
(``fhirtwin bench --population N --population-scale A,B`` calls the same functions).

* ``offline_patients_per_s_per_core`` [>= 25]: a generated cohort of ``--patients`` is staged to Parquet and run
  on an in-process Dask cluster with one worker (every scenario, ``--draws`` baseline draws); patients divided by
  the CPU seconds of staging, of the driver (scheduler included) and of the worker.
* ``dask_speedup_2_workers_vs_1`` [>= 1.6]: simulation wall time of that one-worker run over a two-worker run of
  the same staged partitions (cluster start-up excluded: it is paid once per run, not per patient).
* ``population_peak_rss_ratio_<large>_vs_<small>`` [<= 1.5 for 100k vs 10k]: generate, stage and run (two
  workers) each in its own process at both sizes; the largest peak resident memory of any process (the
  workers included) at the large size over that at the small size.

The generated cohort is fhirtwin's own synthetic generator (:mod:`fhirtwin.population.generate`), seeded here.
Not a test: never collected by pytest, nothing asserts on wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SEED = 2027
#: Patients per staged partition in the offline measurement: several partitions per worker, as a real run.
PARTITIONS = 8


def _log(text: str) -> None:
    print(f"[bench-population] {text}", file=sys.stderr, flush=True)


def _signing_key_file(folder: Path) -> Path:
    """A throwaway deployment key: a population run signs its bundles."""
    from cryptography.hazmat.primitives import serialization

    from fhirtwin.writeback.jws import generate_key

    path = folder / "bench-signing.pem"
    key = generate_key("ES256")
    path.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def measure_offline(patients: int = 1000, draws: int = 1000, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Offline patients per second per core and the two-worker speed-up (see the module doc)."""
    from fhirtwin.population.generate import write_cohort_ndjson
    from fhirtwin.population.run import run_population
    from fhirtwin.population.stage import stage_ndjson
    from fhirtwin.writeback.jws import ENV_KEY_FILE

    with tempfile.TemporaryDirectory(prefix="fhirtwin-bench-") as tmp:
        root = Path(tmp)
        previous = os.environ.get(ENV_KEY_FILE)
        os.environ[ENV_KEY_FILE] = str(_signing_key_file(root))
        try:
            log(f"generating {patients} patients")
            write_cohort_ndjson(root / "ndjson", patients, seed=SEED, workers=2)
            c0 = time.process_time()
            stage_ndjson(root / "ndjson", root / "staged", buckets=PARTITIONS)
            stage_cpu = time.process_time() - c0
            log("population run, one worker")
            c0 = time.process_time()
            one = run_population(root / "staged", root / "run-1", workers=1, draws=draws)
            driver_cpu = time.process_time() - c0
            log("population run, two workers")
            two = run_population(root / "staged", root / "run-2", workers=2, draws=draws)
        finally:
            if previous is None:
                os.environ.pop(ENV_KEY_FILE, None)
            else:
                os.environ[ENV_KEY_FILE] = previous
    if one.failed or two.failed:
        raise RuntimeError(f"population runs failed partitions: {one.errors or two.errors}")
    cpu = stage_cpu + driver_cpu + one.worker_cpu_seconds
    return {
        "offline_patients": patients,
        "offline_draws": draws,
        "offline_statuses": one.patients,
        "offline_stage_cpu_ms_per_patient": 1e3 * stage_cpu / patients,
        "offline_driver_cpu_ms_per_patient": 1e3 * driver_cpu / patients,
        "offline_worker_cpu_ms_per_patient": 1e3 * one.worker_cpu_seconds / patients,
        "offline_patients_per_s_per_core": patients / cpu,
        "dask_1_worker_simulate_s": one.simulate_seconds,
        "dask_2_workers_simulate_s": two.simulate_seconds,
        "dask_speedup_2_workers_vs_1": one.simulate_seconds / two.simulate_seconds,
        "population_peak_worker_rss_mb": max(one.peak_worker_rss_bytes, two.peak_worker_rss_bytes) / 2**20,
    }


def _child(args: list[str]) -> dict[str, Any]:
    """Run one step in its own process and return its JSON answer (with its peak RSS, see :func:`_step`)."""
    done = subprocess.run([sys.executable, __file__, "_step", *args], stdout=subprocess.PIPE,  # noqa: S603
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"step {args[0]} failed")
    answer: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return answer


def measure_scale(sizes: Sequence[int], draws: int = 1000, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Peak RSS of generate, stage and run at each size, and the ratio of the largest size to the smallest."""
    small, large = min(sizes), max(sizes)
    out: dict[str, Any] = {}
    peaks: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="fhirtwin-bench-scale-") as tmp:
        root = Path(tmp)
        key = _signing_key_file(root)
        for n in (small, large):
            folder = root / str(n)
            steps = {}
            for step, args in (("generate", [str(n), str(folder / "ndjson")]),
                               ("stage", [str(folder / "ndjson"), str(folder / "staged")]),
                               ("run", [str(folder / "staged"), str(folder / "run"), str(draws), str(key)])):
                log(f"{step}: {n} patients")
                t0 = time.monotonic()
                steps[step] = _child([step, *args])
                steps[step]["seconds"] = time.monotonic() - t0
            peaks[n] = max(s["peak_rss_bytes"] for s in steps.values())
            for step, answer in steps.items():
                out[f"scale_{n}_{step}_peak_rss_mb"] = answer["peak_rss_bytes"] / 2**20
                out[f"scale_{n}_{step}_s"] = answer["seconds"]
            out[f"scale_{n}_run_statuses"] = steps["run"]["statuses"]
            out[f"scale_{n}_run_worker_cpu_ms_per_patient"] = steps["run"]["worker_cpu_ms_per_patient"]
            for path in sorted(folder.glob("ndjson/*.ndjson"), reverse=True):  # keep the disk use bounded
                path.unlink()
    out[f"population_peak_rss_ratio_{_k(large)}_vs_{_k(small)}"] = peaks[large] / peaks[small]
    return out


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _step(argv: list[str]) -> dict[str, Any]:
    """One measured step in this process (called by :func:`_child`)."""
    step = argv[0]
    answer: dict[str, Any] = {}
    if step == "generate":
        from fhirtwin.population.generate import write_cohort_ndjson

        write_cohort_ndjson(argv[2], int(argv[1]), seed=SEED, workers=2)
    elif step == "stage":
        from fhirtwin.population.stage import stage_ndjson

        stage_ndjson(argv[1], argv[2])
    elif step == "run":
        from fhirtwin.population.run import run_population
        from fhirtwin.writeback.jws import ENV_KEY_FILE

        os.environ[ENV_KEY_FILE] = argv[4]
        report = run_population(argv[1], argv[2], workers=2, draws=int(argv[3]))
        if report.failed:
            raise RuntimeError("failed partitions")
        simulated = sum(report.patients.values())
        answer = {"statuses": report.patients, "worker_rss_bytes": report.peak_worker_rss_bytes,
                  "worker_cpu_ms_per_patient": 1e3 * report.worker_cpu_seconds / max(simulated, 1)}
    else:
        raise SystemExit(f"unknown step {step}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    answer["peak_rss_bytes"] = max(own, children, answer.get("worker_rss_bytes", 0))
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_step"]:
        print(json.dumps(_step(args_list[1:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--scale", default="", help="two panel sizes for the memory ratio, e.g. 10000,100000")
    args = parser.parse_args(args_list)
    result = measure_offline(args.patients, args.draws)
    if args.scale:
        result.update(measure_scale([int(n) for n in args.scale.split(",")], args.draws))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
