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
