"""Medication adapter: MedicationRequest / MedicationStatement -> treatment episodes by drug class.

RxNorm product or ingredient codes (or, failing those, the ingredient name in the text) give the
ingredient(s); the class table gives the twin variables (on_statin, on_bp_treatment, ...); statin
intensity comes from the ACC/AHA 2018 table by total daily dose. Status rules follow fhirtwin's FHIR
reference §3.3; each episode runs from start to stop (open while active).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirtwin.adapters._common import (
    RXNORM,
    AdapterError,
    Context,
    add_note,
    code_label,
    codings,
    concept_text,
    first_number,
    first_time,
    norm_system,
    read_csv,
)
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable

#: FHIR Timing.repeat.periodUnit (UCUM) in days.
PERIOD_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.4375, "a": 365.25}
#: HL7 v3 GTSAbbreviation timing codes (Timing.code) -> administrations per day.
TIMING_CODES = {"QD": 1.0, "BID": 2.0, "TID": 3.0, "QID": 4.0, "QOD": 0.5, "AM": 1.0, "PM": 1.0, "QHS": 1.0}
UNIT_DOSE = {"{tbl}", "tbl", "tab", "tablet", "tablets", "{tablet}", "{tablets}", "cap", "capsule", "{capsule}", "1"}
REQUEST_CURRENT = {"active"}
ENDED = {"completed", "stopped"}
_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*mg\b", re.IGNORECASE)


@dataclass(frozen=True)
class Ingredient:
    """One ingredient of a medication, with its strength per unit dose if known."""

    name: str
    drug_class: str
    strength_mg: float | None
    extended_release: bool
    code: str


@cache
def _ingredients() -> dict[str, tuple[str, str]]:
    return {r["rxcui"]: (r["ingredient"], r["class"]) for r in read_csv("medication_ingredients.csv")}


@cache
def _class_by_name() -> dict[str, str]:
    return {name: cls for name, cls in _ingredients().values()}


@cache
def _products() -> dict[str, list[tuple[str, float]]]:
    out = {}
    for r in read_csv("medication_products.csv"):
        names = r["ingredients"].split(";")
        strengths = [float(s) for s in r["strengths_mg"].split(";")]
        out[r["rxcui"]] = list(zip(names, strengths, strict=True))
    return out


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


def identify(concept: Any) -> list[Ingredient]:
    """Ingredients of a medication concept: product table, ingredient table, then text fallback."""
    text = concept_text(concept).lower()
    xr = any(k in text for k in ("extended release", " xl", "24 hr", "er oral"))
    rx = norm_system(RXNORM)
    for system, code, _ in codings(concept):
        if system != rx:
            continue
        if code in _products():
            return [
                Ingredient(name, _class_by_name()[name], strength, xr, f"{RXNORM}|{code}")
                for name, strength in _products()[code]
            ]
        if code in _ingredients():
            name, cls = _ingredients()[code]
            return [Ingredient(name, cls, _strength_after(text, name), xr, f"{RXNORM}|{code}")]
    found = []
    for name, cls in _class_by_name().items():
        if re.search(rf"\b{name}\b", text):
            found.append(Ingredient(name, cls, _strength_after(text, name), xr, f"text:{name}"))
    return found


def _strength_after(text: str, name: str) -> float | None:
    idx = text.find(name)
    if idx < 0:
        return None
    m = _STRENGTH.search(text, idx)
    return float(m.group(1)) if m else None


def _per_day(dosage: dict[str, Any]) -> tuple[float, str | None]:
    timing = dosage.get("timing") or {}
    rep = timing.get("repeat") or {}
    freq = first_number([rep.get("frequency")])
    period = first_number([rep.get("period")])
    unit = rep.get("periodUnit")
    if freq is not None and period and unit in PERIOD_DAYS:
        return freq / (period * PERIOD_DAYS[unit]), None
    for _, code, _ in codings(timing.get("code")):
        if code.upper() in TIMING_CODES:
            return TIMING_CODES[code.upper()], None
    return 1.0, "once daily assumed (no timing)"


def daily_dose(dosages: Any, ingredient: Ingredient, n_ingredients: int) -> tuple[float | None, str | None]:
    """Total daily dose in mg from dosage instructions, else the product strength once a day."""
    dosage = dosages[0] if isinstance(dosages, list) and dosages and isinstance(dosages[0], dict) else {}
    per_day, note = _per_day(dosage)
    dq = None
    for dr in dosage.get("doseAndRate") or []:
        if isinstance(dr, dict) and isinstance(dr.get("doseQuantity"), dict):
            dq = dr["doseQuantity"]
            break
    if dq is not None and first_number([dq.get("value")]) is not None:
        amount = float(dq["value"])
        unit = str(dq.get("code") or dq.get("unit") or "").strip()
        if unit.lower() == "mg" and n_ingredients == 1:
            return amount * per_day, note
        if unit.lower() == "g" and n_ingredients == 1:
            return amount * 1000 * per_day, note
        if (unit.lower() in UNIT_DOSE or not unit) and ingredient.strength_mg is not None:
            return amount * ingredient.strength_mg * per_day, note
        return None, None
    if ingredient.strength_mg is not None:
        return ingredient.strength_mg * per_day, add_note(note, "dose = product strength")
    return None, None


def _resolve_concept(resource: dict[str, Any], ctx: Context) -> tuple[Any, SourceRef | None]:
    if isinstance(resource.get("medicationCodeableConcept"), dict):
        return resource["medicationCodeableConcept"], None
    ref = (resource.get("medicationReference") or {}).get("reference")
    if not isinstance(ref, str):
        raise AdapterError("no medicationCodeableConcept or medicationReference")
    if ref.startswith("#"):
        for med in resource.get("contained") or []:
            if isinstance(med, dict) and med.get("resourceType") == "Medication" and med.get("id") == ref[1:]:
                return _medication_concept(med), None
        raise AdapterError("contained Medication not found")
    target = "/".join(ref.split("/_history")[0].split("/")[-2:])
    med = ctx.index.get(target)
    if med is None:
        raise AdapterError("referenced Medication is not in the input")
    ctx.used.add(target)
    return _medication_concept(med), SourceRef.of(med)


def _medication_concept(med: dict[str, Any]) -> dict[str, Any]:
    """A Medication's code, plus its ingredient codes so that combinations are found."""
    code = dict(med.get("code") or {})
    extra = list(code.get("coding") or [])
    texts = [str(code.get("text") or "")]
    for ing in med.get("ingredient") or []:
        item = (ing or {}).get("itemCodeableConcept") or {}
        extra.extend(item.get("coding") or [])
        texts.append(concept_text(item))
    return {"coding": extra, "text": " ".join(t for t in texts if t)}


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
        ok = {"active", "on-hold", "completed", "stopped"}
    else:
        ok = {"active", "on-hold", "completed", "stopped"}
    if status == "on-hold" and not ctx.options.on_hold_is_current:
        ctx.record(src, LedgerKind.EXCLUDED, "status on-hold: not counted (on_hold_is_current is off)")
        return None
    if status not in ok:
        ctx.record(src, LedgerKind.EXCLUDED, f"{kind} status {status}: not therapy")
        return None
    return str(status)


