"""Deterministic synthetic cohort: one FHIR R4 transaction Bundle per patient, plus ground truth.

Why: fhirtwin's adapters, twin calibration and risk engines need realistic, multi-year records whose
generating parameters are known, so tests can check that what the twin recovers matches what was put
in -- and that the messy parts of real feeds are caught instead of silently used.

Every patient ``k`` gets its own random stream seeded by ``(seed, k)``, so patient ``ftp-0007`` is the
same whether 10 or 240 patients are generated. No wall-clock time and no random UUIDs are used: all
dates are offsets from ``reference_date`` and every ``fullUrl`` is a UUID5 of the resource's id. Ids are
client-assigned and stable (``ftp-0001``, ``ftp-0001-obs-0001``, ``ftp-0001-cond-01``,
``ftp-0001-med-01``, ``ftp-0001-dr-01``) and every entry is a ``PUT``, so loading twice is a no-op.

Content per patient (3-10 years of history): demographics with the US Core race extension; BP panels
(85354-9 with 8480-6/8462-4), weight, height and BMI; lipid panels, HbA1c, glucose, creatinine, UACR
and potassium, with trends driven by the latent parameters (statins lower LDL from their start date,
antihypertensives lower SBP, creatinine rises as eGFR falls -- faster with diabetes, hypertension and
APOL1 high-risk genotypes, slower after an SGLT2 inhibitor); conditions (T2D, hypertension, CKD 3a/3b/4
derived from the eGFR trajectory, MI, stroke, heart failure, FH); MedicationRequests with RxNorm codes;
smoking status (72166-2), the Exercise Vital Sign panel (89574-8) and weekly aerobic minutes (82290-8);
estimated residential PM2.5 exposure under fhirtwin's own code system (no standard code exists); and,
for most patients, a genomic report per the HL7 Genomics Reporting IG STU3: FH and APOL1 variants
(69548-6), CYP2C19 and SLCO1B1 genotypes (84413-4) with therapeutic implications, and a CAD polygenic
risk score (102040-3).

Messy data is injected at these documented rates (realised counts are in each patient's truth under
``messy``/``messy_counts``, and in :func:`messy_counts`):

* ``sparse-patient``: ``RATE_SPARSE_PATIENT`` of patients have a Patient and 0-2 other resources.
* ``lipid-mmol-l``: ``RATE_LIPID_SI_PATIENT`` of patients report lipids in mmol/L (LOINC 14647-2,
  14646-4, 22748-8, 14927-8) and ``RATE_LIPID_MIXED_PATIENT`` mix mmol/L and mg/dL draw by draw; every
  molar lipid result is listed.
* ``creatinine-umol-l``: ``RATE_CREATININE_SI_PATIENT`` of patients report creatinine in umol/L
  (14682-9); every such result is listed.
* ``missing-unit``: ``RATE_MISSING_UNIT`` of quantity results lose unit, system and code.
* ``entered-in-error``: ``RATE_ENTERED_IN_ERROR`` of quantity results get an extra, wrong copy with
  status ``entered-in-error``.
* ``duplicate``: ``RATE_DUPLICATE`` of results get an exact copy (same value and time, new id).
* ``implausible``: ``RATE_IMPLAUSIBLE_PATIENT`` of patients get one or two impossible values (SBP 20 or
  400 mm[Hg], LDL 2000 mg/dL, HbA1c 40 %).
* ``preliminary``: ``RATE_PRELIMINARY`` of laboratory results have status ``preliminary``.
* ``condition-refuted`` / ``condition-entered-in-error``: ``RATE_CONDITION_REFUTED`` /
  ``RATE_CONDITION_ENTERED_IN_ERROR`` of patients carry a refuted or an entered-in-error Condition.

Coding variety. Real EHRs code one concept many ways, so every concept is coded per patient from weighted
variants in ``codes.json`` (``condition_variants``, ``procedures``, ``statin_presentations``,
``medication_products``, ``insulins``), each code listed in its ``terms`` table with display, source and a
``checked`` mark. The generator reads only its own tables (never the adapters' value sets), so its tests can
fail when a reader maps a realistic code wrongly. These choices and the arms below come from a second random
stream per patient, so the latent draws of the first stream stay as they were:

* conditions: acute MI subtypes (I21.x, I22.x, STEMI/NSTEMI) or old/history-of MI (1755008, 399211009,
  I25.2); ischaemic stroke subtypes (I63.x) or Z86.73; heart failure subtypes (I50.x); T2D as E11.9/E11.65
  or by complication (E11.22, 127013003, 90781000119102, 157141000119108, 422034002); CKD by N18.x and the
  SNOMED stage concepts (stage 3 unsplit for some); hypertension and hyperlipidaemia variants. Category
  problem-list-item, encounter-diagnosis or health-concern (US Core); ``RATE_NO_CLINICAL_STATUS`` of
  unabated encounter diagnoses carry no clinicalStatus (US Core allows it).
* arms: ``RATE_CHD`` coronary heart disease without MI (53741008, 414545008, I25.10, I25.9, angina), and
  for 45 % of coronary patients a PCI or CABG (a Procedure with performedDateTime, or a history code
  399261000 / Z95.1 / Z95.5); ``RATE_TIA`` TIA; ``RATE_PAD`` PAD (+2 % for ever-smokers; I70.2x, 399957001);
  ``RATE_TYPE1_DIABETES`` of diabetics have type 1 (always on insulin, no metformin); of type 2 diabetics
  ``RATE_DM_COMPLICATION_ONLY`` are coded only by a complication and ``RATE_DM_INSULIN_ONLY`` only by insulin
  therapy (no diabetes Condition), 12 % more are on insulin; ``RATE_DIALYSIS`` reach dialysis (ESRD N18.6,
  then monthly dialysis Procedures or a dependence-on-dialysis finding Z99.2) and ``RATE_KIDNEY_TRANSPLANT``
  have a kidney transplant (a Procedure, or Z94.0 / 161665007). Patients 1..``FIXTURE_PATIENTS`` (fixtures of
  the write-back and conformance tests) get none of the out-of-scope arms and no US Core health-concern
  category (the conformance check validates them against R4 core alone).
* medications: products (RxNorm SCD/SBD, e.g. "atorvastatin 40 MG Oral Tablet", half-strength tablets taken
  two at a time) or ingredients; dose in mg, tablets ({tbl}) or insulin units ([iU]); the order names the
  drug by code (most), ``RATE_MED_REFERENCE`` by ``medicationReference`` to a Medication in the bundle,
  ``RATE_MED_CONTAINED`` by a contained Medication; ``RATE_MED_DISPENSE_ONLY`` are known only from
  MedicationDispense fills (90 days each) and ``RATE_MED_DISPENSE_TOO`` from an order and its fills.
* eGFR: ``RATE_EGFR_REPORTED`` of patients' labs report CKD-EPI 2021 eGFR (98979-8, computed from the
  reported creatinine) in mL/min/{1.73_m2}; ``RATE_EGFR_ML_MIN`` report it in mL/min (times DuBois BSA/1.73).

Ground truth is meaning-level: besides the latents, each patient's truth says what the record establishes at
the reference date -- ``ascvd`` (prior_mi, coronary_heart_disease, angina, coronary_revascularisation,
prior_stroke, tia, peripheral_arterial_disease, established), ``heart_failure``, ``diabetes_type``,
``diabetes_coded_by``, ``diabetic_kidney_disease``, ``diabetic_retinopathy``, ``ckd_stage`` (and the stage the
code says, ``ckd_stage_recorded``), ``dialysis``, ``kidney_transplant``, ``statin`` (agent, daily dose,
intensity from the generator's own ACC/AHA 2018 Table 3), ``on_insulin``, ``egfr_reported`` and ``scope``:
"scope-primary-prevention" for adults 30-79 without established ASCVD, heart failure, dialysis, kidney
transplant or pregnancy, else the first that applies of "scope-kidney-transplant", "scope-dialysis",
"scope-heart-failure", "scope-established-ascvd", "scope-pregnancy", "scope-age". A sparse record carries no
diagnoses, so its truth has none.

All data is synthetic. Code tables live in ``cohort_data/codes.json`` with their public sources.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SEED = 20261127
DEFAULT_PATIENTS = 240

RATE_SPARSE_PATIENT = 0.05
RATE_LIPID_SI_PATIENT = 0.12
RATE_LIPID_MIXED_PATIENT = 0.08
RATE_CREATININE_SI_PATIENT = 0.10
RATE_MISSING_UNIT = 0.01
RATE_ENTERED_IN_ERROR = 0.01
RATE_DUPLICATE = 0.015
RATE_IMPLAUSIBLE_PATIENT = 0.15
RATE_PRELIMINARY = 0.02
RATE_CONDITION_REFUTED = 0.05
RATE_CONDITION_ENTERED_IN_ERROR = 0.03
RATE_GENOMIC_TESTING = 0.70

# Coding variety and the arms of the second random stream (see the module docstring).
RATE_TYPE1_DIABETES = 0.08
RATE_DM_COMPLICATION_ONLY = 0.14
RATE_DM_INSULIN_ONLY = 0.12
RATE_CHD = 0.05
RATE_TIA = 0.02
RATE_PAD = 0.025
RATE_DIALYSIS = 0.025
RATE_KIDNEY_TRANSPLANT = 0.02
RATE_EGFR_REPORTED = 0.38
RATE_EGFR_ML_MIN = 0.06
RATE_MED_REFERENCE = 0.20
RATE_MED_CONTAINED = 0.06
RATE_MED_DISPENSE_ONLY = 0.08
RATE_MED_DISPENSE_TOO = 0.06
RATE_NO_CLINICAL_STATUS = 0.40
#: Patients ftp-0001..ftp-0010 are the fixtures of the write-back and conformance tests: the out-of-scope arms
#: of the second stream (CHD, TIA, PAD, dialysis, kidney transplant) are not given to them.
FIXTURE_PATIENTS = 10

MESSY_KINDS = (
    "sparse-patient",
    "lipid-mmol-l",
    "creatinine-umol-l",
    "missing-unit",
    "entered-in-error",
    "duplicate",
    "implausible",
    "preliminary",
    "condition-refuted",
    "condition-entered-in-error",
)

MG_DL_PER_MMOL_L_CHOLESTEROL = 38.67  # molar mass of cholesterol ~386.7 g/mol
MG_DL_PER_MMOL_L_TRIGLYCERIDE = 88.57  # triolein ~885.7 g/mol
UMOL_L_PER_MG_DL_CREATININE = 88.4  # creatinine 113.12 g/mol

# Measurement scatter of the synthetic results follows published within-person variability, so that the
# twin's predictive intervals are judged against realistic data:
# - office SBP visit-to-visit SD ~9.7 mm[Hg]: geometric mean of the ALLHAT quintile cut-points 6.5 and
#   14.4 mm[Hg] (Muntner P et al., Ann Intern Med 2015;163:329), within the range of Rothwell PM et al.,
#   Lancet 2010;375:895;
# - serum creatinine: within-subject CV 5.0 % (meta-analysis of 37 studies, Front Med 2022;9:1009358)
#   combined with an analytical CV of 2.5 % (half the within-subject CV, the desirable specification of
#   Fraser & Petersen, Clin Chem 1993;39:1447): total CV 5.6 %;
# - body weight: 1.5 % of weight, an ASSUMPTION in the 1-2 % day-to-day range usually quoted.
SBP_VISIT_SD_MM_HG = 9.7
CREATININE_TOTAL_CV = 0.056
WEIGHT_CV = 0.015

RACE_EXTENSION_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
_UUID_NAMESPACE = uuid.UUID("6f1c2d0e-8a57-5b7e-9c1d-f1e2a3b4c5d6")
_YEAR_DAYS = 365.25
_MOLAR_LIPIDS = {"tc_molar", "hdl_molar", "ldl_molar", "tg_molar"}
_REF = "__ref__"


@cache
def codes() -> dict[str, Any]:
    """The code tables (LOINC, SNOMED CT, ICD-10-CM, RxNorm, Genomics IG) shipped beside this module."""
    return json.loads((Path(__file__).with_name("cohort_data") / "codes.json").read_text())


@dataclass(frozen=True)
class Cohort:
    """Bundles to load (one transaction per patient, in patient order) and the truth that generated them."""

    bundles: list[dict]
    truth: dict[str, dict]


def generate_cohort(
    n_patients: int = DEFAULT_PATIENTS, seed: int = DEFAULT_SEED, reference_date: str = "2026-06-30"
) -> Cohort:
    """Generate ``n_patients`` synthetic patients; the same arguments always give byte-identical JSON."""
    if n_patients < 0:
        raise ValueError("n_patients must be >= 0")
    ref = date.fromisoformat(reference_date)
    bundles: list[dict] = []
    truth: dict[str, dict] = {}
    for k in range(1, n_patients + 1):
        bundle, patient_truth = generate_patient(k, seed, ref)
        bundles.append(bundle)
        truth[patient_truth["patient_id"]] = patient_truth
    return Cohort(bundles=bundles, truth=truth)


def generate_patient(
    k: int, seed: int = DEFAULT_SEED, reference_date: str | date = "2026-06-30"
) -> tuple[dict, dict]:
    """Patient ``k`` (1-based) alone, as ``(bundle, truth)``: the same as entry ``k - 1`` of
    :func:`generate_cohort` with any ``n_patients >= k``, so large cohorts can be streamed."""
    if k < 1:
        raise ValueError("k must be >= 1")
    ref = reference_date if isinstance(reference_date, date) else date.fromisoformat(reference_date)
    return _PatientGenerator(k, seed, ref).build()


def bundle_json(bundle: dict) -> str:
    """Canonical text of a bundle as written to disk (sorted keys, compact, trailing newline)."""
    return json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def messy_counts(cohort: Cohort) -> dict[str, int]:
    """Realised number of injected messy items per kind across the cohort (every kind listed)."""
    counts = Counter(item["kind"] for t in cohort.truth.values() for item in t["messy"])
    return {kind: counts.get(kind, 0) for kind in MESSY_KINDS}


def write_cohort(cohort: Cohort, out_dir: Path) -> None:
    """Write ``bundles/<patient-id>.json``, ``truth.json`` (patient id -> truth) and ``summary.json``."""
    out_dir = Path(out_dir)
    bundle_dir = out_dir / "bundles"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    for bundle in cohort.bundles:
        patient_id = bundle["entry"][0]["resource"]["id"]
        (bundle_dir / f"{patient_id}.json").write_text(bundle_json(bundle), encoding="utf-8")
    (out_dir / "truth.json").write_text(
        json.dumps(cohort.truth, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    summary = {
        "patients": len(cohort.bundles),
        "entries": sum(len(b["entry"]) for b in cohort.bundles),
        "messy_counts": messy_counts(cohort),
        "messy_rates": {
            "sparse-patient (per patient)": RATE_SPARSE_PATIENT,
            "lipid-mmol-l (patients all SI / mixed)": [RATE_LIPID_SI_PATIENT, RATE_LIPID_MIXED_PATIENT],
            "creatinine-umol-l (per patient)": RATE_CREATININE_SI_PATIENT,
            "missing-unit (per quantity result)": RATE_MISSING_UNIT,
            "entered-in-error (per quantity result)": RATE_ENTERED_IN_ERROR,
            "duplicate (per result)": RATE_DUPLICATE,
            "implausible (per patient)": RATE_IMPLAUSIBLE_PATIENT,
            "preliminary (per laboratory result)": RATE_PRELIMINARY,
            "condition-refuted (per patient)": RATE_CONDITION_REFUTED,
            "condition-entered-in-error (per patient)": RATE_CONDITION_ENTERED_IN_ERROR,
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# helpers


def creatinine_for_egfr(egfr: float, age: float, female: bool) -> float:
    """Invert CKD-EPI 2021 (``fhirtwin.sim.equations.egfr_ckd_epi_2021``, Inker et al., NEJM 2021): the serum
    creatinine (mg/dL) that gives ``egfr`` at this age and sex."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    at_kappa = 142.0 * 0.9938**age * (1.012 if female else 1.0)
    if egfr >= at_kappa:
        return kappa * (egfr / at_kappa) ** (1.0 / alpha)
    return kappa * (egfr / at_kappa) ** (-1.0 / 1.200)


