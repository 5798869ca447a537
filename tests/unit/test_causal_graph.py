"""The declared causal graph: validation of the file, graph surgery, d-separation, and agreement with the engine.

The engine checks can disagree with the graph: every effect size the engine draws must be the parameter of an
edge, every PREVENT/KFRE input the anchors read must have an edge into the outcomes it moves, and a perturbed
engine input must move exactly the hazards the encoded graph says it can reach (bit-identical otherwise).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from sim_fixtures import patient

from fhirtwin.causal.graph import GraphError, UnknownNode, graph_bytes, graph_reference, load_graph, parse_graph
from fhirtwin.sim._params import dynamics_parameters, intervention_parameters
from fhirtwin.sim.components import component_names
from fhirtwin.sim.dynamics import month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import RATIO_NAMES, draw_parameters
from fhirtwin.sim.hazards import CVD_OUTCOMES, compute_anchors, hazard_paths, prevent_kwargs
from fhirtwin.sim.interventions import BASELINE
from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.sim.modifiers import modifier_table

RAW = json.loads(graph_bytes())


def test_shipped_graph_is_a_valid_dag_with_the_stable_top_level_format() -> None:
    g = load_graph()
    assert {"version", "nodes", "edges"} <= set(RAW)
    assert all({"id", "scale", "kind"} <= set(n) for n in RAW["nodes"])
    assert all({"from", "to", "mechanism", "source"} <= set(e) for e in RAW["edges"])
    assert len(g.nodes) == len(RAW["nodes"]) and len(g.edges) == len(RAW["edges"])
    assert {n.scale.value for n in g.nodes.values()} == {
        "molecular", "cellular", "tissue", "organ", "clinical", "behavioral", "environmental"}
    for required in ("ascvd", "heart_failure", "kidney_failure", "death", "on_statin", "on_bp_treatment",
                     "on_sglt2i", "current_smoker", "exercise_min_per_week", "pm25_ug_m3", "sdi_decile"):
        assert required in g.nodes
    assert len(g.sha256) == 64 and g.version in graph_reference() and g.sha256 in graph_reference()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["edges"].append({"from": "ascvd", "to": "ldl_cholesterol_mg_dl", "mechanism": "m",
                                  "source": "s"}), "cycle"),
    (lambda d: d["edges"].append({"from": "ldl_cholesterol_mg_dl", "to": "nowhere", "mechanism": "m",
                                  "source": "s"}), "not declared"),
    (lambda d: d["nodes"].append({"id": "ldl_cholestrol", "scale": "tissue", "kind": "biomarker"}),
     "not a twin variable"),
    (lambda d: d["nodes"].append({"id": "weight_kg", "scale": "organ", "kind": "biomarker"}),
     "variables.json says clinical"),
    (lambda d: d["nodes"].append({"id": "x", "scale": "cosmic", "kind": "biomarker", "in_registry": False}),
     "unknown scale"),
    (lambda d: d["edges"].append(dict(d["edges"][0])), "twice"),
    (lambda d: d["edges"][0].update(mechanism=""), "non-empty"),
])
def test_a_damaged_graph_is_a_typed_error(mutate, message: str) -> None:
    data = copy.deepcopy(RAW)
    mutate(data)
    with pytest.raises(GraphError, match=message):
        parse_graph(data)


def test_do_cuts_only_the_incoming_edges() -> None:
    g = load_graph()
    cut = g.do("ldl_cholesterol_mg_dl")
    assert g.parents("ldl_cholesterol_mg_dl") >= {"on_statin", "age_years", "fh_variant"}
    assert cut.parents("ldl_cholesterol_mg_dl") == set()
    assert cut.children("ldl_cholesterol_mg_dl") == g.children("ldl_cholesterol_mg_dl")
    assert len(g.edges) - len(cut.edges) == len(g.parents("ldl_cholesterol_mg_dl"))
    with pytest.raises(UnknownNode):
        g.do("ldl")


def test_d_separation_and_backdoor_on_the_shipped_graph() -> None:
    g = load_graph()
    # LDL-C reaches no kidney outcome: d-separated from kidney failure given nothing? No: age confounds them.
    assert not g.d_separated(["ldl_cholesterol_mg_dl"], ["kidney_failure"])
    assert g.d_separated(["ldl_cholesterol_mg_dl"], ["kidney_failure"], ["age_years"])
    # FH variant -> LDL-C -> ASCVD and FH -> ASCVD directly: conditioning on LDL-C leaves the direct path
    assert not g.d_separated(["fh_variant"], ["ascvd"], ["ldl_cholesterol_mg_dl"])
    # after do(LDL) the graph has no back-door path from LDL-C to ASCVD
    assert g.do("ldl_cholesterol_mg_dl").satisfies_backdoor("ldl_cholesterol_mg_dl", "ascvd", [])
    assert not g.satisfies_backdoor("ldl_cholesterol_mg_dl", "ascvd", [])
    z = g.adjustment_set("ldl_cholesterol_mg_dl", "ascvd")
    assert z is not None and "fh_variant" in z and "on_statin" in z and g.satisfies_backdoor(
        "ldl_cholesterol_mg_dl", "ascvd", z)
    # a descendant of the treatment is never a valid adjustment
    assert not g.satisfies_backdoor("on_statin", "ascvd", ["ldl_cholesterol_mg_dl"])


def test_every_effect_size_the_engine_draws_is_an_edge_parameter() -> None:
    g = load_graph()
    named = {p for e in g.edges for p in e.parameters}
    trial_only = {"sglt2i_cardiovascular_death_rr"}  # used by the trial replications; no engine outcome
    for ratio in set(intervention_parameters()["ratios"]) - trial_only:
        assert ratio in named, ratio
    assert set(RATIO_NAMES) <= named
    for entry in ("ldl_lowering_fraction", "sbp_lowering_one_drug_mm_hg", "coronary_share_of_ascvd",
                  "smoking_cessation_time_course", "smoking_quit_probability"):
        assert entry in named
    couplings = {"egfr_slope_per_hba1c_percent", "apol1_high_risk_egfr_slope_shift", "ckd_mortality_hazard_ratio",
                 "background_mortality"}
    assert couplings <= set(dynamics_parameters()) and couplings <= named
    markers = modifier_table()
    for name, spec in markers["modifiers"].items():  # every marker beyond PREVENT, from its own variable
        assert name in named, name
        assert any(e.source_node == spec["variable"] and name in e.parameters and e.status == "encoded"
                   for e in g.edges), name
    for name, spec in markers["anchors"].items():
        assert any(e.source_node == spec["variable"] and name in e.parameters for e in g.edges), name
    for variable in markers["not_acting"]:  # read and shown, acting on nothing: a node without effects
        assert variable in g.nodes and not g.children(variable), variable


def test_every_anchor_input_has_an_edge_into_the_outcomes() -> None:
    g = load_graph().restricted(["encoded"])
    kw = prevent_kwargs(patient(), "full")
    read = {k for k in kw if k != "model"} | {"age_years"}
    prevent_hf = {"systolic_bp_mm_hg", "on_bp_treatment", "diabetes", "current_smoker", "bmi_kg_m2",
                  "egfr_ml_min_1_73m2", "uacr_mg_g", "hba1c_percent", "age_years", "sex"}
    for name in read:
        assert name in g.nodes, name
        assert "ascvd" in g.children(name) or name == "bmi_kg_m2", name
        assert ("heart_failure" in g.children(name)) == (name in prevent_hf), name
    for name in ("egfr_ml_min_1_73m2", "uacr_mg_g", "age_years", "sex"):  # KFRE and the death hazards
        assert {"kidney_failure", "death"} <= g.children(name)


def _hazards(inputs, seed: int = 3) -> dict[str, np.ndarray]:
    twin = MechanisticTwin(components=component_names()).fit(inputs)  # the graph declares every component
    t = month_grid(10.0)
    draws = draw_parameters(inputs, twin.posteriors_, 64, seed, 10.0, uacr_quantiles=twin.anchors_.kidney.shape[0])
    traj = simulate_trajectories(inputs, twin.posteriors_, draws, BASELINE, t)
    hz = hazard_paths(inputs, twin.anchors_, traj, draws, BASELINE)
    anchors = compute_anchors(inputs)
    hz["death"] = np.broadcast_to(anchors.death_all[: t.size - 1], hz["kidney_failure"].shape)
    return hz


PERTURB = {  # engine input -> perturbed value (node ids are the PatientInputs field names)
    "ldl_cholesterol_mg_dl": dict(ldl_cholesterol_mg_dl=100.0, history_ldl_cholesterol_mg_dl=np.column_stack(
        [np.arange(-5.0, 0.5), np.full(6, 100.0)])),
    "total_cholesterol_mg_dl": dict(total_cholesterol_mg_dl=180.0),
    "hdl_cholesterol_mg_dl": dict(hdl_cholesterol_mg_dl=60.0),
    "bmi_kg_m2": dict(bmi_kg_m2=35.0),
    "on_statin": dict(on_statin=True),
    "fh_variant": dict(fh_variant=True),
    "cad_prs_z": dict(cad_prs_z=1.5),
    "apol1_risk_alleles": dict(apol1_risk_alleles=2),
    "current_smoker": dict(current_smoker=False),
    "uacr_mg_g": dict(uacr_mg_g=300.0),
    "exercise_min_per_week": dict(exercise_min_per_week=0.0),
    "pm25_ug_m3": dict(pm25_ug_m3=20.0),
    "lpa_nmol_l": dict(lpa_nmol_l=150.0),
    "hscrp_mg_l": dict(hscrp_mg_l=6.0),
    "cac_agatston": dict(cac_agatston=300.0),
    "sdi_decile": dict(sdi_decile=9),
    "nt_probnp_pg_ml": dict(nt_probnp_pg_ml=900.0),
}


@pytest.mark.parametrize("node", sorted(PERTURB))
def test_a_perturbed_input_moves_exactly_the_hazards_the_graph_reaches(node: str) -> None:
    g = load_graph().restricted(["encoded"])
    before = _hazards(patient())
    after = _hazards(replace(patient(), **PERTURB[node]))
    reached = g.reached_by_baseline_change(node)
    for outcome in (*CVD_OUTCOMES, "kidney_failure", "death"):
        moved = not np.array_equal(before[outcome], after[outcome])
        assert moved == (outcome in reached), (node, outcome, moved)


def test_the_model_card_shows_the_shipped_graph() -> None:
    from pathlib import Path

    from fhirtwin.causal.report import graph_markdown
    from fhirtwin.model_card import model_card

    card_md = (Path(__file__).resolve().parents[2] / "fhirtwin" / "model-card.md").read_text(encoding="utf-8")
    assert graph_markdown() in card_md  # regenerate with: python -m fhirtwin.causal.report fhirtwin/model-card.md
    g = load_graph()
    for e in g.edges:
        assert f"| `{e.source_node}` | `{e.target_node}` | {e.status} |" in card_md
    assert model_card()["causal_graph"] == {
        "uri": graph_reference(), "version": g.version, "sha256": g.sha256, "file": "fhirtwin/causal/graph.json",
        "nodes": len(g.nodes), "edges": len(g.edges), "encoded_edges": sum(e.status == "encoded" for e in g.edges)}


def test_every_treatment_node_names_an_engine_intervention() -> None:
    from fhirtwin.sim.interventions import KINDS

    g = load_graph()
    treatments = {n.id: n.intervention for n in g.nodes.values() if n.intervention}
    assert set(treatments.values()) <= set(KINDS)
    assert {"statin", "bp_lowering", "sglt2i", "smoking_cessation"} <= set(treatments.values())
    for node, kind in treatments.items():  # each acts on something the engine simulates
        assert g.restricted(["encoded"]).children(node), (node, kind)
