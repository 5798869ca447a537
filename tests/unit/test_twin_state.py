"""TwinState contract: latest/lookback semantics, episodes, ledger, JSON round trip, DataFrame."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from fhirtwin.twin import (
    FRAME_COLUMNS,
    Demographics,
    Evidence,
    Ledger,
    LedgerKind,
    MissingEvidence,
    Scale,
    SourceRef,
    TwinState,
    UnknownVariable,
    get_variable,
    registry,
)

REF = date(2025, 1, 1)


def ldl(value: float, when: date | datetime, rid: str, **kw) -> Evidence:
    return Evidence(
        "ldl_cholesterol_mg_dl", Scale.TISSUE, value, "mg/dL", when, SourceRef("Observation", rid, "1"), "final", **kw
    )


def flag(variable: str, when: date, end: date | None, rid: str, value: bool | str = True) -> Evidence:
    var = get_variable(variable)
    return Evidence(variable, var.scale, value, None, when, SourceRef("Condition", rid, "2"), "active", end=end)


def make_state() -> TwinState:
    st = TwinState("p1", REF, Demographics(sex="female", birth_date=date(1960, 6, 15), race="white"))
    st.add(ldl(130.0, date(2022, 3, 1), "a"))
    st.add(ldl(110.0, datetime(2024, 6, 1, 9, 30, tzinfo=UTC), "b", original_value=2.84, original_unit="mmol/L"))
    st.add(ldl(95.0, date(2026, 1, 1), "future"))
    return st


def test_source_ref_reference_strings():
    assert SourceRef("Observation", "x", "3").reference == "Observation/x/_history/3"
    assert SourceRef("Observation", "x").reference == "Observation/x"
    with pytest.raises(ValueError):
        SourceRef.of({"resourceType": "Observation"})


def test_latest_defaults_to_reference_date_and_respects_as_of():
    st = make_state()
    assert st.latest("ldl_cholesterol_mg_dl").value == 110.0  # the 2026 value is after the reference date
    assert st.value("ldl_cholesterol_mg_dl", as_of=date(2023, 1, 1)) == 130.0
    assert st.value("ldl_cholesterol_mg_dl", as_of=date(2027, 1, 1)) == 95.0
    # a date as_of includes that whole day
    assert st.value("ldl_cholesterol_mg_dl", as_of=date(2024, 6, 1)) == 110.0


def test_lookback_and_missing_evidence_raise():
    st = make_state()
    assert st.latest("ldl_cholesterol_mg_dl", lookback=timedelta(days=365)).value == 110.0
    with pytest.raises(MissingEvidence, match="ldl_cholesterol_mg_dl"):
        st.latest("ldl_cholesterol_mg_dl", as_of=date(2024, 1, 1), lookback=timedelta(days=90))
    assert st.latest_or_none("ldl_cholesterol_mg_dl", as_of=date(2024, 1, 1), lookback=timedelta(days=90)) is None
    with pytest.raises(MissingEvidence):
        st.latest("hdl_cholesterol_mg_dl")
    with pytest.raises(UnknownVariable):
        st.latest("ldl_mmol")


def test_history_sorted_and_by_scale():
    st = make_state()
    assert [e.value for e in st.history("ldl_cholesterol_mg_dl")] == [130.0, 110.0, 95.0]
    view = st.by_scale()
    assert set(view) == set(Scale)
    assert list(view[Scale.TISSUE]) == ["ldl_cholesterol_mg_dl"]
    assert view[Scale.MOLECULAR] == {}


def test_age_years_and_birth_date_not_in_repr():
    st = make_state()
    assert st.age_years() == 64
    assert st.age_years(date(2025, 6, 15)) == 65
    assert "1960" not in repr(st.demographics)


def test_scale_must_match_registry():
    st = make_state()
    with pytest.raises(ValueError):
        st.add(
            Evidence("ldl_cholesterol_mg_dl", Scale.ORGAN, 1.0, "mg/dL", REF, SourceRef("Observation", "z"), "final")
        )


def test_naive_datetime_rejected():
    with pytest.raises(ValueError):
        ldl(100.0, datetime(2024, 1, 1, 12, 0), "n")


def test_current_episode_semantics_with_overlaps():
    st = TwinState("p1", REF)
    st.add(flag("hypertension", date(2015, 1, 1), None, "active-one"))
    st.add(flag("hypertension", date(2019, 1, 1), date(2020, 1, 1), "resolved-one"))
    # a resolved record does not cancel another active one
    assert st.value("hypertension") is True
    assert st.latest("hypertension").source.id == "active-one"
    st2 = TwinState("p1", REF)
    st2.add(flag("diabetes", date(2010, 1, 1), date(2012, 1, 1), "d"))
    assert st2.value("diabetes", as_of=date(2011, 1, 1)) is True
    off = st2.latest("diabetes")
    assert off.value is False and off.time == date(2012, 1, 1) and off.source.id == "d"
    with pytest.raises(MissingEvidence):
        st2.latest("diabetes", as_of=date(2009, 1, 1))
    # an ended episode is "current False" only within the lookback
    assert st2.latest_or_none("diabetes", lookback=timedelta(days=30)) is None


def test_history_episode_and_ordinal_levels():
    st = TwinState("p1", REF)
    st.add(flag("prior_mi", date(2010, 1, 1), date(2010, 2, 1), "mi"))
    assert st.value("prior_mi") is True  # history-of: resolved still counts
    st.add(flag("statin_intensity", date(2020, 1, 1), None, "s1", "moderate"))
    st.add(flag("statin_intensity", date(2021, 1, 1), None, "s2", "high"))
    st.add(flag("statin_intensity", date(2022, 1, 1), None, "s3", "low"))
    assert st.value("statin_intensity") == "high"


def test_sources_include_derived_from():
    st = TwinState("p1", REF)
    hdl_src = SourceRef("Observation", "hdl", "1")
    st.add(
        Evidence(
            "non_hdl_cholesterol_mg_dl",
            Scale.TISSUE,
            150.0,
            "mg/dL",
            REF,
            SourceRef("Observation", "tc", "1"),
            "final",
            note="derived TC−HDL",
            derived_from=(hdl_src,),
        )
    )
    assert {s.id for s in st.sources()} == {"tc", "hdl"}


def test_json_round_trip_equality():
    st = make_state()
    st.add(flag("prior_mi", date(2010, 1, 1), date(2010, 2, 1), "mi"))
    st.add(
        Evidence(
            "egfr_ml_min_1_73m2",
            Scale.ORGAN,
            60.0,
            "mL/min/{1.73_m2}",
            date(2024, 2, 2),
            SourceRef("Observation", "e", "1", "2024-02-02T00:00:00Z"),
            "final",
            comparator=">",
            original_value=60.0,
        )
    )
    st.add(Evidence("current_smoker", Scale.BEHAVIORAL, False, None, REF, SourceRef("Observation", "s"), "final"))
    st.ledger.add("Observation/x/_history/1", LedgerKind.MISSING_UNIT, "no unit", "ldl_cholesterol_mg_dl")
    back = TwinState.from_json(st.to_json())
    assert back == st
    assert back.latest("egfr_ml_min_1_73m2").comparator == ">"
    assert back.latest("current_smoker").value is False
    assert back.demographics.birth_date == date(1960, 6, 15)


def test_to_frame_columns_and_types():
    st = make_state()
    frame = st.to_frame()
    assert tuple(frame.columns) == FRAME_COLUMNS
    assert list(frame.columns[:10]) == [
        "patient",
        "scale",
        "variable",
        "time",
        "value",
        "unit",
        "original_value",
        "original_unit",
        "source",
        "status",
    ]
    assert len(frame) == 3
    assert str(frame["time"].dt.tz) == "UTC"
    assert frame.loc[1, "source"] == "Observation/b/_history/1"
    assert frame.loc[1, "original_unit"] == "mmol/L"


def test_ledger_queries():
    led = Ledger()
    led.add("Observation/a/_history/2", LedgerKind.IMPLAUSIBLE, "outside range", "systolic_bp_mm_hg")
    led.add("Observation/b", "converted", "mmol/L -> mg/dL")
    assert led.kinds_for("Observation/a") == {LedgerKind.IMPLAUSIBLE}
    assert led.entries(kind="converted")[0].source == "Observation/b"
    assert led.entries(kind=LedgerKind.IMPLAUSIBLE)[0].rejected
    assert not led.entries(kind="converted")[0].rejected
    assert led.counts() == {"implausible": 1, "converted": 1}
    assert Ledger.from_json(led.to_json()) == led


def test_registry_names_units_and_range_sources():
    reg = registry()
    for name in (
        "ldl_cholesterol_mg_dl",
        "total_cholesterol_mg_dl",
        "hdl_cholesterol_mg_dl",
        "triglycerides_mg_dl",
        "systolic_bp_mm_hg",
        "diastolic_bp_mm_hg",
        "hba1c_percent",
        "glucose_mg_dl",
        "creatinine_mg_dl",
        "egfr_ml_min_1_73m2",
        "uacr_mg_g",
        "potassium_mmol_l",
        "bmi_kg_m2",
        "weight_kg",
        "height_cm",
        "diabetes",
        "hypertension",
        "ckd",
        "prior_mi",
        "prior_stroke",
        "heart_failure",
        "familial_hypercholesterolemia",
        "on_statin",
        "statin_intensity",
        "on_bp_treatment",
        "on_sglt2i",
        "on_metformin",
        "on_clopidogrel",
        "fh_variant",
        "apol1_risk_alleles",
        "slco1b1_phenotype",
        "cyp2c19_phenotype",
        "cad_prs_z",
        "current_smoker",
        "exercise_min_per_week",
        "pm25_ug_m3",
    ):
        assert name in reg, name
    for var in reg.values():
        assert var.range_source, var.name
        if var.kind == "quantity":
            assert var.unit and var.plausible and var.family, var.name
    assert reg["pm25_ug_m3"].scale is Scale.ENVIRONMENTAL
    assert reg["current_smoker"].scale is Scale.BEHAVIORAL
    assert reg["fh_variant"].scale is Scale.MOLECULAR
