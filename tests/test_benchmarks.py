"""The benchmark scripts write loadable checkpoints and the merges they time are the right ones.

Nothing here is timed: the benchmarks themselves are run by hand (see README, Performance).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # as `python benchmarks/x.py` does: they import harness


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


make_checkpoints = _load_script("make_checkpoints")
bench_merge = _load_script("bench_merge")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    make_checkpoints.main(["tiny", "--out", str(out)])
    return out


ROLES = ("source_base", "source_finetuned", "target", "source_finetuned_vocab8")


@pytest.mark.parametrize("role", ROLES)
def test_tiny_checkpoint_is_sharded_and_loads_in_transformers(tiny_checkpoints, role):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints / "tiny" / role
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}

    model = AutoModelForCausalLM.from_pretrained(path)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert model.dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    for name, shard in index["weight_map"].items():  # each tensor is where the index says
        with safe_open(path / shard, framework="pt") as handle:
            assert torch.equal(handle.get_tensor(name), state[name])

    extra = make_checkpoints.EXTRA_VOCAB_ROWS if role.endswith("vocab8") else 0
    vocab = make_checkpoints.SIZES["tiny"].config["vocab_size"] + extra
    assert model.config.vocab_size == vocab == state["model.embed_tokens.weight"].shape[0]
    assert len(AutoTokenizer.from_pretrained(path)) == 300 + extra


def test_tiny_checkpoints_differ_by_small_deltas(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    root = tiny_checkpoints / "tiny"
    states = {
        role: AutoModelForCausalLM.from_pretrained(root / role).state_dict() for role in ROLES
    }
    name = "model.layers.0.mlp.up_proj.weight"
    base = states["source_base"][name].float()
    for role, relative in (("source_finetuned", 0.05), ("target", 0.1)):
        delta = states[role][name].float() - base
        assert (delta != 0).float().mean() > 0.9
        assert delta.std() / base.std() == pytest.approx(relative, rel=0.2)
    embed = "model.embed_tokens.weight"
    wide, finetuned = states["source_finetuned_vocab8"][embed], states["source_finetuned"][embed]
    assert torch.equal(wide[: finetuned.shape[0]], finetuned)


def test_existing_checkpoints_are_not_overwritten_without_a_flag(tiny_checkpoints):
    with pytest.raises(SystemExit, match="--overwrite"):
        make_checkpoints.main(["tiny", "--out", str(tiny_checkpoints)])


def test_merge_configs_express_the_same_transfer(tiny_checkpoints, tmp_path):
    from mergekit.config import MergeConfiguration

    settings = bench_merge.parse_args(
        ["tiny", "--checkpoints", str(tiny_checkpoints), "--workdir", str(tmp_path)]
    )
    assert settings.variants == bench_merge.VARIANTS and settings.repeats == 3
    bench_merge.write_configs(settings)
    root = tiny_checkpoints / "tiny"

    transfer = yaml.safe_load((tmp_path / "transfer.yml").read_text())
    assert transfer["merge_method"] == "finetuning_transfer"
    assert transfer["base_model"] == str(root / "target")
    assert {m["model"]: m["parameters"] for m in transfer["models"]} == {
        str(root / "source_finetuned"): {"role": "source_finetuned", "weight": 1.0},
        str(root / "source_base"): {"role": "source_base"},
    }

    arithmetic = yaml.safe_load((tmp_path / "task_arithmetic.yml").read_text())
    parsed = MergeConfiguration.model_validate(arithmetic)
    assert parsed.merge_method == "task_arithmetic"
    assert parsed.base_model.model.path == str(root / "target")
    assert (parsed.dtype, parsed.out_dtype) == ("float32", "bfloat16")
    assert {m.model.model.path: m.parameters["weight"] for m in parsed.models} == {
        str(root / "source_finetuned"): 1.0,
        str(root / "source_base"): -1.0,
    }

    command = bench_merge.variant_command("transfer", settings, tmp_path / "out")
    assert command[:3] == ["mergekit-yaml", str(tmp_path / "transfer.yml"), str(tmp_path / "out")]


def test_task_arithmetic_with_plus_minus_one_is_the_transfer():
    """target + (ft − target) − (sb − target), as mergekit computes it, is target + ft − sb."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(256, 256, generator=generator) * 0.02
    target = (base + torch.randn(256, 256, generator=generator) * 2e-3).bfloat16()
    finetuned = (base + torch.randn(256, 256, generator=generator) * 1e-3).bfloat16()
    source_base = base.bfloat16()
    group = TensorGroup.from_tensors([target, finetuned, source_base], base_index=0)
    (merged,) = registry.get("task_arithmetic")(
        [group],
        parameters={"weight": [1.0, -1.0], "normalize": False},
        dtype=torch.float32,
        out_dtype=torch.bfloat16,
    )
    reference = (target.double() + finetuned.double() - source_base.double()).bfloat16()
    assert torch.equal(merged, reference)


