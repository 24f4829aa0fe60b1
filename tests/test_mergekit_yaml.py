"""Merges through the real, unmodified ``mergekit-yaml`` on tiny local checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers import load_weights, merge, reference, run_cli, transfer_recipe
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_ftt.preflight import read_checkpoint


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_relative_local_folders_offline(llama, tmp_path):
    """`models: [{model: ft_a}]` relative to the working directory: mergekit's model card
    would ask the Hub whether `ft_a` is a repository, after the weights are written."""
    llama.model("target", 1), llama.model("source_base", 2), llama.model("ft_a", 3)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(transfer_recipe("target", [("ft_a", 1.0)], "source_base")))
    out = tmp_path / "out"
    result = run_cli("mergekit-yaml", str(recipe), str(out), cwd=llama.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"README.md", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    expected = reference(
        load_weights(llama.root / "target"),
        [(load_weights(llama.root / "ft_a"), 1.0)],
        load_weights(llama.root / "source_base"),
    )
    merged = load_weights(out)
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize(
    "lazy_unpickle",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["torch.load", "lazy-unpickle"],
)
def test_pickled_bin_finetune(lazy_unpickle, llama, tmp_path):
    """A .bin-only checkpoint is merged as mergekit reads it, exactly; the note says how."""
    target, base = llama.model("target", 1), llama.model("source_base", 2)
    pickled = tmp_path / "pickled"
    shutil.copytree(llama.model("ft_a", 3), pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    options = ("--lazy-unpickle",) if lazy_unpickle else ()
    result, out = merge(transfer_recipe(target, [(pickled, 1.0)], base), tmp_path, options=options)
    assert result.returncode == 0, result.stderr[-3000:]
    note = f"mergekit-ftt: {pickled}/pytorch_model.bin is a pickled .bin file: mergekit loads"
    assert (note in result.stderr) is not lazy_unpickle
    expected = reference(
        load_weights(target), [(load_weights(llama.model("ft_a", 3)), 1.0)], load_weights(base)
    )
    merged = load_weights(out)
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())


def test_dare_rescales_by_default(llama, tmp_path):
    """`sparsification_method: random` without `rescale` rescales, as mergekit's dare_*."""
    target = llama.model("target_fp32", 1, dtype="float32")
    base = llama.model("source_base_fp32", 2, dtype="float32")
    ft = llama.model("ft_fp32", 3, dtype="float32")
    recipe = transfer_recipe(
        target, [(ft, 1.0)], base, dtype="float32", parameters={"sparsification_method": "random"}
    )
    recipe["models"][0]["parameters"]["density"] = 0.5
    result, out = merge(recipe, tmp_path, options=("--random-seed", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    merged, target_w = load_weights(out), load_weights(target)
    ft_w, base_w = load_weights(ft), load_weights(base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        kept = merged[name].double() - target_w[name].double()
        full = ft_w[name].double() - base_w[name].double()
        assert 0.4 < (kept != 0).double().mean() < 0.6  # about half the delta dropped...
        assert kept.abs().sum() / full.abs().sum() == pytest.approx(1.0, rel=1e-4)  # ...rescaled


@pytest.fixture(scope="module")
def lora_finetune(llama, tmp_path_factory):
    """A float32 source base and a PEFT LoRA adapter (random A and B) trained "on" it."""
    from peft import LoraConfig, get_peft_model

    base = llama.model("source_base_fp32", 2, dtype="float32")
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(adapter)
    return base, adapter


@pytest.mark.slow
def test_lora_finetune_as_source_finetuned(lora_finetune, llama, tmp_path):
    """`model: BASE+ADAPTER` with --lora-merge-cache: the delta is scaling · B @ A."""
    base, adapter = lora_finetune
    target = llama.model("target_fp32", 1, dtype="float32")
    recipe = transfer_recipe(target, [(f"{base}+{adapter}", 1.0)], base, dtype="float32")
    cache = tmp_path / "lora-cache"
    result, out = merge(recipe, tmp_path, options=("--lora-merge-cache", str(cache)))
    assert result.returncode == 0, result.stderr[-3000:]
    merged, target_w, base_w = load_weights(out), load_weights(target), load_weights(base)
    lora = load_file(adapter / "adapter_model.safetensors")
    scaling = 8 / 4  # lora_alpha / r
    eps = torch.finfo(torch.float32).eps
    for layer in (0, 1):
        for projection in ("q_proj", "v_proj"):
            module = f"model.layers.{layer}.self_attn.{projection}"
            lora_b = lora[f"base_model.model.{module}.lora_B.weight"].double()
            lora_a = lora[f"base_model.model.{module}.lora_A.weight"].double()
            delta = scaling * (lora_b @ lora_a)
            exact = target_w[f"{module}.weight"].double() + delta
            # float32 rounding bound of peft's fl(W + fl(s · B @ A)) (r products summed) and
            # of the output fl(target + delta): (r + 3) · eps · (|W| + |target| + s |B| |A|)
            magnitude = (
                base_w[f"{module}.weight"].double().abs()
                + target_w[f"{module}.weight"].double().abs()
                + scaling * (lora_b.abs() @ lora_a.abs())
            )
            error = (merged[f"{module}.weight"].double() - exact).abs()
            assert (error <= (4 + 3) * eps * magnitude).all(), f"{module}: {error.max():.3g}"
            assert delta.abs().min() > 0
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[name], target_w[name])  # no adapter there: delta 0
    # Bit for bit: target + (the merged copy mergekit kept in the cache − base), rounded once.
    (merged_copy,) = cache.iterdir()
    expected = reference(target_w, [(load_weights(merged_copy), 1.0)], base_w, dtype=torch.float32)
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())


def test_stored_dtypes_of_a_lora_input(lora_finetune, llama, capsys):
    """What the preflight reports for ``BASE+ADAPTER``: the dtypes of the merged copy."""
    _, adapter = lora_finetune
    model = ModelReference.parse(f"{llama.model('source_base', 2)}+{adapter}")  # a bf16 base
    in_base_dtype = read_checkpoint(model, MergeOptions(lora_merge_cache="unused"))
    assert in_base_dtype.dtypes == {torch.bfloat16}
    assert "rounds the adapter's update to bfloat16" in capsys.readouterr().err
    options = MergeOptions(lora_merge_cache="unused", lora_merge_dtype="float32")
    assert read_checkpoint(model, options).dtypes == {torch.float32}
    assert capsys.readouterr().err == ""
