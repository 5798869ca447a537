"""Condition adapter: clinical concepts by value set membership -> condition flags as episodes.

Concepts (myocardial infarction, coronary heart disease, diabetes, CKD, pregnancy, ...) are versioned
value sets in ``data/valuesets/*.json``: published VSAC expansions taken from the eCQMs that use them
(each file cites OID, version, measure and expansion date), a few documented local additions, and a
few small local sets where no published one exists. A coding maps when (system, code) is a member:

* codes are normalised: ICD-10-CM, WHO ICD-10, ICD-10-PCS, CPT and HCPCS ignore dots and case;
  SNOMED CT codes match exactly (no subsumption offline);
* a WHO ICD-10 coding matches an ICD-10-CM member with the same code (the shared 3-4 character codes
  mean the same in both); WHO-only codes map nowhere;
* prefix matching only where a value set lists an ICD category with ``"descendants": true`` (local
  additions such as I70.2 or I22); published members match exactly;
* each file's ``fhirtwin.variables`` names the twin variables a member sets; a member's ``property``
  adds or overrides per-code values (``ckd_stage``, ``diabetes_type``);
* ``established_ascvd`` is derived: any of myocardial infarction, coronary heart disease, angina,
  coronary revascularisation, ischaemic stroke, TIA, cerebrovascular disease, atherosclerosis or PAD.

Codes with no value set yet (atrial fibrillation, air-pollution exposure) stay in
``condition_codes.csv`` with the same matching rules.

clinicalStatus and verificationStatus are modifiers (fhirtwin FHIR reference §2.2): refuted and
entered-in-error are dropped and recorded; suspected diagnoses are not counted unless configured;
active/recurrence/relapse are current; inactive/remission/resolved are kept as history with an end.
Whether an ended episode still counts is the variable's ``temporal`` rule (e.g. prior_mi is "history").
A value set may bound an open episode (``episode_days``: pregnancy ends 301 days after onset).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from importlib import resources
from typing import Any

from fhirtwin.adapters._common import (
    ICD10,
    ICD10CM,
    SNOMED,
    AdapterError,
    Context,
    add_note,
    code_label,
    codings,
    first_time,
    norm_system,
    read_csv,
    read_json,
    system_uri,
)
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, get_variable, to_instant

CURRENT = {"active", "recurrence", "relapse"}
ENDED = {"inactive", "remission", "resolved"}
SUSPECTED = {"unconfirmed", "provisional", "differential"}

ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"

#: Systems compared as one family (normalised URI -> family key).
_FAMILY = {
    norm_system(ICD10CM): "icd10",
    norm_system(ICD10): "icd10",
    norm_system(ICD10PCS): "icd10pcs",
    norm_system("http://www.icd10data.com/icd10pcs"): "icd10pcs",
    norm_system(CPT): "cpt",
    norm_system(HCPCS): "hcpcs",
    "urn:oid:2.16.840.1.113883.6.285": "hcpcs",
    norm_system(SNOMED): "snomed",
}
_UPPER = {"icd10", "icd10pcs", "cpt", "hcpcs"}

#: The parts of established ASCVD (CMS347 "clinical ASCVD"; 2018 AHA/ACC cholesterol guideline).
ASCVD_PARTS = (
    "prior_mi",
    "coronary_heart_disease",
    "angina",
    "coronary_revascularisation",
    "prior_stroke",
    "tia",
    "cerebrovascular_disease",
    "atherosclerotic_disease",
    "peripheral_arterial_disease",
)
ESTABLISHED_ASCVD = "established_ascvd"

VALUESET_DIR = "valuesets"


def code_key(system: str, code: str) -> tuple[str, str]:
    """(family, normalised code): ICD/CPT/HCPCS without dots and in upper case, SNOMED as is."""
    sys_norm = norm_system(system)
    family = _FAMILY.get(sys_norm, sys_norm)
    code = code.strip()
    if family in _UPPER:
        code = code.replace(".", "").upper()
    return family, code


@dataclass(frozen=True)
class Member:
    """One value set member (or CSV row) and the twin values it sets."""

    valueset: str
    system: str
    code: str
    values: tuple[tuple[str, str], ...]
    resource_types: frozenset[str]
    descendants: bool = False
    episode_days: int | None = None


@dataclass(frozen=True)
class Index:
    """Exact members by (family, code) and category members (descendants included) by family."""

    exact: dict[tuple[str, str], tuple[Member, ...]]
    prefix: dict[str, tuple[Member, ...]]


def valueset_names() -> list[str]:
    """File names of the shipped value sets."""
    folder = resources.files("fhirtwin.adapters").joinpath("data", VALUESET_DIR)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))


def load_valueset(name: str) -> dict[str, Any]:
    """One value set file as JSON."""
    data = read_json(f"{VALUESET_DIR}/{name}")
    if not isinstance(data, dict) or data.get("resourceType") != "ValueSet":
        raise ValueError(f"{name}: not a ValueSet")
    return data


def _flag(value: str | None) -> str:
    # "" is the flag convention of map_codes (Evidence value True); "true" in a property means the same
    return "" if value in (None, "true") else str(value)


def _members_of(name: str, data: dict[str, Any]) -> list[Member]:
    meta = data["fhirtwin"]
    base = {var: _flag(val) for var, val in meta["variables"].items()}
    types = frozenset(meta["resources"])
    days = meta.get("episode_days")
    out = []
    entries = list(data["expansion"]["contains"]) + list(meta.get("local_additions", []))
    for entry in entries:
        values = dict(base)
        for prop in entry.get("property", []):
            values[prop["code"]] = _flag(prop["valueString"])
        for var in values:
            get_variable(var)
        family, code = code_key(entry["system"], entry["code"])
        out.append(
            Member(name, family, code, tuple(sorted(values.items())), types, bool(entry.get("descendants")), days)
        )
    return out


def _csv_members() -> list[Member]:
    rows = []
    for r in read_csv("condition_codes.csv"):
        get_variable(r["variable"])
        family, code = code_key(system_uri(r["system"]), r["code"])
        rows.append(
            Member(
                "condition_codes.csv",
                family,
                code,
                ((r["variable"], r["value"]),),
                frozenset({"Condition"}),
                r["match"] == "prefix",
            )
        )
    return rows


@cache
def _index() -> Index:
    exact: dict[tuple[str, str], list[Member]] = {}
    prefix: dict[str, list[Member]] = {}
    members = [m for name in valueset_names() for m in _members_of(name, load_valueset(name))]
    for m in members + _csv_members():
        if m.descendants:
            prefix.setdefault(m.system, []).append(m)
        else:
            exact.setdefault((m.system, m.code), []).append(m)
    return Index({k: tuple(v) for k, v in exact.items()}, {k: tuple(v) for k, v in prefix.items()})


@dataclass(frozen=True)
class Match:
    """What one concept maps to for one variable."""

    value: str
    code: str
    episode_days: int | None
    valueset: str


def coded_concepts(resource: dict[str, Any], resource_type: str, ctx: Context, src: SourceRef,
                   unmapped: str) -> dict[str, Match]:
    """The mapped concepts of ``resource.code``; none -> an UNMAPPED ledger entry (``unmapped`` + the code).

    A resource without a code is malformed for these types (AdapterError).
    """
    if not isinstance(resource.get("code"), dict):
        raise AdapterError(f"{resource_type} has no code")
    mapped = map_concepts(resource["code"], resource_type)
    if not mapped:
        ctx.record(src, LedgerKind.UNMAPPED, f"{unmapped} {code_label(resource['code'])}")
    return mapped


def map_concepts(concept: Any, resource_type: str = "Condition") -> dict[str, Match]:
    """variable -> Match for every coding of a CodeableConcept (exact members win over categories)."""
    found: dict[str, tuple[int, Match]] = {}
    index = _index()
    for system, code, _ in codings(concept):
        key = code_key(system, code)
        hits = [(1000, m) for m in index.exact.get(key, ())]
        hits += [(len(m.code), m) for m in index.prefix.get(key[0], ()) if key[1].startswith(m.code)]
        for rank, m in hits:
            if resource_type not in m.resource_types:
                continue
            for var, val in m.values:
                match = Match(val, f"{system}|{code}", m.episode_days, m.valueset)
                old = found.get(var)
                # more specific first (exact over category, longer category); ties resolved deterministically
                if old is None or (-rank, val, m.valueset) < (-old[0], old[1].value, old[1].valueset):
                    found[var] = (rank, match)
    out = {var: match for var, (_, match) in found.items()}
    parts = [out[v] for v in ASCVD_PARTS if v in out]
    if parts:
        out[ESTABLISHED_ASCVD] = Match("", parts[0].code, None, parts[0].valueset)
    return out


def map_codes(concept: Any) -> dict[str, tuple[str, str]]:
    """variable -> (value, matched system|code) for a Condition code ("" = flag true)."""
    return {var: (m.value, m.code) for var, m in map_concepts(concept, "Condition").items()}


def _status(concept: Any, system: str) -> str | None:
    uri = system_uri(f"http://terminology.hl7.org/CodeSystem/{system}")
    for s, c, _ in codings(concept):
        if s == uri or not s:
            return c
    return None


def flag_value(value: str) -> str | bool:
    """Evidence value of a mapped value ("" = flag true)."""
    return value if value else True


def adapt_condition(resource: dict[str, Any], src: SourceRef, ctx: Context) -> list[Evidence]:
    """Episode Evidence for every variable the Condition's codes map to."""
    verification = _status(resource.get("verificationStatus"), "condition-ver-status")
    clinical = _status(resource.get("clinicalStatus"), "condition-clinical")
    if verification == "entered-in-error":
        ctx.record(src, LedgerKind.ENTERED_IN_ERROR, "verificationStatus entered-in-error: ignored")
        return []
    if verification == "refuted":
        ctx.record(src, LedgerKind.REFUTED, "verificationStatus refuted: ignored")
        return []
    if verification in SUSPECTED and not ctx.options.count_suspected_conditions:
        ctx.record(src, LedgerKind.EXCLUDED, f"verificationStatus {verification}: suspected, not counted")
        return []
    mapped = coded_concepts(resource, "Condition", ctx, src, "no twin flag for code")
    if not mapped:
        return []
    onset = first_time(resource, (("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",)))
    if onset is None:
        ctx.record(src, LedgerKind.MISSING_TIME, "no onsetDateTime/onsetPeriod/recordedDate")
        return []
    abatement = first_time(resource, (("abatementDateTime",), ("abatementPeriod", "end"), ("abatementPeriod", "start")))
    end: TimePoint | None = None
    note = onset.note
    if clinical in ENDED or (clinical is None and (abatement or resource.get("abatementBoolean") is True)):
        if abatement is not None:
            end = abatement.value
        else:
            recorded = first_time(resource, (("recordedDate",),))
            end = recorded.value if recorded and to_instant(recorded.value) > to_instant(onset.value) else onset.value
            note = add_note(note, f"{clinical or 'abated'} without abatement date: ended at recording")
    elif clinical is not None and clinical not in CURRENT:
        ctx.record(src, LedgerKind.MALFORMED, "clinicalStatus is not a condition-clinical code")
        return []
    elif clinical is None:
        note = add_note(note, "no clinicalStatus: read as active")
    status = f"{clinical or 'unknown'}/{verification or 'confirmed'}"
    out = []
    for variable, match in sorted(mapped.items()):
        var = get_variable(variable)
        var_end, var_note = end, note
        if var_end is None and match.episode_days is not None:
            var_end = onset.value + timedelta(days=match.episode_days)
            var_note = add_note(note, f"open episode bounded at {match.episode_days} days ({match.valueset})")
        out.append(
            Evidence(
                variable=variable,
                scale=var.scale,
                value=flag_value(match.value),
                unit=None,
                time=onset.value,
                source=src,
                status=status,
                original_value=match.code,
                note=var_note,
                code=match.code,
                end=var_end,
            )
        )
    return out
