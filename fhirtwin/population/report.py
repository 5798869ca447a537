"""The population report of a run: one aggregate Parquet and one self-contained HTML page.

Why: a run's per-patient summaries (:mod:`fhirtwin.population.run`) answer "what about this patient"; a
panel owner asks "how is the risk spread, which groups carry it, what would the proposals prevent, and did
the run go well". The summaries are read partition by partition, one record batch at a time; only small
aggregates are kept (a 0.1 %-wide histogram per outcome and subgroup), so memory does not grow with the
panel. The page holds aggregates only (no patient identifier), every text escaped, and its charts are inline
SVG like :mod:`fhirtwin.report` (no plotting library, no external assets, no script).

Quantiles come from the histogram: the quantile q is the upper edge of the first 0.1 % bin whose cumulative
count reaches q·n, i.e. exact to :data:`BIN_WIDTH` and never below the true value.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fhirtwin.charts import OUTCOME_LABELS
from fhirtwin.population.run import (
    CONSENT_DENIED,
    FAILED,
    INSUFFICIENT,
    LEDGER_FILE,
    OUT_OF_SCOPE,
    PLANNED,
    SUMMARY_OUTCOMES,
)

AGGREGATE_FILE = "population-summary.parquet"
REPORT_FILE = "population-report.html"
#: The horizon whose median risk is reported (the summaries also carry 5 years).
YEARS = 10
#: Width of the histogram bins the quantiles are read from (risk as a fraction).
BIN_WIDTH = 0.001
_BINS = round(1 / BIN_WIDTH)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
STATUSES = (PLANNED, OUT_OF_SCOPE, INSUFFICIENT, CONSENT_DENIED, FAILED)
#: Subgroups the summaries carry, in page order: label -> how a row's value is named.
SUBGROUPS = ("all", "scope", "risk category", "medication flags", "sex", "age band", "diabetes", "CKD stage", "race")
#: Lower bounds of the age bands (years), highest first; below the lowest is "under 30".
AGE_BANDS = ((80, "80+"), (70, "70-79"), (60, "60-69"), (45, "45-59"), (30, "30-44"))
#: KDIGO 2012 GFR categories (mL/min/1.73 m²), lower bounds highest first; G1 and G2 are one group.
CKD_STAGES = ((60.0, "G1-2"), (45.0, "G3a"), (30.0, "G3b"), (15.0, "G4"), (0.0, "G5"))
UNKNOWN = "unknown"
#: A statin component of a proposal that starts one: the planner names it "Start ..." only for a patient not
#: on a statin ("Intensify to ..." otherwise; see :func:`fhirtwin.sim.interventions.choose_statin`).
_STARTS_STATIN = re.compile(r"^Start \w+-intensity statin\b")
_BATCH_ROWS = 8192
_COLUMNS = ["status", "scope", "risk_category_code", "risk_category", "missing", "medication_flags",
            "best_proposal", "best_arr_median", *(f"{o}_{YEARS}y_median" for o in SUMMARY_OUTCOMES)]
#: Summary columns a run written before they existed may lack (read as nulls).
_OPTIONAL_COLUMNS = ["sex", "age_years", "diabetes", "egfr", "race"]


def age_band(age_years: float | None) -> str:
    """The report's age band of an age in years (``unknown`` when null)."""
    if age_years is None or math.isnan(age_years):
        return UNKNOWN
    return next((label for lower, label in AGE_BANDS if age_years >= lower), "under 30")


def ckd_stage(egfr: float | None) -> str:
    """The KDIGO GFR category of an eGFR (``unknown`` when null)."""
    if egfr is None or math.isnan(egfr):
        return UNKNOWN
    return next((label for lower, label in CKD_STAGES if egfr >= lower), "G5")


def _yes_no(value: bool | None) -> str:
    return UNKNOWN if value is None else ("yes" if value else "no")


