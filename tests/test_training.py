"""TRL SFT (`ftt-train`) on tiny OLMo 2 and Llama models built here, on CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml
from helpers import error_line

from mergekit_ftt.chat_templates import tulu_chat_template
from mergekit_ftt.errors import FttError
from mergekit_ftt.training import checks, sft
from mergekit_ftt.training.smoke import arithmetic_rows, make_smoke_inputs, write_jsonl

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"

# Small and fast on 2 CPU cores; everything else comes from the defaults under test.
FAST_SETTINGS = {
    "dataset_num_proc": 1,
    "chat_template": "tulu",
    "max_length": 128,
    "learning_rate": 1.0e-2,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "per_device_train_batch_size": 8,
    "seed": 123,
    "use_cpu": True,
    "dtype": "float32",
    "bf16": False,
    "activation_checkpointing": False,
    "logging_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two busy cores shared with others."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def olmo_inputs(tmp_path_factory) -> Path:
    return make_smoke_inputs(tmp_path_factory.mktemp("olmo"), rows=48, seed=0)


@pytest.fixture(scope="module")
def llama_inputs(tmp_path_factory) -> Path:
    return make_smoke_inputs(
        tmp_path_factory.mktemp("llama"), rows=48, seed=1, architecture="llama"
    )


def local_data(path: Path) -> list[dict]:
    """A `datasets:` entry for a local JSONL file, as the configs write it."""
    return [{"path": "json", "data_files": str(path), "columns": ["messages"]}]


def write_config(path: Path, inputs: Path, output_dir: Path, **overrides) -> Path:
    config = {
        **FAST_SETTINGS,
        "model_name_or_path": str(inputs / "base"),
        "datasets": local_data(inputs / "train.jsonl"),
        "output_dir": str(output_dir),
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def parsed(config: Path, *overrides: str):
    return sft.parse_args(["--config", str(config), *overrides])


def trainer_for(config: Path, *overrides: str):
    script_args, training_args, model_args, dataset_args = parsed(config, *overrides)
    dataset = sft.load_train_dataset(script_args, dataset_args)
    return sft.build_trainer(script_args, training_args, model_args, dataset)


def first_row(inputs: Path) -> dict:
    return json.loads((inputs / "train.jsonl").read_text().splitlines()[0])


class StepRecorder:
    """A TrainerCallback that records the optimizer steps a run performs."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                recorder.steps.append(state.global_step)

        self.steps: list[int] = []
        self.callback = _Callback()


def test_tulu_template_renders_like_open_instruct_with_bos(olmo_inputs, tmp_path):
    tokenizer = trainer_for(
        write_config(tmp_path / "t.yaml", olmo_inputs, tmp_path / "x")
    ).processing_class
    messages = first_row(olmo_inputs)["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    user, assistant = messages[0]["content"], messages[1]["content"]
    assert rendered == f"{EOS}<|user|>\n{user}\n<|assistant|>\n{assistant}{EOS}"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{EOS}<|user|>\n{user}\n<|assistant|>\n"


def test_only_assistant_tokens_carry_loss(olmo_inputs, tmp_path):
    trainer = trainer_for(write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "out"))
    rows = [json.loads(line) for line in (olmo_inputs / "train.jsonl").read_text().splitlines()]
    answers = {row["messages"][1]["content"] for row in rows}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    tokenizer = trainer.processing_class
    for input_ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        trained = tokenizer.decode(labels[labels != -100])
        assert trained.endswith(EOS) and trained.removesuffix(EOS) in answers
        text = tokenizer.decode(input_ids[mask == 1])
        assert text.startswith(f"{EOS}<|user|>\n") and text.endswith(f"<|assistant|>\n{trained}")
        assert (labels[mask == 0] == -100).all()


