"""Interventions as do() on the twin, and individual counterfactuals by abduction, action and prediction.

Why three steps (Pearl, Causality 2009, ch. 7): a counterfactual for *this* patient must keep what is
specific to them. (1) Abduction: the patient's exogenous terms given their observed history, here the
calibrated posterior of their own level and slope (``fhirtwin.sim.calibration``) plus the engine's other
draws (future innovations, effect sizes), which the history does not inform and which are shared by both
worlds. (2) Action: the variable's path is set inside a time window (graph surgery, ``CausalGraph.do``).
(3) Prediction: the engine's own mechanisms (``hazards.hazard_paths``) run on the modified paths with the
same exogenous draws, so the factual and counterfactual forecasts are paired draw by draw.

What a counterfactual of the PAST means here: the engine's hazards read only the future path (its
deviation from the expected course) and the measured baseline; they have no memory of past exposure. An
action confined to the past (``end_years <= 0``) therefore leaves the forecast unchanged, and the result
says so. Cumulative-exposure evidence (Ference BA et al., Eur Heart J 2017;38:2459: the effect of LDL-C
depends on the absolute change and the cumulative duration of exposure) says a lower past LDL-C would
lower risk now; fhirtwin does not model that memory, and answers a past LDL-C counterfactual as "not
supported by the engine's mechanisms" rather than invent a dose-duration law.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from fhirtwin.sim.dynamics import Trajectories, month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import ParameterDraws, draw_parameters, summarise
from fhirtwin.sim.hazards import after_quit_attempt, cumulative_incidence, hazard_paths
from fhirtwin.sim.interventions import BASELINE, Scenario
from fhirtwin.sim.model import MechanisticTwin, NotFittedError
from fhirtwin.sim.scope import EGFR_KIDNEY_FAILURE
from fhirtwin.twin.variables import registry

#: Trajectory variables the engine lets an action set: their children in the engine are hazards only.
SETTABLE = ("ldl_cholesterol_mg_dl", "systolic_bp_mm_hg", "egfr_ml_min_1_73m2")
PAST_NOTE = ("the action lies (partly) in the past: the engine's hazards have no memory of past exposure, so the "
             "past part changes nothing in the forecast (cumulative exposure, Ference et al. 2017, not modelled)")


class UnsupportedIntervention(ValueError):
    """An action the engine's mechanisms cannot represent (the message says why)."""


@dataclass(frozen=True)
class SetValue:
    """do(variable := value) for times in [start_years, end_years) relative to now (negative = past)."""

    variable: str
    value: float
    start_years: float = 0.0
    end_years: float = math.inf

    def __post_init__(self) -> None:
        if not self.start_years < self.end_years:
            raise UnsupportedIntervention(f"empty window [{self.start_years}, {self.end_years}) for {self.variable}")
        if not math.isfinite(self.value):
            raise UnsupportedIntervention(f"the value set for {self.variable} must be finite")
        if type(self) is SetValue and self.variable == "egfr_ml_min_1_73m2" and self.value < EGFR_KIDNEY_FAILURE:
            raise UnsupportedIntervention(f"an eGFR below {EGFR_KIDNEY_FAILURE:g} is kidney failure, outside the "
                                          "engine's scope")

    def window(self, t: np.ndarray) -> np.ndarray:
        """Boolean mask of the times inside the window."""
        mask: np.ndarray = (t >= self.start_years) & (t < self.end_years)
        return mask

    def apply(self, t: np.ndarray, path: np.ndarray) -> np.ndarray:
        """The path (draws, times) with the value set inside the window."""
        return np.where(self.window(t)[None, :], self.value, path)


@dataclass(frozen=True)
class Shift(SetValue):
    """do(variable := its own value + value) inside the window: 'had LDL-C been 40 mg/dL lower'."""

    def apply(self, t: np.ndarray, path: np.ndarray) -> np.ndarray:
        """The path shifted inside the window (keeps the patient's own course, hence needs abduction)."""
        return np.where(self.window(t)[None, :], path + self.value, path)


Action = SetValue
U = TypeVar("U")
P = TypeVar("P")


@dataclass(frozen=True, eq=False)
class Counterfactual:
    """Factual and counterfactual outcomes (draws, ...) on the same abducted exogenous draws."""

    factual: dict[str, np.ndarray]
    counterfactual: dict[str, np.ndarray]
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = ()

    def difference(self, outcome: str, index: int = -1) -> dict[str, float]:
        """Median and 90% interval of the paired difference counterfactual - factual at a time index."""
        diff = self.counterfactual[outcome][..., index] - self.factual[outcome][..., index]
        return {k: float(v) for k, v in summarise(np.asarray(diff)).items()}


