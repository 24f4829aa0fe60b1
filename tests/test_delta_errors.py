"""Bad deltas and bad delta recipes stop with a message naming the problem and the fix,
before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import merge, run_cli
from safetensors.torch import load_file, save_file

from mergekit_ftt.delta.format import config_digest
from mergekit_ftt.tiny import save_random_model, tiny_config

pytestmark = pytest.mark.slow  # mergekit-yaml and ftt-delta start-up


def ftt_delta(*argv: str, capsys) -> tuple[int, str]:
    """``ftt-delta ARGV`` in this process (the console script's own ``main``)."""
    from mergekit_ftt.delta.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def refused(recipe: dict, tmp_path: Path) -> str:
    """The preflight's message for ``recipe`` (what mergekit-yaml prints after `Error:`),
    checked in this process; the two tests below run the real mergekit-yaml."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ftt.errors import FttError
    from mergekit_ftt.preflight import check_merge

    # FinetuningTransferError or DeltaError: both reach the user as mergekit's `Error:`.
    with pytest.raises(FttError) as error:
        check_merge(
            MergeConfiguration.model_validate(recipe), str(tmp_path / "out"), MergeOptions()
        )
    assert not (tmp_path / "out").exists()
    return error.value.message


def delta_recipe(target: Path, delta: Path, **parameters) -> dict:
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": [{"model": str(delta), "parameters": {"role": "delta", **parameters}}],
    }


@pytest.fixture(scope="module")
def delta(llama, tmp_path_factory) -> Path:
    from mergekit_ftt.delta.cli import main

    out = tmp_path_factory.mktemp("delta") / "delta"
    arguments = [
        "--finetuned",
        str(llama.model("ft_a", 3)),
        "--base",
        str(llama.model("source_base", 2)),
    ]
    assert main(["extract", str(out), *arguments, "--no-source-hash"]) == 0
    return out


def copy_of(delta: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(delta, tmp_path / "copy"))


def apply(target: Path, delta: Path, tmp_path: Path, **parameters) -> tuple[str, Path]:
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": [{"model": str(delta), "parameters": {"role": "delta", **parameters}}],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_cli("mergekit-yaml", str(path), str(out))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert not out.exists(), "nothing may be written"
    return result.stderr, out


def test_target_of_another_architecture(olmo2, delta, tmp_path):
    target = olmo2.model("target", 1)
    message, _ = apply(target, delta, tmp_path)
    assert f"delta {delta}" in message
    assert "is a llama (LlamaForCausalLM) delta but target" in message
    assert f"{target} is olmo2 (Olmo2ForCausalLM)" in message


def test_modified_file_fails_its_hash(llama, delta, tmp_path):
    broken = copy_of(delta, tmp_path)
    shard = broken / "delta.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one bit of the last tensor's data
    shard.write_bytes(bytes(data))
    message, _ = apply(llama.model("target", 1), broken, tmp_path)
    assert "does not match the sha256 recorded in delta_config.json" in message


def test_target_of_another_shape(llama, delta, tmp_path):
    config = tiny_config("llama", vocab_size=len(llama.tokenizer), hidden_size=32)
    target = save_random_model(config, tmp_path / "small", seed=1, tokenizer=llama.tokenizer)
    message = refused(delta_recipe(target, delta), tmp_path)
    rows = len(llama.tokenizer)
    assert f"model.embed_tokens.weight is [{rows}, 64] in delta {delta}" in message
    assert f"but [{rows}, 32] in target {target}" in message


def test_component_of_another_shape(llama, delta, tmp_path):
    broken = copy_of(delta, tmp_path)
    shard = broken / "delta.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    config = json.loads((broken / "delta_config.json").read_text())
    config["files"]["delta.safetensors"]["size"] = shard.stat().st_size
    config["config_sha256"] = config_digest(config)  # a consistent config, a changed shard
    (broken / "delta_config.json").write_text(json.dumps(config))
    message = refused(delta_recipe(llama.model("target", 1), broken), tmp_path)
    assert (
        "model.norm.weight is bfloat16 [63] but delta_config.json records bfloat16 [64]" in message
    )


def test_unknown_format_version(llama, delta, tmp_path, capsys):
    newer = copy_of(delta, tmp_path)
    config = json.loads((newer / "delta_config.json").read_text())
    config["format_version"] = 2
    (newer / "delta_config.json").write_text(json.dumps(config))
    message = refused(delta_recipe(llama.model("target", 1), newer), tmp_path)
    assert "uses delta format version 2; this mergekit-ftt reads version 1" in message
    assert "pip install -U mergekit-ftt" in message
    code, stderr = ftt_delta("info", str(newer), capsys=capsys)
    assert code == 2 and stderr.startswith("ftt-delta: error:")


def test_delta_with_a_source_base(llama, delta, tmp_path):
    base = str(llama.model("source_base", 2))
    message = refused(delta_recipe(llama.model("target", 1), delta, source_base=base), tmp_path)
    assert "has `role: delta` and a `source_base`" in message


def test_delta_beside_a_lone_source_base(llama, delta, tmp_path):
    recipe = delta_recipe(llama.model("target", 1), delta)
    recipe["models"].append(
        {"model": str(llama.model("source_base", 2)), "parameters": {"role": "source_base"}}
    )
    assert "A `role: delta` input already holds fine-tuned − base" in refused(recipe, tmp_path)


def test_role_and_folder_disagree(llama, delta, tmp_path):
    not_a_delta = delta_recipe(llama.model("target", 1), llama.model("ft_a", 3))
    assert "has `role: delta` but is not a delta folder" in refused(not_a_delta, tmp_path)
    recipe = delta_recipe(llama.model("target", 1), delta)
    recipe["models"] = [
        {"model": str(delta), "parameters": {"role": "source_finetuned"}},
        {"model": str(llama.model("source_base", 2)), "parameters": {"role": "source_base"}},
    ]
    assert "is a delta folder; give it `parameters: {role: delta}`" in refused(recipe, tmp_path)
    recipe = delta_recipe(delta, llama.model("ft_a", 3))
    recipe["models"][0]["parameters"]["role"] = "source_finetuned"
    recipe["models"].append(
        {"model": str(llama.model("source_base", 2)), "parameters": {"role": "source_base"}}
    )
    assert "base_model " + str(delta) + " is a delta folder" in refused(recipe, tmp_path)


def test_delta_in_another_merge_method(llama, delta, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama.model("target", 1)), "parameters": {"weight": 0.5}},
            {"model": str(delta), "parameters": {"weight": 0.5}},
        ],
    }
    # Another method never reaches the transfer's preflight: the adapter refuses the delta
    # folder in its run_merge wrapper, before mergekit loads anything.
    result, out = merge(recipe, tmp_path)
    assert result.returncode == 1
    assert "is a delta folder (fine-tuned − base), not a model" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_added_rows_need_the_delta_as_tokenizer_source(llama, tmp_path, capsys):
    out = tmp_path / "delta"
    finetuned = llama.model("ft_vocab", 5, extra_vocab=True)
    base = llama.model("source_base", 2)
    code, _ = ftt_delta(
        "extract", str(out), "--finetuned", str(finetuned), "--base", str(base),
        "--no-source-hash", capsys=capsys,
    )  # fmt: skip
    assert code == 0
    message = refused(delta_recipe(llama.model("target", 1), out), tmp_path)
    assert f"add `tokenizer: {{source: {out}}}` to the recipe" in message


# --- ftt-delta extract --------------------------------------------------------------


def test_extract_refuses_models_of_different_architectures(llama, olmo2, tmp_path, capsys):
    code, stderr = ftt_delta(
        "extract", str(tmp_path / "d"), "--finetuned", str(llama.model("ft_a", 3)),
        "--base", str(olmo2.model("source_base", 2)), capsys=capsys,
    )  # fmt: skip
    assert code == 2
    assert stderr.startswith("ftt-delta: error: fine-tuned model")
    assert "is llama ['LlamaForCausalLM'] but base" in stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / ".d.incomplete").exists()


def test_extract_never_overwrites_unasked(llama, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    models = [
        "--finetuned",
        str(llama.model("ft_a", 3)),
        "--base",
        str(llama.model("source_base", 2)),
    ]
    code, stderr = ftt_delta("extract", str(keep), *models, capsys=capsys)
    assert code == 2 and "is not empty" in stderr
    code, stderr = ftt_delta("extract", str(keep), *models, "--overwrite", capsys=capsys)
    assert code == 2 and "--overwrite only replaces a delta folder" in stderr
    assert (keep / "notes.txt").read_text() == "mine"


def test_extract_needs_one_pair(llama, tmp_path, capsys):
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(llama.model("target", 1)),
        "models": [
            {"model": str(llama.model("ft_a", 3)), "parameters": {"role": "source_finetuned"}},
            {"model": str(llama.model("ft_b", 4)), "parameters": {"role": "source_finetuned"}},
            {"model": str(llama.model("source_base", 2)), "parameters": {"role": "source_base"}},
        ],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    code, stderr = ftt_delta("extract", str(path), str(tmp_path / "d"), capsys=capsys)
    assert code == 2
    assert "has 2 source_finetuned and 1 source_base models" in stderr
    assert "--finetuned MODEL --base MODEL" in stderr


def test_sparse_extraction_needs_a_density(tmp_path):
    result = run_cli(
        "ftt-delta", "extract", str(tmp_path / "d"), "--compress", "dare",
        "--finetuned", "nowhere/a", "--base", "nowhere/b",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "ftt-delta: error: --compress dare needs --density in (0, 1], the fraction of "
        "elements kept (e.g. --density 0.1).\n"
    )


def test_a_file_changed_after_it_was_verified_is_read_again(llama, delta, tmp_path):
    """Unchanged files are not hashed again (extraction records them); a file rewritten
    later, even with its old size and header, is."""
    from mergekit_ftt.delta.format import DeltaFolder, VerifiedFiles

    copy = copy_of(delta, tmp_path)
    DeltaFolder(copy).check_files()  # hashed once, remembered
    shard = copy / "delta.safetensors"
    assert VerifiedFiles.load().holds(shard, DeltaFolder(copy).config.files[shard.name].sha256)
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert "does not match the sha256" in refused(
        delta_recipe(llama.model("target", 1), copy), tmp_path
    )
