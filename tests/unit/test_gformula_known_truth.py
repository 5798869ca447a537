"""The parametric g-formula recovers the true risks of time-varying statin strategies where the usual
adjusted regression is biased (data and truth from the independent generator in test_gformula_data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_gformula_data import ALWAYS, NEVER, observational, start_above, true_risk

from fhirtwin.causal.gformula import (
    NATURAL_COURSE,
    GFormulaError,
    Spec,
    always,
    gformula,
    naive_adjusted_odds_ratio,
    never,
    start_when,
)

SPEC = Spec(treatment="statin", covariates=("ldl",), baseline=("age0",))


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return observational(4000, seed=9)


@pytest.fixture(scope="module")
def result(data):
    strategies = {"never": never(), "always": always(), "ldl>160": start_when("ldl", 160.0),
                  "natural": NATURAL_COURSE}
    return gformula(data, SPEC, strategies, monte_carlo=4000, bootstrap=40, seed=9)


def test_the_gformula_interval_covers_the_true_risk_of_each_strategy(result) -> None:
    truth = {"never": true_risk(NEVER), "always": true_risk(ALWAYS), "ldl>160": true_risk(start_above(160.0))}
    for name, risk in truth.items():
        lo, hi = result.interval[name]
        assert lo <= risk <= hi, (name, risk, lo, hi)
        assert abs(result.risk[name] - risk) < 0.015
    effect = truth["always"] - truth["never"]
    lo, hi = result.difference_interval["always"]
    assert lo <= effect <= hi and hi - lo < 0.06
    assert result.bootstrap == 40


def test_the_natural_course_reproduces_the_observed_risk(result, data) -> None:
    observed = float(data.groupby("id")["event"].max().mean())  # no censoring: the observed cumulative incidence
    lo, hi = result.interval["natural"]
    assert lo - 0.005 <= observed <= hi + 0.005


def test_the_adjusted_regression_is_biased_where_the_gformula_is_not(data) -> None:
    true_ratio = true_risk(ALWAYS) / true_risk(NEVER)
    odds_ratio, lo, hi = naive_adjusted_odds_ratio(data, SPEC)
    assert true_ratio < 0.85  # statins protect (through LDL-C)
    assert lo > true_ratio + 0.05 and odds_ratio > 1.0  # adjusting for LDL-C: no benefit, even harm


def test_bad_tables_are_typed_errors(data) -> None:
    with pytest.raises(GFormulaError, match="lacks columns"):
        gformula(data.drop(columns="ldl"), SPEC, {"never": never()}, bootstrap=0)
    gap = data[data.period != 3]
    with pytest.raises(GFormulaError, match="without gaps"):
        gformula(gap, SPEC, {"never": never()}, bootstrap=0)
    late = data.copy()
    late.loc[late.period == 2, "event"] = 1.0
    with pytest.raises(GFormulaError, match="after a person's event"):
        gformula(late, SPEC, {"never": never()}, bootstrap=0)
    with pytest.raises(GFormulaError, match="reference"):
        gformula(data, SPEC, {"never": never()}, reference="always", bootstrap=0)
    assert np.isnan(gformula(data.head(2000), SPEC, {"never": never()}, bootstrap=0).interval["never"][0])
