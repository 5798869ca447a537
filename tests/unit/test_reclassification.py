"""Net reclassification: the formula on a hand-counted example, and a seeded cohort whose truth is known.

The virtual cohort's generator (fhirtwin.validation.events, step 7) gives Lp(a) a true effect (HR 1.11 per
50 nmol/L, a wide spread of values) and PM2.5 none; the engine applies published effects to both. So the
NRI interval must exclude 0 for Lp(a) and include 0 for PM2.5; a wrong sign, a unit slip or a leak of
the truth would break one of the two.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.sim.modifiers import reference_level
from fhirtwin.validation.events import generate
from fhirtwin.validation.reclassification import category_index, marker_risk, nri, reclassification


def test_categories_follow_the_guideline_cut_points():
    assert category_index(np.array([0.0, 0.0299, 0.03, 0.0499, 0.05, 0.0999, 0.10, 0.6])).tolist() == [
        0, 0, 1, 1, 2, 2, 3, 3]


def test_nri_on_a_hand_counted_example():
    old = np.array([0.02, 0.04, 0.06, 0.12, 0.02, 0.04, 0.06, 0.12, 0.04, 0.06])
    new = np.array([0.04, 0.06, 0.06, 0.12, 0.02, 0.02, 0.04, 0.20, 0.06, 0.04])
    event = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # events (4): up 2 (0->1, 1->2), down 0 -> +2/4; non-events (6): down 3 (1->0, 2->1, 2->1), up 1 (1->2)
    # -> +2/6; reclassified 2 + 4 = 6
    r = nri(old, new, event, bootstrap=200, seed=0)
    assert r.events == pytest.approx(0.5) and r.non_events == pytest.approx(2 / 6)
    assert r.nri == pytest.approx(0.5 + 2 / 6) and r.reclassified == 6
    assert (r.n_events, r.n_non_events) == (4, 6)
    assert r.nri_ci[0] <= r.nri <= r.nri_ci[1]


def test_lpa_reclassifies_correctly_and_a_null_marker_does_not():
    cohort = generate(6000, seed=13, markers=True)
    rows = {r.marker: r for r in reclassification(cohort, bootstrap=200, seed=13,
                                                  markers=("lipoprotein_a", "pm25"))}
    assert rows["lipoprotein_a"].nri_ci[0] > 0.0
    assert rows["lipoprotein_a"].events > 0.0  # events move up
    assert rows["pm25"].nri_ci[0] < 0.0 < rows["pm25"].nri_ci[1]


def test_the_cohort_without_markers_has_none():
    cohort = generate(20, seed=3)
    assert "lpa_nmol_l" not in cohort.attributes
    assert all(p.lpa_nmol_l is None and p.cac_agatston is None for p in cohort.inputs)


def test_total_cvd_has_the_one_published_threshold_and_moves_through_its_hf_part():
    assert category_index(np.array([0.0749, 0.075, 0.3]), "total_cvd").tolist() == [0, 1, 1]
    # one ln unit above men's population-typical level (multiplier 1 there): HF hazard x 1.95
    p = patient(nt_probnp_pg_ml=reference_level("nt_probnp", "male") * math.e)
    base = {"ascvd": np.array([0.10]), "heart_failure": np.array([0.05]), "total_cvd": np.array([0.14])}
    h_a, h_h = -math.log(0.90), -math.log(0.95)
    expected = 1 - 0.86 ** (h_a / (h_a + h_h) + h_h / (h_a + h_h) * 1.95)
    assert marker_risk([p], base, "nt_probnp", "total_cvd")[0] == pytest.approx(expected, rel=1e-9)
    assert marker_risk([p], base, "nt_probnp", "ascvd")[0] == pytest.approx(0.10, rel=1e-12)
