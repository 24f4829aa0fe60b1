"""The merge kernel against independent references: NumPy float64 where that is exact,
Python fractions everywhere (mergekit's tensor API and the kernel itself)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from mergekit_ftt.delta.loader import StoredDelta
from mergekit_ftt.merge_methods import jit, kernel
from mergekit_ftt.merge_methods.finetuning_transfer import FinetuningTransferError
from mergekit_ftt.merge_methods.kernel import CHUNK_ELEMENTS, round_once
from mergekit_ftt.reference import FORMATS, rounded

IDS = ["target", "ft_a", "ft_b", "source_base"]
ROLES = {"ft_a": "source_finetuned", "ft_b": "source_finetuned", "source_base": "source_base"}


def random_inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in IDS]


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float32).numpy().astype(np.float64)


def numpy_reference(target, ft_a, ft_b, source_base, weight_a, weight_b) -> np.ndarray:
    base = as_float64(source_base)
    deltas = weight_a * (as_float64(ft_a) - base) + weight_b * (as_float64(ft_b) - base)
    return deltas + as_float64(target)


def transfer(tensors, **parameters):
    # mergekit binds a per-input mapping for every non-base input; the kernel reads
    # weights and densities of the fine-tuned inputs only.
    parameters = {
        name: {"source_base": 1.0, **value} if isinstance(value, dict) else value
        for name, value in parameters.items()
    }
    return merge_tensors(
        tensors,
        "finetuning_transfer",
        ids=IDS,
        base_index=0,
        parameters={"role": ROLES, **parameters},
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
# More elements than one work chunk, and a count that is not a multiple of it.
@pytest.mark.parametrize("shape", [(3, 5), (CHUNK_ELEMENTS // 512 + 3, 512)])
def test_dense_transfer_is_float64_rounded_once(dtype, shape):
    """Weights that are powers of two keep the float64 sum exact on such inputs, so the
    float64 reference is the exact one (other weights: test_kernel_is_exact_...)."""
    tensors = random_inputs(shape, dtype)
    weights = {"ft_a": 0.5, "ft_b": 2.0}
    merged = transfer(tensors, weight=weights)
    expected = numpy_reference(*tensors, weights["ft_a"], weights["ft_b"])
    assert merged.dtype == dtype
    assert merged.shape == shape
    assert torch.equal(merged, rounded(expected, dtype))


@pytest.mark.parametrize("threads", [1, 3])
def test_dense_transfer_is_the_same_on_any_number_of_threads(threads):
    """Every chunk is rounded on its own, however torch splits its ops between threads."""
    tensors = random_inputs((10 * CHUNK_ELEMENTS + 77,), torch.bfloat16, seed=4)
    weights = {"ft_a": 0.25, "ft_b": 1.0}
    expected = rounded(numpy_reference(*tensors, 0.25, 1.0), torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merged = transfer(tensors, weight=weights)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(merged, expected)


def test_bf16_transfer_differs_from_bf16_task_arithmetic():
    """Why the method computes in float64: bf16 arithmetic mis-rounds many elements."""
    target, ft, _, source_base = random_inputs((256, 256), torch.bfloat16, seed=3)
    exact = rounded(numpy_reference(target, ft, ft, source_base, 1.0, 0.0), torch.bfloat16)
    in_bf16 = target + (ft - source_base)
    merged = transfer([target, ft, ft, source_base], weight={"ft_a": 1.0, "ft_b": 0.0})
    assert torch.equal(merged, exact)
    mis_rounded = (in_bf16 != exact).float().mean().item()
    assert mis_rounded > 0.05


def test_default_weight_is_one():
    tensors = random_inputs((4, 4), torch.float32)
    expected = numpy_reference(*tensors, 1.0, 1.0)
    assert torch.equal(transfer(tensors), rounded(expected, torch.float32))


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16])
def test_float32_deltas_rounded_once_to_a_narrower_output(output_dtype):
    """A float32 delta on a narrow target, rounded to ``output_dtype`` in one step.

    Half the deltas put the exact sum a hair above a midpoint of the output format, where
    rounding through float32 lands on the midpoint and rounds down to even.
    """
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(4096, generator=generator).to(output_dtype)
    bits, _ = FORMATS[output_dtype]
    _, exponent = torch.frexp(target.to(torch.float64))
    half_unit = torch.ldexp(torch.ones(4096, dtype=torch.float64), exponent - bits - 1)
    hair = half_unit * 2.0**-20 * torch.where(torch.arange(4096) % 2 == 0, 1.0, -1.0)
    # Small source-base values, so that float32 fine-tuned values can hold the hair.
    source_base = torch.randn(4096, generator=generator) * 2.0**-14
    finetuned = (source_base.to(torch.float64) + half_unit + hair).to(torch.float32)
    tensors = [target, finetuned, finetuned, source_base]
    name = str(output_dtype).removeprefix("torch.")
    merged = transfer(tensors, weight={"ft_a": 1.0, "ft_b": 0.0}, output_dtype=name)
    expected = rounded(numpy_reference(*tensors, 1.0, 0.0), output_dtype)
    assert merged.dtype == output_dtype
    assert torch.equal(merged, expected)
    through_float32 = torch.from_numpy(numpy_reference(*tensors, 1.0, 0.0)).to(output_dtype)
    assert (through_float32 != expected).sum() > 100  # the cases this test is about


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16])
def test_round_once_at_midpoints_subnormals_and_specials(output_dtype):
    """Every float64 one ulp either side of an output midpoint, on it, and between, at
    normal, subnormal and overflowing magnitudes of the output format, signed."""
    bits, min_exponent = FORMATS[output_dtype]
    generator = np.random.default_rng(7)
    exponents = np.arange(min_exponent - bits - 2, 17 if output_dtype == torch.float16 else 129)
    mantissas = generator.integers(1 << (bits - 1), 1 << bits, size=exponents.size)
    # A midpoint of the output format at each exponent (or of the subnormal spacing).
    spacing = np.ldexp(1.0, np.maximum(exponents, min_exponent) - bits)
    midpoints = np.ldexp(mantissas.astype(np.float64), exponents - bits) + spacing / 2
    far = np.spacing(midpoints) * 2**20  # off the midpoint, but not in float32
    values = np.concatenate(
        [
            midpoints,
            np.nextafter(midpoints, -np.inf),
            np.nextafter(midpoints, np.inf),
            midpoints - far,
            midpoints + far,
            generator.standard_normal(4096) * 10.0 ** generator.integers(-8, 3, 4096),
        ]
    )
    values = np.concatenate([values, -values, [0.0, -0.0, np.inf, -np.inf, np.nan]])
    expected = rounded(values, output_dtype)
    got = torch.empty(values.size, dtype=output_dtype)
    value = torch.from_numpy(values.copy())
    round_once(value, got, torch.empty_like(value))
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


def numpy_magnitude_mask(delta: np.ndarray, density: float) -> np.ndarray:
    keep = max(1, int(density * delta.size))
    threshold_order = np.argsort(-np.abs(delta), axis=None, kind="stable")[:keep]
    mask = np.zeros(delta.size)
    mask[threshold_order] = 1
    return mask.reshape(delta.shape)


def test_ties_consensus_uses_deltas_against_source_base():
    tensors = random_inputs((16, 16), torch.float32, seed=1)
    target, ft_a, ft_b, source_base = (as_float64(t) for t in tensors)
    weights, density = {"ft_a": 1.0, "ft_b": 0.5}, 0.5
    merged = transfer(
        tensors,
        weight=weights,
        density=density,
        sparsification_method="magnitude",
        consensus_method="sum",
        normalize=True,
    )
    deltas = []
    for ft, weight in ((ft_a, weights["ft_a"]), (ft_b, weights["ft_b"])):
        delta = ft - source_base
        deltas.append(weight * delta * numpy_magnitude_mask(delta, density))
    deltas = np.stack(deltas)
    elected_sign = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(deltas) == elected_sign
    divisor = (np.array([1.0, 0.5])[:, None, None] * agrees).sum(axis=0)
    divisor[divisor == 0] = 1
    expected = target + (deltas * agrees).sum(axis=0) / divisor
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-5)
    # Entries where neither sparsified delta survives keep the target's value exactly.
    untouched = (deltas == 0).all(axis=0)
    assert untouched.any()
    assert torch.equal(merged[torch.from_numpy(untouched)], tensors[0][torch.from_numpy(untouched)])


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (
            {"ft_a": "source_finetuned", "ft_b": "source_finetuned", "source_base": "x"},
            "role 'x'",
        ),
        (
            {"ft_a": "source_base", "ft_b": "source_finetuned", "source_base": "source_base"},
            "exactly one model with `role: source_base`",
        ),
        (
            {"ft_a": "source_base", "ft_b": "source_base", "source_base": "source_base"},
            "exactly one model with `role: source_base`",
        ),
    ],
)
def test_role_errors_name_the_fix(roles, message):
    tensors = random_inputs((2, 2), torch.float32)
    with pytest.raises((FinetuningTransferError, ValueError), match=message):
        merge_tensors(
            tensors, "finetuning_transfer", ids=IDS, base_index=0, parameters={"role": roles}
        )


def test_no_finetuned_model_is_an_error():
    tensors = random_inputs((2, 2), torch.float32)[:2]
    with pytest.raises(ValueError, match="at least one model with `role: source_finetuned`"):
        merge_tensors(
            tensors,
            "finetuning_transfer",
            ids=["target", "source_base"],
            base_index=0,
            parameters={"role": {"source_base": "source_base"}},
        )


# ---- the exact reference: Python fractions, rounded by trying the neighbours ----------

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BEYOND_LARGEST = {torch.bfloat16: 2.0**128, torch.float16: 2.0**16, torch.float32: 2.0**128}


def exact_rounded(value: Fraction, dtype: torch.dtype) -> float:
    """``value`` rounded to nearest, ties to even, in ``dtype``: of the representable
    numbers next to a first guess, the nearest one (infinity counts as the next power of
    two past the largest finite number, as IEEE 754 rounds)."""
    if value == 0:
        return 0.0
    guess = torch.tensor(float(abs(value)), dtype=torch.float64).to(dtype)
    start = int(guess.view(BITS[dtype]))
    infinity = int(torch.tensor(math.inf, dtype=dtype).view(BITS[dtype]))
    best = None
    for pattern in range(max(0, start - 2), min(infinity, start + 2) + 1):
        number = torch.tensor(pattern, dtype=BITS[dtype]).view(dtype).item()
        distance = abs(
            Fraction(BEYOND_LARGEST[dtype] if math.isinf(number) else number) - abs(value)
        )
        key = (distance, pattern & 1)
        if best is None or key < best[0]:
            best = (key, number)
    return math.copysign(best[1], value)


def random_bit_patterns(dtype: torch.dtype, count: int, generator: torch.Generator):
    """Finite values of every exponent (subnormals and ±0 included), as bit patterns."""
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    patterns = torch.randint(info.min, info.max, (count,), generator=generator, dtype=bits)
    values = patterns.view(dtype)
    return torch.where(values.isfinite(), values, torch.zeros((), dtype=dtype))


def realistic(dtype: torch.dtype, count: int, generator: torch.Generator):
    base = torch.randn(count, generator=generator) * 0.02
    noise = [torch.randn(count, generator=generator) * 0.002 for _ in range(3)]
    return [(base + n).to(dtype) for n in noise[:2]], base.to(dtype), noise


def exact_transfer(target, source_base, terms, weights, dtype) -> torch.Tensor:
    values = []
    for i in range(target.numel()):
        base = Fraction(source_base[i].item())
        value = Fraction(target[i].item())
        for term, weight in zip(terms, weights, strict=True):
            value += Fraction(weight) * (Fraction(term[i].item()) - base)
        values.append(exact_rounded(value, dtype))
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def same_bits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal as numbers, and bit for bit where not zero (an exact zero's sign is the
    sum's order, not a rounding)."""
    return torch.equal(got == 0, expected == 0) and torch.equal(
        got.view(BITS[got.dtype])[got != 0], expected.view(BITS[got.dtype])[expected != 0]
    )


