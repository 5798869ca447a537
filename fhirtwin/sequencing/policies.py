"""Fixed comparator policies: current care, everything eligible now, and the guideline sequence.

Why these: "all eligible therapies now" is what a maximal what-if does, and the guideline sequence is what
``fhirtwin.sim.guidelines`` indicates at the patient's published risk, titrated to the guideline targets
(SBP < 130 mmHg: add a second antihypertensive; LDL-C above the goal on a moderate-intensity statin:
intensify), either started at once or one step a year in guideline order (statin, blood pressure, SGLT2
inhibitor). A smoker is offered a supported quit attempt every year while smoking (USPSTF 2021). Each is a
table (year, state) -> action over the whole state space, so it is evaluated exactly like any policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fhirtwin.sequencing.process import STATIN_ORDER, Action, TherapyProcess, TherapySet
from fhirtwin.sim.guidelines import INDICATED, guideline_parameters, indications, statin_ldl_goal

Rule = Callable[[int, TherapySet, int], Action]


def table(process: TherapyProcess, rule: Rule) -> np.ndarray:
    """The (years, states) action table of a rule (year, therapy set, smoking state) -> action."""
    out = np.empty((process.years, process.n_states), dtype=int)
    for year in range(process.years):
        for s in range(process.n_states):
            therapy, smoking = process.state(s)
            action = rule(year, therapy, smoking)
            out[year, s] = process.action_index(dataclasses.replace(
                action, quit_attempt=action.quit_attempt and smoking == 0 and process.options.smoker))
    return out


def current_care(process: TherapyProcess) -> np.ndarray:
    """Keep whatever set the state has, never attempt (the baseline of every net benefit)."""
    return np.tile(process.hold, (process.years, 1))


def all_now(process: TherapyProcess) -> np.ndarray:
    """Every eligible therapy at its most intensive level from year 0, quit attempts every year."""
    options = process.options
    strongest = max((s for s in process.sets), key=lambda t: (t.statin_level, t.bp_drugs, t.sglt2i))
    return table(process, lambda year, therapy, smoking: Action(strongest, options.smoker))


def _indicated_start(process: TherapyProcess) -> TherapySet:
    """What the guideline indicates now, within what the patient may take."""
    options = process.options
    found = indications(process.inputs, process.published, statin_room="high" in options.statins)
    statin = found["statin"]
    intensity = None
    if statin.status == INDICATED:
        allowed = [s for s in STATIN_ORDER[1:] if s in statin.intensities and s in options.statins]
        intensity = allowed[0] if allowed else None
    bp = 1 if found["bp_lowering"].status == INDICATED and options.bp is not None else 0
    sglt2 = found["sglt2i"].status == INDICATED and options.sglt2i is not None
    return TherapySet(intensity, bp, sglt2)


def _titrated(process: TherapyProcess, year: int, therapy: TherapySet) -> TherapySet:
    """One guideline titration step where the expected course under the set misses a target, else the set."""
    target = float(guideline_parameters()["blood_pressure"]["target_sbp_mm_hg"])
    index = process.sets.index(therapy)
    if 0 < therapy.bp_drugs < 2 and process.sbp[index, year] >= target:
        return dataclasses.replace(therapy, bp_drugs=therapy.bp_drugs + 1)
    goal = statin_ldl_goal(process.published)
    if therapy.statin == "moderate" and "high" in process.options.statins and goal is not None \
            and process.ldl[index, year] >= goal:
        return dataclasses.replace(therapy, statin="high")
    return therapy


def _union(a: TherapySet, b: TherapySet) -> TherapySet:
    return TherapySet(STATIN_ORDER[max(a.statin_level, b.statin_level)], max(a.bp_drugs, b.bp_drugs),
                      a.sglt2i or b.sglt2i)


def guideline_at_once(process: TherapyProcess) -> np.ndarray:
    """Everything indicated started in year 0, then titrated to the guideline targets year by year."""
    start = _indicated_start(process)
    smoker = process.options.smoker

    def rule(year: int, therapy: TherapySet, smoking: int) -> Action:
        wanted = _union(therapy, start)
        return Action(wanted if wanted != therapy else _titrated(process, year, therapy), smoker)

    return table(process, rule)


def guideline_stepwise(process: TherapyProcess) -> np.ndarray:
    """The indicated therapies one a year in guideline order (statin, blood pressure, SGLT2i), then titration."""
    start = _indicated_start(process)
    smoker = process.options.smoker

    def rule(year: int, therapy: TherapySet, smoking: int) -> Action:
        if start.statin_level > therapy.statin_level:
            return Action(dataclasses.replace(therapy, statin=start.statin), smoker)
        if start.bp_drugs > therapy.bp_drugs:
            return Action(dataclasses.replace(therapy, bp_drugs=start.bp_drugs), smoker)
        if start.sglt2i and not therapy.sglt2i:
            return Action(dataclasses.replace(therapy, sglt2i=True), smoker)
        return Action(_titrated(process, year, therapy), smoker)

    return table(process, rule)


#: The comparators by name (the benchmark and the plan report them).
FIXED_POLICIES: dict[str, Callable[[TherapyProcess], np.ndarray]] = {
    "current care": current_care,
    "all eligible now": all_now,
    "guideline at once": guideline_at_once,
    "guideline stepwise": guideline_stepwise,
}
