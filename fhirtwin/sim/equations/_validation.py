"""Input checking shared by the published equations.

Every equation was validated on a bounded population; a number computed outside those bounds is an
extrapolation the paper never tested. So out-of-range inputs raise unless the caller asks, explicitly,
for the ACC/AHA-estimator behaviour of clipping to the range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

_DATA_DIR = Path(__file__).resolve().parent


class EquationInputError(ValueError):
    """Base class for inputs an equation cannot accept."""


class OutOfRangeError(EquationInputError):
    """A numeric input lies outside the equation's validated range."""

    def __init__(self, equation: str, name: str, value: Any, low: float, high: float) -> None:
        self.equation = equation
        self.name = name
        self.value = value
        self.low = low
        self.high = high
        super().__init__(
            f"{equation}: {name}={value!r} is outside the validated range [{low:g}, {high:g}]; "
            "pass clip=True to clip to the range instead"
        )


class UnknownCategoryError(EquationInputError):
    """A categorical input has a value the equation does not define."""

    def __init__(self, equation: str, name: str, value: Any, allowed: Sequence[str]) -> None:
        self.equation = equation
        self.name = name
        self.value = value
        self.allowed = tuple(allowed)
        super().__init__(f"{equation}: {name}={value!r} is not one of {sorted(set(self.allowed))}")


@cache
def load_data(filename: str) -> dict[str, Any]:
    """Read a coefficient file once per process (the equations run inside large ensembles)."""
    with open(_DATA_DIR / filename, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def is_scalar_call(*values: Any) -> bool:
    """True when every input is a plain scalar, so the caller gets a float back, not an array."""
    return all(np.ndim(v) == 0 for v in values)


def as_float(equation: str, name: str, value: Any) -> np.ndarray:
    """Convert a numeric input to a float array; reject NaN and non-numeric values."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise EquationInputError(f"{equation}: {name}={value!r} is not numeric") from exc
    if np.isnan(arr).any():
        raise EquationInputError(f"{equation}: {name} contains NaN; missing values are not allowed here")
    return arr


def check_range(
    equation: str, name: str, arr: np.ndarray, bounds: Sequence[float], clip: bool
) -> np.ndarray:
    """Raise OutOfRangeError for values outside bounds, or clip them when clip=True."""
    low, high = float(bounds[0]), float(bounds[1])
    if clip:
        clipped: np.ndarray = np.clip(arr, low, high)
        return clipped
    bad = (arr < low) | (arr > high)
    if bad.any():
        first = arr[bad].flat[0] if arr.ndim else float(arr)
        raise OutOfRangeError(equation, name, float(first), low, high)
    return arr


def as_flag(equation: str, name: str, value: Any) -> np.ndarray:
    """Convert a yes/no input (bool or 0/1) to a float 0/1 array; anything else raises."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr.astype(float)
    try:
        num = arr.astype(float)
    except (TypeError, ValueError) as exc:
        raise EquationInputError(f"{equation}: {name}={value!r} must be bool or 0/1") from exc
    if not np.isin(num, (0.0, 1.0)).all():
        raise EquationInputError(f"{equation}: {name}={value!r} must be bool or 0/1")
    return num


def as_category(equation: str, name: str, value: Any, mapping: Mapping[str, int]) -> np.ndarray:
    """Map string categories (scalar or array) to integer codes; unknown values raise."""
    arr = np.asarray(value, dtype=object)
    flat = arr.ravel()
    out = np.empty(flat.shape, dtype=np.intp)
    # Loop over the distinct values only (a handful), never over the elements.
    for v in set(flat.tolist()):
        key = v.strip().lower() if isinstance(v, str) else v
        if key not in mapping:
            raise UnknownCategoryError(equation, name, v, list(mapping))
        out[flat == v] = mapping[key]
    return out.reshape(arr.shape)


def choice(equation: str, name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Check a scalar option (outcome, horizon, variant, ...) against its allowed values."""
    if value not in allowed:
        raise UnknownCategoryError(equation, name, value, [str(a) for a in allowed])
    return value


def finish(result: np.ndarray, scalar: bool) -> float | np.ndarray:
    """Return a float for scalar calls and an ndarray otherwise."""
    return float(result) if scalar else np.asarray(result, dtype=float)


SEX_CODES: dict[str, int] = {"female": 0, "male": 1}
