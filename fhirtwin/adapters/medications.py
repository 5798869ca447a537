"""Medication adapter: MedicationRequest / MedicationStatement / MedicationDispense -> treatment episodes.

A medication is resolved to its ingredient(s), agent, drug class and strength, from (in this order) a
known RxNorm concept (``medication_rxnorm.csv``: VSAC expansions with RxNorm's normalised names, parsed
here), an RxNorm ingredient code, a WHO ATC code, a referenced or contained Medication's ``code`` and
``ingredient[]`` (with ``strength``), and last the display text (noted). ``medicationReference`` is resolved
whether contained (``#id``), relative, absolute or versioned. The class table gives the twin variables
(on_statin, on_bp_treatment, on_insulin, on_glucose_lowering, ...); for a statin the agent, the total daily
dose and the ACC/AHA 2018 intensity are kept too. Status rules follow fhirtwin's FHIR reference §3.3;
each episode runs from start to stop (open while active). Nothing here logs: every problem goes to the
data-quality ledger (codes and references only, never identifiers or free text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from fhirtwin.adapters._common import (
    RXNORM,
    UCUM,
    AdapterError,
    Context,
    add_note,
    code_label,
    codings,
    concept_text,
    first_number,
    first_time,
    norm_system,
    parse_time,
    read_csv,
)
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable, to_instant

ATC = "http://www.whocc.no/atc"

#: FHIR Timing.repeat.periodUnit (UCUM) in days.
PERIOD_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.4375, "a": 365.25}
#: HL7 v3 GTSAbbreviation timing codes (Timing.code) -> administrations per day.
TIMING_CODES = {"QD": 1.0, "BID": 2.0, "TID": 3.0, "QID": 4.0, "QOD": 0.5, "AM": 1.0, "PM": 1.0, "QHS": 1.0}
#: UCUM mass units -> mg.
MASS_MG = {"mg": 1.0, "g": 1000.0, "ug": 0.001}
#: UCUM units of biological activity (insulin, heparin): valid doses, but no mass, so no mg daily dose.
ACTIVITY_UNITS = {"[iU]", "[IU]", "U", "[U]"}
#: UCUM unit-dose spellings (``1`` and any ``{annotation}`` are valid UCUM for "one unit").
UCUM_UNIT_DOSE = {"1"}
#: Common non-UCUM spellings of one tablet/capsule: read as one unit dose, ledgered as a conversion.
WORD_UNIT_DOSE = {"tab", "tabs", "tablet", "tablets", "cap", "caps", "capsule", "capsules", "pill", "pills"}
#: Days-supply units (UCUM or words) -> days.
SUPPLY_DAYS = {"d": 1.0, "day": 1.0, "days": 1.0, "wk": 7.0, "week": 7.0, "weeks": 7.0, "mo": 30.4375}

REQUEST_OK = {"active", "on-hold", "completed", "stopped"}
STATEMENT_OK = {"active", "on-hold", "completed", "stopped"}
DISPENSE_OK = {"completed"}
ENDED = {"completed", "stopped"}
MED_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationDispense")


# -- RxNorm normalised names ------------------------------------------------------------------------

#: Words of RxNorm dose forms (a trailing run of these words is the dose form, not the ingredient).
_FORM_WORDS = frozenset(
    {
        "oral", "tablet", "tablets", "capsule", "capsules", "extended", "release", "delayed", "disintegrating",
        "chewable", "suspension", "solution", "injectable", "injection", "pen", "injector", "auto-injector",
        "prefilled", "syringe", "cartridge", "inhalant", "inhalation", "powder", "pill", "product", "topical",
        "ophthalmic", "transdermal", "system", "patch", "film", "granules", "packet", "kit", "nasal", "spray", "cream",
        "gel", "ointment", "drug", "implant", "rectal", "sublingual", "buccal", "effervescent", "enteric", "coated",
        "for", "reconstitution", "vial", "metered", "dose", "otic", "lotion", "foam", "jet", "lozenge", "mucosal",
        "intravenous", "subcutaneous", "liquid", "pellet", "suppository",
    }
)
_BRAND = re.compile(r"\s*\[([^\[\]]+)\]\s*$")
_PACK = re.compile(r"^\{(?P<body>.*)\}\s*Pack$", re.IGNORECASE)
_PACK_ITEM = re.compile(r"\d+\s*\((?P<item>[^()]*)\)")
#: Leading quantity factors of an SCD ("24 HR", "3 ML", "1 MG Dose 1.5 ML", "Modified 24 HR").
_QTY = re.compile(
    r"^(?:(?:modified|osmotic|sensor)\s+)?\d+(?:\.\d+)?\s+(?:hr|ml|mg|actuat|day|unt|mcg)(?:\s*,)?(?:\s+doses?)?\s+",
    re.IGNORECASE,
)
_STRENGTH = re.compile(
    r"\s(?P<value>\d+(?:\.\d+)?)\s+(?P<unit>MG|MCG|UNT|MEQ|MMOL)(?:/(?P<per>ML|HR|ACTUAT|MG|G|L|DAY))?\b",
    re.IGNORECASE,
)
_XR_TEXT = re.compile(r"extended release|\b(?:xl|xr|er|sr|cr)\b|\b\d+ hr\b", re.IGNORECASE)


@dataclass(frozen=True)
class Component:
    """One ingredient part of an RxNorm name: the substance as written and its strength, if any."""

    substance: str
    value: float | None = None
    unit: str | None = None  # MG, MCG, UNT, ...
    per: str | None = None  # denominator: ML, HR, ACTUAT; None = per unit dose

    @property
    def mg_per_unit(self) -> float | None:
        """Mass per unit dose (tablet, capsule) in mg, if the strength is a plain mass."""
        if self.value is None or self.per is not None or self.unit is None:
            return None
        factor = {"MG": 1.0, "MCG": 0.001}.get(self.unit.upper())
        return self.value * factor if factor is not None else None

    @property
    def mg_per_ml(self) -> float | None:
        """Concentration in mg/mL (oral suspensions), if the strength is one."""
        if self.value is None or (self.per or "").upper() != "ML" or (self.unit or "").upper() != "MG":
            return None
        return self.value


@dataclass(frozen=True)
class ParsedName:
    """An RxNorm normalised name taken apart (SCD/SBD/SCDC/SCDF/IN/MIN/GPCK/BPCK)."""

    components: tuple[Component, ...]
    dose_form: str | None
    brand: str | None
    pack: bool
    extended_release: bool


def parse_rxnorm_name(name: str) -> ParsedName:
    """Ingredients, strengths, dose form and brand of an RxNorm normalised name.

    ``atorvastatin 40 MG Oral Tablet`` (SCD), ``... [Lipitor]`` (SBD), ``glyburide / metformin`` (MIN),
    ``glipizide Oral Tablet`` (SCDF), ``3 ML insulin glargine 100 UNT/ML Pen Injector`` (quantity factor),
    ``{28 (ethinyl estradiol 0.035 MG / norethindrone 1 MG Oral Tablet) } Pack [Brand]`` (packs: the union
    of their items; a strength that differs between items is dropped).
    """
    text = " ".join(str(name).split())
    brand = None
    m = _BRAND.search(text)
    if m:
        brand, text = m.group(1), text[: m.start()]
    pack = _PACK.match(text)
    if pack:
        items = [parse_rxnorm_name(i.group("item")) for i in _PACK_ITEM.finditer(pack.group("body"))]
        merged: dict[str, Component] = {}
        for item in items:
            for comp in item.components:
                key = comp.substance.lower()
                if key in merged and merged[key] != comp:
                    merged[key] = Component(comp.substance)
                else:
                    merged.setdefault(key, comp)
        return ParsedName(tuple(merged.values()), "Pack", brand, True, any(i.extended_release for i in items))
    xr = bool(_XR_TEXT.search(text))
    while True:
        q = _QTY.match(text)
        if not q:
            break
        text = text[q.end() :]
    parts = [p.strip() for p in text.split(" / ") if p.strip()]
    components: list[Component] = []
    dose_form = None
    for i, part in enumerate(parts):
        s = _STRENGTH.search(" " + part)
        if s:
            substance = part[: s.start()].strip()
            rest = part[s.end() - 1 :].strip()
            comp = Component(substance, float(s.group("value")), s.group("unit").upper(),
                             s.group("per").upper() if s.group("per") else None)
        else:
            substance, rest = _split_form(part)
            comp = Component(substance)
        if i == len(parts) - 1 and rest:
            dose_form = rest
        components.append(comp)
    return ParsedName(tuple(c for c in components if c.substance), dose_form, brand, False, xr)


def _split_form(part: str) -> tuple[str, str]:
    words = part.split()
    k = len(words)
    while k > 1 and words[k - 1].lower() in _FORM_WORDS:
        k -= 1
    return " ".join(words[:k]), " ".join(words[k:])


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- data tables ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    """A base ingredient (the agent), its drug class, RxNorm IN code and WHO ATC code."""

    name: str
    drug_class: str
    rxcui: str
    atc: str


@dataclass(frozen=True)
class Ingredient:
    """One ingredient of a medication, with its strength per unit dose if known."""

    name: str
    drug_class: str
    strength_mg: float | None
    extended_release: bool
    code: str
    mg_per_ml: float | None = None
    ingredient_code: str | None = None
    basis: str = "code"  # code | ingredient code | atc | medication ingredient | display text


@cache
def _agents() -> dict[str, Agent]:
    return {
        r["ingredient"]: Agent(r["ingredient"], r["class"], r["rxcui"], r["atc"])
        for r in read_csv("medication_ingredients.csv")
    }


@cache
def _agents_by_rxcui() -> dict[str, Agent]:
    return {a.rxcui: a for a in _agents().values() if a.rxcui}


@cache
def _agents_by_atc() -> dict[str, Agent]:
    return {a.atc: a for a in _agents().values() if a.atc}


@cache
def _rxnorm() -> dict[str, str]:
    """RxCUI -> RxNorm normalised name."""
    return {r["rxcui"]: r["display"] for r in read_csv("medication_rxnorm.csv")}


@cache
def _atc_rows() -> list[tuple[str, tuple[str, ...], str]]:
    """(ATC code or prefix, ingredients, class), longest code first."""
    rows = []
    for r in read_csv("medication_atc.csv"):
        rows.append((r["atc"], tuple(i for i in r["ingredients"].split(";") if i), r["class"]))
    return sorted(rows, key=lambda row: -len(row[0]))


@cache
def _classes() -> dict[str, tuple[str, ...]]:
    out = {}
    for r in read_csv("medication_classes.csv"):
        variables = tuple(v for v in r["variables"].split(";") if v)
        for v in variables:
            get_variable(v)
        out[r["class"]] = variables
    return out


@cache
def _intensity_rows() -> list[dict[str, str]]:
    return read_csv("statin_intensity.csv")


def statin_intensity(ingredient: str, daily_mg: float, extended_release: bool = False) -> str | None:
    """ACC/AHA 2018 intensity for a statin at a total daily dose, or None if the table has no row."""
    for row in _intensity_rows():
        if row["ingredient"] != ingredient:
            continue
        if row["formulation"] == "XL" and not extended_release:
            continue
        if float(row["min_daily_mg"]) <= daily_mg <= float(row["max_daily_mg"]):
            return row["intensity"]
    return None


def agent_of(substance: str) -> Agent | None:
    """The agent of a substance as written (salt, ", human", "-yfgn" suffixes ignored); longest name wins."""
    s = " ".join(substance.lower().replace(",", " ,").split()).replace(" ,", ",")
    best = None
    for name, agent in _agents().items():
        matches = s == name or (s.startswith(name) and s[len(name)] in " ,-")
        if matches and (best is None or len(name) > len(best.name)):
            best = agent
    return best


#: Dose forms that act locally: their agents are not systemic therapy (timolol eye drops treat no hypertension).
_LOCAL_FORMS = re.compile(r"ophthalmic|otic|topical|vaginal|dental|nasal", re.IGNORECASE)


def _from_components(parsed: ParsedName, code: str, basis: str) -> list[Ingredient]:
    out = []
    seen = set()
    local = bool(parsed.dose_form and _LOCAL_FORMS.search(parsed.dose_form))
    for comp in parsed.components:
        agent = agent_of(comp.substance)
        if agent is None or agent.name in seen:
            continue
        seen.add(agent.name)
        out.append(
            Ingredient(agent.name, "local_" + agent.drug_class if local else agent.drug_class, comp.mg_per_unit,
                       parsed.extended_release, code, comp.mg_per_ml, agent.rxcui or None, basis)
        )
    return out


def identify(concept: Any) -> list[Ingredient]:
    """Ingredients of a medication concept: RxNorm concept, RxNorm ingredient, ATC code, then display text."""
    rx, atc = norm_system(RXNORM), norm_system(ATC)
    cs = codings(concept)
    for system, code, _ in cs:
        if system == rx and code in _rxnorm():
            found = _from_components(parse_rxnorm_name(_rxnorm()[code]), f"{RXNORM}|{code}", "code")
            if found:
                return found
        if system == rx and code in _agents_by_rxcui():
            agent = _agents_by_rxcui()[code]
            text = concept_text(concept)
            parsed = parse_rxnorm_name(text) if text else None
            comp = next((c for c in parsed.components if agent_of(c.substance) == agent), None) if parsed else None
            return [
                Ingredient(agent.name, agent.drug_class, comp.mg_per_unit if comp else None,
                           bool(parsed and parsed.extended_release), f"{RXNORM}|{code}",
                           comp.mg_per_ml if comp else None, agent.rxcui, "ingredient code")
            ]
    for system, code, _ in cs:
        if system == atc:
            found = _from_atc(code.upper())
            if found:
                return found
    for system, code, display in cs:
        if display:
            found = _from_components(parse_rxnorm_name(display), f"{system}|{code}" if system else code,
                                     "display text")
            if found:
                return found
    text = str(concept.get("text") or "") if isinstance(concept, dict) else ""
    if text:
        return _from_components(parse_rxnorm_name(text), "text", "display text")
    return []


def _from_atc(code: str) -> list[Ingredient]:
    exact = _agents_by_atc().get(code)
    if exact is not None:
        return [Ingredient(exact.name, exact.drug_class, None, False, f"{ATC}|{code}", None,
                           exact.rxcui or None, "atc")]
    for prefix, names, cls in _atc_rows():
        if not code.startswith(prefix):
            continue
        if names:
            out = []
            for n in names:
                agent = _agents().get(n)
                if agent is not None:
                    out.append(Ingredient(agent.name, agent.drug_class, None, False, f"{ATC}|{code}", None,
                                          agent.rxcui or None, "atc"))
            return out
        return [Ingredient(f"atc:{code}", cls, None, False, f"{ATC}|{code}", None, None, "atc")]
    return []


# -- daily dose -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dose:
    """Total daily dose of one ingredient in mg, or why it is unknown."""

    mg: float | None
    note: str | None = None
    problem: tuple[LedgerKind, str] | None = None


def _per_day(dosage: dict[str, Any]) -> tuple[float | None, str | None]:
    timing = _dict(dosage.get("timing"))
    rep = _dict(timing.get("repeat"))
    freq = first_number([rep.get("frequency")])
    period = first_number([rep.get("period")])
    unit = rep.get("periodUnit")
    if freq is not None or period is not None or unit is not None:
        if freq is None and period is not None and unit in PERIOD_DAYS:
            freq = 1.0
        if freq is not None and period and unit in PERIOD_DAYS:
            return freq / (period * PERIOD_DAYS[unit]), None
        return None, "timing not readable as a frequency per period"
    for _, code, _ in codings(timing.get("code")):
        if code.upper() in TIMING_CODES:
            return TIMING_CODES[code.upper()], None
    return 1.0, "once daily assumed (no timing)"


def _dose_quantity(dosage: dict[str, Any]) -> dict[str, Any] | None:
    for dr in dosage.get("doseAndRate") or []:
        if isinstance(dr, dict) and isinstance(dr.get("doseQuantity"), dict):
            return dict(dr["doseQuantity"])
    return None


def daily_dose(dosages: Any, ingredient: Ingredient, n_ingredients: int) -> Dose:
    """Total daily dose in mg from dosage × frequency, else the product strength once a day (noted)."""
    items = [d for d in dosages if isinstance(d, dict)] if isinstance(dosages, list) else []
    dosage = items[0] if items else {}
    note = "first of several dosage instructions" if len(items) > 1 else None
    per_day, timing_note = _per_day(dosage)
    note = add_note(note, timing_note)
    dq = _dose_quantity(dosage)
    if dq is None or first_number([dq.get("value")]) is None:
        if per_day is None:
            return Dose(None, note)
        if ingredient.strength_mg is not None:
            return Dose(ingredient.strength_mg * per_day, add_note(note, "dose = product strength"))
        return Dose(None, note)
    if per_day is None:
        return Dose(None, note)
    amount = float(dq["value"])
    system = norm_system(dq.get("system"))
    code = str(dq.get("code") or "").strip()
    unit_text = str(dq.get("unit") or "").strip()
    ucum = system == norm_system(UCUM) or not system
    unit = code if code and ucum else ("" if system else unit_text)
    if not unit and system and not ucum:
        unit = unit_text
    low = unit.lower()
    if ucum and unit in MASS_MG:
        if n_ingredients == 1:
            return Dose(amount * MASS_MG[unit] * per_day, note)
        return Dose(None, add_note(note, "mass dose of a combination product: split unknown"))
    if ucum and unit.lower() == "ml":
        if ingredient.mg_per_ml is not None:
            return Dose(amount * ingredient.mg_per_ml * per_day, note)
        return Dose(None, note)
    if ucum and (unit in UCUM_UNIT_DOSE or (unit.startswith("{") and unit.endswith("}")) or not unit):
        if ingredient.strength_mg is not None:
            return Dose(amount * ingredient.strength_mg * per_day, note)
        return Dose(None, note)
    if ucum and unit in ACTIVITY_UNITS:
        return Dose(None, add_note(note, "dose in international units: no mass daily dose"))
    if low in WORD_UNIT_DOSE and ingredient.strength_mg is not None:
        return Dose(
            amount * ingredient.strength_mg * per_day,
            note,
            (LedgerKind.CONVERTED, f"dose unit {low!r} is not UCUM: read as one unit dose ({{tbl}})"),
        )
    shown = (code or unit_text or "(none)")[:20]
    why = f"dose unit {shown!r} is not a known UCUM unit: daily dose unknown"
    return Dose(None, note, (LedgerKind.UNKNOWN_UNIT, why))


# -- references, status, time ----------------------------------------------------------------------------


def _resolve(resource: dict[str, Any], ctx: Context) -> tuple[list[Ingredient], Any, SourceRef | None, str | None]:
    """Ingredients, the concept they came from, the referenced Medication's source and a note."""
    concept = resource.get("medicationCodeableConcept")
    if isinstance(concept, dict):
        return identify(concept), concept, None, None
    ref = _dict(resource.get("medicationReference"))
    target = ref.get("reference")
    if not isinstance(target, str) or not target.strip():
        if ref.get("display") or ref.get("identifier"):
            raise AdapterError("medicationReference without a literal reference: Medication not resolvable")
        raise AdapterError("no medicationCodeableConcept or medicationReference")
    target = target.strip()
    if target.startswith("#"):
        for med in resource.get("contained") or []:
            if isinstance(med, dict) and med.get("resourceType") == "Medication" and med.get("id") == target[1:]:
                ings, concept = _medication_ingredients(med)
                return ings, concept, None, None
        raise AdapterError("contained Medication not found")
    if target.startswith("urn:"):
        raise AdapterError("medicationReference is a urn: the referenced Medication is not in the input")
    parts = target.split("/")
    version = None
    if "_history" in parts:
        i = parts.index("_history")
        version = parts[i + 1] if i + 1 < len(parts) else None
        parts = parts[:i]
    if len(parts) < 2 or parts[-2] != "Medication":
        raise AdapterError("medicationReference does not point to a Medication")
    label = f"Medication/{parts[-1]}"
    med = ctx.index.get(label)
    if med is None:
        raise AdapterError("referenced Medication is not in the input")
    ctx.used.add(label)
    med_src = SourceRef.of(med)
    note = None
    if version is not None and med_src.version_id is not None and version != med_src.version_id:
        note = f"reference names version {version}; version {med_src.version_id} read"
    ings, concept = _medication_ingredients(med)
    return ings, concept, med_src, note


