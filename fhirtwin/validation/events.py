"""Virtual patients with histories and future events drawn from a model that is not the engine.

Why: the sandbox cohort makes no future events, and its histories come from the engine's own model
class, so it cannot tell whether the engine's *risks* are right. Here every patient gets a true risk
process built only from published equations and a progression model of this module's own (none of the
engine's dynamics, parameters, life table or anchoring code is imported), events are sampled from it,
and the engine then forecasts the same patients from the histories the generator recorded. Because the
truth is synthetic, agreement shows internal consistency of the engine's anchoring and dynamics, not
external validity.

The generator, step by step (every number below is an assumption of this generator unless cited):

1. Population. Sex 1:1; age uniform 30-79; race as recorded white/black/hispanic/asian/other with
   illustrative shares 60/13/17/6/4 % (not a census figure; race changes only covariate distributions:
   SBP +3 mmHg and diabetes +4 points for black, diabetes +4 points for hispanic patients). CKD is
   enriched so that every stage has events: 30 % have a true eGFR uniform on 17-60, the rest
   N(95 - 0.8 (age - 30), 13). BMI, SBP, lipids, smoking, diabetes, HbA1c, UACR, antihypertensive and statin
   use are drawn with simple age/diabetes/CKD dependences (``_population``). UACR is recorded for 60 %
   (90 % with diabetes or eGFR < 60) and HbA1c for all patients with diabetes and half of the rest;
   unrecorded values exist in the truth but are unknown to the engine.
2. Kidney progression. Each patient's true eGFR is linear in time with slope
   ``-1.0 - 1.0 [diabetes] - 0.4 max(0, ln(UACR / 10))`` plus a personal deviation ~ N(0, 2.6^2)
   mL/min/1.73 m2 per year. The SD 2.6 is the observed SD of annual eGFR change (cystatin C) in the
   Cardiovascular Health Study (mean loss 1.8 +- 2.6; Shlipak MG et al., Am J Nephrol 2009;30:171-178); an
   observed SD includes measurement noise, so this makes true slopes more heterogeneous than reality (a
   harder test). The mean terms are assumptions (CHS: creatinine-based loss 0.4, cystatin-based 1.8).
3. Histories. 3-6 visits over the past 4 years (the last at the forecast date). Each records eGFR (true x
   exp(N(0, 0.06^2))), LDL-C (x exp(N(0, 0.08^2)) around a constant level), SBP (+ N(0, 10^2)), BMI
   (+ N(0, 0.5^2)) and, when recorded, HbA1c (+ N(0, 0.2^2)). The engine sees these and the last values.
4. Cardiovascular truth. The 10-year risks of total CVD, ASCVD and heart failure are AHA PREVENT's full
   model (Khan SS et al., Circulation 2024;149:430-449) at the patient's *true* baseline values, UACR and
   HbA1c (SDI missing). A cause-specific hazard ``c exp(0.0866 t)`` (rising with age at the human
   mortality doubling time of 8 years, Finch CE, Pike MC, Witten M, Science 1990;249:902-905, used here as
   an ASSUMPTION for the age gradient of CVD incidence) is scaled per patient so that its cumulative
   incidence at 10 years, with this module's non-CVD death competing, equals PREVENT. The personal eGFR
   slope deviation ``d`` then multiplies the hazard by ``exp(x(eGFR0 + d t) - x(eGFR0))``, where ``x`` is
   PREVENT's own log-odds as a function of eGFR (log-odds used as a log hazard ratio, a rare-event
   approximation). So PREVENT holds for a patient whose kidneys follow the expected course, and a patient
   who declines faster is at higher risk, by PREVENT's own eGFR coefficient.
5. Kidney failure truth. KFRE 4-variable, North American calibration (Tangri N et al., JAMA
   2011;305:1553-1559; 2016;315:164-174) at the true baseline eGFR (clipped to 10-60) and UACR gives the net
   cumulative hazards at 2 and 5 years; a Weibull cumulative hazard through both is extrapolated to 10 years
   (an assumption: the engine instead carries the 2-5-year hazard forward). The slope deviation multiplies
   it by KFRE's own eGFR term, ``H(eGFR0 + d t) / H(eGFR0)``. Death from any cause competes.
6. Death. All-cause mortality is Gompertz, ``h(a) = h65 exp(0.0866 (a - 65))`` (doubling every 8 years,
   Finch 1990), with ``h65`` solved per sex so that life expectancy at 65 equals the US 2019 values, 18.2
   years for men and 20.8 for women (Xu JQ, Murphy SL, Kochanek KD, Arias E, NCHS Data Brief 395, 2020).
   It is multiplied by the hazard ratio for death by eGFR category vs >= 60: 1.2 (45-59), 1.8 (30-44), 3.2
   (15-29) (Go AS et al., NEJM 2004;351:1296-1305), and by 1.5 for diabetes (an assumption between the
   hazard ratios 1.25 for cancer and 1.73 for other non-vascular death of the Emerging Risk Factors
   Collaboration, Rao Kondapally Seshasai S et al., NEJM 2011;364:829-841). 71.7 % of it is non-CVD
   death: heart disease (659,041) and stroke (150,005) were 28.3 % of the 2,854,838 US deaths in 2019
   (Xu JQ et al., Deaths: final data for 2019, NVSR 2021;70(8)). The engine uses a tabulated SSA life table,
   CKD-PC hazard ratios and a 69.6 % share instead.
7. Markers (only with ``generate(..., markers=True)``; drawn from their own random stream, so the cohort
   without markers is unchanged). Lp(a) nmol/L log-normal with the UK Biobank median 19.6 and IQR 7.6-74.8
   (log-SD 1.70; Patel AP et al., ATVB 2021); hsCRP mg/L log-normal, median 2.0 (an assumption) and log-SD
   ln 3 (one SD of log CRP is a three-fold difference, ERFC, Lancet 2010); coronary calcium zero with
   probability 1 - p, p = logistic(-1.0 + 0.09 (age - 60) + 0.9 male + 0.4 diabetes + 0.4 smoker), else
   log-normal with mean log 3.5 + 0.04 (age - 60) and log-SD 1.4 (assumptions shaped like MESA's age and sex
   gradients); PM2.5 uniform 4-16 ug/m3; activity 0 min/week for 30 %, else log-normal median 150, log-SD
   0.8 (assumptions). The TRUE effects, written here and not read from the engine's tables: Lp(a) HR 1.11
   per 50 nmol/L on ASCVD (Patel 2021); hsCRP log-HR 0.2865 per log unit (1.37 per three-fold, ERFC) on a
   coronary share of 0.6 of the ASCVD hazard and 0.2175 (1.27 per three-fold) on the rest; coronary calcium
   log-HR 0.2743 per ln(CAC + 1) on the coronary share (the MESA with-CAC coefficient, McClelland 2015);
   activity RR 0.83 from 0 to 150 min/week, none above (Wahid A et al., JAHA 2016); PM2.5 NULL (no effect:
   the case where a marker the engine uses adds nothing). NT-proBNP pg/mL log-normal with the ARIC
   sex-specific medians 62 (women) and 36 (men) (Ozkan B et al., Circulation 2023 abstract) and log-SD 1.0
   (an assumption), TRUE effect HR 1.95 per ln unit on the heart-failure hazard (Choi EY et al., Circ Heart
   Fail 2012). Each multiplier is divided by its mean (exact for the log-normal and calcium terms given the
   patient's risk factors, the cohort mean otherwise), so PREVENT stays the average truth; the ASCVD and
   heart-failure hazards are multiplied and their extra (or missing) hazard is added to total CVD. The
   engine sees the true marker values.
8. Sampling. Hazards are constant within each month, so event times are drawn exactly by inverse transform
   of the cumulative hazards. One uniform is shared by the three CVD outcomes (comonotone: a patient with
   an early ASCVD event tends to have an early total-CVD event), non-CVD death competes with them, and
   death from any cause (non-CVD or a separate CVD-death draw) competes with kidney failure. Each outcome
   is validated on its own; their joint distribution is not a claim of this model. Follow-up is complete
   to 10 years, so the observed risk at 5 and 10 years needs no censoring weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq

from fhirtwin.sim.equations import kfre_risk, prevent_risk
from fhirtwin.sim.inputs import PatientInputs

HORIZONS = (5, 10)
CVD = ("total_cvd", "ascvd", "heart_failure")
OUTCOMES = (*CVD, "kidney_failure")
MONTHS = 120
RACES = ("white", "black", "hispanic", "asian", "other")
RACE_SHARES = (0.60, 0.13, 0.17, 0.06, 0.04)
#: Gompertz rate: ln 2 / 8-year mortality doubling time (Finch, Pike & Witten, Science 1990).
GOMPERTZ_RATE = math.log(2.0) / 8.0
#: US life expectancy at 65 in 2019 (NCHS Data Brief 395).
LIFE_EXPECTANCY_65 = {"male": 18.2, "female": 20.8}
#: Hazard ratio for death by eGFR (lower bound of category, HR) vs >= 60 (Go AS et al., NEJM 2004).
DEATH_HR_BY_EGFR = ((45.0, 1.2), (30.0, 1.8), (15.0, 3.2))
DEATH_HR_DIABETES = 1.5
#: Share of deaths not from heart disease or stroke, US 2019 (NVSR 70(8)): 1 - (659041 + 150005) / 2854838.
NON_CVD_SHARE = 1.0 - (659_041 + 150_005) / 2_854_838
#: SD of annual eGFR change, CHS cystatin C (Shlipak MG et al., Am J Nephrol 2009).
EGFR_SLOPE_SD = 2.6


@dataclass
class EventCohort:
    """Virtual patients (what the engine sees), their subgroup attributes, true risks and sampled events.

    ``truth[outcome]`` and ``observed[outcome]`` are (n, 2) arrays at 5 and 10 years: the generator's
    cumulative incidence and whether the event happened by then (1/0).
    """

    inputs: list[PatientInputs]
    attributes: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    observed: dict[str, np.ndarray]
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of virtual patients."""
        return len(self.inputs)


