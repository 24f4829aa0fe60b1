"""Bad recipes and inputs fail before anything is written, with a message that names the fix.

Each case checks the message and that the output folder was not created (or is empty).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers import nothing_written, run_cli, transfer_recipe
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_ftt.errors import FinetuningTransferError


def refused(recipe: dict, tmp_path, match: str, **options) -> None:
    """mergekit's own ``run_merge`` (as the installed hook leaves it) refuses the merge
    with a message matching ``match``, and writes nothing."""
    out = tmp_path / "out"
    with pytest.raises(FinetuningTransferError, match=match):
        run_merge(
            MergeConfiguration.model_validate(recipe),
            str(out),
            MergeOptions(quiet=True, **options),
        )
    assert nothing_written(out)


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


def copy_model(source, destination):
    shutil.copytree(source, destination)
    return destination


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
    refused(recipe, tmp_path, message)


def test_only_a_source_base(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [], trio[2])
    recipe["models"].append({"model": str(trio[0])})
    refused(recipe, tmp_path, "at least one model with `role: source_finetuned`")


def test_target_with_a_role(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    recipe["models"].append({"model": str(trio[0]), "parameters": {"role": "source_base"}})
    refused(recipe, tmp_path, "is base_model, the target, and takes no role")


def test_missing_base_model(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    del recipe["base_model"]
    refused(recipe, tmp_path, "needs `base_model:` set to the target")


def test_different_architectures(llama, olmo2, trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(olmo2.model("ft", 3), 1.0)], trio[2])
    refused(recipe, tmp_path, "is llama .* but .* is olmo2")


def test_different_tensor_shapes(trio, tmp_path):
    wide = copy_model(trio[1], tmp_path / "wide")
    weights = load_file(wide / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(129, 64, dtype=torch.bfloat16)
    save_file(weights, wide / "model.safetensors", metadata={"format": "pt"})
    recipe = transfer_recipe(trio[0], [(wide, 1.0)], trio[2])
    refused(recipe, tmp_path, r"model.layers.1.mlp.up_proj.weight has shape \[129, 64\] in .*wide")


def test_missing_tensor(trio, tmp_path):
    partial = copy_model(trio[2], tmp_path / "partial")
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], partial)
    refused(recipe, tmp_path, "partial lacks 1 tensor.*model.layers.0.self_attn.k_proj")


def test_extra_vocabulary_without_tokenizer_source(llama, trio, tmp_path):
    ft = llama.model("ft_extra_vocab", 5, extra_vocab=True)
    recipe = transfer_recipe(trio[0], [(ft, 1.0)], trio[2])
    refused(recipe, tmp_path, f"Add `tokenizer: {{source: {ft}}}`")


def test_existing_model_is_not_overwritten(trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    with pytest.raises(FinetuningTransferError, match="already holds a model"):
        run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True))
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


def test_wrapper_binds_arguments_by_name_and_type(trio, tmp_path):
    """Keyword arguments in any order reach the checks (no hard-coded signature)."""
    recipe = with_roles(transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2]), None, "source_base")
    with pytest.raises(FinetuningTransferError, match="has no role"):
        run_merge(
            options=MergeOptions(quiet=True),
            out_path=str(tmp_path / "out"),
            merge_config=MergeConfiguration.model_validate(recipe),
        )
    assert nothing_written(tmp_path / "out")


# --- damaged or unusual weight files -------------------------------------------------


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def garbage_header(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]


@pytest.mark.parametrize("damage", [truncated, garbage_header], ids=lambda f: f.__name__)
def test_damaged_safetensors_shard(damage, trio, tmp_path):
    damaged = copy_model(trio[1], tmp_path / "damaged")
    shard = damaged / "model.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    recipe = transfer_recipe(trio[0], [(damaged, 1.0)], trio[2])
    refused(
        recipe,
        tmp_path,
        f"{shard} \\(a weight file of {damaged}\\) cannot be read: SafetensorError: .*"
        "It is truncated or damaged: download or copy it again",
    )


@pytest.fixture
def sharded(llama, tmp_path):
    """ft_a saved in three safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama.model("ft_a", 3))
    model.save_pretrained(path, max_shard_size="40KB")
    llama.tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


