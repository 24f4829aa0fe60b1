"""Write random-weight checkpoints with real Llama / OLMo 2 shapes for the merge benchmarks.

Per size, under ``<out>/<size>/``:

- ``source_base``: seeded random weights;
- ``source_finetuned``: ``source_base`` + small seeded noise (a realistic fine-tuning delta);
- ``target``: ``source_base`` + other noise (a "nearby" base model);
- ``source_finetuned_vocab8``: ``source_finetuned`` with 8 extra vocabulary rows (the Tülu 3
  case), skipped for ``llama3-8b`` and with ``--no-extra-vocab``.

Each is a sharded safetensors checkpoint with ``model.safetensors.index.json``,
``config.json`` and a tokenizer, exactly as transformers saves one. Nothing ever holds a
whole model: tensor names and shapes come from a meta-device model, every tensor is
generated in row chunks and streamed into all checkpoints' shard files at once, so peak
memory is a few hundred MB whatever the size.

    python benchmarks/make_checkpoints.py 350m            # -> benchmarks/checkpoints/350m/
    python benchmarks/make_checkpoints.py llama3-8b --clean
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from mergekit_ftt.tiny import build_tokenizer, tiny_config  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "checkpoints"
EXTRA_VOCAB_ROWS = 8
CHUNK_ELEMENTS = 16 * 1024 * 1024  # rows generated at a time: bounds memory, not output
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class SizeSpec:
    """A model size: architecture, ``tiny_config`` arguments and default shard size."""

    architecture: str
    config: dict
    shard_bytes: int
    extra_vocab: bool = True
    note: str = ""


GB = 1000**3
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        "llama",
        dict(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        shard_bytes=40_000,
        note="test size",
    ),
    "350m": SizeSpec(
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=2560,
        ),
        shard_bytes=GB // 4,
        note="Llama-shaped, 355M parameters",
    ),
    "1b": SizeSpec(
        "olmo2",
        dict(
            vocab_size=100352,
            hidden_size=2048,
            num_layers=16,
            num_heads=16,
            intermediate_size=8192,
        ),
        shard_bytes=GB,
        note="allenai/OLMo-2-0425-1B shapes, 1.48B parameters",
    ),
    "llama3-8b": SizeSpec(
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=14336,
            max_position_embeddings=8192,
        ),
        shard_bytes=5 * GB,
        extra_vocab=False,  # 16 GB per checkpoint: only the three the merge needs
        note="meta-llama/Meta-Llama-3-8B shapes, 8.03B parameters",
    ),
}

# Noise added to source_base, relative to each tensor's init scale. Fine-tuning deltas are
# small next to the weights but span many bf16 ulps, like real instruct deltas.
FINETUNE_NOISE = 0.05
TARGET_NOISE = 0.1
INIT_STD = 0.02


@dataclass
class Checkpoint:
    """One output checkpoint: its folder, config and the (name, shape) of every tensor."""

    path: Path
    config: object
    tokenizer: object
    tensors: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every saved tensor, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def causal_lm_class(config) -> str:
    """The class name that ``config.json``'s ``architectures`` names (mergekit needs it)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


