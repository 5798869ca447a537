"""Review findings on the engine's signing: canonical JSON of a float subclass (numpy's float64) with an
exponent was its ``repr`` (``np.float64(2e-07)``), not a number, so a signature over it never verified
against the same value read back from a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fhirtwin.writeback.signing import canonical_json


@pytest.mark.parametrize("value", [2e-07, 1.5e-12, 3.25e-06, 1e22, 0.25, 3.0, 1e-05])
def test_a_numpy_float_is_canonicalised_as_the_float_a_server_returns(value: float) -> None:
    text = canonical_json({"p": [np.float64(value)]})
    assert text == canonical_json({"p": [value]})
    assert json.loads(text) == {"p": [value]}  # valid JSON, the same number
