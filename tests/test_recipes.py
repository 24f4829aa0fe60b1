"""Every shipped recipe runs end to end, its Hub ids replaced by tiny local models.

Single transfers are checked on every tensor against an independent float64 reference
rounded once; multi-step recipes (TIES, SLERP after a transfer), the sparsified one and the
LoRA one are checked for running to a model of the right architecture here, their
numerics in tests/test_mergekit_yaml.py (LoRA, DARE) and mergekit's own tests (SLERP, TIES).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_weights, rounded, run_cli
from transformers import AutoConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipes/deltas/ apply delta folders, made by ftt-delta: tests/test_delta.py runs them.
ALL_RECIPES = sorted(p for p in RECIPES.rglob("*.yml") if "deltas" not in p.parts)
MODEL_KEYS = {"model", "base_model", "source"}


def model_references(node) -> list[str]:
    """Every model reference in a recipe document (inputs, target, tokenizer source)."""
    if isinstance(node, dict):
        return [
            ref
            for key, value in node.items()
            for ref in (
                [value] if key in MODEL_KEYS and isinstance(value, str) else model_references(value)
            )
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in model_references(item)]
    return []


def model_ids(document) -> set[str]:
    """The models and adapters a document names; ``BASE+ADAPTER`` counts as both."""
    return {part for ref in model_references(document) for part in ref.split("+")}


def replaced(node, local: dict[str, str]):
    if isinstance(node, dict):
        return {
            key: "+".join(local.get(part, part) for part in value.split("+"))
            if key in MODEL_KEYS and isinstance(value, str)
            else replaced(value, local)
            for key, value in node.items()
        }  # fmt: skip
    if isinstance(node, list):
        return [replaced(item, local) for item in node]
    return node


def tiny_stand_in(model_id: str, seed: int, llama, olmo2) -> Path:
    """A tiny model of the same family; Tülu models get 8 extra tokens, as the real ones."""
    family = olmo2 if "olmo" in model_id.lower() else llama
    return family.model(stand_in_name(model_id), seed, extra_vocab="tulu" in model_id.lower())


def stand_in_name(model_id: str) -> str:
    return model_id.strip("./").replace("/", "--").replace("@", "--")


def tiny_adapter(adapter_id: str, base: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (random A and B) on the tiny stand-in of its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = base.parent / stand_in_name(adapter_id)
    if not (path / "adapter_config.json").exists():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(path)
    return path


def lora_pairs(documents) -> set[tuple[str, str]]:
    """(base, adapter) of every ``BASE+ADAPTER`` model in the recipe."""
    return {
        tuple(value.split("+"))
        for doc in documents
        for value in model_references(doc)
        if "+" in value
    }


def test_recipes_are_found():
    names = {path.relative_to(RECIPES).as_posix() for path in ALL_RECIPES}
    assert {
        "llama3_plus_delta31.yml",
        "llama31_plus_delta30.yml",
        "llama3_plus_delta_tulu3.yml",
        "llama3_plus_delta_tulu31.yml",
        "olmo2_plus_delta_instruct.yml",
        "olmo2_m5_plus_delta_m4_math.yml",
        "lora/llama3_plus_delta_lora.yml",
    } <= names
    assert any(name.startswith("combos/") for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_runs_through_mergekit(recipe, llama, olmo2, tmp_path):
    documents = list(yaml.safe_load_all(recipe.read_text()))
    merge_names = {doc["name"] for doc in documents if "name" in doc}
    adapters = {adapter: base for base, adapter in lora_pairs(documents)}
    ids = sorted(set().union(*(model_ids(doc) for doc in documents)) - merge_names - set(adapters))
    local = {
        model_id: str(tiny_stand_in(model_id, seed, llama, olmo2))
        for seed, model_id in enumerate(ids, 1)
    }
    local |= {
        adapter: str(tiny_adapter(adapter, Path(local[base]), seed))
        for seed, (adapter, base) in enumerate(sorted(adapters.items()), len(ids) + 1)
    }
    # The options the LoRA recipes' headers give.
    lora_options = [
        "--lora-merge-cache",
        str(tmp_path / "lora-cache"),
        "--lora-merge-dtype",
        "float32",
    ]
    config = tmp_path / recipe.name
    config.write_text(yaml.safe_dump_all([replaced(doc, local) for doc in documents]))
    out = tmp_path / "out"
    if len(documents) > 1:
        result = run_cli(
            "mergekit-multi",
            str(config),
            "--intermediate-dir",
            str(tmp_path / "steps"),
            "--out-path",
            str(out),
            *(lora_options if adapters else []),
        )
    else:
        result = run_cli(
            "mergekit-yaml", str(config), str(out), *(lora_options if adapters else [])
        )
    assert result.returncode == 0, result.stderr[-3000:]
    first = documents[0]
    assert AutoConfig.from_pretrained(out).model_type == (
        "olmo2" if "olmo" in recipe.name else "llama"
    )
    if (
        len(documents) == 1
        and "sparsification_method" not in (first.get("parameters") or {})
        and not adapters  # LoRA numerics: tests/test_mergekit_yaml.py
    ):
        check_transfer(first, local, load_weights(out))


def check_transfer(recipe: dict, local: dict[str, str], merged: dict[str, torch.Tensor]) -> None:
    """Every tensor equals target + Σ α·(finetuned − source_base), computed in float64 and
    rounded once in NumPy (helpers.rounded), bit for bit. Vocabulary rows: the rows all
    models share follow the sum; rows only the fine-tuned model has are its own rows."""
    target = load_weights(Path(local[recipe["base_model"]]))
    roles = {m["parameters"]["role"]: m for m in recipe["models"]}
    source_base = load_weights(Path(local[roles["source_base"]["model"]]))
    pairs = [
        (load_weights(Path(local[m["model"]])), float(m["parameters"].get("weight", 1.0)))
        for m in recipe["models"]
        if m["parameters"]["role"] == "source_finetuned"
    ]
    assert merged.keys() == target.keys()
    for name, out in merged.items():
        inputs = [target[name], source_base[name], *(ft[name] for ft, _ in pairs)]
        shared = min(tensor.shape[0] for tensor in inputs) if out.dim() else None
        total = target[name][:shared].double().numpy()
        for finetuned, weight in pairs:
            total = total + weight * (
                finetuned[name][:shared].double().numpy()
                - source_base[name][:shared].double().numpy()
            )
        assert torch.equal(out[:shared], rounded(total, out.dtype)), name
        if out.dim() and out.shape[0] > shared:  # tokens only the fine-tuned model has
            own = pairs[0][0][name][shared:]  # (rows past them: pad_to_multiple_of padding)
            assert torch.equal(out[shared : shared + len(own)], own.to(out.dtype)), name
