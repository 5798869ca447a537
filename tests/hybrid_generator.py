"""Known-truth longitudinal cohort for the hybrid residual: FHIR R4 NDJSON with effects the mechanistic model lacks.

Why: a learned residual can only be checked against data whose generating process is known. Every patient
has yearly visits over ``years`` years; the truth (all constants below, nothing read from fhirtwin) is

* eGFR slope (mL/min/1.73 m2 per year) = -0.8 - EGFR_PM25 * (PM2.5 - 12) + EGFR_EXERCISE * (exercise - 120)
  + a personal slope ~ N(0, 0.6); measured with 5 % multiplicative noise;
* SBP slope (mmHg per year) = 0.5 + SBP_PM25 * (PM2.5 - 12) + N(0, 0.5); measured with sd 6 mmHg;
* LDL-C, HbA1c and BMI: a personal linear course with no exposure effect (the residual should learn nothing);
* PM2.5 (annual mean at residence, ug/m3) and exercise (Exercise Vital Sign, min/week) are constant per patient
  (reported yearly with small survey noise).

The exposure effects are deliberately larger than published associations so that a few hundred patients
suffice to detect them; they are a test device, not clinical estimates. Codes are LOINC as the FHIR reference
lists them (written here literally; this module imports nothing from fhirtwin).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
PM25_SYSTEM = "https://fhirtwin.org/CodeSystem/fhirtwin"  # fhirtwin's own code: no LOINC for ambient PM2.5

EGFR_PM25 = 0.15        # mL/min/1.73 m2 per year faster decline per ug/m3 of PM2.5
EGFR_EXERCISE = 0.004   # mL/min/1.73 m2 per year slower decline per min/week of exercise
SBP_PM25 = 0.30         # mmHg per year faster rise per ug/m3 of PM2.5
START = date(2015, 1, 15)

SMOKING = {"never": ("266919005", "Never smoked tobacco"), "former": ("8517006", "Ex-smoker"),
           "current": ("77176002", "Smoker")}


@dataclass(frozen=True)
class Truth:
    """One patient's generating parameters (for checks that want the truth itself)."""

    patient_id: str
    pm25: float
    exercise: float
    egfr_slope: float
    sbp_slope: float


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(float(value), 2), "unit": unit, "system": UCUM, "code": unit}


def _observation(oid: str, pid: str, when: date, system: str, code: str, display: str, category: str,
                 **value: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when.isoformat(), **value}


