"""ftt-inspect: statistics against NumPy, compatibility reports, errors, CLI and JSON keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import OFFLINE_ENV, run_cli, transfer_recipe
from safetensors.torch import load_file, save_file

from mergekit_ftt.demo import calibration
from mergekit_ftt.errors import FttError
from mergekit_ftt.inspect import inspect_recipe, statistics

STATISTIC_KEYS = {
    "elements",
    "delta_norm",
    "gap_norm",
    "gap_to_delta",
    "cosine",
    "relative_gap",
    "relative_delta",
}


def perturbed(source: Path, out: Path, seed: int, scale: float, dtype=torch.float32) -> Path:
    """A copy of ``source`` with every tensor moved by ``scale`` × Gaussian noise: related
    checkpoints, as a fine-tuned model and a later base are to their source base."""
    shutil.copytree(source, out)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(out / "model.safetensors")
    moved = {
        name: (tensor.float() + scale * torch.randn(tensor.shape, generator=generator)).to(dtype)
        for name, tensor in weights.items()
    }
    save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(llama, tmp_path_factory) -> dict[str, Path]:
    """A source base, two fine-tuned models of it and a target near it (float32, Llama)."""
    root = tmp_path_factory.mktemp("inspect")
    base = perturbed(llama.model("inspect-base", seed=0), root / "base", seed=0, scale=0.0)
    return {
        "base": base,
        "ft": perturbed(base, root / "ft", seed=1, scale=0.02),
        "ft2": perturbed(base, root / "ft2", seed=2, scale=0.01),
        "target": perturbed(base, root / "target", seed=3, scale=0.05),
        "target_bf16": perturbed(
            base, root / "target_bf16", seed=3, scale=0.05, dtype=torch.bfloat16
        ),
    }


def write_yaml(path: Path, **recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_recipe(path: Path, target: Path, source_base: Path, finetuned: list, **extra) -> Path:
    """The shared test recipe (helpers.transfer_recipe, bfloat16 unless ``dtype`` is given)
    written to ``path``; ``finetuned`` holds (model, weight) pairs."""
    return write_yaml(path, **transfer_recipe(target, finetuned, source_base, **extra))


def numpy_weights(path: Path, cast: torch.dtype | None = None) -> dict[str, np.ndarray]:
    tensors = load_file(path / "model.safetensors")
    return {
        name: (tensor.to(cast) if cast else tensor).to(torch.float64).numpy().ravel()
        for name, tensor in tensors.items()
    }


def reference(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The statistics of concatenated (Δ, target, source base) parts, computed by NumPy."""
    delta = np.concatenate([d for d, _, _ in parts])
    target = np.concatenate([t for _, t, _ in parts])
    base = np.concatenate([s for _, _, s in parts])
    gap = target - base
    norm = np.linalg.norm
    return {
        "elements": delta.size,
        "delta_norm": norm(delta),
        "gap_norm": norm(gap),
        "gap_to_delta": norm(gap) / norm(delta),
        "cosine": float(delta @ gap) / (norm(delta) * norm(gap)),
        "relative_gap": norm(gap) / norm(base),
        "relative_delta": norm(delta) / norm(base),
    }


