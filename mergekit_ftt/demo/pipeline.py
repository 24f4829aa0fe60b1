"""The demo's stages, each skipped when its output is already there (so a killed run resumes).

    data → pre-training (M_a, M_b) → fine-tuning with ftt-train (FT(M_a), FT(M_b))
         → transfer with mergekit-yaml (M_b + Δ_a) → lm-eval through mergekit_ftt.eval → report

Only pre-training is the demo's own loop; fine-tuning, the merge and the evaluation are the
project's code, run exactly as a user runs them on real checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from mergekit_ftt.cli import Stages
from mergekit_ftt.demo import corpus
from mergekit_ftt.demo.config import CONFIGS_DIR, DemoConfig
from mergekit_ftt.demo.pretrain import pretrain
from mergekit_ftt.package_data import with_includes
from mergekit_ftt.sources import is_finished_model

M_A, M_B, FT_A, FT_B, TRANSFER = "M_a", "M_b", "FT(M_a)", "FT(M_b)", "M_b + Δ_a"
EVAL_SUITE = "ftt-demo"


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under the output folder."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tasks(self) -> Path:
        return self.data / "eval_tasks"

    def model(self, label: str) -> Path:
        """The model folder of a table row (folder names without spaces or brackets)."""
        names = {M_A: "M_a", M_B: "M_b", FT_A: "FT_M_a", FT_B: "FT_M_b"}
        if label == TRANSFER:
            return self.transfer / "transferred"
        return self.root / "models" / names[label]

    @property
    def transfer(self) -> Path:
        return self.root / "transfer"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"


# --- data ------------------------------------------------------------------------------


def write_data(layout: Layout, config: DemoConfig, seed: int) -> corpus.World:
    """The synthetic world, the SFT set, the held-out test set and its lm-eval task files."""
    world = corpus.World.build(config.task, seed)
    corpus.write_jsonl(
        corpus.sft_examples(world, config.task.sft_examples, seed), layout.data / "sft.jsonl"
    )
    test_path = corpus.write_jsonl(
        corpus.held_out_examples(world, config.task.test_examples, seed), layout.data / "test.jsonl"
    )
    task = yaml.safe_load((CONFIGS_DIR / "eval_task.yaml").read_text(encoding="utf-8"))
    task["dataset_kwargs"]["data_files"]["test"] = str(test_path.resolve())
    layout.tasks.mkdir(parents=True, exist_ok=True)
    (layout.tasks / "eval_task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    suite = (CONFIGS_DIR / "eval_suite.yaml").read_text(encoding="utf-8")
    (layout.tasks / f"{EVAL_SUITE}.yaml").write_text(suite)
    return world


def build_tokenizer():
    """Characters as tokens (byte-level BPE with no merges) plus the chat markers, with the
    Tülu template that starts with BOS, as ``ftt-train`` renders it."""
    from mergekit_ftt.chat_templates import tulu_chat_template
    from mergekit_ftt.tiny import build_tokenizer as bpe_tokenizer

    tokenizer = bpe_tokenizer([], vocab_size=0)  # 0: the 256 bytes, no merges
    tokenizer.chat_template = tulu_chat_template(add_bos=True)
    return tokenizer


# --- pre-training ----------------------------------------------------------------------


def run_pretraining(
    layout: Layout, config: DemoConfig, world: corpus.World, seed: int, say: Stages
) -> None:
    if is_finished_model(layout.model(M_A)) and is_finished_model(layout.model(M_B)):
        say("pre-training: M_a and M_b exist, skipped")
        return
    stage1, stage2 = config.pretrain.stage1, config.pretrain.stage2
    say(
        f"pre-training a tiny OLMo 2: stage 1 {stage1.steps} steps, stage 2 {stage2.steps} "
        f"annealed steps; M_a = stage-2 step {config.checkpoint_a_step}, M_b = the end"
    )
    with say.progress(stage1.steps + stage2.steps, "pre-training") as bar:
        pretrain(
            world,
            build_tokenizer(),
            config.model,
            config.pretrain,
            seed,
            {
                (2, config.checkpoint_a_step): layout.model(M_A),
                (2, stage2.steps): layout.model(M_B),
            },
            on_step=bar.update,
        )


# --- fine-tuning (mergekit_ftt.training) ---------------------------------------------------


def write_trl_config(
    layout: Layout,
    config: DemoConfig,
    name: str,
    model: Path,
    output_dir: Path,
    seed: int,
    **overrides,
) -> Path:
    """An ``ftt-train`` YAML for one run: the demo's template with this run's paths."""
    template = yaml.safe_load((CONFIGS_DIR / config.finetune.trl_config).read_text())
    settings = with_includes(template, CONFIGS_DIR)  # sft_strong.yaml includes sft.yaml
    settings.update(
        {
            "model_name_or_path": str(model.resolve()),
            "output_dir": str(output_dir.resolve()),
            "datasets": [
                {
                    "path": "json",
                    "data_files": str((layout.data / "sft.jsonl").resolve()),
                    "columns": ["messages"],
                }
            ],
            "seed": seed,
            "max_steps": config.finetune.max_steps,
            **overrides,
        }
    )
    layout.configs.mkdir(parents=True, exist_ok=True)
    path = layout.configs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def finetune(trl_config: Path, say: Stages, description: str) -> Path:
    """Run the project's TRL fine-tuning in this process, as ``ftt-train --config`` does,
    with a progress bar."""
    from transformers import TrainerCallback

    from mergekit_ftt.training.sft import parse_args, train

    arguments = parse_args(["--config", str(trl_config)])
    with say.progress(arguments[1].max_steps, description) as bar:

        class Progress(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                bar.update(state.global_step - bar.n)

        return train(*arguments, callbacks=[Progress()])


def run_finetuning(layout: Layout, config: DemoConfig, seed: int, say: Stages) -> None:
    for base, tuned in ((M_A, FT_A), (M_B, FT_B)):
        if is_finished_model(layout.model(tuned)):
            say(f"fine-tuning: {tuned} exists, skipped")
            continue
        path = write_trl_config(
            layout, config, layout.model(tuned).name, layout.model(base), layout.model(tuned), seed
        )
        say(f"fine-tuning {base} → {tuned} with ftt-train --config {path}")
        finetune(path, say, f"fine-tuning {tuned}")


# --- transfer (mergekit-yaml) ----------------------------------------------------------


def run_transfer(layout: Layout, threads: int, say: Stages, log: IO[str] | None) -> None:
    """M_b + (FT(M_a) − M_a) through the real ``mergekit-yaml``, as one ``ftt-iterate`` round
    (recipes/transfer_round.yml; float32, since a bf16 rounding would blur a delta this small).
    ``log`` takes mergekit's output (None: the terminal)."""
    from mergekit_ftt.training import iterate

    if is_finished_model(layout.model(TRANSFER)):
        say(f"transfer: {TRANSFER} exists, skipped")
        return
    round_ = iterate.Round(
        index=1,
        target=layout.model(M_B).resolve(),
        source_base=layout.model(M_A).resolve(),
        source_finetuned=layout.model(FT_A).resolve(),
        folder=layout.transfer.resolve(),
    )
    template = iterate.load_template() | {"dtype": "float32"}
    say(f"transfer: mergekit-yaml {layout.transfer / 'transfer.yml'} (finetuning_transfer)")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for the mergekit-yaml child
    iterate.run_transfer(round_, template, ["--lazy-unpickle"], output=log)