def test_verification_reference_rounds_once_where_torch_rounds_twice():
    # 1 + 2^-8 + 2^-30 lies just above a bf16 tie: float32 rounds it onto the tie, and bf16
    # then rounds the tie to even (1.0); rounded once, it goes up to 1 + 2^-7.
    values = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 3.25e-3], dtype=torch.float64)
    assert values.to(torch.bfloat16)[0].item() == 1.0
    once = bench_merge.rounded_once(values, torch.bfloat16, chunk=2)
    assert once.tolist() == [1 + 2**-7, -(1 + 2**-7), torch.tensor(3.25e-3).bfloat16().item()]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "transfer,bogus"], "unknown variant"),
        (["--repeats", "0"], "at least 1"),
    ],
)
def test_bad_arguments_are_refused(tiny_checkpoints, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_merge.parse_args(["tiny", "--checkpoints", str(tiny_checkpoints), *argv])
    assert message in capsys.readouterr().err


def test_missing_checkpoints_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(SystemExit, match=r"make_checkpoints\.py 350m"):
        bench_merge.parse_args(["350m", "--checkpoints", str(tmp_path)])


def test_transfer_settings_add_variants_with_their_options_and_environment(
    tiny_checkpoints, tmp_path
):
    settings = bench_merge.parse_args(
        [
            "tiny",
            "--checkpoints", str(tiny_checkpoints),
            "--workdir", str(tmp_path),
            "--variants", "transfer,io_floor",
            "--mergekit-args", "--out-shard-size 1B",
            "--transfer-setting", "j1=-j 1",
            "--transfer-setting", "sync=MALLOC_ARENA_MAX=2 --no-async-write",
        ]
    )  # fmt: skip
    assert settings.variants == ("transfer", "io_floor", "transfer j1", "transfer sync")
    env, args = settings.transfer_settings["transfer sync"]
    assert env == {"MALLOC_ARENA_MAX": "2"} and args == ("--no-async-write",)
    command = bench_merge.variant_command("transfer j1", settings, tmp_path / "out")
    assert command[:2] == ["mergekit-yaml", str(tmp_path / "transfer.yml")]
    assert command[-3:] == ["1B", "-j", "1"]


def test_cache_states_of_the_inputs(tiny_checkpoints):
    shards = bench_merge.Inputs.for_size(tiny_checkpoints, "tiny").shards
    assert len(shards) > 3
    bench_merge.set_cache(shards, "warm")
    assert bench_merge.resident_fraction(shards) == 1.0
    os.sync()  # written pages are dropped only once they are clean
    bench_merge.set_cache(shards, "cold")
    assert bench_merge.resident_fraction(shards) < 0.5


def test_fewer_layers_keep_every_tensor_shape(tiny_checkpoints, tmp_path):
    from safetensors import safe_open

    make_checkpoints.main(["tiny", "--layers", "1", "--no-extra-vocab", "--out", str(tmp_path)])
    cut, full = tmp_path / "tiny-1layers" / "target", tiny_checkpoints / "tiny" / "target"

    def shapes(path: Path) -> dict:
        found = {}
        for shard in path.glob("*.safetensors"):
            with safe_open(shard, framework="pt") as handle:
                found.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})  # noqa: SIM118
        return found

    cut_shapes, full_shapes = shapes(cut), shapes(full)
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 1
    assert not any(".layers.1." in name for name in cut_shapes)
    assert all(full_shapes[name] == shape for name, shape in cut_shapes.items())
