"""Import path kept for callers of ``kernels.reference.linear_weighted_ce`` (the ground truth);
the code lives in :mod:`kernels.weighted_ce.reference`."""
from kernels.weighted_ce.reference import (  # noqa: F401
    Epilogue,
    LossOutput,
    check_strategy,
    linear_weighted_ce,
    per_sample_ce,
    reweight_from_sums,
    sample_index,
)
