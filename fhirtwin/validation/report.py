"""All trial replications in one table (Markdown + JSON) and one forest plot (SVG).

Why an SVG written here: the plot is a few lines and rectangles, and a plotting library would be a
heavy dependency for it. Each row shows the published hazard ratio with its 95 % CI next to the
simulated one with its 90 % interval (log scale), and the control-arm incidence published vs simulated.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from fhirtwin.validation.spec import load_spec
from fhirtwin.validation.trial import TrialResult, replicate

#: The goal the engine is held to (issue text): HR inside the published CI and control incidence within
#: +-30 % of published, for at least 80 % of trials.
CONTROL_TOLERANCE = 0.30


#: Which meta-analyses behind the engine's effect sizes contain which of these trials: their HR checks are not
#: fully independent (the control-arm incidence checks are).
OVERLAP = ("The hazard-ratio checks are not all independent of the engine's effect sizes: CTT 2010 (LDL-C) "
           "includes JUPITER; SMART-C 2022 (SGLT2 inhibitors) includes DAPA-CKD and EMPA-KIDNEY; Ettehad 2016 "
           "(blood pressure) includes ACCORD-BP and, by its search dates, possibly SPRINT. The control-arm "
           "incidence checks use no trial data.\n")


def hit(result: TrialResult) -> bool:
    """Both checks pass: HR inside the published 95 % CI and control incidence within +-30 %."""
    return result.hr_within_published_ci95 and abs(result.control_ratio_to_published - 1) <= CONTROL_TOLERANCE


def run_trials(folder: str | Path, *, n_virtual: int | None = None, draws: int = 100) -> list[TrialResult]:
    """Replicate every ``*.json`` spec in ``folder`` (sorted by file name)."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise ValueError(f"no trial specs (*.json) in {folder}")
    return [replicate(load_spec(p), n_virtual=n_virtual, draws=draws) for p in paths]