def abduction_action_prediction(
    abduct: Callable[[], U],
    structural: Callable[[U, Sequence[Action]], P],
    predict: Callable[[U, P], dict[str, np.ndarray]],
    actions: Sequence[Action],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The three steps: draw U given the evidence once, then run both worlds on that same U."""
    u = abduct()
    return predict(u, structural(u, ())), predict(u, structural(u, tuple(actions)))


def apply_actions(t: np.ndarray, paths: Mapping[str, np.ndarray], actions: Sequence[Action]) -> dict[str, np.ndarray]:
    """Paths (draws, times) with every action applied in order; a variable without a path is an error, and so
    is an action whose path (its median over the draws, inside the window) leaves the variable's plausible
    range in the twin registry, which rejects such readings: an effect size would otherwise be applied far
    beyond anything a trial measured. The median, because single draws of a long forecast may stray."""
    out = dict(paths)
    known = registry()
    for action in actions:
        if action.variable not in out:
            raise UnsupportedIntervention(f"no path of {action.variable} to set")
        out[action.variable] = action.apply(t, out[action.variable])
        plausible = known[action.variable].plausible if action.variable in known else None
        inside = np.median(out[action.variable][:, action.window(t)], axis=0)
        if plausible is not None and inside.size and not (
                np.all(np.isfinite(inside)) and plausible[0] <= inside.min() and inside.max() <= plausible[1]):
            raise UnsupportedIntervention(
                f"the action takes {action.variable} outside its plausible range {plausible[0]:g}-{plausible[1]:g}")
    return out


@dataclass(frozen=True, eq=False)
class _TwinWorld:
    """The engine as a structural model: exogenous draws, structural paths, hazards."""

    twin: MechanisticTwin
    scenario: Scenario
    t: np.ndarray
    draws: int
    seed: int

    def abduct(self) -> ParameterDraws:
        inputs = self.twin.inputs_
        return draw_parameters(inputs, self.twin.posteriors_, self.draws, self.seed, float(self.t[-1]),
                               uacr_quantiles=self.twin.anchors_.kidney.shape[0])

    def structural(self, u: ParameterDraws, actions: Sequence[Action]) -> Trajectories:
        traj = simulate_trajectories(self.twin.inputs_, self.twin.posteriors_, u, self.scenario, self.t,
                                     dynamic=self.twin.dynamic)
        if not actions:
            return traj
        expected = {v: traj.values[v] - traj.deviation[v] for v in SETTABLE if v in traj.values}
        values = apply_actions(self.t, {v: traj.values[v] for v in expected}, actions)
        deviation = {**traj.deviation, **{v: values[v] - expected[v] for v in expected}}
        egfr = "egfr_ml_min_1_73m2"
        natural = traj.egfr_natural_deviation
        if any(a.variable == egfr for a in actions):  # the set eGFR is the real one (the SGLT2 slope is overridden)
            natural = deviation[egfr]
        return replace(traj, values={**traj.values, **values}, deviation=deviation, egfr_natural_deviation=natural)

    def predict(self, u: ParameterDraws, traj: Trajectories) -> dict[str, np.ndarray]:
        inputs, anchors = self.twin.inputs_, self.twin.anchors_
        hz = hazard_paths(inputs, anchors, traj, u, self.scenario, dynamic=self.twin.dynamic)
        cif = cumulative_incidence(hz, anchors)
        if self.scenario.has("smoking_cessation") is not None and inputs.current_smoker:
            cif = after_quit_attempt(hz, cif, anchors, u, 0.5 * (self.t[1:] + self.t[:-1]))
        return {**cif, **{f"hazard:{o}": h for o, h in hz.items()}, **{f"path:{v}": p for v, p in traj.values.items()}}


def twin_counterfactual(
    twin: MechanisticTwin,
    actions: Sequence[Action],
    *,
    scenario: Scenario = BASELINE,
    horizon_years: float = 10.0,
    draws: int = 500,
    seed: int = 0,
) -> Counterfactual:
    """This patient's forecast with and without the actions, paired draw by draw (same seed = same U).

    ``scenario`` adds treatments (do(on_statin := 1) is the statin intervention); ``actions`` set biomarker
    paths. Outcomes are the engine's CIFs (``ascvd`` ...), ``hazard:<outcome>`` per month and
    ``path:<variable>`` the biomarker paths. Raises :class:`UnsupportedIntervention` for a variable whose
    path the engine cannot set without bypassing a mechanism (HbA1c and BMI feed eGFR and PREVENT).
    """
    if not hasattr(twin, "anchors_"):
        raise NotFittedError("twin_counterfactual needs a fitted twin")
    for action in actions:
        if action.variable not in SETTABLE:
            raise UnsupportedIntervention(
                f"do({action.variable}) is not supported; settable paths: {', '.join(SETTABLE)}")
    t = month_grid(horizon_years)
    world = _TwinWorld(twin, scenario, t, draws, seed)
    factual, counter = abduction_action_prediction(world.abduct, world.structural, world.predict, actions)
    if not all(np.all(np.isfinite(v)) for v in counter.values()):
        raise UnsupportedIntervention("the actions give no finite forecast")
    notes = []
    if any(a.start_years < 0 for a in actions):
        notes.append(PAST_NOTE)
    if any(a.end_years <= 0 for a in actions):
        notes.append("an action confined to the past: the forecast is the factual one")
    notes.append("abduction = the calibrated posterior of each biomarker's level and slope; future innovations "
                 "and effect sizes are shared by both worlds")
    return Counterfactual(factual, counter, tuple(actions), tuple(notes))
