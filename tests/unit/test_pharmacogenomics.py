"""Pharmacogenomic safety (CPIC 2022) on statin proposals and on current statins and clopidogrel.

The expected values below are written out from the guidelines themselves, independently of
``fhirtwin/sim/pharmacogenomics.json``: Cooper-DeHoff RM et al., Clin Pharmacol Ther 2022;111:1007 (statins,
Table 2), Lee CR et al., Clin Pharmacol Ther 2022;112:959 (clopidogrel, Tables 2 and 3) and the Effient label.
"""

from __future__ import annotations

import copy
import json
from datetime import date
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from sim_fixtures import patient
from writeback_fixtures import versioned_resources

from fhirtwin.adapters import build_twin
from fhirtwin.engine import Engine
from fhirtwin.service.cds_hooks import build_cards
from fhirtwin.service.runtime import ServiceSettings
from fhirtwin.sim.inputs import MedicationSafetyInputs, medication_safety_inputs
from fhirtwin.sim.interventions import candidate_interventions
from fhirtwin.sim.pharmacogenomics import (
    MedicationFlag,
    clopidogrel_advice,
    medication_flags,
    statin_limit,
    statin_proposal_problem,
)

AGENTS = ("simvastatin", "atorvastatin", "rosuvastatin", "pravastatin", "pitavastatin", "fluvastatin", "lovastatin")

#: Reported spellings of each SLCO1B1 rule class (None: no restriction).
SLCO1B1_SPELLINGS: dict[str | None, tuple[str | None, ...]] = {
    "decreased": ("decreased_function", "Decreased function", "decreased-function"),
    "possible_decreased": ("possible_decreased_function", "Possible decreased function"),
    "poor": ("poor_function", "Poor function"),
    None: ("normal_function", "Normal function", "increased_function", "Increased function", "indeterminate", None),
}
SPELLED = [(cls, text) for cls, texts in SLCO1B1_SPELLINGS.items() for text in texts]

# CPIC 2022 statin recommendations by SLCO1B1 phenotype (Table 2). "avoid": prescribe another statin, no dose;
# ("<", x): if the agent is warranted, less than x mg/day; ("<=", x): start at x mg/day or less;
# ("risk>", x): desired starting dose, higher myopathy risk above x mg/day. "alternative": another statin is
# CPIC's first advice. Possible decreased function has the same recommendations as decreased function.
_DECREASED: dict[str, list[Any]] = {
    "simvastatin": ["alternative", ("<", 20)],
    "atorvastatin": [("<=", 40)],
    "rosuvastatin": [("risk>", 20)],
    "pravastatin": [("risk>", 40)],
    "pitavastatin": [("<=", 2), ("risk>", 1)],
    "fluvastatin": [("risk>", 40)],
    "lovastatin": ["alternative", ("<=", 20)],
}
CPIC: dict[str, dict[str, list[Any]]] = {
    "decreased": _DECREASED,
    "possible_decreased": _DECREASED,
    "poor": {
        "simvastatin": ["avoid"],
        "atorvastatin": [("<=", 20)],
        "rosuvastatin": [("<=", 20)],
        "pravastatin": [("<=", 40)],
        "pitavastatin": [("<=", 1)],
        "fluvastatin": [("<=", 40)],
        "lovastatin": ["avoid"],
    },
}
#: Doses around every CPIC threshold; each property test checks all of them plus a drawn dose.
BOUNDARY_DOSES = (0.5, 1, 1.5, 2, 2.5, 4, 5, 9.99, 10, 10.01, 19, 19.99, 20, 20.01, 30, 39.99, 40, 40.5, 80, 160)
DOSES = st.floats(min_value=0.25, max_value=160, allow_nan=False)


def expected_proposable(cls: str | None, agent: str, dose: float) -> bool:
    """What CPIC allows the planner to propose: no alternative preferred, every limit and risk threshold kept."""
    if cls is None:
        return True
    for rule in CPIC[cls][agent]:
        if rule in ("avoid", "alternative"):
            return False
        op, mg = rule
        if (op == "<" and dose >= mg) or (op in ("<=", "risk>") and dose > mg):
            return False
    return True


