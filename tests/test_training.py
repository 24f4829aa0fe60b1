"""TRL SFT (`ftt-train`) on tiny OLMo 2 and Llama models built here, on CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_ftt.training import sft
from mergekit_ftt.training.data import DatasetSpecError
from mergekit_ftt.training.smoke import make_smoke_inputs

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


def write_config(path: Path, inputs: Path, output_dir: Path, **overrides) -> Path:
    config = {
        **FAST_SETTINGS,
        "model_name_or_path": str(inputs / "base"),
        "datasets": [{"path": str(inputs / "train.jsonl")}],
        "output_dir": str(output_dir),
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def parsed(config: Path, *overrides: str):
    return sft.parse_args(["--config", str(config), *overrides])


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


def test_tulu_template_renders_like_open_instruct_with_bos(olmo_inputs):
    script_args, _, model_config = parsed(write_config(olmo_inputs / "t.yaml", olmo_inputs, "x"))
    tokenizer = sft.load_tokenizer(script_args, model_config, trust_remote_code=False)
    messages = first_row(olmo_inputs)["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    user, assistant = messages[0]["content"], messages[1]["content"]
    assert rendered == f"{EOS}<|user|>\n{user}\n<|assistant|>\n{assistant}{EOS}"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{EOS}<|user|>\n{user}\n<|assistant|>\n"


def test_only_assistant_tokens_carry_loss(olmo_inputs, tmp_path):
    config = write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "out")
    script_args, sft_config, model_config = parsed(config)
    dataset = sft.load_mixture(script_args.datasets, seed=script_args.dataset_seed)
    trainer = sft.build_trainer(script_args, sft_config, model_config, dataset)
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
    script_args, sft_config, model_config = parsed(config, "--gradient_accumulation_steps", "2")
    dataset = sft.load_mixture(script_args.datasets, seed=script_args.dataset_seed)
    trainer = sft.build_trainer(script_args, sft_config, model_config, dataset)
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
    assert tokenizer.chat_template == sft.tulu_chat_template(add_bos=True)

    with pytest.raises(
        sft.ConfigError, match=r"already holds a finished model.*overwrite_output_dir"
    ):
        sft.main(["--config", str(config), "--resume", "true"])


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

    with pytest.raises(sft.ConfigError, match=r"unfinished run.*checkpoint-4.*--resume true"):
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
    with pytest.raises(sft.ConfigError, match=r"'warmup_ratio'.*warmup_steps: 0.03"):
        parsed(config)
    config = write_config(tmp_path / "c.yaml", olmo_inputs, tmp_path / "o", learning_rat=1e-3)
    with pytest.raises(
        sft.ConfigError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"
    ):
        parsed(config)
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        datasets=[{"path": "x.jsonl", "frac": 0.5}],
    )
    with pytest.raises(DatasetSpecError, match="'frac' \\(did you mean 'fraction'\\?\\)"):
        parsed(config)


def test_missing_dataset_fails_before_the_model_is_loaded(olmo_inputs, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        olmo_inputs,
        tmp_path / "o",
        model_name_or_path=str(tmp_path / "no_such_model"),
        datasets=[{"path": str(tmp_path / "missing.jsonl")}],
    )
    with pytest.raises(DatasetSpecError, match=r"missing.jsonl' does not exist"):
        sft.train(*parsed(config))
    assert not (tmp_path / "o").exists()


def test_flash_attention_asked_for_without_flash_attn_says_what_to_install(olmo_inputs, tmp_path):
    if sft.importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    config = write_config(
        tmp_path / "c.yaml", olmo_inputs, tmp_path / "o", attn_implementation="flash_attention_2"
    )
    with pytest.raises(sft.ConfigError, match="pip install flash-attn"):
        sft.train(*parsed(config))
    assert sft.resolve_attn_implementation(None) is None  # no CUDA here: the default attention


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
    configs = REPO / "mergekit_ftt" / "training" / "configs"
    expected_models = {
        "olmo2_m4_math.yaml": ("allenai/OLMo-2-1124-7B", "stage2-ingredient1-step6000-tokens26B"),
        "olmo2_m5_math.yaml": ("allenai/OLMo-2-1124-7B", "stage2-ingredient1-step11931-tokens50B"),
        "olmo2_m5_transfer_then_math.yaml": ("out/olmo2_m5_plus_delta_m4_math", "main"),
    }
    for name, (model, revision) in expected_models.items():
        # bf16 needs a GPU unless use_cpu is set; this machine has none.
        script_args, sft_config, model_config = sft.parse_args(
            ["--config", str(configs / name), "--use_cpu", "true"]
        )
        assert (model_config.model_name_or_path, model_config.model_revision) == (model, revision)
        assert [source.path for source in script_args.datasets] == [
            "allenai/tulu-3-sft-personas-math",
            "allenai/tulu-3-sft-personas-math-grade",
            "allenai/tulu-3-sft-personas-algebra",
        ]
        assert {source.fraction for source in script_args.datasets} == {1.0}
        assert (script_args.chat_template, script_args.add_bos) == ("tulu", True)
        assert (script_args.loss_reduction, script_args.total_batch_size) == ("sum", 8)
        assert sft_config.learning_rate == 5e-6
        assert sft_config.lr_scheduler_type == "linear"
        assert sft_config.get_warmup_steps(30000) == 900  # ratio 0.03
        assert sft_config.weight_decay == 0.0
        assert sft_config.max_steps == 30000
        assert sft_config.max_length == 2048
        assert sft_config.bf16 and sft_config.seed == 123
        assert (sft_config.save_strategy, sft_config.save_steps) == ("steps", 5000)
        assert sft_config.assistant_only_loss
        # 4 processes × 2 per device × 1 accumulation step = 8, as in the paper.
        assert script_args.total_batch_size == 4 * sft_config.per_device_train_batch_size


def test_accelerate_configs_load_without_deepspeed():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "mergekit_ftt" / "training" / "configs" / "accelerate"
    zero3 = load_config_from_file(str(folder / "zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True
    fsdp = load_config_from_file(str(folder / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    for config in (zero3, fsdp):
        assert (config.mixed_precision, config.num_processes) == ("bf16", 4)


def test_mixture_takes_fractions_and_rows_with_a_seed(tmp_path):
    from mergekit_ftt.training.data import DatasetSource, load_mixture
    from mergekit_ftt.training.smoke import arithmetic_rows, write_jsonl

    first = write_jsonl(arithmetic_rows(10, seed=0), tmp_path / "a.jsonl")
    second = write_jsonl(arithmetic_rows(20, seed=1), tmp_path / "b.json")
    sources = [
        DatasetSource(path=str(first), fraction=0.5),
        DatasetSource(path=str(second), rows=3),
    ]
    mixture = load_mixture(sources, seed=7)
    assert mixture.column_names == ["messages"] and len(mixture) == 5 + 3
    assert list(load_mixture(sources, seed=7)["messages"]) == list(mixture["messages"])
    assert list(load_mixture(sources, seed=8)["messages"]) != list(mixture["messages"])
    full = load_mixture([DatasetSource(path=str(first), fraction=1.0)], seed=7)
    assert full["messages"] == [row["messages"] for row in arithmetic_rows(10, seed=0)]
    with pytest.raises(DatasetSpecError, match="has 20 rows, fewer than the 21 asked for"):
        load_mixture([DatasetSource(path=str(second), rows=21)], seed=7)
    with pytest.raises(DatasetSpecError, match="give `fraction` or `rows`, not both"):
        DatasetSource(path="x.jsonl", fraction=0.5, rows=2)


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    code = (
        "from mergekit_ftt.training.data import DatasetSource, load_mixture\n"
        "load_mixture([DatasetSource('allenai/tulu-3-sft-personas-algebra')], seed=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 1
    assert (
        "DatasetSpecError: could not load dataset 'allenai/tulu-3-sft-personas-algebra' "
        "(split 'train')" in run.stderr
    )
    assert "offline, only datasets already in the Hugging Face cache" in run.stderr
