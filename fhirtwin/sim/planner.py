"""Rank candidate interventions by paired absolute risk reduction, with NNT and 90% intervals.

Why paired: every scenario runs on the same ensemble draws (same seed), so the per-draw difference
baseline - scenario removes the shared uncertainty and its interval reflects only what the intervention
changes. NNT = 1/ARR is reported only when the whole 90% interval of ARR is above zero; otherwise the
interval of NNT would pass through infinity (Altman, BMJ 1998;317:1309) and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fhirtwin.sim.ensemble import summarise
from fhirtwin.sim.interventions import BASELINE, Exclusion, Scenario, candidate_interventions, combinations
from fhirtwin.sim.model import Forecast, TwinModel


@dataclass(frozen=True)
class Option:
    """One scenario's effect on the ranking outcome at the horizon, versus baseline."""

    scenario: Scenario
    outcome: str
    risk: dict[str, float]
    arr: dict[str, float]
    nnt: float | None
    nnt_interval: tuple[float, float] | None
    nnt_note: str
    arr_by_outcome: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain dict (for the CarePlan)."""
        return {
            "scenario": self.scenario.to_json(),
            "outcome": self.outcome,
            "risk": self.risk,
            "arr": self.arr,
            "nnt": self.nnt,
            "nnt_interval": list(self.nnt_interval) if self.nnt_interval else None,
            "nnt_note": self.nnt_note,
            "arr_by_outcome": self.arr_by_outcome,
        }


@dataclass(frozen=True, eq=False)
class Plan:
    """Baseline forecast, ranked options, exclusions with reasons and pharmacogenomic notes."""

    outcome: str
    horizon_years: float
    baseline: Forecast
    options: tuple[Option, ...]
    forecasts: dict[str, Forecast]
    excluded: tuple[Exclusion, ...]
    notes: tuple[str, ...]
    #: The scope decision the plan was made under (fhirtwin.sim.scope; only in-scope patients get a plan).
    scope: str = "scope-primary-prevention"

    def to_json(self) -> dict[str, Any]:
        """Plain dict summary."""
        return {
            "outcome": self.outcome,
            "horizon_years": self.horizon_years,
            "baseline": self.baseline.at_horizon(self.outcome),
            "options": [o.to_json() for o in self.options],
            "excluded": [e.to_json() for e in self.excluded],
            "notes": list(self.notes),
        }


def compare(baseline: Forecast, other: Forecast, outcome: str) -> Option:
    """Paired ARR (baseline - scenario, per draw) and NNT at the horizon."""
    if baseline.seed != other.seed or baseline.draws != other.draws:
        raise ValueError("scenarios must share seed and draws to be compared draw by draw")
    month = int(round(12 * baseline.horizon_years))
    diff = baseline.cif[outcome][:, month] - other.cif[outcome][:, month]
    arr = {k: float(v) for k, v in summarise(diff).items()}
    risk = other.at_horizon(outcome)
    if arr["median"] <= 0:
        nnt, interval, note = None, None, "undefined: no absolute risk reduction (ARR <= 0)"
    elif arr["p05"] <= 0:
        nnt, interval = 1.0 / arr["median"], None
        note = "90% interval of ARR includes no benefit: NNT interval unbounded (benefit not certain)"
    else:
        nnt, interval = 1.0 / arr["median"], (1.0 / arr["p95"], 1.0 / arr["p05"])
        note = "NNT = 1/ARR over the horizon"
    by_outcome = {
        o: float(np.median(baseline.cif[o][:, month] - other.cif[o][:, month])) for o in baseline.outcomes
    }
    return Option(other.scenario, outcome, risk, arr, nnt, interval, note, by_outcome)


def plan(
    model: TwinModel,
    *,
    outcome: str = "total_cvd",
    horizon_years: float = 10.0,
    draws: int = 1000,
    seed: int = 0,
    scenarios: list[Scenario] | None = None,
) -> Plan:
    """Baseline vs every eligible intervention and combination, ranked by median ARR (largest first).

    ``model`` must be fitted. Candidate eligibility needs the model's PatientInputs (``inputs_``).
    """
    inputs = getattr(model, "inputs_", None)
    if inputs is None:
        raise ValueError("plan() needs a fitted model with inputs_ (e.g. MechanisticTwin)")
    cands = candidate_interventions(inputs)
    if scenarios is None:
        scenarios = combinations(cands.eligible)
    base = model.simulate(BASELINE, horizon_years, draws, seed)
    if outcome not in base.outcomes:
        raise ValueError(f"unknown outcome {outcome!r}")
    forecasts = {s.name: model.simulate(s, horizon_years, draws, seed) for s in scenarios}
    options = [compare(base, f, outcome) for f in forecasts.values()]
    options.sort(key=lambda o: -o.arr["median"])
    return Plan(outcome, horizon_years, base, tuple(options), forecasts, cands.excluded, cands.notes)

