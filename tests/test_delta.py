"""Portable deltas through the real commands: ``ftt-delta extract`` / ``info`` and ``mergekit-yaml``.

Lossless deltas are checked bit for bit against the three-model transfer run by the same
``mergekit-yaml``; compressed ones against an independent NumPy reconstruction from the
two models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import load_weights, run_cli

from mergekit_ftt.delta.encode import decode
from mergekit_ftt.delta.info import open_and_describe
from mergekit_ftt.modules import module_path
from mergekit_ftt.training.iterate import _substitute as stand_ins  # each value swapped

pytestmark = pytest.mark.slow  # every test runs ftt-delta and/or mergekit-yaml


def extract(out: Path, finetuned: Path, base: Path, *options: str) -> Path:
    """``ftt-delta extract`` in this process (its console script's ``main``; the real
    command runs in the ``exact_delta`` fixture)."""
    from mergekit_ftt.delta.cli import main

    arguments = ["extract", str(out), "--finetuned", str(finetuned), "--base", str(base)]
    assert main([*arguments, *options]) == 0
    return out


def merge(recipe: dict, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run_cli("mergekit-yaml", str(path), str(folder / "out"))
    assert result.returncode == 0, result.stderr
    return load_weights(folder / "out")


def recipe(target: Path, inputs: list[dict], **extra) -> dict:
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": inputs,
        **extra,
    }


def pair(finetuned: Path, base: Path, weight: float = 1.0) -> list[dict]:
    return [
        {"model": str(finetuned), "parameters": {"role": "source_finetuned", "weight": weight}},
        {"model": str(base), "parameters": {"role": "source_base"}},
    ]


def delta_input(folder: Path, weight: float = 1.0) -> dict:
    return {"model": str(folder), "parameters": {"role": "delta", "weight": weight}}


def assert_same_bits(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name}: {(got[name] != tensor).sum()} differ"


@pytest.fixture(scope="module")
def models(llama):
    """Target, source base and two fine-tunes (independent random weights: every bf16
    difference is a hard case for exactness)."""
    return {
        "target": llama.model("target", 1),
        "base": llama.model("source_base", 2),
        "ft": llama.model("ft_a", 3),
        "ft_b": llama.model("ft_b", 4),
        "ft_vocab": llama.model("ft_vocab", 5, extra_vocab=True),
    }


@pytest.fixture(scope="module")
def three_model(models, tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("three_model")
    return merge(recipe(models["target"], pair(models["ft"], models["base"])), folder)


@pytest.fixture(scope="module")
def exact_delta(models, tmp_path_factory) -> Path:
    """Extracted from a recipe, as a user would: its source_finetuned − source_base."""
    root = tmp_path_factory.mktemp("exact")
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(models["target"], pair(models["ft"], models["base"]))))
    result = run_cli("ftt-delta", "extract", str(path), str(root / "delta"))
    assert result.returncode == 0, result.stderr
    assert "Apply it with mergekit-yaml" in result.stdout
    return root / "delta"


def exact_difference(finetuned: Path, base: Path) -> dict[str, np.ndarray]:
    ft, sb = load_weights(finetuned), load_weights(base)
    return {name: ft[name].double().numpy() - sb[name].double().numpy() for name in ft}


# --- lossless -------------------------------------------------------------------------


def test_exact_delta_transfers_bit_identically(models, exact_delta, three_model, tmp_path):
    config = json.loads((exact_delta / "delta_config.json").read_text())
    assert config["format_version"] == 1
    assert config["encoding"] == {
        "kind": "dense", "dtype": "bfloat16", "exact": True, "method": None, "density": None,
        "rescale": None, "seed": None, "block_elements": None, "scale": None,
    }  # fmt: skip
    # bf16 − bf16 is often not a bf16 value: those elements are stored exactly beside it.
    differences = exact_difference(models["ft"], models["base"])
    for name, info in config["tensors"].items():
        rounded = torch.from_numpy(differences[name]).bfloat16().double().numpy()
        assert info["corrections"] == int((rounded != differences[name]).sum()), name
    assert sum(info["corrections"] for info in config["tensors"].values()) > 1000
    merged = merge(recipe(models["target"], [delta_input(exact_delta)]), tmp_path)
    assert_same_bits(merged, three_model)


def test_float32_delta_transfers_bit_identically(models, three_model, tmp_path):
    delta = extract(tmp_path / "delta", models["ft"], models["base"], "--dtype", "float32")
    config = json.loads((delta / "delta_config.json").read_text())
    # ft − base of two bf16 values is exact in float32 unless their exponents are > 16 apart.
    assert all(info["components"][""]["dtype"] == "float32" for info in config["tensors"].values())
    merged = merge(recipe(models["target"], [delta_input(delta)]), tmp_path / "merge")
    assert_same_bits(merged, three_model)


def test_deltas_mix_with_pairs_and_keep_their_weights(models, exact_delta, tmp_path):
    """One stored delta at α = 0.5 beside a fine-tuned/base pair at α = 1.25 gives the
    bits of the same transfer from the three models."""
    from_models = merge(
        recipe(models["target"], [*pair(models["ft"], models["base"], 0.5)[:1],
                                  *pair(models["ft_b"], models["base"], 1.25)]),
        tmp_path / "models",
    )  # fmt: skip
    mixed = merge(
        recipe(models["target"], [delta_input(exact_delta, 0.5),
                                  *pair(models["ft_b"], models["base"], 1.25)]),
        tmp_path / "mixed",
    )  # fmt: skip
    assert_same_bits(mixed, from_models)
    card = (tmp_path / "mixed" / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")  # a local target: no Hub id
    ft, ft_b, base = (f"`{models[key]}`" for key in ("ft", "ft_b", "base"))
    assert f"| {ft} − {base} | 0.5 | delta folder `{exact_delta}` (dense bfloat16, exact) |" in card
    assert f"| {ft_b} − {base} | 1.25 | the two models |" in card
    assert f"**Target (base model):** `{models['target']}`" in card


def test_added_tokens_are_full_rows_and_transfer_bit_identically(models, tmp_path):
    delta = extract(tmp_path / "delta", models["ft_vocab"], models["base"])
    config = json.loads((delta / "delta_config.json").read_text())
    assert config["vocabulary"]["added_tokens"] == [f"<|tool_{i}|>" for i in range(8)]
    embedding = config["tensors"]["model.embed_tokens.weight"]
    assert embedding["full_rows"] == list(range(embedding["shape"][0] - 8, embedding["shape"][0]))
    expected = merge(
        recipe(models["target"], pair(models["ft_vocab"], models["base"]),
               tokenizer={"source": str(models["ft_vocab"])}),
        tmp_path / "models",
    )  # fmt: skip
    merged = merge(
        recipe(models["target"], [delta_input(delta)], tokenizer={"source": str(delta)}),
        tmp_path / "delta-merge",
    )
    assert_same_bits(merged, expected)
    ft_rows = load_weights(models["ft_vocab"])["model.embed_tokens.weight"][-8:]
    assert torch.equal(merged["model.embed_tokens.weight"][-8:], ft_rows)
    saved = json.loads((tmp_path / "delta-merge" / "out" / "config.json").read_text())
    assert saved["vocab_size"] == embedding["shape"][0]


def test_tied_embeddings_transfer_bit_identically(tied_llama, tmp_path):
    target, base, ft = (tied_llama.model(n, s) for n, s in (("t", 1), ("b", 2), ("f", 3)))
    delta = extract(tmp_path / "delta", ft, base)
    assert "lm_head.weight" not in json.loads((delta / "delta_config.json").read_text())["tensors"]
    expected = merge(recipe(target, pair(ft, base)), tmp_path / "models")
    assert_same_bits(
        merge(recipe(target, [delta_input(delta)]), tmp_path / "delta-merge"), expected
    )


# --- the folder -----------------------------------------------------------------------


def test_folder_holds_tokenizer_config_card_and_hashes(models, exact_delta):
    files = {p.name for p in exact_delta.iterdir()}
    assert {"delta_config.json", "config.json", "README.md", "tokenizer.json",
            "chat_template.jinja", "delta.safetensors"} <= files  # fmt: skip
    config = json.loads((exact_delta / "delta_config.json").read_text())
    assert config["finetuned"]["model"] == str(models["ft"])
    assert config["base"]["model"] == str(models["base"])
    assert len(config["finetuned"]["weights_sha256"]) == 64
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["source_config"]["hidden_size"] == 64
    card = (exact_delta / "README.md").read_text()
    assert "role: delta" in card and "bit-identical" in card
    # no library_name: transformers cannot load a delta folder
    assert card.startswith("---\ntags:\n- mergekit-ftt\n- delta")


def test_info_reports_format_size_and_errors(exact_delta):
    result = run_cli("ftt-delta", "info", str(exact_delta), "--verify")
    assert result.returncode == 0, result.stderr
    assert "dense bfloat16, exact:" in result.stdout
    assert "all files match the sha256" in result.stdout
    assert "| layers.*.self_attn.q_proj.weight | attention | 2 | 0 |" in result.stdout
    facts = open_and_describe(exact_delta, verify=False)
    assert facts["relative_error"] == 0.0
    assert facts["stored_bytes"] == (exact_delta / "delta.safetensors").stat().st_size


# --- compressed -----------------------------------------------------------------------


def rounded_bf16(values: np.ndarray) -> np.ndarray:
    """float64 → bf16 → float64, once to nearest, ties to even (independent of torch)."""
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.rint(np.ldexp(mantissa, 8)), exponent - 8)


def transferred(target: Path, delta: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(rounded_bf16(t.double().numpy() + delta[name])).bfloat16()
        for name, t in load_weights(target).items()
    }


def test_sign_delta_is_sign_times_mean_magnitude_per_row(models, tmp_path):
    delta = extract(tmp_path / "delta", models["ft"], models["base"], "--compress", "sign")
    exact = exact_difference(models["ft"], models["base"])
    decoded = {}
    for name, values in exact.items():
        if values.ndim == 1:  # norms: stored dense, rounded
            decoded[name] = rounded_bf16(values)
            continue
        scale = np.abs(values).mean(axis=1, keepdims=True).astype(np.float32).astype(np.float64)
        decoded[name] = np.where(values > 0, rounded_bf16(scale), -rounded_bf16(scale))
    merged = merge(recipe(models["target"], [delta_input(delta)]), tmp_path / "merge")
    assert_same_bits(merged, transferred(models["target"], decoded))
    payload = sum(
        math.ceil(v.size / 8) + 4 * v.shape[0] if v.ndim == 2 else 2 * v.size
        for v in exact.values()
    )  # 1 bit per element and a float32 scale per row; norms in bf16
    stored = (delta / "delta.safetensors").stat().st_size
    assert payload < stored < payload + 8192  # + the safetensors header
    facts = open_and_describe(delta, verify=False)
    for module in facts["modules"]:
        names = [n for n in exact if module_path(n) == module["module"]]
        error = math.sqrt(sum(((decoded[n] - exact[n]) ** 2).sum() for n in names))
        norm = math.sqrt(sum((exact[n] ** 2).sum() for n in names))
        expected = error / norm if norm else 0.0  # the norms' Δ is 0: both models init them to 1
        assert module["relative_error"] == pytest.approx(expected, rel=1e-6), module


def test_magnitude_delta_keeps_the_largest_elements(models, tmp_path):
    delta = extract(
        tmp_path / "delta", models["ft"], models["base"], "--compress", "magnitude",
        "--density", "0.25", "--dtype", "float32",
    )  # fmt: skip
    from mergekit_ftt.delta.format import DeltaFolder

    folder = DeltaFolder(delta)
    exact = exact_difference(models["ft"], models["base"])
    decoded = {}
    for name, values in exact.items():
        decoded[name] = decode(folder, name).double().numpy()
        kept = decoded[name] != 0
        count = min(max(1, int(0.25 * values.size)), np.count_nonzero(values))
        assert kept.sum() == count, name  # (the norms' Δ is all zeros)
        # the kept elements are Δ's own values, and no dropped element is larger
        np.testing.assert_array_equal(decoded[name][kept], values[kept].astype(np.float32))
        if count:
            assert np.abs(values[kept]).min() >= np.abs(values[~kept]).max(), name
    merged = merge(recipe(models["target"], [delta_input(delta)]), tmp_path / "merge")
    assert_same_bits(merged, transferred(models["target"], decoded))


def test_dare_delta_keeps_a_fraction_and_rescales(models, tmp_path):
    delta = extract(
        tmp_path / "delta", models["ft"], models["base"], "--compress", "dare",
        "--density", "0.3", "--seed", "7",
    )  # fmt: skip
    config = json.loads((delta / "delta_config.json").read_text())
    assert config["encoding"]["method"] == "random" and config["encoding"]["rescale"] is True
    from mergekit_ftt.delta.format import DeltaFolder

    folder = DeltaFolder(delta)
    exact = exact_difference(models["ft"], models["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    decoded = decode(folder, name).double().numpy()
    kept = decoded != 0
    assert kept.mean() == pytest.approx(0.3, abs=0.02)
    # L1 rescaling: the kept values are Δ's, scaled so that ‖kept‖₁ = ‖Δ‖₁ (bf16-rounded).
    ratio = np.abs(exact[name]).sum() / np.abs(exact[name][kept]).sum()
    np.testing.assert_allclose(decoded[kept], exact[name][kept] * ratio, rtol=2**-8)


# --- the compiled decoder ----------------------------------------------------------


@pytest.mark.parametrize(
    "options", [("--compress", "sign"), ("--compress", "magnitude", "--density", "0.3")]
)
def test_decoded_deltas_are_the_same_with_and_without_numba(models, tmp_path, options):
    from mergekit_ftt.delta.format import DeltaFolder

    folder = DeltaFolder(extract(tmp_path / "delta", models["ft"], models["base"], *options))
    for name in folder.tensor_names:
        compiled, fallback = decode(folder, name), decode(folder, name, jit=False)
        assert torch.equal(compiled.view(torch.int16), fallback.view(torch.int16)), name


# --- the shipped recipes ---------------------------------------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_shipped_delta_recipes_match_the_paper_recipe(llama, tmp_path):
    """`ftt-delta extract recipes/llama3_plus_delta31.yml` then recipes/deltas/*.yml, with
    tiny stand-ins for the Hub models: the same bits as the recipes from the models."""
    local = {
        "meta-llama/Meta-Llama-3-8B": str(llama.model("llama3-8b", 11)),
        "meta-llama/Llama-3.1-8B-Instruct": str(llama.model("llama31-8b-instruct", 12)),
        "meta-llama/Llama-3.1-8B": str(llama.model("llama31-8b", 13)),
        "allenai/Llama-3.1-Tulu-3-8B": str(llama.model("tulu3-8b", 14, extra_vocab=True)),
        "deltas/llama31-8b-instruct": str(tmp_path / "deltas" / "llama31-8b-instruct"),
    }
    paper = stand_ins(yaml.safe_load((RECIPES / "llama3_plus_delta31.yml").read_text()), local)
    (tmp_path / "paper.yml").write_text(yaml.safe_dump(paper))
    from mergekit_ftt.delta.cli import main

    assert main(["extract", str(tmp_path / "paper.yml"), local["deltas/llama31-8b-instruct"]]) == 0
    from_models = merge(paper, tmp_path / "paper")
    applied = stand_ins(
        yaml.safe_load((RECIPES / "deltas/llama3_plus_delta31.yml").read_text()), local
    )
    assert_same_bits(merge(applied, tmp_path / "applied"), from_models)
    assert (tmp_path / "applied" / "out" / "chat_template.jinja").exists()

    mixed = stand_ins(
        yaml.safe_load((RECIPES / "deltas/llama3_plus_delta31_and_tulu3.yml").read_text()), local
    )
    same_from_models = {
        **mixed,
        "models": [
            {"model": local["meta-llama/Llama-3.1-8B-Instruct"],
             "parameters": {"role": "source_finetuned", "weight": 0.5}},
            *mixed["models"][1:],
        ],
        "tokenizer": {"source": local["meta-llama/Llama-3.1-8B-Instruct"]},
    }  # fmt: skip
    assert_same_bits(merge(mixed, tmp_path / "mixed"), merge(same_from_models, tmp_path / "pairs"))


def test_sparsified_transfer_treats_a_delta_like_its_pair(models, exact_delta, tmp_path):
    """mergekit's sparsification and TIES consensus inside finetuning_transfer see the same
    float32 Δ whether it is read from a delta folder or taken from the two models."""
    settings = {"sparsification_method": "magnitude", "consensus_method": "sum"}
    density = {"weight": 1.0, "density": 0.4}
    from_models = recipe(
        models["target"],
        [{"model": str(models["ft"]), "parameters": {"role": "source_finetuned", **density}},
         {"model": str(models["ft_b"]), "parameters": {"role": "source_finetuned", **density}},
         {"model": str(models["base"]), "parameters": {"role": "source_base"}}],
        parameters=settings,
    )  # fmt: skip
    with_delta = {
        **from_models,
        "models": [
            {"model": str(exact_delta), "parameters": {"role": "delta", **density}},
            *from_models["models"][1:],
        ],
    }
    assert_same_bits(merge(with_delta, tmp_path / "delta"), merge(from_models, tmp_path / "models"))
