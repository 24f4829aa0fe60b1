"""The dense transfer kernel: ``t + Σ wᵢ(fᵢ − b)`` rounded once to the output dtype.

What is guaranteed: each output element is the exact real value of
``target + Σ weightᵢ · (finetunedᵢ − source_base)`` (a stored Δ is a term without
``source_base``; the weights taken as the float64 values they parse to) rounded once, to
nearest with ties to even, to the output dtype — for every input, exponent gaps,
subnormals and signed zeros included; an inf or NaN input gives IEEE float64's result.

Two implementations:

- on the CPU, with numba installed, a fused kernel (:mod:`mergekit_ftt.merge_methods.jit`):
  one pass over memory per tensor, float32 (bfloat16 or float16 inputs, power-of-two
  weights) or float64 arithmetic with error-free transformations that prove each element
  exact or settle its rounding; the rare element they cannot settle is
  recomputed here with Python fractions. Threads: torch's thread count (mergekit's ``-j``).
- otherwise (``--cuda``, or numba missing) the torch kernel: float64 chunk by chunk,
  rounded once (:func:`round_once`). It is exact wherever float64 arithmetic is, which on
  real weights is every element, but not for every bit pattern (docs/method.md).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import torch

from mergekit_ftt.delta.loader import StoredDelta
from mergekit_ftt.merge_methods.cpu import as_bits, compiled, empty_on_huge_pages

# Elements per float64 work chunk of the torch kernel on the CPU: the three scratch
# buffers (1 MiB each) stay in the cache through the ~10 passes over a chunk.
CHUNK_ELEMENTS = 1 << 17
# On an accelerator the kernel's cost is launches, not cache misses: few, large chunks.
DEVICE_CHUNK_ELEMENTS = 1 << 20
# Elements per thread at least: below, fewer threads (the start of one costs ~50 µs).
THREAD_MIN_ELEMENTS = 1 << 18

Term = torch.Tensor | StoredDelta  # a fine-tuned model's tensor, or a stored Δ

# (significant bits, smallest normal exponent, largest finite value) of each output format.
FORMATS = {
    torch.bfloat16: (8, -126, float(torch.finfo(torch.bfloat16).max)),
    torch.float16: (11, -14, float(torch.finfo(torch.float16).max)),
    torch.float32: (24, -126, float(torch.finfo(torch.float32).max)),
}
# Inputs whose differences and sums are nearly always exact in float32 (8 or 11 bits).
_NARROW = (torch.bfloat16, torch.float16)


def dense_transfer(
    target: torch.Tensor,
    source_base: torch.Tensor | None,
    terms: list[Term],
    weights: list[float],
    output_dtype: torch.dtype,
    jit: bool = True,
) -> torch.Tensor:
    """``target + Σ weightᵢ · Δᵢ`` rounded once to ``output_dtype`` (see the module doc);
    ``jit`` False takes the torch kernel (for comparisons: the default picks the fused one
    wherever it runs)."""
    tensors = [target, *(t.tensor if isinstance(t, StoredDelta) else t for t in terms)]
    if source_base is not None:
        tensors.append(source_base)
    fused = (
        jit
        and output_dtype in FORMATS
        and all(t.device.type == "cpu" and t.dtype in FORMATS for t in tensors)
        and compiled() is not None
    )
    transfer = _fused_transfer if fused else _torch_transfer
    out = transfer(target, source_base, terms, weights, output_dtype)
    _copy_full_rows(out, terms)
    return out


def _fused_transfer(target, source_base, terms, weights, output_dtype) -> torch.Tensor:
    jit = compiled()
    out = empty_on_huge_pages(target.shape, output_dtype)
    plus = [t.tensor if isinstance(t, StoredDelta) else t for t in terms]
    if len({t.dtype for t in plus}) > 1:  # one array type for all terms; widening is exact
        plus = [t.to(torch.float32) for t in plus]
    arrays = (
        as_bits(out),
        as_bits(target),
        tuple(as_bits(t) for t in plus),
        as_bits(source_base if source_base is not None else target),
        np.array([not isinstance(t, StoredDelta) for t in terms]),
        np.array(weights, dtype=np.float64),
        not all(_power_of_two(w) for w in weights),
        all(t.dtype in _NARROW for t in (target, *plus, source_base) if t is not None)
        and all(_power_of_two(w, limit=100) and w != 0 for w in weights),
    )
    if len(terms) == 1 and isinstance(terms[0], StoredDelta):  # a delta applied: in place
        corrections = [
            (index.numpy().astype(np.int64, copy=False), exact.numpy())
            for index, exact in terms[0].corrections
        ]
        flagged = _run(jit, arrays, out.numel(), corrections)
    else:  # the corrected elements of several terms, recomputed together
        flagged = _run(jit, arrays, out.numel()) + _corrected_elements(terms)
    _recompute(jit, _sorted_union(flagged), arrays, target, source_base, terms, out)
    return out


def _power_of_two(weight: float, limit: int = 900) -> bool:
    """A weight whose products are exact: 0 or ±2^k (1 included), |k| well inside the
    float format's range (``limit``: 900 for float64, 100 for float32)."""
    mantissa, exponent = math.frexp(weight)
    return weight == 0 or (abs(mantissa) == 0.5 and -limit < exponent < limit)


