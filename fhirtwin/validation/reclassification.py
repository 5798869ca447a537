"""Added value of each marker: categorical net reclassification across the guideline ASCVD risk categories.

Why: a marker earns its place in the twin only if it moves patients into the right risk category more
often than into the wrong one. On the virtual cohort of :mod:`fhirtwin.validation.events` (whose events come
from a generator that states each marker's TRUE effect in its own code, PM2.5's being null), each
patient's 10-year ASCVD risk is computed twice: by the engine's anchor alone (PREVENT at the recorded
values, the model the engine would choose) and by the same anchor moved by one marker, exactly as the
engine does it (``fhirtwin.sim.modifiers``: point estimates on the coronary and stroke parts of the
cumulative hazard). Both are placed in the 2026 ACC/AHA categories (< 3 %, 3-5 %, 5-10 %, >= 10 %, from
``guidelines.json``); the NRI for events (ASCVD by 10 years) is P(up) - P(down), for non-events
P(down) - P(up), with a patient-level bootstrap 95% interval. NT-proBNP acts on heart failure, which has
no guideline categories: it is judged on total CVD and its one published threshold (7.5 %). Follow-up is
complete to 10 years in the generator, so no censoring weights are needed; a death before the event is a
non-event.

Run: ``python -m fhirtwin.validation.reclassification --n 20000 --seed 1 --out docs/validation`` writes
``reclassification.md`` and ``reclassification.json``. Because the truth is synthetic, the numbers show
that the engine recovers marker effects the generator contains (and adds nothing where it contains
none), not clinical value in real patients.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fhirtwin.sim.equations import prevent_risk
from fhirtwin.sim.guidelines import guideline_parameters
from fhirtwin.sim.hazards import PREVENT_AGE_RANGE, coronary_share, prevent_kwargs, prevent_model_for
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.modifiers import ActiveModifier, active_modifiers, ascvd_risk_with, modifier_table
from fhirtwin.validation.events import EventCohort, generate

MARKERS = ("lipoprotein_a", "hscrp", "coronary_calcium", "physical_activity", "pm25", "nt_probnp")
#: The outcome whose guideline categories judge each marker: ASCVD for the ASCVD markers; NT-proBNP acts on
#: heart failure, which has no guideline categories, so it is judged on total CVD (7.5 % threshold).
OUTCOME = {"nt_probnp": "total_cvd"}
#: What the generator states as each marker's true effect (fhirtwin.validation.events, step 7).
TRUE_EFFECT = {"lipoprotein_a": "HR 1.11 per 50 nmol/L", "hscrp": "1.37 (coronary) / 1.27 (stroke) per three-fold",
               "coronary_calcium": "log-HR 0.2743 per ln(CAC + 1) on the coronary share",
               "physical_activity": "RR 0.83 from 0 to 150 min/week", "pm25": "null (no effect)",
               "nt_probnp": "HF HR 1.95 per ln unit"}
_CATEGORY_KEY = {"ascvd": "ascvd_10y", "total_cvd": "total_cvd_10y"}


@dataclass(frozen=True)
class Reclassification:
    """Categorical NRI of one marker: point estimates and bootstrap 95% intervals, with the counts."""

    marker: str
    outcome: str
    nri: float
    nri_ci: tuple[float, float]
    events: float
    events_ci: tuple[float, float]
    non_events: float
    non_events_ci: tuple[float, float]
    n_events: int
    n_non_events: int
    reclassified: int

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return dict(self.__dict__)


def category_index(risk: np.ndarray, outcome: str = "ascvd") -> np.ndarray:
    """Ordinal guideline category (0 = lowest) of 10-year risks of ``outcome`` (ascvd: 4, total_cvd: 2)."""
    bands = guideline_parameters()["risk_categories"][_CATEGORY_KEY[outcome]]["bands"]
    uppers = [u for u, *_ in bands if u is not None]
    out: np.ndarray = np.searchsorted(np.asarray(uppers, dtype=float), risk, side="right")
    return out


def anchor_risk(patients: list[PatientInputs], outcome: str = "ascvd") -> np.ndarray:
    """PREVENT 10-year risk at the recorded values, one vectorised call per PREVENT model used."""
    out = np.empty(len(patients))
    models = np.array([prevent_model_for(p) for p in patients])
    for model in dict.fromkeys(models.tolist()):
        rows = np.nonzero(models == model)[0]
        kws = [prevent_kwargs(patients[i], model) for i in rows]
        columns = {k: np.array([kw[k] for kw in kws]) for k in kws[0] if k != "model"}
        ages = np.clip([patients[i].age_years for i in rows], *PREVENT_AGE_RANGE)
        out[rows] = prevent_risk(outcome=outcome, horizon_years=10, age_years=ages, model=model, clip=True, **columns)
    return out


def marker_risk(patients: list[PatientInputs], base: dict[str, np.ndarray], marker: str, outcome: str = "ascvd",
                actives: list[tuple[ActiveModifier, ...]] | None = None) -> np.ndarray:
    """The anchor risk of ``outcome`` moved by one marker as the engine moves it (unchanged where it does not act).

    ``base``: anchor risks by outcome (ascvd; for total_cvd also heart_failure and total_cvd). Total CVD
    moves through its ASCVD and HF parts in proportion to their 10-year cumulative hazards, as the engine
    splits the total-CVD hazard. ``actives``: each patient's acting modifiers when already computed.
    """
    share = coronary_share()
    out = base[outcome].copy()
    acting = actives if actives is not None else [active_modifiers(p) for p in patients]
    for i, modifiers in enumerate(acting):
        for m in modifiers:
            if m.name != marker:
                continue
            ascvd = base["ascvd"][i]
            new_ascvd = ascvd_risk_with(float(ascvd), float(np.exp(m.point_log("coronary"))),
                                        float(np.exp(m.point_log("stroke"))), share)
            if outcome == "ascvd":
                out[i] = new_ascvd
                continue
            h_ascvd, h_hf = -np.log1p(-ascvd), -np.log1p(-base["heart_failure"][i])
            a = h_ascvd / (h_ascvd + h_hf)
            m_ascvd = np.log1p(-new_ascvd) / np.log1p(-ascvd)
            m_total = a * m_ascvd + (1 - a) * np.exp(m.point_log("heart_failure"))
            out[i] = 1 - (1 - base["total_cvd"][i]) ** m_total
    return out


def _nri_parts(up: np.ndarray, down: np.ndarray, event: np.ndarray) -> np.ndarray:
    """(events part, non-events part) per bootstrap row; arrays (B, n) of 0/1, ``event`` (B, n)."""
    n_event = event.sum(axis=-1)
    n_non = event.shape[-1] - n_event
    e = ((up - down) * event).sum(axis=-1) / np.maximum(n_event, 1)
    ne = ((down - up) * (1 - event)).sum(axis=-1) / np.maximum(n_non, 1)
    out: np.ndarray = np.stack([e, ne], axis=-1)
    return out


def nri(old: np.ndarray, new: np.ndarray, event: np.ndarray, bootstrap: int, seed: int, marker: str = "",
        outcome: str = "ascvd") -> Reclassification:
    """Categorical NRI of ``new`` over ``old`` risks for binary ``event``, with a percentile bootstrap."""
    c_old, c_new = category_index(old, outcome), category_index(new, outcome)
    up, down = (c_new > c_old).astype(float), (c_new < c_old).astype(float)
    ev = event.astype(float)
    point = _nri_parts(up[None, :], down[None, :], ev[None, :])[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ev.size, (bootstrap, ev.size))
    parts = _nri_parts(up[idx], down[idx], ev[idx])
    total = parts.sum(axis=1)

    def ci(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(x, [2.5, 97.5])
        return float(lo), float(hi)

    return Reclassification(marker, outcome, float(point.sum()), ci(total), float(point[0]), ci(parts[:, 0]),
                            float(point[1]), ci(parts[:, 1]), int(ev.sum()), int(ev.size - ev.sum()),
                            int((c_new != c_old).sum()))


def reclassification(cohort: EventCohort, bootstrap: int = 1000, seed: int = 0,
                     markers: tuple[str, ...] = MARKERS) -> list[Reclassification]:
    """NRI of the anchor with each marker vs without it, on a cohort generated with ``markers=True``."""
    outcomes = {OUTCOME.get(m, "ascvd") for m in markers}
    needed = {"ascvd"} | ({"heart_failure", "total_cvd"} if "total_cvd" in outcomes else set())
    base = {o: anchor_risk(cohort.inputs, o) for o in sorted(needed)}
    actives = [active_modifiers(p) for p in cohort.inputs]
    out = []
    for k, m in enumerate(markers):
        outcome = OUTCOME.get(m, "ascvd")
        new = marker_risk(cohort.inputs, base, m, outcome, actives)
        out.append(nri(base[outcome], new, cohort.observed[outcome][:, 1], bootstrap, seed + k, m, outcome))
    return out


def report(n: int, seed: int, bootstrap: int) -> dict[str, Any]:
    """Generate the cohort, measure every marker's NRI, and return the JSON report."""
    cohort = generate(n, seed, markers=True)
    rows = reclassification(cohort, bootstrap, seed)
    table = modifier_table()["modifiers"]
    return {
        "cohort": {"generator": "fhirtwin.validation.events.generate(markers=True)", "n": n, "seed": seed,
                   "bootstrap": bootstrap, "outcome": "the event by 10 years (complete follow-up)",
                   "categories": {o: guideline_parameters()["risk_categories"][k]["source"]
                                  for o, k in _CATEGORY_KEY.items()}},
        "markers": [{**r.to_json(), "scale": table[r.marker]["scale"], "true_effect": TRUE_EFFECT[r.marker],
                     "engine_effect_confidence": table[r.marker]["confidence"]} for r in rows],
    }


