"""Training rows for the residual, built from a staged population (Parquet partitions of whole patients).

Why: the residual is what the mechanistic model gets wrong in real longitudinal records, so its training set
is made exactly as a forecast is: each patient's record is cut at a forecast date (``cut``: the first
biomarker measurement plus ``history_years``, plus ``cut_lag_days``), the twin is built from what was known
then, the mechanistic twin forecasts, and the targets are the measurements observed later, nearest to
``cut + h`` years (within ``TARGET_WINDOW_YEARS``) for each horizon ``h``. Later measurements are read through
the same input bridge (so an eGFR derived from creatinine is the same eGFR the engine would use).

A record the engine cannot read (missing inputs, no later measurement) gives no rows and is counted, never
imputed. The description of the data (source, patients, date range, a hash of the staged files) travels with
the trained artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fhirtwin.hybrid.features import layout, twin_features
from fhirtwin.sim.dynamics import TRAJECTORY_VARIABLES
from fhirtwin.sim.inputs import HISTORY_VARIABLES, InsufficientData, PatientInputs, inputs_from_state
from fhirtwin.sim.model import MechanisticTwin

BIOMARKERS = TRAJECTORY_VARIABLES
HORIZONS = (1.0, 2.0, 3.0)
TARGET_WINDOW_YEARS = 0.25
#: Columns added after the twin features: the mechanistic point prediction, its change from the current
#: value, and the horizon in years.
EXTRA_COLUMNS = ("mechanistic_prediction", "mechanistic_change", "horizon_years")
_YEAR = 365.25


@dataclass(frozen=True)
class Rows:
    """One biomarker's rows: a (patient, cut, horizon) each."""

    patient_id: np.ndarray
    horizon: np.ndarray
    twin: np.ndarray
    current: np.ndarray
    mechanistic: np.ndarray
    mechanistic_interval: np.ndarray
    observed: np.ndarray

    def __len__(self) -> int:
        return int(self.horizon.size)

    def take(self, mask: np.ndarray) -> Rows:
        """The rows where ``mask`` holds."""
        return Rows(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def of_patients(self, patients: Collection[str]) -> Rows:
        """The rows of these patients."""
        return self.take(np.isin(self.patient_id, np.asarray(sorted(patients), dtype=object)))

    def design(self, mechanistic: bool = True) -> np.ndarray:
        """Learner input: twin features, then the mechanistic columns (if asked) and the horizon."""
        if mechanistic:
            return np.column_stack([self.twin, self.mechanistic, self.mechanistic - self.current, self.horizon])
        return np.column_stack([self.twin, self.horizon])

    @classmethod
    def empty(cls, width: int) -> Rows:
        """No rows."""
        return cls(np.zeros(0, dtype=object), np.zeros(0), np.zeros((0, width)), np.zeros(0), np.zeros(0),
                   np.zeros((0, 2)), np.zeros(0))

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        """Rows of several parts, in order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class TrainingData:
    """What a residual was trained on (stored in the artifact)."""

    source: str
    n_patients: int
    n_skipped: int
    first_date: str | None
    last_date: str | None
    stage_sha256: str
    history_years: tuple[float, ...]
    horizons: tuple[float, ...]
    mechanistic_model: str
    mechanistic_components: tuple[str, ...]
    draws: int

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {**self.__dict__, "history_years": list(self.history_years), "horizons": list(self.horizons),
                "mechanistic_components": list(self.mechanistic_components)}


@dataclass(frozen=True)
class Dataset:
    """Rows per biomarker and the description of where they came from."""

    rows: dict[str, Rows]
    description: TrainingData
    feature_names: tuple[str, ...] = field(default_factory=lambda: layout().names)

    def patients(self) -> list[str]:
        """Every patient with at least one row, sorted."""
        return sorted({str(p) for r in self.rows.values() for p in r.patient_id})

    def of_patients(self, patients: Collection[str]) -> Dataset:
        """The same data restricted to some patients (the description counts them; source, dates and hash
        stay those of the staged folder they were taken from)."""
        rows = {b: r.of_patients(patients) for b, r in self.rows.items()}
        used = {str(p) for r in rows.values() for p in r.patient_id}
        return Dataset(rows, replace(self.description, n_patients=len(used)), self.feature_names)


def stage_hash(stage_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the staged folder's manifest and partition files (names and bytes, in name order)."""
    root = Path(stage_dir)
    digest = hashlib.sha256()
    for path in sorted([root / "manifest.json", *root.glob("patients/*.parquet"), *root.glob("*.parquet")]):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _instant(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _measured(inputs: PatientInputs) -> list[float]:
    return [float(t) for v in HISTORY_VARIABLES for t in inputs.history(v)[:, 0]]


def patient_rows(patient_id: str, record: list[dict[str, Any]], *, history_years: Sequence[float],
                 horizons: Sequence[float], draws: int, seed: int, cut_lag_days: int = 30,
                 components: frozenset[str] | None = None) -> dict[str, list[Rows]]:
    """Rows of one patient (raises InsufficientData/ValueError when the record cannot be read); ``components``:
    the mechanistic twin's optional components (default: the deployment's)."""
    from fhirtwin.adapters import build_twin

    probe_date = date(2200, 1, 1)
    everything = inputs_from_state(build_twin(patient_id, record, probe_date), probe_date)
    times = _measured(everything)
    first = probe_date + timedelta(days=round(min(times) * _YEAR))
    last = probe_date + timedelta(days=round(max(times) * _YEAR))
    out: dict[str, list[Rows]] = {}
    rng = np.random.default_rng([seed, zlib.crc32(patient_id.encode())])
    for history in history_years:
        cut = first + timedelta(days=round(history * _YEAR) + cut_lag_days)
        if cut >= last:
            continue
        state = build_twin(patient_id, record, cut)
        inputs = inputs_from_state(state, cut)
        model = MechanisticTwin(components=components).fit(inputs)
        features = twin_features(model.inputs_)  # what the twin ran on: no value of a switched-off component
        forecast = model.simulate(horizon_years=max(horizons), draws=draws, seed=int(rng.integers(2**31)))
        offset = (last - cut).days / _YEAR  # history times in ``everything`` are relative to ``last``
        later = inputs_from_state(build_twin(patient_id, record, last), last)
        for variable, draws_path in forecast.trajectories.items():
            series = later.history(variable)
            current = getattr(inputs, variable)
            if current is None or not len(series):
                continue
            when = series[:, 0] + offset  # years after the cut
            rows = []
            for h in horizons:
                near = np.abs(when - h)
                k = int(np.argmin(near))
                if near[k] > TARGET_WINDOW_YEARS or when[k] <= 0:
                    continue
                latent = draws_path[:, int(round(12 * h))]
                noisy = latent + model.posteriors_[variable].predictive_noise(latent, rng)
                rows.append((h, float(np.median(latent)), *np.percentile(noisy, [5, 95]), float(series[k, 1])))
            if rows:
                arr = np.asarray(rows, dtype=float)
                n = arr.shape[0]
                out.setdefault(variable, []).append(Rows(
                    np.full(n, patient_id, dtype=object), arr[:, 0], np.repeat(features[None, :], n, axis=0),
                    np.full(n, float(current)), arr[:, 1], arr[:, 2:4], arr[:, 4]))
    return out


def dataset_from_stage(stage_dir: str | os.PathLike[str], *, history_years: Sequence[float] = (2.0,),
                       horizons: Sequence[float] = HORIZONS, draws: int = 200, seed: int = 0,
                       source: str | None = None, components: Iterable[str] | None = None) -> Dataset:
    """Training rows of every patient of a staged folder (see the module doc); ``components``: the optional
    components of the deployment the residual is for (default: this one's; an unknown name is an error)."""
    from fhirtwin.population.stage import iter_patient_records, list_partitions, read_shared
    from fhirtwin.sim.components import checked, enabled_components

    on = enabled_components() if components is None else checked(components)

    root = Path(stage_dir)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    shared = read_shared(root)
    parts: dict[str, list[Rows]] = {b: [] for b in BIOMARKERS}
    used, skipped = 0, 0
    dates: list[str] = []
    for partition in list_partitions(root):
        for patient_id, record in iter_patient_records(partition, shared=shared):
            try:
                rows = patient_rows(patient_id, record, history_years=history_years, horizons=horizons,
                                    draws=draws, seed=seed, components=on)
            except (InsufficientData, ValueError):
                skipped += 1
                continue
            if not rows:
                skipped += 1
                continue
            used += 1
            for variable, chunks in rows.items():
                parts[variable].extend(chunks)
            dates += [str(r["effectiveDateTime"])[:10] for r in record if r.get("resourceType") == "Observation"
                      and isinstance(r.get("effectiveDateTime"), str)]
    width = len(layout().names)
    description = TrainingData(
        source=source or f"staged population ({manifest.get('format')}, {manifest.get('patients')} patients)",
        n_patients=used, n_skipped=skipped, first_date=min(dates) if dates else None,
        last_date=max(dates) if dates else None, stage_sha256=stage_hash(root),
        history_years=tuple(float(h) for h in history_years), horizons=tuple(float(h) for h in horizons),
        mechanistic_model=f"{MechanisticTwin.name} {MechanisticTwin.version}",
        mechanistic_components=tuple(sorted(on)), draws=draws)
    return Dataset({b: Rows.concat(p) if p else Rows.empty(width) for b, p in parts.items()}, description)
