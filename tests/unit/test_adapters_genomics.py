"""Genomics adapter: FH variants, APOL1 risk alleles, CYP2C19/SLCO1B1 phenotypes, PRS, MolecularSequence."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.twin import LedgerKind, Scale

REF = date(2025, 1, 1)
LOINC = "http://loinc.org"
TBD = "http://hl7.org/fhir/uv/genomics-reporting/CodeSystem/tbd-codes-cs"
GE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "GE"}]}


def cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def comp(code: str, value: dict[str, Any], system: str = LOINC) -> dict[str, Any]:
    return {"code": cc(system, code), "valueCodeableConcept": value}


def gene(hgnc: str, symbol: str, system: str = "http://www.genenames.org") -> dict[str, Any]:
    return comp("48018-6", cc(system, hgnc, symbol))


def genomic(rid: str, code: dict[str, Any], components: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": "1"},
        "status": "final",
        "category": [GE],
        "code": code,
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2023-06-01",
        "component": components,
        **extra,
    }


def variant(
    rid: str,
    gene_comp: dict[str, Any],
    hgvs: str,
    *,
    zyg: str = "LA6706-1",
    present: bool = True,
    sig: str | None = None,
    rsid: str | None = None,
    source: str = "LA6683-2",
) -> dict[str, Any]:
    comps = [
        gene_comp,
        comp("48004-6", cc("http://varnomen.hgvs.org", hgvs)),
        comp("53034-5", cc(LOINC, zyg)),
        comp("48002-0", cc(LOINC, source)),
    ]
    if rsid:
        comps.append(comp("81252-9", cc("http://www.ncbi.nlm.nih.gov/projects/SNP", rsid)))
    if sig:
        comps.append(comp("53037-8", cc(LOINC, sig)))
    return genomic(
        rid, cc(LOINC, "69548-6"), comps, valueCodeableConcept=cc(LOINC, "LA9633-4" if present else "LA9634-2")
    )


def implication(rid: str, derived: list[str], sig: str) -> dict[str, Any]:
    return genomic(
        rid,
        cc(TBD, "diagnostic-implication"),
        [comp("53037-8", cc(LOINC, sig))],
        derivedFrom=[{"reference": r} for r in derived],
    )


def build(*resources: dict[str, Any]):
    return build_twin("p1", list(resources), REF)


def test_fh_variant_via_stu3_diagnostic_implication():
    v = variant("ldlr", gene("HGNC:6547", "LDLR"), "NM_000527.5:c.1775G>A")
    imp = implication("imp", ["Observation/ldlr"], "LA6668-3")
    st = build(v, imp)
    ev = st.latest("fh_variant")
    assert ev.value is True and ev.scale is Scale.MOLECULAR
    assert {s.id for s in ev.sources()} == {"ldlr", "imp"}
    assert st.value("genomic_variant") == "LDLR NM_000527.5:c.1775G>A"


def test_fh_variant_stu1_shape_with_old_hgnc_system_and_significance_on_variant():
    v = variant(
        "apob", gene("HGNC:603", "APOB", "http://www.genenames.org/geneId"), "NM_000384.3:c.10580G>A", sig="LA26332-9"
    )
    assert build(v).value("fh_variant") is True


def test_vus_does_not_make_fh_and_somatic_is_excluded():
    vus = variant("v", gene("HGNC:6547", "LDLR"), "NM_000527.5:c.1A>G", sig="LA26333-7")
    som = variant("s", gene("HGNC:20001", "PCSK9"), "NM_174936.4:c.381T>A", sig="LA6668-3", source="LA6684-0")
    st = build(vus, som)
    assert st.latest_or_none("fh_variant") is None
    assert st.ledger.kinds_for("Observation/s") == {LedgerKind.EXCLUDED}


def test_apol1_two_risk_alleles_g1_het_and_g2_het():
    g1a = variant("g1a", gene("HGNC:618", "APOL1"), "NM_003661.4:c.1024A>G", rsid="rs73885319")
    g1b = variant("g1b", gene("HGNC:618", "APOL1"), "NM_003661.4:c.1152T>G", rsid="rs60910145")
    g2 = variant("g2", gene("HGNC:618", "APOL1"), "NM_003661.4:c.1164_1169del", rsid="rs71785313")
    st = build(g1a, g1b, g2)
    ev = st.latest("apol1_risk_alleles")
    assert ev.value == 2.0  # G1 counted once although it is two SNPs
    assert {s.id for s in ev.sources()} == {"g1a", "g1b", "g2"}


def test_apol1_homozygous_g1_and_absent():
    hom = variant("h", gene("HGNC:618", "APOL1"), "NM_003661.4:c.1024A>G", zyg="LA6705-3")
    assert build(hom).value("apol1_risk_alleles") == 2.0
    absent = variant("a", gene("HGNC:618", "APOL1"), "NM_003661.4:c.1024A>G", present=False)
    assert build(absent).value("apol1_risk_alleles") == 0.0


def test_apol1_from_genotype_text():
    g = genomic("gt", cc(LOINC, "84413-4"), [gene("HGNC:618", "APOL1")], valueCodeableConcept={"text": "G1/G2"})
    assert build(g).value("apol1_risk_alleles") == 2.0


def genotype(rid: str, symbol: str, hgnc: str, text: str) -> dict[str, Any]:
    return genomic(rid, cc(LOINC, "84413-4"), [gene(hgnc, symbol)], valueCodeableConcept={"text": text})


@pytest.mark.parametrize(
    ("dip", "expected"),
    [
        ("*1/*1", "normal_metabolizer"),
        ("*1/*2", "intermediate_metabolizer"),
        ("*2/*17", "intermediate_metabolizer"),
        ("*2/*3", "poor_metabolizer"),
        ("*1/*17", "rapid_metabolizer"),
        ("*17/*17", "ultrarapid_metabolizer"),
    ],
)
def test_cyp2c19_phenotype_from_diplotype(dip, expected):
    st = build(genotype("g", "CYP2C19", "HGNC:2621", f"CYP2C19 {dip}"))
    assert st.value("cyp2c19_phenotype") == expected
    assert LedgerKind.DERIVED in st.ledger.kinds_for("Observation/g")


@pytest.mark.parametrize(
    ("dip", "expected"),
    [
        ("*1/*1", "normal_function"),
        ("*1/*5", "decreased_function"),
        ("*15/*1", "decreased_function"),
        ("*5/*15", "poor_function"),
    ],
)
def test_slco1b1_phenotype_from_diplotype(dip, expected):
    assert build(genotype("g", "SLCO1B1", "HGNC:10959", dip)).value("slco1b1_phenotype") == expected


def test_therapeutic_implication_phenotype_stu3_and_stu2_codes_gene_via_derived_from():
    gt = genotype("gt", "CYP2C19", "HGNC:2621", "CYP2C19 *2/*2")
    stu3 = genomic(
        "ti3",
        cc(TBD, "therapeutic-implication"),
        [
            comp("therapeutic-implication", cc(LOINC, "LA9657-3", "Poor metabolizer"), TBD),
            comp("51963-7", cc("http://www.nlm.nih.gov/research/umls/rxnorm", "32968")),
        ],
        derivedFrom=[{"reference": "Observation/gt"}],
        effectiveDateTime="2023-07-01",
    )
    st = build(gt, stu3)
    ev = st.latest("cyp2c19_phenotype")
    assert ev.value == "poor_metabolizer" and ev.source.id == "ti3"
    stu2 = genomic(
        "ti2",
        cc(TBD, "therapeutic-implication"),
        [gene("HGNC:10959", "SLCO1B1"), comp("predicted-therapeutic-implication", cc(LOINC, "LA25395-7"), TBD)],
    )
    assert build(stu2).value("slco1b1_phenotype") == "decreased_function"


def test_stu1_metabolism_observation_53040_2():
    obs = genomic(
        "m", cc(LOINC, "53040-2"), [gene("HGNC:2621", "CYP2C19")], valueCodeableConcept=cc(LOINC, "LA10317-8")
    )
    assert build(obs).value("cyp2c19_phenotype") == "intermediate_metabolizer"


def test_unsupported_pgx_gene_recorded():
    obs = genomic("c9", cc(LOINC, "53040-2"), [gene("HGNC:2623", "CYP2C9")], valueCodeableConcept=cc(LOINC, "LA9657-3"))
    st = build(obs)
    assert st.ledger.kinds_for("Observation/c9") == {LedgerKind.UNMAPPED}


def test_polygenic_risk_score_z_and_percentile():
    prs = genomic(
        "prs",
        cc(LOINC, "102040-3"),
        [
            {
                "code": cc("https://fhirtwin.org/CodeSystem/fhirtwin", "prs-percentile"),
                "valueQuantity": {"value": 91.5, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
            }
        ],
        method=cc("https://fhirtwin.org/CodeSystem/fhirtwin", "PGS000018"),
        valueQuantity={"value": 1.37, "unit": "score", "system": "http://unitsofmeasure.org", "code": "{score}"},
    )
    st = build(prs)
    assert st.value("cad_prs_z") == pytest.approx(1.37)
    assert st.value("cad_prs_percentile") == pytest.approx(91.5)


def test_prs_without_trait_not_used():
    prs = genomic("x", cc(LOINC, "102040-3"), [], valueQuantity={"value": 1.0, "unit": "{score}"})
    st = build(prs)
    assert st.latest_or_none("cad_prs_z") is None
    assert st.ledger.kinds_for("Observation/x") == {LedgerKind.UNMAPPED}


def test_molecular_sequence_as_molecular_evidence():
    ms = {
        "resourceType": "MolecularSequence",
        "id": "ms",
        "meta": {"versionId": "1", "lastUpdated": "2023-06-01T00:00:00Z"},
        "type": "dna",
        "coordinateSystem": 0,
        "patient": {"reference": "Patient/p1"},
        "referenceSeq": {"genomeBuild": "GRCh38", "chromosome": {"text": "chr22"}},
        "variant": [{"start": 36265859, "end": 36265860, "referenceAllele": "A", "observedAllele": "G"}],
    }
    ev = build(ms).latest("molecular_sequence")
    assert ev.scale is Scale.MOLECULAR and "GRCh38" in str(ev.value)


def test_entered_in_error_genomic_result_ignored():
    v = variant("bad", gene("HGNC:6547", "LDLR"), "NM_000527.5:c.1775G>A", sig="LA6668-3")
    v["status"] = "entered-in-error"
    st = build(v)
    assert st.latest_or_none("fh_variant") is None
    assert st.ledger.kinds_for("Observation/bad") == {LedgerKind.ENTERED_IN_ERROR}
