"""Unit tests of the synthetic cohort generator: determinism, FHIR shape, codes, messy data, trends."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from fhirtwin.sandbox import cohort as cohort_mod
from fhirtwin.sandbox.cohort import (
    DEFAULT_PATIENTS,
    DEFAULT_SEED,
    MESSY_KINDS,
    Cohort,
    bundle_json,
    codes,
    creatinine_for_egfr,
    generate_cohort,
    messy_counts,
    write_cohort,
)
from fhirtwin.sim.equations import egfr_ckd_epi_2021 as _egfr

LOINC = "http://loinc.org"


def egfr_ckd_epi_2021(scr: float, age: float, female: bool) -> float:
    """The published equation (fhirtwin.sim.equations), positional for brevity in these tests."""
    return float(_egfr(sex="female" if female else "male", age_years=age, serum_creatinine_mg_dl=scr))
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
HGNC = "http://www.genenames.org"
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
MOLAR_LIPIDS = {"14647-2", "14646-4", "22748-8", "14927-8"}
LDL_MASS = {"13457-7", "18262-6"}
VALUE_UNUSABLE = {"duplicate", "entered-in-error", "implausible", "missing-unit"}


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return generate_cohort()


def resources(bundle: dict, rtype: str | None = None) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if rtype is None or e["resource"]["resourceType"] == rtype]


def codes_of(concept: dict, system: str = LOINC) -> set[str]:
    return {c["code"] for c in concept.get("coding", []) if c.get("system") == system}


def component_value(obs: dict, code: str) -> dict | None:
    for comp in obs.get("component", []):
        if code in codes_of(comp["code"]):
            return comp
    return None


def unusable_ids(truth: dict) -> set[str]:
    return {m["id"] for m in truth["messy"] if m["kind"] in VALUE_UNUSABLE}


def series(
    bundle: dict, truth: dict, loinc: set[str], factor_si: dict[str, float] | None = None
) -> list[tuple[str, float]]:
    """(time, value) of usable results with one of the codes, molar codes converted by factor_si."""
    skip = unusable_ids(truth)
    out = []
    for obs in resources(bundle, "Observation"):
        if obs["id"] in skip or obs["status"] not in ("final", "preliminary") or "valueQuantity" not in obs:
            continue
        code = codes_of(obs["code"]) & (loinc | set(factor_si or {}))
        if code:
            (c,) = code
            value = float(obs["valueQuantity"]["value"]) * (factor_si or {}).get(c, 1.0)
            out.append((obs["effectiveDateTime"][:10], value))
    return sorted(out)


# --------------------------------------------------------------------------- determinism and shape


def test_default_size_and_patient_order(cohort: Cohort) -> None:
    assert DEFAULT_PATIENTS >= 200
    assert len(cohort.bundles) == DEFAULT_PATIENTS == len(cohort.truth)
    ids = [b["entry"][0]["resource"]["id"] for b in cohort.bundles]
    assert ids == [f"ftp-{k:04d}" for k in range(1, DEFAULT_PATIENTS + 1)]
    assert list(cohort.truth) == ids


def test_same_seed_is_byte_identical_and_other_seed_differs() -> None:
    a = generate_cohort(12, seed=7)
    b = generate_cohort(12, seed=7)
    c = generate_cohort(12, seed=8)
    assert [bundle_json(x) for x in a.bundles] == [bundle_json(x) for x in b.bundles]
    assert json.dumps(a.truth, sort_keys=True) == json.dumps(b.truth, sort_keys=True)
    assert [bundle_json(x) for x in a.bundles] != [bundle_json(x) for x in c.bundles]


def test_patient_k_does_not_depend_on_cohort_size(cohort: Cohort) -> None:
    small = generate_cohort(6)
    assert [bundle_json(b) for b in small.bundles] == [bundle_json(b) for b in cohort.bundles[:6]]


def test_reference_date_moves_all_dates() -> None:
    a = generate_cohort(2, reference_date="2026-06-30")
    b = generate_cohort(2, reference_date="2030-06-30")
    shift = date(2030, 6, 30) - date(2026, 6, 30)
    for bundle_a, bundle_b in zip(a.bundles, b.bundles, strict=True):
        birth_a, birth_b = (date.fromisoformat(resources(x, "Patient")[0]["birthDate"]) for x in (bundle_a, bundle_b))
        assert birth_b - birth_a == shift
        times_a = [o.get("effectiveDateTime") for o in resources(bundle_a, "Observation")]
        times_b = [o.get("effectiveDateTime") for o in resources(bundle_b, "Observation")]
        assert [t is None for t in times_a] == [t is None for t in times_b]
        for t_a, t_b in zip(times_a, times_b, strict=True):
            if t_a is not None:
                assert date.fromisoformat(t_b[:10]) - date.fromisoformat(t_a[:10]) == shift


def test_write_cohort(tmp_path: Path) -> None:
    small = generate_cohort(4)
    write_cohort(small, tmp_path)
    files = sorted(p.name for p in (tmp_path / "bundles").iterdir())
    assert files == [f"ftp-000{k}.json" for k in range(1, 5)]
    text = (tmp_path / "bundles" / "ftp-0002.json").read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert json.loads((tmp_path / "truth.json").read_text()) == small.truth
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["messy_counts"] == messy_counts(small)
    assert summary["patients"] == 4


def test_transaction_of_puts_with_stable_unique_ids(cohort: Cohort) -> None:
    seen: set[str] = set()
    for bundle in cohort.bundles:
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
        patient = bundle["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        assert patient["identifier"][0]["system"] == "https://fhirtwin.org/sid/synthetic-mrn"
        assert patient["name"][0]["family"].startswith("Synthetic-")
        for entry in bundle["entry"]:
            res = entry["resource"]
            url = f"{res['resourceType']}/{res['id']}"
            assert entry["request"] == {"method": "PUT", "url": url}
            assert ID_PATTERN.match(res["id"]) and not res["id"].isdigit()
            assert res["id"].startswith(patient["id"])
            assert entry["fullUrl"] == f"urn:uuid:{uuid.uuid5(cohort_mod._UUID_NAMESPACE, url)}"
            assert url not in seen
            seen.add(url)
    assert len(seen) == sum(len(b["entry"]) for b in cohort.bundles)


def _references(node):
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def test_every_reference_resolves_within_its_bundle(cohort: Cohort) -> None:
    checked = 0
    for bundle in cohort.bundles:
        local = {f"{r['resourceType']}/{r['id']}" for r in resources(bundle)}
        for res in resources(bundle):
            contained = {f"#{c['id']}" for c in res.get("contained", [])}
            for ref in _references(res):
                assert ref in local or ref in contained, (res["id"], ref)
                checked += 1
    assert checked > 10_000


def test_every_bundle_validates_with_r4b_models(cohort: Cohort) -> None:
    from fhir.resources.R4B.bundle import Bundle

    for bundle in cohort.bundles:
        parsed = Bundle.model_validate(bundle)
        assert len(parsed.entry) == len(bundle["entry"])


def test_no_machine_paths_or_real_names(cohort: Cohort) -> None:
    text = "".join(bundle_json(b) for b in cohort.bundles[:40])
    assert not re.search(r'"/(home|work|tmp|root)/', text), "no absolute file paths in the bundles"
    families = {r["name"][0]["family"] for b in cohort.bundles for r in resources(b, "Patient")}
    assert all(re.fullmatch(r"Synthetic-\d{4}", f) for f in families)


# --------------------------------------------------------------------------- codes


def _all_codes(cohort: Cohort) -> set[tuple[str, str]]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if "system" in node and "code" in node:
                found.add((node["system"], node["code"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for bundle in cohort.bundles:
        walk(bundle)
    return found


def test_required_observation_codes_present(cohort: Cohort) -> None:
    found = {code for system, code in _all_codes(cohort) if system == LOINC}
    required = {
        "85354-9", "8480-6", "8462-4", "39156-5", "29463-7", "8302-2",  # vitals
        "2093-3", "2085-9", "13457-7", "18262-6", "2571-8", *MOLAR_LIPIDS,  # lipids
        "4548-4", "2345-7", "2160-0", "14682-9", "9318-7", "2823-3",  # other labs
        "72166-2", "89574-8", "89555-7", "68516-4", "82290-8",  # social history
        "69548-6", "84413-4", "102040-3", "51969-4", "48018-6", "48004-6", "48002-0", "53034-5", "53037-8",
    }
    assert required <= found, required - found


def test_bp_panels_have_components_in_mm_hg(cohort: Cohort) -> None:
    panels = [o for b in cohort.bundles for o in resources(b, "Observation") if "85354-9" in codes_of(o["code"])]
    assert len(panels) > 1000
    for panel in panels:
        assert "valueQuantity" not in panel
        assert panel["category"][0]["coding"][0]["code"] == "vital-signs"
        for code in ("8480-6", "8462-4"):
            comp = component_value(panel, code)
            assert comp is not None and comp["valueQuantity"]["code"] == "mm[Hg]"


def test_each_condition_kind_and_status_present(cohort: Cohort) -> None:
    conds = [c for b in cohort.bundles for c in resources(b, "Condition")]
    snomed = {code for c in conds for code in codes_of(c["code"], SNOMED)}
    icd = {code for c in conds for code in codes_of(c["code"], "http://hl7.org/fhir/sid/icd-10-cm")}
    for kind, entry in codes()["conditions"].items():
        if not kind.startswith("_"):
            assert entry["snomed"] in snomed and entry["icd10cm"] in icd, kind
    ver = Counter(c["verificationStatus"]["coding"][0]["code"] for c in conds)
    clin = Counter(c["clinicalStatus"]["coding"][0]["code"] for c in conds if "clinicalStatus" in c)
    assert ver["confirmed"] > 100 and ver["refuted"] >= 3 and ver["entered-in-error"] >= 3
    assert clin["active"] > 100 and clin["resolved"] >= 10
    for c in conds:
        if c["verificationStatus"]["coding"][0]["code"] == "entered-in-error":
            assert "clinicalStatus" not in c  # R4 invariant con-5
        if "abatementDateTime" in c:
            assert c["clinicalStatus"]["coding"][0]["code"] in ("resolved", "inactive", "remission")  # con-4


def _medication_codes(bundle: dict, res: dict) -> set[str]:
    """RxNorm codes of a MedicationRequest/-Dispense: its concept, a contained or a referenced Medication."""
    if "medicationCodeableConcept" in res:
        return codes_of(res["medicationCodeableConcept"], RXNORM)
    ref = res["medicationReference"]["reference"]
    if ref.startswith("#"):
        target = next(c for c in res["contained"] if c["id"] == ref[1:])
    else:
        target = next(r for r in resources(bundle, "Medication") if f"Medication/{r['id']}" == ref)
    return codes_of(target["code"], RXNORM)


def test_medications_cover_every_statin_intensity_class_and_shape(cohort: Cohort) -> None:
    table = codes()["statin_intensity_table"]
    meds = [m for t in cohort.truth.values() for m in t["medications"]]
    statins = [m for m in meds if m["class"] == "statin"]
    assert {m["intensity"] for m in statins} == {"low", "moderate", "high"}
    for m in statins:
        assert m["intensity"] == table[m["drug"]][str(m["daily_dose_mg"])]
    assert {m["drug"] for m in meds} >= {"lisinopril", "losartan", "amlodipine", "metformin", "clopidogrel",
                                          "atorvastatin", "rosuvastatin", "simvastatin"}
    assert {m["class"] for m in meds} >= {"sglt2-inhibitor", "insulin", "statin", "ace-inhibitor", "arb"}
    forms = Counter(m["form"] for m in meds)
    assert set(forms) == {"concept", "reference", "contained", "dispense-only", "request+dispense"}, forms
    assert all(n >= 5 for n in forms.values()), forms
    products = {p["rxcui"] for p in codes()["statins"]["products"]}
    assert any(m["rxcui"] not in products for m in statins), "branded statin products occur"
    reqs = [(b, m) for b in cohort.bundles for m in resources(b, "MedicationRequest")]
    assert {m["status"] for _, m in reqs} == {"active", "stopped"}
    units = Counter()
    for bundle, m in reqs:
        assert _medication_codes(bundle, m)
        dose = m["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]
        units[dose["code"]] += 1
        assert (m["status"] == "stopped") == ("end" in m["dispenseRequest"]["validityPeriod"])
    assert set(units) == {"mg", "{tbl}", "[iU]"}, units
    for bundle in cohort.bundles:
        for d in resources(bundle, "MedicationDispense"):
            assert d["daysSupply"]["code"] == "d" and d["status"] == "completed" and _medication_codes(bundle, d)


def test_truth_statin_and_insulin_follow_the_orders(cohort: Cohort) -> None:
    insulin = 0
    for truth in cohort.truth.values():
        active = [m for m in truth["medications"] if m["status"] == "active" and m["start"] <= "2026-06-30"]
        statins = [m for m in active if m["class"] == "statin"]
        if statins:
            assert truth["statin"] == {"agent": statins[-1]["drug"], "daily_dose_mg": statins[-1]["daily_dose_mg"],
                                       "intensity": statins[-1]["intensity"]}
        else:
            assert truth["statin"] is None
        assert truth["on_insulin"] == any(m["class"] == "insulin" for m in active)
        insulin += truth["on_insulin"]
        if truth["diabetes_type"] == "type1":
            assert truth["on_insulin"] and not any(m["drug"] == "metformin" for m in truth["medications"])
    assert insulin >= 8


def test_genomics_follow_the_ig_and_the_truth(cohort: Cohort) -> None:
    gene_hgnc = {g: v["hgnc"] for g, v in codes()["genomics"]["genes"].items()}
    variant_genes: Counter = Counter()
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        obs = resources(bundle, "Observation")
        geno = truth["genotypes"]
        variants = [o for o in obs if "69548-6" in codes_of(o["code"])]
        genomic = [o for o in obs if {"69548-6", "84413-4"} & codes_of(o["code"])]
        if not geno["tested"]:
            assert not genomic
            continue
        for o in genomic:
            cats = {c["coding"][0]["code"] for c in o["category"]}
            assert cats == {"laboratory", "GE"}
        present = defaultdict(int)
        for v in variants:
            gene = next(iter(codes_of(component_value(v, "48018-6")["valueCodeableConcept"], HGNC)))
            if "LA9633-4" in codes_of(v["valueCodeableConcept"]):
                symbol = next(g for g, h in gene_hgnc.items() if h == gene)
                present[symbol] += 1
                variant_genes[symbol] += 1
                assert component_value(v, "53034-5") is not None
                assert component_value(v, "48002-0")["valueCodeableConcept"]["coding"][0]["code"] == "LA6683-2"
        distinct_apol1 = len({a for a in geno["apol1"].split("/") if a != "G0"})
        assert present.get("APOL1", 0) == distinct_apol1
        fh_present = {g: n for g, n in present.items() if g in ("LDLR", "APOB", "PCSK9")}
        assert fh_present == ({geno["fh_gene"]: 1} if geno["fh_gene"] else {})
        genotypes = {o["valueCodeableConcept"]["text"] for o in obs if "84413-4" in codes_of(o["code"])}
        assert genotypes == {f"CYP2C19 {geno['cyp2c19']}", f"SLCO1B1 {geno['slco1b1']}"}
        (prs,) = [o for o in obs if "102040-3" in codes_of(o["code"])]
        assert prs["valueQuantity"]["value"] == geno["prs_cad_z"]
    assert {"LDLR", "APOB", "PCSK9", "APOL1"} <= set(variant_genes)
    high_risk = [t for t in cohort.truth.values() if t["genotypes"]["tested"] and t["genotypes"]["apol1_high_risk"]]
    assert high_risk


def test_pgx_implications_carry_cpic_phenotypes(cohort: Cohort) -> None:
    answers = codes()["genomics"]["answers"]
    seen = set()
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        for o in resources(bundle, "Observation"):
            if "therapeutic-implication" not in {c["code"] for c in o["code"]["coding"]}:
                continue
            gene_code = component_value(o, "48018-6")["valueCodeableConcept"]["coding"][0]["display"]
            value = next(c for c in o["component"] if c["code"]["coding"][0]["code"] == "therapeutic-implication")
            key = truth["genotypes"]["cyp2c19_phenotype" if gene_code == "CYP2C19" else "slco1b1_phenotype"]
            assert value["valueCodeableConcept"]["coding"][0]["code"] == answers[key]["code"]
            assert o["derivedFrom"][0]["reference"].startswith("Observation/")
            seen.add((gene_code, key))
    assert ("CYP2C19", "intermediate") in seen and ("CYP2C19", "poor_metabolizer") in seen
    assert ("SLCO1B1", "decreased_function") in seen


def test_environment_and_activity_observations(cohort: Cohort) -> None:
    pm = [o for b in cohort.bundles for o in resources(b, "Observation")
          if any(c["system"] == "https://fhirtwin.org/CodeSystem/fhirtwin" for c in o["code"]["coding"])]
    assert len(pm) > 200
    assert all(o["valueQuantity"].get("code", "ug/m3") == "ug/m3" for o in pm)
    assert all(2 <= o["valueQuantity"]["value"] <= 25 for o in pm)
    evs = [o for b in cohort.bundles for o in resources(b, "Observation") if "89574-8" in codes_of(o["code"])]
    for o in evs:
        days = component_value(o, "89555-7")["valueQuantity"]["value"]
        minutes = component_value(o, "68516-4")["valueQuantity"]["value"]
        assert 0 <= days <= 7 and (minutes == 0) == (days == 0)


# --------------------------------------------------------------------------- messy data


def _scan_messy(bundle: dict) -> Counter:
    """Count messy kinds from the resources alone, without looking at the truth."""
    found: Counter = Counter()
    obs = resources(bundle, "Observation")
    groups: Counter = Counter()
    for o in obs:
        code = codes_of(o["code"])
        vq = o.get("valueQuantity")
        found["missing-unit"] += int(vq is not None and "unit" not in vq)
        found["entered-in-error"] += int(o["status"] == "entered-in-error")
        found["preliminary"] += int(o["status"] == "preliminary")
        found["lipid-mmol-l"] += int(bool(code & MOLAR_LIPIDS))
        found["creatinine-umol-l"] += int("14682-9" in code)
        sbp = component_value(o, "8480-6")
        if (sbp and not 50 <= sbp["valueQuantity"]["value"] <= 300) or (
            vq and ((code & LDL_MASS and vq["value"] > 1000) or ("4548-4" in code and vq["value"] > 20))
        ):
            found["implausible"] += 1
        value = json.dumps([o.get("valueQuantity"), o.get("component"), o.get("valueCodeableConcept")], sort_keys=True)
        when = o.get("effectiveDateTime") or json.dumps(o.get("effectivePeriod"), sort_keys=True)
        groups[(tuple(sorted(code)), when, o["status"], value)] += 1
    found["duplicate"] = sum(n - 1 for n in groups.values())
    for c in resources(bundle, "Condition"):
        status = c["verificationStatus"]["coding"][0]["code"]
        found["condition-refuted"] += int(status == "refuted")
        found["condition-entered-in-error"] += int(status == "entered-in-error")
    found["sparse-patient"] = int(len(bundle["entry"]) <= 3)
    return +found


def test_messy_kinds_match_truth_per_patient(cohort: Cohort) -> None:
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        listed = Counter(m["kind"] for m in truth["messy"])
        assert _scan_messy(bundle) == listed, truth["patient_id"]
        assert dict(listed) == truth["messy_counts"]
        ids = {r["id"] for r in resources(bundle)}
        assert all(m["id"] in ids for m in truth["messy"])


def test_every_messy_kind_occurs_with_the_default_seed(cohort: Cohort) -> None:
    counts = messy_counts(cohort)
    assert set(counts) == set(MESSY_KINDS)
    assert all(n >= 3 for n in counts.values()), counts
    sparse = [t for t in cohort.truth.values() if t["sparse"]]
    assert 0.02 * DEFAULT_PATIENTS <= len(sparse) <= 0.10 * DEFAULT_PATIENTS
    mixed = [t for t in cohort.truth.values() if t["units"]["lipids"] == "mixed"]
    assert any(
        {"2093-3", "14647-2"} <= {c for o in resources(cohort.bundles[int(t["patient_id"][4:]) - 1], "Observation")
                                  for c in codes_of(o["code"])}
        for t in mixed
    )


def test_rates_are_documented_constants() -> None:
    doc = cohort_mod.__doc__ or ""
    for name in ("RATE_MISSING_UNIT", "RATE_DUPLICATE", "RATE_ENTERED_IN_ERROR", "RATE_IMPLAUSIBLE_PATIENT",
                 "RATE_PRELIMINARY", "RATE_SPARSE_PATIENT", "RATE_LIPID_SI_PATIENT", "RATE_CREATININE_SI_PATIENT"):
        assert name in doc and 0 < getattr(cohort_mod, name) < 0.5


# --------------------------------------------------------------------------- trends vs truth


def _ldl_series(bundle: dict, truth: dict) -> list[tuple[str, float]]:
    return series(bundle, truth, LDL_MASS, {"22748-8": 38.67})


def test_ldl_falls_after_statin_start(cohort: Cohort) -> None:
    diffs = []
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        statins = [m for m in truth["medications"] if m["class"] == "statin"]
        if not statins or any(m["end"] for m in statins):
            continue
        start = min(m["start"] for m in statins)
        ldl = _ldl_series(bundle, truth)
        before = [v for d, v in ldl if d < start]
        after = [v for d, v in ldl if d > start]
        if before and after:
            diffs.append(np.mean(after) / np.mean(before))
    assert len(diffs) >= 20
    assert np.mean(diffs) < 0.75
    assert np.mean(np.array(diffs) < 1.0) >= 0.9


def test_fh_carriers_have_high_ldl(cohort: Cohort) -> None:
    first_fh, first_other = [], []
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        if truth["sparse"]:
            continue
        statin_starts = [m["start"] for m in truth["medications"] if m["class"] == "statin"]
        untreated = [v for d, v in _ldl_series(bundle, truth) if not statin_starts or d < min(statin_starts)]
        if untreated:
            (first_fh if truth["genotypes"]["fh_gene"] else first_other).append(untreated[0])
        assert (truth["genotypes"]["fh_gene"] is not None) <= (truth["latent"]["ldl_baseline_mg_dl"] >= 190)
    assert first_fh and np.mean(first_fh) > np.mean(first_other) + 60


def test_sbp_lower_after_antihypertensive_start(cohort: Cohort) -> None:
    diffs = []
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        drugs = [m for m in truth["medications"] if m["sbp_effect_mm_hg"]]
        if not drugs:
            continue
        start = min(m["start"] for m in drugs)
        skip = unusable_ids(truth)
        sbp = [(o["effectiveDateTime"][:10], component_value(o, "8480-6")["valueQuantity"]["value"])
               for o in resources(bundle, "Observation") if "85354-9" in codes_of(o["code"]) and o["id"] not in skip]
        before = [v for d, v in sbp if d < start and d >= str(int(start[:4]) - 1) + start[4:]]
        after = [v for d, v in sbp if d > start]
        if before and after:
            diffs.append(np.mean(after) - np.mean(before))
    assert len(diffs) >= 10
    assert np.mean(diffs) < -4


def _egfr_slope(bundle: dict, truth: dict) -> float | None:
    female = truth["sex"] == "female"
    birth = np.datetime64(truth["birth_date"])
    points = series(bundle, truth, {"2160-0"}, {"14682-9": 1 / 88.4})
    if len(points) < 3:
        return None
    t = np.array([(np.datetime64(d) - birth).astype(int) / 365.25 for d, _ in points])
    egfr = np.array([egfr_ckd_epi_2021(v, age, female) for (_, v), age in zip(points, t, strict=True)])
    return float(np.polyfit(t, egfr, 1)[0])


def test_egfr_slope_from_creatinine_matches_truth(cohort: Cohort) -> None:
    fitted, true, group = [], [], []
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        if truth["sparse"] or any(m["class"] == "sglt2-inhibitor" for m in truth["medications"]):
            continue
        slope = _egfr_slope(bundle, truth)
        if slope is not None and truth["history_years"] >= 4:
            fitted.append(slope)
            true.append(truth["latent"]["egfr_slope_ml_min_1_73m2_per_year"])
            group.append(truth["diabetes"] or truth["genotypes"]["apol1_high_risk"])
    assert len(fitted) >= 50
    # creatinine scatter is realistic (total CV 5.6 %), so a per-patient OLS slope recovers the truth only
    # moderately; r was 0.58 with the default seed
    assert np.corrcoef(fitted, true)[0, 1] > 0.5
    fitted_arr, group_arr = np.array(fitted), np.array(group)
    assert fitted_arr[group_arr].mean() < fitted_arr[~group_arr].mean() - 1.0


def test_ckd_stage_conditions_follow_egfr(cohort: Cohort) -> None:
    thresholds = {"ckd3a": 60, "ckd3b": 45, "ckd4": 30}
    for truth in cohort.truth.values():
        active = [c for c in truth["conditions"] if c["kind"] in thresholds and c["clinical_status"] == "active"]
        assert len(active) <= 1
        for c in active:
            assert truth["latent"]["egfr_at_reference_ml_min_1_73m2"] < thresholds[c["kind"]] + 1e-9


def test_smoking_status_matches_truth(cohort: Cohort) -> None:
    answers = codes()["smoking_answers"]
    current = {v["code"] for k, v in answers.items() if k.startswith("current")}
    checked = 0
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        obs = sorted((o["effectiveDateTime"], o["valueCodeableConcept"]) for o in resources(bundle, "Observation")
                     if "72166-2" in codes_of(o["code"]) and o["status"] == "final")
        if not obs or truth["sparse"]:
            continue
        last = next(iter(codes_of(obs[-1][1], SNOMED)))
        expected = truth["smoking"]["at_reference"]
        assert (last in current) == (expected == "current")
        assert (last == answers["never"]["code"]) == (expected == "never")
        checked += 1
    assert checked > 150


def test_truth_conditions_and_medications_are_in_the_bundle(cohort: Cohort) -> None:
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        by_id = {r["id"]: r for r in resources(bundle)}
        for c in truth["conditions"]:
            res = by_id[c["id"]]
            sent = {f"{'snomed' if x['system'] == SNOMED else 'icd10cm'}|{x['code']}" for x in res["code"]["coding"]}
            assert sent == set(c["codes"])
            assert res["verificationStatus"]["coding"][0]["code"] == c["verification_status"] == "confirmed"
            assert ("clinicalStatus" in res) == c["clinical_status_sent"]
            assert res["category"][0]["coding"][0]["code"] == c["category"]
        for p in truth["procedures"]:
            res = by_id[p["id"]]
            assert res["resourceType"] == "Procedure" and res["performedDateTime"][:10] == p["date"]
        for m in truth["medications"]:
            res = by_id[m["id"]]
            assert m["rxcui"] in _medication_codes(bundle, res)
            if res["resourceType"] == "MedicationRequest":
                assert res["status"] == m["status"]
                assert ("medicationReference" in res) == (m["form"] in ("reference", "contained"))
            else:
                assert m["form"] == "dispense-only"


def test_ckd_epi_inverse_round_trips() -> None:
    for egfr in (15.0, 44.0, 75.0, 110.0):
        for female in (True, False):
            scr = creatinine_for_egfr(egfr, 61.0, female)
            assert egfr_ckd_epi_2021(scr, 61.0, female) == pytest.approx(egfr, rel=1e-9)
    # the NKF-documented behaviour: a 50-year-old man with creatinine 1.0 mg/dL has eGFR about 92
    assert egfr_ckd_epi_2021(1.0, 50, False) == pytest.approx(91.7, abs=0.5)


def test_defaults() -> None:
    assert DEFAULT_SEED == 20261127
    with pytest.raises(ValueError):
        generate_cohort(-1)


# --------------------------------------------------------------------------- coding variety and scope

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SYSTEM_KEY = {SNOMED: "snomed", ICD: "icd10cm", RXNORM: "rxnorm", LOINC: "loinc"}


def test_every_new_code_is_in_the_terms_table_with_display_and_source() -> None:
    terms = {k: v for k, v in codes()["terms"].items() if not k.startswith("_")}
    for key, term in terms.items():
        assert term["display"] and term["source"] and isinstance(term["checked"], bool), key
    for section in ("condition_variants", "procedures", "statin_presentations", "medication_products", "insulins",
                    "statin_intensity_table"):
        assert codes()[section]["_source"], section
    for kind, variants in codes()["condition_variants"].items():
        if kind.startswith("_"):
            continue
        for variant in variants:
            assert set(variant["codes"]) <= set(terms), (kind, variant)
    for proc in (v for k, v in codes()["procedures"].items() if not k.startswith("_")):
        assert set(proc["codes"]) <= set(terms)


def test_conditions_come_in_realistic_variety(cohort: Cohort) -> None:
    sent: Counter = Counter()
    categories: Counter = Counter()
    without_status = 0
    for bundle in cohort.bundles:
        for c in resources(bundle, "Condition"):
            for coding in c["code"]["coding"]:
                sent[f"{SYSTEM_KEY[coding['system']]}|{coding['code']}"] += 1
                assert coding["display"] == codes()["terms"][f"{SYSTEM_KEY[coding['system']]}|{coding['code']}"][
                    "display"]
            categories[c["category"][0]["coding"][0]["code"]] += 1
            without_status += "clinicalStatus" not in c and c["verificationStatus"]["coding"][0]["code"] == "confirmed"
            if "clinicalStatus" not in c and c["verificationStatus"]["coding"][0]["code"] == "confirmed":
                assert c["category"][0]["coding"][0]["code"] == "encounter-diagnosis" and "abatementDateTime" not in c
    kinds_sent = {k for t in cohort.truth.values() for c in t["conditions"] for k in c["codes"]}
    for kind in ("mi", "stroke", "hf", "t2d", "htn", "ckd3a"):
        variants = {k for v in codes()["condition_variants"][kind] for k in v["codes"]}
        assert len(variants & kinds_sent) >= 3, kind
    assert {"problem-list-item", "encounter-diagnosis", "health-concern"} <= set(categories)
    assert without_status >= 10
    assert sum(n for k, n in sent.items() if k.startswith("icd10cm|")) > 100


def test_out_of_scope_arms_and_procedures_occur(cohort: Cohort) -> None:
    truths = list(cohort.truth.values())
    scopes = Counter(t["scope"] for t in truths)
    assert {"scope-primary-prevention", "scope-established-ascvd", "scope-heart-failure", "scope-dialysis",
            "scope-kidney-transplant"} <= set(scopes), scopes
    assert sum(t["dialysis"] for t in truths) >= 3 and sum(t["kidney_transplant"] for t in truths) >= 3
    procs = Counter(p["kind"] for t in truths for p in t["procedures"])
    assert {"cabg", "kidney_transplant"} <= set(procs) and procs["pci"] + procs["pci_stent"] >= 1
    assert procs["hemodialysis"] + procs["peritoneal_dialysis"] >= 1
    parts = Counter(k for t in truths for k, v in t["ascvd"].items() if v)
    for part in ("prior_mi", "coronary_heart_disease", "coronary_revascularisation", "prior_stroke", "tia",
                 "peripheral_arterial_disease"):
        assert parts[part] >= 1, part
    coded_by = Counter(t["diabetes_coded_by"] for t in truths if t["diabetes_type"])
    assert {"diagnosis", "complication-only", "insulin-only"} <= set(coded_by)
    assert any(t["diabetes_type"] == "type1" for t in truths)
    assert any(t["diabetic_kidney_disease"] for t in truths) and any(t["diabetic_retinopathy"] for t in truths)


def test_scope_follows_the_documented_precedence(cohort: Cohort) -> None:
    order = [("scope-kidney-transplant", lambda t: t["kidney_transplant"]),
             ("scope-dialysis", lambda t: t["dialysis"]),
             ("scope-heart-failure", lambda t: t["heart_failure"]),
             ("scope-established-ascvd", lambda t: t["ascvd"]["established"]),
             ("scope-pregnancy", lambda t: t["pregnancy"]),
             ("scope-age", lambda t: not 30 <= t["age"] <= 79)]
    for truth in cohort.truth.values():
        expected = next((code for code, applies in order if applies(truth)), "scope-primary-prevention")
        assert truth["scope"] == expected, truth["patient_id"]
        assert truth["ascvd"]["established"] == any(v for k, v in truth["ascvd"].items() if k != "established")
        if truth["sparse"]:
            assert truth["scope"] in ("scope-primary-prevention", "scope-age")
    for k in range(1, cohort_mod.FIXTURE_PATIENTS + 1):
        truth = cohort.truth[f"ftp-{k:04d}"]
        assert not (truth["dialysis"] or truth["kidney_transplant"] or truth["ascvd"]["tia"]
                    or truth["ascvd"]["peripheral_arterial_disease"] or truth["ascvd"]["coronary_heart_disease"])


def test_reported_egfr_agrees_with_creatinine_and_some_is_in_ml_min(cohort: Cohort) -> None:
    units: Counter = Counter()
    for bundle, truth in zip(cohort.bundles, cohort.truth.values(), strict=True):
        obs = resources(bundle, "Observation")
        egfr = [o for o in obs if "98979-8" in codes_of(o["code"])]
        assert bool(egfr) == (truth["egfr_reported"] is not None)
        creat = {o["effectiveDateTime"]: o for o in obs if {"2160-0", "14682-9"} & codes_of(o["code"])
                 and o["status"] != "entered-in-error"}
        for o in egfr:
            unit = o["valueQuantity"]["code"]
            units[unit] += 1
            assert unit == truth["egfr_reported"] and o["category"][0]["coding"][0]["code"] == "laboratory"
            c = creat[o["effectiveDateTime"]]["valueQuantity"]
            if "code" not in c:
                continue
            scr = c["value"] / 88.4 if c["code"] == "umol/L" else c["value"]
            age = (date.fromisoformat(o["effectiveDateTime"][:10]) - date.fromisoformat(truth["birth_date"])).days
            expected = egfr_ckd_epi_2021(scr, age / 365.25, truth["sex"] == "female")
            if unit == "mL/min/{1.73_m2}":
                assert abs(o["valueQuantity"]["value"] - expected) <= 1.0 + 0.02 * expected
    assert units["mL/min"] >= 10 and units["mL/min/{1.73_m2}"] >= 100


def test_new_rates_are_documented() -> None:
    doc = cohort_mod.__doc__ or ""
    for name in ("RATE_TYPE1_DIABETES", "RATE_DM_COMPLICATION_ONLY", "RATE_DM_INSULIN_ONLY", "RATE_CHD", "RATE_TIA",
                 "RATE_PAD", "RATE_DIALYSIS", "RATE_KIDNEY_TRANSPLANT", "RATE_EGFR_REPORTED", "RATE_EGFR_ML_MIN",
                 "RATE_MED_REFERENCE", "RATE_MED_CONTAINED", "RATE_MED_DISPENSE_ONLY", "RATE_MED_DISPENSE_TOO",
                 "RATE_NO_CLINICAL_STATUS"):
        assert name in doc and 0 < getattr(cohort_mod, name) < 0.5, name


def test_generator_reads_no_adapter_data() -> None:
    source = Path(cohort_mod.__file__).read_text()
    assert "fhirtwin.adapters" not in source and "adapters/data" not in source and "valuesets" not in source
