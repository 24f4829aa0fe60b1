"""Merges through the real, unmodified ``mergekit-yaml`` on tiny local checkpoints."""

from __future__ import annotations

import json

import torch
from helpers import load_weights, merge, reference, transfer_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_two_deltas_match_float64_reference_bit_for_bit(llama, tmp_path):
    target, base = llama.model("target", 1), llama.model("source_base", 2)
    ft_a, ft_b = llama.model("ft_a", 3), llama.model("ft_b", 4)
    result, out = merge(transfer_recipe(target, [(ft_a, 0.5), (ft_b, 1.25)], base), tmp_path)
    assert result.returncode == 0, result.stderr
    merged = load_weights(out)
    expected = reference(
        load_weights(target),
        [(load_weights(ft_a), 0.5), (load_weights(ft_b), 1.25)],
        load_weights(base),
    )
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    card = (out / "README.md").read_text()
    assert "[Fine-tuning Transfer](https://arxiv.org/abs/2503.20110)" in card


def test_per_layer_weights_use_mergekit_gradients_and_filters(llama, tmp_path):
    target, base, ft = (
        llama.model("target", 1),
        llama.model("source_base", 2),
        llama.model("ft_a", 3),
    )
    recipe = transfer_recipe(target, [(ft, 1.0)], base)
    # Gradient over the 2 layers for attention, 0 for MLPs, 1 elsewhere.
    recipe["models"][0]["parameters"]["weight"] = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.0},
        {"value": 1.0},
    ]
    result, out = merge(recipe, tmp_path)
    assert result.returncode == 0, result.stderr
    merged, target_w = load_weights(out), load_weights(target)
    full = reference(target_w, [(load_weights(ft), 1.0)], load_weights(base))
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        target_w["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        merged["model.layers.1.self_attn.q_proj.weight"],
        full["model.layers.1.self_attn.q_proj.weight"],
    )
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.equal(merged[name], target_w[name])
    assert torch.equal(merged["model.embed_tokens.weight"], full["model.embed_tokens.weight"])


def test_extra_vocabulary_rows_of_the_finetuned_model(llama, tmp_path):
    """The Tülu 3 case: the fine-tuned model has 8 more tokens and rows than its base."""
    target, base = llama.model("target", 1), llama.model("source_base", 2)
    ft = llama.model("ft_extra_vocab", 5, extra_vocab=True)
    recipe = transfer_recipe(target, [(ft, 1.0)], base, tokenizer={"source": str(ft)})
    result, out = merge(recipe, tmp_path)
    assert result.returncode == 0, result.stderr
    merged, ft_w = load_weights(out), load_weights(ft)
    rows = len(llama.tokenizer)
    expected = reference(load_weights(target), [(ft_w, 1.0)], load_weights(base), rows=rows)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == ft_w[name].shape == (rows + 8, 64)
        assert torch.equal(merged[name][:rows], expected[name])  # shared tokens: transfer
        assert torch.equal(merged[name][rows:], ft_w[name][rows:])  # new tokens: FT's rows
    assert torch.equal(merged["model.norm.weight"], expected["model.norm.weight"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == rows + 8
    assert tokenizer.convert_tokens_to_ids("<|tool_7|>") == rows + 7
    assert tokenizer.chat_template == llama.extended_tokenizer.chat_template
    assert (out / "generation_config.json").read_text() == (
        ft / "generation_config.json"
    ).read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.shape[0] == rows + 8


def test_tied_embeddings(tied_llama, tmp_path):
    target, base = tied_llama.model("target", 1), tied_llama.model("source_base", 2)
    ft = tied_llama.model("ft", 3)
    result, out = merge(transfer_recipe(target, [(ft, 1.0)], base), tmp_path)
    assert result.returncode == 0, result.stderr
    merged = load_weights(out)
    assert "lm_head.weight" not in merged
    expected = reference(load_weights(target), [(load_weights(ft), 1.0)], load_weights(base))
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_olmo2_through_python_m_fallback(olmo2, tmp_path, python_bin):
    target, base, ft = olmo2.model("target", 1), olmo2.model("source_base", 2), olmo2.model("ft", 3)
    command = (python_bin, "-m", "mergekit_ftt", "yaml")
    result, out = merge(transfer_recipe(target, [(ft, 1.0)], base), tmp_path, command)
    assert result.returncode == 0, result.stderr
    merged = load_weights(out)
    expected = reference(load_weights(target), [(load_weights(ft), 1.0)], load_weights(base))
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())
    assert "model.layers.0.self_attn.q_norm.weight" in merged  # OLMo 2's QK-norm
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "olmo2"
