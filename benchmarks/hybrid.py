"""Benchmark: the hybrid residual on a known-truth cohort, against mechanistic-only and learned-only.

Run: ``python benchmarks/hybrid.py [--patients 2000] [--sizes 40,150,300,0] [--seed 1] [--out DIR]``

A cohort is written as FHIR NDJSON by ``tests/hybrid_generator.py`` (eGFR and SBP slopes depend on PM2.5 and
exercise, which the mechanistic model does not read), staged with ``fhirtwin.population.stage_ndjson``, cut
at 2 and 3 years of history (targets 1, 2 and 3 years later), and split by patient: ``--test-fraction`` of
the patients are held out once; the residuals are fitted on the first n of the other patients for each n of
``--sizes`` (0 = all). Printed per biomarker and n: RMSE, 90% interval coverage and mean width on the held-out
rows for the mechanistic model (its own predictive interval: ensemble draws plus its measurement noise),
learned-only (gradient boosting on the same features, no mechanistic input, split-conformal interval),
hybrid-GBM and hybrid-GNN (shrinkage in brackets), and the GNN's RMSE minus the GBM's with a paired
bootstrap interval over held-out patients. ``--ablation`` adds the same network with no edges between scales
(is it the graph that helps, or the readout?). ``--out`` writes the results as JSON and the largest
GBM and GNN artifacts (with the held-out metrics) as artifact folders.

Not a test: never collected by pytest, and nothing here asserts on wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from hybrid_generator import write_cohort  # noqa: E402

import fhirtwin.hybrid.train as train_module  # noqa: E402
from fhirtwin.hybrid.artifact import ResidualArtifact  # noqa: E402
from fhirtwin.hybrid.data import Dataset, dataset_from_stage  # noqa: E402
from fhirtwin.hybrid.features import SCALES  # noqa: E402
from fhirtwin.hybrid.train import DirectModel, evaluate, fit_residual, hybrid_point, split_patients  # noqa: E402
from fhirtwin.population import stage_ndjson  # noqa: E402
from fhirtwin.sim.components import component_names  # noqa: E402

COLUMNS = ("mechanistic", "learned_only", "hybrid_gbm", "hybrid_gnn", "hybrid_gnn_no_edges")


@contextlib.contextmanager
def no_edges() -> Iterator[None]:
    """Ablation: the same network with an empty scale graph (no message passing between scales)."""
    empty = (np.zeros((len(SCALES), len(SCALES))), "none (ablation)")
    with mock.patch.object(train_module, "scale_adjacency", lambda: empty):
        yield


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["coverage90"] != entry["coverage90"]:  # NaN: no interval (too few calibration patients)
        text = f"{entry['rmse']:.3g} / - / -"
    else:
        text = f"{entry['rmse']:.3g} / {entry['coverage90']:.2f} / {entry['mean_width']:.3g}"
    return text + (f" [{entry['shrinkage']:.2f}]" if "shrinkage" in entry else "")


def gnn_minus_gbm(test: Dataset, fitted: dict[str, ResidualArtifact], seed: int, draws: int = 2000
                  ) -> dict[str, dict[str, float]]:
    """RMSE(hybrid-GNN) - RMSE(hybrid-GBM) on the held-out rows, with a 95% interval from a paired bootstrap
    over held-out patients (rows of one patient are resampled together)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for b, rows in test.rows.items():
        if not len(rows) or b not in fitted["hybrid_gbm"].biomarkers or b not in fitted["hybrid_gnn"].biomarkers:
            continue
        patients, index = np.unique(rows.patient_id.astype(str), return_inverse=True)
        sq = {name: np.bincount(index, (rows.observed - hybrid_point(fitted[name].biomarkers[b], rows)) ** 2)
              for name in ("hybrid_gbm", "hybrid_gnn")}
        count = np.bincount(index).astype(float)
        weights = rng.multinomial(patients.size, np.full(patients.size, 1.0 / patients.size), size=draws)

        w = np.vstack([np.ones(patients.size), weights.astype(float)])  # row 0: the held-out set itself
        diff = np.sqrt((w @ sq["hybrid_gnn"]) / (w @ count)) - np.sqrt((w @ sq["hybrid_gbm"]) / (w @ count))
        boot = diff[1:]
        out[b] = {"difference": float(diff[0]),
                  "low95": float(np.percentile(boot, 2.5)), "high95": float(np.percentile(boot, 97.5))}
    return out


