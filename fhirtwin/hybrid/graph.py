"""The scale graph the graph learner passes messages over: the project's causal graph collapsed to scales.

Why: the causal graph (``fhirtwin/causal/graph.json``: nodes with a scale, edges cause -> effect) says which
scales act on which; a message-passing learner that only lets information flow along those edges encodes that
knowledge instead of learning every interaction from scratch. Edges within a scale are dropped (each node
keeps its own state through the self-update). When the file is absent or unreadable the declared adjacency
below is used, and :func:`scale_adjacency` says which one it returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fhirtwin.hybrid.features import SCALES
from fhirtwin.twin import Scale

CAUSAL_GRAPH = Path(__file__).resolve().parent.parent / "causal" / "graph.json"

#: Fallback (cause scale -> effect scales): genome acts on cells, blood and organs; cells (glycation) and
#: blood analytes act on organs; behaviour and environment act on blood, cells, organs and clinical state;
#: organ function and clinical state (treatments, body size) act on each other and on blood analytes.
DECLARED: dict[Scale, tuple[Scale, ...]] = {
    Scale.MOLECULAR: (Scale.CELLULAR, Scale.TISSUE, Scale.ORGAN, Scale.CLINICAL),
    Scale.CELLULAR: (Scale.ORGAN, Scale.CLINICAL),
    Scale.TISSUE: (Scale.ORGAN, Scale.CLINICAL),
    Scale.ORGAN: (Scale.CLINICAL,),
    Scale.CLINICAL: (Scale.TISSUE, Scale.CELLULAR, Scale.ORGAN),
    Scale.BEHAVIORAL: (Scale.TISSUE, Scale.CELLULAR, Scale.ORGAN, Scale.CLINICAL),
    Scale.ENVIRONMENTAL: (Scale.BEHAVIORAL, Scale.ORGAN, Scale.CLINICAL),
}


def _from_pairs(pairs: set[tuple[Scale, Scale]]) -> np.ndarray:
    index = {s: i for i, s in enumerate(SCALES)}
    a = np.zeros((len(SCALES), len(SCALES)))
    for cause, effect in pairs:
        if cause != effect:
            a[index[effect], index[cause]] = 1.0  # row = receiving scale
    return a


def read_causal_pairs(path: Path = CAUSAL_GRAPH) -> set[tuple[Scale, Scale]] | None:
    """(cause scale, effect scale) of every edge of the causal graph file (None if it cannot be read)."""
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
        scale = {str(n["id"]): Scale(n["scale"]) for n in graph["nodes"]}
        return {(scale[str(e["from"])], scale[str(e["to"])]) for e in graph["edges"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scale_adjacency(path: Path = CAUSAL_GRAPH) -> tuple[np.ndarray, str]:
    """Row-normalised adjacency A[effect, cause] over :data:`SCALES` and its origin ("causal graph" or
    "declared"); a scale that receives no edge keeps only its own state."""
    pairs = read_causal_pairs(path)
    origin = "causal graph"
    if not pairs:
        pairs = {(c, e) for c, effects in DECLARED.items() for e in effects}
        origin = "declared"
    a = _from_pairs(pairs)
    degree = a.sum(axis=1, keepdims=True)
    return np.divide(a, degree, out=np.zeros_like(a), where=degree > 0), origin