WEIGHT_SETS = [[1.0], [0.7], [1.0, -0.5], [0.7, 1.3]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=str)
def test_kernel_is_exact_on_random_bit_patterns(dtype, weights):
    """Exponents far apart, subnormals and zeros: the float64 sum is inexact on many of
    these elements, and the kernel still returns the exact value rounded once."""
    generator = torch.Generator().manual_seed(11)
    count = 1500
    target, base, *terms = (
        random_bit_patterns(dtype, count, generator) for _ in range(2 + len(weights))
    )
    # Where the float64 sum rounds: t = 1, f = 2^-8, b = -2^-100 lands on a bf16 midpoint.
    target[:3], terms[0][:3], base[:3] = (
        1.0,
        2.0**-8,
        -(2.0**-100) if dtype != torch.float16 else -(2.0**-24),
    )
    got = kernel.dense_transfer(target, base, terms, weights, dtype)
    assert same_bits(got, exact_transfer(target, base, terms, weights, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=str)
def test_kernel_is_exact_on_realistic_weights(dtype, weights):
    """Weights like 0.7 put the float64 sum within an ulp of a midpoint on a few percent
    of bf16 elements: rounding that sum would be wrong there."""
    generator = torch.Generator().manual_seed(12)
    finetuned, base, _ = realistic(dtype, 3000, generator)
    target = (base.double() + torch.randn(3000, generator=generator) * 0.002).to(dtype)
    terms = finetuned[: len(weights)]
    got = kernel.dense_transfer(target, base, terms, weights, dtype)
    assert same_bits(got, exact_transfer(target, base, terms, weights, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [[1.0], [2.0, -0.5]], ids=str)
def test_float32_first_pass_is_exact_beside_a_chunk_it_cannot_do(dtype, weights):
    """Narrow inputs and power-of-two weights are computed in float32 first. Three
    chunks: one with ties to even, signed zeros and the output's subnormals, all exact in
    float32; one with a single element whose exponents are too far apart for float32
    (the chunk is taken in float64); one realistic."""
    generator = torch.Generator().manual_seed(15)
    count = 3 * jit.CHUNK
    finetuned, base, noise = realistic(dtype, count, generator)
    target = (base.double() + noise[2]).to(dtype)
    terms = finetuned[: len(weights)]
    tiny = 2.0**-130 if dtype == torch.bfloat16 else 2.0**-23
    for i, (t, f, b) in enumerate(
        [(1.0, 2.0**-7, 2.0**-8), (1.0, 3 * 2.0**-8, 2.0**-8), (-0.0, 0.5, 0.5), (tiny, tiny, 0.0)]
    ):  # t + (f − b): a midpoint down to even, one up to even, −0 + 0, a subnormal
        target[i], base[i] = t, b
        for term in terms:
            term[i] = f
    gap = jit.CHUNK + 100
    far = 2.0**-40 if dtype == torch.bfloat16 else 2.0**-24  # float16's smallest
    target[gap], terms[0][gap], base[gap] = 1.0, 2.0**-8, -far
    in_float32 = target.float() + sum(
        w * (term.float() - base.float()) for w, term in zip(weights, terms, strict=True)
    )
    in_float64 = target.double() + sum(
        w * (term.double() - base.double()) for w, term in zip(weights, terms, strict=True)
    )
    exact_in_float32 = in_float32.double() == in_float64
    assert exact_in_float32[: jit.CHUNK].all() and exact_in_float32[2 * jit.CHUNK :].all()
    assert not exact_in_float32[gap]  # the case the float64 pass is for
    got = kernel.dense_transfer(target, base, terms, weights, dtype)
    assert same_bits(got, exact_transfer(target, base, terms, weights, dtype))


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_follows_ieee_on_inf_and_nan(output_dtype):
    values = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.0, -0.0, 2.0**-130])
    target, finetuned, base = (
        values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(s))]
        for s in range(3)
    )
    got = kernel.dense_transfer(target, base, [finetuned], [1.0], output_dtype)
    exact = as_float64(target) + (as_float64(finetuned) - as_float64(base))
    expected = rounded(exact, output_dtype)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_stored_delta_on_an_infinite_target_follows_ieee(weight):
    """A stored Δ never reads the base (the target stands in for it): 0·inf must not
    turn the target's inf into NaN."""
    target = torch.tensor([math.inf, -math.inf, 1.0, math.nan], dtype=torch.bfloat16)
    delta = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    got = kernel.dense_transfer(target, None, [StoredDelta(delta)], [weight], torch.bfloat16)
    expected = rounded(as_float64(target) + weight * as_float64(delta), torch.bfloat16)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