def expected_severity(cls: str | None, agent: str, dose: float) -> str | None:
    """The flag a current dose deserves: warning above a CPIC limit or for an avoided agent, caution above a
    risk threshold only, none at or below every limit (also for an agent CPIC would rather replace)."""
    if cls is None:
        return None
    worst = None
    for rule in CPIC[cls][agent]:
        if rule == "avoid":
            return "warning"
        if rule == "alternative":
            continue
        op, mg = rule
        if (op == "<" and dose >= mg) or (op == "<=" and dose > mg):
            return "warning"
        if op == "risk>" and dose > mg:
            worst = "caution"
    return worst


def safety(**overrides: Any) -> MedicationSafetyInputs:
    base: dict[str, Any] = dict(
        patient_id="p", age_years=60.0, weight_kg=80.0, prior_stroke_or_tia=False, prior_mi_or_acs=False,
        on_statin=False, statin_agent=None, statin_daily_dose_mg=None, on_clopidogrel=False,
        slco1b1_phenotype=None, cyp2c19_phenotype=None,
    )
    base.update(overrides)
    return MedicationSafetyInputs(**base)


def statin_flags(flags: tuple[MedicationFlag, ...]) -> list[MedicationFlag]:
    return [f for f in flags if f.drug != "clopidogrel"]


# ---------------------------------------------------------------------------------------------- statins


@settings(max_examples=40, deadline=None)
@given(drawn=DOSES)
def test_no_statin_proposal_exceeds_the_cpic_limit_for_any_slco1b1_phenotype_agent_and_dose(drawn):
    for cls, phenotype in SPELLED:
        m = safety(slco1b1_phenotype=phenotype)
        for agent in AGENTS:
            for dose in (*BOUNDARY_DOSES, drawn):
                problem = statin_proposal_problem(m, agent, dose)
                assert (problem is None) == expected_proposable(cls, agent, dose), (phenotype, agent, dose, problem)
                if problem is not None:
                    assert "SLCO1B1" in problem and "CPIC" in problem


@settings(max_examples=60, deadline=None)
@given(spelled=st.sampled_from(SPELLED),
       current=st.sampled_from([dict(on_statin=False), dict(on_statin=True, statin_intensity="moderate"),
                                dict(on_statin=True, statin_intensity="low")]))
def test_the_planner_proposes_only_statins_within_cpic_limits(spelled, current):
    cls, phenotype = spelled
    c = candidate_interventions(patient(slco1b1_phenotype=phenotype, **current))
    statins = [i for i in c.eligible if i.kind == "statin"]
    assert statins, "every phenotype keeps at least one statin option"
    for s in statins:
        assert expected_proposable(cls, s.agent, s.dose_mg), (phenotype, s.label)
    if cls == "poor":  # high intensity stays possible: rosuvastatin 20 mg, never atorvastatin 40 mg
        assert [(s.agent, s.dose_mg) for s in statins if s.intensity == "high"] == [("rosuvastatin", 20.0)]


@settings(max_examples=40, deadline=None)
@given(drawn=DOSES)
def test_a_current_statin_is_flagged_exactly_when_its_dose_is_above_the_cpic_limit(drawn):
    for cls, phenotype in SPELLED:
        for agent in AGENTS:
            for dose in (*BOUNDARY_DOSES, drawn):
                m = safety(on_statin=True, statin_agent=agent, statin_daily_dose_mg=dose, slco1b1_phenotype=phenotype)
                flags = statin_flags(medication_flags(m))
                expected = expected_severity(cls, agent, dose)
                assert [f.severity for f in flags] == ([expected] if expected else []), (phenotype, agent, dose)
                for f in flags:
                    assert f.drug == agent and f.dose_mg == dose and f.gene == "SLCO1B1" and "Cooper-DeHoff" in f.source


def test_statin_flags_when_agent_or_dose_is_not_recorded():
    poor = "poor_function"
    [unknown_dose] = medication_flags(safety(on_statin=True, statin_agent="atorvastatin", slco1b1_phenotype=poor))
    assert unknown_dose.severity == "caution" and "dose not recorded" in unknown_dose.advice
    [unknown_agent] = medication_flags(safety(on_statin=True, statin_daily_dose_mg=20.0, slco1b1_phenotype=poor))
    assert unknown_agent.drug == "statin" and "agent not recorded" in unknown_agent.advice
    assert not medication_flags(safety(on_statin=True, slco1b1_phenotype="normal_function"))
    assert not medication_flags(safety(on_statin=False, statin_agent="simvastatin", statin_daily_dose_mg=80.0,
                                       slco1b1_phenotype=poor))


