"""Method identity of each equation, so a RiskAssessment can state which variant produced a number."""

from __future__ import annotations

from typing import Any

from ._validation import UnknownCategoryError, load_data

# equation name -> (data file, default variant, allowed variants, where the variant's citation lives)
_REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pce_ascvd_10y": ("pce_2013.json", "spreadsheet", ("spreadsheet", "table_A")),
    "prevent_risk": ("prevent_2024.json", "base", ("base", "uacr", "hba1c", "sdi", "full")),
    "egfr_ckd_epi_2021": ("ckd_epi_2021.json", "creatinine_2021", ("creatinine_2021",)),
    "kfre_risk": ("kfre.json", "4-variable", ("4-variable", "8-variable")),
    "mesa_chd_10y": ("mesa_chd_2015.json", "with_cac", ("with_cac", "without_cac")),
}
VERSION = "1"


def method_of(name: str, variant: str | None = None) -> dict[str, Any]:
    """Model name, variant and citation (paper, DOI, table) for an equation and variant.

    ``variant`` is the PCE ``variant``, the PREVENT ``model``, or the KFRE ``model``; None means the
    default. The returned dict is plain JSON, ready for ``RiskAssessment.method``/extensions.
    """
    if name not in _REGISTRY:
        raise UnknownCategoryError("method_of", "name", name, list(_REGISTRY))
    filename, default, allowed = _REGISTRY[name]
    variant = default if variant is None else variant
    if variant not in allowed:
        raise UnknownCategoryError("method_of", "variant", variant, allowed)
    data = load_data(filename)
    citation = dict(data["citation"])
    if name == "pce_ascvd_10y":
        citation.update(data["variants"][variant]["citation"])
    elif name == "kfre_risk":
        citation.update(data["models"][variant]["citation"])
    elif name == "prevent_risk":
        specific = data["models"][f"{variant}_10"]["citation"]
        citation.update({k: v for k, v in specific.items() if k != "variant"})
        citation["variant"] = f"{variant} model (10- and 30-year)"
    return {
        "function": f"fhirtwin.sim.equations.{name}",
        "model": data["equation"],
        "variant": variant,
        "implementation_version": VERSION,
        "data_file": filename,
        "citation": citation,
    }


PCE_METHOD = method_of("pce_ascvd_10y")
PREVENT_METHOD = method_of("prevent_risk")
CKD_EPI_2021_METHOD = method_of("egfr_ckd_epi_2021")
KFRE_METHOD = method_of("kfre_risk")