def _times(resource: dict[str, Any]) -> tuple[TimePoint | None, TimePoint | None, str | None]:
    if resource.get("resourceType") == "MedicationRequest":
        start = first_time(resource, (("dispenseRequest", "validityPeriod", "start"), ("authoredOn",)))
        end = first_time(resource, (("dispenseRequest", "validityPeriod", "end"),))
    else:
        start = first_time(resource, (("effectiveDateTime",), ("effectivePeriod", "start"), ("dateAsserted",)))
        end = first_time(resource, (("effectivePeriod", "end"),))
    note = add_note(start.note if start else None, end.note if end else None)
    return (start.value if start else None), (end.value if end else None), note


def adapt_medication(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Episode Evidence (on_* flags, statin_intensity) from a MedicationRequest or MedicationStatement."""
    status = _gate(resource, src, ctx)
    if status is None:
        return []
    concept, med_src = _resolve_concept(resource, ctx)
    ingredients = identify(concept)
    if not ingredients:
        ctx.record(src, LedgerKind.UNMAPPED, f"no known ingredient for medication {code_label(concept)}")
        return []
    start, stop, time_note = _times(resource)
    if start is None:
        ctx.record(src, LedgerKind.MISSING_TIME, "no start time (validityPeriod/authoredOn/effective/dateAsserted)")
        return []
    end: TimePoint | None = None
    if status in ENDED:
        if stop is not None:
            end = stop
        else:
            end = start
            time_note = add_note(time_note, f"{status} without stop date: not counted as current")
    dosages = resource.get("dosageInstruction") if "dosageInstruction" in resource else resource.get("dosage")
    derived = (med_src,) if med_src else ()
    out: dict[str, Evidence] = {}
    unmapped = []
    for ing in ingredients:
        variables = _classes().get(ing.drug_class, ())
        if not variables:
            unmapped.append(ing.drug_class)
            continue
        mg, dose_note = daily_dose(dosages, ing, len(ingredients))
        note = add_note(time_note, dose_note)
        for variable in variables:
            if variable in out:
                continue
            out[variable] = _episode(variable, True, src, status, (start, end), ing, mg, note, derived)
        if ing.drug_class == "statin":
            level = statin_intensity(ing.name, mg, ing.extended_release) if mg is not None else None
            if level is None:
                why = "no daily dose" if mg is None else "daily dose not in the ACC/AHA 2018 table"
                ctx.record(src, LedgerKind.UNKNOWN_DOSE, f"{ing.name}: {why}; intensity unknown", "statin_intensity")
            else:
                out["statin_intensity"] = _episode(
                    "statin_intensity", level, src, status, (start, end), ing, mg, note, derived
                )
    if unmapped and not out:
        ctx.record(src, LedgerKind.UNMAPPED, f"drug class {','.join(sorted(set(unmapped)))} has no twin variable")
    return list(out.values())


def _episode(
    variable: str,
    value: bool | str,
    src: SourceRef,
    status: str,
    span: tuple[TimePoint, TimePoint | None],
    ing: Ingredient,
    mg: float | None,
    note: str | None,
    derived: tuple[SourceRef, ...],
) -> Evidence:
    var = get_variable(variable)
    start, end = span
    dose = f"{ing.name} {mg:g} mg/d" if mg is not None else ing.name
    return Evidence(
        variable=variable,
        scale=var.scale,
        value=value,
        unit=None,
        time=start,
        source=src,
        status=status,
        original_value=mg,
        original_unit="mg/d" if mg is not None else None,
        note=add_note(dose, note),
        code=ing.code,
        end=end,
        derived_from=derived,
    )
