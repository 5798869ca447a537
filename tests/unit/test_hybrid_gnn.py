"""The scale graph network: its analytic gradient against finite differences, that it learns a scale
interaction, its round trip through plain arrays, and the scale graph read from the causal graph file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fhirtwin.hybrid.features import SCALES, layout
from fhirtwin.hybrid.gnn import ScaleGNN, Standardiser
from fhirtwin.hybrid.graph import DECLARED, scale_adjacency
from fhirtwin.twin import Scale


def _net(width: int = 3) -> ScaleGNN:
    adjacency, _ = scale_adjacency()
    node_columns = [[0], [1], [2, 3], [4], [5], [], [6]]  # the behavioural node has no input: only its bias
    return ScaleGNN(adjacency, node_columns, [7, 8], 8, width=width, seed=1)


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 9))
    x[::4, 3] = np.nan
    x[:, 8] = rng.integers(1, 4, n)  # horizon in years
    y = 1.5 * x[:, 6] * x[:, 8] + np.nan_to_num(x[:, 3]) + rng.normal(0, 0.1, n)
    return x, y


def test_analytic_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x, _ = _data(rng, 40)
    net = _net()
    net.standardiser = Standardiser.fit(x)
    net._shapes = net._layout()
    nodes, readout, horizon = net._inputs(x)
    theta = rng.normal(0, 0.4, sum(int(np.prod(s)) for _, s in net._shapes))
    target = rng.normal(size=40)
    _, grad = net._loss_and_gradient(theta, nodes, readout, horizon, target)
    step = 1e-6
    numeric = np.array([(net._loss_and_gradient(theta + step * e, nodes, readout, horizon, target)[0]
                         - net._loss_and_gradient(theta - step * e, nodes, readout, horizon, target)[0]) / (2 * step)
                        for e in np.eye(theta.size)])
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_it_learns_an_effect_that_grows_with_the_horizon_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    x, y = _data(rng, 400)
    net = _net(width=4).fit(x, y)
    x_new, y_new = _data(rng, 200)
    rmse = float(np.sqrt(np.mean((net.predict(x_new) - y_new) ** 2)))
    assert rmse < 0.35 * float(np.std(y_new))
    again = ScaleGNN.from_arrays(net.to_arrays())
    np.testing.assert_array_equal(again.predict(x_new), net.predict(x_new))


def test_scale_graph_is_the_causal_graph_collapsed_to_scales(tmp_path: Path) -> None:
    graph = {"nodes": [{"id": "pm25", "scale": "environmental", "kind": "exposure"},
                       {"id": "sbp", "scale": "organ", "kind": "biomarker"},
                       {"id": "ldl", "scale": "tissue", "kind": "biomarker"},
                       {"id": "hdl", "scale": "tissue", "kind": "biomarker"}],
             "edges": [{"from": "pm25", "to": "sbp"}, {"from": "ldl", "to": "sbp"}, {"from": "hdl", "to": "ldl"}]}
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(graph))
    adjacency, origin = scale_adjacency(path)
    at = {s: i for i, s in enumerate(SCALES)}
    assert origin == "causal graph"
    assert adjacency[at[Scale.ORGAN], at[Scale.ENVIRONMENTAL]] == adjacency[at[Scale.ORGAN], at[Scale.TISSUE]] == 0.5
    assert np.count_nonzero(adjacency) == 2  # the tissue -> tissue edge stays inside its node
    fallback, origin = scale_adjacency(tmp_path / "absent.json")
    assert origin == "declared"
    assert np.count_nonzero(fallback) == sum(len(v) for v in DECLARED.values())
    np.testing.assert_allclose(fallback.sum(axis=1)[fallback.sum(axis=1) > 0], 1.0)


def test_every_feature_column_has_a_scale_from_the_registry() -> None:
    cols = layout()
    assert sorted(i for s in SCALES for i in cols.columns_of(s)) == list(range(len(cols.names)))
    assert cols.scales[cols.names.index("pm25_ug_m3")] == Scale.ENVIRONMENTAL
    assert cols.scales[cols.names.index("exercise_min_per_week")] == Scale.BEHAVIORAL
    assert cols.scales[cols.names.index("hba1c_percent")] == Scale.CELLULAR
