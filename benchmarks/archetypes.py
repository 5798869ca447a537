"""Ten clinical archetypes through the simulation engine, next to the published equations.

Run: ``python benchmarks/archetypes.py --markdown`` (one markdown table, a block of rows per archetype) or
``--json`` (one JSON object per archetype, one per line). Not a test: nothing asserts; the numbers are for
reading side by side.

For each archetype the engine (``fhirtwin-mechanistic``, 1000 draws, seed 0, 10-year horizon) gives the
median and 90% interval of 10-year total CVD, ASCVD, heart failure and non-CVD death and of 2-, 5- and
10-year kidney failure; beside them stand the published equations at the same horizon, evaluated directly
on the same inputs:

* PREVENT (Khan 2024) 10-year total CVD, ASCVD and HF with the add-on model the engine picks from the
  optional inputs (UACR and HbA1c when given);
* KFRE 4-variable (Tangri 2011, North American calibration) 2- and 5-year kidney failure when eGFR < 60
  and UACR is known;
* PCE 2013 10-year hard ASCVD at ages 40-79 (white equations when race is not recorded).

Then the plan: the top three scenarios ranked by median ARR on the plan's ranking outcome (with NNT) and
the pharmacogenomic notes and exclusions (SLCO1B1, CYP2C19, clopidogrel, prasugrel). The sim-level API
does not refuse out-of-scope patients (the scope check works on a TwinState), so archetypes with
established ASCVD are simulated anyway and labelled out of scope; any exception the engine raises is
reported as its refusal instead of stopping the run.

Histories are yearly points over the last four years (time in years <= 0), so calibration has data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fhirtwin  # noqa: E402
from fhirtwin.sim.equations import kfre_risk, pce_ascvd_10y, prevent_risk  # noqa: E402
from fhirtwin.sim.inputs import PatientInputs  # noqa: E402
from fhirtwin.sim.interventions import candidate_interventions  # noqa: E402
from fhirtwin.sim.model import get_model  # noqa: E402
from fhirtwin.sim.planner import Plan, plan  # noqa: E402

MODEL = "fhirtwin-mechanistic"
DRAWS, SEED, HORIZON = 1000, 0, 10.0
YEARS = np.array([-4.0, -3.0, -2.0, -1.0, 0.0])
PGX_WORDS = ("slco1b1", "cyp2c19", "clopidogrel", "prasugrel")
OUT_OF_SCOPE_ASCVD = "(engine: out of scope: established ASCVD)"
ENGINE_ROWS: tuple[tuple[str, str, float], ...] = (
    ("10-y total CVD", "total_cvd", 10.0),
    ("10-y ASCVD", "ascvd", 10.0),
    ("10-y heart failure", "heart_failure", 10.0),
    ("2-y kidney failure", "kidney_failure", 2.0),
    ("5-y kidney failure", "kidney_failure", 5.0),
    ("10-y kidney failure", "kidney_failure", 10.0),
    ("10-y non-CVD death", "death", 10.0),
)
FIELDS = {f.name for f in dataclasses.fields(PatientInputs)}


def _series(values: list[float]) -> np.ndarray:
    """Yearly history ending today: [[t, value], ...]."""
    return np.column_stack([YEARS[-len(values):], np.asarray(values, dtype=float)])


def _optional_fields(**kwargs: Any) -> dict[str, Any]:
    """Only the keyword arguments PatientInputs has (fields added later are used when present)."""
    return {k: v for k, v in kwargs.items() if k in FIELDS}


def _patient(
    pid: str,
    *,
    sex: str,
    age: float,
    tc: float,
    hdl: float,
    ldl: list[float],
    sbp: list[float],
    egfr: list[float],
    bmi: list[float],
    hba1c: list[float] | None = None,
    **extra: Any,
) -> PatientInputs:
    """PatientInputs whose current values are the last point of each history."""
    return PatientInputs(
        patient_id=pid,
        sex=sex,
        age_years=age,
        total_cholesterol_mg_dl=tc,
        hdl_cholesterol_mg_dl=hdl,
        ldl_cholesterol_mg_dl=ldl[-1],
        systolic_bp_mm_hg=sbp[-1],
        egfr_ml_min_1_73m2=egfr[-1],
        bmi_kg_m2=bmi[-1],
        hba1c_percent=None if hba1c is None else hba1c[-1],
        history_ldl_cholesterol_mg_dl=_series(ldl),
        history_systolic_bp_mm_hg=_series(sbp),
        history_egfr_ml_min_1_73m2=_series(egfr),
        history_bmi_kg_m2=_series(bmi),
        history_hba1c_percent=_series(hba1c) if hba1c is not None else np.zeros((0, 2)),
        **{"diabetes": False, "current_smoker": False, "on_bp_treatment": False, "on_statin": False, **extra},
    )


def archetypes() -> list[tuple[str, PatientInputs]]:
    """The ten archetypes: (title, inputs)."""
    return [
        ("1. CKD 3b + UACR 300 (woman 68)", _patient(
            "arch-01-ckd3b-uacr300", sex="female", age=68.0, tc=195.0, hdl=52.0,
            ldl=[118.0, 121.0, 116.0, 119.0, 115.0], sbp=[136.0, 132.0, 134.0, 131.0, 134.0],
            egfr=[42.0, 40.0, 41.0, 39.0, 38.0], bmi=[28.4, 28.1, 28.3, 28.0, 28.2],
            uacr_mg_g=300.0, on_bp_treatment=True, hypertension=True, ckd=True, bp_treatment_start_years=-6.0,
        )),
        ("2. eGFR 62 falling, no UACR (man 60)", _patient(
            "arch-02-egfr-falling", sex="male", age=60.0, tc=210.0, hdl=45.0,
            ldl=[132.0, 136.0, 134.0, 137.0, 135.0], sbp=[128.0, 131.0, 129.0, 133.0, 132.0],
            egfr=[80.0, 76.0, 72.0, 67.0, 62.0], bmi=[27.6, 27.9, 28.0, 28.1, 28.0],
        )),
        ("3. Average risk factors (man 79)", _patient(
            "arch-03-man-79", sex="male", age=79.0, tc=200.0, hdl=45.0,
            ldl=[126.0, 123.0, 127.0, 124.0, 125.0], sbp=[142.0, 138.0, 141.0, 139.0, 140.0],
            egfr=[74.0, 73.0, 71.0, 71.0, 70.0], bmi=[26.8, 27.0, 26.9, 27.1, 27.0],
            on_bp_treatment=True, hypertension=True, bp_treatment_start_years=-8.0,
        )),
        ("4. Smoker, otherwise average (woman 75)", _patient(
            "arch-04-smoker-75", sex="female", age=75.0, tc=200.0, hdl=55.0,
            ldl=[121.0, 118.0, 122.0, 119.0, 120.0], sbp=[133.0, 136.0, 134.0, 137.0, 135.0],
            egfr=[78.0, 77.0, 76.0, 76.0, 75.0], bmi=[26.9, 27.0, 27.2, 27.0, 27.1],
            current_smoker=True,
        )),
        ("5. CAD PRS z +2.5 (man 50)", _patient(
            "arch-05-prs", sex="male", age=50.0, tc=200.0, hdl=45.0,
            ldl=[127.0, 124.0, 126.0, 123.0, 125.0], sbp=[126.0, 129.0, 127.0, 130.0, 128.0],
            egfr=[97.0, 96.0, 96.0, 95.0, 95.0], bmi=[27.0, 27.2, 27.1, 27.3, 27.2],
            cad_prs_z=2.5,
        )),
        ("6. SLCO1B1 poor function on simvastatin 20 mg (man 58)", _patient(
            "arch-06-slco1b1", sex="male", age=58.0, tc=190.0, hdl=48.0,
            ldl=[112.0, 108.0, 111.0, 109.0, 110.0], sbp=[129.0, 131.0, 128.0, 132.0, 130.0],
            egfr=[88.0, 87.0, 86.0, 86.0, 85.0], bmi=[28.0, 28.2, 28.1, 28.3, 28.2],
            on_statin=True, statin_intensity="moderate", statin_agent="simvastatin", statin_daily_dose_mg=20.0,
            statin_start_years=-5.0, slco1b1_phenotype="poor_function",
        )),
        ("7. CYP2C19 poor metabolizer post-stroke on clopidogrel (man 66)", _patient(
            "arch-07-cyp2c19", sex="male", age=66.0, tc=165.0, hdl=45.0,
            ldl=[88.0, 84.0, 86.0, 83.0, 85.0], sbp=[138.0, 135.0, 137.0, 134.0, 136.0],
            egfr=[80.0, 79.0, 79.0, 78.0, 78.0], bmi=[27.5, 27.6, 27.4, 27.6, 27.5],
            prior_ascvd=True, **_optional_fields(prior_stroke_or_tia=True),
            cyp2c19_phenotype="poor_metabolizer", on_clopidogrel=True,
            on_statin=True, statin_intensity="high", statin_agent="atorvastatin", statin_daily_dose_mg=40.0,
            statin_start_years=-5.0, on_bp_treatment=True, hypertension=True, bp_treatment_start_years=-5.0,
        )),
        ("8. Healthy (woman 40)", _patient(
            "arch-08-healthy-40", sex="female", age=40.0, tc=180.0, hdl=60.0,
            ldl=[104.0, 106.0, 103.0, 107.0, 105.0], sbp=[110.0, 113.0, 111.0, 114.0, 112.0],
            egfr=[108.0, 107.0, 106.0, 106.0, 105.0], bmi=[22.8, 23.0, 22.9, 23.1, 23.0],
        )),
        ("9. Post-MI on atorvastatin 80 mg, LDL 75 (man 62)", _patient(
            "arch-09-post-mi", sex="male", age=62.0, tc=150.0, hdl=42.0,
            ldl=[78.0, 74.0, 76.0, 73.0, 75.0], sbp=[127.0, 130.0, 128.0, 129.0, 128.0],
            egfr=[83.0, 82.0, 81.0, 81.0, 80.0], bmi=[28.3, 28.1, 28.2, 28.0, 28.1],
            prior_ascvd=True, **_optional_fields(prior_mi_or_acs=True),
            on_statin=True, statin_intensity="high", statin_agent="atorvastatin", statin_daily_dose_mg=80.0,
            statin_start_years=-4.5, on_bp_treatment=True, hypertension=True, bp_treatment_start_years=-4.5,
        )),
        ("10. T2D + CKD 3b + UACR 450, no SGLT2i (man 64)", _patient(
            "arch-10-t2d-ckd", sex="male", age=64.0, tc=190.0, hdl=40.0,
            ldl=[108.0, 104.0, 107.0, 103.0, 105.0], sbp=[140.0, 137.0, 139.0, 136.0, 138.0],
            egfr=[48.0, 46.0, 44.0, 42.0, 40.0], bmi=[31.0, 31.2, 31.1, 31.3, 31.2],
            hba1c=[7.2, 7.4, 7.5, 7.7, 7.8], uacr_mg_g=450.0, diabetes=True, ckd=True, hypertension=True,
            on_bp_treatment=True, bp_treatment_start_years=-6.0,
            on_statin=True, statin_intensity="moderate", statin_agent="atorvastatin", statin_daily_dose_mg=20.0,
            statin_start_years=-6.0,
        )),
    ]


# ------------------------------------------------------------------------------------------------
# published equations, evaluated directly
# ------------------------------------------------------------------------------------------------


def prevent_model(p: PatientInputs) -> str:
    """The PREVENT add-on model for the optional inputs given (the engine's rule: UACR and/or HbA1c)."""
    if p.uacr_mg_g is not None and p.hba1c_percent is not None:
        return "full"
    if p.uacr_mg_g is not None:
        return "uacr"
    if p.hba1c_percent is not None:
        return "hba1c"
    return "base"


def _try(fn: Callable[[], Any]) -> float | str:
    """The equation's value, or its error message (out of range etc.)."""
    try:
        return float(fn())
    except Exception as exc:  # an equation's refusal is part of the result
        return f"{type(exc).__name__}: {exc}"


def _prevent(p: PatientInputs, outcome: str, **change: Any) -> float | str:
    model = prevent_model(p)
    kw: dict[str, Any] = dict(
        sex=p.sex, age_years=p.age_years, total_cholesterol_mg_dl=p.total_cholesterol_mg_dl,
        hdl_cholesterol_mg_dl=p.hdl_cholesterol_mg_dl, systolic_bp_mm_hg=p.systolic_bp_mm_hg,
        on_bp_treatment=int(p.on_bp_treatment), on_statin=int(p.on_statin), diabetes=int(p.diabetes),
        current_smoker=int(p.current_smoker), bmi_kg_m2=p.bmi_kg_m2, egfr_ml_min_1_73m2=p.egfr_ml_min_1_73m2,
        model=model,
    )
    if model in ("uacr", "full"):
        kw["uacr_mg_g"] = p.uacr_mg_g
    if model in ("hba1c", "full"):
        kw["hba1c_percent"] = p.hba1c_percent
    kw.update(change)
    return _try(lambda: prevent_risk(outcome=outcome, horizon_years=10, **kw))


def published(p: PatientInputs) -> dict[str, Any]:
    """Published equation values at the engine's horizons (None where the equation does not apply)."""
    model = prevent_model(p)
    out: dict[str, Any] = {
        "prevent_model": model,
        "prevent_10y": {o: _prevent(p, o) for o in ("total_cvd", "ascvd", "heart_failure")},
        "kfre_4var": None,
        "pce_10y_hard_ascvd": None,
        "pce_race": None,
        "prevent_10y_total_cvd_as_nonsmoker": _prevent(p, "total_cvd", current_smoker=0) if p.current_smoker
        else None,
    }
    if p.egfr_ml_min_1_73m2 < 60 and p.uacr_mg_g is not None:
        uacr = p.uacr_mg_g

        def kfre(h: int) -> float | str:
            return _try(lambda: kfre_risk(horizon_years=h, sex=p.sex, age_years=p.age_years,
                                          egfr_ml_min_1_73m2=p.egfr_ml_min_1_73m2, uacr_mg_g=uacr))

        out["kfre_4var"] = {f"{h}y": kfre(h) for h in (2, 5)}
    if 40 <= p.age_years <= 79:
        race = p.race or "white"
        out["pce_race"] = race if p.race else "not recorded: white equations"
        out["pce_10y_hard_ascvd"] = _try(lambda: pce_ascvd_10y(
            sex=p.sex, race=race, age_years=p.age_years, total_cholesterol_mg_dl=p.total_cholesterol_mg_dl,
            hdl_cholesterol_mg_dl=p.hdl_cholesterol_mg_dl, systolic_bp_mm_hg=p.systolic_bp_mm_hg,
            on_bp_treatment=int(p.on_bp_treatment), current_smoker=int(p.current_smoker),
            diabetes=int(p.diabetes)))
    return out


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


def _pgx(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in PGX_WORDS)


def _pgx_lines(p: PatientInputs, pl: Plan | None) -> list[str]:
    """Pharmacogenomic notes and exclusions (from the plan, else from the candidate list).

    Exclusions of kinds the engine does not simulate at all (the same for every patient) are left out.
    """
    if pl is not None:
        notes, excluded = list(pl.notes), list(pl.excluded)
        options = [i for o in pl.options for i in o.scenario.interventions]
    else:
        cands = candidate_interventions(p)
        notes, excluded, options = list(cands.notes), list(cands.excluded), list(cands.eligible)
    lines = [f"note: {n}" for n in notes if _pgx(n)]
    lines += [f"excluded: {e.candidate}: {e.reason}" for e in excluded
              if _pgx(f"{e.candidate} {e.reason}") and not e.reason.startswith("not simulated")]
    lines += [f"proposal note: {n}" for i in options for n in i.notes if _pgx(n)]
    return list(dict.fromkeys(lines))


def engine(p: PatientInputs) -> dict[str, Any]:
    """Engine forecasts, the plan and any refusal (exception messages), as plain data."""
    out: dict[str, Any] = {"scope": OUT_OF_SCOPE_ASCVD if p.prior_ascvd else "in scope (primary prevention)",
                           "errors": [], "forecast": None, "plan": None, "pharmacogenomics": []}
    try:
        model = get_model(MODEL).fit(p)
    except Exception as exc:  # the engine's refusal is reported, not raised
        out["errors"].append(f"fit: {type(exc).__name__}: {exc}")
        out["pharmacogenomics"] = _pgx_lines(p, None)
        return out
    try:
        fc = model.simulate(None, HORIZON, DRAWS, SEED)
        out["forecast"] = {
            label: {**fc.at_horizon(o, years), "mean": float(np.mean(fc.cif[o][:, int(round(12 * years))]))}
            for label, o, years in ENGINE_ROWS
        }
        out["caveats"] = list(fc.caveats)
    except Exception as exc:
        out["errors"].append(f"simulate: {type(exc).__name__}: {exc}")
    pl: Plan | None = None
    try:
        pl = plan(model, horizon_years=HORIZON, draws=DRAWS, seed=SEED)
        out["plan"] = {
            "outcome": pl.outcome,
            "top": [{"scenario": o.scenario.name, "arr_median": o.arr["median"], "arr_p05": o.arr["p05"],
                     "arr_p95": o.arr["p95"], "nnt": o.nnt, "nnt_note": o.nnt_note,
                     "risk_median": o.risk["median"],
                     "net_benefit_median": getattr(o, "net_benefit", {}).get("median")} for o in pl.options[:3]],
            "notes": list(pl.notes),
        }
        quit_opt = next((o for o in pl.options if o.scenario.name == "Smoking cessation"), None)
        if quit_opt is not None:
            out["plan"]["smoking_cessation_10y_total_cvd"] = pl.forecasts[quit_opt.scenario.name].at_horizon(
                "total_cvd")
    except Exception as exc:
        out["errors"].append(f"plan: {type(exc).__name__}: {exc}")
    out["pharmacogenomics"] = _pgx_lines(p, pl)
    return out


def run_one(title: str, p: PatientInputs) -> dict[str, Any]:
    """Everything for one archetype."""
    return {"archetype": title, "patient_id": p.patient_id, "engine": engine(p), "published": published(p)}


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return _cell(v)
    return f"{100 * float(v):.1f}%"


def _interval(s: dict[str, float] | None) -> str:
    if s is None:
        return "—"
    return f"{100 * s['median']:.1f}% [{100 * s['p05']:.1f}–{100 * s['p95']:.1f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_rows(r: dict[str, Any]) -> list[str]:
    """One block of rows for one archetype."""
    eng, pub = r["engine"], r["published"]
    fc = eng["forecast"] or {}
    title = r["archetype"] + (f" {OUT_OF_SCOPE_ASCVD}" if eng["scope"] == OUT_OF_SCOPE_ASCVD else "")
    pm = pub["prevent_model"]
    kfre = pub["kfre_4var"] or {}
    published_for = {
        "10-y total CVD": f"PREVENT-{pm} {_pct(pub['prevent_10y']['total_cvd'])}",
        "10-y ASCVD": f"PREVENT-{pm} {_pct(pub['prevent_10y']['ascvd'])}",
        "10-y heart failure": f"PREVENT-{pm} {_pct(pub['prevent_10y']['heart_failure'])}",
        "2-y kidney failure": f"KFRE-4 {_pct(kfre['2y'])}" if kfre else "— (KFRE n/a)",
        "5-y kidney failure": f"KFRE-4 {_pct(kfre['5y'])}" if kfre else "— (KFRE n/a)",
    }
    rows: list[str] = []

    def row(measure: str, engine_text: str, published_text: str) -> None:
        rows.append(f"| {_cell(title) if not rows else ''} | {measure} | {engine_text} | {published_text} |")

    for label, outcome, _ in ENGINE_ROWS:
        s = fc.get(label)
        text = _interval(s)
        if s is not None and outcome == "kidney_failure":
            text += f"; mean over draws {100 * s['mean']:.1f}%"
        row(label, text, published_for.get(label, "—"))
    row("10-y hard ASCVD", "—", f"PCE {_pct(pub['pce_10y_hard_ascvd'])}" if pub["pce_10y_hard_ascvd"] is not None
        else "— (PCE n/a: age outside 40-79)")
    if pub["prevent_10y_total_cvd_as_nonsmoker"] is not None:
        quit_fc = (eng["plan"] or {}).get("smoking_cessation_10y_total_cvd")
        row("10-y total CVD if not smoking", f"after cessation {_interval(quit_fc)}",
            f"PREVENT-{pm} as non-smoker {_pct(pub['prevent_10y_total_cvd_as_nonsmoker'])}")
    if eng["plan"] is not None:
        parts = []
        for i, o in enumerate(eng["plan"]["top"], 1):
            nnt = f"NNT {o['nnt']:.0f}" if o["nnt"] is not None else "NNT undefined"
            uncertain = " (benefit not certain)" if o["nnt"] is not None and o["arr_p05"] <= 0 else ""
            net = o.get("net_benefit_median")
            net_text = f", net benefit {1000 * net:.0f} per 1,000" if net is not None else ""
            parts.append(f"{i}. {o['scenario']}: ARR {100 * o['arr_median']:.1f}%, {nnt}{uncertain}{net_text}")
        nothing = next((n for n in eng["plan"].get("notes", []) if n.startswith("No drug indicated")), "none eligible")
        row(f"Top proposals (ARR on {eng['plan']['outcome']}, 10 y)", _cell("; ".join(parts) or nothing), "")
    row("Pharmacogenomics", _cell("; ".join(eng["pharmacogenomics"]) or "none"), "")
    row("Engine scope / refusals", _cell("; ".join([eng["scope"], *eng["errors"]])), "")
    return rows


def markdown(results: list[dict[str, Any]]) -> str:
    """The whole table."""
    lines = [
        f"Engine: {MODEL}, {DRAWS} draws, seed {SEED}, horizon {HORIZON:g} years; median [90% interval]. "
        "Published: equations evaluated directly on the same inputs. Kidney failure also shows the mean over "
        "draws (without UACR it is the eGFR < 15 threshold, a 0/1 event per draw, whose median is 0 or 100%).",
        "",
        "| Archetype | Measure | fhirtwin engine | Published equation |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.extend(markdown_rows(r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print one markdown table (default)")
    fmt.add_argument("--json", action="store_true", help="print one JSON object per archetype, one per line")
    args = ap.parse_args(argv)
    print(f"fhirtwin imported from {fhirtwin.__file__}", file=sys.stderr)
    results = []
    for title, p in archetypes():
        r = run_one(title, p)
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if not args.json:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
