"""The numba half of the fused transfer kernel (:mod:`mergekit_ftt.merge_methods.kernel`),
and of the delta decoder (:func:`unpack_signs`, :func:`unpack_sparse`).

Imported only when a CPU transfer runs: numba costs ~0.4 s to import, which neither the
start-up hook nor a merge with another method should pay. Every function is compiled
once per input-dtype combination and cached on disk (``cache=True``).

Formats travel as NumPy arrays of their bits where NumPy or numba lack the type:
bfloat16 as ``uint16``, float16 as ``int16`` (numba has no float16 on the CPU). The
array's dtype picks the decoder and encoder at compile time.

Per element, one pass: decode every input to float64 (or float32), compute
``t + Σ wᵢ(fᵢ − b)`` (a stored Δ is a term without ``b``) and round it once to the output
format, in one of four ways (:func:`transfer`):

- every weight a power of two (±1 included) and every input bfloat16 or float16: first in
  float32, twice as many elements per vector instruction, each operation checked exact
  (:func:`_exact_sum32`); an exact float32 sum rounded to the output is the exact value
  rounded once. A chunk with an element that was not exact in float32 (an exponent gap
  of more than ~16 bits, or an inf or NaN) is computed again in float64;
- every weight a power of two: each product is exact, and TwoSum's error terms prove
  every addition exact; an element where one was not is flagged;
- one term with any other weight (:func:`_one_term`): the FMA rounds ``t + w·d`` once to
  float64 and ErrFma gives its exact error, whose sign rounds the result to odd, so that
  rounding it to the output equals rounding the exact value once;
- several such terms: the float64 sum is bracketed by an a-priori error bound, and the
  elements whose bracket straddles a rounding boundary are settled from their error terms
  (:func:`_general`).

Flagged elements (inputs with exponents too far apart) are returned to the caller, which
recomputes them exactly (``kernel._recompute``, then Python fractions). On realistic
weights none are flagged.
"""

from __future__ import annotations

import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

# numba's SSA pass warns ("internal pedantic check") about the branches of every function
# inlined with ``inline="always"``: ~90 warnings on a first compile, about numba's own IR,
# nothing a user can act on. The compiled code is checked against exact references
# (tests/test_kernel.py).
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

# Elements per check of the power-of-two kernel: a chunk with a flagged element is
# computed again, element by element, to list them.
CHUNK = 1 << 12


def _bitcast(source, target):
    """An intrinsic reading a ``source`` value's bits as ``target`` (an integer argument of
    another width is truncated or extended first: numba widens integer arithmetic)."""

    @intrinsic
    def bitcast(typingctx, value):
        if value != source and not (
            isinstance(source, types.Integer) and isinstance(value, types.Integer)
        ):
            return None

        def codegen(context, builder, signature, args):
            argument = args[0]
            if value != source:
                width = ir.IntType(source.bitwidth)
                if value.bitwidth > source.bitwidth:
                    argument = builder.trunc(argument, width)
                elif value.bitwidth < source.bitwidth:
                    argument = builder.zext(argument, width)
            return builder.bitcast(argument, context.get_value_type(target))

        return target(value), codegen

    return bitcast