def _sys(key: str) -> str:
    return codes()["systems"][key]


def _coding(system_key: str, code: str, display: str | None = None) -> dict:
    coding = {"system": _sys(system_key), "code": code}
    if display:
        coding["display"] = display
    return coding


_TERM_SYSTEMS = {"snomed": "snomed", "icd10cm": "icd10cm", "loinc": "loinc", "rxnorm": "rxnorm"}


def _term(key: str) -> dict:
    """A coding from the terms table (``system|code``), with the display the table gives it."""
    system, code = key.split("|", 1)
    return _coding(_TERM_SYSTEMS[system], code, codes()["terms"][key]["display"])


def _ckd_epi_2021(scr_mg_dl: float, age: float, female: bool) -> float:
    """CKD-EPI 2021 creatinine equation (Inker et al., NEJM 2021;385:1737), as a lab reports it."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = scr_mg_dl / kappa
    value = 142.0 * min(ratio, 1.0) ** alpha * max(ratio, 1.0) ** -1.200 * 0.9938**age
    return value * (1.012 if female else 1.0)


def _obs_code(key: str) -> dict:
    entry = codes()["observations"][key]
    return {"coding": [_coding("loinc", entry["code"], entry["display"])], "text": entry["display"]}


def _quantity(value: float | int, ucum: str, text: str) -> dict:
    return {"value": value, "unit": text, "system": _sys("ucum"), "code": ucum}


def _category(code: str) -> list[dict]:
    return [{"coding": [_coding("obs_category", code)]}]


def _genomic_category() -> list[dict]:
    return [
        {"coding": [_coding("obs_category", "laboratory")]},
        {"coding": [_coding("v2_0074", "GE", "Genetics")]},
    ]


def _answer(key: str) -> dict:
    entry = codes()["genomics"]["answers"][key]
    return {"coding": [_coding("loinc", entry["code"], entry["display"])]}


def _component_code(key: str) -> dict:
    entry = codes()["genomics"]["components"][key]
    return {"coding": [_coding(entry["system"], entry["code"], entry["display"])]}


def _gene_component(gene: str) -> dict:
    hgnc = codes()["genomics"]["genes"][gene]["hgnc"]
    return {"code": _component_code("gene_studied"), "valueCodeableConcept": {"coding": [_coding("hgnc", hgnc, gene)]}}


def _round(value: float, digits: int) -> float | int:
    """Round for the wire; whole-number units become JSON integers so output is stable and tidy."""
    if digits == 0:
        return int(round(value))
    return round(float(value), digits)


class _Item:
    """One resource under construction, with what the messy-data injector needs to know about it."""

    __slots__ = ("seq", "rtype", "resource", "when", "analyte", "lab", "quantity", "clean", "kinds", "genomic")

    def __init__(self, seq: int, rtype: str, resource: dict, when: str, analyte: str, *, lab: bool = False):
        self.seq = seq
        self.rtype = rtype
        self.resource = resource
        self.when = when
        self.analyte = analyte
        self.lab = lab
        self.quantity = "valueQuantity" in resource
        self.clean = True
        self.kinds: list[str] = []
        self.genomic = False


# ----------------------------------------------------------------------------------------------------
# one patient


class _PatientGenerator:
    """Draws one patient's latent state, then renders it as FHIR resources and ground truth."""

    def __init__(self, k: int, seed: int, ref: date):
        self.k = k
        self.pid = f"ftp-{k:04d}"
        self.ref = ref
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), k]))
        # A second stream for how the record is coded (variants, resource shapes) and for the arms added after
        # the first release (CHD, revascularisation, TIA, PAD, type 1 diabetes, insulin, dialysis, transplant):
        # patient k's latent draws from the first stream are unchanged by them.
        self.vr = np.random.default_rng(np.random.SeedSequence([int(seed), k, 1]))
        self.procedures: list[dict] = []
        self.egfr_reports: list[tuple] = []
        self.items: list[_Item] = []
        self._seq = 0
        self.conditions: list[dict] = []
        self.meds: list[dict] = []
        self.messy: list[dict] = []

    # -- small utilities ---------------------------------------------------------------------------

    def _u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return float(self.rng.uniform(lo, hi))

    def _n(self, mean: float, sd: float) -> float:
        return float(self.rng.normal(mean, sd))

    def _chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def _vu(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return float(self.vr.uniform(lo, hi))

    def _vchance(self, p: float) -> bool:
        return bool(self.vr.random() < p)

    def _vpick(self, options: list, weights: list[float] | None = None):
        if weights is not None:
            total = float(sum(weights))
            weights = [w / total for w in weights]
        return options[int(self.vr.choice(len(options), p=weights))]

    def _variant(self, kind: str) -> dict:
        options = codes()["condition_variants"][kind]
        return self._vpick(options, [o["w"] for o in options])

    def _pick(self, options: list, weights: list[float] | None = None):
        idx = int(self.rng.choice(len(options), p=weights))
        return options[idx]

    def _date(self, t: float) -> date:
        return self.ref + timedelta(days=int(round(t * _YEAR_DAYS)))

    def _dt(self, t: float, hour: int, minute: int) -> str:
        return f"{self._date(t).isoformat()}T{hour:02d}:{minute:02d}:00Z"

    def _ref(self, item: _Item) -> dict:
        return {"reference": f"{_REF}{item.seq}"}

    def _new_item(self, rtype: str, resource: dict, when: str, analyte: str, *, lab: bool = False) -> _Item:
        self._seq += 1
        item = _Item(self._seq, rtype, resource, when, analyte, lab=lab)
        self.items.append(item)
        return item

    # -- latent state --------------------------------------------------------------------------------

    def _draw_latents(self) -> None:
        cfg = codes()
        self.female = self._chance(0.5)
        self.age = int(self.rng.integers(35, 81))
        self.birth = self.ref - timedelta(days=int(round(self.age * _YEAR_DAYS)) + int(self.rng.integers(0, 365)))
        self.race = self._pick(["white", "black", "asian", "other"], [0.55, 0.25, 0.10, 0.10])
        self.years = round(self._u(3.0, 10.0), 2)
        self.t0 = -self.years
        self.sparse = self._chance(RATE_SPARSE_PATIENT)

        # genotypes
        self.fh_gene = None
        if self._chance(0.05):
            self.fh_gene = self._pick(["LDLR", "APOB", "PCSK9"], [0.6, 0.25, 0.15])
        g1, g2 = (0.22, 0.13) if self.race == "black" else (0.003, 0.002)
        self.apol1 = [self._pick(["G0", "G1", "G2"], [1 - g1 - g2, g1, g2]) for _ in range(2)]
        self.apol1.sort()
        self.apol1_risk = sum(a != "G0" for a in self.apol1)
        self.apol1_high_risk = self.apol1_risk == 2
        p2, p3 = (0.30, 0.05) if self.race == "asian" else (0.15, 0.01)
        cyp = sorted(
            (self._pick(["*1", "*2", "*3", "*17"], [1 - p2 - p3 - 0.2, p2, p3, 0.2]) for _ in range(2)),
            key=lambda a: int(a[1:]),
        )
        self.cyp2c19 = "/".join(cyp)
        slco = sorted(
            (self._pick(["*1", "*5", "*15"], [0.85, 0.02, 0.13]) for _ in range(2)), key=lambda a: int(a[1:])
        )
        self.slco1b1 = "/".join(slco)
        self.cyp2c19_phenotype = cfg["genomics"]["cyp2c19_phenotypes"][self.cyp2c19]
        self.slco1b1_phenotype = cfg["genomics"]["slco1b1_phenotypes"][self.slco1b1]
        self.prs_z = round(self._n(0.0, 1.0), 3)
        self.prs_percentile = round(100.0 * 0.5 * (1.0 + math.erf(self.prs_z / math.sqrt(2.0))), 1)
        self.tested = self.fh_gene is not None or self._chance(RATE_GENOMIC_TESTING)
        self.test_t = self._u(self.t0 + 0.2, -0.15)

        # lipids, anthropometrics, blood pressure, glycaemia, kidney
        self.ldl0 = float(np.clip(self._n(122, 28), 60, 220))
        if self.fh_gene:
            self.ldl0 = float(np.clip(self.ldl0 + self._n(105, 25), 190, 420))
        self.hdl0 = float(np.clip(self._n(57, 12) if self.female else self._n(46, 10), 25, 100))
        self.height = float(np.clip(self._n(162, 6.5) if self.female else self._n(176, 7), 145, 200))
        self.bmi0 = float(np.clip(self._n(29, 5), 19, 48))
        self.bmi_drift = self._n(0.1, 0.25)
        age0 = self.age + self.t0
        self.diabetes = self._chance(min(0.6, 0.10 + 0.005 * (age0 - 35) + (0.10 if self.bmi0 > 30 else 0.0)))
        self.htn = self._chance(min(0.8, 0.22 + 0.009 * (age0 - 35) + (0.08 if self.race == "black" else 0.0)))
        self.tg0 = float(np.clip(math.exp(self._n(math.log(125) + (0.25 if self.diabetes else 0.0), 0.35)), 40, 700))
        self.statin_response = float(np.clip(self._n(1.0, 0.12), 0.6, 1.35))

        self.dm_onset = None
        if self.diabetes:
            self.dm_onset = self.t0 - self._u(0.1, 8) if self._chance(0.6) else self._u(self.t0 + 0.5, -0.3)
        self.a1c0 = float(np.clip(self._n(5.4, 0.25), 4.6, 6.0))
        self.a1c_dm = float(np.clip(self._n(8.2, 1.0), 6.8, 12.0))

        self.htn_onset = None
        if self.htn:
            self.htn_onset = self.t0 - self._u(0.1, 6) if self._chance(0.65) else self._u(self.t0 + 0.3, -0.3)
            self.sbp_level = float(np.clip(self._n(150, 11), 132, 185))
        else:
            self.sbp_level = float(np.clip(self._n(121, 8), 100, 136))

        ckd_risk = 0.08 + (0.10 if self.diabetes else 0.0) + (0.08 if self.apol1_high_risk else 0.0)
        self.ckd_phenotype = self._chance(ckd_risk)
        if self.ckd_phenotype:
            self.egfr0 = self._u(27, 68)
        else:
            self.egfr0 = float(np.clip(self._n(97 - 0.8 * (age0 - 40), 11), 55, 125))
        slope = -abs(self._n(0.9, 0.3))
        slope -= 1.6 if self.diabetes else 0.0
        slope -= 0.6 if self.htn else 0.0
        slope -= 2.5 if self.apol1_high_risk else 0.0
        slope -= 1.0 if self.ckd_phenotype else 0.0
        self.egfr_slope = min(-0.1, slope + self._n(0, 0.3))
        self.uacr_log0 = (
            math.log(8)
            + (1.3 if self.diabetes else 0)
            + (0.6 if self.htn else 0)
            + (1.2 if self.apol1_high_risk else 0)
            + (0.9 if self.ckd_phenotype else 0)
        )

        # smoking, activity, environment
        self.smoking0 = self._pick(["never", "former", "current"], [0.55, 0.27, 0.18])
        self.smoking_current_code = self._pick(["current_daily", "current_someday"], [0.75, 0.25])
        self.quit_t = None
        if self.smoking0 == "current" and self._chance(0.3):
            self.quit_t = self._u(self.t0 + 0.5, -0.3)
        self.activity_days = int(self._pick([0, 1, 2, 3, 4, 5, 6, 7], [0.2, 0.1, 0.15, 0.17, 0.13, 0.13, 0.06, 0.06]))
        self.activity_minutes = int(self._pick([15, 20, 30, 45, 60], [0.15, 0.2, 0.35, 0.15, 0.15]))
        self.pm25 = float(np.clip(self._n(8.5, 2.2), 3.5, 18.0))

        # events
        risk = 0.03 + (0.06 if self.fh_gene else 0) + (0.03 if self.prs_z > 1 else 0)
        risk += (0.03 if self.smoking0 != "never" else 0) + (0.03 if self.diabetes else 0) + 0.002 * (age0 - 40)
        self.mi_t = self._u(self.t0 - 4, -0.3) if self._chance(risk) else None
        self.stroke_t = self._u(self.t0 - 4, -0.3) if self._chance(0.025 + (0.03 if self.htn else 0)) else None
        self.hf_t = None
        if self._chance(0.03 + (0.08 if self.mi_t is not None else 0) + (0.02 if self.htn else 0)):
            self.hf_t = self._u(self.t0 - 2, -0.3)
        self.fh_dx_t = None
        if self.fh_gene and self._chance(0.85):
            self.fh_dx_t = min(self.test_t, self._u(self.t0 - 5, self.t0 + 1))

        self.lipid_units = self._pick(
            ["mg/dL", "mmol/L", "mixed"],
            [1 - RATE_LIPID_SI_PATIENT - RATE_LIPID_MIXED_PATIENT, RATE_LIPID_SI_PATIENT, RATE_LIPID_MIXED_PATIENT],
        )
        self.creatinine_si = self._chance(RATE_CREATININE_SI_PATIENT)
        self.ldl_direct = self._chance(0.3)
        self._draw_variety_arms()

    def _draw_variety_arms(self) -> None:
        """Arms and coding choices drawn from the second stream (see ``__init__``)."""
        if self.smoking_current_code == "current_daily" and self._vchance(0.3):
            self.smoking_current_code = self._vpick(["current_unknown", "current_heavy", "current_light"])
        self.t1d = self.diabetes and self._vchance(RATE_TYPE1_DIABETES)
        if self.t1d:
            self.dm_onset = self.t0 - self._vu(2.0, 25.0)
        self.dm_coded_by = None
        if self.diabetes:
            self.dm_coded_by = "diagnosis" if self.t1d else self._vpick(
                ["diagnosis", "complication-only", "insulin-only"],
                [1 - RATE_DM_COMPLICATION_ONLY - RATE_DM_INSULIN_ONLY, RATE_DM_COMPLICATION_ONLY, RATE_DM_INSULIN_ONLY])
        self.dm_complication = self.diabetes and (self.dm_coded_by == "complication-only" or self._vchance(0.25))
        self.insulin = self.diabetes and (self.t1d or self.dm_coded_by == "insulin-only" or self._vchance(0.12))
        fixture = self.k <= FIXTURE_PATIENTS
        self.chd_t = self._vu(self.t0 - 6, -0.3) if self._vchance(RATE_CHD) and self.mi_t is None else None
        if fixture:
            self.chd_t = None
        self.revasc = None
        coronary = self.mi_t if self.mi_t is not None else self.chd_t
        if coronary is not None and self._vchance(0.45):
            kind = self._vpick(["pci", "cabg"], [0.65, 0.35])
            when = coronary + (0.01 if kind == "pci" and self.mi_t is not None else self._vu(0.02, 1.0))
            if when < -0.3:
                self.revasc = {"kind": kind, "t": when, "as": self._vpick(["procedure", "history"], [0.7, 0.3])}
        self.tia_t = self._vu(self.t0 - 4, -0.3) if self._vchance(RATE_TIA) else None
        pad_rate = RATE_PAD + (0.02 if self.smoking0 != "never" else 0.0)
        self.pad_t = self._vu(self.t0 - 4, -0.3) if self._vchance(pad_rate) else None
        none_kidney = 1 - RATE_DIALYSIS - RATE_KIDNEY_TRANSPLANT
        self.kidney_arm = self._vpick(["none", "dialysis", "transplant"],
                                      [none_kidney, RATE_DIALYSIS, RATE_KIDNEY_TRANSPLANT])
        if fixture:
            self.chd_t = self.tia_t = self.pad_t = None
            self.kidney_arm = "none"
        self.dialysis_t = self.transplant_t = None
        self.kidney_arm_as = None
        if self.kidney_arm == "dialysis":
            self.dialysis_t = self._vu(self.t0 + 0.8, -0.4) if self.years > 1.5 else self.t0 - self._vu(0.2, 2.0)
            if self.dialysis_t > self.t0 + 0.5:
                self.egfr0 = self._vu(24.0, 36.0)
                self.egfr_slope = min(-0.5, (14.0 - self.egfr0) / (self.dialysis_t - self.t0))
            self.ckd_phenotype = True
            self.kidney_arm_as = self._vpick(["procedure", "dependence-finding"], [0.6, 0.4])
        elif self.kidney_arm == "transplant":
            self.transplant_t = min(-0.6, self._vu(self.t0 - 8.0, self.t0 + 1.0))
            self.egfr0 = self._vu(42.0, 72.0)
            self.egfr_slope = -self._vu(0.3, 1.5)
            self.kidney_arm_as = self._vpick(["procedure", "status"], [0.5, 0.5])
        none_reported = 1 - RATE_EGFR_REPORTED - RATE_EGFR_ML_MIN
        self.egfr_report = self._vpick(["none", "mL/min/{1.73_m2}", "mL/min"],
                                       [none_reported, RATE_EGFR_REPORTED, RATE_EGFR_ML_MIN])

    # -- treatments ------------------------------------------------------------------------------------

    def _add_med(self, drug: str, start: float, end: float | None, reason: str | None, **extra: Any) -> dict:
        if end is not None and end >= -0.02:
            end = None
        med = {"drug": drug, "start": start, "end": end, "reason": reason, **extra}
        med["presentation"] = self._presentation(med)
        med["form"] = self._vpick(
            ["concept", "reference", "contained", "dispense-only", "request+dispense"],
            [1 - RATE_MED_REFERENCE - RATE_MED_CONTAINED - RATE_MED_DISPENSE_ONLY - RATE_MED_DISPENSE_TOO,
             RATE_MED_REFERENCE, RATE_MED_CONTAINED, RATE_MED_DISPENSE_ONLY, RATE_MED_DISPENSE_TOO])
        self.meds.append(med)
        return med

    def _presentation(self, med: dict) -> dict:
        """How the order names the drug: product or ingredient code, tablets per dose, dose unit."""
        cfg = codes()
        if med["drug"] == "statin":
            product = med["product"]
            options = [{"rxcui": product["rxcui"], "display": product["display"], "strength_mg": product["dose_mg"],
                        "tablets": 1, "w": 0.6}]
            for brand in cfg["statin_presentations"].get(product["rxcui"], []):
                options.append({"rxcui": brand["rxcui"], "display": brand["display"],
                                "strength_mg": product["dose_mg"], "tablets": 1, "w": 0.2})
            for half in cfg["statins"]["products"]:
                if half["ingredient"] == product["ingredient"] and 2 * half["dose_mg"] == product["dose_mg"]:
                    options.append({"rxcui": half["rxcui"], "display": half["display"],
                                    "strength_mg": half["dose_mg"], "tablets": 2, "w": 0.15})
            choice = dict(self._vpick(options, [o["w"] for o in options]))
            choice["dose_unit"] = "{tbl}" if choice["tablets"] > 1 or self._vchance(0.5) else "mg"
            choice["daily_dose_mg"] = choice["strength_mg"] * choice["tablets"]
            return choice
        if med["drug"] == "insulin":
            key = self._vpick(["glargine_lantus", "glargine", "lispro_humalog", "lispro"], [0.4, 0.3, 0.15, 0.15])
            entry = cfg["insulins"][key]
            units = int(self.vr.integers(8, 41))
            return {"rxcui": entry["rxcui"], "display": entry["display"], "units": units,
                    "per_day": 1 if entry["basal"] else 3, "dose_unit": "[iU]"}
        entry = cfg["medications"][med["drug"]]
        products = cfg["medication_products"].get(med["drug"], [])
        if products and self._vchance(0.6):
            product = self._vpick(products)
            return {"rxcui": product["rxcui"], "display": product["display"], "strength_mg": product["strength_mg"],
                    "tablets": product["tablets"], "per_day": entry["per_day"],
                    "dose_unit": "{tbl}" if product["tablets"] > 1 or self._vchance(0.4) else "mg"}
        return {"rxcui": entry["rxcui"], "display": med["drug"], "strength_mg": entry["dose_mg"], "tablets": 1,
                "per_day": entry["per_day"], "dose_unit": "mg", "ingredient_only": True}

    def _plan_treatments(self) -> None:
        statins = codes()["statins"]["products"]

        def statin_product(intensity: str, when: float) -> dict:
            options = [p for p in statins if p["intensity"] == intensity]
            pgx_known = self.tested and self.test_t <= when and self.slco1b1_phenotype != "normal_function"
            if pgx_known:
                options = [p for p in options if p["ingredient"] != "simvastatin"] or options
            return options[int(self.rng.integers(0, len(options)))]

        ascvd = [t for t in (self.mi_t, self.stroke_t, self.chd_t, self.tia_t, self.pad_t) if t is not None]
        high = bool(self.fh_gene) or self.ldl0 >= 190 or bool(ascvd)
        age0 = self.age + self.t0
        moderate = (self.diabetes and 40 <= age0 <= 75) or self.ldl0 >= 160 or (self.ldl0 >= 130 and self._chance(0.35))
        on_statin = self._chance(0.9) if high else (self._chance(0.75) if moderate else False)
        if on_statin:
            if high:
                intensity = "high" if self._chance(0.8) else "moderate"
            else:
                intensity = "moderate" if self._chance(0.75) else "low"
            if ascvd:
                start = min(ascvd) + 0.02
            elif self.fh_dx_t is not None:
                start = self.fh_dx_t + 0.05
            elif self.diabetes and self.dm_onset is not None and self._chance(0.5):
                start = self.dm_onset + self._u(0.0, 1.0)
            elif self._chance(0.7):
                start = self._u(self.t0 + 0.6, -0.4)
            else:
                start = self.t0 - self._u(0.2, 4.0)
            start = min(start, -0.3)
            reason = "fh" if self.fh_dx_t is not None else ("hyperlipidemia" if not ascvd else None)
            product = statin_product(intensity, start)
            first = self._add_med("statin", start, None, reason, product=product)
            mi_t = self.mi_t
            if mi_t is not None and mi_t > start + 0.1 and intensity != "high":
                first["end"] = mi_t
                self._add_med("statin", mi_t + 0.01, None, None, product=statin_product("high", mi_t))
            elif intensity != "high" and self._chance(0.2):
                switch = start + self._u(1.0, 3.0)
                if switch < -0.3:
                    first["end"] = switch
                    self._add_med("statin", switch, None, reason, product=statin_product("high", switch))
            elif self._chance(0.08):
                stop = start + self._u(0.5, 3.0)
                if stop < -0.3:
                    first["end"] = stop

        if self.htn and self.htn_onset is not None and self._chance(0.85):
            start = self.htn_onset + self._u(0.05, 0.5)
            if start < -0.1:
                first_drug = self._pick(["lisinopril", "losartan", "amlodipine", "hydrochlorothiazide"])
                first = self._add_med(first_drug, start, None, "htn", effect=float(np.clip(self._n(9, 3), 3, 16)))
                if first_drug == "lisinopril" and self._chance(0.15):
                    switch = start + self._u(0.2, 1.5)
                    if switch < -0.1:
                        first["end"] = switch
                        self._add_med("losartan", switch, None, "htn", effect=first["effect"])
                if self._chance(0.4):
                    add = start + self._u(1.0, 3.0)
                    others = [d for d in ("amlodipine", "chlorthalidone", "losartan") if d != first_drug]
                    if add < -0.2:
                        self._add_med(self._pick(others), add, None, "htn", effect=float(np.clip(self._n(7, 3), 2, 14)))

        if self.diabetes and self.dm_onset is not None and self._chance(0.9) and not self.t1d:
            self._add_med("metformin", self.dm_onset + self._u(0.0, 0.25), None, "t2d")
        if self.insulin and self.dm_onset is not None:
            if self.t1d:
                start = max(self.dm_onset, self.t0 - 3.0) + self._vu(0.0, 0.3)
            elif self.dm_coded_by == "insulin-only":
                start = max(self.dm_onset, self.t0) + self._vu(0.0, 0.5)
            else:
                start = self.dm_onset + self._vu(1.0, 5.0)
            start = min(start, -0.15)
            self._add_med("insulin", start, None, "t1d" if self.t1d else "t2d")
        if self.mi_t is not None:
            self._add_med("clopidogrel", self.mi_t + 0.01, self.mi_t + 1.0, "mi")
        if self.stroke_t is not None:
            self._add_med("clopidogrel", self.stroke_t + 0.02, None, "stroke")

    def _plan_sglt2(self, ckd_onset: float | None) -> None:
        start = None
        reason = None
        if self.hf_t is not None:
            start, reason = self.hf_t + 0.1, "hf"
        elif self.diabetes and ckd_onset is not None:
            start, reason = max(ckd_onset, self.dm_onset or ckd_onset) + 0.1, "t2d"
        elif self.diabetes and self.dm_onset is not None and self._chance(0.3):
            start, reason = self.dm_onset + self._u(1.0, 3.0), "t2d"
        if start is not None and start < -0.1:
            drug = "dapagliflozin" if reason == "hf" else self._pick(["empagliflozin", "dapagliflozin"])
            self._add_med(drug, start, None, reason)

    # -- trajectories (truth) -------------------------------------------------------------------------

    def _active(self, t: float, predicate) -> list[dict]:
        return [m for m in self.meds if predicate(m) and m["start"] <= t and (m["end"] is None or t < m["end"])]

    def _sglt2_start(self) -> float | None:
        starts = [m["start"] for m in self.meds if m["drug"] in ("empagliflozin", "dapagliflozin")]
        return min(starts) if starts else None

    def egfr(self, t: float) -> float:
        ts = self._sglt2_start()
        if ts is None or t <= ts:
            value = self.egfr0 + self.egfr_slope * (t - self.t0)
        else:
            value = self.egfr0 + self.egfr_slope * (ts - self.t0) + 0.6 * self.egfr_slope * (t - ts)
        if self.dialysis_t is not None:
            return 8.0 if t >= self.dialysis_t else max(15.0, value)
        return max(16.0, value)

    def statin_reduction(self, t: float) -> float:
        table = codes()["statins"]["ldl_reduction"]
        active = self._active(t, lambda m: m["drug"] == "statin")
        if not active:
            return 0.0
        return min(0.75, table[active[-1]["product"]["intensity"]] * self.statin_response)

    def ldl(self, t: float) -> float:
        return (self.ldl0 + 0.5 * (t - self.t0)) * (1.0 - self.statin_reduction(t))

    def sbp(self, t: float) -> float:
        anchor = self.htn_onset if self.htn_onset is not None else self.t0
        untreated = self.sbp_level + (0.6 if self.htn else 0.4) * (t - anchor)
        drop = sum(m["effect"] for m in self._active(t, lambda m: "effect" in m))
        return untreated - drop

    def hba1c(self, t: float) -> float:
        if self.dm_onset is None:
            return self.a1c0 + 0.02 * (t - self.t0)
        if t < self.dm_onset:
            ramp = max(0.0, 1.0 - (self.dm_onset - t) / 2.0)
            return 5.8 + (self.a1c_dm - 5.8) * ramp
        value = self.a1c_dm + 0.05 * (t - self.dm_onset)
        if self._active(t, lambda m: m["drug"] == "metformin"):
            value -= 1.0
        if self._active(t, lambda m: m["drug"] in ("empagliflozin", "dapagliflozin")):
            value -= 0.6
        if self._active(t, lambda m: m["drug"] == "insulin"):
            value -= 0.8
        return max(5.7, value)

    def smoking_at(self, t: float) -> str:
        if self.smoking0 == "current" and self.quit_t is not None and t >= self.quit_t:
            return "former"
        return self.smoking0

    def _ckd_crossings(self) -> dict[str, float]:
        """First time the true eGFR falls below each CKD stage threshold (before the reference date)."""
        crossings: dict[str, float] = {}
        grid = np.arange(self.t0, -0.25, 1.0 / 12.0)
        for stage, threshold in (("ckd3a", 60.0), ("ckd3b", 45.0), ("ckd4", 30.0)):
            for t in grid:
                if self.egfr(float(t)) < threshold:
                    crossings[stage] = float(t)
                    break
        return crossings

    # -- conditions ----------------------------------------------------------------------------------

    def _coded(self, cond: dict, variant: dict | None = None) -> dict:
        """Choose how the record codes ``cond`` (variant, category, whether clinicalStatus is sent)."""
        variant = variant or self._variant(cond["kind"])
        cond["variant"] = variant
        if variant.get("form") == "history":
            cond["abatement"], cond["clinical"] = None, "active"
        if variant.get("form") == "acute":
            cond["category"] = self._vpick(["encounter-diagnosis", "problem-list-item"], [0.6, 0.4])
        else:
            cond["category"] = self._vpick(["problem-list-item", "encounter-diagnosis", "health-concern"],
                                           [0.7, 0.25, 0.05])
            if cond["category"] == "health-concern" and self.k <= FIXTURE_PATIENTS:
                # the conformance fixtures are validated against R4 core alone, where US Core's code system
                # does not resolve
                cond["category"] = "problem-list-item"
        cond["drop_clinical_status"] = cond["category"] == "encounter-diagnosis" and self._vchance(
            RATE_NO_CLINICAL_STATUS)
        return cond

    def _plan_conditions(self) -> None:
        def add(kind: str, onset: float, abatement: float | None = None, clinical: str = "active",
                variant: dict | None = None) -> dict:
            cond = {"kind": kind, "onset": onset, "abatement": abatement, "clinical": clinical,
                    "verification": "confirmed"}
            self.conditions.append(self._coded(cond, variant))
            return cond

        acute = 28 / _YEAR_DAYS
        if self.dm_onset is not None and self.dm_onset < -0.05:
            if self.dm_coded_by == "diagnosis":
                add("t1d" if self.t1d else "t2d", self.dm_onset)
            if self.dm_complication:
                onset = self.dm_onset if self.dm_coded_by == "complication-only" else self.dm_onset + self._vu(1, 5)
                if onset < -0.1:
                    add("t1d_complication" if self.t1d else "t2d_complication", onset)
        if self.htn_onset is not None and self.htn_onset < -0.05:
            add("htn", self.htn_onset)
        if self.mi_t is not None:
            add("mi", self.mi_t, self.mi_t + acute, "resolved")
        if self.chd_t is not None:
            add("chd", self.chd_t)
        if self.revasc is not None:
            if self.revasc["as"] == "procedure":
                kind = self.revasc["kind"]
                if kind == "pci" and self._vchance(0.5):
                    kind = "pci_stent"
                self.procedures.append({"kind": kind, "t": self.revasc["t"]})
            else:
                options = [v for v in codes()["condition_variants"]["revasc_history"]
                           if v["procedure"] == self.revasc["kind"]]
                add("revasc_history", self.revasc["t"] + 0.05, variant=self._vpick(options, [v["w"] for v in options]))
        if self.stroke_t is not None:
            add("stroke", self.stroke_t, self.stroke_t + acute, "resolved")
        if self.tia_t is not None:
            add("tia", self.tia_t, self.tia_t + acute, "resolved")
        if self.pad_t is not None:
            add("pad", self.pad_t)
        if self.hf_t is not None:
            add("hf", self.hf_t)
        if self.transplant_t is not None:
            if self.kidney_arm_as == "procedure":
                self.procedures.append({"kind": "kidney_transplant", "t": self.transplant_t})
            else:
                add("transplant_status", self.transplant_t + 0.02)
        if self.fh_dx_t is not None:
            add("fh", self.fh_dx_t)
        elif self.meds and any(m["drug"] == "statin" and m["reason"] == "hyperlipidemia" for m in self.meds):
            first = min(m["start"] for m in self.meds if m["drug"] == "statin")
            add("hyperlipidemia", first - 0.01)

        crossings = self._ckd_crossings()
        self._plan_sglt2(crossings.get("ckd3a"))
        crossings = self._ckd_crossings()  # the SGLT2 inhibitor slows later stages
        previous = None
        for stage in ("ckd3a", "ckd3b", "ckd4"):
            if stage not in crossings:
                break
            t = crossings[stage]
            onset = t - self._u(0.2, 2.0) if t <= self.t0 else t + 0.25
            if onset >= -0.05 or (self.dialysis_t is not None and onset >= self.dialysis_t - 0.05):
                break
            if previous is not None:
                previous["abatement"] = max(onset, previous["onset"] + 0.01)
                previous["clinical"] = "resolved"
                previous["drop_clinical_status"] = False
            previous = add(stage, onset)
        if self.dialysis_t is not None:
            if previous is not None:
                previous["abatement"] = max(self.dialysis_t, previous["onset"] + 0.01)
                previous["clinical"] = "resolved"
                previous["drop_clinical_status"] = False
            add("esrd", self.dialysis_t)
            if self.kidney_arm_as == "dependence-finding":
                add("dialysis_dependence", self.dialysis_t)
            else:
                kind = "hemodialysis" if self._vchance(0.8) else "peritoneal_dialysis"
                when = max(self.dialysis_t, -1.0)
                while when < -0.02:
                    self.procedures.append({"kind": kind, "t": when})
                    when += 30.4 / _YEAR_DAYS
        for med in self.meds:
            if med["reason"] is not None and not any(c["kind"] == med["reason"] for c in self.conditions):
                med["reason"] = None

    # -- resources -----------------------------------------------------------------------------------

    def _patient_resource(self) -> dict:
        race = codes()["race"][self.race]
        race_ext: dict = {"url": RACE_EXTENSION_URL, "extension": []}
        if self.race != "other":
            omb = _coding("omb_race", race["code"], race["display"])
            race_ext["extension"].append({"url": "ombCategory", "valueCoding": omb})
        race_ext["extension"].append({"url": "text", "valueString": race["display"]})
        return {
            "resourceType": "Patient",
            "id": self.pid,
            "meta": {"security": [_coding("act_reason", "HTEST", "test health data")]},
            "extension": [race_ext],
            "identifier": [{"use": "usual", "system": _sys("mrn"), "value": f"SYN-{self.k:06d}"}],
            "active": True,
            "name": [{"use": "official", "family": f"Synthetic-{self.k:04d}", "given": ["Test"]}],
            "gender": "female" if self.female else "male",
            "birthDate": self.birth.isoformat(),
        }

    def _subject(self) -> dict:
        return {"reference": f"Patient/{self.pid}"}

    def _obs(self, key: str, t: float, hour: int, minute: int, **fields: Any) -> dict:
        entry = codes()["observations"][key]
        when = self._dt(t, hour, minute)
        resource = {
            "resourceType": "Observation",
            "status": "final",
            "category": _category(entry["category"]),
            "code": _obs_code(key),
            "subject": self._subject(),
            "effectiveDateTime": when,
            "issued": self._dt(t, min(hour + 3, 23), minute),
        }
        resource.update(fields)
        return resource

    def _qty_obs(self, key: str, t: float, hour: int, minute: int, value: float | int, *, lab: bool) -> _Item:
        entry = codes()["observations"][key]
        resource = self._obs(key, t, hour, minute, valueQuantity=_quantity(value, entry["unit"], entry["unit_text"]))
        return self._new_item("Observation", resource, resource["effectiveDateTime"], key, lab=lab)

    def _bp(self, t: float, hour: int, minute: int, sbp: float, dbp: float) -> _Item:
        sbp_c, dbp_c = codes()["observations"]["sbp"], codes()["observations"]["dbp"]
        components = [
            {"code": _obs_code("sbp"), "valueQuantity": _quantity(sbp, sbp_c["unit"], sbp_c["unit_text"])},
            {"code": _obs_code("dbp"), "valueQuantity": _quantity(dbp, dbp_c["unit"], dbp_c["unit_text"])},
        ]
        resource = self._obs("bp_panel", t, hour, minute, component=components)
        return self._new_item("Observation", resource, resource["effectiveDateTime"], "bp_panel")

    def _smoking_obs(self, t: float, hour: int, minute: int) -> None:
        status = self.smoking_at(t)
        key = self.smoking_current_code if status == "current" else status
        answer = codes()["smoking_answers"][key]
        value = {"coding": [_coding("snomed", answer["code"], answer["display"])], "text": answer["display"]}
        resource = self._obs("smoking", t, hour, minute, valueCodeableConcept=value)
        self._new_item("Observation", resource, resource["effectiveDateTime"], "smoking")

    def _activity_obs(self, t: float, hour: int, minute: int) -> None:
        days = int(np.clip(self.activity_days + int(self.rng.integers(-1, 2)), 0, 7))
        minutes = self.activity_minutes if days else 0
        d_c, m_c, w_c = (codes()["observations"][k] for k in ("evs_days", "evs_minutes", "aerobic_week"))
        components = [
            {"code": _obs_code("evs_days"), "valueQuantity": _quantity(days, d_c["unit"], d_c["unit_text"])},
            {"code": _obs_code("evs_minutes"), "valueQuantity": _quantity(minutes, m_c["unit"], m_c["unit_text"])},
        ]
        panel = self._obs("evs_panel", t, hour, minute, component=components)
        self._new_item("Observation", panel, panel["effectiveDateTime"], "evs_panel")
        weekly = self._obs("aerobic_week", t, hour, minute,
                           valueQuantity=_quantity(days * minutes, w_c["unit"], w_c["unit_text"]))
        self._new_item("Observation", weekly, weekly["effectiveDateTime"], "aerobic_week")

    def _pm25_obs(self, t: float) -> None:
        entry = codes()["fhirtwin_codes"]["pm25"]
        value = _round(max(2.0, self.pm25 - 0.12 * (t - self.t0) + self._n(0, 0.5)), 1)
        end = self._date(t)
        resource = {
            "resourceType": "Observation",
            "status": "final",
            "category": _category("social-history"),
            "code": {"coding": [_coding("fhirtwin", entry["code"], entry["display"])], "text": entry["display"]},
            "subject": self._subject(),
            "effectivePeriod": {"start": (end - timedelta(days=365)).isoformat(), "end": end.isoformat()},
            "issued": self._dt(t, 12, 0),
            "valueQuantity": _quantity(value, entry["unit"], entry["unit_text"]),
            "method": {"text": "Residential annual mean estimated from a gridded ambient air-quality surface"},
        }
        self._new_item("Observation", resource, self._dt(t, 0, 0), "pm25")

    def _lipids(self, t: float, hour: int, minute: int) -> None:
        si = self.lipid_units == "mmol/L" or (self.lipid_units == "mixed" and self._chance(0.5))
        ldl = max(15.0, self.ldl(t) * (1 + self._n(0, 0.06)))
        hdl = max(15.0, (self.hdl0 + 0.2 * (t - self.t0)) * (1 + self._n(0, 0.06)))
        tg_true = self.tg0 * (1 - 0.25 * self.statin_reduction(t)) * (1.15 if self.hba1c(t) > 7.5 else 1.0)
        tg = max(30.0, tg_true * math.exp(self._n(0, 0.15)))
        direct = self.ldl_direct or tg > 400
        tc = ldl + hdl + tg / 5.0
        if si:
            values = [
                ("tc_molar", _round(tc / MG_DL_PER_MMOL_L_CHOLESTEROL, 2)),
                ("hdl_molar", _round(hdl / MG_DL_PER_MMOL_L_CHOLESTEROL, 2)),
                ("ldl_molar", _round(ldl / MG_DL_PER_MMOL_L_CHOLESTEROL, 2)),
                ("tg_molar", _round(tg / MG_DL_PER_MMOL_L_TRIGLYCERIDE, 2)),
            ]
        else:
            values = [("tc", _round(tc, 0)), ("hdl", _round(hdl, 0)),
                      ("ldl_direct" if direct else "ldl_calc", _round(ldl, 0)), ("tg", _round(tg, 0))]
        for key, value in values:
            self._qty_obs(key, t, hour, minute, value, lab=True)

    def _kidney(self, t: float, hour: int, minute: int, uacr: bool) -> None:
        age = self.age + t
        scr = creatinine_for_egfr(self.egfr(t), age, self.female) * (1 + self._n(0, CREATININE_TOTAL_CV))
        if self.creatinine_si:
            reported = _round(scr * UMOL_L_PER_MG_DL_CREATININE, 0)
            self._qty_obs("creatinine_molar", t, hour, minute, reported, lab=True)
            scr_reported = reported / UMOL_L_PER_MG_DL_CREATININE
        else:
            scr_reported = _round(scr, 2)
            self._qty_obs("creatinine", t, hour, minute, scr_reported, lab=True)
        if self.egfr_report != "none" and self._vchance(0.9):
            # The lab's eGFR from the reported creatinine (CKD-EPI 2021); a few labs send it in mL/min, i.e.
            # multiplied by the DuBois body-surface area / 1.73 m2 (eGFR-absolute).
            egfr = _ckd_epi_2021(float(scr_reported), age, self.female)
            if self.egfr_report == "mL/min":
                h_m = self.height / 100.0
                weight = (self.bmi0 + self.bmi_drift * (t - self.t0)) * h_m * h_m
                egfr *= 0.007184 * weight**0.425 * self.height**0.725 / 1.73
            self.egfr_reports.append((t, hour, minute, _round(egfr, 0)))
        ras = bool(self._active(t, lambda m: m["drug"] in ("lisinopril", "losartan")))
        k = self._n(4.25, 0.3) + (0.25 if self.egfr(t) < 45 else 0) + (0.15 if ras else 0)
        self._qty_obs("potassium", t, hour, minute, _round(float(np.clip(k, 3.1, 6.0)), 1), lab=True)
        if uacr:
            log_u = self.uacr_log0 + 0.08 * (t - self.t0) + (0.8 if self.egfr(t) < 60 else 0)
            log_u -= 0.35 if ras else 0
            sglt2_start = self._sglt2_start()
            log_u -= 0.3 if sglt2_start is not None and t >= sglt2_start else 0
            value = float(np.clip(math.exp(log_u + self._n(0, 0.45)), 2.0, 3000.0))
            self._qty_obs("uacr", t, hour, minute, _round(value, 1), lab=True)

    def _glycaemia(self, t: float, hour: int, minute: int, a1c: bool) -> None:
        truth = self.hba1c(t)
        if a1c:
            measured = float(np.clip(truth + self._n(0, 0.15), 4.2, 14.0))
            self._qty_obs("hba1c", t, hour, minute, _round(measured, 1), lab=True)
        glucose = 28.7 * truth - 46.7 + self._n(0, 14)  # ADAG estimated average glucose, random draw
        self._qty_obs("glucose", t, hour, minute, _round(float(np.clip(glucose, 60, 420)), 0), lab=True)

    def _visits(self) -> None:
        t = self.t0
        last = {"lipid": -99.0, "a1c": -99.0, "bmp": -99.0, "uacr": -99.0, "pm": -99.0}
        first = True
        while t < -0.03:
            hour, minute = int(self.rng.integers(9, 17)), int(self.rng.integers(0, 60))
            lab_minute = int(self.rng.integers(0, 60))
            sbp = _round(float(np.clip(self.sbp(t) + self._n(0, SBP_VISIT_SD_MM_HG), 85, 230)), 0)
            dbp = _round(float(np.clip(0.45 * sbp + 22 + self._n(0, 5), 45, 130)), 0)
            self._bp(t, hour, minute, sbp, dbp)
            bmi_true = self.bmi0 + self.bmi_drift * (t - self.t0)
            h_m = self.height / 100.0
            weight = max(40.0, bmi_true * h_m * h_m * (1 + self._n(0, WEIGHT_CV)))
            self._qty_obs("weight", t, hour, minute, _round(weight, 1), lab=False)
            self._qty_obs("bmi", t, hour, minute, _round(weight / (h_m * h_m), 1), lab=False)
            if first or self._chance(0.2):
                self._qty_obs("height", t, hour, minute, _round(self.height + self._n(0, 0.4), 1), lab=False)
            if t - last["lipid"] >= 0.8:
                self._lipids(t, 8, lab_minute)
                last["lipid"] = t
            diabetic_now = self.dm_onset is not None and t >= self.dm_onset
            a1c_due = t - last["a1c"] >= (0.4 if diabetic_now else 1.5)
            ckd_now = self.egfr(t) < 60
            bmp_due = t - last["bmp"] >= (0.4 if ckd_now else 0.8)
            if a1c_due or bmp_due:
                self._glycaemia(t, 8, lab_minute, a1c_due)
                if a1c_due:
                    last["a1c"] = t
            if bmp_due:
                uacr_due = (diabetic_now or ckd_now or self.htn) and t - last["uacr"] >= 0.9
                self._kidney(t, 8, lab_minute, uacr_due or self._chance(0.1))
                last["bmp"] = t
                if uacr_due:
                    last["uacr"] = t
            if first or self._chance(0.5):
                self._smoking_obs(t, hour, minute)
            if first or self._chance(0.4):
                self._activity_obs(t, hour, minute)
            if t - last["pm"] >= 2.0:
                self._pm25_obs(t)
                last["pm"] = t
            first = False
            t += self._u(0.35, 1.1)

    def _genomics(self) -> None:
        cfg = codes()["genomics"]
        t = self.test_t
        hour, minute = 11, int(self.rng.integers(0, 60))
        results: list[_Item] = []

        def genomic_obs(profile: str | None, code: dict, **fields: Any) -> dict:
            resource = {
                "resourceType": "Observation",
                "status": "final",
                "category": _genomic_category(),
                "code": code,
                "subject": self._subject(),
                "effectiveDateTime": self._dt(t, hour, minute),
                "issued": self._dt(t + 14 / _YEAR_DAYS, hour, minute),
            }
            if profile is not None:
                resource["meta"] = {"profile": [cfg["profiles"][profile]]}
            resource.update(fields)
            return resource

        def variant(gene: str, c_hgvs: str, p_hgvs: str, rsid: str | None, state: str | None) -> _Item:
            components = [
                _gene_component(gene),
                {"code": _component_code("coding_hgvs"), "valueCodeableConcept": {"coding": [_coding("hgvs", c_hgvs)]}},
                {"code": _component_code("protein_hgvs"),
                 "valueCodeableConcept": {"coding": [_coding("hgvs", p_hgvs)]}},
                {"code": _component_code("source_class"), "valueCodeableConcept": _answer("germline")},
                {"code": _component_code("assembly"), "valueCodeableConcept": _answer("grch38")},
            ]
            if state is not None:
                components.append({"code": _component_code("allelic_state"), "valueCodeableConcept": _answer(state)})
            if rsid:
                components.append({"code": _component_code("variation_code"),
                                   "valueCodeableConcept": {"coding": [_coding("dbsnp", rsid)]}})
            resource = genomic_obs("variant", _obs_code("variant"),
                                   valueCodeableConcept=_answer("present" if state else "absent"),
                                   method=_answer("sequencing"), component=components)
            item = self._new_item("Observation", resource, resource["effectiveDateTime"], f"variant-{gene}")
            results.append(item)
            return item

        if self.fh_gene:
            v = cfg["fh_variants"][self.fh_gene]
            fh_variant = variant(self.fh_gene, v["c_hgvs"], v["p_hgvs"], v.get("rsid"), "heterozygous")
            fh = codes()["conditions"]["fh"]
            implication = genomic_obs(
                "diagnostic_implication",
                _component_code("diagnostic_implication"),
                derivedFrom=[self._ref(fh_variant)],
                component=[
                    _gene_component(self.fh_gene),
                    {"code": _component_code("clinical_significance"), "valueCodeableConcept": _answer("pathogenic")},
                    {"code": _component_code("predicted_phenotype"),
                     "valueCodeableConcept": {"coding": [_coding("snomed", fh["snomed"], fh["snomed_display"])]}},
                ],
            )
            when = implication["effectiveDateTime"]
            results.append(self._new_item("Observation", implication, when, "fh-implication"))

        for allele in ("G1", "G2"):
            v = cfg["apol1_alleles"][allele]
            copies = self.apol1.count(allele)
            state = {0: None, 1: "heterozygous", 2: "homozygous"}[copies]
            variant("APOL1", v["c_hgvs"], v["p_hgvs"], v["rsid"], state)

        for gene, diplotype, phenotype, drug in (
            ("CYP2C19", self.cyp2c19, self.cyp2c19_phenotype, "clopidogrel"),
            ("SLCO1B1", self.slco1b1, self.slco1b1_phenotype, "simvastatin"),
        ):
            label = f"{gene} {diplotype}"
            genotype = genomic_obs(
                "genotype", _obs_code("genotype"),
                valueCodeableConcept={"coding": [_coding("pharmvar", label, label)], "text": label},
                component=[_gene_component(gene)],
            )
            genotype_item = self._new_item("Observation", genotype, genotype["effectiveDateTime"], f"genotype-{gene}")
            results.append(genotype_item)
            med = codes()["medications"][drug]
            implication = genomic_obs(
                "therapeutic_implication",
                _component_code("therapeutic_implication"),
                derivedFrom=[self._ref(genotype_item)],
                component=[
                    _gene_component(gene),
                    {"code": _component_code("therapeutic_implication"), "valueCodeableConcept": _answer(phenotype)},
                    {"code": _component_code("medication_assessed"),
                     "valueCodeableConcept": {"coding": [_coding("rxnorm", med["rxcui"], drug)]}},
                ],
            )
            results.append(self._new_item("Observation", implication, implication["effectiveDateTime"], f"pgx-{gene}"))

        fhirtwin = codes()["fhirtwin_codes"]
        prs_entry = codes()["observations"]["prs"]
        prs = genomic_obs(
            None,  # the Genomics IG has no PRS profile
            _obs_code("prs"),
            valueQuantity=_quantity(self.prs_z, prs_entry["unit"], prs_entry["unit_text"]),
            method={"coding": [_coding("fhirtwin", fhirtwin["prs_method"]["code"], fhirtwin["prs_method"]["display"])],
                    "text": "CAD polygenic score, standardised to the reference population (z)"},
            component=[
                {"code": {"coding": [_coding("loinc", "81259-4", "Associated phenotype")]},
                 "valueCodeableConcept": {"coding": [_coding("snomed", "53741008", "Coronary arteriosclerosis")]}},
                {"code": {"coding": [_coding("fhirtwin", fhirtwin["prs_percentile"]["code"],
                                             fhirtwin["prs_percentile"]["display"])]},
                 "valueQuantity": _quantity(self.prs_percentile, "%", "%")},
                {"code": {"coding": [_coding("fhirtwin", fhirtwin["prs_ancestry"]["code"],
                                             fhirtwin["prs_ancestry"]["display"])]},
                 "valueCodeableConcept": {"text": "European ancestry (UK Biobank)"}},
            ],
        )
        results.append(self._new_item("Observation", prs, prs["effectiveDateTime"], "prs"))

        report = {
            "resourceType": "DiagnosticReport",
            "meta": {"profile": [cfg["profiles"]["genomics_report"]]},
            "status": "final",
            "category": [{"coding": [_coding("v2_0074", "GE", "Genetics")]}],
            "code": _obs_code("genomic_report"),
            "subject": self._subject(),
            "effectiveDateTime": self._dt(t, hour, minute),
            "issued": self._dt(t + 14 / _YEAR_DAYS, hour, minute),
            "result": [self._ref(item) for item in results],
        }
        when = str(report["effectiveDateTime"])
        results.append(self._new_item("DiagnosticReport", report, when + "~", "genomic-report"))
        for item in results:
            item.genomic = True

    def _condition_resource(self, cond: dict) -> dict:
        variant = cond["variant"]
        codings = [_term(key) for key in variant["codes"]]
        recorded = max(cond["onset"], self.t0)
        if cond["category"] == "health-concern":
            category = _coding("us_core_cond_category", "health-concern", "Health Concern")
        else:
            shown = "Problem List Item" if cond["category"] == "problem-list-item" else "Encounter Diagnosis"
            category = _coding("cond_category", cond["category"], shown)
        resource = {
            "resourceType": "Condition",
            "verificationStatus": {"coding": [_coding("cond_ver", cond["verification"])]},
            "category": [{"coding": [category]}],
            "code": {"coding": codings, "text": codings[0]["display"]},
            "subject": self._subject(),
            "onsetDateTime": self._date(cond["onset"]).isoformat(),
            "recordedDate": self._date(recorded).isoformat(),
        }
        if cond["clinical"] is not None and not (cond["drop_clinical_status"] and cond["abatement"] is None):
            resource["clinicalStatus"] = {"coding": [_coding("cond_clinical", cond["clinical"])]}
        if cond["abatement"] is not None:
            resource["abatementDateTime"] = self._date(cond["abatement"]).isoformat()
        return resource

    def _procedure_resource(self, proc: dict) -> dict:
        codings = [_term(key) for key in codes()["procedures"][proc["kind"]]["codes"]]
        return {
            "resourceType": "Procedure",
            "status": "completed",
            "code": {"coding": codings, "text": codings[0]["display"]},
            "subject": self._subject(),
            "performedDateTime": self._dt(proc["t"], 9, 30),
        }

    def _med_concept(self, med: dict) -> dict:
        pres = med["presentation"]
        return {"coding": [_coding("rxnorm", pres["rxcui"], pres["display"])], "text": pres["display"]}

    def _medication(self, med: dict, mid: str) -> dict:
        """A Medication resource for a product (code, and for tablets the ingredient with its strength)."""
        pres = med["presentation"]
        resource: dict = {"resourceType": "Medication", "id": mid, "code": self._med_concept(med)}
        if "strength_mg" in pres and not pres.get("ingredient_only"):
            if med["drug"] == "statin":
                ing_code, ing_name = med["product"]["ingredient_rxcui"], med["product"]["ingredient"]
            else:
                ing_code, ing_name = codes()["medications"][med["drug"]]["rxcui"], med["drug"]
            resource["ingredient"] = [{
                "itemCodeableConcept": {"coding": [_coding("rxnorm", ing_code, ing_name)]},
                "strength": {"numerator": _quantity(pres["strength_mg"], "mg", "mg"),
                             "denominator": _quantity(1, "{tbl}", "tablet")},
            }]
        return resource

    def _dosage(self, med: dict) -> dict:
        pres = med["presentation"]
        per_day = pres.get("per_day", 1)
        times = {1: "once daily", 2: "twice daily", 3: "three times daily"}[per_day]
        name = med["product"]["ingredient"] if med["drug"] == "statin" else med["drug"]
        if pres["dose_unit"] == "[iU]":
            dose, text = _quantity(pres["units"], "[iU]", "units"), f"{pres['display']} {pres['units']} units {times}"
            if per_day > 1:
                text += " with meals"
        elif pres["dose_unit"] == "{tbl}":
            dose = _quantity(pres["tablets"], "{tbl}", "tablet")
            tabs = "1 tablet" if pres["tablets"] == 1 else f"{pres['tablets']} tablets"
            text = f"{pres['display']}: take {tabs} by mouth {times}"
        else:
            dose = _quantity(pres["strength_mg"] * pres["tablets"], "mg", "mg")
            text = f"{name} {pres['strength_mg'] * pres['tablets']} mg by mouth {times}"
        return {
            "text": text,
            "timing": {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}},
            "doseAndRate": [{"doseQuantity": dose}],
        }

    def _med_resource(self, med: dict, condition_ids: dict[str, str]) -> dict:
        start = self._date(med["start"]).isoformat()
        validity = {"start": start}
        if med["end"] is not None:
            validity["end"] = self._date(med["end"]).isoformat()
        resource: dict = {
            "resourceType": "MedicationRequest",
            "status": "stopped" if med["end"] is not None else "active",
            "intent": "order",
        }
        if med["form"] == "reference":
            resource["medicationReference"] = {"reference": f"Medication/{med['medication_id']}",
                                               "display": med["presentation"]["display"]}
        elif med["form"] == "contained":
            resource["contained"] = [self._medication(med, "med")]
            resource["medicationReference"] = {"reference": "#med"}
        else:
            resource["medicationCodeableConcept"] = self._med_concept(med)
        resource.update({
            "subject": self._subject(),
            "authoredOn": start,
            "dosageInstruction": [self._dosage(med)],
            "dispenseRequest": {"validityPeriod": validity},
        })
        if med["reason"] in condition_ids:
            resource["reasonReference"] = [{"reference": f"Condition/{condition_ids[med['reason']]}"}]
        return resource

    def _dispenses(self, med: dict) -> list[dict]:
        """Pharmacy fills of 90 days' supply every 84 days from the order's start (or the history start) until it
        stops, so an active drug's supply covers the reference date."""
        out = []
        when = max(med["start"], self.t0)
        stop = med["end"] if med["end"] is not None else -0.01
        pres = med["presentation"]
        while when < stop:
            if pres["dose_unit"] == "[iU]":
                quantity = _quantity(30 if pres["per_day"] > 1 else 15, "mL", "mL")
            else:
                quantity = _quantity(90 * pres.get("per_day", 1) * pres.get("tablets", 1), "{tbl}", "tablet")
            resource = {
                "resourceType": "MedicationDispense",
                "status": "completed",
                "medicationCodeableConcept": self._med_concept(med),
                "subject": self._subject(),
                "quantity": quantity,
                "daysSupply": _quantity(90, "d", "days"),
                "whenPrepared": self._dt(when, 10, 0),
                "whenHandedOver": self._dt(when, 15, 0),
                "dosageInstruction": [self._dosage(med)],
            }
            if med["form"] == "request+dispense":
                resource["authorizingPrescription"] = [{"reference": f"MedicationRequest/{med['request_id']}"}]
            out.append(resource)
            when += 84 / _YEAR_DAYS  # refilled a week before the supply runs out
        return out

    # -- messy data ------------------------------------------------------------------------------------

    def _mark(self, item: _Item, kind: str) -> None:
        item.kinds.append(kind)
        item.clean = False

    def _copy(self, item: _Item) -> _Item:
        clone = self._new_item(item.rtype, copy.deepcopy(item.resource), item.when, item.analyte, lab=item.lab)
        clone.quantity = item.quantity
        return clone

    def _inject_messy(self) -> None:
        observations = [i for i in self.items if i.rtype == "Observation" and not i.genomic]
        if self._chance(RATE_IMPLAUSIBLE_PATIENT):
            for _ in range(1 + int(self._chance(0.3))):
                analyte = self._pick(["bp_panel", "ldl", "hba1c"])
                pool = [i for i in observations if i.clean and (
                    i.analyte == analyte if analyte != "ldl" else i.analyte in ("ldl_calc", "ldl_direct"))]
                if analyte == "hba1c" and not pool:
                    pool = [i for i in observations if i.clean and i.analyte == "bp_panel"]
                if not pool:
                    continue
                source = pool[int(self.rng.integers(0, len(pool)))]
                bad = self._copy(source)
                res = bad.resource
                if bad.analyte == "bp_panel":
                    res["component"][0]["valueQuantity"]["value"] = self._pick([20, 400])
                elif bad.analyte == "hba1c":
                    res["valueQuantity"]["value"] = 40
                else:
                    res["valueQuantity"]["value"] = 2000
                bad.when = res["effectiveDateTime"] + "~"
                self._mark(bad, "implausible")
                source.clean = False
        for item in list(observations):
            if item.clean and self._chance(RATE_DUPLICATE):
                self._mark(self._copy(item), "duplicate")
                item.clean = False
        for item in list(observations):
            if item.clean and item.quantity and self._chance(RATE_ENTERED_IN_ERROR):
                wrong = self._copy(item)
                quantity = wrong.resource["valueQuantity"]
                factor = self._pick([0.7, 0.8, 1.25, 1.4])
                quantity["value"] = _round(quantity["value"] * factor, 2) if isinstance(quantity["value"], float) \
                    else _round(quantity["value"] * factor, 0)
                wrong.resource["status"] = "entered-in-error"
                wrong.when = item.when + "~"
                self._mark(wrong, "entered-in-error")
                item.clean = False
        for item in observations:
            if item.clean and item.quantity and self._chance(RATE_MISSING_UNIT):
                item.resource["valueQuantity"] = {"value": item.resource["valueQuantity"]["value"]}
                self._mark(item, "missing-unit")
        for item in observations:
            if item.clean and item.lab and self._chance(RATE_PRELIMINARY):
                item.resource["status"] = "preliminary"
                self._mark(item, "preliminary")
        for item in self.items:
            if item.analyte in _MOLAR_LIPIDS:
                item.kinds.append("lipid-mmol-l")
            elif item.analyte == "creatinine_molar":
                item.kinds.append("creatinine-umol-l")

        present = {c["kind"] for c in self.conditions}
        if self._chance(RATE_CONDITION_REFUTED):
            options = [k for k in ("hf", "t2d", "ckd3a", "stroke") if k not in present]
            if options:
                cond = {"kind": self._pick(options), "onset": self._u(self.t0, -0.2), "abatement": None,
                        "clinical": "inactive", "verification": "refuted", "messy": "condition-refuted"}
                self.conditions.append(cond)
                cond.update(variant=self._variant(cond["kind"]), category="problem-list-item",
                            drop_clinical_status=False)
        if self._chance(RATE_CONDITION_ENTERED_IN_ERROR):
            options = [k for k in ("mi", "stroke", "hf", "t2d") if k not in present]
            if options:
                cond = {"kind": self._pick(options), "onset": self._u(self.t0, -0.2), "abatement": None,
                        "clinical": None, "verification": "entered-in-error", "messy": "condition-entered-in-error"}
                self.conditions.append(cond)
                cond.update(variant=self._variant(cond["kind"]), category="problem-list-item",
                            drop_clinical_status=False)

    # -- assembly ----------------------------------------------------------------------------------------

    def _egfr_items(self) -> None:
        """Reported eGFR results (after the messy-data injection: they are never messy themselves)."""
        entry = codes()["terms"]["loinc|98979-8"]
        unit, text = (("mL/min", "mL/min") if self.egfr_report == "mL/min"
                      else ("mL/min/{1.73_m2}", "mL/min/1.73m2"))
        for t, hour, minute, value in self.egfr_reports:
            resource = {
                "resourceType": "Observation",
                "status": "final",
                "category": _category("laboratory"),
                "code": {"coding": [_coding("loinc", "98979-8", entry["display"])], "text": "eGFR (CKD-EPI 2021)"},
                "subject": self._subject(),
                "effectiveDateTime": self._dt(t, hour, minute),
                "issued": self._dt(t, min(hour + 3, 23), minute),
                "valueQuantity": _quantity(value, unit, text),
            }
            self._new_item("Observation", resource, str(resource["effectiveDateTime"]), "egfr", lab=True)

    def _sparse_items(self) -> None:
        n = int(self.rng.integers(0, 3))
        for i in range(n):
            t = self._u(self.t0, -0.1)
            if i == 0:
                sbp = _round(self.sbp(t) + self._n(0, SBP_VISIT_SD_MM_HG), 0)
                self._bp(t, 10, 0, sbp, _round(0.45 * sbp + 22 + self._n(0, 5), 0))
            else:
                self._smoking_obs(t, 10, 5)

    def build(self) -> tuple[dict, dict]:
        self._draw_latents()
        if self.sparse:
            self._sparse_items()
            self.messy.append({"id": self.pid, "kind": "sparse-patient"})
        else:
            self._plan_treatments()
            self._plan_conditions()
            self._visits()
            if self.tested:
                self._genomics()
            self._inject_messy()
            self._egfr_items()

        conditions = sorted(self.conditions, key=lambda c: (c["onset"], c["kind"]))
        condition_ids: dict[str, str] = {}
        condition_entries = []
        for i, cond in enumerate(conditions, start=1):
            cid = f"{self.pid}-cond-{i:02d}"
            resource = {"id": cid, **self._condition_resource(cond)}
            condition_entries.append(resource)
            if cond.get("messy"):
                self.messy.append({"id": cid, "kind": cond["messy"]})
            elif cond["clinical"] == "active" or cond["kind"] not in condition_ids:
                condition_ids[cond["kind"]] = cid
            cond["id"] = cid
        meds = sorted(self.meds, key=lambda m: (m["start"], m["drug"]))
        med_entries = []
        medication_entries = []
        dispense_entries: list[dict[str, Any]] = []
        for i, med in enumerate(meds, start=1):
            if med["form"] == "reference":
                med["medication_id"] = f"{self.pid}-medication-{i:02d}"
                medication_entries.append(self._medication(med, med["medication_id"]))
            med["request_id"] = None
            if med["form"] != "dispense-only":
                med["request_id"] = f"{self.pid}-med-{i:02d}"
                med_entries.append({"id": med["request_id"], **self._med_resource(med, condition_ids)})
            med["dispense_ids"] = []
            if med["form"] in ("dispense-only", "request+dispense"):
                for dispense in self._dispenses(med):
                    did = f"{self.pid}-disp-{len(dispense_entries) + 1:03d}"
                    med["dispense_ids"].append(did)
                    dispense_entries.append({"id": did, **dispense})
            med["id"] = med["request_id"] or (med["dispense_ids"][0] if med["dispense_ids"] else None)
        meds = [m for m in meds if m["id"] is not None]
        procedures = sorted(self.procedures, key=lambda p: (p["t"], p["kind"]))
        procedure_entries = []
        for i, proc in enumerate(procedures, start=1):
            proc["id"] = f"{self.pid}-proc-{i:02d}"
            procedure_entries.append({"id": proc["id"], **self._procedure_resource(proc)})

        ordered = sorted(self.items, key=lambda i: (i.when, i.seq))
        ids: dict[int, str] = {}
        n_obs = n_report = 0
        for item in ordered:
            if item.rtype == "Observation":
                n_obs += 1
                ids[item.seq] = f"{self.pid}-obs-{n_obs:04d}"
            else:
                n_report += 1
                ids[item.seq] = f"{self.pid}-dr-{n_report:02d}"
        for item in ordered:
            for kind in item.kinds:
                self.messy.append({"id": ids[item.seq], "kind": kind})

        def resolve(node: Any) -> Any:
            if isinstance(node, dict):
                ref = node.get("reference")
                if isinstance(ref, str) and ref.startswith(_REF):
                    seq = int(ref[len(_REF):])
                    rtype = next(i.rtype for i in self.items if i.seq == seq)
                    return {"reference": f"{rtype}/{ids[seq]}"}
                return {k: resolve(v) for k, v in node.items()}
            if isinstance(node, list):
                return [resolve(v) for v in node]
            return node

        resources = [self._patient_resource(), *condition_entries, *procedure_entries, *medication_entries,
                     *med_entries, *dispense_entries]
        resources += [{"id": ids[item.seq], **resolve(item.resource)} for item in ordered]
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [_entry(r) for r in resources],
        }
        return bundle, self._truth(conditions, meds, procedures)

    def _med_truth(self, m: dict) -> dict:
        pres = m["presentation"]
        table = codes()["statin_intensity_table"]
        if m["drug"] == "statin":
            agent, klass = m["product"]["ingredient"], "statin"
            ingredient_rxcui = m["product"]["ingredient_rxcui"]
            daily = pres["daily_dose_mg"]
            intensity = table[agent][str(daily)]
        elif m["drug"] == "insulin":
            agent, klass = codes()["insulins"][self._insulin_key(pres)]["ingredient"], "insulin"
            ingredient_rxcui, daily, intensity = None, None, None
        else:
            entry = codes()["medications"][m["drug"]]
            agent, klass, ingredient_rxcui = m["drug"], entry["class"], entry["rxcui"]
            daily = pres["strength_mg"] * pres["tablets"] * pres["per_day"]
            intensity = None
        return {"agent": agent, "class": klass, "ingredient_rxcui": ingredient_rxcui, "daily_dose_mg": daily,
                "intensity": intensity}

    @staticmethod
    def _insulin_key(pres: dict) -> str:
        return next(k for k, v in codes()["insulins"].items() if not k.startswith("_") and v["rxcui"] == pres["rxcui"])

    def _record_truth(self, conditions: list[dict], meds: list[dict], procedures: list[dict]) -> dict:
        """Meaning-level truth of what the record says at the reference date (sparse records say nothing)."""
        kinds = {c["kind"]: c for c in conditions if not c.get("messy")}
        procs = {p["kind"] for p in procedures}
        chd_variant = kinds.get("chd", {}).get("variant", {})
        ascvd = {
            "prior_mi": "mi" in kinds,
            "coronary_heart_disease": "chd" in kinds,
            "angina": bool(chd_variant.get("angina")),
            "coronary_revascularisation": "revasc_history" in kinds or bool(procs & {"cabg", "pci", "pci_stent"}),
            "prior_stroke": "stroke" in kinds,
            "tia": "tia" in kinds,
            "peripheral_arterial_disease": "pad" in kinds,
        }
        ascvd["established"] = any(ascvd.values())
        heart_failure = "hf" in kinds
        dialysis = "dialysis_dependence" in kinds or bool(procs & {"hemodialysis", "peritoneal_dialysis"})
        transplant = "transplant_status" in kinds or "kidney_transplant" in procs
        stage_of = {"ckd3a": "3a", "ckd3b": "3b", "ckd4": "4", "esrd": "5"}
        active_stage = [c for c in conditions if c["kind"] in stage_of and not c.get("messy")
                        and c["clinical"] == "active"]
        ckd_stage = stage_of[active_stage[-1]["kind"]] if active_stage else None
        ckd_stage_recorded = active_stage[-1]["variant"]["stage"] if active_stage else None
        complications = {c["variant"]["complication"] for c in conditions if not c.get("messy")
                         and c["kind"] in ("t2d_complication", "t1d_complication")}
        active = [m for m in meds if m["end"] is None and m["start"] <= 0.0]
        statins = [m for m in active if m["drug"] == "statin"]
        statin = None
        if statins:
            s = self._med_truth(statins[-1])
            statin = {"agent": s["agent"], "daily_dose_mg": s["daily_dose_mg"], "intensity": s["intensity"]}
        diabetes_in_record = bool({"t1d", "t2d", "t1d_complication", "t2d_complication"} & set(kinds)) or any(
            m["drug"] == "insulin" for m in meds)
        if self.sparse:
            diabetes_in_record = False
        if transplant:
            scope = "scope-kidney-transplant"
        elif dialysis:
            scope = "scope-dialysis"
        elif heart_failure:
            scope = "scope-heart-failure"
        elif ascvd["established"]:
            scope = "scope-established-ascvd"
        elif not 30 <= self.age <= 79:
            scope = "scope-age"
        else:
            scope = "scope-primary-prevention"
        return {
            "ascvd": ascvd,
            "heart_failure": heart_failure,
            "diabetes_type": ("type1" if self.t1d else "type2") if diabetes_in_record else None,
            "diabetes_coded_by": self.dm_coded_by if diabetes_in_record else None,
            "diabetic_kidney_disease": "kidney" in complications,
            "diabetic_retinopathy": "retinopathy" in complications,
            "ckd_stage": ckd_stage,
            "ckd_stage_recorded": ckd_stage_recorded,
            "dialysis": dialysis,
            "kidney_transplant": transplant,
            "kidney_recorded_as": self.kidney_arm_as if (dialysis or transplant) else None,
            "statin": statin,
            "on_insulin": any(m["drug"] == "insulin" for m in active),
            "egfr_reported": self.egfr_report if self.egfr_reports else None,
            "pregnancy": False,
            "scope": scope,
        }

    def _truth(self, conditions: list[dict], meds: list[dict], procedures: list[dict]) -> dict:
        def d(t: float | None) -> str | None:
            return None if t is None else self._date(t).isoformat()

        statin_table = codes()["statins"]["ldl_reduction"]
        counts = Counter(item["kind"] for item in self.messy)
        truth: dict[str, Any] = {
            "patient_id": self.pid,
            "sex": "female" if self.female else "male",
            "birth_date": self.birth.isoformat(),
            "age": self.age,
            "race": self.race,
            "sparse": self.sparse,
            "history_start": d(self.t0),
            "history_years": self.years,
            "latent": {
                "ldl_baseline_mg_dl": round(self.ldl0, 1),
                "hdl_baseline_mg_dl": round(self.hdl0, 1),
                "tg_baseline_mg_dl": round(self.tg0, 1),
                "statin_response_factor": round(self.statin_response, 3),
                "statin_ldl_reduction_by_intensity": {k: round(v * self.statin_response, 3)
                                                      for k, v in statin_table.items() if not k.startswith("_")},
                "sbp_untreated_mm_hg": round(self.sbp_level, 1),
                "hba1c_nondiabetic_pct": round(self.a1c0, 2),
                "hba1c_untreated_diabetic_pct": round(self.a1c_dm, 2) if self.diabetes else None,
                "egfr_baseline_ml_min_1_73m2": round(self.egfr0, 1),
                "egfr_slope_ml_min_1_73m2_per_year": round(self.egfr_slope, 3),
                "egfr_slope_on_sglt2_factor": 0.6,
                "egfr_at_reference_ml_min_1_73m2": round(self.egfr(0.0), 1),
                "bmi_baseline_kg_m2": round(self.bmi0, 1),
                "height_cm": round(self.height, 1),
                "pm25_baseline_ug_m3": round(self.pm25, 2),
                "activity_days_per_week": self.activity_days,
                "activity_minutes_per_day": self.activity_minutes,
                "ckd_phenotype": self.ckd_phenotype,
            },
            "smoking": {
                "at_history_start": self.smoking0,
                "at_reference": self.smoking_at(0.0),
                "quit_date": d(self.quit_t),
            },
            "diabetes": self.diabetes,
            "hypertension": self.htn,
            "genotypes": {
                "tested": self.tested and not self.sparse,
                "test_date": d(self.test_t) if self.tested and not self.sparse else None,
                "fh_gene": self.fh_gene,
                "fh_variant": codes()["genomics"]["fh_variants"][self.fh_gene]["c_hgvs"] if self.fh_gene else None,
                "apol1": "/".join(self.apol1),
                "apol1_risk_alleles": self.apol1_risk,
                "apol1_high_risk": self.apol1_high_risk,
                "cyp2c19": self.cyp2c19,
                "cyp2c19_phenotype": self.cyp2c19_phenotype,
                "slco1b1": self.slco1b1,
                "slco1b1_phenotype": self.slco1b1_phenotype,
                "prs_cad_z": self.prs_z,
                "prs_cad_percentile": self.prs_percentile,
            },
            "conditions": [
                {"id": c["id"], "kind": c["kind"], "onset": d(c["onset"]), "abatement": d(c["abatement"]),
                 "clinical_status": c["clinical"], "verification_status": c["verification"],
                 "codes": list(c["variant"]["codes"]), "category": c["category"],
                 "clinical_status_sent": c["clinical"] is not None
                 and not (c["drop_clinical_status"] and c["abatement"] is None)}
                for c in conditions if not c.get("messy")
            ],
            "procedures": [
                {"id": p["id"], "kind": p["kind"], "date": d(p["t"]),
                 "codes": list(codes()["procedures"][p["kind"]]["codes"])}
                for p in procedures
            ],
            "medications": [
                {
                    "id": m["id"],
                    "drug": self._med_truth(m)["agent"],
                    "rxcui": m["presentation"]["rxcui"],
                    "ingredient_rxcui": self._med_truth(m)["ingredient_rxcui"],
                    "class": self._med_truth(m)["class"],
                    "intensity": self._med_truth(m)["intensity"],
                    "daily_dose_mg": self._med_truth(m)["daily_dose_mg"],
                    "form": m["form"],
                    "request_id": m["request_id"],
                    "medication_id": m.get("medication_id"),
                    "dispense_ids": m["dispense_ids"],
                    "sbp_effect_mm_hg": round(m["effect"], 1) if "effect" in m else None,
                    "start": d(m["start"]),
                    "end": d(m["end"]),
                    "status": "stopped" if m["end"] is not None else "active",
                }
                for m in meds
            ],
            **self._record_truth(conditions, meds, procedures),
            "units": {"lipids": self.lipid_units, "creatinine": "umol/L" if self.creatinine_si else "mg/dL"},
            "messy": sorted(self.messy, key=lambda m: (m["id"], m["kind"])),
            "messy_counts": {kind: counts[kind] for kind in MESSY_KINDS if counts[kind]},
        }
        return truth


def _entry(resource: dict) -> dict:
    url = f"{resource['resourceType']}/{resource['id']}"
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, url)}",
        "resource": resource,
        "request": {"method": "PUT", "url": url},
    }
