"""Model cards: a transfer output names its target as base_model, each delta's fine-tune and
base with α, and the tokenizer source (mergekit's own card says ``base_model: []``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from mergekit.config import MergeConfiguration

from mergekit_ftt.card import hub_id, transfer_card

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def metadata(card: str) -> dict:
    front, _, _ = card.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(front)


def test_paper_recipe_card():
    text = (RECIPES / "llama3_plus_delta31.yml").read_text()
    card = transfer_card(MergeConfiguration.model_validate(yaml.safe_load(text)), text, "out")
    assert metadata(card) == {
        "base_model": ["meta-llama/Meta-Llama-3-8B"],
        "library_name": "transformers",
        "tags": ["mergekit", "merge", "mergekit-ftt", "finetuning-transfer"],
    }
    assert (
        "| [meta-llama/Llama-3.1-8B-Instruct](https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct)"
        " − [meta-llama/Llama-3.1-8B](https://huggingface.co/meta-llama/Llama-3.1-8B) | 1 | "
        "the two models |"
    ) in card
    assert "**Tokenizer and chat template:** from [meta-llama/Llama-3.1-8B-Instruct]" in card
    assert "rounded once to bfloat16" in card
    assert text.strip() in card


def test_delta_recipe_card_without_the_folder_and_per_layer_weights(tmp_path):
    text = (RECIPES / "deltas" / "llama3_plus_delta31_and_tulu3.yml").read_text()
    recipe = yaml.safe_load(text)
    recipe["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    card = transfer_card(MergeConfiguration.model_validate(recipe), text, "out")
    assert metadata(card)["base_model"] == ["meta-llama/Meta-Llama-3-8B"]
    # not a local folder here, so it may be a delta on the Hub
    delta = "deltas/llama31-8b-instruct"
    assert f"| delta folder [{delta}](https://huggingface.co/{delta}) | 0.5 | |" in card
    assert "| per layer (see the configuration) | the two models |" in card


def test_local_folders_are_not_hub_ids(tmp_path):
    (tmp_path / "model").mkdir()
    assert hub_id("meta-llama/Llama-3.1-8B@main") == "meta-llama/Llama-3.1-8B"
    assert hub_id(str(tmp_path / "model")) is None
    assert hub_id("./models/ft") is None
    assert hub_id("a/b/c") is None


def test_lora_source_keeps_its_adapter_and_double_rounding_is_said():
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": "meta-llama/Meta-Llama-3-8B",
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "parameters": {"output_dtype": "float32"},
        "models": [
            {
                "model": "meta-llama/Llama-3.1-8B+org/tulu-lora",
                "parameters": {"role": "source_finetuned", "weight": 1.0},
            },
            {"model": "meta-llama/Llama-3.1-8B", "parameters": {"role": "source_base"}},
        ],
    }
    config = MergeConfiguration.model_validate(recipe)
    card = transfer_card(config, yaml.safe_dump(recipe), "out")
    assert "with the LoRA adapter [org/tulu-lora](https://huggingface.co/org/tulu-lora) −" in card
    assert "rounded twice: to float32 by the method, then to bfloat16 by mergekit" in card
    del recipe["parameters"]  # the merge's own plan rounds straight to out_dtype
    recipe["parameters"] = {"output_dtype": "bfloat16"}
    card = transfer_card(MergeConfiguration.model_validate(recipe), "", "out")
    assert "rounded once to bfloat16" in card
