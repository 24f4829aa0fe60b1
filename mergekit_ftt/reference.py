"""The transfer's numbers computed the obvious, slow way: the reference for tests and
benchmarks.

:func:`rounded` rounds float64 values once to an output format in NumPy, independently of
torch's conversions and of the method's kernel (:mod:`mergekit_ftt.merge_methods`), so a
comparison with it can catch the kernel rounding twice. The merge itself never uses it.
"""

from __future__ import annotations

import numpy as np
import torch

# (significant bits, frexp exponent of the smallest normal number) of each output format.
FORMATS = {torch.bfloat16: (8, -125), torch.float16: (11, -13), torch.float32: (24, -125)}


def rounded(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded once to ``dtype``, to nearest, ties to even, in NumPy.

    Independent of torch's conversion (which goes through float32 for bf16/fp16): scale
    each value so that the format's last kept bit is the units digit, round it with
    ``np.rint`` (exact in float64, ties to even), scale back. Below the smallest normal
    number the spacing stays that of the subnormals. The result is exactly representable,
    so torch's final cast does not round.
    """
    bits, min_exponent = FORMATS[dtype]
    _, exponent = np.frexp(values)
    exponent = np.maximum(exponent, min_exponent)
    exact = np.ldexp(np.rint(np.ldexp(values, bits - exponent)), exponent - bits)
    return torch.from_numpy(exact).to(dtype)