def _medication_ingredients(med: dict[str, Any]) -> tuple[list[Ingredient], dict[str, Any]]:
    """A Medication's ingredients: from its ``code``, else from ``ingredient[]`` (with their strengths)."""
    code = _dict(med.get("code"))
    found = identify(code)
    parsed_form = _dict(med.get("form"))
    xr = bool(_XR_TEXT.search(concept_text(parsed_form) + " " + concept_text(code)))
    items = [i for i in med.get("ingredient") or [] if isinstance(i, dict) and i.get("isActive") is not False]
    listed: list[Ingredient] = []
    for item in items:
        concept = item.get("itemCodeableConcept")
        if not isinstance(concept, dict):
            continue
        for ing in identify(concept):
            mg = _ratio_mg(item.get("strength"))
            listed.append(Ingredient(ing.name, ing.drug_class, ing.strength_mg if mg is None else mg,
                                     ing.extended_release or xr, ing.code, ing.mg_per_ml, ing.ingredient_code,
                                     "medication ingredient"))
    if found:
        # the code names the product; ingredient[] may still carry a strength the code does not
        by_name = {i.name: i for i in listed}
        merged = []
        for ing in found:
            other = by_name.get(ing.name)
            if ing.strength_mg is None and other is not None and other.strength_mg is not None:
                ing = Ingredient(ing.name, ing.drug_class, other.strength_mg, ing.extended_release or xr, ing.code,
                                 ing.mg_per_ml, ing.ingredient_code, ing.basis)
            merged.append(ing)
        found = merged
    else:
        found = list({i.name: i for i in listed}.values())
    label_concept = {
        "coding": list(code.get("coding") or [])
        + [c for i in items for c in ((i.get("itemCodeableConcept") or {}).get("coding") or [])],
    }
    return found, label_concept


