"""The engine entry point: ``sequence(state or inputs) -> SequencePlan``, the exact optimal yearly sequence.

Why a plan of timed steps: the planner answers "which therapies, started now"; a clinician also asks "in
which order, and is any of it better started later or stopped". The plan is the exact optimum of the
patient's decision process (``process``), read along the path where the patient keeps smoking (a smoker's
quit attempts succeed or not; where success changes a later step, the plan says so), with its expected
net benefit and the 90 % interval over the engine's draws, and the same numbers for the comparators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from fhirtwin.sequencing.mdp import FiniteMDP, evaluate, solve
from fhirtwin.sequencing.policies import FIXED_POLICIES
from fhirtwin.sequencing.process import HORIZON_YEARS, TherapyProcess, TherapySet, build_process, sequencing_weights
from fhirtwin.sim.ensemble import summarise
from fhirtwin.sim.inputs import PatientInputs, inputs_from_state
from fhirtwin.sim.interventions import Intervention
from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.sim.scope import EGFR_KIDNEY_FAILURE, IN_SCOPE, KIDNEY_FAILURE, decide_scope

if TYPE_CHECKING:
    from fhirtwin.twin import TwinState

MAX_DRAWS = 2000
MAX_YEARS = 20


class SequencingError(ValueError):
    """A sequence cannot be computed for this request; ``code`` says why (a scope code or ``bad-request``)."""

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Step:
    """One timed change: in ``year`` (0 = now), ``verb`` (start, intensify, add, stop, quit-attempt) ``kind``."""

    year: int
    verb: str
    kind: str
    label: str
    intensity: str | None = None
    agent: str | None = None
    dose_mg: float | None = None
    condition: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass(frozen=True, eq=False)
class SequencePlan:
    """The optimal yearly sequence and what it is expected to gain.

    ``net_benefit`` and ``events_prevented``: ``expected`` (the decision process's value), ``median``,
    ``p05``, ``p95`` over the draws, in events-prevented-equivalents per patient over the horizon (versus
    current care). ``comparators``: the same for the fixed policies (``policies.FIXED_POLICIES``).
    ``path``: the therapy set in each year while the patient keeps smoking (or never smoked).
    """

    patient_id: str
    model: str
    model_version: str
    sources: tuple[str, ...]
    horizon_years: int
    draws: int
    seed: int
    steps: tuple[Step, ...]
    path: tuple[TherapySet, ...]
    net_benefit: dict[str, float]
    events_prevented: dict[str, float]
    comparators: dict[str, dict[str, float]]
    notes: tuple[str, ...] = ()
    scope: str = IN_SCOPE
    #: The optional model components the engine ran with (``fhirtwin.sim.components``), sorted.
    components: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain dict summary."""
        return {
            "patient_id": self.patient_id,
            "horizon_years": self.horizon_years,
            "draws": self.draws,
            "seed": self.seed,
            "steps": [s.to_json() for s in self.steps],
            "path": [t.label() for t in self.path],
            "net_benefit": self.net_benefit,
            "events_prevented": self.events_prevented,
            "comparators": self.comparators,
            "notes": list(self.notes),
            "scope": self.scope,
            "components": list(self.components),
        }


def _inputs(data: TwinState | PatientInputs, as_of: date | datetime | None) -> tuple[PatientInputs, str]:
    if isinstance(data, PatientInputs):
        inputs, scope = data, IN_SCOPE
    else:
        decision = decide_scope(data, as_of)
        if not decision.in_scope:
            raise SequencingError("out of scope for a primary-prevention sequence", decision.code)
        inputs, scope = inputs_from_state(data, as_of), decision.code
    if not 30 <= inputs.age_years <= 79:
        raise SequencingError("age outside 30-79 years: the anchoring equations do not apply", "scope-age")
    if inputs.egfr_ml_min_1_73m2 < EGFR_KIDNEY_FAILURE:
        raise SequencingError("eGFR below 15: kidney failure is out of scope", KIDNEY_FAILURE)
    return inputs, scope


def _summary(expected: float, per_draw: np.ndarray) -> dict[str, float]:
    return {"expected": float(expected), **{k: float(v) for k, v in summarise(per_draw).items()}}


def evaluate_policy(process: TherapyProcess, policy: np.ndarray, mdp: FiniteMDP | None = None) -> dict[str, float]:
    """Net benefit versus current care: the decision process's value and its distribution over the draws."""
    mdp = mdp or process.mdp()
    base = FIXED_POLICIES["current care"](process)
    expected = evaluate(mdp, policy)[0, process.start] - evaluate(mdp, base)[0, process.start]
    return _summary(expected, process.draw_values(policy) - process.draw_values(base))


def _steps(process: TherapyProcess, path: list[TherapySet], attempts: list[bool]) -> list[Step]:
    options = process.options
    steps: list[Step] = []
    before = TherapySet()
    for year, (after, attempt) in enumerate(zip(path, attempts, strict=True)):
        if after.statin != before.statin:
            if after.statin is None:
                steps.append(Step(year, "stop", "statin", "Stop the statin started by this plan"))
            else:
                choice: Intervention = options.statins[after.statin]
                verb, label = "start", choice.label
                if after.statin_level < before.statin_level:
                    verb, label = "reduce", f"Reduce to {choice.intensity}-intensity statin ({choice.agent} " \
                                            f"{choice.dose_mg:g} mg)"
                elif before.statin is not None or process.inputs.on_statin:
                    verb = "intensify"
                steps.append(Step(year, verb, "statin", label, choice.intensity, choice.agent, choice.dose_mg))
        if after.bp_drugs > before.bp_drugs:
            for n in range(before.bp_drugs + 1, after.bp_drugs + 1):
                label = "Add one standard-dose antihypertensive" + (" (a second class)" if n == 2 else "")
                steps.append(Step(year, "add", "bp_lowering", label))
        elif after.bp_drugs < before.bp_drugs:
            steps.append(Step(year, "stop", "bp_lowering", "Stop one antihypertensive added by this plan"))
        if after.sglt2i != before.sglt2i:
            steps.append(Step(year, "start" if after.sglt2i else "stop", "sglt2i",
                              "Start SGLT2 inhibitor (kidney protection)" if after.sglt2i
                              else "Stop the SGLT2 inhibitor started by this plan"))
        if attempt:
            steps.append(Step(year, "quit-attempt", "smoking_cessation", "Supported quit attempt",
                              condition="" if year == 0 else "if still smoking"))
        before = after
    return steps


def sequence(
    data: TwinState | PatientInputs,
    *,
    draws: int = 200,
    seed: int = 0,
    horizon_years: int = HORIZON_YEARS,
    as_of: date | datetime | None = None,
    components: Iterable[str] | None = None,
) -> SequencePlan:
    """The exact optimal yearly treatment sequence for one patient (TwinState or PatientInputs).

    Raises :class:`SequencingError` for a patient out of scope or a bad argument, and
    :class:`fhirtwin.sim.InsufficientData` when the twin lacks what the engine needs.
    """
    if not isinstance(draws, int) or not 1 <= draws <= MAX_DRAWS:
        raise SequencingError(f"draws must be an integer between 1 and {MAX_DRAWS}")
    if not isinstance(horizon_years, int) or not 1 <= horizon_years <= MAX_YEARS:
        raise SequencingError(f"horizon_years must be an integer between 1 and {MAX_YEARS}")
    if not isinstance(seed, int) or seed < 0:
        raise SequencingError("seed must be a non-negative integer")
    inputs, scope = _inputs(data, as_of)
    process = build_process(inputs, draws=draws, seed=seed, years=horizon_years, components=components)
    mdp = process.mdp()
    solution = solve(mdp)
    net = evaluate_policy(process, solution.policy, mdp)
    # the weighted events prevented alone: the same process with every cost set to zero
    prevented = evaluate_policy(dataclasses.replace(process, cost=np.zeros_like(process.cost)), solution.policy)
    comparators = {name: evaluate_policy(process, make(process), mdp)
                   for name, make in FIXED_POLICIES.items() if name != "current care"}

    state, path, attempts = process.start, [], []
    for year in range(process.years):
        action = process.action(int(solution.policy[year, state]))
        path.append(action.therapy)
        attempts.append(action.quit_attempt)
        state = process.state_index(action.therapy, 0)
    notes = [f"Burden, monitoring and quit-attempt weights are assumptions ({_weights_note()}); drug harms are "
             "the planner's trial-measured harms with its harm weights."]
    notes += _after_quit(process, solution.policy, path)
    model = MechanisticTwin(components=components)  # not fitted: names the model and the components it runs with
    return SequencePlan(inputs.patient_id, model.name, model.version, inputs.sources, horizon_years, draws, seed,
                        tuple(_steps(process, path, attempts)), tuple(path), net, prevented, comparators,
                        tuple(notes), scope, tuple(sorted(model.components)))


def _weights_note() -> str:
    weights = sequencing_weights()
    return "; ".join(f"{name} {spec['value']:g}" for name, spec in weights.items()
                     if isinstance(spec, dict) and "value" in spec) + " events-prevented-equivalents"


def _after_quit(process: TherapyProcess, policy: np.ndarray, path: list[TherapySet]) -> list[str]:
    """Where a successful quit attempt changes a later step of the plan, say how."""
    if not process.options.smoker:
        return []
    notes = []
    for quit_year in range(process.years - 1):
        state = process.state_index(path[quit_year], quit_year + 1)
        changed = []
        for year in range(quit_year + 1, process.years):
            action = process.action(int(policy[year, state]))
            if action.therapy != path[year]:
                changed.append(f"year {year}: {action.therapy.label()}")
            state = process.state_index(action.therapy, quit_year + 1)
        if changed:
            notes.append(f"If the quit attempt of year {quit_year} succeeds: " + "; ".join(changed[:3]))
    return notes