_f64_bits = _bitcast(types.float64, types.int64)
_bits_f64 = _bitcast(types.int64, types.float64)
_f32_bits = _bitcast(types.float32, types.uint32)
_bits_f32 = _bitcast(types.uint32, types.float32)


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma: one instruction where the CPU has FMA)."""
    if not (a == b == c == types.float64):
        return None

    def codegen(context, builder, signature, args):
        double = ir.DoubleType()
        signature = ir.FunctionType(double, [double, double, double])
        function = builder.module.declare_intrinsic("llvm.fma", [double], signature)
        return builder.call(function, args)

    return types.float64(types.float64, types.float64, types.float64), codegen


# ---- decoding: one input element to float64 (exact) --------------------------------------


def decode(value):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(decode, inline="always")
def _decode(value):
    if value in (types.uint16, types.int16):  # bfloat16, float16: exact in float32 already
        return lambda value: np.float64(decode32(value))
    if value in (types.float32, types.float64):
        return lambda value: np.float64(value)
    return None


# ---- rounding: float64 to the output format, once, to nearest, ties to even ------------


def encode(out, value):  # pragma: no cover
    raise NotImplementedError


@overload(encode, inline="always")
def _encode(out, value):
    """The output format's bits of float64 ``value`` rounded once (the array's dtype)."""
    if out.dtype == types.uint16:

        def bf16(out, value):
            # Round to odd at 10 bits (8 kept + 2): then float64 → float32 is exact and
            # rounding that to 8 bits equals rounding ``value`` once (Boldo–Melquiond).
            single = np.float32(_bits_f64(_round_to_odd(_f64_bits(value), 43)))
            bits = _f32_bits(single)
            if single != single:  # NaN: quiet, sign kept
                return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.uint16(rounded >> np.uint32(16))

        return bf16
    if out.dtype == types.int16:

        def fp16(out, value):
            single = np.float32(_bits_f64(_round_to_odd(_f64_bits(value), 40)))
            return np.int16(_float32_to_half(_f32_bits(single)))  # same bits

        return fp16
    if out.dtype == types.float32:
        return lambda out, value: np.float32(value)
    return None


def decode32(value):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(decode32, inline="always")
def _decode32(value):
    """A bfloat16 or float16 element as float32 (exact); float32 as itself (float64 only
    compiles: :func:`transfer` takes float32 for narrow inputs only)."""
    if value == types.uint16:  # bfloat16: the top half of a float32
        return lambda value: _bits_f32(np.uint32(value) << np.uint32(16))
    if value == types.int16:  # float16

        def fp16(value):
            bits = np.uint32(value) & np.uint32(0xFFFF)
            sign = (bits & np.uint32(0x8000)) << np.uint32(16)
            shifted = (bits & np.uint32(0x7FFF)) << np.uint32(13)
            # A float16's fields, moved into a float32, read 2^112 too small (normal and
            # subnormal alike, and the product is exact); exponent 31 (inf, NaN) becomes
            # float32's 255.
            magnitude = np.float32(0.0)
            if shifted >= np.uint32(0x0F800000):
                magnitude = _bits_f32(shifted | np.uint32(0x7F800000))
            else:
                magnitude = _bits_f32(shifted) * np.float32(2.0**112)
            return -magnitude if sign else magnitude

        return fp16
    if value in (types.float32, types.float64):
        return lambda value: np.float32(value)
    return None


def encode32(out, value):  # pragma: no cover
    raise NotImplementedError


@overload(encode32, inline="always")
def _encode32(out, value):
    """The output format's bits of finite float32 ``value`` rounded to nearest, ties to
    even: one rounding, so the exact value's when ``value`` is exact."""
    if out.dtype == types.uint16:

        def bf16(out, value):
            bits = _f32_bits(value)
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.uint16(rounded >> np.uint32(16))

        return bf16
    if out.dtype == types.int16:
        return lambda out, value: np.int16(_float32_to_half(_f32_bits(value)))
    if out.dtype == types.float32:
        return lambda out, value: value
    return None


@njit(inline="always")
def _round_to_odd(bits, dropped):
    """Drop the low ``dropped`` mantissa bits; set the lowest kept one if any was set."""
    mask = (np.int64(1) << np.int64(dropped)) - np.int64(1)
    low = bits & mask
    return (bits | (low + mask)) & ~mask


@njit(inline="always")
def _float32_to_half(bits):
    """float32 bits → float16 bits, to nearest, ties to even (F. Giesen's branch-light form)."""
    sign = bits & np.uint32(0x80000000)
    magnitude = bits ^ sign
    half = np.uint32(0)
    if magnitude >= np.uint32(0x47800000):  # ≥ 2^16: inf, or NaN (quiet)
        half = np.uint32(0x7E00) if magnitude > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif magnitude < np.uint32(0x38800000):  # below 2^-14: float16 subnormal or zero
        # Adding 0.5 puts the float16 subnormal spacing (2^-24) at float32's last bit.
        total = _bits_f32(magnitude) + np.float32(0.5)
        half = _f32_bits(total) - np.uint32(0x3F000000)
    else:
        odd = (magnitude >> np.uint32(13)) & np.uint32(1)
        half = (magnitude - np.uint32(0x38000000) + np.uint32(0xFFF) + odd) >> np.uint32(13)
    return np.uint16(half | (sign >> np.uint32(16)))


@njit(inline="always")
def _two_sum(a, b):
    """(RN(a + b), the exact error): a + b = sum + error exactly (Knuth's TwoSum)."""
    total = a + b
    shifted = total - a
    return total, (a - (total - shifted)) + (b - shifted)


@njit(inline="always")
def _unit(value):
    """The spacing of float64 numbers at ``value`` (its ulp), for finite ``value``."""
    bits = _f64_bits(abs(value)) & np.int64(0x7FF0000000000000)
    return max(_bits_f64(bits) * 2.0**-52, 2.0**-1074)


# ---- the kernel ------------------------------------------------------------------------
# Indices are unsigned: numba then drops its check for negative indices, which would
# stop the compiler from vectorising the loops.


@njit(inline="always")
def _minus_base(scale, b):
    """−b for a fine-tuned model's term (scale −1), 0 for a stored Δ's (scale 0), which
    never reads the base: 0·b would be NaN where b (the target, then) is inf."""
    return scale * b if scale != 0.0 else 0.0


@njit(inline="always")
def _sum(i, target, plus, base, scales, weights):
    """(float64 ``t + Σ wᵢ(fᵢ − b)``, OR of the bits of every addition's exact error)."""
    total = decode(target[i])
    b = decode(base[i])
    errors = np.int64(0)
    for q in range(len(plus)):
        d, d_error = _two_sum(decode(plus[q][i]), _minus_base(scales[q], b))
        total, sum_error = _two_sum(total, weights[q] * d)
        errors |= _f64_bits(d_error) | _f64_bits(sum_error)
    return total, errors & np.int64(0x7FFFFFFFFFFFFFFF)  # −0.0 is no error


@njit(inline="always")
def _exact(a, b, total):
    """Whether ``total = RN(a + b)`` is exact: then ``total − a`` and ``total − b`` are ``b``
    and ``a``. When it is not, the difference with the larger operand is computed exactly
    (the Fast2Sum lemma) and differs from the other operand; NaN compares unequal."""
    return ((total - a) == b) & ((total - b) == a)


@njit(inline="always")
def _add32(total, f, b, scale, weight, inverse):
    """(float32 ``total + weight·(f − b)``, or ``+ weight·f`` for ``scale`` 0, as
    :func:`_minus_base`; whether every operation was exact). ``weight`` is a power of two
    and ``inverse`` its reciprocal: the product was exact when it divides back to ``d``."""
    minus = -b if scale != 0.0 else np.float32(0.0)
    d = f + minus
    product = weight * d
    added = total + product
    return added, _exact(f, minus, d) & (product * inverse == d) & _exact(total, product, added)


@njit(inline="always")
def _exact_sum32(i, target, plus, base, scales, weights, inverses):
    """(float32 ``t + Σ wᵢ(fᵢ − b)``, whether every operation was exact), for bfloat16 or
    float16 inputs and power-of-two weights."""
    total = decode32(target[i])
    b = decode32(base[i])
    exact = True
    for q in range(len(plus)):
        f = decode32(plus[q][i])
        total, exact_q = _add32(total, f, b, scales[q], weights[q], inverses[q])
        exact &= exact_q
    return total, exact


@njit(inline="always")
def _bracketed(i, target, plus, base, scales, weights, out):
    """(bits, settled): the float64 sum and an a-priori bound on its error; settled when
    both ends of the interval round to the same output (then so does the exact value).

    The bound is twice the classic one for k products and k + 1 sums, plus a margin for
    computing the ends themselves in float64; inf or NaN inputs give IEEE's result.
    """
    total = decode(target[i])
    b = decode(base[i])
    magnitude = abs(total)
    for q in range(len(plus)):
        f = decode(plus[q][i])
        minus = _minus_base(scales[q], b)
        total += weights[q] * (f + minus)
        magnitude += abs(weights[q]) * (abs(f) + abs(minus))
    bound = (len(plus) + 3) * 2.0**-52 * magnitude + abs(total) * 2.0**-50 + 2.0**-1060
    low = encode(out, total - bound)
    finite = np.isfinite(magnitude)
    return (low if finite else encode(out, total)), (low == encode(out, total + bound)) | (
        not finite
    )


@njit(inline="always")
def _fast_two_sum(a, b):
    """(RN(a + b), the exact error) for |a| ≥ |b| (Dekker's Fast2Sum)."""
    total = a + b
    return total, b - (total - a)


@njit(inline="always")
def _one_term(i, target, finetuned, base, scale, weight, out):
    """(bits, flagged) of element ``i`` of ``t + w·(f − b)`` with any weight, rounded once.

    ``d = f − b`` is exact unless TwoSum says otherwise (flagged). The FMA gives
    ``s = RN(t + w·d)``, and ErrFma (Boldo & Muller, "Exact and approximated error of the
    FMA", 2011) its error exactly as ``r₂ + r₃`` with ``|r₃| ≤ ulp(r₂)/2``, so the
    error's sign is ``r₂``'s, or ``r₃``'s when ``r₂`` is 0. ``s`` rounded to odd with
    that sign as sticky bit (:func:`_settle`'s step, without a branch) then rounds to the
    output like the exact value. Rounding ``s`` itself would round twice: with decimal
    weights such as 0.7, ``s`` falls on an output midpoint for ~8% of bf16 elements.
    Flagged, for an exact computation: an inexact ``d``, a product too small for ErrFma
    (it needs no underflow), an error that is not finite while ``s`` is.
    """
    t = decode(target[i])
    d, d_error = _two_sum(decode(finetuned[i]), _minus_base(scale, decode(base[i])))
    total = _fma(weight, d, t)
    product = weight * d
    a1, a2 = _two_sum(t, _fma(weight, d, -product))
    b1, b2 = _two_sum(product, a1)
    r2, r3 = _fast_two_sum((b1 - total) + b2, a2)
    residual = r2 if r2 != 0.0 else r3
    bits = _f64_bits(total)
    finite = np.isfinite(total)  # inf or NaN: IEEE's result, as the FMA gives it
    odd_step = finite & (residual != 0.0) & ((bits & np.int64(1)) == 0)
    grows = (residual > 0.0) == (total > 0.0)  # the odd neighbour has the larger magnitude
    step = np.int64(odd_step) * (np.int64(2) * np.int64(grows) - np.int64(1))
    flagged = finite & (
        (d_error != 0.0)
        | ((abs(product) < 2.0**-960) & (product != 0.0))
        | ((abs(total) < 2.0**-1000) & (residual != 0.0))
        | (not np.isfinite(residual))
    )
    return encode(out, _bits_f64(bits + step)), flagged


@njit(inline="always")
def _general(i, target, plus, base, scales, weights, out):
    """(bits, flagged) of element ``i`` with any weights (:func:`_settle`)."""
    total = decode(target[i])
    b = decode(base[i])
    residual = 0.0
    lost = 0.0  # ≥ |exact residual − residual|: the errors of summing the residual
    for q in range(len(plus)):
        weight = weights[q]
        d, d_error = _two_sum(decode(plus[q][i]), _minus_base(scales[q], b))
        product = weight * d
        total, sum_error = _two_sum(total, product)
        scaled = weight * d_error
        residual, error_1 = _two_sum(residual, sum_error)
        residual, error_2 = _two_sum(residual, _fma(weight, d, -product))
        residual, error_3 = _two_sum(residual, scaled)
        lost += abs(error_1) + abs(error_2) + abs(error_3) + abs(_fma(weight, d_error, -scaled))
    return _settle(total, residual, 2.0 * lost, out)