class PopulationReportError(ValueError):
    """The folder is not a population run with summaries."""


@dataclass
class Distribution:
    """Median risks of one outcome in one subgroup, as a count, a sum and a fine histogram."""

    n: int = 0
    total: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, dtype=np.int64))
    categories: Counter[str] = field(default_factory=Counter)

    def add(self, values: np.ndarray, categories: Sequence[str]) -> None:
        self.n += len(values)
        self.total += float(values.sum())
        bins = np.clip(np.floor(values / BIN_WIDTH).astype(np.int64), 0, _BINS - 1)
        self.counts += np.bincount(bins, minlength=_BINS)
        self.categories.update(categories)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def quantile(self, q: float) -> float:
        """Upper edge of the first bin whose cumulative count reaches q·n (NaN when empty)."""
        if not self.n:
            return math.nan
        index = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return min(index + 1, _BINS) * BIN_WIDTH


@dataclass
class Proposal:
    patients: int = 0
    arr_total: float = 0.0

    @property
    def prevented_per_1000(self) -> float:
        """Expected events prevented per 1,000 such patients: mean absolute risk reduction × 1000."""
        return 1000 * self.arr_total / self.patients if self.patients else math.nan


@dataclass
class PopulationAggregate:
    """Everything the page shows, computed in one streaming pass over a run's summaries."""

    run_id: str
    partitions_read: int = 0
    patients: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    #: (outcome, subgroup, value) -> distribution of the 10-year median risk
    distributions: dict[tuple[str, str, str], Distribution] = field(default_factory=dict)
    proposals: dict[str, Proposal] = field(default_factory=dict)
    missing_inputs: Counter[str] = field(default_factory=Counter)
    #: planned patients whose best proposal starts a statin, by risk category
    statin_gap: Counter[str] = field(default_factory=Counter)
    category_names: dict[str, str] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pa.Table:
        """One row per outcome × subgroup value: n, mean and quantiles, share in each risk category."""
        codes = sorted(self.category_names)
        rows = []
        for (outcome, subgroup, value), dist in sorted(self.distributions.items(), key=_page_order):
            row: dict[str, Any] = {"outcome": outcome, "horizon_years": YEARS, "subgroup": subgroup,
                                   "subgroup_value": value, "n": dist.n, "mean": dist.mean}
            row.update({f"p{round(100 * q):02d}": dist.quantile(q) for q in QUANTILES})
            row.update({f"share_{code}": dist.categories[code] / dist.n if dist.n else math.nan for code in codes})
            rows.append(row)
        schema = pa.schema([("outcome", pa.string()), ("horizon_years", pa.int32()), ("subgroup", pa.string()),
                            ("subgroup_value", pa.string()), ("n", pa.int64()), ("mean", pa.float64()),
                            *((f"p{round(100 * q):02d}", pa.float64()) for q in QUANTILES),
                            *((f"share_{code}", pa.float64()) for code in codes)])
        return pa.Table.from_pylist(rows, schema=schema)


def _page_order(item: tuple[tuple[str, str, str], Distribution]) -> tuple[int, int, str]:
    (outcome, subgroup, value), _ = item
    return SUMMARY_OUTCOMES.index(outcome), SUBGROUPS.index(subgroup), value


def summary_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's partition summaries (final names only: a file being written has a temporary name)."""
    folder = Path(run_dir) / "summaries"
    files = sorted(p for p in folder.glob("*.parquet") if p.name.endswith(".parquet")) if folder.is_dir() else []
    if not files:
        raise PopulationReportError(f"{Path(run_dir).name} holds no summaries/*.parquet (is it OUT/runs/RUN_ID?)")
    return files