def run(patients: int, sizes: list[int], seed: int, test_fraction: float, draws: int, out: Path | None,
        ablation: bool = False) -> dict[str, Any]:
    """Generate, stage, build rows, fit at each training size, score on the held-out patients."""
    work = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    started = time.monotonic()
    write_cohort(work / "ndjson", patients, seed=seed)
    stage_ndjson(work / "ndjson", work / "staged")
    data = dataset_from_stage(work / "staged", history_years=(2.0, 3.0), draws=draws, seed=seed,
                              source=f"tests/hybrid_generator.py cohort, seed {seed}",
                              components=component_names())
    print(f"rows built from {data.description.n_patients} staged patients in {time.monotonic() - started:.0f} s "
          f"(stage sha256 {data.description.stage_sha256[:12]})", flush=True)
    train_ids, test_ids = split_patients(data.patients(), test_fraction, seed)
    test = data.of_patients(test_ids)
    results: dict[str, Any] = {"description": data.description.to_json(), "held_out_patients": len(test_ids),
                               "by_training_size": {}}
    artifacts: dict[str, ResidualArtifact] = {}
    for size in sizes:
        n = len(train_ids) if size == 0 else min(size, len(train_ids))
        train: Dataset = data.of_patients(train_ids[:n])
        fitted: dict[str, ResidualArtifact] = {}
        for learner in ("gbm", "gnn"):
            t0 = time.monotonic()
            fitted[f"hybrid_{learner}"] = fit_residual(train, learner, seed=seed)  # type: ignore[arg-type]
            print(f"n={n}: {learner} fitted in {time.monotonic() - t0:.0f} s", flush=True)
        if ablation:
            with no_edges():
                fitted["hybrid_gnn_no_edges"] = fit_residual(train, "gnn", seed=seed)
        scores = evaluate(test, fitted, DirectModel.fit(train, seed=seed))
        results["by_training_size"][str(n)] = scores
        artifacts = fitted
        print(f"\nTraining patients n = {n}; held-out patients {len(test_ids)}; cells: RMSE / 90% coverage / "
              "mean interval width [shrinkage]")
        print("| biomarker | " + " | ".join(COLUMNS) + " |")
        print("|---|" + "---|" * len(COLUMNS))
        for biomarker, entry in scores.items():
            if biomarker == "gnn_minus_gbm_rmse":
                continue
            print(f"| {biomarker} | " + " | ".join(_cell(entry.get(c)) for c in COLUMNS) + " |")
        print("90% coverage by subgroup of >= 40 held-out patients (min-max) and flags outside 0.85-0.95:")
        for biomarker, entry in scores.items():
            for model in [c for c in ("mechanistic", *fitted) if isinstance(entry.get(c), dict)]:
                large = [g["coverage90"] for g in entry[model]["subgroups"].values() if g["patients"] >= 40]
                if large:
                    print(f"  {biomarker} {model}: {min(large):.2f}-{max(large):.2f}; flags: "
                          f"{', '.join(entry[model]['flags']) or 'none'}")
        paired = gnn_minus_gbm(test, fitted, seed)
        results["by_training_size"][str(n)]["gnn_minus_gbm_rmse"] = paired
        print("RMSE(hybrid-GNN) - RMSE(hybrid-GBM) [95% paired bootstrap over held-out patients]: " + "; ".join(
            f"{b}: {d['difference']:+.3g} [{d['low95']:+.3g}, {d['high95']:+.3g}]" for b, d in paired.items()))
        print(flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "hybrid-benchmark.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        largest = results["by_training_size"][max(results["by_training_size"], key=int)]
        for name, artifact in artifacts.items():
            if name not in largest[next(iter(largest))]:
                continue
            metrics = {"held_out": {b: {k: e[k] for k in ("rows", "patients", "mechanistic", name)}
                                    for b, e in largest.items() if b != "gnn_minus_gbm_rmse"}}
            saved = ResidualArtifact(artifact.learner, artifact.feature_names, artifact.horizons,
                                     artifact.biomarkers, artifact.training_data, metrics,
                                     settings=artifact.settings).save(out / name)
            print(f"{name}: artifact {saved.version} in {out / name}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--sizes", default="40,150,300,0", help="training sizes (0 = every training patient)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ablation", action="store_true", help="also the GNN without scale-graph edges")
    args = parser.parse_args()
    run(args.patients, [int(s) for s in args.sizes.split(",")], args.seed, args.test_fraction, args.draws, args.out,
        args.ablation)


if __name__ == "__main__":
    main()
