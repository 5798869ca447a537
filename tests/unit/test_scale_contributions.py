"""What each scale contributed: statuses from drivers and recorded data, and a marker that moves a scale.

The marker patient is a sandbox cohort record plus one Lp(a) result (LOINC 43583-4, 250 nmol/L, far above
the population's usual values): the tissue scale must then say Lp(a) moves the forecast upward, and without
that result it must not name Lp(a).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import date

from writeback_fixtures import versioned_resources

from fhirtwin.adapters import build_twin
from fhirtwin.engine import Engine
from fhirtwin.sim.components import component_names
from fhirtwin.sim.contributions import scale_contributions

SCALES = ("molecular", "cellular", "tissue", "organ", "clinical", "behavioral", "environmental")


@dataclass(frozen=True)
class _Driver:
    factor: str
    outcome: str
    scale: str
    contribution: float


def test_each_scale_is_acting_used_read_or_without_data_in_a_fixed_order() -> None:
    drivers = [_Driver("SBP", "total_cvd", "organ", 0.04), _Driver("eGFR", "heart_failure", "organ", 0.06),
               _Driver("coronary calcium", "ascvd", "organ", -0.08), _Driver("PM2.5", "ascvd", "environmental", 0.01)]
    read = {"organ": ["systolic_bp_mm_hg", "egfr_ml_min_1_73m2"], "tissue": ["ldl_cholesterol_mg_dl"],
            "cellular": ["hscrp_mg_l"], "environmental": ["pm25_ug_m3"]}
    out = scale_contributions(drivers, read, used=["ldl_cholesterol_mg_dl", "systolic_bp_mm_hg"])
    assert [s.scale for s in out] == list(SCALES)
    status = {s.scale: s.status for s in out}
    assert status == {"molecular": "no data", "cellular": "read", "tissue": "used", "organ": "acts",
                      "clinical": "no data", "behavioral": "no data", "environmental": "acts"}
    organ = out[3]
    # the largest move by size, either sign: calcium 0 lowering the risk by 8 points
    assert organ.largest_points == -0.08 and organ.largest_outcome == "ascvd"
    assert organ.factors == ("coronary calcium", "eGFR", "SBP")
    assert "-8.0 points of ascvd risk" in organ.text()
    assert out[1].text().endswith("(hscrp_mg_l)")


def _observation(rid: str, patient: str, code: str, value: float, unit: str) -> dict:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1"}, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2026-02-01T08:00:00Z",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


def _scales(resources: list[dict], patient: str) -> dict:
    state = build_twin(patient, resources, date(2026, 6, 30))
    run = Engine(components=component_names()).simulate(state, draws=60)
    assert run.plan is not None, run.error
    return {s.scale: s for s in run.plan.baseline.scales}


def test_a_recorded_lpa_makes_the_tissue_scale_act() -> None:
    patient, resources = versioned_resources()
    before = _scales(copy.deepcopy(resources), patient)
    assert "lipoprotein(a)" not in before["tissue"].factors
    with_markers = [*copy.deepcopy(resources),
                    _observation("lpa-1", patient, "43583-4", 250.0, "nmol/L")]
    after = _scales(with_markers, patient)
    tissue = after["tissue"]
    assert tissue.status == "acts" and "lipoprotein(a)" in tissue.factors, tissue.text()
    assert tissue.largest_points > 0
    assert "lpa_nmol_l" in tissue.read and "lpa_nmol_l" in tissue.used