def _ratio_mg(strength: Any) -> float | None:
    """mg per unit dose from a Medication.ingredient.strength Ratio (denominator one unit dose)."""
    if not isinstance(strength, dict):
        return None
    num = _dict(strength.get("numerator"))
    den = _dict(strength.get("denominator"))
    value = first_number([num.get("value")])
    unit = str(num.get("code") or num.get("unit") or "").strip()
    den_value = first_number([den.get("value")])
    den_unit = str(den.get("code") or den.get("unit") or "").strip().lower()
    if value is None or unit not in MASS_MG or den_value not in (None, 1.0):
        return None
    annotation = den_unit.startswith("{") and den_unit.endswith("}")
    if den_unit and den_unit not in WORD_UNIT_DOSE | {"1"} and not annotation:
        return None
    return value * MASS_MG[unit]


def _gate(resource: dict[str, Any], src: SourceRef, ctx: Context) -> str | None:
    """Status/intent rules; returns the status if the resource describes therapy, else ledgers why not."""
    status = resource.get("status")
    kind = resource.get("resourceType")
    if status == "entered-in-error":
        ctx.record(src, LedgerKind.ENTERED_IN_ERROR, f"{kind} entered-in-error: ignored")
        return None
    if kind == "MedicationRequest":
        if resource.get("doNotPerform") is True:
            ctx.record(src, LedgerKind.EXCLUDED, "doNotPerform: a prohibition, not therapy")
            return None
        if resource.get("intent") in ("proposal", "option"):
            ctx.record(src, LedgerKind.EXCLUDED, f"intent {resource.get('intent')}: suggestion, not therapy")
            return None
        ok = REQUEST_OK
    elif kind == "MedicationDispense":
        ok = DISPENSE_OK
    else:
        ok = STATEMENT_OK
    if status == "on-hold" and not ctx.options.on_hold_is_current:
        ctx.record(src, LedgerKind.EXCLUDED, "status on-hold: not counted (on_hold_is_current is off)")
        return None
    if status not in ok:
        ctx.record(src, LedgerKind.EXCLUDED, f"{kind} status {status}: not therapy")
        return None
    return str(status)


