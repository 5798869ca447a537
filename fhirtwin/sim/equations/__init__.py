"""Validated published risk equations: PCE 2013, AHA PREVENT, CKD-EPI 2021, Tangri KFRE and MESA CHD 2015.

Pure numpy and vectorised (inputs broadcast together), so ensembles can evaluate thousands of
parameter draws at once. Coefficients live in the JSON files beside the code, each with its citation.
"""

from ._methods import CKD_EPI_2021_METHOD, KFRE_METHOD, PCE_METHOD, PREVENT_METHOD, method_of
from ._validation import EquationInputError, OutOfRangeError, UnknownCategoryError
from .ckd_epi import egfr_ckd_epi_2021
from .kfre import kfre_risk
from .mesa import coronary_calcium_ratio, mesa_chd_10y
from .pce import pce_ascvd_10y
from .prevent import prevent_risk

__all__ = [
    "CKD_EPI_2021_METHOD",
    "KFRE_METHOD",
    "PCE_METHOD",
    "PREVENT_METHOD",
    "EquationInputError",
    "OutOfRangeError",
    "UnknownCategoryError",
    "coronary_calcium_ratio",
    "egfr_ckd_epi_2021",
    "kfre_risk",
    "mesa_chd_10y",
    "method_of",
    "pce_ascvd_10y",
    "prevent_risk",
]