def test_abcg2_and_cyp2c9_rules_when_their_phenotypes_are_given():
    # rosuvastatin: ABCG2 poor function alone <= 20 mg; with reduced SLCO1B1 function <= 10 mg
    assert statin_limit("rosuvastatin", slco1b1="normal_function", abcg2="poor_function").max_mg == 20
    for slco in ("decreased_function", "possible decreased function", "poor_function"):
        assert statin_limit("rosuvastatin", slco1b1=slco, abcg2="poor_function").max_mg == 10
    assert not statin_limit("rosuvastatin", slco1b1=None, abcg2="decreased_function").basis
    # fluvastatin: CYP2C9 intermediate <= 40, poor <= 20; combined with reduced SLCO1B1 function stricter
    assert statin_limit("fluvastatin", slco1b1="normal_function", cyp2c9="intermediate_metabolizer").max_mg == 40
    assert statin_limit("fluvastatin", slco1b1=None, cyp2c9="poor_metabolizer").max_mg == 20
    assert statin_limit("fluvastatin", slco1b1="decreased_function", cyp2c9="intermediate_metabolizer").max_mg == 20
    assert statin_limit("fluvastatin", slco1b1="poor_function", cyp2c9="intermediate_metabolizer").avoid
    assert statin_limit("fluvastatin", slco1b1="decreased_function", cyp2c9="poor_metabolizer").avoid
    m = safety(on_statin=True, statin_agent="rosuvastatin", statin_daily_dose_mg=20.0,
               slco1b1_phenotype="decreased_function", abcg2_phenotype="poor_function")
    [flag] = medication_flags(m)
    assert flag.severity == "warning" and flag.gene == "ABCG2+SLCO1B1"


# ---------------------------------------------------------------------------------------------- clopidogrel

CYP2C19_SPELLINGS = {
    "ultrarapid": ("ultrarapid_metabolizer", "Ultrarapid metabolizer"),
    "rapid": ("rapid_metabolizer", "rapid", "Rapid metabolizer"),
    "normal": ("normal_metabolizer", "Normal metabolizer"),
    "intermediate": ("intermediate_metabolizer", "intermediate", "likely_intermediate_metabolizer",
                     "Likely intermediate metabolizer"),
    "poor": ("poor_metabolizer", "Poor metabolizer", "likely_poor_metabolizer", "Likely poor metabolizer"),
}
ANY_CYP2C19 = st.sampled_from([t for texts in CYP2C19_SPELLINGS.values() for t in texts] + [None, "indeterminate"])


@st.composite
def clopidogrel_patients(draw: st.DrawFn, cyp2c19: st.SearchStrategy[str | None] = ANY_CYP2C19) -> dict[str, Any]:
    return dict(
        age_years=draw(st.floats(min_value=18, max_value=100)),
        weight_kg=draw(st.one_of(st.none(), st.floats(min_value=30, max_value=200))),
        prior_stroke_or_tia=draw(st.booleans()),
        prior_mi_or_acs=draw(st.booleans()),
        on_clopidogrel=draw(st.booleans()),
        cyp2c19_phenotype=draw(cyp2c19),
    )


@settings(max_examples=300, deadline=None)
@given(p=clopidogrel_patients())
@example(p=dict(age_years=75.0, weight_kg=80.0, prior_stroke_or_tia=False, prior_mi_or_acs=True,
                on_clopidogrel=True, cyp2c19_phenotype="poor_metabolizer"))
@example(p=dict(age_years=60.0, weight_kg=59.9, prior_stroke_or_tia=False, prior_mi_or_acs=False,
                on_clopidogrel=True, cyp2c19_phenotype="intermediate_metabolizer"))
@example(p=dict(age_years=60.0, weight_kg=59.9, prior_stroke_or_tia=False, prior_mi_or_acs=False,
                on_clopidogrel=True, cyp2c19_phenotype="poor_metabolizer"))
@example(p=dict(age_years=50.0, weight_kg=90.0, prior_stroke_or_tia=True, prior_mi_or_acs=True,
                on_clopidogrel=True, cyp2c19_phenotype="Likely poor metabolizer"))