def _bounds(resource: dict[str, Any], key: str) -> Any:
    for d in resource.get("dosageInstruction") or []:
        rep = ((d or {}).get("timing") or {}).get("repeat") if isinstance(d, dict) else None
        if isinstance(rep, dict) and isinstance(rep.get("boundsPeriod"), dict) and rep["boundsPeriod"].get(key):
            return rep["boundsPeriod"][key]
    return None


def _times(resource: dict[str, Any]) -> tuple[TimePoint | None, TimePoint | None, str | None]:
    kind = resource.get("resourceType")
    notes: list[str | None] = []
    if kind == "MedicationDispense":
        start_t = first_time(resource, (("whenHandedOver",), ("whenPrepared",)))
        if start_t is None:
            return None, None, None
        if "whenHandedOver" not in resource:
            notes.append("whenPrepared used (no whenHandedOver)")
        notes.append(start_t.note)
        days = _supply_days(resource.get("daysSupply"))
        if days is None:
            notes.append("no daysSupply: episode of the hand-over day only")
            return start_t.value, start_t.value, add_note(*notes)
        end_v = _plus_days(start_t.value, days)
        notes.append(f"{days:g} days supplied")
        return start_t.value, end_v, add_note(*notes)
    if kind == "MedicationRequest":
        bstart, bend = _bounds(resource, "start"), _bounds(resource, "end")
        start_t = parse_time(bstart) if bstart else first_time(
            resource, (("dispenseRequest", "validityPeriod", "start"), ("authoredOn",))
        )
        end_t = parse_time(bend) if bend else first_time(resource, (("dispenseRequest", "validityPeriod", "end"),))
    else:
        start_t = first_time(resource, (("effectivePeriod", "start"), ("effectiveDateTime",), ("dateAsserted",)))
        end_t = first_time(resource, (("effectivePeriod", "end"),))
    note = add_note(start_t.note if start_t else None, end_t.note if end_t else None)
    return (start_t.value if start_t else None), (end_t.value if end_t else None), note


