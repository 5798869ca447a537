"""The one bridge from TwinState to the simulation engine.

Why: the engine must be testable without FHIR and must never guess. ``inputs_from_state`` is the only
function in ``fhirtwin.sim`` that reads a TwinState; it collects the numbers the engine needs into a
plain frozen ``PatientInputs`` (units in the field names), keeps every source reference for
``RiskAssessment.basis``, and raises :class:`InsufficientData` naming what is missing. A default is used
only where a published or stated convention exists, and each one is recorded in ``defaults_used``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fhirtwin.twin import Evidence, TimePoint, TwinState

_YEAR_DAYS = 365.25
HISTORY_VARIABLES = (
    "ldl_cholesterol_mg_dl",
    "systolic_bp_mm_hg",
    "egfr_ml_min_1_73m2",
    "hba1c_percent",
    "bmi_kg_m2",
)


class InsufficientData(ValueError):
    """The twin lacks evidence the engine needs; ``missing`` lists the variables."""

    def __init__(self, patient_id: str, missing: list[str], detail: str = "") -> None:
        self.patient_id = patient_id
        self.missing = list(missing)
        extra = f" ({detail})" if detail else ""
        super().__init__(f"patient {patient_id}: cannot simulate without {', '.join(self.missing)}{extra}")


def _empty() -> np.ndarray:
    return np.zeros((0, 2))


@dataclass(frozen=True, eq=False)
class PatientInputs:
    """Everything the engine reads about one patient at ``as_of`` (times in years relative to it).

    Histories are arrays of shape (n, 2): column 0 = time in years (<= 0), column 1 = value. Treatment
    start times (years, <= 0) let calibration ignore measurements taken before the current regimen.
    Genomic fields are None when untested (no effect is applied, and the model card says so). The marker,
    behavioural and environmental fields after ``defaults_used`` (Lp(a), hsCRP, CAC, NT-proBNP, LVEF,
    activity, PM2.5, SDI decile) are None when not recorded; ``fhirtwin.sim.modifiers`` says which act.
    ``scales_read`` lists, per scale, the twin variables with a value at ``as_of``; ``variables_used`` those
    the engine read a value of (the rest were only recorded); ``sources_by_variable`` which resource versions
    each read value came from (so a value that is dropped drops its sources too).
    """

    patient_id: str
    sex: str
    age_years: float
    total_cholesterol_mg_dl: float
    hdl_cholesterol_mg_dl: float
    ldl_cholesterol_mg_dl: float
    systolic_bp_mm_hg: float
    egfr_ml_min_1_73m2: float
    bmi_kg_m2: float
    diabetes: bool
    current_smoker: bool
    on_bp_treatment: bool
    on_statin: bool
    hba1c_percent: float | None = None
    uacr_mg_g: float | None = None
    race: str | None = None
    hypertension: bool = False
    ckd: bool = False
    prior_ascvd: bool = False
    prior_stroke_or_tia: bool = False
    prior_mi_or_acs: bool = False
    weight_kg: float | None = None
    heart_failure: bool = False
    statin_intensity: str | None = None
    statin_agent: str | None = None
    statin_daily_dose_mg: float | None = None
    on_sglt2i: bool = False
    on_clopidogrel: bool = False
    fh_variant: bool | None = None
    apol1_risk_alleles: int | None = None
    slco1b1_phenotype: str | None = None
    cyp2c19_phenotype: str | None = None
    cad_prs_z: float | None = None
    statin_start_years: float | None = None
    bp_treatment_start_years: float | None = None
    sglt2i_start_years: float | None = None
    history_ldl_cholesterol_mg_dl: np.ndarray = field(default_factory=_empty)
    history_systolic_bp_mm_hg: np.ndarray = field(default_factory=_empty)
    history_egfr_ml_min_1_73m2: np.ndarray = field(default_factory=_empty)
    history_hba1c_percent: np.ndarray = field(default_factory=_empty)
    history_bmi_kg_m2: np.ndarray = field(default_factory=_empty)
    sources: tuple[str, ...] = ()
    defaults_used: tuple[str, ...] = ()
    scales_read: tuple[tuple[str, tuple[str, ...]], ...] = ()
    variables_used: tuple[str, ...] = ()
    sources_by_variable: tuple[tuple[str, tuple[str, ...]], ...] = ()
    lpa_nmol_l: float | None = None
    lpa_mg_dl: float | None = None
    hscrp_mg_l: float | None = None
    cac_agatston: float | None = None
    nt_probnp_pg_ml: float | None = None
    lvef_percent: float | None = None
    exercise_min_per_week: float | None = None
    steps_per_day: float | None = None
    pm25_ug_m3: float | None = None
    sdi_decile: int | None = None

    def __post_init__(self) -> None:
        if self.sex not in ("female", "male"):
            raise ValueError(f"sex must be 'female' or 'male', got {self.sex!r}")
        for name in HISTORY_VARIABLES:
            arr = np.asarray(getattr(self, f"history_{name}"), dtype=float).reshape(-1, 2)
            object.__setattr__(self, f"history_{name}", arr)

    def history(self, variable: str) -> np.ndarray:
        """History of one of ``HISTORY_VARIABLES`` as an (n, 2) array (time in years, value)."""
        if variable not in HISTORY_VARIABLES:
            raise KeyError(variable)
        arr: np.ndarray = getattr(self, f"history_{variable}")
        return arr

    @property
    def apol1_high_risk(self) -> bool:
        """Two APOL1 risk alleles (G1/G2), the genotype associated with faster kidney decline."""
        return self.apol1_risk_alleles is not None and self.apol1_risk_alleles >= 2


@dataclass(frozen=True)
class MedicationSafetyInputs:
    """What pharmacogenomic medication safety needs, readable without lipids or blood pressure.

    Why: the risk model refuses some patients (out of scope, missing lipids) whose current statin or
    clopidogrel still deserves a CPIC check. None means not recorded (age, weight, dose, agent, phenotype).
    ABCG2 and CYP2C9 phenotypes are not read from the record yet (no twin variable); callers may set them.
    """

    patient_id: str
    age_years: float | None
    weight_kg: float | None
    prior_stroke_or_tia: bool
    prior_mi_or_acs: bool
    on_statin: bool
    statin_agent: str | None
    statin_daily_dose_mg: float | None
    on_clopidogrel: bool
    slco1b1_phenotype: str | None
    cyp2c19_phenotype: str | None
    abcg2_phenotype: str | None = None
    cyp2c9_phenotype: str | None = None


# ------------------------------------------------------------------------------------------------
# TwinState -> PatientInputs
# ------------------------------------------------------------------------------------------------


def _instant(t: TimePoint) -> datetime:
    if isinstance(t, datetime):
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    if isinstance(t, date):
        return datetime.combine(t, time.min, tzinfo=UTC)
    raise TypeError(f"not a date or datetime: {t!r}")


def _years(t: TimePoint, as_of: datetime) -> float:
    return (_instant(t) - as_of).total_seconds() / (86400.0 * _YEAR_DAYS)


class _Reader:
    """Collects values and their sources while reading one TwinState."""

    def __init__(self, state: TwinState, as_of: TimePoint) -> None:
        self.state = state
        self.as_of_arg = as_of
        self.as_of = _instant(as_of)
        self.sources: set[str] = set()
        self.used: dict[str, set[str]] = {}
        self.missing: list[str] = []
        self.defaults: list[str] = []

    def _use(self, ev: Evidence) -> None:
        refs = self.used.setdefault(ev.variable, set())
        for src in ev.sources():
            self.sources.add(src.reference)
            refs.add(src.reference)

    def get(self, variable: str) -> Evidence | None:
        ev = self.state.latest_or_none(variable, self.as_of_arg)
        if ev is not None and not (isinstance(ev.value, str) and ev.value == "none" and variable != "smoking_status"):
            self._use(ev)
        return ev

    def number(self, variable: str, required: bool = True) -> float | None:
        ev = self.get(variable)
        if ev is None or isinstance(ev.value, bool | str):
            if required:
                self.missing.append(variable)
            return None
        return float(ev.value)

    def flag(self, variable: str, closed_world: str | None) -> bool | None:
        """A yes/no fact; absence means False only under a stated closed-world convention."""
        ev = self.get(variable)
        if ev is None:
            if closed_world is None:
                return None
            self.defaults.append(f"{variable}=False: {closed_world}")
            return False
        return bool(ev.value)

    def start_years(self, variable: str) -> float | None:
        ev = self.state.latest_or_none(variable, self.as_of_arg)
        if ev is None or not ev.value or ev.value == "none":
            return None
        return min(0.0, _years(ev.time, self.as_of))

    def series(self, variable: str) -> np.ndarray:
        rows = []
        for ev in self.state.history(variable):
            if ev.censored or isinstance(ev.value, bool | str):
                continue
            t = _years(ev.time, self.as_of)
            if t > 1e-9:
                continue
            rows.append((t, float(ev.value)))
            self._use(ev)
        return np.array(rows, dtype=float).reshape(-1, 2)


_MED_CONVENTION = "no active medication record (closed-world medication list convention)"
_PROBLEM_CONVENTION = "no recorded condition (closed-world problem list convention)"


#: A reported eGFR disagrees with the creatinine-derived one when they differ by more than both 30 % and
#: 10 mL/min/1.73 m2 (fhirtwin's tolerance: CKD-EPI 2009/2021 and MDRD differ by up to ~10-15 % at the same
#: creatinine, Inker et al., NEJM 2021;385:1737; a larger gap means another sample or a data error).
EGFR_CONFLICT_RELATIVE, EGFR_CONFLICT_ABSOLUTE = 0.30, 10.0


#: A weight counts for normalising a GFR result only within a year of it.
GFR_WEIGHT_WINDOW_YEARS = 1.0


def _bsa_m2(weight_kg: float, height_cm: float) -> float:
    """Body surface area, DuBois & DuBois (Arch Intern Med 1916;17:863): 0.007184 W^0.425 H^0.725."""
    return float(0.007184 * weight_kg**0.425 * height_cm**0.725)


def _normalised_gfr(reader: _Reader) -> list[tuple[float, float]]:
    """GFR reported in mL/min, normalised to 1.73 m2 with the patient's height and weight (else unused)."""
    absolute = reader.series("egfr_ml_min")
    if not len(absolute):
        return []
    height = reader.series("height_cm")
    weight = reader.series("weight_kg")
    if not len(height) or not len(weight):
        reader.defaults.append("GFR reported in mL/min (not per 1.73 m2) without height and weight: not used")
        return []
    out = []
    for t, v in absolute:
        h = height[np.argmin(np.abs(height[:, 0] - t)), 1]  # adult height is stable
        nearest = int(np.argmin(np.abs(weight[:, 0] - t)))
        if abs(weight[nearest, 0] - t) > GFR_WEIGHT_WINDOW_YEARS:
            continue  # no weight near that result: its body surface area is unknown
        out.append((float(t), float(v) * 1.73 / _bsa_m2(float(weight[nearest, 1]), float(h))))
    reader.defaults.append("GFR reported in mL/min normalised to 1.73 m2 with DuBois body surface area"
                           if out else "GFR reported in mL/min without a weight within a year: not used")
    return out