def _run(jit, arrays: tuple, elements: int, corrections=()) -> list[np.ndarray]:
    """:func:`jit.transfer` over ``elements``, split between torch's threads; then, each
    thread in its own range, a stored Δ's ``corrections`` (ascending flat indices and
    their exact values) in place (:func:`jit.corrected`). Returns the flagged indices,
    one ascending array per pass."""

    def work(start: int, stop: int) -> list[np.ndarray]:
        flagged = [jit.transfer(*arrays, start, stop)]
        for index, exact in corrections:
            low, high = np.searchsorted(index, [start, stop])
            if high > low:
                flagged.append(
                    jit.corrected(
                        arrays[0], arrays[1], index[low:high], exact[low:high], *arrays[4:7]
                    )
                )
        return flagged

    threads = max(1, min(torch.get_num_threads(), elements // THREAD_MIN_ELEMENTS))
    if threads == 1:
        return work(0, elements)
    step = -(-elements // threads)
    step += -step % jit.CHUNK
    bounds = [(start, min(start + step, elements)) for start in range(0, elements, step)]
    return [part for parts in _pool(threads).map(lambda b: work(*b), bounds) for part in parts]


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="ftt-kernel")


def _corrected_elements(terms: list[Term]) -> list[np.ndarray]:
    """Flat indices where a stored Δ holds its exact value apart (stored rounded): one
    ascending array per list of corrections."""
    return [
        index.numpy().astype(np.int64, copy=False)
        for term in terms
        if isinstance(term, StoredDelta)
        for index, _ in term.corrections
    ]


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    """The indices in any of ``parts`` (each ascending), ascending, once each.

    A stable sort merges ascending runs in linear time; ``np.unique`` hashes every index
    instead, which at 2.7% corrected elements took longer than the kernel itself.
    """
    parts = [part for part in parts if part.size]
    if not parts:
        return np.empty(0, dtype=np.int64)
    merged = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts), kind="stable")
    first = np.ones(merged.size, dtype=bool)
    np.not_equal(merged[1:], merged[:-1], out=first[1:])
    return merged[first]


def _recompute(jit, where: np.ndarray, arrays: tuple, target, source_base, terms, out) -> None:
    """Compute the elements at ``where`` (ascending) again from float64 copies of their
    inputs, with the exact values of stored Δ elements; those still flagged with
    fractions."""
    if not where.size:
        return
    index = torch.from_numpy(where)
    gathered_terms = []
    for term in terms:
        tensor = term.tensor if isinstance(term, StoredDelta) else term
        values = tensor.reshape(-1)[index].to(torch.float64)
        if isinstance(term, StoredDelta):  # its exact values where it holds them
            for flat, exact in term.corrections:
                flat = flat.to(torch.int64)
                position = torch.searchsorted(index, flat).clamp_(max=index.numel() - 1)
                held = index[position] == flat
                values[position[held]] = exact[held].to(torch.float64)
        gathered_terms.append(values)
    gathered_target = target.reshape(-1)[index].to(torch.float64)
    base = source_base if source_base is not None else target
    gathered_base = base.reshape(-1)[index].to(torch.float64)
    gathered_out = torch.empty(where.size, dtype=out.dtype)
    inputs = (
        as_bits(gathered_out),
        gathered_target.numpy(),
        tuple(t.numpy() for t in gathered_terms),
        gathered_base.numpy(),
        *arrays[4:7],
        False,  # float64 inputs
    )
    for position in jit.transfer(*inputs, 0, where.size):
        value = _exact(
            gathered_target[position],
            gathered_base[position],
            [t[position] for t in gathered_terms],
            arrays[4],
            arrays[5],
        )
        gathered_out[position] = round_fraction(value, out.dtype)
    out.view(-1)[index] = gathered_out


def _exact(target, source_base, terms, use_base, weights) -> Fraction:
    value = Fraction(float(target))
    for term, uses_base, weight in zip(terms, use_base, weights, strict=True):
        delta = Fraction(float(term)) - (Fraction(float(source_base)) if uses_base else 0)
        value += Fraction(float(weight)) * delta
    return value


