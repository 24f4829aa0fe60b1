"""No input is rounded before its delta is taken, whatever the stored dtypes (issue 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_weights, rounded, run_cli
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from safetensors.torch import save_file

from mergekit_ftt.precision import plan_precision


def recipe(target, finetuned, source_base, **extra) -> dict:
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "models": [
            {"model": str(finetuned), "parameters": {"role": "source_finetuned"}},
            {"model": str(source_base), "parameters": {"role": "source_base"}},
        ],
        **extra,
    }


# --- the policy ---------------------------------------------------------------------------


def planned(stored: dict[str, list[str]], **settings):
    config = MergeConfiguration.model_validate(recipe("target", "ft", "sb", **settings))
    dtypes = {name: getattr(torch, name) for name in ("bfloat16", "float16", "float32")}
    return plan_precision(
        config, {ModelReference.parse(k): [dtypes[d] for d in v] for k, v in stored.items()}
    )


def test_inputs_the_merge_dtype_holds_change_nothing():
    plan = planned(
        {"target": ["bfloat16"], "ft": ["bfloat16"], "sb": ["bfloat16"]}, dtype="bfloat16"
    )
    assert plan.message is None
    assert plan.config.dtype == "bfloat16"
    assert plan.config.out_dtype is None
    assert "output_dtype" not in (plan.config.parameters or {})


def test_float32_inputs_merge_at_float32_and_write_the_recipe_dtype():
    plan = planned({"target": ["bfloat16"], "ft": ["float32"], "sb": ["float32"]}, dtype="bfloat16")
    assert (plan.config.dtype, plan.config.out_dtype) == ("float32", "bfloat16")
    assert plan.config.parameters["output_dtype"] == "bfloat16"
    assert "ft (float32); sb (float32)" in plan.message
    assert "rounding the result once to bfloat16" in plan.message


def test_bf16_and_fp16_inputs_need_float32():
    plan = planned({"target": ["float16"], "ft": ["bfloat16"], "sb": ["bfloat16"]}, dtype="float16")
    assert (plan.config.dtype, plan.config.out_dtype) == ("float32", "float16")


def test_out_dtype_is_the_rounding_target_even_when_nothing_is_wider():
    plan = planned(
        {"target": ["float32"], "ft": ["float32"], "sb": ["float32"]},
        dtype="float32",
        out_dtype="bfloat16",
    )
    assert plan.message is None
    assert (plan.config.dtype, plan.config.out_dtype) == ("float32", "bfloat16")
    assert plan.config.parameters["output_dtype"] == "bfloat16"


def test_other_methods_are_left_alone():
    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "dtype": "bfloat16", "models": [{"model": "a"}]}
    )
    assert plan_precision(config, {ModelReference.parse("a"): [torch.float32]}).config is config


# --- through the real mergekit-yaml -------------------------------------------------------


def perturbed_copy(source: Path, path: Path, dtype: torch.dtype, scale: float, seed: int) -> Path:
    """``source`` + ``scale`` × noise, stored in ``dtype``: a fine-tune with small updates."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: (tensor.double() + scale * torch.randn(tensor.shape, generator=generator)).to(dtype)
        for name, tensor in load_weights(source).items()
    }
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config))
    return path


def exact_transfer(target: Path, finetuned: Path, source_base: Path, dtype: torch.dtype):
    target_w, ft_w, sb_w = (load_weights(p) for p in (target, finetuned, source_base))
    return {
        name: rounded((t.double() + (ft_w[name].double() - sb_w[name].double())).numpy(), dtype)
        for name, t in target_w.items()
    }


def merge(config: dict, tmp_path: Path):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("mergekit-yaml", str(path), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    return result, load_weights(tmp_path / "out")


def differing(merged: dict, expected: dict) -> int:
    return sum(int((merged[name] != tensor).sum()) for name, tensor in expected.items())


def assert_rounded_once(result, merged: dict, expected: dict, dtype: torch.dtype) -> None:
    """``merged`` is ``expected`` in ``dtype``, and the merge said it rounded once to it."""
    assert all(merged[name].dtype == dtype for name in expected)
    assert differing(merged, expected) == 0
    name = str(dtype).removeprefix("torch.")
    assert f"Merging at float32 and rounding the result once to {name}" in result.stderr


@pytest.fixture(scope="module")
def float32_pair(llama, tmp_path_factory):
    """A float32 source base and its fine-tune = base + 1e-3 × noise (the issue's case)."""
    root = tmp_path_factory.mktemp("float32_pair")
    source_base = perturbed_copy(llama.model("source_base", 2), root / "sb", torch.float32, 0.1, 7)
    finetuned = perturbed_copy(source_base, root / "ft", torch.float32, 1e-3, 8)
    return source_base, finetuned


def test_float32_finetune_on_bf16_target_is_exact(llama, float32_pair, tmp_path):
    source_base, finetuned = float32_pair
    target = llama.model("target", 1)
    result, merged = merge(recipe(target, finetuned, source_base, dtype="bfloat16"), tmp_path)
    expected = exact_transfer(target, finetuned, source_base, torch.bfloat16)
    assert_rounded_once(result, merged, expected, torch.bfloat16)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"
    # What rounding the inputs to bf16 first (mergekit's load-time cast) would have given:
    early = {
        name: (t.double() + (f.bfloat16().double() - s.bfloat16().double())).bfloat16()
        for (name, t), f, s in zip(
            load_weights(target).items(),
            load_weights(finetuned).values(),
            load_weights(source_base).values(),
            strict=True,
        )
    }
    assert differing(early, expected) > 1000


def test_float32_merge_with_bf16_out_dtype_rounds_once(llama, float32_pair, tmp_path):
    source_base, finetuned = float32_pair
    target = llama.model("target", 1)
    config = recipe(target, finetuned, source_base, dtype="float32", out_dtype="bfloat16")
    result, merged = merge(config, tmp_path)
    assert differing(merged, exact_transfer(target, finetuned, source_base, torch.bfloat16)) == 0
    assert "Merging at" not in result.stderr  # nothing was wider: nothing to say


@pytest.mark.slow
def test_bf16_finetune_on_fp16_target_is_exact(llama, tmp_path):
    fp16_target = perturbed_copy(llama.model("target", 1), tmp_path / "t16", torch.float16, 0, 0)
    source_base = llama.model("source_base", 2)
    finetuned = llama.model("ft_a", 3)
    result, merged = merge(recipe(fp16_target, finetuned, source_base, dtype="float16"), tmp_path)
    expected = exact_transfer(fp16_target, finetuned, source_base, torch.float16)
    assert_rounded_once(result, merged, expected, torch.float16)


def test_olmo2_m5_plus_delta_m4_recipe_with_a_float32_finetune_is_exact(olmo2, tmp_path):
    """The paper's pipeline: ftt-train saves FT(M4) in float32; the recipe says bfloat16."""
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "olmo2_m5_plus_delta_m4_math.yml"
    config = yaml.safe_load(shipped.read_text())
    m4, m5 = olmo2.model("m4", 11), olmo2.model("m5", 12)
    ft_m4 = perturbed_copy(m4, tmp_path / "ft_m4", torch.float32, 1e-3, 13)
    assert config["dtype"] == "bfloat16"
    config["base_model"] = str(m5)
    config["models"][0]["model"] = str(ft_m4)
    config["models"][1]["model"] = str(m4)
    config["tokenizer"]["source"] = str(ft_m4)
    _, merged = merge(config, tmp_path)
    assert differing(merged, exact_transfer(m5, ft_m4, m4, torch.bfloat16)) == 0