def test_stored_delta_gives_the_three_model_transfer_bit_for_bit():
    """A bf16 Δ with the exact values of the elements it rounds (the ``exact`` form), and
    a rounded one, applied with two weights: equal to the transfer from the models."""
    generator = torch.Generator().manual_seed(13)
    (finetuned, _), base, noise = realistic(torch.bfloat16, 1 << 16, generator)
    target = (base.double() + noise[2]).bfloat16()
    delta = finetuned.double() - base.double()
    stored = delta.bfloat16()
    differs = (stored.double() != delta).nonzero().squeeze(1)
    assert differs.numel() > 100
    exact = StoredDelta(stored, ((differs, delta[differs].float()),))
    for weight in (1.0, 0.7):
        from_models = kernel.dense_transfer(target, base, [finetuned], [weight], torch.bfloat16)
        from_delta = kernel.dense_transfer(target, None, [exact], [weight], torch.bfloat16)
        assert torch.equal(from_delta, from_models)
    rounded_only = kernel.dense_transfer(target, None, [StoredDelta(stored)], [1.0], torch.bfloat16)
    expected = rounded(target.double().numpy() + stored.double().numpy(), torch.bfloat16)
    assert torch.equal(rounded_only, expected)


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_stored_delta_corrections_that_float64_cannot_add(weight):
    """A corrected element whose exact Δ (2^-8 + 2^-60, held in float64) added to 1.0
    needs 61 bits: float64 rounds the sum onto a bf16 midpoint. Applied in place, it is
    flagged and settled with fractions from the exact value, not the stored one."""
    generator = torch.Generator().manual_seed(17)
    (finetuned, _), base, noise = realistic(torch.bfloat16, 4096, generator)
    target = (base.double() + noise[2]).bfloat16()
    exact = finetuned.double() - base.double()
    target[5], exact[5] = 1.0, 2.0**-8 + 2.0**-60
    stored = exact.bfloat16()
    differs = (stored.double() != exact).nonzero().squeeze(1)
    in_float32 = differs[exact[differs].float().double() == exact[differs]]
    in_float64 = differs[exact[differs].float().double() != exact[differs]]
    assert 5 in in_float64.tolist() and in_float32.numel() > 100
    delta = StoredDelta(
        stored,
        ((in_float32, exact[in_float32].float()), (in_float64, exact[in_float64])),
    )
    got = kernel.dense_transfer(target, None, [delta], [weight], torch.bfloat16)
    expected = exact_transfer(target, torch.zeros(4096), [exact], [weight], torch.bfloat16)
    assert same_bits(got, expected)
    if weight == 1.0:
        assert got[5].item() == 1.0 + 2.0**-7  # the float64 sum would round to 1.0