def _batches(files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    for path in files:
        summary = pq.ParquetFile(path)
        present = set(summary.schema_arrow.names)
        columns = _COLUMNS + [c for c in _OPTIONAL_COLUMNS if c in present]
        yield from summary.iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def aggregate_run(run_dir: str | os.PathLike[str]) -> PopulationAggregate:
    """Stream every summary of the run at ``run_dir`` (``OUT/runs/RUN_ID``) into a :class:`PopulationAggregate`."""
    run_path = Path(run_dir)
    files = summary_files(run_path)
    agg = PopulationAggregate(run_path.name, partitions_read=len(files))
    for batch in _batches(files):
        columns = batch.to_pydict()
        for name in _OPTIONAL_COLUMNS:
            columns.setdefault(name, [None] * batch.num_rows)
        agg.patients += batch.num_rows
        agg.statuses.update(columns["status"])
        for status, missing in zip(columns["status"], columns["missing"], strict=True):
            if status == INSUFFICIENT and missing:
                agg.missing_inputs.update(missing)
        codes = [c or "none" for c in columns["risk_category_code"]]
        for code, name in zip(codes, columns["risk_category"], strict=True):
            if code != "none" and name:
                agg.category_names[code] = name
        groups = {"all": ["all"] * batch.num_rows,
                  "scope": [s or "unknown" for s in columns["scope"]],
                  "risk category": codes,
                  "medication flags": ["any" if (f or 0) > 0 else "none" for f in columns["medication_flags"]],
                  "sex": [s or UNKNOWN for s in columns["sex"]],
                  "age band": [age_band(a) for a in columns["age_years"]],
                  "diabetes": [_yes_no(d) for d in columns["diabetes"]],
                  "CKD stage": [ckd_stage(e) for e in columns["egfr"]],
                  "race": [r or "not recorded" for r in columns["race"]]}
        code_array = np.array(codes, dtype=object)
        key_arrays = {subgroup: np.array(keys, dtype=object) for subgroup, keys in groups.items()}
        for outcome in SUMMARY_OUTCOMES:
            values = np.array([math.nan if v is None else v for v in columns[f"{outcome}_{YEARS}y_median"]],
                              dtype=np.float64)
            present = ~np.isnan(values)
            for subgroup, key_array in key_arrays.items():
                for value in set(key_array[present].tolist()):
                    mask = present & (key_array == value)
                    dist = agg.distributions.setdefault((outcome, subgroup, str(value)), Distribution())
                    dist.add(values[mask], [c for c in code_array[mask].tolist() if c != "none"])
        for status, best, arr, code in zip(columns["status"], columns["best_proposal"], columns["best_arr_median"],
                                           codes, strict=True):
            if status != PLANNED or not best:
                continue
            proposal = agg.proposals.setdefault(best, Proposal())
            proposal.patients += 1
            proposal.arr_total += arr or 0.0
            if any(_STARTS_STATIN.match(part.strip()) for part in best.split(" + ")):
                agg.statin_gap[code] += 1
    agg.ledger = ledger_metrics(run_path)
    return agg


def ledger_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's row and partition counts from ``OUT/ledger.sqlite3`` (read-only; empty when absent)."""
    path = run_dir.parent.parent / LEDGER_FILE
    if not path.is_file():
        return {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    try:
        run = db.execute("SELECT model_version, settings, created, finished FROM runs WHERE run_id = ?",
                         (run_dir.name,)).fetchone()
        if run is None:
            return {}
        states = dict(db.execute("SELECT state, COUNT(*) FROM partitions WHERE run_id = ? GROUP BY state",
                                 (run_dir.name,)).fetchall())
        attempts, retried, last_update = db.execute(
            "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(attempts > 1), 0), MAX(updated) FROM partitions "
            "WHERE run_id = ?", (run_dir.name,)).fetchone()
    finally:
        db.close()
    settings = json.loads(run[1])
    end = run[3] or last_update
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(run[2])).total_seconds() if end else None
    return {"model_version": run[0], "fhirtwin_version": settings.get("fhirtwin_version"),
            "draws": settings.get("draws"), "as_of": settings.get("as_of"), "purpose": settings.get("purpose"),
            "created": run[2], "finished": run[3], "seconds": seconds,
            "partitions": sum(states.values()), "partition_states": states,
            "attempts": attempts, "partitions_retried": retried}


# ------------------------------------------------------------------------------------------------ charts

_BLUE, _GREY = "#1f5fa8", "#999"
#: Risk categories from the lowest to the highest risk: green to red.
_CATEGORY_COLOURS = ["#2e8b57", "#f1c40f", "#e67e22", "#c0392b", "#8e2323"]


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
            f"<title>{escape(title)}</title>",
            f'<text x="4" y="15" font-size="13" font-weight="bold">{escape(title)}</text>']


