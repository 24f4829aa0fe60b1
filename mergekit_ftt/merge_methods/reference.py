"""A NumPy reference for the kernel's last step, independent of its code: float64 values
rounded once to an output dtype. Tests and benchmarks check outputs against it.

For ``t + Σ wᵢ(fᵢ − b)`` it is the exact answer wherever the float64 sum is exact: every
element of real weights with weights ±1 (or other powers of two). For other weights, or
bit patterns with exponents far apart, only an exact reference (fractions) will do.
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