def assert_statistics(found: dict, expected: dict) -> None:
    assert set(found) - {"layer", "name", "kind", "shape", "rows_compared"} == STATISTIC_KEYS
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("chunk", [statistics.CHUNK_ELEMENTS, 100])
def test_statistics_match_numpy_per_tensor_layer_kind_and_model(
    family, tmp_path, monkeypatch, chunk
):
    """Two fine-tuned models with weights 0.7 and −0.3, Δ = Σ α(FT − M_s), in float64;
    with 100-element chunks every tensor is read in many pieces (one row of 64 at a time)."""
    monkeypatch.setattr(statistics, "CHUNK_ELEMENTS", chunk)
    recipe = write_recipe(
        tmp_path / "r.yml",
        family["target"],
        family["base"],
        [(family["ft"], 0.7), (family["ft2"], -0.3)],
        dtype="float32",
    )
    report = inspect_recipe(recipe, progress=False)

    base, target = numpy_weights(family["base"]), numpy_weights(family["target"])
    ft, ft2 = numpy_weights(family["ft"]), numpy_weights(family["ft2"])
    parts = {
        name: (
            0.7 * (ft[name] - base[name]) - 0.3 * (ft2[name] - base[name]),
            target[name],
            base[name],
        )
        for name in base
    }
    tensors = {entry["name"]: entry for entry in report["statistics"]["tensors"]}
    assert set(tensors) == set(parts)
    for name, part in parts.items():
        assert_statistics(tensors[name], reference([part]))

    assert_statistics(report["statistics"]["model"], reference(list(parts.values())))
    for layer in (0, 1):
        found = report["statistics"]["layers"][layer]
        assert found["layer"] == layer
        expected = reference([p for n, p in parts.items() if f".layers.{layer}." in n])
        assert_statistics({k: v for k, v in found.items() if k != "module_kinds"}, expected)
        mlp = reference([p for n, p in parts.items() if f".layers.{layer}.mlp." in n])
        assert_statistics(found["module_kinds"]["mlp"], mlp)
    kinds = {
        "attention": [n for n in parts if "self_attn" in n],
        "mlp": [n for n in parts if ".mlp." in n],
        "norms": [n for n in parts if "norm" in n],
        "embeddings": ["model.embed_tokens.weight", "lm_head.weight"],
    }
    assert set(report["statistics"]["module_kinds"]) == set(kinds)
    for kind, names in kinds.items():
        assert_statistics(
            report["statistics"]["module_kinds"][kind], reference([parts[n] for n in names])
        )


def model_reference(family: dict[str, Path], target: str) -> dict[str, float]:
    """NumPy's whole-model statistics of family[target] + (ft − base), values as stored."""
    base, ft, moved = (numpy_weights(family[key]) for key in ("base", "ft", target))
    return reference([(ft[n] - base[n], moved[n], base[n]) for n in base])


def test_statistics_see_the_inputs_at_the_precision_the_merge_runs(family, tmp_path):
    """float32 files and `dtype: bfloat16`: the merge's preflight raises the merge dtype to
    float32 (nothing is rounded before the delta is taken); the statistics follow it and
    the report says so. Files stored in bfloat16 are read as stored (cast exactly)."""
    for target, dtype in (("target", "bfloat16"), ("target_bf16", "float32")):
        recipe = write_recipe(
            tmp_path / f"{target}.yml",
            family[target],
            family["base"],
            [(family["ft"], 1.0)],
            dtype=dtype,
        )
        report = inspect_recipe(recipe, progress=False)
        assert_statistics(report["statistics"]["model"], model_reference(family, target))
        assert report["compatibility"]["merge_dtype"] == "float32"
        stored = report["compatibility"]["tensors"]["inputs"]
        assert stored["source_base"]["stored_dtypes"] == {"float32": 21}
        if target == "target":
            assert report["compatibility"]["out_dtype"] == "bfloat16"
            assert any("Merging at float32" in note for note in report["compatibility"]["notes"])
        else:
            assert stored["target"]["stored_dtypes"] == {"bfloat16": 21}