def histogram_svg(dist: Distribution, title: str, *, width: int = 420, height: int = 200) -> str:
    """Share of patients per 2-point risk band (bars), x in percent."""
    step = 20  # fine bins per bar: 2 % bands
    top_bin = int(np.nonzero(dist.counts)[0].max()) if dist.n else 0
    bars = max(5, math.ceil((top_bin + 1) / step))
    coarse = [int(dist.counts[i * step:(i + 1) * step].sum()) for i in range(bars)]
    shares = [c / dist.n if dist.n else 0.0 for c in coarse]
    left, top, bottom = 40, 24, 30
    plot_w, plot_h = width - left - 10, height - top - bottom
    peak = max(shares) or 1.0
    out = _svg_open(width, height, title)
    bar_w = plot_w / bars
    for i, share in enumerate(shares):
        h = plot_h * share / peak
        out.append(f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                   f'height="{h:.1f}" fill="{_BLUE}"><title>{2 * i}–{2 * i + 2} %: {100 * share:.1f} % of '
                   f"patients</title></rect>")
    for i in range(0, bars + 1, max(1, bars // 5)):
        out.append(f'<text x="{left + i * bar_w:.1f}" y="{top + plot_h + 13}" font-size="10" '
                   f'text-anchor="middle">{2 * i}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" font-size="10" text-anchor="middle">'
               f"{YEARS}-year median risk (%)</text>")
    out.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{100 * peak:.0f}%</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{_GREY}"/>')
    out.append("</svg>")
    return "".join(out)


def box_svg(rows: Sequence[tuple[str, Distribution]], title: str, *, width: int = 520) -> str:
    """One row per subgroup: 5–95 % whisker, 25–75 % box, median tick, x in percent."""
    label_w, row_h, top = 190, 22, 24
    height = top + row_h * len(rows) + 24
    plot_w = width - label_w - 16
    hi = max([d.quantile(0.95) for _, d in rows if d.n] + [0.05])
    scale = plot_w / hi

    def x(value: float) -> float:
        return label_w + value * scale

    out = _svg_open(width, height, title)
    for i, (label, dist) in enumerate(rows):
        y = top + i * row_h + row_h / 2
        out.append(f'<text x="{label_w - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f"{escape(label)} (n={dist.n})</text>")
        if not dist.n:
            continue
        p05, p25, p50, p75, p95 = (dist.quantile(q) for q in QUANTILES)
        out.append(f'<line x1="{x(p05):.1f}" x2="{x(p95):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{_GREY}"/>')
        out.append(f'<rect x="{x(p25):.1f}" y="{y - 6:.1f}" width="{max(x(p75) - x(p25), 1):.1f}" height="12" '
                   f'fill="{_BLUE}" fill-opacity="0.35" stroke="{_BLUE}"/>')
        out.append(f'<line x1="{x(p50):.1f}" x2="{x(p50):.1f}" y1="{y - 7:.1f}" y2="{y + 7:.1f}" stroke="{_BLUE}" '
                   'stroke-width="2"/>')
    axis_y = top + row_h * len(rows) + 12
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25) if hi / s <= 6)
    for i in range(int(hi / step + 1e-9) + 1):
        out.append(f'<text x="{x(i * step):.1f}" y="{axis_y}" font-size="10" text-anchor="middle">'
                   f"{100 * i * step:g}%</text>")
    out.append("</svg>")
    return "".join(out)


def stacked_svg(rows: Sequence[tuple[str, Counter[str], int]], codes: Sequence[str], names: dict[str, str],
                title: str, *, width: int = 520) -> str:
    """One 100 % bar per subgroup split by risk category."""
    label_w, row_h, top = 190, 22, 24
    height = top + row_h * len(rows) + 14 * (len(codes) + 1)
    plot_w = width - label_w - 16
    ramp = _CATEGORY_COLOURS if len(codes) > 2 else [_CATEGORY_COLOURS[0], _CATEGORY_COLOURS[3]]
    colours = {code: ramp[min(i, len(ramp) - 1)] for i, code in enumerate(codes)}
    out = _svg_open(width, height, title)
    for i, (label, counts, n) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" font-size="10" text-anchor="end">{escape(label)}</text>')
        start = float(label_w)
        for code in codes:
            share = counts[code] / n if n else 0.0
            out.append(f'<rect x="{start:.1f}" y="{y + 4}" width="{plot_w * share:.1f}" height="14" '
                       f'fill="{colours[code]}"><title>{escape(names.get(code, code))}: {100 * share:.1f} %</title>'
                       "</rect>")
            start += plot_w * share
    legend_y = top + row_h * len(rows) + 10
    for j, code in enumerate(codes):
        out.append(f'<rect x="{label_w}" y="{legend_y + 14 * j - 8}" width="10" height="10" fill="{colours[code]}"/>'
                   f'<text x="{label_w + 14}" y="{legend_y + 14 * j + 1}" font-size="10">'
                   f"{escape(names.get(code, code))}</text>")
    out.append("</svg>")
    return "".join(out)


def bar_svg(rows: Sequence[tuple[str, float, str]], title: str, *, width: int = 720) -> str:
    """Horizontal bars with their value and a note at the end (long labels cut with an ellipsis)."""
    label_w, row_h, top = 330, 20, 24
    height = top + row_h * len(rows) + 8
    plot_w = width - label_w - 60
    peak = max([v for _, v, _ in rows if not math.isnan(v)] + [1e-9])
    out = _svg_open(width, height, title)
    for i, (label, value, note) in enumerate(rows):
        y = top + i * row_h
        short = label if len(label) <= 55 else label[:54] + "…"
        w = plot_w * (value / peak if not math.isnan(value) else 0.0)
        out.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="10" text-anchor="end">{escape(short)}'
                   f"<title>{escape(label)}</title></text>")
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(w, 0.0):.1f}" height="14" fill="{_BLUE}"/>')
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="10">{value:.1f} '
                   f"{escape(note)}</text>")
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------ page


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}%"


