"""Person-period tables from TwinStates built from FHIR-like resources, and the g-formula run on them."""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.causal.gformula import Spec, always, gformula, never
from fhirtwin.causal.person_period import PeriodDesign, person_periods, prevent_ascvd_score

REF = date(2025, 1, 1)
START = date(2019, 1, 1)


def patient(pid: str, gender: str = "male", born: str = "1960-05-01") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1"}, "gender": gender, "birthDate": born}


def ldl(pid: str, rid: str, when: str, value: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1"}, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "18262-6"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}}


def statin(pid: str, rid: str, authored: str) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "meta": {"versionId": "1"}, "status": "active",
            "intent": "order", "subject": {"reference": f"Patient/{pid}"}, "authoredOn": authored,
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                      "code": "617311"}]}}


def mi(pid: str, rid: str, onset: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "meta": {"versionId": "1"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "22298006"}]},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": onset}


def twins():
    yearly = [f"{y}-06-01" for y in range(2018, 2025)]
    records = {
        # high LDL-C, statin from mid-2020 (LDL-C falls), MI in 2022
        "a": [patient("a"), *(ldl("a", f"a{i}", d, v) for i, (d, v) in enumerate(zip(
            ["2018-12-01", "2019-12-01", "2020-12-01", "2021-12-01"], [190, 185, 120, 115], strict=True))),
              statin("a", "as", "2020-06-15"), mi("a", "am", "2022-03-10")],
        # never treated, no event, followed to the reference date
        "b": [patient("b", "female", "1955-02-02"), *(ldl("b", f"b{i}", d, 130 + i) for i, d in enumerate(yearly))],
        # MI before the start: prevalent, excluded
        "c": [patient("c"), ldl("c", "c0", "2018-06-01", 150), mi("c", "cm", "2017-01-01")],
        # no LDL-C in the two years before the start: excluded
        "d": [patient("d"), ldl("d", "d0", "2015-06-01", 150)],
    }
    return [build_twin(pid, res, REF) for pid, res in records.items()]


def test_person_periods_follow_the_rules() -> None:
    out = person_periods(twins(), PeriodDesign(start=START, periods=6))
    t = out.table
    assert sorted(t.id.unique()) == ["a", "b"]
    a = t[t.id == "a"].set_index("period")
    assert list(a.index) == [0, 1, 2, 3]  # ends at the MI in period 3 (2022)
    assert list(a.event) == [0, 0, 0, 1]
    assert list(a.on_statin) == [0, 0, 1, 1] and a.treated_before.iloc[0] == 0
    assert list(a.ldl_cholesterol_mg_dl) == [190, 185, 120, 115]
    assert a.age0.iloc[0] == 58 and a.sex_male.iloc[0] == 1
    b = t[t.id == "b"]
    assert list(b.period) == [0, 1, 2, 3, 4, 5] and b.event.sum() == 0 and b.sex_male.iloc[0] == 0
    assert list(b.ldl_cholesterol_mg_dl) == [130, 131, 132, 133, 134, 135]
    assert out.excluded == {"event before the start (prevalent)": 1,
                            "ldl_cholesterol_mg_dl missing at a period start": 1}
    assert out.censored == {"event": 1, "end of the design": 1}


def test_a_risk_score_the_engine_cannot_compute_is_missing_not_guessed() -> None:
    from datetime import UTC, datetime

    assert prevent_ascvd_score(twins()[1], datetime(2020, 1, 1, tzinfo=UTC)) is None  # no cholesterol, SBP, ...


def test_a_design_names_unknown_variables_at_once() -> None:
    with pytest.raises(KeyError, match="ldl_cholestrol"):
        PeriodDesign(start=START, periods=2, covariates=("ldl_cholestrol",))


def test_the_gformula_runs_on_twin_data() -> None:
    # 40 copies of the two usable twins: too small to mean anything, large enough to run every model
    table = person_periods(twins(), PeriodDesign(start=START, periods=6)).table
    copies = []
    for i in range(40):
        part = table.copy()
        part["id"] = part["id"] + f"-{i}"
        part["ldl_cholesterol_mg_dl"] += np.random.default_rng(i).normal(0, 5, len(part))
        copies.append(part)
    data = pd.concat(copies, ignore_index=True)
    spec = Spec(treatment="on_statin", covariates=("ldl_cholesterol_mg_dl",), baseline=("age0",),
                treated_before="treated_before")
    result = gformula(data, spec, {"never": never(), "always": always()}, monte_carlo=500, bootstrap=0)
    assert set(result.risk) == {"never", "always"} and all(0 <= r <= 1 for r in result.risk.values())


def test_the_risk_score_is_the_engines_own_prevent_risk() -> None:
    from datetime import UTC, datetime

    from writeback_fixtures import cohort_run

    run = cohort_run()  # a synthetic cohort patient, simulated by the engine at its reference date
    score = prevent_ascvd_score(run.state, datetime(2026, 6, 30, tzinfo=UTC))
    assert score == pytest.approx(run.plan.baseline.method["published"]["prevent_10y_ascvd"], rel=1e-12)
