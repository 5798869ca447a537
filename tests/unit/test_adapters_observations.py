"""Observation adapter: LOINC mapping, UCUM conversions, status rules, BP panels, behaviour, environment."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from fhirtwin.adapters import BuildOptions, build_twin
from fhirtwin.twin import LedgerKind, Scale

REF = date(2025, 1, 1)
PID = "p1"


def obs(
    rid: str,
    code: str,
    value: float | None = None,
    unit: str | None = "mg/dL",
    *,
    system: str = "http://loinc.org",
    status: str = "final",
    when: str = "2024-05-01T08:00:00Z",
    ucum: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": "1"},
        "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": when,
    }
    if value is not None:
        q: dict[str, Any] = {"value": value}
        if unit is not None:
            q["unit"] = unit
            if ucum:
                q |= {"system": "http://unitsofmeasure.org", "code": unit}
        res["valueQuantity"] = q
    res.update(extra)
    return res


def build(*resources: dict[str, Any], **opts: Any):
    return build_twin(PID, list(resources), REF, BuildOptions(**opts) if opts else None)


def test_cholesterol_mmol_to_mg_dl_with_provenance():
    st = build(obs("tc", "14647-2", 5.2, "mmol/L"))
    ev = st.latest("total_cholesterol_mg_dl")
    assert ev.value == pytest.approx(5.2 * 38.67)
    assert (ev.unit, ev.original_value, ev.original_unit) == ("mg/dL", 5.2, "mmol/L")
    assert ev.note and "converted from mmol/L" in ev.note
    assert ev.source.reference == "Observation/tc/_history/1"
    assert st.ledger.kinds_for("Observation/tc") == {LedgerKind.CONVERTED}


def test_every_ldl_code_maps_including_molar():
    codes = ["13457-7", "18262-6", "2089-1", "96259-7"]
    molar = ["22748-8", "39469-2", "96258-9"]
    resources = [obs(f"m{i}", c, 100.0 + i, when=f"2024-0{i + 1}-01") for i, c in enumerate(codes)]
    resources += [obs(f"s{i}", c, 3.0, "mmol/L", when=f"2023-0{i + 1}-01") for i, c in enumerate(molar)]
    st = build(*resources)
    assert len(st.history("ldl_cholesterol_mg_dl")) == 7
    assert st.value("ldl_cholesterol_mg_dl") == 103.0


def test_triglycerides_glucose_and_uacr_conversions():
    st = build(
        obs("tg", "14927-8", 1.5, "mmol/L"),
        obs("glu", "14749-6", 5.5, "mmol/L"),
        obs("uacr", "9318-7", 3.0, "mg/mmol"),
    )
    assert st.value("triglycerides_mg_dl") == pytest.approx(1.5 * 88.57)
    assert st.value("glucose_mg_dl") == pytest.approx(5.5 * 18.016)
    assert st.value("uacr_mg_g") == pytest.approx(3.0 * 8.84)


def test_creatinine_umol_l_to_mg_dl_with_micro_sign_alias():
    st = build(obs("cr", "14682-9", 88.4, "µmol/L", ucum=False))
    ev = st.latest("creatinine_mg_dl")
    assert ev.value == pytest.approx(1.0)
    assert ev.original_unit == "µmol/L"


def test_hba1c_ifcc_mmol_mol_to_percent_master_equation():
    st = build(obs("a1c", "59261-8", 53.0, "mmol/mol"))
    assert st.value("hba1c_percent") == pytest.approx(0.09148 * 53 + 2.152)
    assert st.value("hba1c_percent") == pytest.approx(7.0, abs=0.05)


def test_weight_lb_and_height_inches():
    st = build(obs("w", "29463-7", 200.0, "[lb_av]"), obs("h", "8302-2", 70.0, "in", ucum=False))
    assert st.value("weight_kg") == pytest.approx(90.718474)
    assert st.value("height_cm") == pytest.approx(177.8)


def test_curly_brace_annotations_and_lowercase_litre():
    st = build(
        obs("egfr", "98979-8", 72.0, "mL/min/{1.73_m2}"),
        obs("uacr", "14959-1", 12.0, "mg/g{creat}"),
        obs("hdl", "2085-9", 50.0, "mg/dl"),
    )
    assert st.latest("egfr_ml_min_1_73m2").unit == "mL/min/{1.73_m2}"
    assert st.value("uacr_mg_g") == 12.0
    assert st.value("hdl_cholesterol_mg_dl") == 50.0
    assert len(st.ledger.entries(kind="converted")) == 0


def test_missing_unit_rejected_never_guessed():
    st = build(obs("nounit", "2093-3", 200.0, None))
    assert st.latest_or_none("total_cholesterol_mg_dl") is None
    [entry] = st.ledger.entries(source="Observation/nounit")
    assert entry.kind is LedgerKind.MISSING_UNIT and entry.variable == "total_cholesterol_mg_dl"


def test_unknown_unit_rejected():
    st = build(obs("odd", "2093-3", 200.0, "furlongs", ucum=False), obs("wrongdim", "2093-3", 2.0, "kg"))
    assert st.latest_or_none("total_cholesterol_mg_dl") is None
    assert st.ledger.kinds_for("Observation/odd") == {LedgerKind.UNKNOWN_UNIT}
    assert st.ledger.kinds_for("Observation/wrongdim") == {LedgerKind.UNKNOWN_UNIT}


def test_implausible_value_rejected_and_recorded_without_the_value():
    st = build(obs("sbp", "8480-6", 400.0, "mm[Hg]"), obs("a1c", "4548-4", 40.0, "%"))
    assert st.latest_or_none("systolic_bp_mm_hg") is None
    assert st.latest_or_none("hba1c_percent") is None
    [entry] = st.ledger.entries(source="Observation/sbp")
    assert entry.kind is LedgerKind.IMPLAUSIBLE
    assert "400" not in entry.message


def test_entered_in_error_excluded_and_recorded():
    st = build(obs("ok", "2093-3", 190.0), obs("eie", "2093-3", 290.0, status="entered-in-error"))
    assert [e.source.id for e in st.history("total_cholesterol_mg_dl")] == ["ok"]
    assert st.ledger.kinds_for("Observation/eie") == {LedgerKind.ENTERED_IN_ERROR}


def test_preliminary_excluded_by_default_and_configurable():
    prelim = obs("pre", "2093-3", 190.0, status="preliminary")
    st = build(prelim)
    assert st.latest_or_none("total_cholesterol_mg_dl") is None
    assert st.ledger.kinds_for("Observation/pre") == {LedgerKind.NOT_FINAL}
    st2 = build(prelim, accept_preliminary=True)
    assert st2.latest("total_cholesterol_mg_dl").status == "preliminary"
    assert st2.ledger.kinds_for("Observation/pre") == {LedgerKind.NOT_FINAL}


def test_amended_and_corrected_are_used_cancelled_is_not():
    st = build(
        obs("am", "2093-3", 190.0, status="amended", when="2024-01-01"),
        obs("co", "2093-3", 191.0, status="corrected", when="2024-02-01"),
        obs("ca", "2093-3", 192.0, status="cancelled", when="2024-03-01"),
    )
    assert [e.status for e in st.history("total_cholesterol_mg_dl")] == ["amended", "corrected"]
    assert st.ledger.kinds_for("Observation/ca") == {LedgerKind.NOT_FINAL}


def test_duplicates_collapsed_and_recorded():
    st = build(obs("d1", "2093-3", 190.0), obs("d2", "2093-3", 190.0), obs("d3", "2093-3", 191.0))
    assert [e.source.id for e in st.history("total_cholesterol_mg_dl")] == ["d1", "d3"]
    [entry] = st.ledger.entries(kind="duplicate")
    assert entry.source == "Observation/d2/_history/1" and "Observation/d1" in entry.message


def test_same_resource_twice_keeps_latest_version():
    v1 = obs("same", "2093-3", 190.0)
    v2 = obs("same", "2093-3", 200.0) | {"meta": {"versionId": "2"}}
    st = build(v1, v2)
    assert st.value("total_cholesterol_mg_dl") == 200.0
    assert st.ledger.entries(kind="duplicate")[0].source == "Observation/same/_history/1"


def bp_panel(rid: str, sbp: float | None, dbp: float | None, code: str = "85354-9", **extra: Any) -> dict[str, Any]:
    def comp(c: str, v: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"code": {"coding": [{"system": "http://loinc.org", "code": c}]}}
        if v is None:
            out["dataAbsentReason"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]
            }
        else:
            out["valueQuantity"] = {"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
        return out

    res = obs(rid, code, **extra)
    res["component"] = [comp("8480-6", sbp), comp("8462-4", dbp)]
    return res


def test_bp_panel_components_current_and_legacy_codes():
    st = build(bp_panel("p", 132.0, 84.0, when="2024-01-01"), bp_panel("legacy", 128.0, 80.0, "55284-4"))
    assert st.value("systolic_bp_mm_hg") == 128.0
    assert st.value("diastolic_bp_mm_hg") == 80.0
    assert len(st.history("systolic_bp_mm_hg")) == 2


def test_bp_component_with_data_absent_reason_keeps_the_other():
    st = build(bp_panel("p", 140.0, None))
    assert st.value("systolic_bp_mm_hg") == 140.0
    assert st.latest_or_none("diastolic_bp_mm_hg") is None
    [entry] = st.ledger.entries(source="Observation/p")
    assert entry.kind is LedgerKind.NO_VALUE and entry.variable == "diastolic_bp_mm_hg"


def test_bp_panel_and_standalone_same_reading_deduplicated():
    st = build(bp_panel("panel", 130.0, 82.0), obs("solo", "8480-6", 130.0, "mm[Hg]"))
    assert len(st.history("systolic_bp_mm_hg")) == 1
    assert st.ledger.kinds_for("Observation/solo") == {LedgerKind.DUPLICATE}


def test_non_ucum_mmhg_unit_string():
    st = build(obs("s", "8480-6", 121.0, "mmHg", ucum=False))
    assert st.latest("systolic_bp_mm_hg").unit == "mm[Hg]"


def test_comparator_preserved_as_censoring():
    res = obs("egfr", "33914-3", 60.0, "mL/min/{1.73_m2}")
    res["valueQuantity"]["comparator"] = ">"
    st = build(res)
    ev = st.latest("egfr_ml_min_1_73m2")
    assert ev.comparator == ">" and ev.censored and ev.value == 60.0


def test_data_absent_reason_means_no_value():
    res = obs("dar", "2093-3")
    res["dataAbsentReason"] = {"coding": [{"code": "not-performed"}]}
    st = build(res)
    assert st.latest_or_none("total_cholesterol_mg_dl") is None
    assert st.ledger.kinds_for("Observation/dar") == {LedgerKind.NO_VALUE}


def test_time_precedence_period_end_then_start_then_instant_then_issued():
    base = obs("x", "2093-3", 190.0)
    del base["effectiveDateTime"]
    a = base | {
        "id": "a",
        "effectivePeriod": {"start": "2024-01-01", "end": "2024-01-03"},
        "issued": "2024-02-01T00:00:00Z",
    }
    b = base | {"id": "b", "effectivePeriod": {"start": "2023-01-01"}}
    c = base | {"id": "c", "effectiveInstant": "2022-01-01T10:00:00+02:00"}
    d = base | {"id": "d", "issued": "2021-01-01T00:00:00Z"}
    st = build(a, b, c, d)
    times = {e.source.id: e.time for e in st.history("total_cholesterol_mg_dl")}
    assert times["a"] == date(2024, 1, 3)
    assert times["b"] == date(2023, 1, 1)
    assert times["c"] == datetime(2022, 1, 1, 8, 0, tzinfo=UTC)
    assert times["d"] == datetime(2021, 1, 1, tzinfo=UTC)


def test_race_specific_egfr_and_test_strip_uacr_excluded():
    st = build(obs("race", "48643-1", 70.0, "mL/min/{1.73_m2}"), obs("strip", "30001-2", 30.0, "mg/g"))
    assert st.latest_or_none("egfr_ml_min_1_73m2") is None
    assert st.ledger.kinds_for("Observation/race") == {LedgerKind.EXCLUDED}
    assert st.ledger.kinds_for("Observation/strip") == {LedgerKind.EXCLUDED}


def test_unmapped_code_recorded():
    st = build(obs("hr", "8867-4", 70.0, "/min"))
    assert st.ledger.kinds_for("Observation/hr") == {LedgerKind.UNMAPPED}


def smoking(rid: str, snomed: str, when: str = "2024-01-01") -> dict[str, Any]:
    res = obs(rid, "72166-2", when=when)
    res["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct", "code": snomed}]}
    return res


def test_smoking_status_answers():
    st = build(smoking("now", "449868002", "2024-01-01"), smoking("ex", "8517006", "2020-01-01"))
    ev = st.latest("current_smoker")
    assert ev.value is True and ev.scale is Scale.BEHAVIORAL
    assert st.value("smoking_status") == "current"
    assert st.value("current_smoker", as_of=date(2021, 1, 1)) is False
    assert st.value("smoking_status", as_of=date(2021, 1, 1)) == "former"


def test_smoking_unknown_not_guessed():
    st = build(smoking("unk", "266927001"))
    assert st.latest_or_none("current_smoker") is None
    assert st.ledger.kinds_for("Observation/unk") == {LedgerKind.NO_VALUE}


def test_exercise_vital_sign_panel_and_weekly_minutes():
    panel = obs("evs", "89574-8")
    panel["component"] = [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "89555-7"}]},
            "valueQuantity": {"value": 3, "unit": "days/week", "system": "http://unitsofmeasure.org", "code": "d/wk"},
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "68516-4"}]},
            "valueQuantity": {"value": 40, "unit": "min/day", "system": "http://unitsofmeasure.org", "code": "min/d"},
        },
    ]
    st = build(panel, obs("aer", "82290-8", 150.0, "min/wk", when="2024-06-01"))
    history = st.history("exercise_min_per_week")
    assert [e.value for e in history] == [120.0, 150.0]
    assert history[0].scale is Scale.BEHAVIORAL and "derived" in (history[0].note or "")


def test_exercise_standalone_items_paired():
    days = obs("d", "89555-7", 5.0, "d/wk")
    mins = obs("m", "68516-4", 30.0, "min/d")
    st = build(days, mins)
    ev = st.latest("exercise_min_per_week")
    assert ev.value == 150.0
    assert {s.id for s in ev.sources()} == {"d", "m"}


def test_pm25_environmental_exposure():
    st = build(obs("pm", "pm25-annual-mean", 9.5, "ug/m3", system="https://fhirtwin.org/CodeSystem/fhirtwin"))
    ev = st.latest("pm25_ug_m3")
    assert ev.value == 9.5 and ev.scale is Scale.ENVIRONMENTAL


def test_non_hdl_derived_from_same_draw():
    st = build(obs("tc", "2093-3", 200.0), obs("hdl", "2085-9", 50.0))
    ev = st.latest("non_hdl_cholesterol_mg_dl")
    assert ev.value == 150.0 and ev.note == "derived TC−HDL"
    assert {s.id for s in ev.sources()} == {"tc", "hdl"}
    assert LedgerKind.DERIVED in st.ledger.kinds_for("Observation/tc")


def test_malformed_observations_do_not_crash():
    no_code = obs("nocode", "2093-3", 190.0)
    del no_code["code"]
    text_value = obs("text", "2093-3")
    text_value["valueQuantity"] = {"value": "high", "unit": "mg/dL"}
    string_value = obs("str", "2093-3", valueString="190")
    st = build(no_code, text_value, string_value, obs("good", "2093-3", 180.0))
    assert st.value("total_cholesterol_mg_dl") == 180.0
    for rid in ("nocode", "text", "str"):
        assert st.ledger.kinds_for(f"Observation/{rid}") == {LedgerKind.MALFORMED}, rid


def test_gfr_in_ml_min_is_never_taken_as_per_body_surface():
    st = build(
        obs("gfr-abs", "98979-8", 73.0, "mL/min"),
        obs("gfr-norm", "33914-3", 61.0, "mL/min/1.73m2", ucum=False, when="2024-06-01T08:00:00Z"),
    )
    assert st.value("egfr_ml_min_1_73m2") == 61.0
    assert [ev.source.id for ev in st.history("egfr_ml_min_1_73m2")] == ["gfr-norm"]
    assert [ev.source.id for ev in st.history("egfr_ml_min")] == ["gfr-abs"]
    assert st.value("egfr_ml_min") == 73.0