def _egfr_series(reader: _Reader, sex: str, birth_age_at_as_of: float) -> np.ndarray:
    """Creatinine-derived eGFR (CKD-EPI 2021) at each creatinine time, plus reported eGFR otherwise.

    A reported eGFR within two days of a creatinine is a cross-check: the creatinine-derived value is used,
    and a disagreement beyond the tolerance is recorded (and shown) as a data-quality conflict.
    """
    from fhirtwin.sim.equations import egfr_ckd_epi_2021

    creat = reader.series("creatinine_mg_dl")
    rows: list[tuple[float, float]] = []
    if len(creat):
        ages = birth_age_at_as_of + creat[:, 0]
        egfr = egfr_ckd_epi_2021(sex=sex, age_years=ages, serum_creatinine_mg_dl=creat[:, 1])
        rows.extend(zip(creat[:, 0].tolist(), np.atleast_1d(egfr).tolist(), strict=True))
    derived = dict(rows)
    reported = [*((float(t), float(v)) for t, v in reader.series("egfr_ml_min_1_73m2")), *_normalised_gfr(reader)]
    creat_times = creat[:, 0] if len(creat) else np.zeros(0)
    conflicts = 0
    for t, v in reported:
        if not len(creat_times) or np.min(np.abs(creat_times - t)) > 2.0 / _YEAR_DAYS:
            rows.append((t, v))
            continue
        near = float(derived[float(creat_times[np.argmin(np.abs(creat_times - t))])])
        if abs(v - near) > max(EGFR_CONFLICT_ABSOLUTE, EGFR_CONFLICT_RELATIVE * near):
            conflicts += 1
    if conflicts:
        reader.defaults.append(f"reported eGFR disagrees with the creatinine-derived eGFR ({conflicts} time(s), "
                               "beyond 30 % and 10 mL/min/1.73 m2): creatinine-derived value used")
    rows.sort()
    return np.array(rows, dtype=float).reshape(-1, 2)