def round_fraction(value: Fraction, dtype: torch.dtype) -> float:
    """``value`` rounded to nearest, ties to even, in ``dtype``'s format (as a float)."""
    bits, min_exponent, largest = FORMATS[dtype]
    if value == 0:
        return 0.0
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:  # 2^exponent ≤ magnitude < 2^(exponent+1)
        exponent -= 1
    unit = Fraction(2) ** (max(exponent, min_exponent) - bits + 1)
    rounded = float(round(magnitude / unit) * unit)  # round(): ties to even
    rounded = math.inf if rounded > largest else rounded
    return math.copysign(rounded, value)


# ---- the torch kernel ------------------------------------------------------------------

# Significant bits (the implicit one included) of the formats narrower than float32.
_SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}


def round_once(value: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write float64 ``value`` into ``out``, rounded once to nearest, ties to even.

    torch converts float64 to bfloat16 or float16 through float32, which rounds twice: a
    value just above a bf16 midpoint can land exactly on it in float32 and then round down
    to even. So ``value`` is first rounded *to odd* at two bits more than the output keeps
    (drop the low mantissa bits, and set the lowest kept bit if any dropped bit was set):
    that is exact in float32, and rounding it to nearest in the output format then equals
    rounding ``value`` once (Boldo & Melquiond, "Emulation of FMA and correctly rounded
    sums: proved algorithms using rounding to odd", 2008). All of it is four in-place
    integer passes over the float64 bit patterns, which torch runs at copy speed.

    ``value`` (float64, contiguous) is overwritten; ``scratch`` is float64 of its size.
    """
    bits = _SIGNIFICANT_BITS.get(out.dtype)
    if bits is not None:
        dropped = 53 - (bits + 2)
        mask = (1 << dropped) - 1
        value_bits = value.view(torch.int64)
        low = torch.bitwise_and(value_bits, mask, out=scratch.view(torch.int64))
        # low + mask carries into bit `dropped` exactly when a dropped bit is set (the
        # sticky bit); OR it in, then clear the dropped bits: truncation, lowest kept bit
        # forced to 1 if anything was dropped.
        value_bits.bitwise_or_(low.add_(mask)).bitwise_and_(~mask)
    out.copy_(value)


def _torch_transfer(target, source_base, terms, weights, output_dtype) -> torch.Tensor:
    """The transfer in float64 torch ops, chunk by chunk, rounded once (any device)."""
    out = torch.empty(target.shape, dtype=output_dtype, device=target.device)
    flat_out = out.view(-1)
    flat_target = target.reshape(-1)
    flat_terms = [
        term.tensor.reshape(-1) if isinstance(term, StoredDelta) else term.reshape(-1)
        for term in terms
    ]
    # float64 scratch allocated once per tensor and reused for each chunk. Every input
    # chunk is first copied into it (a widening copy is exact and fast; arithmetic with a
    # bf16 operand is several times slower in torch), so all arithmetic is float64 on
    # float64, in the order of w₁·Δ₁ + w₂·Δ₂ + … + target with Δᵢ = ftᵢ − sb or a stored
    # Δᵢ (its rounded elements replaced by their exact values), and round_once rounds the
    # sum to the output dtype once.
    chunk = CHUNK_ELEMENTS if target.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    size = min(chunk, flat_out.numel())
    delta_sum, base, scratch = (
        torch.empty(size, dtype=torch.float64, device=target.device) for _ in range(3)
    )
    for start in range(0, flat_out.numel(), chunk):
        window = slice(start, start + chunk)
        count = min(chunk, flat_out.numel() - start)
        chunk_sum, chunk_base, chunk_scratch = delta_sum[:count], base[:count], scratch[:count]
        if source_base is not None:
            chunk_base.copy_(source_base.reshape(-1)[window])
        for index, (term, flat, weight) in enumerate(zip(terms, flat_terms, weights, strict=True)):
            chunk_delta = chunk_scratch if index else chunk_sum
            chunk_delta.copy_(flat[window])
            if isinstance(term, StoredDelta):
                term.correct(chunk_delta, start)
            else:
                chunk_delta.sub_(chunk_base)
            if weight != 1.0:
                chunk_delta.mul_(weight)
            if index:
                chunk_sum.add_(chunk_delta)
        chunk_sum.add_(chunk_scratch.copy_(flat_target[window]))
        round_once(chunk_sum, flat_out[window], chunk_scratch)
    return out


def _copy_full_rows(out: torch.Tensor, terms: list[Term]) -> None:
    """Vocabulary rows a delta holds whole (tokens its base lacks) are the fine-tuned
    model's own rows: the output takes them as they are, as a transfer from the two models
    does (mergekit fills the target's and base's missing rows with the fine-tuned row)."""
    for term in terms:
        if isinstance(term, StoredDelta) and term.full_rows:
            values = term.exact_rows()
            rounded = torch.empty(values.shape, dtype=out.dtype, device=out.device)
            round_once(values, rounded, torch.empty_like(values))
            out.view(out.shape[0], -1)[list(term.full_rows)] = rounded
