"""What the compiled CPU code (:mod:`mergekit_ftt.merge_methods.jit`) needs around it.

Shared by the transfer kernel (:mod:`mergekit_ftt.merge_methods.kernel`) and the delta
decoder (:func:`mergekit_ftt.delta.encode.decode`): the compiled half, imported on first
use; tensors handed over as NumPy arrays of their bits; and fresh buffers on huge pages.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from types import ModuleType

import numpy as np
import torch

# How the compiled code receives each dtype (numba has no bfloat16 or float16): the bits,
# whose array dtype selects the decoder and encoder at compile time.
_AS_NUMPY = {torch.bfloat16: torch.uint16, torch.float16: torch.int16, torch.float32: None}

# Linux's madvise advice for transparent huge pages, and the huge page size on x86/arm64.
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 1 << 21


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled half, imported on first use (numba costs ~0.4 s to import, which
    neither the start-up hook nor a merge with another method should pay); None where
    numba is not installed."""
    try:
        from mergekit_ftt.merge_methods import jit
    except ImportError:
        return None
    return jit


def as_bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a flat NumPy array the compiled code reads: bfloat16 as ``uint16``,
    float16 as ``int16``, float32 and integer dtypes as themselves. No copy."""
    flat = tensor.reshape(-1)
    as_bits = _AS_NUMPY.get(flat.dtype)
    return (flat.view(as_bits) if as_bits else flat).numpy()


def empty_on_huge_pages(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, asking Linux to back it with 2 MiB pages (where the system leaves
    transparent huge pages to ``madvise``, the usual default). A fresh buffer is touched
    first by the compiled code: with 4 KiB pages each first touch is a page fault, ~1 ns
    per bf16 element, as long as the kernel's own work; 2 MiB pages take 512× fewer
    (docs/performance.md)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    libc = _libc()
    if libc is not None and nbytes >= 2 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return out


@functools.cache
def _libc():
    """The C library where it has ``madvise`` (Linux), else None; advice is best effort."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc
