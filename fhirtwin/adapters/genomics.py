"""Genomics adapter: Genomics Reporting IG (STU1-STU3) Observations and R4 MolecularSequence.

Findings (variants, genotypes, haplotypes) and implications (diagnostic, therapeutic) are separate
resources linked by ``derivedFrom``, so this adapter reads all genomic resources of a patient together.
Components are matched by code, never by slice name; both HGNC system URIs and both therapeutic
implication codes are accepted (fhirtwin FHIR reference §4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhirtwin.adapters._common import (
    OBSERVATION_TIME_PATHS,
    Context,
    add_note,
    code_label,
    codings,
    concept_text,
    first_time,
    iter_components,
    norm_system,
    observation_status_gate,
    read_json,
    reference_target,
    system_uri,
)
from fhirtwin.adapters._quantity import quantity_evidence
from fhirtwin.twin import Evidence, LedgerKind, SourceRef, TimePoint, Value, get_variable, to_instant

_DIPLOTYPE = re.compile(r"(\*\d+[A-Z]?)\s*/\s*(\*\d+[A-Z]?)")
_APOL1_GENOTYPE = re.compile(r"\bG([012])\s*/\s*G([012])\b")


@cache
def tables() -> dict[str, Any]:
    """The genomics mapping tables (``data/genomics.json``)."""
    return read_json("genomics.json")


@cache
def _keyset(section: str, group: str) -> frozenset[tuple[str, str]]:
    """The (normalised system, code) pairs of one code group, built once."""
    out = set()
    for item in tables()[section][group]:
        system, code = item.split("|", 1)
        out.add((system_uri(system), code))
    return frozenset(out)


def _is(concept: Any, group: str, section: str = "codes") -> bool:
    keys = _keyset(section, group)
    return any((s, c) in keys for s, c, _ in codings(concept))


def _answer(concept: Any, table: str) -> str | None:
    mapping = tables()[table]
    for _, code, _ in codings(concept):
        if code in mapping:
            return mapping[code]
    return None


@cache
def _observation_keys() -> frozenset[tuple[str, str]]:
    """Every genomic Observation code (all groups but the report's), for one lookup per coding."""
    return frozenset().union(*(_keyset("codes", group) for group in tables()["codes"] if group != "genomic_report"))


def is_genomic(resource: dict[str, Any]) -> bool:
    """True if an Observation belongs to this adapter (genomic code or v2-0074 GE category)."""
    keys = _observation_keys()
    if any((s, c) in keys for s, c, _ in codings(resource.get("code"))):
        return True
    ge = system_uri("http://terminology.hl7.org/CodeSystem/v2-0074")
    return any(any(s == ge and c == "GE" for s, c, _ in codings(cat)) for cat in resource.get("category") or [])


def _component(resource: dict[str, Any], group: str) -> dict[str, Any] | None:
    for comp in iter_components(resource):
        if _is(comp.get("code"), group, "components"):
            return comp
    return None


def _gene(resource: dict[str, Any]) -> str | None:
    comp = _component(resource, "gene_studied")
    if comp is None:
        return None
    concept = comp.get("valueCodeableConcept")
    genes = tables()["genes"]
    hgnc_systems = {norm_system(s) for s in tables()["hgnc_systems"]}
    symbols = set(genes.values())
    for system, code, display in codings(concept):
        if system in hgnc_systems and code in genes:
            return genes[code]
        if code in symbols:
            return code
        if display.strip() in symbols:
            return display.strip()
    text = concept_text(concept).strip()
    return text if text in symbols else None


def _cc_text(comp: dict[str, Any] | None) -> str:
    if comp is None:
        return ""
    if isinstance(comp.get("valueString"), str):
        return comp["valueString"]
    concept = comp.get("valueCodeableConcept")
    parts = [c for _, c, _ in codings(concept)] + [concept_text(concept)]
    return " ".join(p for p in parts if p)


@dataclass
class _Item:
    resource: dict[str, Any]
    src: SourceRef
    status: str
    time: TimePoint | None
    time_note: str | None


@dataclass
class _Variant:
    item: _Item
    gene: str | None
    label: str
    markers: str
    presence: str
    zygosity: str | None
    source_class: str | None
    significance: str | None
    implications: list[SourceRef] = field(default_factory=list)


def adapt_genomics(items: list[tuple[dict[str, Any], SourceRef]], ctx: Context) -> list[Evidence]:
    """Evidence from all genomic resources of one patient (ledger entries for what is not used)."""
    ready: list[_Item] = []
    for resource, src in items:
        if resource.get("resourceType") == "MolecularSequence":
            ready.append(_Item(resource, src, "n/a", None, None))
            continue
        status = observation_status_gate(resource, src, ctx)
        if status is None:
            continue
        parsed = first_time(resource, OBSERVATION_TIME_PATHS)
        ready.append(_Item(resource, src, status, parsed.value if parsed else None, parsed.note if parsed else None))

    out: list[Evidence] = []
    variants: dict[str, _Variant] = {}
    genotypes: list[_Item] = []
    phenotype_items: list[_Item] = []
    diagnostic: list[_Item] = []
    for item in ready:
        res = item.resource
        if res.get("resourceType") == "MolecularSequence":
            out.extend(_molecular_sequence(item, ctx))
            continue
        code = res.get("code")
        if item.time is None:
            ctx.record(item.src, LedgerKind.MISSING_TIME, f"{code_label(code)}: no effective time or issued")
            continue
        if _is(code, "variant"):
            variants[item.src.unversioned] = _parse_variant(item)
        elif _is(code, "genotype"):
            genotypes.append(item)
        elif _is(code, "haplotype"):
            out.extend(_haplotype(item, ctx))
        elif _is(code, "metabolism") or _is(code, "therapeutic_implication"):
            phenotype_items.append(item)
        elif _is(code, "diagnostic_implication"):
            diagnostic.append(item)
        elif _is(code, "prs") or _is(code, "prs_percentile"):
            out.extend(_prs(item, ctx))
        else:
            ctx.record(item.src, LedgerKind.UNMAPPED, f"genomic observation {code_label(code)} not read by the twin")

    for item in diagnostic:
        _apply_implication(item, variants, ctx)
    out.extend(_variant_evidence(variants.values(), ctx))
    out.extend(_apol1(variants.values(), genotypes, ctx))
    genes_by_ref = {g.src.unversioned: _gene(g.resource) for g in genotypes}
    genes_by_ref.update({k: v.gene for k, v in variants.items()})
    for item in phenotype_items:
        out.extend(_phenotype(item, genes_by_ref, ctx))
    for item in genotypes:
        out.extend(_genotype_phenotype(item, ctx))
    return out


def _parse_variant(item: _Item) -> _Variant:
    res = item.resource
    gene = _gene(res)
    c_hgvs = _cc_text(_component(res, "coding_hgvs"))
    p_hgvs = _cc_text(_component(res, "protein_hgvs"))
    g_hgvs = _cc_text(_component(res, "genomic_hgvs"))
    rsid = _cc_text(_component(res, "variation_code"))
    presence = _answer(res.get("valueCodeableConcept"), "presence") if "valueCodeableConcept" in res else None
    comp = _component(res, "allelic_state")
    zyg = _answer(comp.get("valueCodeableConcept"), "allelic_state") if comp else None
    comp = _component(res, "source_class")
    source = _answer(comp.get("valueCodeableConcept"), "source_class") if comp else None
    comp = _component(res, "clinical_significance")  # STU1 put significance on the variant itself
    sig = _answer(comp.get("valueCodeableConcept"), "significance") if comp else None
    first_hgvs = next((h.split()[0] for h in (c_hgvs, g_hgvs, p_hgvs, rsid) if h), "")
    label = " ".join(p for p in (gene or "", first_hgvs) if p) or "variant"
    if presence is None:
        item.time_note = add_note(item.time_note, "no presence value: reported variant read as present")
    return _Variant(
        item, gene, label, " ".join((c_hgvs, p_hgvs, g_hgvs, rsid)), presence or "present", zyg, source, sig
    )


def _apply_implication(item: _Item, variants: dict[str, _Variant], ctx: Context) -> None:
    comp = _component(item.resource, "clinical_significance")
    sig = _answer(comp.get("valueCodeableConcept"), "significance") if comp else None
    targets = [reference_target(r) for r in item.resource.get("derivedFrom") or []]
    hit = [variants[t] for t in targets if t in variants]
    if sig is None or not hit:
        why = "no clinical significance" if sig is None else "derivedFrom names no variant in the input"
        ctx.record(item.src, LedgerKind.UNMAPPED, f"diagnostic implication: {why}")
        return
    for var in hit:
        var.significance = var.significance or sig
        var.implications.append(item.src)


def _ev(variable: str, value: Value, item: _Item, note: str | None, derived: tuple[SourceRef, ...] = ()) -> Evidence:
    var = get_variable(variable)
    assert item.time is not None
    return Evidence(
        variable=variable,
        scale=var.scale,
        value=value,
        unit=None,
        time=item.time,
        source=item.src,
        status=item.status,
        note=add_note(note, item.time_note),
        code=next((f"{s}|{c}" for s, c, _ in codings(item.resource.get("code"))), None),
        derived_from=derived,
    )


def _variant_evidence(variants: Any, ctx: Context) -> list[Evidence]:
    out = []
    fh_genes = set(tables()["fh_genes"])
    fh_sig = set(tables()["fh_significance"])
    for v in variants:
        derived = tuple(v.implications)
        if v.presence == "present":
            out.append(_ev("genomic_variant", v.label, v.item, add_note(v.zygosity, v.significance), derived))
        elif v.presence in ("no_call", "indeterminate"):
            ctx.record(v.item.src, LedgerKind.NO_VALUE, f"variant result {v.presence}", "genomic_variant")
            continue
        if v.gene not in fh_genes:
            continue
        if v.presence == "absent":
            out.append(_ev("fh_variant", False, v.item, f"{v.gene} variant reported absent"))
        elif v.source_class == "somatic":
            ctx.record(v.item.src, LedgerKind.EXCLUDED, "somatic variant does not establish FH", "fh_variant")
        elif v.significance in fh_sig:
            out.append(_ev("fh_variant", True, v.item, f"{v.gene} {v.significance}", derived))
    return out


def _apol1_copies(v: _Variant) -> tuple[str, int] | None:
    text = v.markers.replace("(", "").replace(")", "")
    for allele, markers in tables()["apol1_markers"].items():
        if any(m in text for m in markers):
            return allele, (2 if v.zygosity == "homozygous" else 1) if v.presence == "present" else 0
    return None


def _apol1(variants: Any, genotypes: list[_Item], ctx: Context) -> list[Evidence]:
    out = []
    tested: list[_Variant] = []
    copies = {"G1": 0, "G2": 0}
    for v in variants:
        found = _apol1_copies(v) if v.gene in (None, "APOL1") else None
        if found is None:
            if v.gene == "APOL1":
                ctx.record(v.item.src, LedgerKind.UNMAPPED, "APOL1 variant is neither G1 nor G2", "apol1_risk_alleles")
            continue
        allele, n = found
        copies[allele] = max(copies[allele], n)  # G1 is two SNPs in cis: count it once
        tested.append(v)
    if tested:
        tested.sort(key=lambda v: to_instant(v.item.time))  # type: ignore[arg-type]
        last = tested[-1]
        total = min(2, copies["G1"] + copies["G2"])
        others = tuple(v.item.src for v in tested[:-1])
        out.append(
            _ev("apol1_risk_alleles", float(total), last.item, f"G1 x{copies['G1']}, G2 x{copies['G2']}", others)
        )
    for item in genotypes:
        if _gene(item.resource) != "APOL1":
            continue
        m = _APOL1_GENOTYPE.search(concept_text(item.resource.get("valueCodeableConcept")))
        if m is None:
            ctx.record(item.src, LedgerKind.UNMAPPED, "APOL1 genotype not written as Gx/Gy", "apol1_risk_alleles")
            continue
        total = sum(1 for g in m.groups() if g in ("1", "2"))
        out.append(_ev("apol1_risk_alleles", float(total), item, f"genotype G{m.group(1)}/G{m.group(2)}"))
    return out


def _term(text: str, allowed: list[str]) -> str | None:
    norm = re.sub(r"[^a-z]+", "_", text.lower())
    for term in sorted(allowed, key=len, reverse=True):
        if term in norm:
            return term
    return None


def _phenotype(item: _Item, genes_by_ref: dict[str, str | None], ctx: Context) -> list[Evidence]:
    res = item.resource
    gene = _gene(res)
    if gene is None:
        for ref in res.get("derivedFrom") or []:
            gene = genes_by_ref.get(reference_target(ref) or "")
            if gene:
                break
    holder: dict[str, Any] | None = res if "valueCodeableConcept" in res else _component(res, "therapeutic_implication")
    concept = holder.get("valueCodeableConcept") if holder else None
    spec = tables()["phenotype_genes"].get(gene or "")
    if spec is None:
        ctx.record(item.src, LedgerKind.UNMAPPED, f"phenotype for gene {gene or 'unknown'} not used by the twin")
        return []
    term = _answer(concept, "phenotype_answers") or _term(concept_text(concept), spec["terms"])
    if term is None or term not in spec["terms"]:
        ctx.record(item.src, LedgerKind.UNMAPPED, f"{gene}: phenotype answer not a CPIC term", spec["variable"])
        return []
    return [_ev(spec["variable"], term, item, f"{gene} phenotype reported")]


def _genotype_phenotype(item: _Item, ctx: Context) -> list[Evidence]:
    gene = _gene(item.resource)
    if gene == "APOL1":
        return []
    text = concept_text(item.resource.get("valueCodeableConcept"))
    if gene is None:
        gene = next((g for g in tables()["phenotype_genes"] if g in text), None)
    spec = tables()["phenotype_genes"].get(gene or "")
    m = _DIPLOTYPE.search(text)
    if spec is None or m is None:
        why = "gene not used by the twin" if spec is None else "no star-allele diplotype"
        ctx.record(item.src, LedgerKind.UNMAPPED, f"genotype {gene or 'unknown gene'}: {why}")
        return []
    functions = tables()["cpic_allele_function"][gene]
    f1, f2 = functions.get(m.group(1)), functions.get(m.group(2))
    if f1 is None or f2 is None:
        ctx.record(item.src, LedgerKind.UNMAPPED, f"{gene}: allele without CPIC function in table", spec["variable"])
        return []
    key = "+".join(sorted((f1, f2)))
    term = tables()["cpic_phenotype_rules"][gene].get(key)
    if term is None:
        ctx.record(item.src, LedgerKind.UNMAPPED, f"{gene}: no CPIC phenotype rule for {key}", spec["variable"])
        return []
    ctx.record(item.src, LedgerKind.DERIVED, f"{gene} phenotype from diplotype by CPIC rule", spec["variable"])
    return [_ev(spec["variable"], term, item, f"derived from {gene} {m.group(1)}/{m.group(2)} (CPIC)")]


def _haplotype(item: _Item, ctx: Context) -> list[Evidence]:
    text = concept_text(item.resource.get("valueCodeableConcept")).strip()
    if not text:
        ctx.record(item.src, LedgerKind.NO_VALUE, "haplotype without value")
        return []
    gene = _gene(item.resource)
    label = text if gene is None or gene in text else f"{gene} {text}"
    return [_ev("genomic_variant", label, item, "haplotype")]


def _prs_trait(res: dict[str, Any]) -> str | None:
    methods = tables()["prs_methods"]
    for _, code, _ in codings(res.get("method")):
        if code in methods:
            return methods[code]
    text = " ".join((concept_text(res.get("method")), concept_text(res.get("code")))).lower() + " "
    for trait, words in tables()["prs_trait_words"].items():
        if any(w in text for w in words):
            return trait
    return None


def _prs(item: _Item, ctx: Context) -> list[Evidence]:
    res = item.resource
    if _prs_trait(res) != "cad":
        ctx.record(item.src, LedgerKind.UNMAPPED, "polygenic score trait not identified as CAD (method/text)")
        return []
    assert item.time is not None
    code = f"{system_uri('loinc')}|102040-3"
    out = []
    if _is(res.get("code"), "prs"):
        if "valueQuantity" in res or "dataAbsentReason" in res:
            ev = quantity_evidence(res, "cad_prs_z", item.src, item.status, item.time, ctx, code, item.time_note)
            out += [ev] if ev else []
        comp = _component(res, "prs_percentile")
        if comp is not None:
            ev = quantity_evidence(comp, "cad_prs_percentile", item.src, item.status, item.time, ctx, code)
            out += [ev] if ev else []
    else:
        ev = quantity_evidence(res, "cad_prs_percentile", item.src, item.status, item.time, ctx, code)
        out += [ev] if ev else []
    return out


def _molecular_sequence(item: _Item, ctx: Context) -> list[Evidence]:
    res = item.resource
    stamp = first_time(res, (("meta", "lastUpdated"),))
    if stamp is None:
        ctx.record(item.src, LedgerKind.MISSING_TIME, "MolecularSequence without meta.lastUpdated")
        return []
    ref = res.get("referenceSeq") or {}
    build = ref.get("genomeBuild") or ""
    chrom = concept_text(ref.get("chromosome")) or (ref.get("referenceSeqId") or {}).get("text", "")
    parts = []
    for v in res.get("variant") or []:
        if isinstance(v, dict):
            parts.append(
                f"{v.get('start')}-{v.get('end')} {v.get('referenceAllele', '')}>{v.get('observedAllele', '')}"
            )
    summary = " ".join(p for p in (build, chrom, "; ".join(parts)) if p) or str(res.get("type") or "sequence")
    item.time = stamp.value
    item.status = "n/a"
    return [_ev("molecular_sequence", summary, item, "MolecularSequence has no status; time is meta.lastUpdated")]