def test_prasugrel_is_never_suggested_after_stroke_or_tia_at_75_or_older_or_below_60_kg(p):
    barred = p["prior_stroke_or_tia"] or p["age_years"] >= 75 or (p["weight_kg"] is not None and p["weight_kg"] < 60)
    advice = clopidogrel_advice(safety(**p))
    flags = medication_flags(safety(**p))
    cands = candidate_interventions(patient(**p))
    texts = [f.advice for f in flags] + [e.reason for e in cands.excluded if e.candidate == "clopidogrel"]
    texts += list(cands.notes)
    if barred:
        assert advice is None or "prasugrel" not in advice.alternatives
        assert all("prasugrel" not in f.alternatives for f in flags)
        assert not any("prasugrel or" in t or "or prasugrel" in t for t in texts), texts
    if advice is not None:
        assert advice.alternatives and "clopidogrel" not in advice.alternatives


def test_prasugrel_is_named_for_a_cardiovascular_indication_when_nothing_bars_it():
    advice = clopidogrel_advice(safety(age_years=60.0, weight_kg=80.0, prior_mi_or_acs=True,
                                       cyp2c19_phenotype="poor_metabolizer"))
    assert advice is not None and advice.alternatives == ("prasugrel", "ticagrelor")
    unknown_weight = clopidogrel_advice(safety(weight_kg=None, prior_mi_or_acs=True, cyp2c19_phenotype="poor"))
    assert unknown_weight is not None and unknown_weight.alternatives == ("ticagrelor",)
    # the label's boundaries: 75 years and 60 kg
    for age, weight, named in ((74.9, 60.0, True), (75.0, 60.0, False), (74.9, 59.9, False)):
        advice = clopidogrel_advice(safety(age_years=age, weight_kg=weight, cyp2c19_phenotype="poor"))
        assert advice is not None and ("prasugrel" in advice.alternatives) == named, (age, weight)


@settings(max_examples=200, deadline=None)
@given(p=clopidogrel_patients(st.sampled_from([t for c in ("ultrarapid", "rapid", "normal")
                                               for t in CYP2C19_SPELLINGS[c]])))
def test_cyp2c19_normal_rapid_and_ultrarapid_metabolizers_are_never_flagged(p):
    m = safety(**p)
    assert clopidogrel_advice(m) is None
    assert not [f for f in medication_flags(m) if f.drug == "clopidogrel"]
    assert not [e for e in candidate_interventions(patient(**p)).excluded if e.candidate == "clopidogrel"]


# CPIC 2022 clopidogrel by indication (Lee 2022, Tables 2 and 3): ACS/PCI: IM and PM avoid (strong);
# neurovascular: IM consider an alternative, PM avoid if possible (moderate); other cardiovascular (non-ACS,
# non-PCI): IM no recommendation, PM avoid (moderate).
BY_INDICATION = {
    (False, True): {"intermediate": "warning", "poor": "warning"},  # MI/ACS
    (True, False): {"intermediate": "caution", "poor": "warning"},  # stroke/TIA
    (False, False): {"intermediate": None, "poor": "warning"},  # neither recorded
    (True, True): {"intermediate": "warning", "poor": "warning"},  # both: the stricter ACS/PCI row applies
}


def test_clopidogrel_flags_follow_cpic_by_indication_and_phenotype():
    for (stroke, mi), expected in BY_INDICATION.items():
        for cls, severity in expected.items():
            for phenotype in CYP2C19_SPELLINGS[cls]:
                m = safety(prior_stroke_or_tia=stroke, prior_mi_or_acs=mi, on_clopidogrel=True,
                           cyp2c19_phenotype=phenotype)
                flags = [f for f in medication_flags(m) if f.drug == "clopidogrel"]
                assert [f.severity for f in flags] == ([severity] if severity else []), (stroke, mi, phenotype)
                for f in flags:
                    assert f.gene == "CYP2C19" and "Lee" in f.source
                    assert f.alternatives == (("ticagrelor",) if stroke else ("prasugrel", "ticagrelor"))
                not_taking = safety(prior_stroke_or_tia=stroke, prior_mi_or_acs=mi, cyp2c19_phenotype=phenotype)
                assert not medication_flags(not_taking)


# ---------------------------------------------------------------------------------------------- from the record

REF = date(2025, 1, 1)
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1"}, "gender": "male",
            "birthDate": "1958-04-02"}