def test_summed_loss_equals_open_instruct_reduce_loss_sum(olmo_inputs, tmp_path):
    config = write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "out")
    trainer = trainer_for(config, "--gradient_accumulation_steps", "2")
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop each step
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(99))
    # Independent reference: Open-Instruct's CrossEntropyLoss(reduction="sum") on shifted
    # labels, divided by the accumulation steps (accelerate's backward does that).
    with torch.no_grad():
        logits = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    reference = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        / 2
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_sft_loss_falls_and_output_loads_and_is_protected(olmo_inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "ft"
    config = write_config(tmp_path / "c.yaml", olmo_inputs, output, max_steps=12, save_steps=6)
    assert sft.main(["--config", str(config)]) == 0
    state = json.loads((output / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3])
    assert (output / "checkpoint-6" / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(olmo_inputs / "base")
    assert type(model).__name__ == "Olmo2ForCausalLM"
    changed = [
        name
        for (name, tensor), base_tensor in zip(
            model.state_dict().items(), base.state_dict().values(), strict=True
        )
        if not torch.equal(tensor, base_tensor)
    ]
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == tulu_chat_template(add_bos=True)

    with pytest.raises(FttError, match=r"already holds a finished model.*overwrite_output_dir"):
        sft.train(*parsed(config, "--resume", "true"))


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_from_checkpoint_with_same_data_order(llama_inputs, tmp_path):
    from transformers import TrainerCallback
    from transformers.modeling_utils import load_state_dict

    class CrashAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Crash("simulated kill after the step-4 checkpoint")

    settings = {"max_steps": 8, "save_steps": 4}
    interrupted = tmp_path / "interrupted"
    config = write_config(tmp_path / "a.yaml", llama_inputs, interrupted, **settings)
    with pytest.raises(Crash):
        sft.train(*parsed(config), callbacks=[CrashAfterStep()])
    assert (interrupted / "checkpoint-4").is_dir() and not (
        interrupted / "model.safetensors"
    ).exists()

    with pytest.raises(FttError, match=r"unfinished run.*checkpoint-4.*--resume true"):
        sft.train(*parsed(config))

    recorder = StepRecorder()
    sft.train(*parsed(config, "--resume", "true"), callbacks=[recorder.callback])
    assert recorder.steps == [5, 6, 7, 8]

    straight = tmp_path / "straight"
    sft.train(*parsed(write_config(tmp_path / "b.yaml", llama_inputs, straight, **settings)))
    resumed = load_state_dict(str(interrupted / "model.safetensors"))
    uninterrupted = load_state_dict(str(straight / "model.safetensors"))
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_unknown_config_keys_are_named_with_the_fix(olmo_inputs, tmp_path):
    config = write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "o", warmup_ratio=0.03)
    with pytest.raises(FttError, match=r"'warmup_ratio'.*warmup_steps: 0.03"):
        parsed(config)
    config = write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "o", learning_rat=1e-3)
    with pytest.raises(FttError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        parsed(config)
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        datasets=[{"path": "json", "data_file": "x.jsonl"}],
    )
    with pytest.raises(FttError, match="'data_file' \\(did you mean 'data_files'\\?\\)"):
        parsed(config)


def test_missing_dataset_fails_before_the_model_is_loaded(olmo_inputs, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        datasets=local_data(tmp_path / "missing.jsonl"),
    )
    with pytest.raises(FttError, match=r"cannot load the training data \(json\): .*missing.jsonl"):
        sft.train(*parsed(config))
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_asked_for_without_flash_attn_says_what_to_install(olmo_inputs, tmp_path):
    config = write_config(
        tmp_path / "c.yaml", olmo_inputs, tmp_path / "o", attn_implementation="flash_attention_2"
    )
    with pytest.raises(FttError, match="pip install flash-attn"):
        sft.train(*parsed(config))
    assert checks.resolve_attn_implementation(None) is None  # no CUDA: the default attention


