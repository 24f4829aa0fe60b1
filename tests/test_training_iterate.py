"""`ftt-iterate`: transfer with the real `mergekit-yaml`, fine-tune, transfer the new delta."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cpu_train_config

from mergekit_ftt.errors import FttError
from mergekit_ftt.training import iterate, sft
from mergekit_ftt.training.smoke import make_smoke_inputs


def test_template_gets_each_rounds_models_by_role(tmp_path):
    template = iterate.load_template()
    rounds = iterate.plan_rounds(Path("M_a"), Path("ft_a"), [Path("M_b"), Path("M_c")], tmp_path)
    second = iterate.fill_template(template, rounds[1])
    assert second == {
        "merge_method": "finetuning_transfer",
        "base_model": "M_c",
        "models": [
            {
                "model": str(tmp_path / "round1" / "finetuned"),
                "parameters": {"role": "source_finetuned", "weight": 1.0},
            },
            {"model": "M_b", "parameters": {"role": "source_base"}},
        ],
        "dtype": "bfloat16",
        "tokenizer": {"source": str(tmp_path / "round1" / "finetuned")},
    }
    bad_role = [{"model": "SOURCE_FINETUNED", "parameters": {"role": "finetuned"}}]
    with pytest.raises(FttError, match=r"role 'finetuned'; use model SOURCE_"):
        iterate.fill_template({**template, "models": bad_role}, rounds[0])
    with pytest.raises(FttError, match="exactly one source_finetuned"):
        iterate.fill_template({**template, "models": template["models"][:1]}, rounds[0])


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_transfer(merged: Path, target: Path, finetuned: Path, base: Path) -> None:
    merged_w, target_w, ft_w, base_w = map(load_weights, (merged, target, finetuned, base))
    for name, tensor in merged_w.items():
        expected = target_w[name].double() + (ft_w[name].double() - base_w[name].double())
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on two busy shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_two_rounds_of_transfer_then_finetune(tmp_path, capsys, one_thread):
    from transformers import AutoModelForCausalLM

    inputs = make_smoke_inputs(tmp_path / "in", rows=48)
    later = AutoModelForCausalLM.from_pretrained(inputs / "target")
    with torch.no_grad():
        for parameter in later.parameters():
            parameter.add_(
                0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5))
            )
    later.save_pretrained(inputs / "later")
    shutil.copy(inputs / "target" / "tokenizer.json", inputs / "later")
    shutil.copy(inputs / "target" / "tokenizer_config.json", inputs / "later")

    config = cpu_train_config(tmp_path / "train.yaml", inputs / "train.jsonl")
    first_ft = tmp_path / "ft0"
    sft.main(["--config", str(config), "--model_name_or_path", str(inputs / "base"),
              "--output_dir", str(first_ft)])  # fmt: skip
    template = iterate.load_template() | {"dtype": "float32"}
    template_path = tmp_path / "round.yml"
    template_path.write_text(yaml.safe_dump(template))

    argv = [
        "--train-config", str(config), "--source-base", str(inputs / "base"),
        "--source-finetuned", str(first_ft), "--targets", str(inputs / "target"),
        str(inputs / "later"), "--work-dir", str(tmp_path / "work"),
        "--recipe-template", str(template_path), "--", "--max_steps", "2",
    ]  # fmt: skip
    assert iterate.main(argv) == 0
    work = tmp_path / "work"
    assert_transfer(work / "round1" / "transferred", inputs / "target", first_ft, inputs / "base")
    assert_transfer(
        work / "round2" / "transferred",
        inputs / "later",
        work / "round1" / "finetuned",
        inputs / "target",
    )
    state = (work / "round2" / "finetuned" / "trainer_state.json").read_text()
    assert '"global_step": 2' in state

    capsys.readouterr()
    assert iterate.main(argv) == 0  # everything finished: nothing is redone
    out = capsys.readouterr().out
    assert out.count("skipping the transfer") == 2 and out.count("skipping fine-tuning") == 2
