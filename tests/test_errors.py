"""Bad recipes fail before anything is written, with a message that names the fix."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import run_cli, transfer_recipe
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_ftt.merge_methods.finetuning_transfer import FinetuningTransferError


def run_in_process(recipe: dict, out) -> None:
    """mergekit's own ``run_merge``, as the installed hook leaves it."""
    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True))


@pytest.fixture
def trio(llama):
    return llama.model("target", 1), llama.model("ft_a", 3), llama.model("source_base", 2)


def with_roles(recipe: dict, *roles) -> dict:
    for model, role in zip(recipe["models"], roles, strict=False):
        if role is None:
            model["parameters"].pop("role")
        else:
            model["parameters"]["role"] = role
    return recipe


ROLE_CASES = {
    "no source_base": (
        ("source_finetuned", "source_finetuned"),
        "exactly one model with `role: source_base`.*found none",
    ),
    "two source_base": (("source_base", "source_base"), "exactly one .*found .*ft_a.*source_base"),
    "unknown role": (("finetuned", "source_base"), "has role 'finetuned'.*role: source_finetuned"),
    "missing role": ((None, "source_base"), "has no role: give it `parameters: \\{role:"),
}


@pytest.mark.parametrize("case", ROLE_CASES)
def test_role_errors(case, trio, tmp_path):
    roles, message = ROLE_CASES[case]
    recipe = with_roles(transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2]), *roles)
    with pytest.raises(FinetuningTransferError, match=message):
        run_in_process(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_a_source_base(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [], trio[2])
    recipe["models"].append({"model": str(trio[0])})
    with pytest.raises(
        FinetuningTransferError, match="at least one model with `role: source_finetuned`"
    ):
        run_in_process(recipe, tmp_path / "out")


def test_target_with_a_role(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    recipe["models"].append({"model": str(trio[0]), "parameters": {"role": "source_base"}})
    with pytest.raises(
        FinetuningTransferError, match="is base_model, the target, and takes no role"
    ):
        run_in_process(recipe, tmp_path / "out")


def test_missing_base_model(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    del recipe["base_model"]
    with pytest.raises(FinetuningTransferError, match="needs `base_model:` set to the target"):
        run_in_process(recipe, tmp_path / "out")


def test_different_architectures(llama, olmo2, trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(olmo2.model("ft", 3), 1.0)], trio[2])
    with pytest.raises(FinetuningTransferError, match="is llama .* but .* is olmo2"):
        run_in_process(recipe, tmp_path / "out")


def test_different_tensor_shapes(trio, tmp_path):
    wide = tmp_path / "wide"
    shutil.copytree(trio[1], wide)
    weights = load_file(wide / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(129, 64, dtype=torch.bfloat16)
    save_file(weights, wide / "model.safetensors", metadata={"format": "pt"})
    recipe = transfer_recipe(trio[0], [(wide, 1.0)], trio[2])
    with pytest.raises(
        FinetuningTransferError,
        match=r"model.layers.1.mlp.up_proj.weight has shape \[129, 64\] in .*wide",
    ):
        run_in_process(recipe, tmp_path / "out")


def test_missing_tensor(trio, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(trio[2], partial)
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], partial)
    with pytest.raises(
        FinetuningTransferError, match="partial lacks 1 tensor.*model.layers.0.self_attn.k_proj"
    ):
        run_in_process(recipe, tmp_path / "out")


def test_extra_vocabulary_without_tokenizer_source(llama, trio, tmp_path):
    ft = llama.model("ft_extra_vocab", 5, extra_vocab=True)
    recipe = transfer_recipe(trio[0], [(ft, 1.0)], trio[2])
    with pytest.raises(FinetuningTransferError, match=f"Add `tokenizer: {{source: {ft}}}`"):
        run_in_process(recipe, tmp_path / "out")


def test_existing_model_is_not_overwritten(trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    with pytest.raises(FinetuningTransferError, match="already holds a model"):
        run_in_process(recipe, out)
    assert (out / "config.json").read_text() == "{}"


def test_cli_prints_the_error_without_traceback(trio, tmp_path):
    import yaml

    recipe = with_roles(transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2]), None, "source_base")
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe))
    result = run_cli("mergekit-yaml", str(config), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Error: model " in result.stderr and "has no role" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
