"""Every shipped recipe runs end to end, its Hub ids replaced by tiny local models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_weights, run_cli
from transformers import AutoConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipes/deltas/ apply delta folders, made by ftt-delta: tests/test_delta.py runs them.
ALL_RECIPES = sorted(p for p in RECIPES.rglob("*.yml") if "deltas" not in p.parts)
MODEL_KEYS = {"model", "base_model", "source"}


def model_ids(node) -> set[str]:
    """Every model reference in a recipe document (inputs, target, tokenizer source)."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in MODEL_KEYS and isinstance(value, str):
                found.add(value)
            else:
                found |= model_ids(value)
    elif isinstance(node, list):
        for item in node:
            found |= model_ids(item)
    return found


def replaced(node, local: dict[str, str]):
    if isinstance(node, dict):
        return {
            key: local.get(value, value) if key in MODEL_KEYS and isinstance(value, str)
            else replaced(value, local)
            for key, value in node.items()
        }  # fmt: skip
    if isinstance(node, list):
        return [replaced(item, local) for item in node]
    return node


def tiny_stand_in(model_id: str, seed: int, llama, olmo2) -> Path:
    """A tiny model of the same family; Tülu models get 8 extra tokens, as the real ones."""
    family = olmo2 if "olmo" in model_id.lower() else llama
    name = model_id.strip("./").replace("/", "--").replace("@", "--")
    return family.model(name, seed, extra_vocab="tulu" in model_id.lower())


def test_recipes_are_found():
    names = {path.relative_to(RECIPES).as_posix() for path in ALL_RECIPES}
    assert {
        "llama3_plus_delta31.yml",
        "llama31_plus_delta30.yml",
        "llama3_plus_delta_tulu3.yml",
        "llama3_plus_delta_tulu31.yml",
        "olmo2_plus_delta_instruct.yml",
        "olmo2_m5_plus_delta_m4_math.yml",
    } <= names
    assert any(name.startswith("combos/") for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_runs_through_mergekit(recipe, llama, olmo2, tmp_path):
    documents = list(yaml.safe_load_all(recipe.read_text()))
    merge_names = {doc["name"] for doc in documents if "name" in doc}
    ids = sorted(set().union(*(model_ids(doc) for doc in documents)) - merge_names)
    local = {
        model_id: str(tiny_stand_in(model_id, seed, llama, olmo2))
        for seed, model_id in enumerate(ids, 1)
    }
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
        )
    else:
        result = run_cli("mergekit-yaml", str(config), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    first = documents[0]
    assert AutoConfig.from_pretrained(out).model_type == (
        "olmo2" if "olmo" in recipe.name else "llama"
    )
    if len(documents) == 1 and "sparsification_method" not in (first.get("parameters") or {}):
        check_transfer(first, local, load_weights(out))


def check_transfer(recipe: dict, local: dict[str, str], merged: dict[str, torch.Tensor]) -> None:
    """Non-vocabulary tensors equal target + (finetuned − source_base), bit for bit."""
    by_role = {m["parameters"]["role"]: local[m["model"]] for m in recipe["models"]}
    target = load_weights(Path(local[recipe["base_model"]]))
    finetuned = load_weights(Path(by_role["source_finetuned"]))
    source_base = load_weights(Path(by_role["source_base"]))
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        exact = target[name].double() + (finetuned[name].double() - source_base[name].double())
        assert torch.equal(merged[name], exact.to(merged[name].dtype)), name
