"""The trained residual as a governed artifact: versioned, described, measured, switchable, safe to load.

Why: a learned correction to a clinical model must be traceable (what data, which version, how good on
held-out patients) and must be possible to switch off per deployment. On disk an artifact is a folder with
``artifact.json`` (metadata: version, learner, training data, metrics, per-biomarker shrinkage and interval
widths) and ``arrays.npz`` (the numbers of the learners). Nothing is unpickled (``allow_pickle=False``), so
loading an artifact never runs code from it; the version ends in the first 12 hex digits of the SHA-256 of
both files' content, so two different residuals never share a version.

Deployment switch: ``FHIRTWIN_HYBRID=off`` disables the residual whatever is configured; otherwise the
residual is on only when an artifact is configured (``FHIRTWIN_HYBRID_ARTIFACT`` = the folder, or passed to
the model's constructor). Default: off.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from fhirtwin.hybrid.gnn import ScaleGNN
from fhirtwin.hybrid.trees import TreeEnsemble

FORMAT = "fhirtwin-hybrid-residual/1"
RELEASE = "0.1.0"
ENV_SWITCH = "FHIRTWIN_HYBRID"
ENV_ARTIFACT = "FHIRTWIN_HYBRID_ARTIFACT"
OFF_WORDS = frozenset({"off", "0", "false", "no", "disabled"})
Learner = Literal["gbm", "gnn"]


class ArtifactError(ValueError):
    """An artifact folder is missing, malformed or of another format."""


class Predictor(Protocol):
    """A fitted residual learner."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Residual predictions for design rows."""
        ...

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Its numbers as plain arrays."""
        ...


@dataclass(frozen=True)
class BiomarkerResidual:
    """The residual of one biomarker: shrunk learner output, and the 90% interval half-width per horizon.

    ``shrinkage`` (0..1) multiplies the learner's prediction; 0 (with ``predictor`` None) is the fallback to
    the mechanistic model, and ``reason`` says why. ``interval`` maps a horizon (years) to the split-conformal
    half-width of the hybrid's 90% interval; an absent horizon has no calibrated interval.
    """

    biomarker: str
    shrinkage: float
    predictor: Predictor | None
    interval: dict[float, float]
    n_train_patients: int
    n_calibration_patients: int
    reason: str = ""

    def residual(self, design: np.ndarray) -> np.ndarray:
        """Shrunk residual for design rows (zeros when off)."""
        if self.predictor is None or self.shrinkage == 0.0:
            return np.zeros(design.shape[0])
        out: np.ndarray = self.shrinkage * self.predictor.predict(design)
        return out

    def meta(self) -> dict[str, Any]:
        """Metadata (the predictor's numbers go to the arrays file)."""
        return {"biomarker": self.biomarker, "shrinkage": self.shrinkage, "on": self.predictor is not None,
                "interval90_half_width": {f"{h:g}": w for h, w in sorted(self.interval.items())},
                "n_train_patients": self.n_train_patients, "n_calibration_patients": self.n_calibration_patients,
                "reason": self.reason}


@dataclass(frozen=True)
class ResidualArtifact:
    """A trained hybrid residual (see the module doc)."""

    learner: Learner
    feature_names: tuple[str, ...]
    horizons: tuple[float, ...]
    biomarkers: dict[str, BiomarkerResidual]
    training_data: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "release": RELEASE, "learner": self.learner,
                "feature_names": list(self.feature_names), "horizons": list(self.horizons),
                "biomarkers": {b: r.meta() for b, r in self.biomarkers.items()},
                "training_data": self.training_data, "metrics": self.metrics, "settings": self.settings}

    def _arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for b, r in self.biomarkers.items():
            if r.predictor is not None:
                out.update({f"{b}/{k}": v for k, v in r.predictor.to_arrays().items()})
        return out

    def save(self, folder: str | os.PathLike[str]) -> ResidualArtifact:
        """Write ``artifact.json`` and ``arrays.npz`` into ``folder``; returns the artifact with its version."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **self._arrays())  # type: ignore[arg-type]
        arrays = buffer.getvalue()
        meta = self._meta()
        body = json.dumps(meta, sort_keys=True).encode()
        version = f"{RELEASE}+{hashlib.sha256(body + arrays).hexdigest()[:12]}"
        (root / "arrays.npz").write_bytes(arrays)
        (root / "artifact.json").write_text(json.dumps({**meta, "version": version}, indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
        return ResidualArtifact(self.learner, self.feature_names, self.horizons, self.biomarkers,
                                self.training_data, self.metrics, version, self.settings)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ResidualArtifact:
        """Read an artifact folder (no pickle); raises :class:`ArtifactError` naming the problem."""
        root = Path(folder)
        try:
            meta = json.loads((root / "artifact.json").read_text(encoding="utf-8"))
            with np.load(root / "arrays.npz", allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read the hybrid artifact in {root.name!r}: {type(exc).__name__}") from None
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"not a {FORMAT} artifact: format {meta.get('format')!r}")
        learner = meta["learner"]
        readers: dict[str, Callable[[dict[str, np.ndarray]], Predictor]] = {
            "gbm": TreeEnsemble.from_arrays, "gnn": ScaleGNN.from_arrays}
        rebuild = readers.get(learner)
        if rebuild is None:
            raise ArtifactError(f"unknown learner {learner!r}")
        biomarkers: dict[str, BiomarkerResidual] = {}
        try:
            for b, m in meta["biomarkers"].items():
                own = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == b}
                biomarkers[b] = BiomarkerResidual(
                    b, float(m["shrinkage"]), rebuild(own) if m["on"] else None,
                    {float(h): float(w) for h, w in m["interval90_half_width"].items()},
                    int(m["n_train_patients"]), int(m["n_calibration_patients"]), str(m.get("reason", "")))
            return cls(learner, tuple(meta["feature_names"]), tuple(float(h) for h in meta["horizons"]), biomarkers,
                       meta["training_data"], meta.get("metrics", {}), str(meta["version"]), meta.get("settings", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed hybrid artifact: {type(exc).__name__}: {exc}") from None


def switched_off() -> bool:
    """True when the deployment switched the residual off (``FHIRTWIN_HYBRID=off``)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in OFF_WORDS


@lru_cache(maxsize=4)
def _load_once(path: str, stamp: tuple[int, int]) -> ResidualArtifact:
    """One load per artifact folder and content stamp (a model is built per patient)."""
    return ResidualArtifact.load(path)


def configured_artifact() -> ResidualArtifact | None:
    """The artifact the deployment configured (``FHIRTWIN_HYBRID_ARTIFACT``), None when none or switched off;
    read once per folder while its files are unchanged."""
    path = os.environ.get(ENV_ARTIFACT, "").strip()
    if not path or switched_off():
        return None
    try:
        stamp = tuple(os.stat(Path(path) / name).st_mtime_ns for name in ("artifact.json", "arrays.npz"))
    except OSError:
        return ResidualArtifact.load(path)  # raises the typed error naming the problem
    return _load_once(path, (stamp[0], stamp[1]))