#: Diagnostic threshold per test (ADA Standards of Care 2024, section 2: HbA1c >= 6.5 %, fasting plasma glucose
#: >= 126 mg/dL; in the absence of unequivocal hyperglycaemia two abnormal results are required).
_DIABETES_LAB_CRITERIA = (("hba1c_percent", 6.5), ("fasting_glucose_mg_dl", 126.0))
_DIABETES_CLOSED_WORLD = ("no diabetes diagnosis, no diabetes-specific medication and no two diagnostic "
                          "HbA1c/fasting glucose results (closed-world convention)")


def diabetes_status(state: TwinState, as_of: date | datetime | None = None) -> tuple[bool, str | None]:
    """Diabetes by the one missing-data rule (see :func:`_diabetes`) and the default it recorded, if any."""
    when = as_of if as_of is not None else state.reference_date
    if when is None:
        raise ValueError("diabetes_status needs as_of when the twin has no reference date")
    reader = _Reader(state, when)
    value = _diabetes(reader)
    return value, (reader.defaults[-1] if reader.defaults else None)


def _diabetes(reader: _Reader) -> bool:
    """The one missing-data rule for diabetes, applied in order (stated in the model card):

    1. a recorded diagnosis (any diabetes value-set member, complications included) -> yes;
    2. insulin or another diabetes-specific glucose-lowering agent (not metformin, SGLT2 inhibitors or GLP-1
       receptor agonists alone: they have non-diabetic indications) -> yes;
    3. two diagnostic results (HbA1c >= 6.5 % or fasting glucose >= 126 mg/dL), from two samples or from
       two tests of the same sample -> yes; a single one -> yes, recorded as unconfirmed (a confident "no"
       would be wrong, and one result at this level is diabetes far more often than not);
    4. otherwise no, as a closed-world default recorded in ``defaults_used`` (this function is reached only
       for records that hold lipids and blood pressure, i.e. a basis to expect a recorded diagnosis).
    """
    if reader.flag("diabetes", None):
        return True
    if reader.flag("on_diabetes_specific_treatment", None):
        reader.defaults.append("diabetes from treatment: insulin or another diabetes-specific agent, "
                               "no diagnosis recorded")
        return True
    abnormal = set()  # (test, day): two tests of one sample, or one test on two days, confirm each other
    for variable, threshold in _DIABETES_LAB_CRITERIA:
        for ev in reader.state.history(variable):
            if (isinstance(ev.value, int | float) and not isinstance(ev.value, bool) and not ev.censored
                    and float(ev.value) >= threshold and ev.instant < reader.as_of):
                abnormal.add((variable, ev.instant.date()))
                reader._use(ev)
    if len(abnormal) >= 2:
        reader.defaults.append("diabetes from two diagnostic HbA1c/fasting glucose results (ADA criterion), "
                               "no diagnosis recorded")
        return True
    if abnormal:
        reader.defaults.append("diabetes from one diagnostic HbA1c/fasting glucose result, unconfirmed "
                               "(ADA asks for two), no diagnosis recorded")
        return True
    reader.defaults.append(f"diabetes=False: {_DIABETES_CLOSED_WORLD}")
    return False


