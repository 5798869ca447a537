"""Optional components: an off component's datum is not used (the forecast equals the one without it),
the deployment override is parsed strictly, and the engine records which components it used."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.sim import get_model
from fhirtwin.sim.components import (
    ComponentSettingError,
    component_inputs,
    component_names,
    enabled_components,
    parse_overrides,
)


def _forecast(components, **markers):
    return get_model("fhirtwin-mechanistic", components=components).fit(patient(**markers)).simulate(
        None, 10.0, 48, seed=3)


def test_every_marker_of_the_effect_table_is_a_component_with_its_inputs() -> None:
    inputs = component_inputs()
    assert {"lipoprotein_a", "hscrp", "coronary_calcium", "physical_activity", "nt_probnp", "pm25",
            "sdi_decile"} <= set(inputs)
    assert inputs["lipoprotein_a"] == ("lpa_nmol_l", "lpa_mg_dl")
    assert inputs["pm25"] == ("pm25_ug_m3",)


def test_an_off_component_is_exactly_as_if_its_value_were_not_recorded() -> None:
    everything = component_names()
    others = [c for c in everything if c != "lipoprotein_a"]
    off = _forecast(others, lpa_nmol_l=300.0, pm25_ug_m3=14.0)
    absent = _forecast(everything, pm25_ug_m3=14.0)
    on = _forecast(everything, lpa_nmol_l=300.0, pm25_ug_m3=14.0)
    for outcome in off.cif:
        np.testing.assert_array_equal(off.cif[outcome], absent.cif[outcome])
    assert on.at_horizon("ascvd")["median"] > off.at_horizon("ascvd")["median"] * 1.2  # 300 nmol/L acts when on
    assert any("lpa_nmol_l recorded but not used" in c for c in off.caveats)
    assert "lipoprotein_a" not in off.method["components_on"] and "pm25" in off.method["components_on"]
    assert not any(d.factor == "lipoprotein(a)" for d in off.drivers)


def test_overrides_are_strict_and_applied_over_the_defaults() -> None:
    assert parse_overrides(" pm25=off, lipoprotein_a=ON ,") == {"pm25": False, "lipoprotein_a": True}
    with pytest.raises(ComponentSettingError, match="unknown component"):
        parse_overrides("pm2.5=off")
    with pytest.raises(ComponentSettingError, match="'on' or 'off'"):
        parse_overrides("pm25=maybe")
    on = enabled_components({"FHIRTWIN_COMPONENTS": "pm25=on,hscrp=off"})
    assert "pm25" in on and "hscrp" not in on
    assert enabled_components({"FHIRTWIN_COMPONENTS": "pm25=off"}) == enabled_components({}) - {"pm25"}


def test_a_result_made_under_another_component_set_gets_another_identifier() -> None:
    from fhirtwin.writeback.riskassessment import risk_key

    everything = component_names()
    on = _forecast(everything, lpa_nmol_l=300.0)
    off = _forecast([c for c in everything if c != "lipoprotein_a"], lpa_nmol_l=300.0)
    none = _forecast([], lpa_nmol_l=300.0)
    keys = {risk_key(f, "ascvd") for f in (on, off, none)}
    assert len(keys) == 3  # otherwise a rerun under a new configuration would keep the stale result current
    assert risk_key(on, "ascvd") == risk_key(_forecast(everything, lpa_nmol_l=300.0), "ascvd")


def test_an_off_component_leaves_no_trace_in_sources_use_or_the_scale_summary() -> None:
    from datetime import date

    from fhirtwin.sim import inputs_from_state
    from fhirtwin.twin import Demographics, Evidence, SourceRef, TwinState, get_variable

    def ev(variable, value, rid):
        var = get_variable(variable)
        return Evidence(variable, var.scale, value, var.unit, date(2026, 3, 1), SourceRef("Observation", rid, "1"),
                        "final")

    state = TwinState("p1", date(2026, 6, 30), Demographics(sex="male", birth_date=date(1962, 1, 1)))
    state.extend([ev("total_cholesterol_mg_dl", 210.0, "tc"), ev("hdl_cholesterol_mg_dl", 50.0, "hdl"),
                  ev("ldl_cholesterol_mg_dl", 130.0, "ldl"), ev("systolic_bp_mm_hg", 138.0, "bp"),
                  ev("bmi_kg_m2", 27.0, "bmi"), ev("creatinine_mg_dl", 1.0, "cr"), ev("current_smoker", False, "s"),
                  ev("lpa_nmol_l", 250.0, "lpa"), ev("hscrp_mg_l", 15.0, "crp"), ev("lvef_percent", 55.0, "ef")])
    everything = [c for c in component_names() if c != "lipoprotein_a"]
    forecast = get_model("fhirtwin-mechanistic", components=everything).fit(inputs_from_state(state)).simulate(
        None, 10.0, 16, seed=0)
    assert "Observation/lpa/_history/1" not in forecast.sources  # Provenance must not name an unused input
    assert "Observation/ldl/_history/1" in forecast.sources
    scales = {s.scale: s for s in forecast.scales}
    assert scales["tissue"].switched_off == ("lpa_nmol_l",) and "switched off" in scales["tissue"].text()
    # hsCRP above 10 mg/L (acute phase) and LVEF are read but do not act: never shown as a model input
    assert "hscrp_mg_l" in scales["cellular"].read and "hscrp_mg_l" not in scales["cellular"].used
    assert "lvef_percent" in scales["organ"].read and "lvef_percent" not in scales["organ"].used
    with pytest.raises(ComponentSettingError, match="unknown component"):
        get_model("fhirtwin-mechanistic", components=["lpa"])


def test_the_model_card_reports_every_component_verdict_and_what_is_on() -> None:
    from fhirtwin.model_card import model_card
    from fhirtwin.sim.components import default_on, verdicts

    governance = model_card()["component_governance"]
    assert set(governance["components"]) == set(component_names())
    assert governance["on_in_this_deployment"] == sorted(enabled_components())
    shipped = verdicts()["components"]
    for name, entry in governance["components"].items():
        assert entry["default_on"] == shipped[name]["default_on"] == default_on(name)
        # the stated reason agrees with the default (an unevaluated published anchor is on)
        assert entry["default_on"] == (entry["reason"].startswith("on") or "published anchor" in entry["reason"])