def _label(outcome: str) -> str:
    return OUTCOME_LABELS.get(outcome, outcome.replace("_", " ").capitalize())


def _outcome_section(agg: PopulationAggregate, outcome: str) -> str:
    mine = {(s, v): d for (o, s, v), d in agg.distributions.items() if o == outcome}
    overall = mine.get(("all", "all"))
    if overall is None:
        return (f"<section id='outcome-{escape(outcome)}'><h2>{escape(_label(outcome))}</h2>"
                "<p>No patient with a simulated risk.</p></section>")
    plots = [histogram_svg(overall, f"{_label(outcome)}: all simulated patients")]
    for subgroup in SUBGROUPS[1:]:
        rows = sorted((v, d) for (s, v), d in mine.items() if s == subgroup)
        if rows:
            plots.append(box_svg(rows, f"{_label(outcome)} by {subgroup}"))
    header = "".join(f"<th>p{round(100 * q):02d}</th>" for q in QUANTILES)
    table = "".join(
        f"<tr><td>{escape(s)}</td><td>{escape(v)}</td><td>{d.n}</td><td>{_pct(d.mean)}</td>"
        + "".join(f"<td>{_pct(d.quantile(q))}</td>" for q in QUANTILES) + "</tr>"
        for (s, v), d in sorted(mine.items(), key=lambda kv: (SUBGROUPS.index(kv[0][0]), kv[0][1])))
    return (f"<section id='outcome-{escape(outcome)}'><h2>{escape(_label(outcome))}: {YEARS}-year median risk</h2>"
            f"<div class='plots'>{''.join(plots)}</div>"
            f"<table><tr><th>subgroup</th><th>value</th><th>n</th><th>mean</th>{header}</tr>{table}</table>"
            "</section>")