# --- evaluation and report (mergekit_ftt.eval) -------------------------------------------


def evaluate(layout: Layout, models: Sequence, output_dir: Path, say: Stages) -> None:
    """lm-eval (hf backend, CPU, chat template) on the held-out task, resumable per model,
    with one progress bar over the models."""
    from mergekit_ftt.eval import BackendOptions, evaluate_models

    with say.progress(len(models), "evaluating", unit="model") as bar:
        evaluate_models(
            models,
            EVAL_SUITE,
            output_dir,
            backend="hf",
            options=BackendOptions(device="cpu", dtype="float32", batch_size=1),
            include_path=[layout.tasks],
            log_samples=True,
            on_model_done=lambda label: bar.update(),
        )


def evaluate_table_models(layout: Layout, labels: Sequence[str], say: Stages) -> None:
    """The table's models: M_a, M_b, their fine-tuned versions and M_b + Δ_a (a "+ Δ" row)."""
    from mergekit_ftt.eval import ModelSpec

    models = [
        ModelSpec(
            label, str(layout.model(label).resolve()), base=M_B if label == TRANSFER else None
        )
        for label in labels
    ]
    evaluate(layout, models, layout.eval, say)


def write_report(layout: Layout, labels: Sequence[str], title: str) -> tuple[str, dict[str, Path]]:
    """The paper-shaped table as Markdown, CSV, JSON and a PNG bar chart."""
    from mergekit_ftt.eval.report import build_table, to_markdown
    from mergekit_ftt.eval.report import write_report as write_files

    table = build_table([layout.eval / label for label in labels])
    paths = write_files(table, layout.report, title)
    paths["json"] = layout.report / "results.json"
    scores = {
        row.label: {"base": row.base, "scores": {c: table.score(row, c) for c in table.columns}}
        for row in table.rows
    }
    paths["json"].write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    return to_markdown(table), paths