def _gompertz_h65(sex: str) -> float:
    """Hazard at 65 for which Gompertz survival with ``GOMPERTZ_RATE`` gives the 2019 life expectancy at 65."""
    t = np.linspace(0.0, 60.0, 6001)
    b = GOMPERTZ_RATE

    def e65(h: float) -> float:
        s = np.exp(-h / b * np.expm1(b * t))
        return float(np.trapezoid(s, t)) - LIFE_EXPECTANCY_65[sex]

    return float(brentq(e65, 1e-4, 0.5))


def _death_hazards(age: np.ndarray, female: np.ndarray, egfr: np.ndarray, diabetes: np.ndarray,
                   times: np.ndarray) -> np.ndarray:
    """All-cause death hazard per year (n, len(times)) at the attained age."""
    h65 = np.where(female, _gompertz_h65("female"), _gompertz_h65("male"))
    ratio = np.ones_like(egfr)
    for lower, hr in DEATH_HR_BY_EGFR:  # categories from the highest down: the last match wins
        ratio = np.where(egfr < lower + 15.0, hr, ratio)
    ratio = ratio * np.where(diabetes, DEATH_HR_DIABETES, 1.0)
    out: np.ndarray = (h65 * ratio)[:, None] * np.exp(GOMPERTZ_RATE * (age[:, None] + times[None, :] - 65.0))
    return out