def _categories_by_risk(agg: PopulationAggregate) -> list[str]:
    """Category codes from the lowest mean risk to the highest (their order on the page and in colour)."""
    outcome = next((o for o in SUMMARY_OUTCOMES if (o, "all", "all") in agg.distributions), SUMMARY_OUTCOMES[0])

    def mean(code: str) -> float:
        dist = agg.distributions.get((outcome, "risk category", code))
        return dist.mean if dist is not None and dist.n else math.inf

    return sorted(agg.category_names, key=lambda code: (mean(code), code))


def _categories_section(agg: PopulationAggregate) -> str:
    codes = _categories_by_risk(agg)
    if not codes:
        return "<section id='categories'><h2>Risk categories</h2><p>No patient has a risk category.</p></section>"
    outcome = next((o for o in SUMMARY_OUTCOMES if (o, "all", "all") in agg.distributions), SUMMARY_OUTCOMES[0])
    rows = [(f"{s}: {v}" if s != "all" else "all", d.categories, d.n)
            for (o, s, v), d in sorted(agg.distributions.items(), key=_page_order)
            if o == outcome and s not in ("risk category",)]
    table = "".join(f"<tr><td>{escape(label)}</td><td>{n}</td>"
                    + "".join(f"<td>{_pct(counts[c] / n if n else math.nan)}</td>" for c in codes) + "</tr>"
                    for label, counts, n in rows)
    header = "".join(f"<th>{escape(agg.category_names[c])}</th>" for c in codes)
    return ("<section id='categories'><h2>Risk categories</h2><p>The guideline category of each planned patient's "
            "risk (the run's outcome and horizon), as shares of each subgroup.</p>"
            + stacked_svg(rows, codes, agg.category_names, "Risk category by subgroup")
            + f"<table><tr><th>subgroup</th><th>n</th>{header}</tr>{table}</table></section>")


def _proposals_section(agg: PopulationAggregate, top: int = 15) -> str:
    ranked = sorted(agg.proposals.items(), key=lambda kv: (-kv[1].patients, kv[0]))[:top]
    gap = sum(agg.statin_gap.values())
    gap_rows = "".join(f"<li>{escape(agg.category_names.get(code, code))}: {n}</li>"
                       for code, n in sorted(agg.statin_gap.items()))
    care_gap = (f"<h3>Care gap: not on a statin, statin proposed</h3><p>{gap} planned patient(s) whose best "
                "proposal starts a statin (the planner says “Start” only for a patient on no statin)"
                + (f", by risk category:</p><ul>{gap_rows}</ul>" if gap_rows else ".</p>"))
    if not ranked:
        return f"<section id='proposals'><h2>Proposals</h2><p>No proposal.</p>{care_gap}</section>"
    table = "".join(f"<tr><td>{escape(name)}</td><td>{p.patients}</td><td>{_pct(p.arr_total / p.patients)}</td>"
                    f"<td>{p.prevented_per_1000:.1f}</td></tr>" for name, p in ranked)
    chart = bar_svg([(name, p.prevented_per_1000, f"(n={p.patients})") for name, p in ranked],
                    "Expected events prevented per 1,000 patients (best proposal)")
    return ("<section id='proposals'><h2>Top proposals</h2><p>Each planned patient's best proposal; events "
            f"prevented per 1,000 = mean absolute risk reduction × 1000 over {YEARS} years.</p>" + chart
            + "<table><tr><th>best proposal</th><th>patients</th><th>mean absolute risk reduction</th>"
            f"<th>events prevented per 1,000</th></tr>{table}</table>{care_gap}</section>")