def test_shard_listed_in_the_index_but_missing(sharded, trio, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    recipe = transfer_recipe(trio[0], [(sharded, 1.0)], trio[2])
    refused(
        recipe,
        tmp_path,
        f"model.safetensors.index.json lists 1 shard\\(s\\) that are not in {sharded}: {shard}. "
        "The download or copy is incomplete",
    )


def test_damaged_index(sharded, trio, tmp_path):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    recipe = transfer_recipe(trio[0], [(sharded, 1.0)], trio[2])
    refused(recipe, tmp_path, "model.safetensors.index.json is not a readable weight index")


def test_truncated_pickled_shard(trio, tmp_path):
    pickled = copy_model(trio[1], tmp_path / "pickled")
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    shard = pickled / "pytorch_model.bin"
    shard.write_bytes(truncated(shard.read_bytes()))
    recipe = transfer_recipe(trio[0], [(pickled, 1.0)], trio[2])
    refused(recipe, tmp_path, f"{shard} \\(a weight file of {pickled}\\) cannot be read")


def test_integer_weights(trio, tmp_path):
    quantized = copy_model(trio[1], tmp_path / "quantized")
    weights = load_file(quantized / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = torch.randint(-127, 127, weights[name].shape, dtype=torch.int8)
    save_file(weights, quantized / "model.safetensors", metadata={"format": "pt"})
    recipe = transfer_recipe(trio[0], [(quantized, 1.0)], trio[2])
    refused(
        recipe,
        tmp_path,
        f"{quantized} stores 1 weight\\(s\\) as non-floating-point numbers, e.g. {name} as int8 "
        f"in {quantized}/model.safetensors.*use the unquantized model",
    )


def test_folder_without_weights(trio, tmp_path):
    empty = copy_model(trio[1], tmp_path / "config_only")
    (empty / "model.safetensors").unlink()
    recipe = transfer_recipe(trio[0], [(empty, 1.0)], trio[2])
    refused(
        recipe, tmp_path, f"{empty} has no weights: mergekit reads model.safetensors.index.json"
    )


def test_folder_without_config(trio, tmp_path):
    bare = copy_model(trio[1], tmp_path / "bare")
    (bare / "config.json").unlink()
    recipe = transfer_recipe(trio[0], [(bare, 1.0)], trio[2])
    refused(recipe, tmp_path, f"{bare} has no config.json, so it is not a transformers model")


def test_missing_local_folder(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [("./checkpoints/not-trained-yet", 1.0)], trio[2])
    refused(recipe, tmp_path, "model './checkpoints/not-trained-yet': no such local folder")


# --- recipe keys the method does not read --------------------------------------------

KEY_CASES = {
    "ties keys": (
        {"parameters": {"lambda": 0.5, "int8_mask": True}},
        None,
        "does not read `int8_mask`, `lambda` in the top-level `parameters:`; mergekit would "
        "ignore them silently. It reads, in the top-level `parameters:`, "
        "sparsification_method, consensus_method, rescale, normalize, output_dtype; per "
        "model, role, weight, density, epsilon, gamma.*Scale a delta with its model's `weight`",
    ),
    "typo per model": (
        {},
        {"weigth": 0.5},
        "does not read `weigth` in the parameters of .*ft_a.*Did you mean `weight` for `weigth`",
    ),
    "merge-wide key under a model": (
        {"parameters": {"sparsification_method": "magnitude"}},
        {"normalize": True},
        "`normalize` under model .*ft_a is a setting of the whole merge.*move it there",
    ),
    "density without sparsification": (
        {},
        {"density": 0.5},
        "`density` takes effect only with a `sparsification_method`",
    ),
}


@pytest.mark.parametrize("case", KEY_CASES)
def test_keys_the_method_does_not_read(case, trio, tmp_path):
    extra, per_model, message = KEY_CASES[case]
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2], **extra)
    recipe["models"][0]["parameters"].update(per_model or {})
    refused(recipe, tmp_path, message)


def test_weight_on_the_source_base(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    recipe["models"][1]["parameters"]["weight"] = -1.0  # task_arithmetic habits
    refused(recipe, tmp_path, "is the source_base and takes only `role`, but has `weight`")


def test_parameters_on_the_target(trio, tmp_path):
    recipe = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2])
    recipe["models"].append({"model": str(trio[0]), "parameters": {"weight": 1.0}})
    refused(
        recipe, tmp_path, "is base_model, the target, and takes no parameters, but has `weight`"
    )


# --- LoRA inputs ---------------------------------------------------------------------


def test_lora_without_merge_cache(trio, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    recipe = transfer_recipe(trio[0], [(f"{trio[2]}+{adapter}", 1.0)], trio[2])
    refused(recipe, tmp_path, "is the LoRA adapter .*adapter on .*Add `--lora-merge-cache DIR`")


def test_lora_folder_without_adapter_config(trio, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recipe = transfer_recipe(trio[0], [(f"{trio[2]}+{adapter}", 1.0)], trio[2])
    refused(
        recipe,
        tmp_path,
        f"{adapter} has no adapter_config.json, so it is not a PEFT LoRA adapter folder",
        lora_merge_cache=str(tmp_path / "lora-cache"),
    )


# --- what the command line shows -----------------------------------------------------


def test_cli_prints_the_error_without_traceback(trio, tmp_path):
    recipe = with_roles(transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2]), None, "source_base")
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe))
    result = run_cli("mergekit-yaml", str(config), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Error: model " in result.stderr and "has no role" in result.stderr
    assert "Traceback" not in result.stderr
    assert nothing_written(tmp_path / "out")


def test_cli_damaged_shard_without_traceback(trio, tmp_path):
    """The seed's symptom: `SafetensorError: ... incomplete metadata` as a traceback."""
    damaged = copy_model(trio[1], tmp_path / "damaged")
    shard = damaged / "model.safetensors"
    shard.write_bytes(truncated(shard.read_bytes()))
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(transfer_recipe(trio[0], [(damaged, 1.0)], trio[2])))
    result = run_cli("mergekit-yaml", str(config), str(tmp_path / "out"))
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert f"{shard} (a weight file of {damaged}) cannot be read" in error
    assert "Traceback" not in result.stderr
    assert nothing_written(tmp_path / "out")


def test_mergekit_multi_stops_before_the_chain_writes(trio, tmp_path):
    transfer = transfer_recipe(trio[0], [(trio[1], 1.0)], trio[2], name="transfer")
    transfer["parameters"] = {"lambda": 0.5}
    slerp = {
        "merge_method": "slerp",
        "base_model": str(trio[0]),
        "dtype": "bfloat16",
        "parameters": {"t": 0.5},
        "models": [{"model": str(trio[0])}, {"model": "transfer"}],
    }
    config = tmp_path / "chain.yml"
    config.write_text(yaml.safe_dump_all([transfer, slerp]))
    steps, out = tmp_path / "steps", tmp_path / "out"
    result = run_cli(
        "mergekit-multi", str(config), "--intermediate-dir", str(steps), "--out-path", str(out)
    )
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert "does not read `lambda`" in error
    assert "Traceback" not in result.stderr
    assert nothing_written(steps) and nothing_written(out)
