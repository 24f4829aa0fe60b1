"""`ftt-fetch-checkpoints`: the checkpoint table, the bf16 copy, skipping, and offline errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mergekit_ftt import tiny
from mergekit_ftt.errors import FttError
from mergekit_ftt.training import fetch

REPO = Path(__file__).resolve().parents[1]


def test_list_prints_the_papers_checkpoint_table(capsys, tmp_path):
    assert fetch.main(["--list", "--dest", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for name, revision in {
        "M1": "stage1-step300000-tokens1259B",
        "M2": "stage1-step600000-tokens2517B",
        "M3": "stage1-step928646-tokens3896B",
        "M4": "stage2-ingredient1-step6000-tokens26B",
        "M5": "stage2-ingredient1-step11931-tokens50B",
        "M4'": "stage2-ingredient1-step7000-tokens30B",
    }.items():
        assert f"{name:<5} {revision:<44} {tmp_path / fetch.folder_name(name)}" in table
    assert fetch.checkpoint_name("m4′") == fetch.checkpoint_name("M4p") == "M4'"


def test_saved_copy_is_bf16_with_pad_eos_and_skipped_when_complete(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tiny.build_tokenizer(["one two three four five"] * 4, vocab_size=280)
    config = tiny.tiny_config("olmo2", vocab_size=len(tokenizer))
    source = tiny.save_random_model(config, tmp_path / "snapshot", seed=0, tokenizer=tokenizer)
    folder = fetch.save_bf16_with_pad_eos(source, tmp_path / "M4", {"revision": "r"})

    saved = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(source)
    for (name, tensor), reference in zip(
        saved.state_dict().items(), original.state_dict().values(), strict=True
    ):
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference.to(torch.bfloat16)), name
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.pad_token == reloaded.eos_token == "<|endoftext|>"
    assert not (tmp_path / ".M4.incomplete").exists()
    # A complete folder is skipped before any Hub access.
    (tmp_path / "M4" / "model.safetensors").touch()
    assert fetch.fetch("M4", tmp_path) == folder
    assert json.loads((folder / fetch.COMPLETE_MARKER).read_text()) == {"revision": "r"}


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["ftt-fetch-checkpoints", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_offline_fetch_fails_with_a_clear_message_not_a_traceback(tmp_path):
    run = run_cli("M4", "--dest", str(tmp_path / "ckpt"), home=tmp_path / "hf")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "ftt-fetch-checkpoints: error: cannot download allenai/OLMo-2-1124-7B@" in run.stderr
    assert "unset HF_HUB_OFFLINE" in run.stderr
    assert not (tmp_path / "ckpt" / "M4").exists()


def test_unknown_checkpoint_name_fails_before_any_download(capsys, tmp_path):
    assert fetch.main(["M4", "M9", "--dest", str(tmp_path)]) == 2
    assert "unknown checkpoint 'M9'; known: M1, M2, M3, M4, M5, M4'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--dest", "x"]])
def test_no_names_is_a_usage_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        fetch.main(argv)
    assert exit_info.value.code == 2


def test_a_revision_the_hub_refuses_is_one_line(monkeypatch):
    """What huggingface_hub raises for the Hub's answer becomes the lookup's own line."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils import hf_raise_for_status

    def snapshot_download(repo_id, revision, allow_patterns):
        url = f"https://huggingface.co/api/models/{repo_id}/revision/{revision}"
        headers = {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}
        hf_raise_for_status(
            httpx2.Response(404, headers=headers, request=httpx2.Request("GET", url))
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FttError) as refused:
        fetch.download("stage9-no-such-step")
    assert str(refused.value).startswith(
        "allenai/OLMo-2-1124-7B has no revision 'stage9-no-such-step' (a branch, tag or commit)"
    )
