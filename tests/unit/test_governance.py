"""The component governance rule on predictions whose calibration is known by construction.

Events are drawn from known risks; a "component" that inflates one subgroup's predictions must be found to
worsen that subgroup and be off by default, and one that leaves predictions calibrated must stay on.
"""

from __future__ import annotations

import numpy as np

from fhirtwin.validation.calibration import score
from fhirtwin.validation.events import HORIZONS, OUTCOMES
from fhirtwin.validation.governance import verdict


def _cohort(n: int = 6000, seed: int = 7) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                   dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    attributes = {
        "sex": np.where(rng.random(n) < 0.5, "female", "male"),
        "race": np.where(rng.random(n) < 0.2, "black", "white"),
        "age": rng.uniform(40, 79, n),
        "egfr_recorded": rng.uniform(20, 110, n),
        "diabetes": (rng.random(n) < 0.2).astype(float),
    }
    truth, observed = {}, {}
    for outcome in OUTCOMES:
        five = np.clip(rng.beta(2, 18, n), 0.002, 0.3)
        risk = np.column_stack([five, 1.9 * five])
        u = rng.random(n)
        truth[outcome] = risk
        observed[outcome] = np.column_stack([(u < risk[:, j]).astype(float) for j in range(len(HORIZONS))])
    return truth, observed, attributes


def test_inflating_one_subgroup_is_found_and_turns_the_component_off() -> None:
    truth, observed, attributes = _cohort()
    without = score(truth, observed, truth, attributes)
    female = attributes["sex"] == "female"
    inflated = {o: np.where(female[:, None], np.clip(1.7 * p, 0, 1), p) for o, p in truth.items()}
    result = verdict("inflate-women", without, score(inflated, observed, truth, attributes), int(female.sum()))
    assert not result.default_on
    assert {(w.dimension, w.level) for w in result.worsened} >= {("sex", "female")}
    assert all(w.level != "male" for w in result.worsened)
    assert result.flags_with > result.flags_without


def test_a_calibrated_change_stays_on() -> None:
    truth, observed, attributes = _cohort()
    without = score(truth, observed, truth, attributes)
    nudged = {o: np.clip(p * 1.03, 0, 1) for o, p in truth.items()}
    result = verdict("nudge", without, score(nudged, observed, truth, attributes), len(attributes["age"]))
    assert result.default_on, [w.text() for w in result.worsened]
    assert result.to_json()["default_on"] is True


def test_a_row_already_out_of_bounds_counts_only_when_it_moves_materially_further() -> None:
    truth, observed, attributes = _cohort()
    out = {o: np.clip(1.6 * p, 0, 1) for o, p in truth.items()}  # every row over-predicted (O/E about 0.6)
    before = score(out, observed, truth, attributes)
    n = len(attributes["age"])

    def scaled(factor: float) -> list:
        return score({o: np.clip(factor * p, 0, 1) for o, p in out.items()}, observed, truth, attributes)

    assert verdict("a hair further", before, scaled(1.02), n).default_on
    further = verdict("much further", before, scaled(1.2), n)
    assert not further.default_on and {(w.dimension, w.level) for w in further.worsened} >= {("all", "all")}


def test_components_are_kept_together_only_while_the_set_worsens_nothing() -> None:
    from fhirtwin.validation.governance import ComponentVerdict, Worsened, keep_together

    row = Worsened("ascvd", 5, "sex", "female", "", "O/E 0.70")
    asked: list[frozenset[str]] = []

    def judge(trial: frozenset[str]) -> ComponentVerdict:  # b and c together miscalibrate women
        asked.append(trial)
        return ComponentVerdict("+".join(sorted(trial)), (row,) if {"b", "c"} <= trial else (), 10, 5, 4)

    kept, joint, dropped = keep_together(["a", "b", "c", "d"], judge)
    assert kept == ["a", "b", "d"] and [name for name, _ in dropped] == ["c"]
    assert joint is not None and joint.component == "a+b+d"
    assert asked == [frozenset("ab"), frozenset("abc"), frozenset("abd")]