def _supply_days(q: Any) -> float | None:
    if not isinstance(q, dict):
        return None
    value = first_number([q.get("value")])
    unit = str(q.get("code") or q.get("unit") or "d").strip().lower()
    if value is None or value <= 0 or unit not in SUPPLY_DAYS:
        return None
    return value * SUPPLY_DAYS[unit]


def _plus_days(t: TimePoint, days: float) -> TimePoint:
    if isinstance(t, datetime):
        return t + timedelta(days=days)
    return t + timedelta(days=round(days))


def _identifier_losers(ctx: Context) -> dict[str, str]:
    """Medication resources that repeat another's business identifier -> the reference kept instead.

    Computed once per build over every input: the latest ``meta.lastUpdated`` (then version) wins.
    """
    cached = ctx.pending.get("medications:duplicate-identifiers")
    if cached:
        return dict(cached[0])
    groups: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = {}
    for label, res in ctx.index.items():
        if res.get("resourceType") not in MED_TYPES:
            continue
        for ident in res.get("identifier") or []:
            if isinstance(ident, dict) and ident.get("value") not in (None, ""):
                key = (str(res["resourceType"]), str(ident.get("system") or ""), str(ident["value"]))
                groups.setdefault(key, []).append((label, res))
    losers: dict[str, str] = {}
    for members in groups.values():
        labels = list(dict.fromkeys(label for label, _ in members))
        if len(labels) < 2:
            continue
        ranked = sorted(members, key=_recency, reverse=True)
        keep = ranked[0][0]
        for label in labels:
            if label != keep:
                losers.setdefault(label, keep)
    ctx.pending["medications:duplicate-identifiers"] = [losers]
    return losers