def _stroke(pid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "stroke", "meta": {"versionId": "1"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "230690007"}],
                     "text": "Cerebrovascular accident"},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": "2022-03-01"}


def _request(pid: str, rid: str, rxcui: str, per_day: int | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": rid, "meta": {"versionId": "1"},
                           "status": "active", "intent": "order",
                           "medicationCodeableConcept": {"coding": [{"system": RX, "code": rxcui}]},
                           "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2023-01-01"}
    if per_day:
        res["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": 1, "unit": "{tbl}",
                                                                        "code": "{tbl}"}}],
                                     "timing": {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}}}]
    return res


def _genotype(pid: str, rid: str, symbol: str, hgnc: str, diplotype: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1"}, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "GE"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "84413-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2023-06-01",
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "48018-6"}]},
                           "valueCodeableConcept": {"coding": [{"system": "http://www.genenames.org",
                                                                "code": hgnc, "display": symbol}]}}],
            "valueCodeableConcept": {"text": f"{symbol} {diplotype}"}}


def test_out_of_scope_post_stroke_poor_metabolizer_on_clopidogrel_is_flagged_with_a_non_prasugrel_alternative():
    pid = "pgx-stroke"
    record = [_patient(pid), _stroke(pid), _request(pid, "clop", "32968"),
              _genotype(pid, "g19", "CYP2C19", "HGNC:2621", "*2/*2")]
    state = build_twin(pid, record, REF)
    m = medication_safety_inputs(state)
    assert m.prior_stroke_or_tia and m.on_clopidogrel and m.cyp2c19_phenotype == "poor_metabolizer"
    run = Engine().simulate(state, draws=50)
    assert run.plan is None and run.scope is not None and not run.scope.in_scope
    [flag] = run.medication_flags
    assert flag.drug == "clopidogrel" and flag.severity == "warning"
    assert flag.alternatives == ("ticagrelor",) and "prasugrel or" not in flag.advice
    [card] = build_cards(run, ServiceSettings(fhir_server="http://127.0.0.1:9/fhir"))
    assert "Pharmacogenomic medication safety" in card["detail"] and "current clopidogrel" in card["detail"]
    assert "alternative: ticagrelor" in card["detail"]


def test_a_run_without_lipids_still_carries_the_statin_flag():
    pid = "pgx-nolipids"
    record = [_patient(pid), _request(pid, "atorva", "617311", per_day=1),  # atorvastatin 40 mg once daily
              _genotype(pid, "g1b1", "SLCO1B1", "HGNC:10959", "*5/*15")]
    run = Engine().simulate(build_twin(pid, record, REF), draws=50)
    assert run.plan is None and any("cholesterol" in m for m in run.missing), (run.error, run.missing)
    [flag] = run.medication_flags
    assert (flag.drug, flag.dose_mg, flag.phenotype, flag.severity) == ("atorvastatin", 40.0, "poor_function",
                                                                          "warning")
    [card] = build_cards(run, ServiceSettings(fhir_server="http://127.0.0.1:9/fhir"))
    assert "current atorvastatin 40 mg/day" in card["detail"]


def test_the_care_plan_notes_carry_the_flag_of_an_in_scope_patient():
    pid, resources = versioned_resources()
    drop = ("MedicationRequest", "MedicationStatement", "Medication")
    record = [r for r in resources if r["resourceType"] not in drop
              and not ("SLCO1B1" in json.dumps(r) or "CYP2C19" in json.dumps(r))]
    record += [copy.deepcopy(_request(pid, "simva", "312961", per_day=2)),  # simvastatin 20 mg twice daily
               _genotype(pid, "g1b1", "SLCO1B1", "HGNC:10959", "*1/*5")]
    run = Engine().simulate(build_twin(pid, record, date(2026, 6, 30)), draws=100)
    assert run.plan is not None, run.error
    [flag] = run.medication_flags
    assert (flag.drug, flag.dose_mg, flag.severity) == ("simvastatin", 40.0, "warning")
    assert flag.text() in run.plan.notes
    notes = " ".join(n["text"] for n in Engine().draft_care_plan(run)["note"])
    assert "current simvastatin 40 mg/day" in notes
    [card] = build_cards(run, ServiceSettings(fhir_server="http://127.0.0.1:9/fhir"), draws=100)
    assert "Pharmacogenomic medication safety" in card["detail"] and "current simvastatin 40 mg/day" in card["detail"]
