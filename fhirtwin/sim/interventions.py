"""Candidate interventions, their eligibility, pharmacogenomic choices and trial effect sizes.

Why: the planner must only propose what a clinician could actually start for this patient, and say why
it left anything out (the CarePlan shows both). Every effect size comes from ``interventions.json`` with
its 95% CI and citation; the ensemble draws from a log-normal fitted to that CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.inputs import MedicationSafetyInputs, PatientInputs
from fhirtwin.sim.pharmacogenomics import (
    clopidogrel_advice,
    medication_flags,
    safety_inputs,
    statin_flag,
    statin_proposal_problem,
    statin_restriction_note,
)
from fhirtwin.sim.pharmacogenomics import source as pgx_source

KINDS = ("statin", "bp_lowering", "sglt2i", "smoking_cessation", "ezetimibe", "pcsk9_inhibitor", "ldl_lowering")
#: Non-statin LDL-C lowering kinds (added to whatever statin the patient takes).
LDL_ADD_ONS = ("ezetimibe", "pcsk9_inhibitor", "ldl_lowering")


@dataclass(frozen=True)
class Intervention:
    """One change started at time 0 of the simulation.

    ``kind`` is one of ``KINDS``; for statins ``intensity`` is the target intensity and ``agent``/
    ``dose_mg`` the concrete choice after pharmacogenomic rules. ``notes`` carry the reasons for the
    choice (e.g. why simvastatin was avoided). ``ldl_lowering_percent`` and ``sbp_drop_mm_hg`` replace the
    drawn treatment response by a measured one (a trial's mean LDL-C reduction or achieved SBP
    difference), as the in-silico trials do; ``ldl_lowering`` is a non-statin LDL-C drug known only by
    that percent.
    """

    kind: str
    label: str
    intensity: str | None = None
    agent: str | None = None
    dose_mg: float | None = None
    notes: tuple[str, ...] = ()
    ldl_lowering_percent: float | None = None
    sbp_drop_mm_hg: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "statin" and self.intensity not in ("moderate", "high"):
            raise ValueError("a statin intervention needs intensity 'moderate' or 'high'")
        if self.kind == "ldl_lowering" and self.ldl_lowering_percent is None:
            raise ValueError("an ldl_lowering intervention needs its measured ldl_lowering_percent")

    def to_json(self) -> dict[str, Any]:
        """Plain dict (for CarePlan activities and Forecast serialisation)."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, ())}


@dataclass(frozen=True)
class Scenario:
    """A named set of interventions; the empty set is the baseline (current care continued)."""

    name: str = "baseline"
    interventions: tuple[Intervention, ...] = ()

    def has(self, kind: str) -> Intervention | None:
        """The intervention of this kind in the scenario, if any."""
        return next((i for i in self.interventions if i.kind == kind), None)

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {"name": self.name, "interventions": [i.to_json() for i in self.interventions]}


BASELINE = Scenario()


