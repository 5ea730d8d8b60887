"""Test-session setup: single-threaded BLAS (the arrays here are tiny; threads only add contention)."""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