def _patient_resources(rng: np.random.Generator, index: int, years: int) -> tuple[Truth, list[dict[str, Any]],
                                                                                   list[dict[str, Any]]]:
    pid = f"hyb-{index:05d}"
    sex = "female" if rng.random() < 0.5 else "male"
    age0 = float(rng.uniform(45, 70))
    birth = START - timedelta(days=int(age0 * 365.25))
    pm25 = float(np.clip(rng.normal(12, 5), 3, 30))
    exercise = float(np.clip(rng.gamma(2.0, 60.0), 0, 600))
    egfr_slope = -0.8 - EGFR_PM25 * (pm25 - 12) + EGFR_EXERCISE * (exercise - 120) + rng.normal(0, 0.6)
    sbp_slope = 0.5 + SBP_PM25 * (pm25 - 12) + rng.normal(0, 0.5)
    egfr0 = float(np.clip(rng.normal(80, 14), 40, 115))
    sbp0 = float(np.clip(rng.normal(134, 14), 100, 180))
    ldl0, ldl_slope = float(np.clip(rng.normal(130, 28), 60, 220)), float(rng.normal(0, 2))
    hdl = float(np.clip(rng.normal(52, 12), 25, 95))
    a1c0, a1c_slope = float(np.clip(rng.normal(5.9, 0.6), 4.8, 9.0)), float(rng.normal(0.03, 0.04))
    bmi0, bmi_slope = float(np.clip(rng.normal(28.5, 4), 19, 42)), float(rng.normal(0.1, 0.2))
    smoking = str(rng.choice(list(SMOKING), p=[0.55, 0.3, 0.15]))
    patient = {"resourceType": "Patient", "id": pid, "gender": sex, "birthDate": birth.isoformat()}
    obs: list[dict[str, Any]] = []
    for year in range(years + 1):
        when = START + timedelta(days=int(365.25 * year + rng.integers(-20, 21)))
        n = f"{pid}-{year}"
        egfr = (egfr0 + egfr_slope * year) * np.exp(rng.normal(0, 0.05))
        sbp = sbp0 + sbp_slope * year + rng.normal(0, 6)
        ldl = (ldl0 + ldl_slope * year) * np.exp(rng.normal(0, 0.06))
        a1c = (a1c0 + a1c_slope * year) * np.exp(rng.normal(0, 0.02))
        bmi = (bmi0 + bmi_slope * year) * np.exp(rng.normal(0, 0.01))
        lab, vital, social = "laboratory", "vital-signs", "social-history"
        obs += [
            _observation(f"{n}-egfr", pid, when, LOINC, "62238-1", "eGFR CKD-EPI", lab,
                         valueQuantity=_quantity(max(egfr, 5.0), "mL/min/{1.73_m2}")),
            _observation(f"{n}-bp", pid, when, LOINC, "85354-9", "Blood pressure panel", vital, component=[
                {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _quantity(sbp, "mm[Hg]")},
                {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                 "valueQuantity": _quantity(0.6 * sbp, "mm[Hg]")}]),
            _observation(f"{n}-ldl", pid, when, LOINC, "13457-7", "LDL-C", lab, valueQuantity=_quantity(ldl, "mg/dL")),
            _observation(f"{n}-hdl", pid, when, LOINC, "2085-9", "HDL-C", lab, valueQuantity=_quantity(hdl, "mg/dL")),
            _observation(f"{n}-tc", pid, when, LOINC, "2093-3", "Total cholesterol", lab,
                         valueQuantity=_quantity(ldl + hdl + 25, "mg/dL")),
            _observation(f"{n}-a1c", pid, when, LOINC, "4548-4", "HbA1c", lab, valueQuantity=_quantity(a1c, "%")),
            _observation(f"{n}-bmi", pid, when, LOINC, "39156-5", "BMI", vital, valueQuantity=_quantity(bmi, "kg/m2")),
            _observation(f"{n}-smk", pid, when, LOINC, "72166-2", "Tobacco smoking status", social,
                         valueCodeableConcept={"coding": [{"system": SNOMED, "code": SMOKING[smoking][0],
                                                           "display": SMOKING[smoking][1]}]}),
            _observation(f"{n}-pm25", pid, when, PM25_SYSTEM, "pm25-annual-mean", "PM2.5 annual mean", social,
                         valueQuantity=_quantity(pm25 * np.exp(rng.normal(0, 0.05)), "ug/m3")),
        ]
        days = int(np.clip(round(exercise / 40.0), 1, 7)) if exercise > 0 else 0
        minutes = exercise * np.exp(rng.normal(0, 0.1)) / days if days else 0.0
        obs.append(_observation(f"{n}-evs", pid, when, LOINC, "89574-8", "Exercise Vital Sign", social, component=[
            {"code": {"coding": [{"system": LOINC, "code": "89555-7"}]}, "valueQuantity": _quantity(days, "d/wk")},
            {"code": {"coding": [{"system": LOINC, "code": "68516-4"}]},
             "valueQuantity": _quantity(minutes, "min/d")}]))
    return Truth(pid, pm25, exercise, egfr_slope, sbp_slope), [patient], obs


def write_cohort(folder: str | Path, n_patients: int, *, years: int = 6, seed: int = 0) -> list[Truth]:
    """Write ``Patient.ndjson`` and ``Observation.ndjson`` for ``n_patients`` into ``folder``; return the truth."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truths: list[Truth] = []
    with (out / "Patient.ndjson").open("w", encoding="utf-8") as patients, \
            (out / "Observation.ndjson").open("w", encoding="utf-8") as observations:
        for i in range(n_patients):
            truth, pats, obs = _patient_resources(rng, i, years)
            truths.append(truth)
            patients.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in pats)
            observations.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in obs)
    return truths