def _status_section(agg: PopulationAggregate) -> str:
    rows = "".join(f"<tr><td>{escape(s)}</td><td>{agg.statuses.get(s, 0)}</td></tr>"
                   for s in (*STATUSES, *sorted(set(agg.statuses) - set(STATUSES))))
    missing = "".join(f"<tr><td>{escape(item)}</td><td>{n}</td></tr>" for item, n in agg.missing_inputs.most_common())
    return (f"<section id='status'><h2>Patients by status</h2><table><tr><th>status</th><th>patients</th></tr>{rows}"
            f"<tr><th>total</th><th>{agg.patients}</th></tr></table>"
            + ("<h3>Data quality: inputs missing for insufficient-data patients</h3>"
               f"<table><tr><th>input</th><th>patients</th></tr>{missing}</table>" if missing else "")
            + "</section>")


def _metrics_section(agg: PopulationAggregate) -> str:
    led = agg.ledger
    if not led:
        items = [("summaries read", str(agg.partitions_read)), ("ledger", "not found")]
    else:
        states = ", ".join(f"{k} {v}" for k, v in sorted(led["partition_states"].items()))
        items = [("model version", str(led["model_version"])), ("fhirtwin", str(led["fhirtwin_version"])),
                 ("draws per scenario", str(led["draws"])), ("as of", str(led["as_of"])),
                 ("purpose of use", str(led["purpose"])), ("created", str(led["created"])),
                 ("finished", str(led["finished"] or "not finished")),
                 ("elapsed", "–" if led["seconds"] is None else f"{led['seconds']:.0f} s"),
                 ("partitions", f"{led['partitions']} ({states}); summaries read {agg.partitions_read}"),
                 ("attempts", f"{led['attempts']} ({led['partitions_retried']} partition(s) retried)")]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items)
    return f"<section id='metrics'><h2>Run</h2><table>{rows}</table></section>"


def render_html(agg: PopulationAggregate) -> str:
    """The page: run metrics, statuses, one section per outcome, risk categories, proposals (aggregates only)."""
    title = f"fhirtwin population report — run {agg.run_id}"
    body = (_metrics_section(agg) + _status_section(agg)
            + "".join(_outcome_section(agg, o) for o in SUMMARY_OUTCOMES)
            + _categories_section(agg) + _proposals_section(agg))
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "text-align:left}.plots{display:flex;flex-wrap:wrap;gap:8px}"
            "section{border-top:1px solid #ddd;margin-top:1.5em}</style></head><body>"
            f"<h1>{escape(title)}</h1><p>Aggregates over every patient of the run; no patient is named. Risks "
            f"are each patient's ensemble median at {YEARS} years under current care; proposals are for clinician "
            f"review. Quantiles are read from {100 * BIN_WIDTH:g}-percentage-point bins.</p>{body}</body></html>")


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    parquet: Path
    patients: int


def write_population_report(run_dir: str | os.PathLike[str], html_path: str | os.PathLike[str] | None = None,
                            ) -> ReportFiles:
    """Write ``RUN_DIR/population-summary.parquet`` and the HTML page (default ``RUN_DIR/population-report.html``)."""
    run_path = Path(run_dir)
    agg = aggregate_run(run_path)
    parquet = run_path / AGGREGATE_FILE
    pq.write_table(agg.table(), parquet)
    page = Path(html_path) if html_path is not None else run_path / REPORT_FILE
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(agg), encoding="utf-8")
    return ReportFiles(page, parquet, agg.patients)