def _recency(item: tuple[str, dict[str, Any]]) -> tuple[str, int]:
    meta = _dict(item[1].get("meta"))
    vid = str(meta.get("versionId") or "")
    return (str(meta.get("lastUpdated") or ""), int(vid) if vid.isdigit() else -1)


# -- the adapter -----------------------------------------------------------------------------------------


def adapt_medication(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Episode Evidence from a MedicationRequest, MedicationStatement or MedicationDispense.

    on_* flags by class; for statins also statin_agent, statin_daily_dose_mg and statin_intensity.
    """
    status = _gate(resource, src, ctx)
    if status is None:
        return []
    kept = _identifier_losers(ctx).get(src.unversioned)
    if kept is not None:
        ctx.record(src, LedgerKind.DUPLICATE, f"same business identifier as {kept}: not used")
        return []
    ingredients, concept, med_src, ref_note = _resolve(resource, ctx)
    if not ingredients:
        ctx.record(src, LedgerKind.UNMAPPED, f"no known ingredient for medication {code_label(concept)}")
        return []
    start, stop, time_note = _times(resource)
    if start is None:
        ctx.record(src, LedgerKind.MISSING_TIME, "no start time (bounds/validity/authoredOn/effective/handed over)")
        return []
    time_note = add_note(ref_note, time_note)
    end: TimePoint | None = None
    if resource.get("resourceType") == "MedicationDispense":
        end = stop
    elif status in ENDED:
        if stop is not None:
            end = stop
        else:
            end = start
            time_note = add_note(time_note, f"{status} without stop date: not counted as current")
    if end is not None and to_instant(end) < to_instant(start):
        ctx.record(src, LedgerKind.MALFORMED, "stopped before it started (end before start): episode not used")
        return []
    if any(i.basis == "display text" for i in ingredients):
        time_note = add_note(time_note, "drug read from its display text (code not in fhirtwin's tables)")
    dosages = resource.get("dosageInstruction") if "dosageInstruction" in resource else resource.get("dosage")
    derived = (med_src,) if med_src else ()
    out: dict[str, Evidence] = {}
    unmapped = []
    problems: set[tuple[LedgerKind, str, str | None]] = set()
    for ing in ingredients:
        variables = _classes().get(ing.drug_class, ())
        if not variables:
            unmapped.append(ing.drug_class)
            continue
        dose = daily_dose(dosages, ing, len(ingredients))
        mg = dose.mg
        note = add_note(time_note, dose.note)
        is_statin = ing.drug_class == "statin"
        if dose.problem is not None:
            problems.add((*dose.problem, "statin_daily_dose_mg" if is_statin else None))
        for variable in variables:
            if variable not in out:
                out[variable] = _episode(variable, True, src, status, (start, end), ing, mg, note, derived)
        if not is_statin or "statin_agent" in out or ing.name.startswith("atc:"):
            continue
        out["statin_agent"] = _episode("statin_agent", ing.name, src, status, (start, end), ing, mg, note, derived,
                                       code=ing.ingredient_code and f"{RXNORM}|{ing.ingredient_code}")
        if mg is not None:
            out["statin_daily_dose_mg"] = _episode(
                "statin_daily_dose_mg", round(mg, 3), src, status, (start, end), ing, mg, note, derived, unit="mg/d"
            )
        level = statin_intensity(ing.name, mg, ing.extended_release) if mg is not None else None
        if level is None:
            if dose.problem is None or dose.problem[0] is not LedgerKind.UNKNOWN_UNIT:
                why = "no daily dose" if mg is None else "daily dose not in the ACC/AHA 2018 table"
                problems.add((LedgerKind.UNKNOWN_DOSE, f"{ing.name}: {why}; intensity unknown", "statin_intensity"))
        else:
            out["statin_intensity"] = _episode(
                "statin_intensity", level, src, status, (start, end), ing, mg, note, derived
            )
    for kind, message, target in sorted(problems, key=str):
        ctx.record(src, kind, message, target)
    if unmapped and not out:
        ctx.record(src, LedgerKind.UNMAPPED, f"drug class {','.join(sorted(set(unmapped)))} has no twin variable")
    return list(out.values())


def _episode(
    variable: str,
    value: bool | str | float,
    src: SourceRef,
    status: str,
    span: tuple[TimePoint, TimePoint | None],
    ing: Ingredient,
    mg: float | None,
    note: str | None,
    derived: tuple[SourceRef, ...],
    *,
    code: str | None = None,
    unit: str | None = None,
) -> Evidence:
    var = get_variable(variable)
    start, end = span
    dose = f"{ing.name} {mg:g} mg/d" if mg is not None else ing.name
    return Evidence(
        variable=variable,
        scale=var.scale,
        value=value,
        unit=unit,
        time=start,
        source=src,
        status=status,
        original_value=mg,
        original_unit="mg/d" if mg is not None else None,
        note=add_note(dose, note),
        code=code or ing.code,
        end=end,
        derived_from=derived,
    )


__all__ = [
    "ATC",
    "Agent",
    "Component",
    "Dose",
    "Ingredient",
    "ParsedName",
    "adapt_medication",
    "agent_of",
    "daily_dose",
    "identify",
    "parse_rxnorm_name",
    "statin_intensity",
]


#: One statin at a time: every statin variable's episodes end when the next statin prescription starts.
STATIN_VARIABLES = ("on_statin", "statin_agent", "statin_daily_dose_mg", "statin_intensity")


def one_statin_at_a_time(evidence: list[Evidence], ctx: Context) -> list[Evidence]:
    """A newer statin order replaces an earlier one still marked active (nobody takes two statins).

    EHRs often leave the earlier order ``active`` when the dose is changed; read literally, the patient
    would be on both, and agent, dose and intensity could come from different orders. Each earlier
    episode is closed at the start of the next one (a note says so), so all four variables describe the
    same, latest order.
    """
    # only an order still open replaces earlier ones: a later order that was itself stopped (a trial of
    # another statin) leaves the earlier, still-active one in place
    starts = sorted({to_instant(ev.time) for ev in evidence
                     if ev.variable == "on_statin" and ev.value is True and ev.end is None})
    if not starts:
        return evidence
    out: list[Evidence] = []
    closed: set[str] = set()
    for ev in evidence:
        if ev.variable in STATIN_VARIABLES:
            begin = to_instant(ev.time)
            later = next((s for s in starts if s > begin), None)
            if later is not None and (ev.end is None or to_instant(ev.end) > later):
                ev = replace(ev, end=later, note=add_note(ev.note, "replaced by a later statin order"))
                if ev.source.reference not in closed:
                    closed.add(ev.source.reference)
                    ctx.record(ev.source, LedgerKind.DERIVED, "statin order still active when a later one "
                               "started: ended at the later order's start", ev.variable)
        out.append(ev)
    return out