class StreamingSafetensorsWriter:
    """Writes a sharded safetensors checkpoint from tensor bytes given in order.

    Shards are planned from the shapes up front (so each file's header can be written
    first), then :meth:`write` takes consecutive byte chunks of the tensors in order.
    """

    def __init__(self, directory: Path, tensors, dtype: torch.dtype, shard_bytes: int):
        self.directory = directory
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        sized = [(name, shape, itemsize * _numel(shape)) for name, shape in tensors]
        self.shards = _plan_shards(sized, shard_bytes)
        self.total_size = sum(size for _, _, size in sized)
        self._pending = iter(self.shards)
        self._file = None
        self._left_in_shard = 0

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, chunk: torch.Tensor) -> None:
        data = chunk.contiguous().view(torch.uint8).numpy()
        while data.size:
            if self._left_in_shard == 0:
                self._open_next_shard()
            part = data[: self._left_in_shard]
            self._file.write(part)
            self._left_in_shard -= part.size
            data = data[part.size :]
            if self._left_in_shard == 0:
                self._file.close()

    def finish(self) -> None:
        if self._left_in_shard or next(self._pending, None) is not None:
            raise RuntimeError(f"{self.directory}: fewer tensor bytes written than planned")
        weight_map = {
            name: self.shard_name(index)
            for index, shard in enumerate(self.shards)
            for name, _, _ in shard
        }
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _open_next_shard(self) -> None:
        shard = next(self._pending)
        index = self.shards.index(shard)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, size in shard:
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[self.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
        self._file = open(self.directory / self.shard_name(index), "wb")  # noqa: SIM115
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._left_in_shard = offset


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _plan_shards(sized, shard_bytes: int) -> list[list]:
    shards, current, current_bytes = [], [], 0
    for item in sized:
        if current and current_bytes + item[2] > shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += item[2]
    shards.append(current)
    return shards


def normal_pool(seed: int) -> torch.Tensor:
    """Standard normal samples that every tensor's values are cut from.

    Drawing fresh normals for every element of an 8B model three times over takes most of
    an hour on 2 cores; slicing a seeded pool at random offsets is memory-bound and gives
    values with the same distribution. Merge speed does not depend on the values.
    """
    return torch.randn(2 * CHUNK_ELEMENTS, generator=torch.Generator().manual_seed(seed))


def row_chunks(
    name: str, shape, pool: torch.Tensor, seed: int, tensor_index: int
) -> Iterator[tuple]:
    """Yield (base, finetune_noise, target_noise) float32 chunks of rows of one tensor."""
    rows = shape[0]
    row_elements = _numel(shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    is_norm = len(shape) == 1 or "norm" in name
    for chunk_index, start in enumerate(range(0, rows, rows_per_chunk)):
        chunk_shape = (min(rows_per_chunk, rows - start), *shape[1:])
        count = _numel(chunk_shape)
        generator = torch.Generator().manual_seed(
            seed * 1_000_003 + tensor_index * 4099 + chunk_index
        )
        offsets = torch.randint(0, pool.numel() - count + 1, (3,), generator=generator).tolist()

        base = _pool_slice(pool, offsets[0], chunk_shape, INIT_STD)
        if is_norm:
            base.add_(1.0)
        finetune = _pool_slice(pool, offsets[1], chunk_shape, INIT_STD * FINETUNE_NOISE)
        target = _pool_slice(pool, offsets[2], chunk_shape, INIT_STD * TARGET_NOISE)
        yield base, finetune, target


def _pool_slice(pool: torch.Tensor, offset: int, shape, scale: float) -> torch.Tensor:
    return pool[offset : offset + _numel(shape)].view(shape).mul(scale)


def extra_rows(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 77)
    return torch.randn((EXTRA_VOCAB_ROWS, *shape[1:]), generator=generator).mul_(INIT_STD)


def build_checkpoints(
    size: str,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = None,
    extra_vocab: bool | None = None,
    layers: int | None = None,
) -> dict[str, Path]:
    """Write all checkpoints of ``size`` under ``out/<folder_name>``; return role -> folder.

    ``layers`` keeps every tensor shape of ``size`` but only that many decoder layers.
    """
    spec = SIZES[size]
    shard_bytes = shard_bytes or spec.shard_bytes
    extra_vocab = spec.extra_vocab if extra_vocab is None else extra_vocab
    root = out / folder_name(size, layers)
    corpus = [f"the sum of {a} and {b} is {a + b}." for a in range(40) for b in range(40)]
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    shapes = {**spec.config, **({"num_layers": layers} if layers else {})}
    config = tiny_config(spec.architecture, **shapes)
    config.dtype = dtype
    checkpoints = {
        role: Checkpoint(root / role, config, tokenizer)
        for role in ("source_base", "source_finetuned", "target")
    }
    if extra_vocab:
        wide_config = tiny_config(
            spec.architecture,
            **{**shapes, "vocab_size": spec.config["vocab_size"] + EXTRA_VOCAB_ROWS},
        )
        wide_config.dtype = dtype
        wide_tokenizer = build_tokenizer(
            corpus, vocab_size=300, extra_tokens=[f"<|extra_{i}|>" for i in range(EXTRA_VOCAB_ROWS)]
        )
        checkpoints["source_finetuned_vocab8"] = Checkpoint(
            root / "source_finetuned_vocab8", wide_config, wide_tokenizer
        )
    for checkpoint in checkpoints.values():
        checkpoint.tensors = tensor_shapes(checkpoint.config)
        checkpoint.config.architectures = [causal_lm_class(checkpoint.config)]

    _check_disk(root, checkpoints.values(), dtype)
    writers = {}
    for role, checkpoint in checkpoints.items():
        checkpoint.path.mkdir(parents=True)
        writers[role] = StreamingSafetensorsWriter(
            checkpoint.path, checkpoint.tensors, dtype, shard_bytes
        )
    wide = writers.get("source_finetuned_vocab8")
    wide_shapes = [
        s for _, s in checkpoints.get("source_finetuned_vocab8", checkpoints["target"]).tensors
    ]
    pool = normal_pool(seed)
    for tensor_index, (name, shape) in enumerate(checkpoints["source_base"].tensors):
        for base, finetune, target in row_chunks(name, shape, pool, seed, tensor_index):
            finetuned = (base + finetune).to(dtype)
            writers["source_base"].write(base.to(dtype))
            writers["source_finetuned"].write(finetuned)
            writers["target"].write(base.add_(target).to(dtype))
            if wide:
                wide.write(finetuned)
        if wide and wide_shapes[tensor_index] != shape:  # embeddings / lm_head: new tokens' rows
            wide.write(extra_rows(shape, seed + tensor_index).to(dtype))
    for role, checkpoint in checkpoints.items():
        writers[role].finish()
        checkpoint.config.save_pretrained(checkpoint.path)
        checkpoint.tokenizer.save_pretrained(checkpoint.path)
    return {role: checkpoint.path for role, checkpoint in checkpoints.items()}


def folder_name(size: str, layers: int | None = None) -> str:
    """``350m``, or ``llama3-8b-4layers`` for a size cut to fewer decoder layers."""
    return f"{size}-{layers}layers" if layers else size


def _check_disk(root: Path, checkpoints, dtype: torch.dtype) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = sum(itemsize * _numel(s) for c in checkpoints for _, s in c.tensors)
    root.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root.parent).free
    if need > free - 5 * GB:
        raise SystemExit(
            f"{root}: the checkpoints need {need / GB:.1f} GB but only {free / GB:.1f} GB are "
            "free (5 GB kept in reserve); free disk space or pick a smaller size"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--shard-bytes", type=int, help="bytes per shard (default: per size)")
    parser.add_argument(
        "--no-extra-vocab", action="store_true", help="skip the 8-extra-rows variant"
    )
    parser.add_argument(
        "--layers", type=int,
        help="keep every tensor shape but only this many decoder layers (folder <size>-<N>layers)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing checkpoints")
    parser.add_argument(
        "--clean", action="store_true", help="delete <out>/<size> and write nothing"
    )
    args = parser.parse_args(argv)
    root = args.out / folder_name(args.size, args.layers)
    if args.clean or args.overwrite:
        shutil.rmtree(root, ignore_errors=True)
        if args.clean:
            print(f"deleted {root}")
            return
    if root.exists():
        raise SystemExit(f"{root} exists; pass --overwrite to rebuild or --clean to delete it")
    paths = build_checkpoints(
        args.size,
        args.out,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        shard_bytes=args.shard_bytes,
        extra_vocab=False if args.no_extra_vocab else None,
        layers=args.layers,
    )
    for role, path in paths.items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