def _interval(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:+.3f} ({row[key + '_ci'][0]:+.3f}, {row[key + '_ci'][1]:+.3f})"


def render_markdown(data: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    c = data["cohort"]
    lines = [
        "# Net reclassification by marker",
        "",
        f"Virtual cohort `{c['generator']}`, n = {c['n']}, seed {c['seed']}; outcome: {c['outcome']}. "
        "Risk without the marker: PREVENT's 10-year risk at the recorded values (the engine's anchor); with it: "
        "the same moved by the marker as the engine moves it. ASCVD categories < 3 %, 3-5 %, 5-10 %, >= 10 % "
        f"({c['categories']['ascvd']}); total-CVD categories < 7.5 %, >= 7.5 % ({c['categories']['total_cvd']}). "
        f"95% intervals from {c['bootstrap']} patient-level bootstrap samples.",
        "",
        "Generated by `python -m fhirtwin.validation.reclassification`. The truth is synthetic: these numbers "
        "show that the engine recovers effects the generator contains, not clinical value in real patients.",
        "",
        "| marker | scale | outcome | true effect in the generator | NRI (95% CI) | events part (95% CI) | "
        "non-events part (95% CI) | events / non-events | reclassified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["markers"]:
        lines.append(f"| {r['marker']} | {r['scale']} | {r['outcome']} | {r['true_effect']} | {_interval(r, 'nri')} | "
                     f"{_interval(r, 'events')} | {_interval(r, 'non_events')} | {r['n_events']} / "
                     f"{r['n_non_events']} | {r['reclassified']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: write reclassification.md and .json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("docs/validation"))
    args = parser.parse_args(argv)
    data = report(args.n, args.seed, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reclassification.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (args.out / "reclassification.md").write_text(render_markdown(data), encoding="utf-8")
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
