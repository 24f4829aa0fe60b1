"""Weight-space statistics of a transfer, read tensor by tensor and chunk by chunk.

For every tensor the merge writes, with Δ = Σ_i α_i (FT_i − M_s) (the delta the merge
adds) and D = M_t − M_s (how far the target lies from the source base):

    ‖Δ‖, ‖D‖, ‖D‖ / ‖Δ‖, cos(Δ, D), ‖D‖ / ‖M_s‖ and ‖Δ‖ / ‖M_s‖.

On the miniature Table 3 (``ftt-demo --matrix``, 3 seeds) the distance statistics
predicted transfer efficiency (mean Spearman ρ −0.71 to −0.78 for ‖D‖, ‖D‖/‖Δ‖ and
‖D‖/‖M_s‖, whole model or per module kind) and the directional ones did not (cos(Δ, D),
the share of elements where Δ and D agree in sign, ⟨Δ, D⟩/‖Δ‖²: |ρ| ≤ 0.18), nor did
Shadow-FT's L1 difference better the L2 distances (−0.77); those are not computed
(docs/inspect.md).

Every statistic is a function of a few float64 sums, so a layer, a module kind or the
whole model is summarised by adding the sums of its tensors (a norm of the concatenated
tensors, not an average of per-tensor values). Inputs are read from safetensors in
chunks of rows (``safe_open(...).get_slice``), cast to the dtype the merge runs at, as
mergekit casts them before the method sees them, and accumulated in float64: memory
stays at a few float64 chunks whatever the model size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch
from mergekit.common import ModelReference, dtype_from_name

from mergekit_ftt.inspect.checkpoint import Checkpoint
from mergekit_ftt.inspect.recipe import PlannedTensor, TensorSource
from mergekit_ftt.modules import KINDS, layer_index, module_kind
from mergekit_ftt.precision import holds_exactly

# Elements per float64 work chunk: four 1 MiB buffers stay in cache, and one thread does
# every pass over them. On the 2-core machine (shared, load ~7) one thread took 1.8 ms of
# CPU for 2^20 elements of three bf16 inputs in 2^17-element chunks, against 15 ms in one
# 2^20 chunk and 58-73 ms with two threads, which spend it waiting for each other.
CHUNK_ELEMENTS = 1 << 17


@dataclass
class Sums:
    """float64 sums over the elements of one or more tensors."""

    elements: int = 0
    delta_sq: float = 0.0  # Σ Δ²
    gap_sq: float = 0.0  # Σ D²
    delta_gap: float = 0.0  # Σ Δ·D
    base_sq: float = 0.0  # Σ M_s²

    def __iadd__(self, other: Sums) -> Sums:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def summary(self) -> dict[str, float | int | None]:
        """The statistics (see the module docstring); None where a denominator is zero."""
        delta, gap, base = map(math.sqrt, (self.delta_sq, self.gap_sq, self.base_sq))
        return {
            "elements": self.elements,
            "delta_norm": delta,
            "gap_norm": gap,
            "gap_to_delta": _ratio(gap, delta),
            "cosine": _ratio(self.delta_gap, delta * gap),
            "relative_gap": _ratio(gap, base),
            "relative_delta": _ratio(delta, base),
        }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class TensorStatistics:
    name: str
    layer: int | None
    kind: str
    shape: list[int]
    rows_compared: int | None  # vocabulary tensors aligned by token: rows of shared tokens
    sums: Sums = field(repr=False)


def _chunks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _Buffers:
    """float64 scratch reused across chunks: source base, D, Δ, one fine-tuned term.
    A chunk is at least one row, so a row longer than a chunk grows the scratch."""

    def __init__(self) -> None:
        self.storage = torch.empty(4, CHUNK_ELEMENTS, dtype=torch.float64)

    def views(self, count: int) -> tuple[torch.Tensor, ...]:
        if count > self.storage.shape[1]:
            self.storage = torch.empty(4, count, dtype=torch.float64)
        return tuple(row[:count] for row in self.storage)


def tensor_sums(
    planned: PlannedTensor,
    checkpoints: dict[ModelReference, Checkpoint],
    cast: torch.dtype | None,
    aligned_rows: torch.Tensor | None,
    buffers: _Buffers,
    advance: Callable[[int], None],
) -> TensorStatistics:
    """Stream one tensor of every input and add up its sums.

    ``aligned_rows`` (vocabulary tensors whose rows mergekit aligns by token) marks the
    rows that hold the same token in every model; only those are compared.
    """
    names = {
        source.model: checkpoints[source.model].resolve(source)
        for source in (planned.target, planned.source_base, *(s for s, _ in planned.finetuned))
    }
    shapes = {model: checkpoints[model].shape(name) for model, name in names.items()}
    target_shape = shapes[planned.target.model]
    rows = min(shape[0] for shape in shapes.values()) if target_shape else 1
    row_elements = math.prod(target_shape[1:]) if target_shape else 1
    mask = None
    if aligned_rows is not None and planned.vocabulary_axis == 0:
        mask = aligned_rows[:rows]
    sums = Sums()
    with contextlib.ExitStack() as stack:
        slices = {
            model: stack.enter_context(checkpoints[model].reading(name))
            for model, name in names.items()
        }

        def read(source: TensorSource, start: int, stop: int) -> torch.Tensor:
            chunk = slices[source.model][start:stop] if target_shape else slices[source.model][:]
            if mask is not None:
                chunk = chunk[mask[start:stop]]
            if cast is not None and not holds_exactly(cast, chunk.dtype):
                chunk = chunk.to(cast)  # what mergekit's loader does; exact casts are skipped
            return chunk.reshape(-1)

        for start, stop in _chunks(rows, row_elements):
            base_chunk = read(planned.source_base, start, stop)
            count = base_chunk.numel()
            s, gap, delta, term = buffers.views(count)
            s.copy_(base_chunk)
            for index, (source, weight) in enumerate(planned.finetuned):
                out = term if index else delta
                out.copy_(read(source, start, stop)).sub_(s)
                if weight != 1.0:
                    out.mul_(weight)
                if index:
                    delta.add_(term)
            gap.copy_(read(planned.target, start, stop)).sub_(s)
            sums.elements += count
            sums.base_sq += torch.dot(s, s).item()
            sums.gap_sq += torch.dot(gap, gap).item()
            sums.delta_sq += torch.dot(delta, delta).item()
            sums.delta_gap += torch.dot(delta, gap).item()
            advance(count)
    return TensorStatistics(
        name=planned.name,
        layer=layer_index(planned.name),
        kind=module_kind(planned.name),
        shape=target_shape,
        rows_compared=int(mask.sum()) if mask is not None else None,
        sums=sums,
    )


def stream_statistics(
    tensors: Sequence[PlannedTensor],
    checkpoints: dict[ModelReference, Checkpoint],
    dtype: str | None,
    aligned_rows: torch.Tensor | None,
    progress: bool = True,
) -> list[TensorStatistics]:
    """Statistics of every planned tensor, one chunk of each input in memory at a time."""
    from tqdm import tqdm

    def elements(planned: PlannedTensor) -> int:
        target = checkpoints[planned.target.model]
        return math.prod(target.shape(target.resolve(planned.target)))

    cast = dtype_from_name(dtype) if dtype else None
    buffers = _Buffers()
    results = []
    total = sum(map(elements, tensors))
    with (
        _one_thread(),
        tqdm(
            total=total, unit="param", unit_scale=True, desc="reading", disable=not progress
        ) as bar,
    ):
        for planned in tensors:
            results.append(
                tensor_sums(planned, checkpoints, cast, aligned_rows, buffers, bar.update)
            )
    return results


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def aggregate(tensors: Sequence[TensorStatistics]) -> dict:
    """The statistics of the whole model, of each module kind, of each layer and of each
    module kind within each layer."""
    model, kinds = Sums(), {kind: Sums() for kind in KINDS}
    layers: dict[int, dict[str, Sums]] = {}
    for tensor in tensors:
        model += tensor.sums
        kinds[tensor.kind] += tensor.sums
        if tensor.layer is not None:
            layer = layers.setdefault(tensor.layer, {"all": Sums()})
            layer["all"] += tensor.sums
            layer.setdefault(tensor.kind, Sums())
            layer[tensor.kind] += tensor.sums
    return {
        "model": model.summary(),
        "module_kinds": _by_kind(kinds),
        "layers": [
            {
                "layer": index,
                **layers[index]["all"].summary(),
                "module_kinds": _by_kind(layers[index]),
            }
            for index in sorted(layers)
        ],
        "tensors": [
            {
                "name": t.name,
                "layer": t.layer,
                "kind": t.kind,
                "shape": t.shape,
                "rows_compared": t.rows_compared,
                **t.sums.summary(),
            }
            for t in tensors
        ],
    }


def _by_kind(sums: dict[str, Sums]) -> dict[str, dict]:
    return {kind: sums[kind].summary() for kind in KINDS if kind in sums and sums[kind].elements}
