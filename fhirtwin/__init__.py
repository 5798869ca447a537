"""fhirtwin: FHIR-native multi-scale digital twins for personalised medicine.

One BLAS thread unless the deployment says otherwise (set before numpy loads): the engine's matrix products
are small (at most 1,000 x 11 by 11 x 121), a multithreaded BLAS gains nothing on them and its spinning
threads burned 2.7x the CPU of a single thread per 1,000-draw ensemble (75 vs 28 ms, measured); a population
run gets its parallelism from processes instead. Set ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``) before importing fhirtwin to choose otherwise.
"""

import os as _os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_variable, "1")

__version__ = "0.3.0"