@dataclass(frozen=True)
class Exclusion:
    """A candidate the planner did not propose, and why (for the CarePlan and the clinician)."""

    candidate: str
    reason: str
    source: str = ""

    def to_json(self) -> dict[str, str]:
        """Plain dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Candidates:
    """Eligible interventions plus recorded exclusions and pharmacogenomic notes."""

    eligible: tuple[Intervention, ...] = ()
    excluded: tuple[Exclusion, ...] = ()
    notes: tuple[str, ...] = field(default=())


def choose_statin(inputs: PatientInputs, intensity: str,
                  safety: MedicationSafetyInputs | None = None) -> tuple[Intervention | None, list[Exclusion]]:
    """The first agent and dose of an intensity that CPIC 2022 allows for the patient's phenotypes.

    The limits live in :mod:`fhirtwin.sim.pharmacogenomics` (e.g. SLCO1B1 poor function: not atorvastatin
    40 mg but rosuvastatin 20 mg); every option left out is recorded with its reason. None when no agent of
    that intensity is allowed.
    """
    params = intervention_parameters()
    safety = safety or safety_inputs(inputs)
    excluded: list[Exclusion] = []
    options = []
    for agent, dose in ((str(a), float(d)) for a, d in params["statin_agents"][intensity]):
        problem = statin_proposal_problem(safety, agent, dose)
        if problem is None:
            options.append((agent, dose))
        else:
            excluded.append(Exclusion(f"{agent} {dose:g} mg ({intensity} intensity)", problem,
                                      pgx_source("cpic_statins_2022")))
    if not options:
        return None, excluded
    note = statin_restriction_note(safety)
    agent, dose = options[0]
    verb = "Intensify to" if inputs.on_statin else "Start"
    label = f"{verb} {intensity}-intensity statin ({agent} {dose:g} mg)"
    choice = Intervention("statin", label, intensity=intensity, agent=agent, dose_mg=dose,
                          notes=(note,) if note else ())
    return choice, excluded


def candidate_interventions(inputs: PatientInputs) -> Candidates:
    """Eligible interventions for this patient, with the reason for every candidate left out."""
    params = intervention_parameters()
    eligible: list[Intervention] = []
    excluded: list[Exclusion] = []
    notes: list[str] = []

    # statins
    safety = safety_inputs(inputs)
    current = inputs.statin_intensity if inputs.on_statin else None
    if current == "high":
        excluded.append(Exclusion("start or intensify statin", "already on a high-intensity statin"))
    else:
        targets = ["high"] if current == "moderate" else ["moderate", "high"]
        for intensity in targets:
            choice, pgx = choose_statin(inputs, intensity, safety)
            if choice is not None:
                eligible.append(choice)
            excluded.extend(e for e in pgx if e not in excluded)
    flags = medication_flags(safety)
    notes.extend(flag.text() for flag in flags)
    flagged = statin_flag(safety)
    if current is not None and current in params["statin_agents"] and flagged is not None:
        # name a same-intensity switch within the limits
        switch, _ = choose_statin(inputs, current, safety)
        genotype = f"{flagged.gene} {flagged.phenotype}"
        if switch is not None:
            notes.append(f"{genotype}: a {current}-intensity alternative within CPIC 2022 limits is "
                         f"{switch.agent} {switch.dose_mg:g} mg daily")
        else:
            notes.append(f"{genotype}: no {current}-intensity statin is within CPIC 2022 limits; a lower "
                         "intensity or a non-statin option")

    # blood pressure
    bp = params["sbp_lowering_one_drug_mm_hg"]
    if inputs.systolic_bp_mm_hg >= bp["eligibility_sbp_mm_hg"]:
        eligible.append(Intervention("bp_lowering", "Add one standard-dose antihypertensive"))
    else:
        excluded.append(
            Exclusion(
                "add antihypertensive",
                f"SBP {inputs.systolic_bp_mm_hg:.0f} mmHg is below the {bp['eligibility_sbp_mm_hg']} mmHg threshold",
                bp["eligibility_source"],
            )
        )

    # SGLT2 inhibitor
    floor = params["sglt2i_min_egfr_ml_min_1_73m2"]
    indicated = inputs.diabetes or inputs.ckd or inputs.egfr_ml_min_1_73m2 < 60 or inputs.heart_failure
    indicated = indicated or (inputs.uacr_mg_g is not None and inputs.uacr_mg_g >= 30)
    if inputs.on_sglt2i:
        excluded.append(Exclusion("start SGLT2 inhibitor", "already on an SGLT2 inhibitor"))
    elif inputs.egfr_ml_min_1_73m2 < floor["value"]:
        excluded.append(
            Exclusion(
                "start SGLT2 inhibitor",
                f"eGFR {inputs.egfr_ml_min_1_73m2:.0f} < {floor['value']} mL/min/1.73m2: initiation not proposed",
                floor["source"],
            )
        )
    elif not indicated:
        excluded.append(
            Exclusion("start SGLT2 inhibitor", "no diabetes, CKD, albuminuria or heart failure: no kidney indication")
        )
    else:
        eligible.append(Intervention("sglt2i", "Start SGLT2 inhibitor (kidney protection)"))

    # smoking
    if inputs.current_smoker:
        eligible.append(Intervention("smoking_cessation", "Smoking cessation"))
    else:
        excluded.append(Exclusion("smoking cessation", "not a current smoker"))

    # non-statin LDL-C lowering: added to a statin the patient already takes
    if inputs.on_statin:
        eligible.append(Intervention("ezetimibe", "Add ezetimibe 10 mg", agent="ezetimibe", dose_mg=10.0))
        eligible.append(Intervention("pcsk9_inhibitor", "Add a PCSK9 inhibitor"))
    else:
        for label in ("ezetimibe", "pcsk9 inhibitor"):
            excluded.append(Exclusion(label, "added to a statin: not on a statin now"))

    # pharmacogenomics that affect other drugs the CarePlan may mention (the flag on a current prescription
    # is among the notes above)
    clopidogrel = clopidogrel_advice(safety)
    if clopidogrel is not None:
        excluded.append(Exclusion("clopidogrel", f"CYP2C19 {clopidogrel.phenotype}: {clopidogrel.advice}",
                                  clopidogrel.source))

    for kind, why in params["not_simulated"].items():
        excluded.append(Exclusion(kind.replace("_", " "), f"not simulated: {why}"))
    return Candidates(tuple(eligible), tuple(excluded), tuple(notes))


def combinations(eligible: tuple[Intervention, ...]) -> list[Scenario]:
    """Single-intervention scenarios, statin + BP pairs and the 'everything eligible' bundle.

    Only one statin option enters a combination (the most intensive), since two statins are never
    combined.
    """
    singles = [Scenario(i.label, (i,)) for i in eligible]
    statins = [i for i in eligible if i.kind == "statin"]
    best_statin = next((i for i in statins if i.intensity == "high"), statins[0] if statins else None)
    others = [i for i in eligible if i.kind != "statin"]
    combos: list[Scenario] = []
    if best_statin is not None:
        for other in others:
            combos.append(Scenario(f"{best_statin.label} + {other.label}", (best_statin, other)))
    bundle = ([best_statin] if best_statin else []) + others
    if len(bundle) > 2:
        combos.append(Scenario("All eligible: " + " + ".join(i.label for i in bundle), tuple(bundle)))
    elif len(bundle) == 2 and best_statin is None:
        combos.append(Scenario(" + ".join(i.label for i in bundle), tuple(bundle)))
    return singles + combos


# ------------------------------------------------------------------------------------------------
# effect-size draws
# ------------------------------------------------------------------------------------------------


def lognormal_draws(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of a ratio from a log-normal fitted to its published 95% CI (median = point estimate)."""
    spec = intervention_parameters()["ratios"][name]
    lo, hi = spec["ci95"]
    sigma = (np.log(hi) - np.log(lo)) / (2 * 1.959964)
    draws: np.ndarray = np.exp(np.log(spec["value"]) + sigma * rng.standard_normal(n))
    return draws


def ldl_lowering_draws(intensity: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Fractional LDL-C lowering of a statin intensity, uniform over the guideline band."""
    lo, hi = intervention_parameters()["ldl_lowering_fraction"][intensity]
    return rng.uniform(lo, hi, n)
