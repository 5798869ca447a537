"""Pharmacogenomic safety of statins and clopidogrel, for what the planner proposes and what the patient takes.

Why: a statin proposal must stay within the CPIC 2022 dose limits for the patient's transporter and enzyme
phenotypes, and the medications a patient already takes need the same check — also for patients the risk
model refuses (out of scope, or missing lipids). The rules and their sources live in
``pharmacogenomics.json``; this module only reads them. It reads no TwinState: it works on
:class:`~fhirtwin.sim.inputs.MedicationSafetyInputs` (built from a TwinState in ``inputs.py``, or from
PatientInputs by :func:`safety_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirtwin.sim._params import load
from fhirtwin.sim.inputs import MedicationSafetyInputs, PatientInputs

#: The seven statins CPIC 2022 gives recommendations for.
STATIN_AGENTS = ("simvastatin", "atorvastatin", "rosuvastatin", "pravastatin", "pitavastatin", "fluvastatin",
                 "lovastatin")
STATIN_GENES = ("SLCO1B1", "ABCG2", "CYP2C9")
WARNING, CAUTION = "warning", "caution"


def rules() -> dict[str, Any]:
    """The rule tables (``pharmacogenomics.json``, parsed once)."""
    return load("pharmacogenomics.json")


def source(key: str) -> str:
    """The citation of a source key of the rule tables."""
    return str(rules()["sources"][key])


def phenotype_class(gene: str, phenotype: str | None) -> str | None:
    """The rule class of a reported phenotype (e.g. 'Likely poor metabolizer' -> 'poor'); None if unknown."""
    if phenotype is None:
        return None
    text = phenotype.strip().lower().replace("-", "_").replace(" ", "_")
    for name, words in rules()["phenotype_classes"][gene]:
        if any(word in text for word in words):
            return str(name)
    return None


def safety_inputs(inputs: PatientInputs) -> MedicationSafetyInputs:
    """The medication-safety view of inputs the risk model already read (same conventions as the TwinState one)."""
    return MedicationSafetyInputs(
        patient_id=inputs.patient_id,
        age_years=inputs.age_years,
        weight_kg=inputs.weight_kg,
        prior_stroke_or_tia=inputs.prior_stroke_or_tia,
        prior_mi_or_acs=inputs.prior_mi_or_acs,
        on_statin=inputs.on_statin,
        statin_agent=inputs.statin_agent if inputs.on_statin else None,
        statin_daily_dose_mg=inputs.statin_daily_dose_mg if inputs.on_statin else None,
        on_clopidogrel=inputs.on_clopidogrel,
        slco1b1_phenotype=inputs.slco1b1_phenotype,
        cyp2c19_phenotype=inputs.cyp2c19_phenotype,
    )


@dataclass(frozen=True)
class MedicationFlag:
    """A pharmacogenomic problem with a medication the patient takes now, for the clinician to review.

    ``severity`` is ``warning`` (CPIC advises against the agent or the dose exceeds its limit) or ``caution``
    (a dose CPIC notes as riskier, a dose or agent that is not recorded, or "consider an alternative").
    ``alternatives`` are the agents fhirtwin names instead (empty for statins: the limits name them).
    """

    drug: str
    gene: str
    phenotype: str
    severity: str
    advice: str
    source: str
    dose_mg: float | None = None
    alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in (WARNING, CAUTION):
            raise ValueError(f"severity must be {WARNING!r} or {CAUTION!r}, got {self.severity!r}")

    def text(self) -> str:
        """One line for CarePlan notes and CDS cards."""
        dose = f" {self.dose_mg:g} mg/day" if self.dose_mg is not None else ""
        return f"{self.severity}: current {self.drug}{dose} with {self.gene} {self.phenotype}: {self.advice}"

    def to_json(self) -> dict[str, Any]:
        """Plain dict (alternatives as a list, absent values left out)."""
        out = {k: v for k, v in self.__dict__.items() if v is not None and k != "alternatives"}
        out["alternatives"] = list(self.alternatives)
        return out


# ------------------------------------------------------------------------------------------------ statins


@dataclass(frozen=True)
class StatinLimit:
    """What CPIC 2022 allows of one statin for a patient's phenotypes; ``basis`` is empty when nothing restricts.

    ``max_mg``: start at most this; ``below_mg``: less than this; ``caution_above_mg``: higher myopathy risk
    above it; ``prefer_alternative``: CPIC first advises another statin; ``avoid``: another statin, no dose.
    """

    agent: str
    basis: tuple[str, ...] = ()
    max_mg: float | None = None
    below_mg: float | None = None
    caution_above_mg: float | None = None
    avoid: bool = False
    prefer_alternative: bool = False
    advice: str = ""
    verified: bool = True

    def within_limit(self, dose_mg: float) -> bool:
        """The dose respects the hard limit (max_mg / below_mg) and the agent is not to be avoided."""
        if self.avoid or not self.verified:
            return False
        if self.max_mg is not None and dose_mg > self.max_mg:
            return False
        return self.below_mg is None or dose_mg < self.below_mg

    def proposable(self, dose_mg: float) -> bool:
        """The planner may propose this dose: within every limit and caution threshold, no alternative preferred."""
        if not self.basis:
            return True
        if self.prefer_alternative or not self.within_limit(dose_mg):
            return False
        return self.caution_above_mg is None or dose_mg <= self.caution_above_mg

    def severity(self, dose_mg: float | None) -> str | None:
        """The flag a current daily dose deserves (None: within what CPIC advises)."""
        if not self.basis:
            return None
        if self.avoid:
            return WARNING
        if not self.verified or dose_mg is None:
            return CAUTION
        if not self.within_limit(dose_mg):
            return WARNING
        if self.caution_above_mg is not None and dose_mg > self.caution_above_mg:
            return CAUTION
        return None

    def limit_text(self) -> str:
        """The limit in words: 'avoid', 'less than 20 mg/day', 'at most 40 mg/day'."""
        if not self.verified:
            return "no CPIC 2022 rule is recorded for this agent"
        if self.avoid:
            return f"avoid {self.agent}"
        parts = []
        if self.prefer_alternative:
            parts.append("an alternative statin preferred")
        if self.below_mg is not None:
            parts.append(f"less than {self.below_mg:g} mg/day")
        if self.max_mg is not None:
            parts.append(f"at most {self.max_mg:g} mg/day")
        if self.caution_above_mg is not None:
            parts.append(f"higher myopathy risk above {self.caution_above_mg:g} mg/day")
        return "; ".join(parts)


def _limit(agent: str, basis: tuple[str, ...], specs: list[dict[str, Any]]) -> StatinLimit:
    """Merge rules that apply together: the strictest of each kind."""
    def least(key: str) -> float | None:
        values = [float(s[key]) for s in specs if s.get(key) is not None]
        return min(values) if values else None

    return StatinLimit(
        agent, basis, max_mg=least("max_mg"), below_mg=least("below_mg"), caution_above_mg=least("caution_above_mg"),
        avoid=any(bool(s.get("avoid")) for s in specs),
        prefer_alternative=any(bool(s.get("prefer_alternative")) for s in specs),
        advice="; ".join(str(s["advice"]) for s in specs),
        verified=not any(s.get("unverified") for s in specs),
    )


def statin_limit(agent: str, *, slco1b1: str | None, abcg2: str | None = None,
                 cyp2c9: str | None = None) -> StatinLimit:
    """The CPIC 2022 limit of one statin for these phenotypes (a two-gene rule replaces the single-gene ones)."""
    reported = {"SLCO1B1": slco1b1, "ABCG2": abcg2, "CYP2C9": cyp2c9}
    classes = {gene: phenotype_class(gene, value) for gene, value in reported.items()}
    spec = rules()["statins"].get(agent)
    if spec is None:
        restricted = [f"{g} {reported[g]}" for g in STATIN_GENES if classes[g] not in (None, "normal", "increased")]
        return StatinLimit(agent, tuple(restricted), verified=False) if restricted else StatinLimit(agent)
    for combined in spec.get("combined", []):
        if all(classes[gene] in allowed for gene, allowed in combined["when"].items()):
            return _limit(agent, tuple(f"{g} {reported[g]}" for g in combined["when"]), [combined])
    hits = [(gene, spec[gene][classes[gene]]) for gene in STATIN_GENES
            if gene in spec and classes[gene] in spec[gene]]
    if not hits:
        return StatinLimit(agent)
    return _limit(agent, tuple(f"{g} {reported[g]}" for g, _ in hits), [s for _, s in hits])


def _statin_limit_for(m: MedicationSafetyInputs, agent: str) -> StatinLimit:
    return statin_limit(agent, slco1b1=m.slco1b1_phenotype, abcg2=m.abcg2_phenotype, cyp2c9=m.cyp2c9_phenotype)


def statin_proposal_problem(m: MedicationSafetyInputs, agent: str, dose_mg: float) -> str | None:
    """Why the planner must not propose this statin and dose (None: it may), as a reason for the CarePlan."""
    limit = _statin_limit_for(m, agent)
    if limit.proposable(dose_mg):
        return None
    return f"{', '.join(limit.basis)}: {limit.limit_text()} (CPIC 2022, myopathy risk)"


def _statin_basis(m: MedicationSafetyInputs) -> list[str]:
    """The reported phenotypes that restrict any statin ('SLCO1B1 poor_function', ...)."""
    return sorted({b for agent in STATIN_AGENTS for b in _statin_limit_for(m, agent).basis})


def statin_restriction_note(m: MedicationSafetyInputs) -> str | None:
    """A note for statin proposals when any statin phenotype restricts agents or doses."""
    basis = _statin_basis(m)
    return f"{', '.join(basis)}: statin agent and dose within CPIC 2022 limits" if basis else None


def _genes_and_phenotypes(basis: list[str] | tuple[str, ...]) -> tuple[str, str]:
    return "+".join(b.split(" ")[0] for b in basis), ", ".join(b.partition(" ")[2] for b in basis)


def statin_flag(m: MedicationSafetyInputs) -> MedicationFlag | None:
    """The flag on the statin the patient takes now (agent and daily dose), if CPIC 2022 advises otherwise."""
    if not m.on_statin:
        return None
    cite = source("cpic_statins_2022")
    if m.statin_agent is None:
        basis = _statin_basis(m)
        if not basis:
            return None
        genes, phenotypes = _genes_and_phenotypes(basis)
        return MedicationFlag("statin", genes, phenotypes, CAUTION,
                              "statin agent not recorded; CPIC 2022 limits differ by agent: check agent and dose",
                              cite, m.statin_daily_dose_mg)
    limit = _statin_limit_for(m, m.statin_agent)
    severity = limit.severity(m.statin_daily_dose_mg)
    if severity is None:
        return None
    dose = m.statin_daily_dose_mg
    if limit.avoid or not limit.verified:
        advice = f"{limit.limit_text()} ({limit.advice or 'review against the guideline'}): review the statin"
    elif dose is None:
        advice = f"daily dose not recorded; CPIC 2022: {limit.limit_text()} ({limit.advice}): check the dose"
    elif severity == WARNING:
        advice = f"above the CPIC 2022 limit, {limit.limit_text()} ({limit.advice}): review the statin or its dose"
    else:
        advice = f"{limit.limit_text()} (CPIC 2022: {limit.advice}): review the dose"
    genes, phenotypes = _genes_and_phenotypes(limit.basis)
    return MedicationFlag(m.statin_agent, genes, phenotypes, severity, advice, cite, dose)


# ------------------------------------------------------------------------------------------------ clopidogrel


def prasugrel_barrier(m: MedicationSafetyInputs) -> str | None:
    """Why prasugrel must not be named for this patient (None: it may be named as an alternative)."""
    rule = rules()["prasugrel"]
    if rule["never_after_stroke_or_tia"] and m.prior_stroke_or_tia:
        return "contraindicated after a stroke or TIA"
    if m.age_years is None:
        return "age not recorded"
    if m.age_years >= float(rule["min_age_not_named_years"]):
        return f"not generally recommended at {rule['min_age_not_named_years']} or older"
    if m.weight_kg is None:
        return "no weight recorded within the last year"
    if m.weight_kg < float(rule["min_weight_kg"]):
        return f"weight below {rule['min_weight_kg']} kg"
    return None


def clopidogrel_indications(m: MedicationSafetyInputs) -> tuple[str, ...]:
    """CPIC 2022 indication groups that apply (neither stroke/TIA nor MI/ACS recorded: other cardiovascular)."""
    found = (("neurovascular",) if m.prior_stroke_or_tia else ()) + (("acs_pci",) if m.prior_mi_or_acs else ())
    return found or ("other_cardiovascular",)


_INDICATION_TEXT = {"acs_pci": "after an MI/ACS or PCI", "neurovascular": "after a stroke or TIA",
                    "other_cardiovascular": "non-ACS, non-PCI cardiovascular indication"}


@dataclass(frozen=True)
class ClopidogrelAdvice:
    """CPIC 2022 advice on clopidogrel for a CYP2C19 phenotype and the indications that apply."""

    phenotype: str
    severity: str
    advice: str
    alternatives: tuple[str, ...]
    source: str


def clopidogrel_advice(m: MedicationSafetyInputs) -> ClopidogrelAdvice | None:
    """What CPIC 2022 advises on clopidogrel for this patient; None for normal, rapid and ultrarapid metabolizers
    and wherever CPIC makes no recommendation (e.g. intermediate metabolizers, other cardiovascular use)."""
    cls = phenotype_class("CYP2C19", m.cyp2c19_phenotype)
    table = rules()["clopidogrel"]
    hits = [(ind, table[ind][cls]) for ind in clopidogrel_indications(m) if cls is not None and cls in table[ind]]
    if not hits:
        return None
    severity = WARNING if any(rule["action"] == "avoid" for _, rule in hits) else CAUTION
    named = [a for _, rule in hits for a in rule["alternatives"]]
    barrier = prasugrel_barrier(m)
    alternatives = tuple(dict.fromkeys(a for a in named if a != "prasugrel" or barrier is None))
    strictest = next(rule for _, rule in hits if rule["action"] == "avoid") if severity == WARNING else hits[0][1]
    where = " and ".join(_INDICATION_TEXT[ind] for ind, _ in hits)
    text = f"{strictest['advice']} ({where}); alternative: {' or '.join(alternatives)}"
    if barrier is not None and ("prasugrel" in named or m.prior_stroke_or_tia):
        text += f" (not prasugrel: {barrier})"
    assert m.cyp2c19_phenotype is not None
    return ClopidogrelAdvice(m.cyp2c19_phenotype, severity, text, alternatives, source("cpic_clopidogrel_2022"))


def clopidogrel_flag(m: MedicationSafetyInputs) -> MedicationFlag | None:
    """The flag on a current clopidogrel prescription, if CPIC 2022 advises against it for this patient."""
    advice = clopidogrel_advice(m) if m.on_clopidogrel else None
    if advice is None:
        return None
    return MedicationFlag("clopidogrel", "CYP2C19", advice.phenotype, advice.severity, advice.advice,
                          advice.source, alternatives=advice.alternatives)


def medication_flags(m: MedicationSafetyInputs) -> tuple[MedicationFlag, ...]:
    """Every pharmacogenomic flag on the patient's current statin and clopidogrel, warnings first."""
    flags = [f for f in (statin_flag(m), clopidogrel_flag(m)) if f is not None]
    return tuple(sorted(flags, key=lambda f: f.severity != WARNING))