def markdown_table(results: Sequence[TrialResult]) -> str:
    """One row per trial, then the share of trials meeting the goal."""
    head = ("| Trial | Outcome | Follow-up (y) | In engine scope | Control published | Control simulated | Ratio "
            "| HR published (95 % CI) | HR simulated (90 % interval) | HR in CI | Both checks |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        lo, hi = r.published["hazard_ratio_ci95"]
        s_lo, s_hi = r.hazard_ratio_interval90
        rows.append(
            f"| {r.name} | {r.outcome} | {r.follow_up_years:g} | {100 * (1 - r.out_of_engine_scope_fraction):.0f} % "
            f"| {100 * r.published['control_cumulative_incidence']:.1f} % "
            f"| {100 * r.control_cumulative_incidence:.1f} % | {r.control_ratio_to_published:.2f} "
            f"| {r.published['hazard_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r.hazard_ratio:.2f} ({s_lo:.2f}-{s_hi:.2f}) "
            f"| {'yes' if r.hr_within_published_ci95 else 'no'} | {'yes' if hit(r) else 'no'} |")
    met = sum(hit(r) for r in results)
    in_scope = [r for r in results if r.out_of_engine_scope_fraction < 0.5]
    return head + "\n".join(rows) + (
        f"\n\n{met} of {len(results)} trials meet both checks (goal: at least 80 %); "
        f"{sum(r.hr_within_published_ci95 for r in results)} have the HR inside the published CI. "
        f"Trials whose virtual cohort is mostly within the engine's scope (primary prevention, ages 30-79): "
        f"{sum(hit(r) for r in in_scope)} of {len(in_scope)} meet both checks, "
        f"{sum(r.hr_within_published_ci95 for r in in_scope)} have the HR inside the CI.\n")


def forest_svg(results: Sequence[TrialResult]) -> str:
    """A forest plot: published HR and 95 % CI (black) and simulated HR and 90 % interval (blue), log scale."""
    width, left, right, row_h, top = 760, 170, 230, 34, 40
    height = top + row_h * len(results) + 40
    lo_hr, hi_hr = 0.3, 1.5
    span = width - left - right

    def x(hr: float) -> float:
        hr = min(max(hr, lo_hr), hi_hr)
        return left + span * (math.log(hr) - math.log(lo_hr)) / (math.log(hi_hr) - math.log(lo_hr))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">',
             f'<text x="{left}" y="18">Hazard ratio (log scale): published 95 % CI (black), simulated 90 % '
             'interval (blue)</text>',
             f'<text x="{width - right + 10}" y="18">Control incidence: published / simulated</text>',
             f'<line x1="{x(1.0):.1f}" y1="{top - 10}" x2="{x(1.0):.1f}" y2="{height - 30}" stroke="#999" '
             'stroke-dasharray="4 3"/>']
    for tick in (0.4, 0.6, 0.8, 1.0, 1.25):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 12}" text-anchor="middle">{tick:g}</text>')
    for i, r in enumerate(results):
        y = top + row_h * i + row_h / 2
        lo, hi = r.published["hazard_ratio_ci95"]
        s_lo, s_hi = r.hazard_ratio_interval90
        parts += [
            f'<text x="8" y="{y + 4:.1f}">{html.escape(r.name)}</text>',
            f'<line x1="{x(lo):.1f}" y1="{y - 5:.1f}" x2="{x(hi):.1f}" y2="{y - 5:.1f}" stroke="black" '
            'stroke-width="2"/>',
            f'<rect x="{x(r.published["hazard_ratio"]) - 4:.1f}" y="{y - 9:.1f}" width="8" height="8" fill="black"/>',
            f'<line x1="{x(s_lo):.1f}" y1="{y + 5:.1f}" x2="{x(s_hi):.1f}" y2="{y + 5:.1f}" stroke="#1f5fbf" '
            'stroke-width="2"/>',
            f'<circle cx="{x(r.hazard_ratio):.1f}" cy="{y + 5:.1f}" r="4" fill="#1f5fbf"/>',
            f'<text x="{width - right + 10}" y="{y + 4:.1f}">{100 * r.published["control_cumulative_incidence"]:.1f} % '
            f'/ {100 * r.control_cumulative_incidence:.1f} % ({r.control_ratio_to_published:.2f}x)</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def subgroup_table(results: Sequence[TrialResult]) -> str:
    """Per trial, the simulated incidence and HR by subgroup, flagged where the HR leaves the trial's CI."""
    parts = []
    for r in results:
        rows = [f"| {g['dimension']} | {g['level']} | {g['n']} | {100 * g['control_cumulative_incidence']:.1f} % "
                f"| {100 * g['treatment_cumulative_incidence']:.1f} % | {g['hazard_ratio']:.2f} "
                f"| {g['flag'] or '-'} |" for g in r.subgroups]
        flagged = sum(bool(g["flag"]) for g in r.subgroups)
        lo, hi = r.published["hazard_ratio_ci95"]
        parts.append(f"### {r.name} (published HR {r.published['hazard_ratio']:.2f}, {lo:.2f}-{hi:.2f}; "
                     f"{flagged} of {len(r.subgroups)} subgroups flagged)\n\n"
                     + "| Dimension | Level | n | Control simulated | Treatment simulated | HR simulated | Flag |\n"
                     + "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def write_report(results: Sequence[TrialResult], out: str | Path) -> dict[str, Path]:
    """Write ``trials.md``, ``trials.json`` and ``trials-forest.svg`` to ``out``; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    notes = "\n".join(f"- **{r.name}**: " + " ".join(f"{part.rstrip('.')}." for part in (r.outcome_note, *r.notes)
                                                   if part) for r in results)
    paths = {"markdown": folder / "trials.md", "json": folder / "trials.json", "svg": folder / "trials-forest.svg"}
    paths["markdown"].write_text(
        "# In-silico trial replications\n\nGenerated by `fhirtwin validate trials`; nothing is tuned per trial. "
        f"Virtual patients per trial: {results[0].n_virtual if results else 0}; ensemble draws: "
        f"{results[0].draws if results else 0}.\n\n" + markdown_table(results) + "\n" + OVERLAP
        + "\n![forest plot](trials-forest.svg)\n\n## Outcome definitions and scope\n\n" + notes + "\n"
        + "\n## Subgroups\n\nSimulated point estimates by subgroup (at least 50 virtual patients). The engine applies "
        "each trial's relative effect uniformly, so subgroup HRs differ only through absolute risk and competing "
        "death; a flag (HR outside the trial's overall 95 % CI) asks for a comparison with the trial's own subgroup "
        "forest plot, which the trial format does not carry.\n\n" + subgroup_table(results),
        encoding="utf-8")
    paths["json"].write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n", encoding="utf-8")
    paths["svg"].write_text(forest_svg(results), encoding="utf-8")
    return paths
