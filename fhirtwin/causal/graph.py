"""The declared causal graph of the twin: loading, validation, graph surgery and d-separation.

Why a declared graph: the engine's mechanisms (anchored hazards, trial ratios, biomarker couplings) are a
structural causal model, but only implicitly. Writing the graph down as data (``graph.json``) lets a
test check it against the engine, lets a counterfactual say which paths it follows, and lets a reader
(or another model) see every assumed effect with its citation. Edges with status ``encoded`` are computed
by the engine; ``assumed`` edges are published effects the engine does not simulate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any, Literal

from fhirtwin.twin import Scale, UnknownVariable, get_variable

NodeKind = Literal["demographic", "exposure", "behavior", "genotype", "biomarker", "condition", "treatment", "outcome"]
NODE_KINDS: tuple[str, ...] = NodeKind.__args__  # type: ignore[attr-defined]
EdgeStatus = Literal["encoded", "assumed"]
EdgeTiming = Literal["baseline", "path", "both"]
GRAPH_FILE = "graph.json"
#: Stable identifier of the graph (Provenance.policy carries it with the version and SHA-256).
GRAPH_URI = "https://fhirtwin.org/causal/graph"


class GraphError(ValueError):
    """The graph file is malformed, names an unknown node, or has a cycle."""


class UnknownNode(GraphError, KeyError):
    """A node id that the graph does not declare."""


@dataclass(frozen=True)
class Node:
    """One variable of the graph with its biological scale."""

    id: str
    scale: Scale
    kind: NodeKind
    in_registry: bool = True
    intervention: str | None = None


@dataclass(frozen=True)
class Edge:
    """A direct causal effect: what carries it, where the engine encodes it, and its citation."""

    source_node: str
    target_node: str
    mechanism: str
    source: str
    status: EdgeStatus = "encoded"
    parameter: str | None = None
    timing: EdgeTiming = "both"

    @property
    def parameters(self) -> tuple[str, ...]:
        """Names of the data-file entries that carry the effect (comma-separated in the file)."""
        return tuple(p.strip() for p in (self.parameter or "").split(",") if p.strip())


@dataclass(frozen=True, eq=False)
class CausalGraph:
    """A validated DAG. ``do`` returns the mutilated graph; queries never modify the graph."""

    version: str
    nodes: dict[str, Node]
    edges: tuple[Edge, ...]
    sha256: str = ""
    intervened: frozenset[str] = field(default_factory=frozenset)

    def node(self, node_id: str) -> Node:
        """The node; :class:`UnknownNode` if the graph does not declare it."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise UnknownNode(f"the causal graph declares no node {node_id!r}") from None

    def parents(self, node_id: str) -> set[str]:
        """Direct causes."""
        self.node(node_id)
        return {e.source_node for e in self.edges if e.target_node == node_id}

    def children(self, node_id: str) -> set[str]:
        """Direct effects."""
        self.node(node_id)
        return {e.target_node for e in self.edges if e.source_node == node_id}

    def ancestors(self, node_ids: Iterable[str]) -> set[str]:
        """Every node with a directed path into any of ``node_ids`` (not including them)."""
        return self._reach(node_ids, self.parents)

    def descendants(self, node_ids: Iterable[str]) -> set[str]:
        """Every node reachable by a directed path from any of ``node_ids`` (not including them)."""
        return self._reach(node_ids, self.children)

    def _reach(self, start: Iterable[str], step: Any) -> set[str]:
        seen: set[str] = set()
        frontier = list(start)
        for n in frontier:
            self.node(n)
        while frontier:
            for nxt in step(frontier.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return seen

    def has_path(self, cause: str, effect: str, status: Iterable[EdgeStatus] = ("encoded", "assumed")) -> bool:
        """A directed path from ``cause`` to ``effect`` using only edges of the given status."""
        return effect in self.restricted(status).descendants([cause])

    def restricted(self, status: Iterable[EdgeStatus]) -> CausalGraph:
        """The same nodes with only the edges of the given status (e.g. what the engine encodes)."""
        keep = set(status)
        return replace(self, edges=tuple(e for e in self.edges if e.status in keep))

    def reached_by_baseline_change(self, node_id: str) -> set[str]:
        """What a change of the node's measured baseline value moves in the engine: its children, then only
        along edges that read a simulated path (a changed path does not change another baseline)."""
        direct = self.children(node_id)
        along_paths = replace(self, edges=tuple(e for e in self.edges if e.timing != "baseline"))
        return direct | along_paths.descendants(direct)

    def do(self, *node_ids: str) -> CausalGraph:
        """Graph surgery for do(X = x): every edge into the intervened nodes is cut."""
        for n in node_ids:
            self.node(n)
        cut = set(node_ids)
        return replace(self, edges=tuple(e for e in self.edges if e.target_node not in cut),
                       intervened=self.intervened | cut)

    def d_separated(self, xs: Iterable[str], ys: Iterable[str], given: Iterable[str] = ()) -> bool:
        """X and Y d-separated by Z (moralised ancestral graph criterion, Lauritzen et al. 1990)."""
        x, y, z = set(xs), set(ys), set(given)
        for n in x | y | z:
            self.node(n)
        if x & y:
            return False
        keep = x | y | z
        keep |= self.ancestors(keep)
        undirected: dict[str, set[str]] = {n: set() for n in keep}
        for e in self.edges:
            if e.source_node in keep and e.target_node in keep:
                undirected[e.source_node].add(e.target_node)
                undirected[e.target_node].add(e.source_node)
        for child in keep:  # marry the parents of every kept node
            ps = [p for p in self.parents(child) if p in keep]
            for i, a in enumerate(ps):
                for b in ps[i + 1:]:
                    undirected[a].add(b)
                    undirected[b].add(a)
        frontier = [n for n in x if n not in z]
        seen = set(frontier)
        while frontier:
            for nxt in undirected[frontier.pop()]:
                if nxt in y:
                    return False
                if nxt not in z and nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return True

    def satisfies_backdoor(self, treatment: str, outcome: str, adjustment: Iterable[str]) -> bool:
        """Pearl's back-door criterion: no descendant of the treatment, and every back-door path blocked."""
        z = set(adjustment)
        if z & (self.descendants([treatment]) | {treatment}):
            return False
        without_out = replace(self, edges=tuple(e for e in self.edges if e.source_node != treatment))
        return without_out.d_separated([treatment], [outcome], z)

    def adjustment_set(self, treatment: str, outcome: str, observed: Iterable[str] | None = None) -> set[str] | None:
        """A back-door adjustment set: the observed parents of the treatment, else their observed ancestors
        minus the treatment's descendants; None when neither blocks every back-door path."""
        obs = set(self.nodes) if observed is None else set(observed)
        for candidate in (self.parents(treatment) & obs,
                          (self.ancestors([treatment]) - self.descendants([treatment])) & obs):
            if self.satisfies_backdoor(treatment, outcome, candidate):
                return candidate
        return None

    def to_json(self) -> dict[str, Any]:
        """The file format: {"version", "nodes": [{"id", "scale", "kind"}], "edges": [{"from", "to", ...}]}."""
        return {
            "version": self.version,
            "nodes": [{"id": n.id, "scale": n.scale.value, "kind": n.kind, "in_registry": n.in_registry,
                       **({"intervention": n.intervention} if n.intervention else {})} for n in self.nodes.values()],
            "edges": [{"from": e.source_node, "to": e.target_node, "mechanism": e.mechanism, "source": e.source,
                       "status": e.status, "timing": e.timing, **({"parameter": e.parameter} if e.parameter else {})}
                      for e in self.edges],
        }


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise GraphError(f"{where}: {key!r} must be a non-empty string")
    return value


def parse_graph(data: Any, sha256: str = "") -> CausalGraph:
    """Validate a parsed graph file: known scales and kinds, registry names and scales, declared endpoints,
    no duplicate edges, a mechanism and a source on every edge, and no directed cycle."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not isinstance(data.get("edges"), list):
        raise GraphError("a causal graph is an object with 'version', 'nodes' and 'edges' lists")
    version = _text(data, "version", "graph")
    nodes: dict[str, Node] = {}
    for i, raw in enumerate(data["nodes"]):
        if not isinstance(raw, dict):
            raise GraphError(f"node {i}: not an object")
        node_id = _text(raw, "id", f"node {i}")
        if node_id in nodes:
            raise GraphError(f"node {node_id!r} declared twice")
        try:
            scale = Scale(_text(raw, "scale", node_id))
        except ValueError:
            raise GraphError(f"node {node_id!r}: unknown scale {raw.get('scale')!r}") from None
        kind = _text(raw, "kind", node_id)
        if kind not in NODE_KINDS:
            raise GraphError(f"node {node_id!r}: unknown kind {kind!r}; expected one of {NODE_KINDS}")
        in_registry = bool(raw.get("in_registry", True))
        if in_registry:
            try:
                declared = get_variable(node_id).scale
            except UnknownVariable:
                raise GraphError(f"node {node_id!r} is not a twin variable (variables.json)") from None
            if declared != scale:
                raise GraphError(f"node {node_id!r}: scale {scale.value} but variables.json says {declared.value}")
        nodes[node_id] = Node(node_id, scale, kind, in_registry, raw.get("intervention"))  # type: ignore[arg-type]
    edges: list[Edge] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(data["edges"]):
        if not isinstance(raw, dict):
            raise GraphError(f"edge {i}: not an object")
        a, b = _text(raw, "from", f"edge {i}"), _text(raw, "to", f"edge {i}")
        for end in (a, b):
            if end not in nodes:
                raise UnknownNode(f"edge {a} -> {b}: node {end!r} is not declared")
        if (a, b) in seen:
            raise GraphError(f"edge {a} -> {b} declared twice")
        if a == b:
            raise GraphError(f"edge {a} -> {b} is a self-loop")
        seen.add((a, b))
        status = raw.get("status", "encoded")
        if status not in ("encoded", "assumed"):
            raise GraphError(f"edge {a} -> {b}: status must be 'encoded' or 'assumed'")
        timing = raw.get("timing", "both")
        if timing not in ("baseline", "path", "both"):
            raise GraphError(f"edge {a} -> {b}: timing must be 'baseline', 'path' or 'both'")
        edges.append(Edge(a, b, _text(raw, "mechanism", f"edge {a} -> {b}"), _text(raw, "source", f"edge {a} -> {b}"),
                          status, raw.get("parameter"), timing))
    graph = CausalGraph(version, nodes, tuple(edges), sha256)
    cycle = find_cycle(graph)
    if cycle:
        raise GraphError(f"the causal graph has a cycle: {' -> '.join(cycle)}")
    return graph


def find_cycle(graph: CausalGraph) -> list[str]:
    """One directed cycle as a node list (first node repeated at the end), or [] for a DAG."""
    colour: dict[str, int] = dict.fromkeys(graph.nodes, 0)  # 0 new, 1 on the stack, 2 done
    children: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for e in graph.edges:
        children[e.source_node].append(e.target_node)
    for root in graph.nodes:
        if colour[root]:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path = [root]
        colour[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(children[node]):
                stack[-1] = (node, i + 1)
                nxt = children[node][i]
                if colour[nxt] == 1:
                    return path[path.index(nxt):] + [nxt]
                if colour[nxt] == 0:
                    colour[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                colour[node] = 2
                stack.pop()
                path.pop()
    return []


def graph_bytes() -> bytes:
    """The shipped graph file as bytes (what the SHA-256 covers)."""
    return resources.files("fhirtwin.causal").joinpath(GRAPH_FILE).read_bytes()


@cache
def load_graph() -> CausalGraph:
    """The shipped graph, validated (read once)."""
    raw = graph_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise GraphError(f"{GRAPH_FILE} is not valid JSON: {exc}") from None
    return parse_graph(data, hashlib.sha256(raw).hexdigest())


def graph_reference() -> str:
    """The graph's identity as one URI (Provenance.policy is a list of uri): its version and the SHA-256 of the
    shipped file, so a reader can tell which declared graph a result was made under."""
    graph = load_graph()
    return f"{GRAPH_URI}?version={graph.version}&sha256={graph.sha256}"