@pytest.mark.slow
def test_ftt_train_console_command_trains_tiny_llama(llama_inputs, tmp_path):
    output = tmp_path / "ft"
    config = write_config(tmp_path / "c.yaml", llama_inputs, output, max_steps=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["ftt-train", "--config", str(config), "--learning_rate", "1e-3", "--save_strategy", "no"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained 3 steps" in run.stdout
    assert json.loads((output / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    state = json.loads((output / "trainer_state.json").read_text())
    assert max(e["learning_rate"] for e in state["log_history"] if "learning_rate" in e) == 1e-3

    again = subprocess.run(
        ["ftt-train", "--config", str(config)], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 2
    assert "ftt-train: error: output_dir" in again.stderr and "Traceback" not in again.stderr


def test_paper_configs_hold_the_paper_hyperparameters():
    expected_models = {
        "olmo2_m4_math": ("allenai/OLMo-2-1124-7B", "stage2-ingredient1-step6000-tokens26B"),
        "olmo2_m5_math": ("allenai/OLMo-2-1124-7B", "stage2-ingredient1-step11931-tokens50B"),
        "olmo2_m5_transfer_then_math": ("out/olmo2_m5_plus_delta_m4_math", "main"),
    }
    for name, (model, revision) in expected_models.items():
        # By name, as an installed wheel finds them; bf16 needs a GPU unless use_cpu is set.
        script_args, training_args, model_args, dataset_args = sft.parse_args(
            ["--config", name, "--use_cpu", "true"]
        )
        assert (model_args.model_name_or_path, model_args.model_revision) == (model, revision)
        assert training_args.output_dir == f"out/{name}"
        assert [(d.path, d.columns, d.fraction) for d in dataset_args.datasets] == [
            ("allenai/tulu-3-sft-personas-math", ["messages"], None),
            ("allenai/tulu-3-sft-personas-math-grade", ["messages"], None),
            ("allenai/tulu-3-sft-personas-algebra", ["messages"], None),
        ]  # no fraction: every row of each dataset, the paper's equal mix
        assert (script_args.chat_template, script_args.add_bos) == ("tulu", True)
        assert (script_args.loss_reduction, script_args.total_batch_size) == ("sum", 8)
        assert training_args.learning_rate == 5e-6
        assert training_args.lr_scheduler_type == "linear"
        assert training_args.get_warmup_steps(30000) == 900  # ratio 0.03
        assert training_args.weight_decay == 0.0
        assert training_args.max_steps == 30000
        assert training_args.max_length == 2048
        assert training_args.bf16 and training_args.seed == 123
        assert (training_args.save_strategy, training_args.save_steps) == ("steps", 5000)
        assert training_args.assistant_only_loss
        # 4 processes × 2 per device × 1 accumulation step = 8, as in the paper.
        assert script_args.total_batch_size == 4 * training_args.per_device_train_batch_size


def test_config_include_is_overridden_by_the_including_file(tmp_path):
    (tmp_path / "_shared.yaml").write_text("learning_rate: 0.5\nmax_steps: 7\nseed: 3\n")
    (tmp_path / "run.yaml").write_text(
        "include: _shared.yaml\nmax_steps: 9\nmodel_name_or_path: m\nuse_cpu: true\n"
    )
    _, training_args, model_args, _ = parsed(tmp_path / "run.yaml", "--seed", "4")
    assert (training_args.learning_rate, training_args.max_steps) == (0.5, 9)
    assert (training_args.seed, model_args.model_name_or_path) == (4, "m")
    with pytest.raises(FttError, match="'olmo2_m9_math' is neither a file nor a shipped training"):
        sft.parse_args(["--config", "olmo2_m9_math"])
    # A user's config on top of a shipped one, by name.
    (tmp_path / "mine.yaml").write_text("include: olmo2_m4_math\nmax_steps: 10\nuse_cpu: true\n")
    _, training_args, model_args, _ = parsed(tmp_path / "mine.yaml")
    assert (training_args.max_steps, training_args.learning_rate) == (10, 5e-6)
    assert model_args.model_revision == "stage2-ingredient1-step6000-tokens26B"


def test_accelerate_configs_load_without_deepspeed():
    from accelerate.commands.config.config_args import load_config_from_file

    from mergekit_ftt.package_data import find_data_file

    zero3 = load_config_from_file(str(find_data_file("training", "accelerate/zero3")))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True
    fsdp = load_config_from_file(str(find_data_file("training", "accelerate/fsdp")))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    for config in (zero3, fsdp):
        assert (config.mixed_precision, config.num_processes) == ("bf16", 4)


def test_mixture_is_trls_with_fractions_as_shares(tmp_path):
    first = write_jsonl(arithmetic_rows(10, seed=0), tmp_path / "a.jsonl")
    second = write_jsonl(arithmetic_rows(20, seed=1), tmp_path / "b.json")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "datasets": [
                    {**local_data(first)[0], "fraction": 0.5},
                    {**local_data(second)[0], "fraction": 0.5},
                ],
                "use_cpu": True,
            }
        )
    )
    script_args, _, _, dataset_args = parsed(config)
    mixture = sft.load_train_dataset(script_args, dataset_args)
    # TRL's rule: equal shares, capped by the smaller dataset: the first 10 rows of each.
    rows = arithmetic_rows(10, seed=0) + arithmetic_rows(20, seed=1)[:10]
    assert mixture.column_names == ["messages"]
    assert mixture["messages"] == [row["messages"] for row in rows]


def ftt_train_error(*args: str, home: Path) -> str:
    """The error line of `ftt-train` run as a user runs it without Hub access (as here)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(home)}
    env.pop("HF_HUB_OFFLINE", None)  # the command finds out by itself
    run = subprocess.run(["ftt-train", *args], capture_output=True, text=True, env=env, timeout=300)
    return error_line(run, "ftt-train")


@pytest.mark.slow  # imports TRL in a subprocess: ~30 s on the busy 2-core machine
def test_unreachable_hub_model_is_one_line_naming_it_and_the_offline_recipe(tmp_path):
    error = ftt_train_error(
        "--config", "olmo2_m4_math", "--use_cpu", "true", "--output_dir", str(tmp_path / "o"),
        home=tmp_path / "hf",
    )  # fmt: skip
    # the model and every dataset of the mixture, all out of reach, named at once
    assert error.startswith(
        "ftt-train: error: cannot load 1 model and 3 datasets (huggingface.co cannot be reached"
    )
    assert (
        "allenai/OLMo-2-1124-7B@stage2-ingredient1-step6000-tokens26B: not a local folder nor "
        "in the Hugging Face cache; fetch it with `hf download allenai/OLMo-2-1124-7B "
        "--revision stage2-ingredient1-step6000-tokens26B` where the Hub is reachable" in error
    )
    for name in ("math", "math-grade", "algebra"):  # the config's whole mixture
        assert f"allenai/tulu-3-sft-personas-{name} (training data): not in the" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # imports TRL in a subprocess: ~30 s on the busy 2-core machine
def test_unreachable_hub_dataset_is_one_line_naming_it(olmo_inputs, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        datasets=[{"path": "allenai/tulu-3-sft-personas-algebra", "columns": ["messages"]}],
    )
    error = ftt_train_error("--config", str(config), home=tmp_path / "hf")
    assert (
        "cannot load the training data (allenai/tulu-3-sft-personas-algebra): "
        "Couldn't reach 'allenai/tulu-3-sft-personas-algebra' on the Hub" in error
    )
    assert "datasets.load_dataset('allenai/tulu-3-sft-personas-algebra')" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # imports TRL in a subprocess: ~30 s on the busy 2-core machine
def test_every_unreachable_dataset_of_a_mixture_is_named(olmo_inputs, tmp_path):
    """TRL's get_dataset stops at the first; the line names both Hub datasets, not the
    local file that loads."""
    hub = ["allenai/tulu-3-sft-personas-algebra", "allenai/tulu-3-sft-personas-math"]
    datasets = [{"path": path, "columns": ["messages"]} for path in hub]
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        datasets=[*local_data(olmo_inputs / "train.jsonl"), *datasets],
    )
    error = ftt_train_error("--config", str(config), home=tmp_path / "hf")
    assert error.startswith("ftt-train: error: cannot load 2 datasets (")
    for path in hub:
        assert (
            f"{path} (training data): not in the datasets cache; fetch it with "
            f"`python -c \"import datasets; datasets.load_dataset('{path}')\"`"
        ) in error
    assert "train.jsonl" not in error
    assert not (tmp_path / "o").exists()
