"""Ground truth for a Synthea corpus, read from Synthea's own CSV export.

The truth is decided from the CSV files Synthea writes beside its FHIR bundles (``patients.csv``,
``conditions.csv``, ``procedures.csv``, ``careplans.csv``, ``medications.csv``,
``observations.csv``), with code lists kept in ``fhirtwin/sandbox/synthea_data/``. Those lists
hold the codes and descriptions Synthea 3.3.0 itself emits, each with the Synthea module (inside
``synthea-3.3.0.jar``, ``modules/…``) that emits it. This module shares no code table with
fhirtwin's adapters, so a test can find the adapters wrong.

Everything is decided as of the export date ``as_of`` (the corpus's reference date, read from
its ``corpus.json``; generation uses it as Synthea's end date too).

"Active", as Synthea means it: Synthea writes a row's ``STOP`` only when the condition, care plan
or prescription ended during the simulated life; an ongoing one has an empty ``STOP``. A row is
active as of ``as_of`` when ``START`` (its date part) ≤ ``as_of`` and ``STOP`` is empty or later
than ``as_of``. Rows that start after ``as_of`` are ignored everywhere.

How each concept is decided (codes are matched on the CSV ``CODE`` column, and on ``SYSTEM``
where the file has one; concept names are the ``concept`` column of ``concepts.csv``):

* ``age``: whole years from ``patients.csv`` ``BIRTHDATE`` to ``as_of`` (or to ``DEATHDATE``).
  ``sex``: ``GENDER`` (``M`` → ``male``, ``F`` → ``female``).
* ``smoking``: the latest ``observations.csv`` row with ``CODE`` 72166-2 (Tobacco smoking status)
  dated ≤ ``as_of``; its ``VALUE`` (Synthea writes the answer's description there, not its code)
  is looked up in ``smoking.csv``: "Smokes tobacco daily (finding)" → current, "Ex-smoker
  (finding)" → former, "Never smoked tobacco (finding)" → never. No such row → ``None``.
* established ASCVD (``ascvd``): any row, active or ended, of a condition or procedure whose code
  is in ``ascvd_mi``, ``ascvd_ihd``, ``ascvd_angina``, ``ascvd_revascularisation`` (CABG, PCI,
  history of CABG) or ``ascvd_stroke`` — ASCVD is a history, so a resolved myocardial infarction
  counts. ``ascvd_components`` names which. Synthea 3.3.0 has no module that emits a transient
  ischaemic attack or peripheral arterial disease, so ``tia`` and ``pad`` never occur (and
  "angina" is only Synthea's "Preinfarction syndrome", i.e. unstable angina).
* ``diabetes``: an active ``diabetes_type2``, ``diabetes_other`` or ``diabetes_complication``
  condition, or an active prescription of an antidiabetic medication (``medications.csv``
  ``DESCRIPTION`` containing an ``antidiabetic`` ingredient of ``medications.csv``: metformin,
  insulin, liraglutide, canagliflozin). ``diabetes_type`` is ``type2`` (a type 2 code or any
  "… due to type 2 diabetes" complication), ``other`` (diabetes from cystic fibrosis),
  ``unspecified`` (medication or "Disorder of kidney due to diabetes mellitus" only) or ``None``.
  Synthea 3.3.0 emits no type 1 diabetes code. Prediabetes and hyperglycaemia are not diabetes.
  ``diabetes_evidence`` says which of ``condition``/``complication``/``medication`` decided it.
* ``ckd_stage``: the highest stage among active ``ckd_stage_1`` … ``ckd_stage_5`` conditions
  (stage 5 is Synthea's "End-stage renal disease"); ``None`` when there is none.
* ``dialysis``: a "Renal dialysis (procedure)" (``procedures.csv`` 265764009; Synthea's dialysis
  module repeats it every few days while the patient dialyses) dated within
  ``DIALYSIS_WINDOW_DAYS`` before ``as_of``. ``dialysis_care_plan`` says whether the "Dialysis care
  plan" (``careplans.csv`` 736690008) is active; it is not the rule because Synthea never ends
  that care plan, not even after a kidney transplant. Acute dialysis (``dialysis_acute``:
  hemodialysis during a COVID-19 admission, post-operative acute renal failure on dialysis) does
  not count.
* ``kidney_transplant``: any row, active or ended, in ``kidney_transplant`` (history of renal
  transplant, transplant of kidney, transplant follow-up regime).
* ``heart_failure``: an active ``heart_failure`` condition.
* ``statin``: among active prescriptions whose ``DESCRIPTION`` contains a statin ingredient name
  (whole word, case-insensitive) followed, after an optional salt word, by a strength "<n> MG",
  the one with the latest ``START``: agent, dose in mg, intensity from ``statin_intensity.csv``
  (2018 AHA/ACC cholesterol guideline, Table 3: high / moderate / low; a dose outside that
  table, e.g. simvastatin 80 mg or 5 mg, gives intensity ``None``).
* ``total_cholesterol``/``hdl``/``sbp``: the latest ``observations.csv`` row dated ≤ ``as_of`` with
  ``CODE`` 2093-3 (mg/dL), 2085-9 (mg/dL), 8480-6 (mm[Hg]); ``has_lipids`` needs both lipids.

Known limits: Synthea's exporter keeps ``years_of_history`` years of encounters (and whatever
ended within them) plus everything still active, in the CSV and FHIR exports alike, so an event
older than that window is in neither; the truth is about the exported record, not the simulated
life. CSV descriptions lose their commas (Synthea replaces them), which is why medications are
matched on ingredient names and strengths rather than on whole descriptions.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from importlib import resources
from pathlib import Path

DIALYSIS_WINDOW_DAYS = 30
SMOKING_STATUS_CODE = "72166-2"
TOTAL_CHOLESTEROL_CODE = "2093-3"
HDL_CODE = "2085-9"
SBP_CODE = "8480-6"
ASCVD_COMPONENTS = {
    "ascvd_mi": "mi",
    "ascvd_ihd": "ihd",
    "ascvd_angina": "angina",
    "ascvd_revascularisation": "revascularisation",
    "ascvd_stroke": "stroke",
    "ascvd_tia": "tia",
    "ascvd_pad": "pad",
}


@dataclass(frozen=True)
class Measurement:
    value: float
    unit: str
    when: str  # ISO date-time as Synthea wrote it


@dataclass(frozen=True)
class Statin:
    agent: str
    dose_mg: float
    intensity: str | None  # high | moderate | low | None (dose not in the 2018 table)
    code: str
    description: str
    start: str


@dataclass(frozen=True)
class Truth:
    patient_id: str
    birth_date: str
    age: int
    sex: str
    deceased: bool
    smoking: str | None = None  # current | former | never
    ascvd: bool = False
    ascvd_components: frozenset[str] = frozenset()
    diabetes: bool = False
    diabetes_type: str | None = None  # type2 | other | unspecified
    diabetes_complications: bool = False
    diabetes_evidence: frozenset[str] = frozenset()  # condition | complication | medication
    antidiabetic_medications: tuple[str, ...] = ()
    ckd_stage: int | None = None
    dialysis: bool = False
    dialysis_care_plan: bool = False
    kidney_transplant: bool = False
    heart_failure: bool = False
    statin: Statin | None = None
    total_cholesterol: Measurement | None = None
    hdl: Measurement | None = None
    sbp: Measurement | None = None
    codes: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    @property
    def has_lipids(self) -> bool:
        return self.total_cholesterol is not None and self.hdl is not None

    @property
    def has_sbp(self) -> bool:
        return self.sbp is not None


# ----------------------------------------------------------------------------------- code lists


def _data_rows(name: str) -> list[dict[str, str]]:
    text = resources.files("fhirtwin.sandbox").joinpath("synthea_data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


@dataclass(frozen=True)
class _Lists:
    concepts: dict[tuple[str, str], str]  # (csv file, code) → concept
    systems: dict[tuple[str, str], str]  # (csv file, code) → system
    smoking: dict[str, str]  # Synthea's answer description → status
    statin: re.Pattern[str]
    antidiabetic: re.Pattern[str]
    intensity: tuple[tuple[str, float, float, str], ...]


@cache
def _lists() -> _Lists:
    concepts = {(r["csv_file"], r["code"]): r["concept"] for r in _data_rows("concepts.csv")}
    systems = {(r["csv_file"], r["code"]): r["system"] for r in _data_rows("concepts.csv")}
    smoking = {r["synthea_description"].lower(): r["status"] for r in _data_rows("smoking.csv")}
    meds = _data_rows("medications.csv")
    statins = sorted({r["ingredient"] for r in meds if r["concept"] == "statin"})
    antidiabetics = sorted({r["ingredient"] for r in meds if r["concept"] == "antidiabetic"})
    statin = re.compile(r"\b(" + "|".join(statins) + r")\b(?:\s+[a-z]+)?\s+(\d+(?:\.\d+)?)\s*MG\b", re.IGNORECASE)
    antidiabetic = re.compile(r"\b(" + "|".join(antidiabetics) + r")\b", re.IGNORECASE)
    intensity = tuple((r["agent"], float(r["min_mg"]), float(r["max_mg"]), r["intensity"])
                      for r in _data_rows("statin_intensity.csv"))
    return _Lists(concepts, systems, smoking, statin, antidiabetic, intensity)


def statin_intensity(agent: str, dose_mg: float) -> str | None:
    """High / moderate / low per the 2018 AHA/ACC table; ``None`` for a dose it does not list."""
    for name, low, high, intensity in _lists().intensity:
        if name == agent.lower() and low <= dose_mg <= high:
            return intensity
    return None


def parse_statin(description: str) -> tuple[str, float] | None:
    """(agent, mg) from a Synthea description such as "atorvastatin 20 MG Oral Tablet"."""
    match = _lists().statin.search(description)
    if match is None:
        return None
    return match.group(1).lower(), float(match.group(2))


# ---------------------------------------------------------------------------------------- truth


def _rows(csv_dir: Path, name: str) -> Iterator[dict[str, str]]:
    path = csv_dir / f"{name}.csv"
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _day(value: str) -> str:
    return value[:10]


def _active(row: dict[str, str], as_of: str) -> bool:
    stop = row.get("STOP") or ""
    return _day(row["START"]) <= as_of and (not stop or _day(stop) > as_of)


def _years(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def export_date(csv_dir: str | Path) -> date:
    """The reference date recorded by :func:`fhirtwin.sandbox.synthea.generate` beside ``csv/``."""
    manifest = Path(csv_dir).parent / "corpus.json"
    return date.fromisoformat(json.loads(manifest.read_text())["settings"]["reference_date"])


@dataclass
class _Facts:
    active: set[str] = field(default_factory=set)  # concepts with an active row
    ever: set[str] = field(default_factory=set)  # concepts with any row
    codes: dict[str, set[str]] = field(default_factory=dict)
    last_dialysis: str = ""
    dialysis_plan: bool = False
    statins: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    antidiabetics: set[str] = field(default_factory=set)
    smoking: tuple[str, str] | None = None
    measurements: dict[str, Measurement] = field(default_factory=dict)

    def note(self, concept: str, code: str, active: bool) -> None:
        self.ever.add(concept)
        if active:
            self.active.add(concept)
        self.codes.setdefault(concept, set()).add(code)


def _coded(csv_dir: Path, name: str, facts: dict[str, _Facts], as_of: str) -> None:
    lists = _lists()
    for row in _rows(csv_dir, name):
        concept = lists.concepts.get((name, row["CODE"]))
        patient = facts.get(row["PATIENT"])
        if concept is None or patient is None or _day(row["START"]) > as_of:
            continue
        if "SYSTEM" in row and row["SYSTEM"] != lists.systems[(name, row["CODE"])]:
            continue
        active = name != "procedures" and _active(row, as_of)  # a procedure's STOP is when it ended
        patient.note(concept, row["CODE"], active)
        if concept == "dialysis" and name == "procedures":
            patient.last_dialysis = max(patient.last_dialysis, _day(row["START"]))
        if concept == "dialysis" and name == "careplans" and active:
            patient.dialysis_plan = True


def _medications(csv_dir: Path, facts: dict[str, _Facts], as_of: str) -> None:
    lists = _lists()
    for row in _rows(csv_dir, "medications"):
        patient = facts.get(row["PATIENT"])
        if patient is None or not _active(row, as_of):
            continue
        description = row["DESCRIPTION"]
        if parse_statin(description) is not None:
            patient.statins.append((row["START"], row))
        if lists.antidiabetic.search(description):
            patient.antidiabetics.add(description)


_MEASURED = {TOTAL_CHOLESTEROL_CODE: "total_cholesterol", HDL_CODE: "hdl", SBP_CODE: "sbp"}


def _observations(csv_dir: Path, facts: dict[str, _Facts], as_of: str) -> None:
    lists = _lists()
    for row in _rows(csv_dir, "observations"):
        code = row["CODE"]
        if code != SMOKING_STATUS_CODE and code not in _MEASURED:
            continue
        patient = facts.get(row["PATIENT"])
        when = row["DATE"]
        if patient is None or _day(when) > as_of:
            continue
        if code == SMOKING_STATUS_CODE:
            status = lists.smoking.get(row["VALUE"].strip().lower())
            if status is not None and (patient.smoking is None or when >= patient.smoking[0]):
                patient.smoking = (when, status)
            continue
        name = _MEASURED[code]
        previous = patient.measurements.get(name)
        if previous is None or when >= previous.when:
            try:
                value = float(row["VALUE"])
            except ValueError:
                continue
            patient.measurements[name] = Measurement(value, row["UNITS"], when)


def _decide(patient: dict[str, str], facts: _Facts, as_of: date) -> Truth:
    born = date.fromisoformat(patient["BIRTHDATE"])
    died = patient.get("DEATHDATE") or ""
    end = min(as_of, date.fromisoformat(died)) if died else as_of
    active, ever = facts.active, facts.ever

    components = frozenset(short for concept, short in ASCVD_COMPONENTS.items() if concept in ever)
    complications = "diabetes_complication" in active
    evidence = set()
    if {"diabetes_type2", "diabetes_other"} & active:
        evidence.add("condition")
    if complications:
        evidence.add("complication")
    if facts.antidiabetics:
        evidence.add("medication")
    type2 = "diabetes_type2" in active or any(
        "type 2" in d or "type ii" in d for d in _descriptions(facts, "diabetes_complication"))
    diabetes_type = ("type2" if type2 else "other" if "diabetes_other" in active
                     else "unspecified" if evidence else None)

    stages = [int(c.rsplit("_", 1)[1]) for c in active if c.startswith("ckd_stage_")]
    window_start = (as_of - timedelta(days=DIALYSIS_WINDOW_DAYS)).isoformat()
    dialysis = bool(facts.last_dialysis) and facts.last_dialysis >= window_start

    statin = None
    if facts.statins:
        start, row = max(facts.statins, key=lambda item: item[0])
        agent, dose = parse_statin(row["DESCRIPTION"]) or ("", 0.0)
        statin = Statin(agent, dose, statin_intensity(agent, dose), row["CODE"], row["DESCRIPTION"], start)

    return Truth(
        patient_id=patient["Id"],
        birth_date=patient["BIRTHDATE"],
        age=_years(born, end),
        sex={"M": "male", "F": "female"}.get(patient["GENDER"], patient["GENDER"]),
        deceased=bool(died) and date.fromisoformat(died) <= as_of,
        smoking=facts.smoking[1] if facts.smoking else None,
        ascvd=bool(components),
        ascvd_components=components,
        diabetes=bool(evidence),
        diabetes_type=diabetes_type,
        diabetes_complications=complications,
        diabetes_evidence=frozenset(evidence),
        antidiabetic_medications=tuple(sorted(facts.antidiabetics)),
        ckd_stage=max(stages) if stages else None,
        dialysis=dialysis,
        dialysis_care_plan=facts.dialysis_plan,
        kidney_transplant="kidney_transplant" in ever,
        heart_failure="heart_failure" in active,
        statin=statin,
        total_cholesterol=facts.measurements.get("total_cholesterol"),
        hdl=facts.measurements.get("hdl"),
        sbp=facts.measurements.get("sbp"),
        codes={concept: tuple(sorted(codes)) for concept, codes in sorted(facts.codes.items())},
    )


@cache
def _description_of() -> dict[str, str]:
    return {r["code"]: r["synthea_description"].lower() for r in _data_rows("concepts.csv")}


def _descriptions(facts: _Facts, concept: str) -> list[str]:
    return [_description_of().get(code, "") for code in facts.codes.get(concept, set())]


def ground_truth(csv_dir: str | Path, *, as_of: date | None = None) -> dict[str, Truth]:
    """Truth per Synthea patient id (the FHIR ``Patient.id`` in its bundles), as of ``as_of``.

    ``as_of`` defaults to the corpus's reference date (``corpus.json`` beside ``csv_dir``).
    """
    folder = Path(csv_dir)
    when = as_of or export_date(folder)
    day = when.isoformat()
    patients = {row["Id"]: row for row in _rows(folder, "patients") if row["BIRTHDATE"] <= day}
    facts = {pid: _Facts() for pid in patients}
    for name in ("conditions", "procedures", "careplans"):
        _coded(folder, name, facts, day)
    _medications(folder, facts, day)
    _observations(folder, facts, day)
    return {pid: _decide(patients[pid], facts[pid], when) for pid in sorted(patients)}
