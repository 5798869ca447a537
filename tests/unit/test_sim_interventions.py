"""Eligibility, pharmacogenomic exclusions with reasons, and effect-size draws."""

from __future__ import annotations

import numpy as np
from sim_fixtures import patient

from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.interventions import candidate_interventions, combinations, lognormal_draws


def kinds(c):
    return [i.kind for i in c.eligible]


def reasons(c, word):
    return [e for e in c.excluded if word in e.candidate.lower()]


def test_slco1b1_poor_function_avoids_simvastatin_with_reason():
    c = candidate_interventions(patient(slco1b1_phenotype="poor_function"))
    statins = [i for i in c.eligible if i.kind == "statin"]
    assert statins and all(i.agent != "simvastatin" for i in statins)
    excl = reasons(c, "simvastatin")
    assert excl and "SLCO1B1" in excl[0].reason and "CPIC" in excl[0].source
    assert all(any("SLCO1B1" in n for n in i.notes) for i in statins)


def test_slco1b1_normal_function_has_no_statin_exclusion():
    c = candidate_interventions(patient(slco1b1_phenotype="normal_function"))
    assert not reasons(c, "simvastatin")


def test_cyp2c19_clopidogrel_exclusion_follows_cpic_for_a_primary_prevention_patient():
    # no MI/ACS and no stroke/TIA recorded: CPIC 2022's non-ACS, non-PCI cardiovascular row (Lee 2022, Table 2):
    # poor metabolizers avoid clopidogrel, intermediate metabolizers get no recommendation
    for phenotype in ("poor_metabolizer", "Likely poor metabolizer"):
        c = candidate_interventions(patient(cyp2c19_phenotype=phenotype, weight_kg=80.0))
        [excl] = reasons(c, "clopidogrel")
        assert "prasugrel or ticagrelor" in excl.reason and "Lee" in excl.source
    for phenotype in ("intermediate", "Likely intermediate metabolizer", "normal_metabolizer", "ultrarapid"):
        assert not reasons(candidate_interventions(patient(cyp2c19_phenotype=phenotype)), "clopidogrel"), phenotype
    on = candidate_interventions(patient(cyp2c19_phenotype="poor_metabolizer", on_clopidogrel=True))
    assert any("current clopidogrel" in n and "ticagrelor" in n for n in on.notes)


def test_prasugrel_is_named_only_with_a_recent_weight_of_60_kg_or_more():
    for weight in (None, 55.0):
        [excl] = reasons(candidate_interventions(patient(cyp2c19_phenotype="poor", weight_kg=weight)), "clopidogrel")
        assert "alternative: ticagrelor" in excl.reason and "prasugrel or" not in excl.reason


def test_contraindications():
    c = candidate_interventions(patient(on_statin=True, statin_intensity="high"))
    assert "statin" not in kinds(c) and any("high-intensity" in e.reason for e in c.excluded)
    moderate = candidate_interventions(patient(on_statin=True, statin_intensity="moderate"))
    assert [i.intensity for i in moderate.eligible if i.kind == "statin"] == ["high"]
    low_egfr = candidate_interventions(patient(egfr_ml_min_1_73m2=15.0))
    assert "sglt2i" not in kinds(low_egfr) and any("< 20" in e.reason for e in low_egfr.excluded)
    assert "sglt2i" not in kinds(candidate_interventions(patient(on_sglt2i=True)))
    nonsmoker = candidate_interventions(patient(current_smoker=False))
    assert "smoking_cessation" not in kinds(nonsmoker)
    assert any(e.reason == "not a current smoker" for e in nonsmoker.excluded)
    assert "bp_lowering" not in kinds(candidate_interventions(patient(systolic_bp_mm_hg=118.0)))
    full = candidate_interventions(patient())
    assert set(kinds(full)) == {"statin", "bp_lowering", "sglt2i", "smoking_cessation"}
    for word in ("weight loss", "ezetimibe", "pcsk9"):
        assert reasons(full, word), word


def test_combinations_use_one_statin():
    scenarios = combinations(candidate_interventions(patient()).eligible)
    for s in scenarios:
        assert sum(i.kind == "statin" for i in s.interventions) <= 1
    assert any(len(s.interventions) == 4 for s in scenarios)
    assert any({i.kind for i in s.interventions} == {"statin", "bp_lowering"} for s in scenarios)