def test_two_stored_deltas_with_overlapping_corrections():
    """Elements corrected in both deltas, in one, or in neither: each recomputed once from
    the exact values, as the transfer from the models gives them."""
    generator = torch.Generator().manual_seed(16)
    (finetuned_a, finetuned_b), base, noise = realistic(torch.bfloat16, 1 << 15, generator)
    target = (base.double() + noise[2]).bfloat16()
    stored = []
    for finetuned in (finetuned_a, finetuned_b):
        delta = finetuned.double() - base.double()
        rounded_delta = delta.bfloat16()
        differs = (rounded_delta.double() != delta).nonzero().squeeze(1)
        stored.append(StoredDelta(rounded_delta, ((differs, delta[differs].float()),)))
    both = np.intersect1d(*(s.corrections[0][0].numpy() for s in stored))
    assert both.size > 10  # the overlap this test is about
    weights = [1.0, -0.5]
    from_models = kernel.dense_transfer(
        target, base, [finetuned_a, finetuned_b], weights, torch.bfloat16
    )
    from_deltas = kernel.dense_transfer(target, None, stored, weights, torch.bfloat16)
    assert torch.equal(from_deltas, from_models)
    union = kernel._sorted_union([np.array([1, 3, 5]), np.array([2, 3, 9]), np.array([], int)])
    assert union.tolist() == [1, 2, 3, 5, 9]


def test_torch_kernel_agrees_where_float64_is_exact(monkeypatch):
    """The fallback (no numba, or --cuda) on real weights with weight 1."""
    generator = torch.Generator().manual_seed(14)
    (finetuned, _), base, noise = realistic(torch.bfloat16, 1 << 18, generator)
    target = (base.double() + noise[2]).bfloat16()
    fused = kernel.dense_transfer(target, base, [finetuned], [1.0], torch.bfloat16)
    monkeypatch.setattr(kernel, "compiled", lambda: None)
    fallback = kernel.dense_transfer(target, base, [finetuned], [1.0], torch.bfloat16)
    assert torch.equal(fused, fallback)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_is_exact_on_many_random_bit_patterns(dtype):
    generator = torch.Generator().manual_seed(15)
    weights = [0.7, -1.0, 2.0**-3]
    target, base, *terms = (random_bit_patterns(dtype, 40_000, generator) for _ in range(5))
    got = kernel.dense_transfer(target, base, terms, weights, dtype)
    assert same_bits(got, exact_transfer(target, base, terms, weights, dtype))
