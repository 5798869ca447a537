"""Agreement of the twin with an independent generator's ground truth, on a population of your choice.

    python benchmarks/synthea_report.py --seed 20261127 --population 120 [--json]

Generates (or reuses from the cache) a Synthea population of living adults 40-79, builds every twin as
read from a server (offline: urn:uuid references resolved, as a server stores them), and compares each
concept the engine uses with the truth from Synthea's CSV export (``fhirtwin.sandbox.synthea_truth``):
recall and precision per concept, the scope decisions, and how many in-scope adults with lipids and
SBP got a prediction. Prints a Markdown table (and one JSON line with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import date
from typing import Any

from fhirtwin.engine import Engine, PatientRecord
from fhirtwin.sandbox.synthea import Corpus, generate, patient_records
from fhirtwin.sandbox.synthea_compare import CONCEPTS
from fhirtwin.sandbox.synthea_truth import Truth, ground_truth


def report(corpus: Corpus) -> dict[str, Any]:
    when = date.fromisoformat(corpus.settings.reference_date)
    truth: dict[str, Truth] = ground_truth(corpus.csv_dir)
    engine = Engine(draws=200)
    counts = {name: Counter[str]() for name in CONCEPTS}
    misses: list[tuple[str, str, Any, Any]] = []
    scope: Counter[str] = Counter()
    eligible = predicted = no_kidney_function = 0
    started = time.monotonic()
    for patient_id, resources in patient_records(corpus):
        t = truth.get(patient_id)
        if t is None:
            continue
        state = engine.twin(PatientRecord(patient_id, resources), when)
        for name, (expected_of, got_of) in CONCEPTS.items():
            expected, got = expected_of(t), got_of(state, when)
            positive = expected not in (None, False)
            counts[name][("t" if expected == got else "f") + ("p" if (positive if expected == got else not positive)
                                                              else "n")] += 1
            if expected != got:
                misses.append((patient_id[:8], name, expected, got))
        run = engine.simulate(state)
        scope[run.scope.code if run.scope else "none"] += 1
        if run.scope is not None and run.scope.in_scope and t.has_lipids and t.has_sbp:
            if run.plan is None and any("creatinine" in m for m in run.missing):
                no_kidney_function += 1
            else:
                eligible += 1
                predicted += run.plan is not None
    table = {}
    for name, c in counts.items():
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None
        table[name] = {"positives": c["tp"] + c["fn"], "recall": recall, "precision": precision, **dict(c)}
    return {"seed": corpus.settings.seed, "population": corpus.settings.population, "patients": len(truth),
            "concepts": table, "scope": dict(scope), "in_scope_with_lipids_and_sbp": eligible + no_kidney_function,
            "without_any_kidney_function": no_kidney_function, "eligible": eligible, "predicted": predicted,
            "misses": misses[:50], "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=20261127, help="Synthea seed (default 20261127)")
    parser.add_argument("--population", type=int, default=120, help="living adults 40-79 (default 120)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    corpus = Corpus.open(generate(seed=args.seed, population=args.population))
    out = report(corpus)
    print(f"Synthea seed {out['seed']}, {out['patients']} adults 40-79 ({out['seconds']} s to read and simulate)\n")
    print("| concept | positives | recall | precision |\n|---|---|---|---|")
    for name, row in out["concepts"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {row['positives']} | {fmt(row['recall'])} | {fmt(row['precision'])} |")
    print(f"\nscope decisions: {out['scope']}")
    print(f"in scope with lipids and SBP: {out['in_scope_with_lipids_and_sbp']}; without any creatinine or eGFR in "
          f"the record: {out['without_any_kidney_function']}; predicted {out['predicted']} of {out['eligible']} "
          "with the equations' inputs")
    if out["misses"]:
        print("\nmismatches (patient, concept, truth, twin):")
        for miss in out["misses"]:
            print(f"  {miss}")
    if args.json:
        print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
