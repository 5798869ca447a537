"""Patient adapter: administrative sex, birth date (for age only), US Core race, deceased.

The birth date never leaves the Demographics object except through explicit serialisation, and is
never put in a ledger message or log line.
"""

from __future__ import annotations

from datetime import date
from functools import cache
from typing import Any

from fhirtwin.adapters._common import AdapterError, Context, parse_time, read_csv
from fhirtwin.twin import Demographics, LedgerKind, SourceRef

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
SEXES = {"female", "male", "other", "unknown"}


@cache
def _race_table() -> dict[str, str]:
    return {r["omb_code"]: r["race"] for r in read_csv("race_codes.csv")}


def _race(resource: dict[str, Any], src: SourceRef, ctx: Context) -> str | None:
    codes: list[str] = []
    declared = False
    for ext in resource.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != US_CORE_RACE:
            continue
        for sub in ext.get("extension") or []:
            if not isinstance(sub, dict):
                continue
            if sub.get("url") == "ombCategory":
                coding = sub.get("valueCoding") or {}
                if isinstance(coding, dict) and coding.get("code"):
                    codes.append(str(coding["code"]))
            elif sub.get("url") in ("detailed", "text"):
                declared = True
    table = _race_table()
    if any(c not in table for c in codes):
        ctx.record(src, LedgerKind.UNMAPPED, "race: unknown OMB category code")
    groups = {table[c] for c in codes if table.get(c)}
    if len(groups) == 1:
        return groups.pop()
    if groups or (declared and not codes):
        return "other"
    return None


def _birth_date(text: Any, src: SourceRef, ctx: Context) -> date | None:
    if text is None:
        return None
    parsed = parse_time(text)
    value = parsed.value
    if not isinstance(value, date):
        raise AdapterError("birthDate is not a date")
    if parsed.note:
        # A partial birth date biases age; mid-period is the least biased fill (recorded, not silent).
        ctx.record(src, LedgerKind.DERIVED, "partial birthDate: missing month/day filled with mid-period")
        length = len(str(text).strip())
        value = date(value.year, 7, 1) if length == 4 else date(value.year, value.month, 15)
    return value


#: US Core sex extensions the equations' "sex" is read from, before administrative gender: birth sex (US Core
#: 3-6, valueCode F/M) and individual sex (US Core 7+, valueCoding SNOMED CT 248152002 Female / 248153007 Male).
BIRTH_SEX_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
INDIVIDUAL_SEX_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex"
_BIRTH_SEX = {"F": "female", "M": "male"}
_INDIVIDUAL_SEX = {"248152002": "female", "248153007": "male"}


def _recorded_sex(resource: dict[str, Any]) -> tuple[str | None, str | None]:
    """(sex, which extension said so) from the US Core sex extensions, else (None, None)."""
    for ext in resource.get("extension") or []:
        if not isinstance(ext, dict):
            continue
        if ext.get("url") == BIRTH_SEX_URL and ext.get("valueCode") in _BIRTH_SEX:
            return _BIRTH_SEX[ext["valueCode"]], "US Core birth sex"
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == INDIVIDUAL_SEX_URL:
            coding = ext.get("valueCoding")
            code = coding.get("code") if isinstance(coding, dict) else None
            if isinstance(code, str) and code in _INDIVIDUAL_SEX:
                return _INDIVIDUAL_SEX[code], "US Core individual sex"
    return None, None


def adapt_patient(resource: dict[str, Any], src: SourceRef, ctx: Context) -> Demographics:
    """Demographics from a Patient resource (raises AdapterError if it is unreadable).

    The equations' sex is the sex the risk cohorts recorded: the US Core birth-sex or individual-sex
    extension when present (US Core 7+ may send no administrative gender at all), else ``gender``.
    """
    gender = resource.get("gender")
    if gender is not None and gender not in SEXES:
        ctx.record(src, LedgerKind.MALFORMED, "gender is not an administrative-gender code")
        gender = None
    recorded, where = _recorded_sex(resource)
    if recorded is not None and recorded != gender:
        ctx.record(src, LedgerKind.DERIVED, f"sex for the risk equations from the {where} extension"
                   + (" (administrative gender differs)" if gender in ("female", "male") else ""))
        gender = recorded
    deceased: bool | None = None
    deceased_time = None
    if isinstance(resource.get("deceasedBoolean"), bool):
        deceased = resource["deceasedBoolean"]
    elif resource.get("deceasedDateTime") is not None:
        deceased = True
        deceased_time = parse_time(resource["deceasedDateTime"]).value
    return Demographics(
        sex=gender,
        birth_date=_birth_date(resource.get("birthDate"), src, ctx),
        race=_race(resource, src, ctx),
        deceased=deceased,
        deceased_time=deceased_time,
        source=src,
    )