@njit(nogil=True, cache=True)
def transfer(out, target, plus, base, use_base, weights, general, narrow, start, stop):
    """Fill ``out[start:stop]``; returns the indices of the flagged elements there.

    ``general`` False (every weight a power of two): an element is flagged unless every
    float64 operation was exact; with ``narrow`` (bfloat16 or float16 inputs, weights
    within float32's range) float32 is tried first, chunk by chunk, and a chunk is taken
    in float64 only when an element was not exact in float32. ``general`` True: with one
    term, :func:`_one_term`
    rounds every element exactly in one vectorised pass; with more, elements are
    bracketed, and those the bracket leaves open settled one by one (:func:`_settle`),
    which flags only those whose residual it cannot trust.
    """
    scales = np.where(use_base, -1.0, 0.0)
    scales32, weights32 = scales.astype(np.float32), weights.astype(np.float32)
    inverses32 = (1.0 / weights).astype(np.float32) if narrow else weights32
    marks = np.empty(CHUNK, dtype=np.uint8)
    flagged = []
    for first in range(np.uint64(start), np.uint64(stop), np.uint64(CHUNK)):
        last = min(first + np.uint64(CHUNK), np.uint64(stop))
        if general and len(plus) == 1:  # one term (a compile-time constant): ErrFma
            flags = False
            for i in range(first, last):
                bits, flag = _one_term(i, target, plus[0], base, scales[0], weights[0], out)
                out[i] = bits
                flags |= flag
            if flags:  # rare: list the elements
                for i in range(first, last):
                    if _one_term(i, target, plus[0], base, scales[0], weights[0], out)[1]:
                        flagged.append(i)
            continue
        if general:
            unsettled = np.uint8(0)
            for j in range(last - first):
                bits, settled = _bracketed(first + j, target, plus, base, scales, weights, out)
                out[first + j] = bits
                marks[j] = not settled
                unsettled |= marks[j]
            if unsettled:  # a few percent of the elements: settle them one by one
                for j in range(last - first):
                    if marks[j]:
                        i = first + j
                        bits, flag = _general(i, target, plus, base, scales, weights, out)
                        out[i] = bits
                        if flag:
                            flagged.append(i)
            continue
        if narrow:
            exact = True
            if len(plus) == 1:  # one term: its scalars in registers, not re-read per element
                scale, weight, inverse = scales32[0], weights32[0], inverses32[0]
                for i in range(first, last):
                    t, f, b = decode32(target[i]), decode32(plus[0][i]), decode32(base[i])
                    total32, exact32 = _add32(t, f, b, scale, weight, inverse)
                    out[i] = encode32(out, total32)
                    exact &= exact32
            else:
                for i in range(first, last):
                    total32, exact32 = _exact_sum32(
                        i, target, plus, base, scales32, weights32, inverses32
                    )
                    out[i] = encode32(out, total32)
                    exact &= exact32
            if exact:
                continue
        inexact = np.int64(0)
        for i in range(first, last):
            total, errors = _sum(i, target, plus, base, scales, weights)
            out[i] = encode(out, total)
            inexact |= errors
        if inexact:  # rare: list the elements
            for i in range(first, last):
                total, errors = _sum(i, target, plus, base, scales, weights)
                if errors and np.isfinite(total):
                    flagged.append(i)
    return np.array(flagged, dtype=np.int64)


@njit(nogil=True, cache=True)
def corrected(out, target, index, exact, use_base, weights, general):
    """``out[index[k]]`` = ``target + w·exact[k]`` rounded once, for a transfer whose one
    term is a stored Δ that holds ``exact[k]`` apart (its stored element was rounded).
    Gathers blocks of elements and runs :func:`transfer` on them; returns the flat
    indices it flagged (rare: the caller settles them with fractions)."""
    targets = np.empty(CHUNK, dtype=np.float64)
    values = np.empty(CHUNK, dtype=np.float64)
    block = np.empty(CHUNK, dtype=out.dtype)
    flagged = []
    for first in range(0, len(index), CHUNK):
        count = min(CHUNK, len(index) - first)
        for j in range(count):
            targets[j] = decode(target[index[first + j]])
            values[j] = exact[first + j]
        for j in transfer(
            block, targets, (values,), targets, use_base, weights, general, False, 0, count
        ):
            flagged.append(index[first + j])
        for j in range(count):
            out[index[first + j]] = block[j]
    return np.array(flagged, dtype=np.int64)