#: A weight counts for medication safety (prasugrel below 60 kg) only within a year before ``as_of``.
RECENT_WEIGHT_YEARS = 1.0
#: Stroke or TIA for medication safety: a recorded stroke, TIA or cerebrovascular disease (the last errs toward
#: never naming prasugrel and toward CPIC's neurovascular clopidogrel rule).
STROKE_OR_TIA_VARIABLES = ("prior_stroke", "tia", "cerebrovascular_disease")


def _recorded(state: TwinState, variable: str, as_of: TimePoint) -> bool:
    """A yes/no history read under the closed-world problem-list convention, without recording a default:
    it feeds medication safety rules, not the risk model (whose defaults the RiskAssessment lists)."""
    ev = state.latest_or_none(variable, as_of)
    return ev is not None and bool(ev.value) and ev.value != "none"


def _recent_weight(state: TwinState, as_of: TimePoint) -> float | None:
    """The latest weight within ``RECENT_WEIGHT_YEARS`` (an older one may no longer hold)."""
    ev = state.latest_or_none("weight_kg", as_of, lookback=timedelta(days=_YEAR_DAYS * RECENT_WEIGHT_YEARS))
    if ev is None or ev.censored or isinstance(ev.value, bool) or not isinstance(ev.value, int | float):
        return None
    return float(ev.value)


