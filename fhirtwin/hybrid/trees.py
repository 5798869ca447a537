"""Gradient boosting (scikit-learn's HistGradientBoostingRegressor), stored as plain arrays.

Why arrays: a pickled estimator is code execution on load, and a deployment should be able to load a
residual it was handed without trusting it with that. The fitted trees are copied into node arrays
(feature, threshold, where missing values go, children, leaf value) and evaluated here in numpy with the
same rule scikit-learn uses (``x <= threshold`` goes left, NaN follows ``missing_go_to_left``), so serving
needs numpy only (scikit-learn is imported for fitting). The tests check that the stored trees predict
exactly what the estimator predicts; the copy reads the fitted estimator's tree tables (``_predictors``,
``_baseline_prediction``), which are not public API, so a scikit-learn upgrade must pass that test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]

#: Small, regularised trees: a residual is a small correction learned from a few hundred to a few thousand rows.
GBM_SETTINGS: dict[str, Any] = {"max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 15,
                                "min_samples_leaf": 20, "l2_regularization": 1.0, "early_stopping": True,
                                "validation_fraction": 0.15, "n_iter_no_change": 20}


@dataclass(frozen=True)
class TreeEnsemble:
    """Boosted regression trees as node arrays (all trees concatenated; ``roots`` index each tree's root)."""

    baseline: float
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray
    value: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, seed: int = 0) -> TreeEnsemble:
        """Fit a HistGradientBoostingRegressor and copy its trees.

        A column with no value in the training rows (e.g. a genomic result nobody had) is given to the
        estimator as a constant, which it never splits on (scikit-learn cannot bin an all-missing column).
        """
        from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

        empty = np.isnan(x).all(axis=0)
        model = HistGradientBoostingRegressor(**GBM_SETTINGS, random_state=seed).fit(np.where(empty, 0.0, x), y)
        return cls.from_estimator(model)

    @classmethod
    def from_estimator(cls, model: Any) -> TreeEnsemble:
        """Copy the trees of a fitted single-output regressor with numeric features only."""
        trees = [iteration[0].nodes for iteration in model._predictors]
        if any(bool(np.any(t["is_categorical"])) for t in trees):
            raise ValueError("categorical splits are not stored")
        sizes = np.array([t.size for t in trees], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        nodes = np.concatenate(trees) if trees else np.zeros(0, dtype=[("value", "f8")])

        def children(name: str) -> np.ndarray:
            return np.concatenate([t[name].astype(np.int64) + o for t, o in zip(trees, offsets, strict=True)]) \
                if trees else np.zeros(0, dtype=np.int64)

        return cls(baseline=float(np.ravel(model._baseline_prediction)[0]), roots=offsets,
                   feature=nodes["feature_idx"].astype(np.int64) if trees else np.zeros(0, np.int64),
                   threshold=nodes["num_threshold"].astype(float) if trees else np.zeros(0),
                   missing_left=nodes["missing_go_to_left"].astype(bool) if trees else np.zeros(0, bool),
                   left=children("left"), right=children("right"),
                   leaf=nodes["is_leaf"].astype(bool) if trees else np.zeros(0, bool),
                   value=nodes["value"].astype(float) if trees else np.zeros(0))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Baseline plus the leaf value of every tree, all rows at once (one step down per loop)."""
        x = np.asarray(x, dtype=float)
        rows = np.arange(x.shape[0])
        out = np.full(x.shape[0], self.baseline)
        node = np.repeat(self.roots[None, :], x.shape[0], axis=0)  # (rows, trees)
        while True:
            inner = ~self.leaf[node]
            if not inner.any():
                break
            value = x[rows[:, None], self.feature[node]]
            go_left = np.where(np.isnan(value), self.missing_left[node], value <= self.threshold[node])
            node = np.where(inner, np.where(go_left, self.left[node], self.right[node]), node)
        result: np.ndarray = out + self.value[node].sum(axis=1)
        return result

    def to_arrays(self) -> Arrays:
        """The node arrays (for an ``.npz`` file)."""
        return {"baseline": np.array([self.baseline]), "roots": self.roots, "feature": self.feature,
                "threshold": self.threshold, "missing_left": self.missing_left.astype(np.int8), "left": self.left,
                "right": self.right, "leaf": self.leaf.astype(np.int8), "value": self.value}

    @classmethod
    def from_arrays(cls, arrays: Arrays) -> TreeEnsemble:
        """Rebuild from :meth:`to_arrays` (validated: children and features inside their ranges)."""
        size = arrays["value"].size
        for name in ("left", "right"):
            inner = arrays["leaf"] == 0
            if np.any((arrays[name][inner] < 0) | (arrays[name][inner] >= size)):
                raise ValueError(f"tree arrays: {name} child outside the node table")
        return cls(baseline=float(arrays["baseline"][0]), roots=arrays["roots"].astype(np.int64),
                   feature=arrays["feature"].astype(np.int64), threshold=arrays["threshold"].astype(float),
                   missing_left=arrays["missing_left"].astype(bool), left=arrays["left"].astype(np.int64),
                   right=arrays["right"].astype(np.int64), leaf=arrays["leaf"].astype(bool),
                   value=arrays["value"].astype(float))

    def describe(self) -> dict[str, Any]:
        """Plain description for the artifact's metadata."""
        return {"kind": "HistGradientBoostingRegressor (scikit-learn), stored as node arrays",
                "trees": int(self.roots.size), "nodes": int(self.value.size), "settings": GBM_SETTINGS}