def test_lognormal_draws_match_published_ci():
    spec = intervention_parameters()["ratios"]["ldl_major_vascular_rr_per_mmol_l"]
    x = lognormal_draws("ldl_major_vascular_rr_per_mmol_l", np.random.default_rng(0), 200_000)
    np.testing.assert_allclose(np.median(x), spec["value"], rtol=2e-3)
    np.testing.assert_allclose(np.percentile(x, [2.5, 97.5]), spec["ci95"], rtol=5e-3)


def test_every_effect_has_ci_and_source():
    for name, spec in intervention_parameters()["ratios"].items():
        lo, hi = spec["ci95"]
        assert lo < spec["value"] < hi, name
        assert spec["source"], name


# CPIC 2022 (Cooper-DeHoff et al., Clin Pharmacol Ther 2022;111:1007, Table 2), written out here independently of
# pharmacogenomics.json: the largest daily dose the planner may propose per agent and SLCO1B1 phenotype (absent =
# not to be proposed: CPIC advises another statin first). Rosuvastatin and pravastatin under decreased function
# have no hard limit, only a higher myopathy risk above 20 / 40 mg, which the planner respects too.
CPIC_MAX_MG = {
    "decreased": {"atorvastatin": 40, "rosuvastatin": 20, "pravastatin": 40, "pitavastatin": 1, "fluvastatin": 40},
    "poor": {"atorvastatin": 20, "rosuvastatin": 20, "pravastatin": 40, "pitavastatin": 1, "fluvastatin": 40},
}


def test_no_statin_proposal_exceeds_cpic_for_any_slco1b1_phenotype_and_current_therapy():
    phenotypes = {"decreased_function": "decreased", "Possible decreased function": "decreased",
                  "poor_function": "poor", "normal_function": None, "increased_function": None, None: None}
    currents = [dict(on_statin=False), dict(on_statin=True, statin_intensity="moderate"),
                dict(on_statin=True, statin_intensity="low")]
    for phenotype, word in phenotypes.items():
        for current in currents:
            c = candidate_interventions(patient(slco1b1_phenotype=phenotype, **current))
            for statin in (i for i in c.eligible if i.kind == "statin"):
                if word is not None:
                    limit = CPIC_MAX_MG[word].get(statin.agent)
                    assert limit is not None and statin.dose_mg <= limit, (phenotype, statin.label)
    # poor function still gets a high-intensity option: rosuvastatin 20 mg, never atorvastatin 40 mg
    high = [i for i in candidate_interventions(patient(slco1b1_phenotype="poor_function")).eligible
            if i.kind == "statin" and i.intensity == "high"]
    assert [(i.agent, i.dose_mg) for i in high] == [("rosuvastatin", 20.0)]


def test_the_current_statin_is_flagged_when_it_exceeds_cpic():
    flagged = candidate_interventions(patient(slco1b1_phenotype="poor_function", on_statin=True,
                                              statin_intensity="moderate", statin_agent="simvastatin",
                                              statin_daily_dose_mg=20.0))
    assert any("current simvastatin 20 mg/day" in n and "avoid" in n for n in flagged.notes)
    fine = candidate_interventions(patient(slco1b1_phenotype="decreased_function", on_statin=True,
                                           statin_intensity="moderate", statin_agent="atorvastatin",
                                           statin_daily_dose_mg=20.0))
    assert not any("current" in n for n in fine.notes)


def test_prasugrel_is_not_offered_at_75_or_older():
    old = candidate_interventions(patient(cyp2c19_phenotype="poor_metabolizer", age_years=78.0))
    [excl] = reasons(old, "clopidogrel")
    assert "ticagrelor" in excl.reason and "prasugrel or" not in excl.reason


def test_a_flagged_current_statin_gets_a_same_intensity_alternative_within_cpic():
    c = candidate_interventions(patient(slco1b1_phenotype="poor_function", on_statin=True, statin_intensity="moderate",
                                        statin_agent="simvastatin", statin_daily_dose_mg=20.0))
    switch = [n for n in c.notes if "alternative within CPIC 2022 limits" in n]
    # CPIC 2022, SLCO1B1 poor function: atorvastatin <= 20, rosuvastatin <= 20, pravastatin <= 40; never simvastatin
    assert len(switch) == 1 and any(a in switch[0] for a in ("atorvastatin 10 mg", "rosuvastatin 5 mg",
                                                                 "pravastatin 40 mg"))
    assert "simvastatin" not in switch[0]