def _friedewald(tc: float, hdl: float, tg: float | None) -> float | None:
    """Friedewald LDL-C (Friedewald et al., Clin Chem 1972;18:499): valid only for TG < 400 mg/dL."""
    if tg is None or tg >= 400:
        return None
    return tc - hdl - tg / 5.0


def inputs_from_state(state: TwinState, as_of: date | datetime | None = None) -> PatientInputs:
    """Read one TwinState at ``as_of`` (default: its reference date) into PatientInputs.

    Raises InsufficientData naming every missing variable; never fills a measurement with a guess.
    """
    from fhirtwin.twin import MissingEvidence

    if as_of is None:
        as_of = state.reference_date
    if as_of is None:
        raise ValueError("inputs_from_state needs as_of when the twin has no reference date")
    reader = _Reader(state, as_of)
    pid = state.patient_id
    missing: list[str] = []

    sex = state.demographics.sex
    if sex not in ("female", "male"):
        missing.append("sex (female/male)")
    elif state.demographics.source is not None:
        reader.sources.add(state.demographics.source.reference)
    try:
        age_int = state.age_years(as_of)
        birth = state.demographics.birth_date
        age = _years(as_of, _instant(birth)) if birth is not None else float(age_int)
        age = max(age, float(age_int))
    except MissingEvidence:
        missing.append("birth date (age)")
        age = float("nan")

    tc = reader.number("total_cholesterol_mg_dl")
    hdl = reader.number("hdl_cholesterol_mg_dl")
    sbp = reader.number("systolic_bp_mm_hg")
    bmi = reader.number("bmi_kg_m2")
    ldl = reader.number("ldl_cholesterol_mg_dl", required=False)
    if ldl is None and tc is not None and hdl is not None:
        tg = reader.number("triglycerides_mg_dl", required=False)
        ldl = _friedewald(tc, hdl, tg)
        if ldl is not None:
            reader.defaults.append("ldl_cholesterol_mg_dl from Friedewald (TC - HDL - TG/5), TG < 400 mg/dL")
    if ldl is None:
        missing.append("ldl_cholesterol_mg_dl (or triglycerides < 400 mg/dL for Friedewald)")

    hba1c = reader.number("hba1c_percent", required=False)
    uacr = reader.number("uacr_mg_g", required=False)

    egfr_hist = np.zeros((0, 2))
    egfr = None
    if sex in ("female", "male") and age == age:
        egfr_hist = _egfr_series(reader, sex, age)
        if len(egfr_hist):
            egfr = float(egfr_hist[-1, 1])
    if egfr is None:
        missing.append("creatinine_mg_dl or egfr_ml_min_1_73m2")

    diabetes = _diabetes(reader)
    smoker = reader.flag("current_smoker", None)
    if smoker is None:
        missing.append("current_smoker (smoking status)")

    missing = [*missing, *reader.missing]
    if missing:
        raise InsufficientData(pid, missing)
    # nothing is missing, so every required number was found
    assert tc is not None and hdl is not None and ldl is not None
    assert sbp is not None and egfr is not None and bmi is not None

    on_statin = bool(reader.flag("on_statin", _MED_CONVENTION))
    intensity_ev = reader.get("statin_intensity") if on_statin else None
    intensity = str(intensity_ev.value) if intensity_ev is not None and intensity_ev.value != "none" else None
    agent_ev = reader.get("statin_agent") if on_statin else None
    agent = str(agent_ev.value) if agent_ev is not None and agent_ev.value not in ("none", None) else None
    dose_ev = reader.get("statin_daily_dose_mg") if on_statin else None
    dose = float(dose_ev.value) if dose_ev is not None and isinstance(dose_ev.value, int | float) \
        and not isinstance(dose_ev.value, bool) else None
    if on_statin and intensity is None:
        intensity = "moderate"
        reader.defaults.append("statin_intensity=moderate: statin without a known dose (most common intensity)")

    def geno(variable: str) -> Any:
        ev = reader.get(variable)
        return None if ev is None else ev.value

    fh = geno("fh_variant")
    apol1 = geno("apol1_risk_alleles")
    prs = geno("cad_prs_z")
    prior_mi = reader.flag("prior_mi", _PROBLEM_CONVENTION)
    prior_stroke = reader.flag("prior_stroke", _PROBLEM_CONVENTION)
    stroke_or_tia = bool(prior_stroke) or any(_recorded(state, v, as_of) for v in STROKE_OR_TIA_VARIABLES[1:])
    markers = _markers(reader)

    return PatientInputs(
        patient_id=pid,
        sex=str(sex),
        age_years=float(age),
        total_cholesterol_mg_dl=float(tc),
        hdl_cholesterol_mg_dl=float(hdl),
        ldl_cholesterol_mg_dl=float(ldl),
        systolic_bp_mm_hg=float(sbp),
        egfr_ml_min_1_73m2=float(egfr),
        bmi_kg_m2=float(bmi),
        diabetes=bool(diabetes),
        current_smoker=bool(smoker),
        on_bp_treatment=bool(reader.flag("on_bp_treatment", _MED_CONVENTION)),
        on_statin=on_statin,
        hba1c_percent=hba1c,
        uacr_mg_g=uacr,
        race=state.demographics.race,
        hypertension=bool(reader.flag("hypertension", _PROBLEM_CONVENTION)),
        ckd=bool(reader.flag("ckd", _PROBLEM_CONVENTION)),
        prior_ascvd=bool(prior_mi or prior_stroke),
        prior_stroke_or_tia=stroke_or_tia,
        prior_mi_or_acs=bool(prior_mi),
        weight_kg=_recent_weight(state, as_of),
        heart_failure=bool(reader.flag("heart_failure", _PROBLEM_CONVENTION)),
        statin_intensity=intensity,
        statin_agent=agent,
        statin_daily_dose_mg=dose,
        on_sglt2i=bool(reader.flag("on_sglt2i", _MED_CONVENTION)),
        on_clopidogrel=bool(reader.flag("on_clopidogrel", _MED_CONVENTION)),
        fh_variant=None if fh is None else bool(fh),
        apol1_risk_alleles=None if apol1 is None else int(float(apol1)),
        slco1b1_phenotype=None if geno("slco1b1_phenotype") is None else str(geno("slco1b1_phenotype")),
        cyp2c19_phenotype=None if geno("cyp2c19_phenotype") is None else str(geno("cyp2c19_phenotype")),
        cad_prs_z=None if prs is None else float(prs),
        statin_start_years=reader.start_years("on_statin"),
        bp_treatment_start_years=reader.start_years("on_bp_treatment"),
        sglt2i_start_years=reader.start_years("on_sglt2i"),
        history_ldl_cholesterol_mg_dl=reader.series("ldl_cholesterol_mg_dl"),
        history_systolic_bp_mm_hg=reader.series("systolic_bp_mm_hg"),
        history_egfr_ml_min_1_73m2=egfr_hist,
        history_hba1c_percent=reader.series("hba1c_percent"),
        history_bmi_kg_m2=reader.series("bmi_kg_m2"),
        sources=tuple(sorted(reader.sources)),
        defaults_used=tuple(reader.defaults),
        scales_read=variables_by_scale(state, as_of),
        variables_used=tuple(sorted(reader.used)),
        sources_by_variable=tuple((v, tuple(sorted(refs))) for v, refs in sorted(reader.used.items())),
        **markers,
    )


