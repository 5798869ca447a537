"""Medication adapter: RxNorm classes, statin intensity by daily dose, request vs statement status rules."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhirtwin.adapters import BuildOptions, build_twin
from fhirtwin.adapters.medications import statin_intensity
from fhirtwin.twin import LedgerKind

REF = date(2025, 1, 1)
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def req(
    rid: str,
    rxcui: str | None,
    status: str = "active",
    *,
    display: str | None = None,
    dose: tuple[float, str] | None = None,
    per_day: int | None = None,
    authored: str = "2020-01-01",
    **extra: Any,
) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": RX}
    if rxcui:
        coding["code"] = rxcui
    if display:
        coding["display"] = display
    res: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "meta": {"versionId": "1"},
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"coding": [coding] if rxcui else [], "text": display or ""},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": authored,
    }
    if dose or per_day:
        di: dict[str, Any] = {}
        if dose:
            di["doseAndRate"] = [{"doseQuantity": {"value": dose[0], "unit": dose[1], "code": dose[1]}}]
        if per_day:
            di["timing"] = {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}}
        res["dosageInstruction"] = [di]
    res.update(extra)
    return res


def build(*resources: dict[str, Any], **opts: Any):
    return build_twin("p1", list(resources), REF, BuildOptions(**opts) if opts else None)


@pytest.mark.parametrize(
    ("drug", "mg", "expected"),
    [
        ("atorvastatin", 80, "high"),
        ("atorvastatin", 40, "high"),
        ("atorvastatin", 20, "moderate"),
        ("atorvastatin", 10, "moderate"),
        ("rosuvastatin", 20, "high"),
        ("rosuvastatin", 5, "moderate"),
        ("simvastatin", 40, "moderate"),
        ("simvastatin", 10, "low"),
        ("pravastatin", 80, "moderate"),
        ("pravastatin", 20, "low"),
        ("lovastatin", 40, "moderate"),
        ("lovastatin", 20, "low"),
        ("pitavastatin", 1, "moderate"),
        ("pitavastatin", 4, "moderate"),
        ("fluvastatin", 40, "low"),
        ("simvastatin", 80, None),
    ],
)
def test_acc_aha_intensity_table(drug, mg, expected):
    assert statin_intensity(drug, mg) == expected


def test_intensity_from_product_strength():
    st = build(req("a", "617311"))  # atorvastatin 40 MG Oral Tablet
    assert st.value("on_statin") is True
    assert st.value("statin_intensity") == "high"
    assert st.latest("statin_intensity").original_value == 40.0


def test_intensity_from_dose_quantity_and_timing():
    # ingredient code only: dose from doseQuantity (mg) x frequency
    st = build(req("r", "301542", dose=(10, "mg"), per_day=2))
    assert st.value("statin_intensity") == "high"  # rosuvastatin 20 mg/day
    st2 = build(req("s", "312961", dose=(2, "{tbl}")))  # simvastatin 20 mg tablets x2 = 40 mg
    assert st2.value("statin_intensity") == "moderate"
    st3 = build(req("p", "904467"))  # pravastatin 20 mg
    assert st3.value("statin_intensity") == "low"


def test_text_fallback_for_unknown_product_code():
    st = build(req("t", "999999999", display="Lovastatin 40 MG Oral Tablet"))
    assert st.value("on_statin") is True and st.value("statin_intensity") == "moderate"


def test_unknown_dose_recorded_but_statin_counted():
    st = build(req("u", "36567"))  # simvastatin ingredient, no dose anywhere
    assert st.value("on_statin") is True
    assert st.latest_or_none("statin_intensity") is None
    assert st.ledger.kinds_for("MedicationRequest/u") == {LedgerKind.UNKNOWN_DOSE}


def test_classes_to_flags():
    st = build(
        req("l", "29046"),
        req("a", "17767"),
        req("h", "5487"),
        req("e", "1545653"),
        req("m", "6809"),
        req("c", "32968"),
    )
    for flag in ("on_bp_treatment", "on_sglt2i", "on_metformin", "on_clopidogrel"):
        assert st.value(flag) is True, flag
    assert st.latest_or_none("on_statin") is None


def test_combination_product_maps_both_ingredients():
    st = build(req("v", "476350"))  # ezetimibe 10 / simvastatin 40
    assert st.value("on_ezetimibe") is True and st.value("on_statin") is True
    assert st.value("statin_intensity") == "moderate"


def test_status_rules_for_requests():
    st = build(
        req(
            "stopped",
            "617311",
            "stopped",
            authored="2018-01-01",
            dispenseRequest={"validityPeriod": {"start": "2018-01-01", "end": "2019-01-01"}},
        ),
        req("eie", "29046", "entered-in-error"),
        req("cancelled", "6809", "cancelled"),
        req("proposal", "32968", intent="proposal"),
        req("dnp", "1545653", doNotPerform=True),
    )
    assert st.value("on_statin", as_of=date(2018, 6, 1)) is True
    assert st.value("on_statin") is False
    assert st.ledger.kinds_for("MedicationRequest/eie") == {LedgerKind.ENTERED_IN_ERROR}
    for rid in ("cancelled", "proposal", "dnp"):
        assert st.ledger.kinds_for(f"MedicationRequest/{rid}") == {LedgerKind.EXCLUDED}, rid
    for flag in ("on_bp_treatment", "on_metformin", "on_clopidogrel", "on_sglt2i"):
        assert st.latest_or_none(flag) is None


def test_on_hold_current_by_default_configurable():
    res = req("hold", "6809", "on-hold")
    assert build(res).value("on_metformin") is True
    st = build(res, on_hold_is_current=False)
    assert st.latest_or_none("on_metformin") is None


def test_stopped_order_does_not_cancel_another_active_one():
    st = build(
        req("old", "617310", "active", authored="2015-01-01"), req("x", "859751", "stopped", authored="2022-01-01")
    )
    assert st.value("on_statin") is True
    assert st.value("statin_intensity") == "moderate"


def statement(rid: str, rxcui: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationStatement",
        "id": rid,
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RX, "code": rxcui}]},
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


def test_medication_statement_vs_request():
    st = build(
        statement("taking", "859747", "active", effectiveDateTime="2021-03-01"),
        statement("past", "6809", "completed", effectivePeriod={"start": "2015-01-01", "end": "2016-01-01"}),
        statement("plan", "32968", "intended", effectiveDateTime="2024-01-01"),
        statement("no", "1545653", "not-taken", dateAsserted="2024-01-01"),
    )
    assert st.value("on_statin") is True and st.value("statin_intensity") == "moderate"
    assert st.latest("on_statin").time == date(2021, 3, 1)
    assert st.value("on_metformin", as_of=date(2015, 6, 1)) is True
    assert st.value("on_metformin") is False
    assert st.ledger.kinds_for("MedicationStatement/plan") == {LedgerKind.EXCLUDED}
    assert st.ledger.kinds_for("MedicationStatement/no") == {LedgerKind.EXCLUDED}


def test_medication_reference_resolved_and_traced():
    med = {
        "resourceType": "Medication",
        "id": "med1",
        "meta": {"versionId": "4"},
        "code": {"coding": [{"system": RX, "code": "259255"}]},
    }
    res = req("byref", None)
    del res["medicationCodeableConcept"]
    res["medicationReference"] = {"reference": "Medication/med1"}
    st = build(res, med)
    ev = st.latest("statin_intensity")
    assert ev.value == "high"
    assert "Medication/med1/_history/4" in {s.reference for s in ev.sources()}
    assert not st.ledger.entries(source="Medication/med1")


def test_unmapped_class_and_unknown_drug_recorded():
    st = build(req("asp", "1191"), req("zzz", "123", display="unobtainium 5 MG"))
    assert st.ledger.kinds_for("MedicationRequest/asp") == {LedgerKind.UNMAPPED}
    assert st.ledger.kinds_for("MedicationRequest/zzz") == {LedgerKind.UNMAPPED}
