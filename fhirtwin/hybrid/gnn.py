"""A small message-passing network over the seven scales, in numpy (no deep-learning framework).

Why this shape: the twin's variables are grouped by scale; each scale is a node whose state starts as a
learned projection of its own variables; ``rounds`` rounds of message passing let a scale read the scales
that act on it (the causal graph collapsed to scales, :mod:`fhirtwin.hybrid.graph`); the readout is linear
in the final node states, in the node states times the forecast horizon (a residual that grows with time,
like a missed slope) and in the readout columns (the mechanistic prediction and the horizon). Shared update
weights across nodes keep it small (a few hundred parameters). Trained by L-BFGS on the full batch with the
analytic gradient written out below (checked against finite differences in the tests), with weight decay.

Forward, per patient (H: nodes x width, A: row-normalised adjacency, effect x cause)::

    H0[s] = tanh(W_s x_s + B_s)
    H(k+1) = tanh(H(k) U' + (A H(k)) V' + c)
    y = z . a + horizon * (z . g) + r . w + bias,   z = H(rounds) flattened
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

Arrays = dict[str, np.ndarray]


@dataclass
class Standardiser:
    """Column centring and scaling fitted on training rows; NaN becomes 0 plus a missing indicator."""

    mean: np.ndarray
    sd: np.ndarray
    indicate: np.ndarray  # bool per column: add a missing indicator (the column had missing training values)

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        """Fit on training rows (all-missing columns get mean 0, sd 1)."""
        with np.errstate(all="ignore"):
            present = ~np.isnan(x)
            count = present.sum(axis=0)
            mean = np.where(count > 0, np.nansum(x, axis=0) / np.maximum(count, 1), 0.0)
            var = np.where(count > 1, np.nansum((x - mean) ** 2, axis=0) / np.maximum(count - 1, 1), 1.0)
        sd = np.sqrt(var)
        return cls(mean, np.where(sd > 1e-9, sd, 1.0), (~present).any(axis=0))

    def transform(self, x: np.ndarray, columns: list[int]) -> np.ndarray:
        """Standardised ``columns`` followed by the missing indicators of those that have one."""
        cols = np.asarray(columns, dtype=int)
        z = (x[:, cols] - self.mean[cols]) / self.sd[cols]
        missing = np.isnan(z)
        z = np.where(missing, 0.0, z)
        flags = missing[:, self.indicate[cols]].astype(float)
        return np.hstack([z, flags])

    def width(self, columns: list[int]) -> int:
        """Number of inputs :meth:`transform` gives for these columns."""
        return len(columns) + int(self.indicate[np.asarray(columns, dtype=int)].sum()) if columns else 0


@dataclass
class ScaleGNN:
    """Message passing over scale nodes; ``node_columns[s]`` are the design columns of scale ``s``."""

    adjacency: np.ndarray
    node_columns: list[list[int]]
    readout_columns: list[int]
    horizon_column: int
    width: int = 6
    rounds: int = 2
    weight_decay: float = 1e-3
    max_iter: int = 400
    seed: int = 0
    standardiser: Standardiser | None = None
    theta: np.ndarray | None = None
    target_mean: float = 0.0
    target_sd: float = 1.0
    _shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list, repr=False)

    # -------------------------------------------------------------- parameters

    def _layout(self) -> list[tuple[str, tuple[int, ...]]]:
        assert self.standardiser is not None
        d, s = self.width, len(self.node_columns)
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for i, cols in enumerate(self.node_columns):
            shapes += [(f"W{i}", (d, self.standardiser.width(cols))), (f"B{i}", (d,))]
        shapes += [("U", (d, d)), ("V", (d, d)), ("c", (d,)), ("a", (s * d,)), ("g", (s * d,)),
                   ("w", (self.standardiser.width(self.readout_columns),)), ("bias", (1,))]
        return shapes

    def _unpack(self, theta: np.ndarray) -> Arrays:
        out: Arrays = {}
        at = 0
        for name, shape in self._shapes:
            size = int(np.prod(shape))
            out[name] = theta[at:at + size].reshape(shape)
            at += size
        return out

    # -------------------------------------------------------------- forward and gradient

    def _inputs(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        assert self.standardiser is not None
        nodes = [self.standardiser.transform(x, cols) for cols in self.node_columns]
        readout = self.standardiser.transform(x, self.readout_columns)
        return nodes, readout, np.nan_to_num(x[:, self.horizon_column])

    def _forward(self, p: Arrays, nodes: list[np.ndarray], readout: np.ndarray, horizon: np.ndarray
                 ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        h = np.stack([np.tanh(xs @ p[f"W{i}"].T + p[f"B{i}"]) for i, xs in enumerate(nodes)], axis=1)
        states, messages = [h], []
        for _ in range(self.rounds):
            m = np.einsum("st,ntd->nsd", self.adjacency, h)
            h = np.tanh(h @ p["U"].T + m @ p["V"].T + p["c"])
            states.append(h)
            messages.append(m)
        z = h.reshape(h.shape[0], -1)
        y = z @ p["a"] + horizon * (z @ p["g"]) + readout @ p["w"] + p["bias"][0]
        return y, states, messages

    def _loss_and_gradient(self, theta: np.ndarray, nodes: list[np.ndarray], readout: np.ndarray,
                           horizon: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        p = self._unpack(theta)
        y, states, messages = self._forward(p, nodes, readout, horizon)
        n = target.size
        err = y - target
        decayed = [k for k, _ in self._shapes if k[0] in "WUVagw"]
        loss = 0.5 * float(err @ err) / n + 0.5 * self.weight_decay * sum(float(np.sum(p[k] ** 2)) for k in decayed)
        grad = {k: np.zeros_like(v) for k, v in p.items()}
        dy = err / n
        z = states[-1].reshape(n, -1)
        grad["a"] = z.T @ dy
        grad["g"] = z.T @ (dy * horizon)
        grad["w"] = readout.T @ dy
        grad["bias"] = np.array([dy.sum()])
        dh = (dy[:, None] * p["a"] + (dy * horizon)[:, None] * p["g"]).reshape(states[-1].shape)
        for step in range(self.rounds, 0, -1):
            h_new, h_old, m = states[step], states[step - 1], messages[step - 1]
            dp = dh * (1.0 - h_new**2)
            grad["U"] += np.einsum("nsi,nsj->ij", dp, h_old)
            grad["V"] += np.einsum("nsi,nsj->ij", dp, m)
            grad["c"] += dp.sum(axis=(0, 1))
            dm = dp @ p["V"]
            dh = dp @ p["U"] + np.einsum("st,nsd->ntd", self.adjacency, dm)
        dp0 = dh * (1.0 - states[0] ** 2)
        for i, xs in enumerate(nodes):
            grad[f"W{i}"] = dp0[:, i, :].T @ xs
            grad[f"B{i}"] = dp0[:, i, :].sum(axis=0)
        for name in decayed:
            grad[name] = grad[name] + self.weight_decay * p[name]
        return loss, np.concatenate([grad[name].ravel() for name, _ in self._shapes])

    # -------------------------------------------------------------- public

    def fit(self, x: np.ndarray, y: np.ndarray) -> ScaleGNN:
        """Fit by L-BFGS from a seeded small random start."""
        self.standardiser = Standardiser.fit(x)
        self._shapes = self._layout()
        self.target_mean, self.target_sd = float(np.mean(y)), float(np.std(y)) or 1.0
        nodes, readout, horizon = self._inputs(x)
        size = sum(int(np.prod(s)) for _, s in self._shapes)
        theta0 = np.random.default_rng(self.seed).normal(0.0, 0.1, size)
        target = (y - self.target_mean) / self.target_sd
        done = minimize(self._loss_and_gradient, theta0, args=(nodes, readout, horizon, target), jac=True,
                        method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.theta = np.asarray(done.x, dtype=float)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions in the target's units."""
        if self.theta is None:
            raise RuntimeError("ScaleGNN.predict called before fit")
        y, _, _ = self._forward(self._unpack(self.theta), *self._inputs(x))
        out: np.ndarray = y * self.target_sd + self.target_mean
        return out

    def to_arrays(self) -> Arrays:
        """Everything needed to predict, as plain arrays (no code in the artifact)."""
        if self.theta is None or self.standardiser is None:
            raise RuntimeError("ScaleGNN is not fitted")
        offsets = np.cumsum([0, *(len(c) for c in self.node_columns)])
        return {"adjacency": self.adjacency, "node_columns": np.concatenate([np.asarray(c, dtype=np.int64)
                                                                               for c in self.node_columns]),
                "node_offsets": offsets.astype(np.int64),
                "readout_columns": np.asarray(self.readout_columns, dtype=np.int64),
                "settings": np.array([self.horizon_column, self.width, self.rounds], dtype=np.int64),
                "mean": self.standardiser.mean, "sd": self.standardiser.sd,
                "indicate": self.standardiser.indicate.astype(np.int8), "theta": self.theta,
                "target": np.array([self.target_mean, self.target_sd])}

    @classmethod
    def from_arrays(cls, arrays: Arrays) -> ScaleGNN:
        """Rebuild a fitted network from :meth:`to_arrays`."""
        off, cols = arrays["node_offsets"], arrays["node_columns"]
        horizon, width, rounds = (int(v) for v in arrays["settings"])
        net = cls(adjacency=np.asarray(arrays["adjacency"], dtype=float),
                  node_columns=[cols[off[i]:off[i + 1]].tolist() for i in range(off.size - 1)],
                  readout_columns=arrays["readout_columns"].tolist(), horizon_column=horizon, width=width,
                  rounds=rounds)
        net.standardiser = Standardiser(arrays["mean"], arrays["sd"], arrays["indicate"].astype(bool))
        net._shapes = net._layout()
        net.theta = np.asarray(arrays["theta"], dtype=float)
        net.target_mean, net.target_sd = (float(v) for v in arrays["target"])
        return net

    def parameter_count(self) -> int:
        """Number of trained parameters."""
        return 0 if self.theta is None else int(self.theta.size)

    def describe(self) -> dict[str, Any]:
        """Plain description for the artifact's metadata."""
        return {"kind": "message passing over scale nodes (numpy, L-BFGS)", "width": self.width,
                "rounds": self.rounds, "weight_decay": self.weight_decay, "parameters": self.parameter_count()}