def variables_by_scale(state: TwinState, as_of: TimePoint) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Per scale (molecular ... environmental), the twin variables that have a value at ``as_of``."""
    from fhirtwin.twin import Scale, get_variable

    present = [name for name in state.variables() if state.latest_or_none(name, as_of) is not None]
    return tuple((scale.value, tuple(n for n in present if get_variable(n).scale is scale)) for scale in Scale)


#: Optional marker, behavioural and environmental variables read as the latest value (no default, no guess).
MARKER_VARIABLES = ("lpa_nmol_l", "lpa_mg_dl", "hscrp_mg_l", "cac_agatston", "nt_probnp_pg_ml", "lvef_percent",
                    "exercise_min_per_week", "steps_per_day", "pm25_ug_m3", "sdi_decile")


def _markers(reader: _Reader) -> dict[str, Any]:
    """The latest recorded value of each marker variable (None when absent); the SDI decile as an integer."""
    out: dict[str, Any] = {name: reader.number(name, required=False) for name in MARKER_VARIABLES}
    if out["sdi_decile"] is not None:
        decile = int(round(out["sdi_decile"]))
        if not 1 <= decile <= 10:
            reader.defaults.append(f"SDI decile {out['sdi_decile']:g} is not a decile 1-10: not used")
        out["sdi_decile"] = decile if 1 <= decile <= 10 else None
    return out


def medication_safety_inputs(state: TwinState, as_of: date | datetime | None = None) -> MedicationSafetyInputs:
    """Read what pharmacogenomic medication safety needs at ``as_of`` (default: the twin's reference date).

    Unlike :func:`inputs_from_state` it needs no lipids or blood pressure and never raises for missing data
    (None instead), so patients the risk model refuses still get their current medications checked.
    Conventions are those of :func:`inputs_from_state` (closed-world medication and problem lists).
    """
    from fhirtwin.twin import MissingEvidence

    when = as_of if as_of is not None else state.reference_date
    if when is None:
        raise ValueError("medication_safety_inputs needs as_of when the twin has no reference date")
    reader = _Reader(state, when)
    age: float | None
    try:
        age = float(state.age_years(when))
        birth = state.demographics.birth_date
        if birth is not None:
            age = max(age, _years(when, _instant(birth)))
    except MissingEvidence:
        age = None
    on_statin = _recorded(state, "on_statin", when)
    agent: str | None = None
    dose: float | None = None
    if on_statin:
        agent_ev = reader.get("statin_agent")
        if agent_ev is not None and isinstance(agent_ev.value, str) and agent_ev.value != "none":
            agent = agent_ev.value
        dose_ev = reader.get("statin_daily_dose_mg")
        if dose_ev is not None and isinstance(dose_ev.value, int | float) and not isinstance(dose_ev.value, bool):
            dose = float(dose_ev.value)

    def phenotype(variable: str) -> str | None:
        ev = reader.get(variable)
        return None if ev is None or ev.value is None else str(ev.value)

    return MedicationSafetyInputs(
        patient_id=state.patient_id,
        age_years=age,
        weight_kg=_recent_weight(state, when),
        prior_stroke_or_tia=any(_recorded(state, v, when) for v in STROKE_OR_TIA_VARIABLES),
        prior_mi_or_acs=_recorded(state, "prior_mi", when),
        on_statin=on_statin,
        statin_agent=agent,
        statin_daily_dose_mg=dose,
        on_clopidogrel=_recorded(state, "on_clopidogrel", when),
        slco1b1_phenotype=phenotype("slco1b1_phenotype"),
        cyp2c19_phenotype=phenotype("cyp2c19_phenotype"),
    )