def _population(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """True baseline values of ``n`` patients (see the module docstring, step 1)."""
    female = rng.random(n) < 0.5
    race = rng.choice(np.array(RACES), size=n, p=RACE_SHARES)
    black, hispanic = race == "black", race == "hispanic"
    age = rng.uniform(30.0, 79.0, n)
    bmi = np.clip(rng.normal(28.5, 5.5, n), 18.5, 45.0)
    p_dm = np.clip(0.04 + 0.004 * (age - 30) + 0.02 * (bmi - 27) + 0.04 * (black | hispanic), 0.01, 0.6)
    diabetes = rng.random(n) < p_dm
    smoker = rng.random(n) < 0.15
    ckd = rng.random(n) < 0.30
    egfr = np.where(ckd, rng.uniform(17.0, 60.0, n), np.clip(rng.normal(95 - 0.8 * (age - 30), 13, n), 61.0, 130.0))
    sbp = np.clip(rng.normal(118 + 0.45 * (age - 30) + 3 * black + 4 * diabetes, 14, n), 92.0, 195.0)
    on_bp = rng.random(n) < np.clip(0.05 + 0.008 * (age - 30) + 0.15 * diabetes + 0.1 * ckd, 0.0, 0.85)
    on_statin = rng.random(n) < np.clip(0.05 + 0.006 * (age - 30) + 0.2 * diabetes, 0.0, 0.7)
    tc = np.clip(rng.normal(200 - 25 * on_statin, 36, n), 132.0, 318.0)
    hdl = np.clip(rng.normal(np.where(female, 58.0, 46.0), 13, n), 22.0, 98.0)
    tg = np.exp(rng.normal(math.log(120.0), 0.45, n))
    ldl = np.clip(tc - hdl - tg / 5.0, 40.0, None)
    ln_uacr = rng.normal(math.log(8.0) + 1.2 * diabetes + 1.2 * (egfr < 60), 1.1, n)
    uacr = np.clip(np.exp(ln_uacr), 0.5, 5000.0)
    hba1c = np.where(diabetes, np.clip(rng.normal(7.3, 1.1, n), 5.5, 13.0), np.clip(rng.normal(5.4, 0.35, n), 4.5, 6.4))
    slope_mean = -1.0 - 1.0 * diabetes - 0.4 * np.maximum(0.0, np.log(uacr / 10.0))
    deviation = rng.normal(0.0, EGFR_SLOPE_SD, n)
    uacr_recorded = rng.random(n) < np.where(diabetes | (egfr < 60), 0.9, 0.6)
    hba1c_recorded = diabetes | (rng.random(n) < 0.5)
    return {
        "female": female, "race": race, "age": age, "bmi": bmi, "diabetes": diabetes, "smoker": smoker,
        "egfr": egfr, "sbp": sbp, "on_bp": on_bp, "on_statin": on_statin, "tc": tc, "hdl": hdl, "ldl": ldl,
        "uacr": uacr, "hba1c": hba1c, "slope_mean": slope_mean, "slope_deviation": deviation,
        "uacr_recorded": uacr_recorded, "hba1c_recorded": hba1c_recorded,
    }


def _prevent_logodds(pop: dict[str, np.ndarray], outcome: str, egfr: np.ndarray) -> np.ndarray:
    """PREVENT (full model, 10 years) log-odds at the true baseline values with ``egfr`` (broadcast)."""
    shape = egfr.shape

    def b(v: np.ndarray) -> np.ndarray:
        return np.broadcast_to(v.reshape(-1, *([1] * (len(shape) - 1))), shape)

    risk = prevent_risk(
        outcome=outcome, horizon_years=10, model="full", clip=True,
        sex=b(np.where(pop["female"], "female", "male")), age_years=b(pop["age"]),
        total_cholesterol_mg_dl=b(pop["tc"]), hdl_cholesterol_mg_dl=b(pop["hdl"]),
        systolic_bp_mm_hg=b(pop["sbp"]), on_bp_treatment=b(pop["on_bp"]), on_statin=b(pop["on_statin"]),
        diabetes=b(pop["diabetes"]), current_smoker=b(pop["smoker"]), bmi_kg_m2=b(np.clip(pop["bmi"], 18.5, 39.9)),
        egfr_ml_min_1_73m2=egfr, uacr_mg_g=b(pop["uacr"]), hba1c_percent=b(pop["hba1c"]),
    )
    r = np.clip(np.asarray(risk, dtype=float), 1e-9, 1 - 1e-9)
    out: np.ndarray = np.log(r) - np.log1p(-r)
    return out


def _cif(hazard: np.ndarray, death: np.ndarray, dt: float) -> np.ndarray:
    """Cumulative incidence at each month end (n, months) with piecewise-constant hazards per month."""
    total = (hazard + death) * dt
    surv_start = np.exp(-np.concatenate([np.zeros((hazard.shape[0], 1)), np.cumsum(total, axis=1)[:, :-1]], axis=1))
    share = np.divide(hazard, hazard + death, out=np.zeros_like(hazard), where=(hazard + death) > 0)
    out: np.ndarray = np.cumsum(surv_start * share * -np.expm1(-total), axis=1)
    return out


def _scale_to(target: np.ndarray, shape: np.ndarray, death: np.ndarray, dt: float) -> np.ndarray:
    """Per-patient factor c so that the CIF of hazard ``c * shape`` at the last month equals ``target``."""
    lo = np.zeros(target.size)
    hi = np.full(target.size, 1.0)
    while True:  # widen until every target is bracketed
        short = _cif(hi[:, None] * shape, death, dt)[:, -1] < target
        if not short.any():
            break
        hi = np.where(short, hi * 4.0, hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        below = _cif(mid[:, None] * shape, death, dt)[:, -1] < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out: np.ndarray = 0.5 * (lo + hi)
    return out


def _first_crossing(cumulative: np.ndarray, threshold: np.ndarray, dt: float) -> np.ndarray:
    """Time (years) at which a piecewise-linear cumulative hazard first reaches ``threshold``; inf if never."""
    n, m = cumulative.shape
    full = np.concatenate([np.zeros((n, 1)), cumulative], axis=1)
    idx = (full < threshold[:, None]).sum(axis=1)  # cumulative is non-decreasing
    out = np.full(n, np.inf)
    hit = idx <= m
    i = idx[hit]
    rows = np.nonzero(hit)[0]
    h0, h1 = full[rows, i - 1], full[rows, i]
    frac = np.divide(threshold[hit] - h0, h1 - h0, out=np.ones_like(h0), where=(h1 - h0) > 0)
    out[hit] = (i - 1 + frac) * dt
    return out


def _histories(pop: dict[str, np.ndarray], rng: np.random.Generator, i: int) -> dict[str, np.ndarray]:
    """Recorded history of patient ``i``: (visits, 2) arrays of (years before the forecast, value)."""
    visits = int(rng.integers(3, 7))
    times = np.sort(np.concatenate([-rng.uniform(0.25, 4.0, visits - 1), [0.0]]))
    slope = pop["slope_mean"][i] + pop["slope_deviation"][i]
    egfr = np.clip((pop["egfr"][i] + slope * times) * np.exp(rng.normal(0, 0.06, visits)), 15.5, 150.0)
    ldl = pop["ldl"][i] * np.exp(rng.normal(0, 0.08, visits))
    sbp = np.clip(pop["sbp"][i] + rng.normal(0, 10.0, visits), 85.0, 210.0)
    bmi = np.clip(pop["bmi"][i] + rng.normal(0, 0.5, visits), 17.0, 50.0)
    out = {"egfr": egfr, "ldl": ldl, "sbp": sbp, "bmi": bmi}
    if pop["hba1c_recorded"][i]:
        out["hba1c"] = np.clip(pop["hba1c"][i] + rng.normal(0, 0.2, visits), 4.0, 15.0)
    return {k: np.column_stack([times, v]) for k, v in out.items()}


def _inputs(pop: dict[str, np.ndarray], hist: dict[str, np.ndarray], i: int, rng: np.random.Generator) -> PatientInputs:
    """What the engine is given: recorded values (last visit), flags and histories; never the truth."""
    tc_rec = float(np.clip(pop["tc"][i] * math.exp(rng.normal(0, 0.05)), 130.0, 320.0))
    hdl_rec = float(np.clip(pop["hdl"][i] * math.exp(rng.normal(0, 0.06)), 20.0, 100.0))
    empty = np.zeros((0, 2))
    egfr_now = float(hist["egfr"][-1, 1])
    return PatientInputs(
        patient_id=f"virtual-{i}",
        sex="female" if pop["female"][i] else "male",
        age_years=float(pop["age"][i]),
        total_cholesterol_mg_dl=tc_rec,
        hdl_cholesterol_mg_dl=hdl_rec,
        ldl_cholesterol_mg_dl=float(hist["ldl"][-1, 1]),
        systolic_bp_mm_hg=float(hist["sbp"][-1, 1]),
        egfr_ml_min_1_73m2=egfr_now,
        bmi_kg_m2=float(hist["bmi"][-1, 1]),
        diabetes=bool(pop["diabetes"][i]),
        current_smoker=bool(pop["smoker"][i]),
        on_bp_treatment=bool(pop["on_bp"][i]),
        on_statin=bool(pop["on_statin"][i]),
        hba1c_percent=float(hist["hba1c"][-1, 1]) if "hba1c" in hist else None,
        uacr_mg_g=float(pop["uacr"][i] * math.exp(rng.normal(0, 0.3))) if pop["uacr_recorded"][i] else None,
        race=str(pop["race"][i]),
        hypertension=bool(pop["on_bp"][i] or pop["sbp"][i] >= 130),
        ckd=egfr_now < 60,
        statin_intensity="moderate" if pop["on_statin"][i] else None,
        statin_start_years=-5.0 if pop["on_statin"][i] else None,
        bp_treatment_start_years=-5.0 if pop["on_bp"][i] else None,
        history_ldl_cholesterol_mg_dl=hist["ldl"],
        history_systolic_bp_mm_hg=hist["sbp"],
        history_egfr_ml_min_1_73m2=hist["egfr"],
        history_hba1c_percent=hist.get("hba1c", empty),
        history_bmi_kg_m2=hist["bmi"],
        sources=("synthetic:fhirtwin.validation.events",),
    )


#: Step 7: the markers' true effects (this generator's own statement of them, with the sources in the docstring).
LPA_LOG_HR_PER_NMOL_L = math.log(1.11) / 50.0
CRP_LOG_HR_PER_LOG_UNIT = {"coronary": math.log(1.37) / math.log(3.0), "stroke": math.log(1.27) / math.log(3.0)}
CAC_LOG_HR_PER_LOG_UNIT = 0.2743
ACTIVITY_RR_0_TO_150 = 0.83
PM25_LOG_HR_PER_UG_M3 = 0.0
NT_PROBNP_LOG_HR_PER_LOG_UNIT = math.log(1.95)
NT_PROBNP_MEDIAN = {"female": 62.0, "male": 36.0}
CORONARY_SHARE = 0.6


def _markers(pop: dict[str, np.ndarray], rng: np.random.Generator
             ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """True marker values (engine field names) and their multipliers of the ASCVD and HF hazards (step 7)."""
    n = pop["age"].size
    lpa = np.minimum(19.6 * np.exp(rng.normal(0.0, 1.70, n)), 1000.0)
    crp_mu, crp_sd = math.log(2.0), math.log(3.0)
    crp = np.exp(rng.normal(crp_mu, crp_sd, n))
    logit = -1.0 + 0.09 * (pop["age"] - 60.0) + 0.9 * ~pop["female"] + 0.4 * pop["diabetes"] + 0.4 * pop["smoker"]
    p_cac = 1.0 / (1.0 + np.exp(-logit))
    cac_mu, cac_sd = 3.5 + 0.04 * (pop["age"] - 60.0), 1.4
    has_cac = rng.random(n) < p_cac
    cac = np.where(has_cac, np.exp(rng.normal(cac_mu, cac_sd)), 0.0)
    pm25 = rng.uniform(4.0, 16.0, n)
    exercise = np.where(rng.random(n) < 0.3, 0.0, np.minimum(150.0 * np.exp(rng.normal(0.0, 0.8, n)), 1500.0))

    def lognormal_mean(beta: float, mu: Any, sd: float) -> Any:
        return np.exp(beta * mu + 0.5 * (beta * sd) ** 2)  # E[x ** beta] of a log-normal x

    lpa_m = np.exp(LPA_LOG_HR_PER_NMOL_L * lpa)
    lpa_m /= lpa_m.mean()
    crp_part = {part: crp**beta / lognormal_mean(beta, crp_mu, crp_sd)
                for part, beta in CRP_LOG_HR_PER_LOG_UNIT.items()}
    b = CAC_LOG_HR_PER_LOG_UNIT
    cac_m = np.exp(b * np.log1p(cac)) / ((1.0 - p_cac) + p_cac * lognormal_mean(b, cac_mu, cac_sd))
    act_m = ACTIVITY_RR_0_TO_150 ** (np.minimum(exercise, 150.0) / 150.0)
    act_m /= act_m.mean()
    pm_m = np.exp(PM25_LOG_HR_PER_UG_M3 * pm25)
    coronary = CORONARY_SHARE * crp_part["coronary"] * cac_m
    multiplier = lpa_m * act_m * pm_m * (coronary + (1.0 - CORONARY_SHARE) * crp_part["stroke"])
    bnp_mu = np.log(np.where(pop["female"], NT_PROBNP_MEDIAN["female"], NT_PROBNP_MEDIAN["male"]))
    bnp = np.exp(rng.normal(bnp_mu, 1.0))
    beta = NT_PROBNP_LOG_HR_PER_LOG_UNIT
    hf_multiplier = bnp**beta / lognormal_mean(beta, bnp_mu, 1.0)
    values = {"lpa_nmol_l": lpa, "hscrp_mg_l": crp, "cac_agatston": cac, "pm25_ug_m3": pm25,
              "exercise_min_per_week": exercise, "nt_probnp_pg_ml": bnp}
    return values, multiplier, hf_multiplier


def generate(n: int, seed: int = 0, markers: bool = False) -> EventCohort:
    """``n`` virtual patients with histories, true risks and sampled events (module docstring).

    ``markers``: also give every patient Lp(a), hsCRP, coronary calcium, PM2.5, activity and NT-proBNP with
    their true effects (step 7); without it the cohort is exactly the one made before markers existed.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = np.random.default_rng(seed)
    pop = _population(n, rng)
    dt = 1.0 / 12.0
    mid = (np.arange(MONTHS) + 0.5) * dt
    years = np.arange(11, dtype=float)
    death_all = _death_hazards(pop["age"], pop["female"], pop["egfr"], pop["diabetes"], mid)
    death_nc = NON_CVD_SHARE * death_all
    death_cvd = (1.0 - NON_CVD_SHARE) * death_all
    d = pop["slope_deviation"]

    truth: dict[str, np.ndarray] = {}
    hazards: dict[str, np.ndarray] = {}
    for outcome in CVD:
        x0 = _prevent_logodds(pop, outcome, pop["egfr"])
        target = 1.0 / (1.0 + np.exp(-x0))
        shape = np.broadcast_to(np.exp(GOMPERTZ_RATE * mid)[None, :], (n, MONTHS))
        c = _scale_to(target, shape, death_nc, dt)
        x_path = _prevent_logodds(pop, outcome, pop["egfr"][:, None] + d[:, None] * years[None, :])
        log_mult = np.array([np.interp(mid, years, row) for row in (x_path - x0[:, None])])
        hazards[outcome] = c[:, None] * shape * np.exp(log_mult)
    marker_values: dict[str, np.ndarray] = {}
    if markers:  # step 7: the markers' true effects on the ASCVD and HF hazards (and so on total CVD)
        marker_values, ascvd_multiplier, hf_multiplier = _markers(pop, np.random.default_rng([seed, 2]))
        extra = hazards["ascvd"] * (ascvd_multiplier[:, None] - 1.0)
        extra_hf = hazards["heart_failure"] * (hf_multiplier[:, None] - 1.0)
        hazards["ascvd"] = hazards["ascvd"] + extra
        hazards["heart_failure"] = hazards["heart_failure"] + extra_hf
        hazards["total_cvd"] = np.maximum(hazards["total_cvd"] + extra + extra_hf, 0.0)
    for outcome in CVD:
        cif = _cif(hazards[outcome], death_nc, dt)
        truth[outcome] = cif[:, [12 * h - 1 for h in HORIZONS]]

    # kidney failure: KFRE net hazards at 2 and 5 years, Weibull through both, moved along KFRE's eGFR term
    def kfre_h(horizon: int, egfr: np.ndarray) -> np.ndarray:
        shape_ = egfr.shape
        uacr = np.broadcast_to(pop["uacr"].reshape(-1, *([1] * (len(shape_) - 1))), shape_)
        sex = np.broadcast_to(np.where(pop["female"], "female", "male").reshape(-1, *([1] * (len(shape_) - 1))), shape_)
        age = np.broadcast_to(pop["age"].reshape(-1, *([1] * (len(shape_) - 1))), shape_)
        r = np.asarray(kfre_risk(horizon_years=horizon, sex=sex, age_years=age, egfr_ml_min_1_73m2=egfr,
                                 uacr_mg_g=np.clip(uacr, 0.1, 25000.0), clip=True), dtype=float)
        out: np.ndarray = -np.log1p(-np.clip(r, 0.0, 1 - 1e-12))
        return out

    e0 = np.clip(pop["egfr"], 10.0, 60.0)
    h2, h5 = kfre_h(2, e0), kfre_h(5, e0)
    p = np.clip(np.log(np.maximum(h5, 1e-15) / np.maximum(h2, 1e-15)) / math.log(2.5), 0.5, 3.0)
    ends = (np.arange(MONTHS + 1) * dt)[None, :]
    base_cum = h5[:, None] * (ends / 5.0) ** p[:, None]
    path = np.clip(pop["egfr"][:, None] + d[:, None] * years[None, :], 10.0, 60.0)
    ratio_years = kfre_h(5, path) / np.maximum(h5[:, None], 1e-15)
    ratio = np.array([np.interp(mid, years, row) for row in ratio_years])
    hazards["kidney_failure"] = np.diff(base_cum, axis=1) / dt * ratio
    truth["kidney_failure"] = _cif(hazards["kidney_failure"], death_all, dt)[:, [12 * h - 1 for h in HORIZONS]]

    # sampling: exact inverse transform of piecewise-linear cumulative hazards
    cum = {o: np.cumsum(h, axis=1) * dt for o, h in hazards.items()}
    e_cvd = rng.exponential(size=n)  # shared by the CVD outcomes (comonotone)
    t_nc = _first_crossing(np.cumsum(death_nc, axis=1) * dt, rng.exponential(size=n), dt)
    t_cd = _first_crossing(np.cumsum(death_cvd, axis=1) * dt, rng.exponential(size=n), dt)
    t_any = np.minimum(t_nc, t_cd)
    observed: dict[str, np.ndarray] = {}
    for outcome in OUTCOMES:
        e = e_cvd if outcome in CVD else rng.exponential(size=n)
        t_event = _first_crossing(cum[outcome], e, dt)
        competing = t_nc if outcome in CVD else t_any
        observed[outcome] = np.column_stack(
            [((t_event <= h) & (t_event < competing)).astype(float) for h in HORIZONS])

    inputs = []
    hist_rng = np.random.default_rng([seed, 1])
    for i in range(n):
        hist = _histories(pop, hist_rng, i)
        patient = _inputs(pop, hist, i, hist_rng)
        if marker_values:
            patient = dataclasses.replace(
                patient, lpa_nmol_l=float(marker_values["lpa_nmol_l"][i]),
                hscrp_mg_l=float(marker_values["hscrp_mg_l"][i]), cac_agatston=float(marker_values["cac_agatston"][i]),
                pm25_ug_m3=float(marker_values["pm25_ug_m3"][i]),
                exercise_min_per_week=float(marker_values["exercise_min_per_week"][i]),
                nt_probnp_pg_ml=float(marker_values["nt_probnp_pg_ml"][i]))
        inputs.append(patient)
    recorded_egfr = np.array([p_.egfr_ml_min_1_73m2 for p_ in inputs])
    attributes = {
        "sex": np.where(pop["female"], "female", "male"),
        "race": pop["race"],
        "age": pop["age"],
        "egfr_recorded": recorded_egfr,
        "diabetes": pop["diabetes"],
        "egfr_slope": pop["slope_mean"] + d,
        **marker_values,
    }
    return EventCohort(inputs=inputs, attributes=attributes, truth=truth, observed=observed, seed=seed)


def engine_predictions(cohort: EventCohort, draws: int = 40, model_name: str = "fhirtwin-mechanistic",
                       progress: Any = None, model_kwargs: dict[str, Any] | None = None,
                       only: Sequence[int] | None = None, base: dict[str, np.ndarray] | None = None
                       ) -> dict[str, np.ndarray]:
    """The engine's cumulative incidence (mean over draws) at 5 and 10 years, (n, 2) per outcome.

    ``model_kwargs`` configure the model (e.g. its components); ``only`` re-predicts just those patients and
    takes the others from ``base`` (each patient keeps its own seed, so predictions are paired).
    """
    from fhirtwin.sim import get_model

    out = ({o: np.array(v, copy=True) for o, v in base.items()} if base is not None
           else {o: np.empty((cohort.n, len(HORIZONS))) for o in OUTCOMES})
    months = [12 * h for h in HORIZONS]
    model = get_model(model_name, **(model_kwargs or {}))
    chosen = range(cohort.n) if only is None else only
    for k, i in enumerate(chosen):
        patient = cohort.inputs[i]
        model.fit(patient)
        forecast = model.simulate(None, float(max(HORIZONS)), draws, seed=cohort.seed + i)
        for o in OUTCOMES:
            out[o][i] = forecast.cif[o][:, months].mean(axis=0)
        if progress is not None:
            progress(k + 1, len(chosen))
    return out
