"""Planner: paired ARR ranking and NNT."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.sim import get_model, plan
from fhirtwin.sim.planner import compare


@pytest.fixture(scope="module")
def result():
    model = get_model("fhirtwin-mechanistic").fit(patient(slco1b1_phenotype="decreased_function"))
    return plan(model, outcome="total_cvd", horizon_years=10, draws=300, seed=4)


def test_options_ranked_by_median_arr(result):
    arrs = [o.arr["median"] for o in result.options]
    assert arrs == sorted(arrs, reverse=True)
    assert len(result.options) >= 5
    # the bundle of everything eligible beats every single intervention
    best = result.options[0]
    assert len(best.scenario.interventions) == 4


def test_arr_is_paired_per_draw_and_nnt_is_its_inverse(result):
    base = result.baseline
    for o in result.options:
        f = result.forecasts[o.scenario.name]
        diff = base.cif["total_cvd"][:, 120] - f.cif["total_cvd"][:, 120]
        assert o.arr["median"] == pytest.approx(np.median(diff))
        assert o.arr["p05"] <= o.arr["median"] <= o.arr["p95"]
        if o.arr["p05"] > 0:
            assert o.nnt == pytest.approx(1 / o.arr["median"])
            assert o.nnt_interval[0] <= o.nnt <= o.nnt_interval[1]


def test_exclusions_carried_into_plan(result):
    assert any("simvastatin" in e.candidate for e in result.excluded)
    assert result.to_json()["options"][0]["nnt"] is not None


def test_no_benefit_gives_undefined_nnt():
    model = get_model("fhirtwin-mechanistic").fit(patient())
    f = model.simulate(None, 5, 50, 1)
    o = compare(f, f, "ascvd")
    assert o.arr["median"] == 0 and o.nnt is None and "undefined" in o.nnt_note


def test_unpaired_comparison_rejected():
    model = get_model("fhirtwin-mechanistic").fit(patient())
    with pytest.raises(ValueError):
        compare(model.simulate(None, 5, 50, 1), model.simulate(None, 5, 50, 2), "ascvd")