def test_per_layer_weights_follow_mergekit_gradients(family, tmp_path):
    """weight: [0.0, 1.0] is interpolated over the layers by mergekit's planner: α = 0 for
    layer 0 and everything planned before it, 1 for layer 1 and after."""
    recipe = write_recipe(
        tmp_path / "r.yml", family["target"], family["base"], [(family["ft"], [0.0, 1.0])]
    )
    report = inspect_recipe(recipe, progress=False)
    weights = report["models"]["source_finetuned"][0]["weight"]
    assert weights["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert weights["model.layers.1.self_attn.q_proj.weight"] == 1.0
    layers = report["statistics"]["layers"]
    assert layers[0]["delta_norm"] == 0.0 and layers[0]["gap_to_delta"] is None
    base, ft = numpy_weights(family["base"]), numpy_weights(family["ft"])
    delta = np.concatenate([ft[n] - base[n] for n in base if ".layers.1." in n])
    assert layers[1]["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)


def test_vocabulary_rows_are_compared_by_token(llama, tmp_path):
    """A fine-tuned model with 8 added tokens (the Tülu 3 case) and a tokenizer section:
    embeddings are compared on the rows whose token is the same in all three models."""
    target = llama.model("t", seed=1)
    source_base = llama.model("sb", seed=2)
    finetuned = llama.model("ft", seed=3, extra_vocab=True)
    recipe = write_recipe(
        tmp_path / "r.yml",
        target,
        source_base,
        [(finetuned, 1.0)],
        tokenizer={"source": str(finetuned)},
    )
    report = inspect_recipe(recipe, progress=False)
    shared = len(llama.tokenizer)
    embed = next(
        e for e in report["statistics"]["tensors"] if e["name"] == "model.embed_tokens.weight"
    )
    assert embed["rows_compared"] == shared
    t = load_file(target / "model.safetensors")["model.embed_tokens.weight"].double().numpy()
    s = load_file(source_base / "model.safetensors")["model.embed_tokens.weight"].double().numpy()
    f = load_file(finetuned / "model.safetensors")["model.embed_tokens.weight"].double().numpy()
    assert_statistics(embed, reference([((f[:shared] - s).ravel(), t.ravel(), s.ravel())]))

    vocabulary = report["compatibility"]["vocabulary"]
    pair = next(p for p in vocabulary["pairs"] if p["models"] == ["target", "source_finetuned"])
    assert pair["shared"] == shared and pair["same_id"] == shared
    assert pair["only_in_source_finetuned"]["count"] == 8
    assert pair["only_in_source_finetuned"]["examples"][0].startswith("<|tool_")
    rows = report["compatibility"]["tensors"]["inputs"]["source_finetuned"]["vocabulary_rows"]
    assert rows["model.embed_tokens.weight"] == shared + 8


def test_chat_template_note_when_the_output_keeps_a_target_without_one(family, tmp_path):
    """No tokenizer section: mergekit copies the target's tokenizer; a base model without a
    chat template gives an instruct delta no chat format to run in."""
    target = tmp_path / "target"
    shutil.copytree(family["target"], target)
    config_path = target / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    recipe = write_recipe(tmp_path / "r.yml", target, family["base"], [(family["ft"], 1.0)])
    report = inspect_recipe(recipe, progress=False)
    chat = report["compatibility"]["chat"]
    assert chat["tokenizer_from"] == "target" and chat["chat_template"] is None
    assert any("add `tokenizer: {source:" in note for note in report["compatibility"]["notes"])

    with_source = write_recipe(
        tmp_path / "r2.yml",
        target,
        family["base"],
        [(family["ft"], 1.0)],
        tokenizer={"source": str(family["ft"])},
    )
    chat = inspect_recipe(with_source, progress=False)["compatibility"]["chat"]
    assert chat["tokenizer_from"] == "source_finetuned"
    assert chat["chat_template"].startswith("{% for message in messages %}")
    assert chat["end_of_turn_tokens"] == ["<|endoftext|>"]


def test_end_of_turn_tokens_follow_the_tokenizer_source(family, tmp_path):
    """A fine-tuned model that also stops on <|user|> (its generation config): the output
    keeps both only when the recipe takes the tokenizer from it."""
    finetuned = tmp_path / "ft"
    shutil.copytree(family["ft"], finetuned)
    tokenizer_config = json.loads((finetuned / "tokenizer_config.json").read_text())
    vocab = json.loads((finetuned / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocab}
    (finetuned / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"]]})
    )
    assert tokenizer_config["eos_token"] == "<|endoftext|>"
    with_source = write_recipe(
        tmp_path / "r1.yml",
        family["target"],
        family["base"],
        [(finetuned, 1.0)],
        tokenizer={"source": str(finetuned)},
    )
    report = inspect_recipe(with_source, progress=False)
    chat = report["compatibility"]["chat"]
    assert chat["end_of_turn_tokens"] == ["<|endoftext|>", "<|user|>"]
    assert chat["generation_config_from"] == "source_finetuned" and not chat["notes"]

    without = write_recipe(
        tmp_path / "r2.yml", family["target"], family["base"], [(finetuned, 1.0)]
    )
    chat = inspect_recipe(without, progress=False)["compatibility"]["chat"]
    assert chat["generation_config_from"] == "target"
    assert "<|user|>" not in chat["end_of_turn_tokens"]
    assert any("ends a turn with <|endoftext|>, <|user|>" in note for note in chat["notes"])


def test_a_recipe_for_another_method_names_the_roles(family, tmp_path):
    recipe = write_yaml(
        tmp_path / "ta.yml",
        merge_method="task_arithmetic",
        base_model=str(family["base"]),
        models=[{"model": str(family["ft"]), "parameters": {"weight": 1.0}}],
    )
    with pytest.raises(FttError, match="uses merge_method 'task_arithmetic'") as error:
        inspect_recipe(recipe, progress=False)
    assert "role: source_base" in str(error.value) and "role: source_finetuned" in str(error.value)


@pytest.mark.slow
def test_preflight_errors_are_the_merges_own(family, tmp_path):
    """The same bad recipe through ftt-inspect and mergekit-yaml: the same message."""
    finetuned = {"model": str(family["ft"]), "parameters": {"role": "source_finetuned"}}
    recipe = write_yaml(
        tmp_path / "no_base.yml",
        merge_method="finetuning_transfer",
        base_model=str(family["target"]),
        models=[finetuned],
    )
    inspected = run_cli("ftt-inspect", str(recipe))
    merged = run_cli("mergekit-yaml", str(recipe), str(tmp_path / "out"))
    assert inspected.returncode == 2 and merged.returncode != 0
    message = inspected.stderr.strip().removeprefix("ftt-inspect: error: ")
    assert "needs exactly one model with `role: source_base`" in message
    assert f"Error: {message}" in merged.stderr
    assert "Traceback" not in inspected.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_table_json_and_png(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml",
        family["target"],
        family["base"],
        [(family["ft"], 1.0)],
        dtype="float32",
        tokenizer={"source": str(family["ft"])},
    )
    result = run_cli(
        "ftt-inspect",
        str(recipe),
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "Verdict:" in result.stdout and "| model" in result.stdout and "| layer 1" in result.stdout
    )
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads(json.dumps(inspect_recipe(recipe, progress=False)))

    assert set(report) == {"format", "recipe", "models", "compatibility", "statistics", "verdict"}
    assert report["format"] == "ftt-inspect/1"
    assert set(report["models"]) == {"target", "source_base", "source_finetuned"}
    assert set(report["compatibility"]) == {
        "architecture",
        "tensors",
        "merge_dtype",
        "out_dtype",
        "vocabulary",
        "chat",
        "notes",
    }
    assert set(report["compatibility"]["chat"]) == {
        "tokenizer_from",
        "chat_template",
        "chat_template_from",
        "generation_config_from",
        "end_of_turn_ids",
        "end_of_turn_tokens",
        "notes",
    }
    assert set(report["statistics"]) == {"model", "module_kinds", "layers", "tensors"}
    assert set(report["statistics"]["model"]) == STATISTIC_KEYS
    layer = report["statistics"]["layers"][0]
    assert set(layer) == STATISTIC_KEYS | {"layer", "module_kinds"}
    assert set(layer["module_kinds"]) == {"attention", "mlp", "norms"}
    assert set(layer["module_kinds"]["mlp"]) == STATISTIC_KEYS
    assert set(report["statistics"]["tensors"][0]) == STATISTIC_KEYS | {
        "name",
        "layer",
        "kind",
        "shape",
        "rows_compared",
    }
    assert set(report["verdict"]) - {"level_on_miniature"} == {
        "score",
        "level",
        "statistic",
        "value",
        "sentence",
        "evidence",
        "thresholds",
        "uncertainty",
        "calibration_version",
        "in_range",
        "out_of_range",
    }
    assert report["verdict"]["in_range"] is True, report["verdict"]["out_of_range"]
    assert report["verdict"]["level"] in {"likely", "partial", "unlikely"}
    assert f"± {report['verdict']['uncertainty']:.2f}" in result.stdout


@pytest.mark.parametrize(
    ("command", "usage"),
    [("inspect", "usage: ftt-inspect [-h]"), ("delta", "usage: ftt-delta [-h]"),
     ("sweep", "usage: ftt-sweep [-h]")],
)  # fmt: skip
def test_python_dash_m_dispatches_to_the_ftt_commands(command, usage):
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_ftt", command, "--help"],
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)


def test_python_dash_m_without_a_command_lists_them():
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_ftt"], env=OFFLINE_ENV, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "{yaml,multi,inspect,sweep,delta}" in result.stderr


def test_spearman_with_ties_against_a_hand_computation():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5.
    assert calibration.ranks([1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert calibration.ranks([10, 20, 20, 20, 5]) == [2, 4, 4, 4, 1]
    assert calibration.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / np.sqrt(10))
    assert calibration.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert calibration.spearman([1, 1, 1], [1, 2, 3]) is None
    assert calibration.spearman([1, 2], [1, 2]) is None


def test_efficiency_needs_a_fine_tuning_gain():
    assert calibration.efficiency(10.0, 60.0, 35.0) == pytest.approx(0.5)
    assert calibration.efficiency(0.0, 40.0, 50.0) == pytest.approx(1.25)
    assert calibration.efficiency(10.0, 12.0, 11.0) is None


def test_a_pair_outside_the_calibrated_range_gets_no_level(family, tmp_path):
    # A target 100× farther from the source base than the delta: the statistic lies far
    # beyond the miniature's 0.575-3.94, and bfloat16 weights are a dtype it never saw.
    far = perturbed(family["base"], tmp_path / "far", seed=4, scale=2.0, dtype=torch.bfloat16)
    recipe = write_recipe(
        tmp_path / "r.yml", far, family["base"], [(family["ft"], 1.0)], dtype="float32"
    )
    result = run_cli("ftt-inspect", str(recipe), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    verdict = json.loads((tmp_path / "r.json").read_text())["verdict"]
    assert verdict["in_range"] is False
    assert verdict["level"] == "out of calibrated range"
    assert verdict["level_on_miniature"] == "unlikely"
    assert verdict["value"] > 3.94
    assert any("outside the calibrated 0.575-3.94" in r for r in verdict["out_of_range"])
    assert any("bfloat16" in r for r in verdict["out_of_range"])
    assert "outside what the verdict was calibrated on" in result.stdout
    assert "(out of calibrated range)" in result.stdout


def test_alpha_zero_says_the_weights_are_zero(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", family["target"], family["base"], [(family["ft"], 0.0)]
    )
    verdict = inspect_recipe(recipe, progress=False)["verdict"]
    assert verdict["level"] == "nothing to transfer"
    assert verdict["value"] is None
    assert "every weight α is 0" in verdict["sentence"]


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "magic"), [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_cli_writes_svg_and_pdf_plots(family, tmp_path, suffix, magic):
    recipe = write_recipe(
        tmp_path / "r.yml", family["target"], family["base"], [(family["ft"], 1.0)]
    )
    result = run_cli("ftt-inspect", str(recipe), "--plot", str(tmp_path / f"r{suffix}"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"r{suffix}").read_bytes()[: len(magic)] == magic


def test_plot_bands_are_labelled_and_cosine_axis_is_fixed(family, tmp_path):
    from mergekit_ftt.inspect.report import figure

    recipe = write_recipe(
        tmp_path / "r.yml", family["target"], family["base"], [(family["ft"], 1.0)]
    )
    _, ratio, cosine = figure(inspect_recipe(recipe, progress=False)).axes
    labels = ratio.get_legend_handles_labels()[1]
    assert {"likely", "partial", "unlikely"} <= set(labels)
    assert cosine.get_ylim() == (-1.0, 1.0)


def test_a_sparsified_sign_elected_recipe_is_out_of_range(family, tmp_path):
    sparse = {"sparsification_method": "magnitude", "density": 0.5, "consensus_method": "sum"}
    pair = (family["target"], family["base"], [(family["ft"], 1.0)])
    recipe = write_recipe(tmp_path / "r.yml", *pair, dtype="float32", parameters=sparse)
    verdict = inspect_recipe(recipe, progress=False)["verdict"]
    assert verdict["in_range"] is False
    assert verdict["level"] == "out of calibrated range"
    assert [r for r in verdict["out_of_range"] if "the recipe sets" in r] == [
        "the recipe sets sparsification_method magnitude; the calibration saw dense deltas",
        "the recipe sets consensus_method sum; the calibration saw dense deltas",
    ]