@njit(inline="always")
def _settle(total, residual, uncertain, out):
    """(bits, flagged) of the exact value ``total + residual ± uncertain`` rounded once.

    Rounding ``total`` to odd at 53 bits with the residual as sticky bit — the neighbour
    toward the residual where ``total``'s last bit is even — then once to the output
    equals rounding the exact value once (Boldo–Melquiond). That needs the residual's
    sign (certain when it exceeds ``uncertain``) and the exact value to lie before that
    neighbour; elements where either fails are flagged.
    """
    if not np.isfinite(total) or (residual == 0.0 and uncertain == 0.0):
        return encode(out, total), False
    # Renormalise (TwoSum, exact): |residual| ≤ ulp(total)/2 now.
    total, error = _two_sum(total, residual)
    residual = error
    toward_zero = (residual > 0.0) != (total > 0.0)
    power_of_two = (_f64_bits(total) & np.int64(0xFFFFFFFFFFFFF)) == 0
    room = _unit(total) * (0.5 if toward_zero and power_of_two else 1.0)
    if abs(residual) <= uncertain or abs(residual) + uncertain >= room:
        return encode(out, total), residual != 0.0 or uncertain != 0.0
    if (_f64_bits(total) & np.int64(1)) == 0:  # even: step to the odd neighbour
        if total == 0.0:
            total = 2.0**-1074 if residual > 0.0 else -(2.0**-1074)
        else:
            larger = (residual > 0.0) == (total > 0.0)  # the magnitude grows
            total = _bits_f64(_f64_bits(total) + (np.int64(1) if larger else np.int64(-1)))
    return encode(out, total), False


# ---- decoding a stored Δ: the sign and sparse forms, one pass ---------------------------
# Bits are packed in flat order, least significant first (delta.encode.pack_bits); the
# arrays hold the stored dtype's bits (as_bits), copied, never converted.


@njit(nogil=True, cache=True)
def unpack_signs(out, packed, positive, negative, row_elements):
    """``out[i]`` = its row's ``positive`` where bit ``i`` of ``packed`` is set, else its
    ``negative`` (one value for every row where they hold one)."""
    per_row = len(positive) > 1
    for row in range(np.uint64(len(out) // row_elements)):
        which = row if per_row else np.uint64(0)
        plus, minus = positive[which], negative[which]
        first = row * np.uint64(row_elements)
        for i in range(first, first + np.uint64(row_elements)):
            bit = (packed[i >> np.uint64(3)] >> (i & np.uint64(7))) & np.uint8(1)
            out[i] = plus if bit else minus


def _set_bits() -> tuple[np.ndarray, np.ndarray]:
    """(how many bits each byte value has set, their positions, lowest first)."""
    counts = np.zeros(256, dtype=np.uint8)
    positions = np.zeros((256, 8), dtype=np.uint8)
    for byte in range(256):
        where = [bit for bit in range(8) if byte >> bit & 1]
        counts[byte] = len(where)
        positions[byte, : len(where)] = where
    return counts, positions


_SET_BIT_COUNTS, _SET_BIT_POSITIONS = _set_bits()


@njit(nogil=True, cache=True)
def unpack_sparse(out, packed, values):
    """``out[i]`` = the next of ``values`` where bit ``i`` of ``packed`` is set, else 0.
    Returns how many values the mask asks for; when that is not ``len(values)`` (a damaged
    file), ``out`` is incomplete and the caller raises. A byte's set bits come from a
    table: a branch per element would be mispredicted at every density but the extremes."""
    out[:] = 0
    wanted = np.uint64(0)
    available = np.uint64(len(values))
    for index in range(np.uint64(len(packed))):
        byte = packed[index]
        count = np.uint64(_SET_BIT_COUNTS[byte])
        first = index << np.uint64(3)
        if wanted + count <= available and first + np.uint64(8) <= np.uint64(len(out)):
            for k in range(count):
                out[first + np.uint64(_SET_BIT_POSITIONS[byte, k])] = values[wanted + k]
        elif wanted + count <= available:  # the last, partial byte
            for k in range(count):
                position = first + np.uint64(_SET_BIT_POSITIONS[byte, k])
                if position < np.uint64(len(out)):
                    out[position] = values[wanted + k]
        wanted += count
    return wanted
