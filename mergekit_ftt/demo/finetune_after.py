"""``--finetune-after``: the paper's transfer-then-finetune, in miniature.

Fine-tune M_b and M_b + Δ_a with the same ``ftt-train`` settings, save a checkpoint every
``eval_every`` steps, evaluate each with lm-eval, and report how many steps each start needs
to reach ``target_accuracy``, with the loss and accuracy curves plotted.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_ftt.cli import Stages
from mergekit_ftt.demo import pipeline
from mergekit_ftt.demo.config import DemoConfig
from mergekit_ftt.demo.pipeline import M_B, TRANSFER, Layout
from mergekit_ftt.sources import is_finished_model

STARTS = {M_B: "from_M_b", TRANSFER: "from_M_b_plus_delta_a"}


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


def finetune_from(layout: Layout, config: DemoConfig, start: str, seed: int, say: Stages) -> Path:
    folder = layout.root / "finetune_after" / STARTS[start]
    if is_finished_model(folder):
        say(f"finetune-after: {folder} exists, skipped")
        return folder
    fa = config.finetune_after
    trl_config = pipeline.write_trl_config(
        layout,
        config,
        f"finetune_after_{STARTS[start]}",
        layout.model(start),
        folder,
        seed,
        max_steps=fa.max_steps,
        save_strategy="steps",
        save_steps=fa.eval_every,
        save_only_model=True,
        logging_steps=fa.eval_every // 2 or 1,
    )
    say(f"finetune-after: fine-tuning {start} for {fa.max_steps} steps")
    pipeline.finetune(trl_config, say, f"fine-tuning from {start}")
    return folder


def accuracy_curve(layout: Layout, start: str, folder: Path, say: Stages) -> dict[int, float]:
    """Step → accuracy (%): step 0 from the main evaluation, then every saved checkpoint."""
    from mergekit_ftt.eval import ModelSpec
    from mergekit_ftt.eval.report import build_table

    eval_dir = layout.root / "finetune_after" / "eval"
    specs = [
        ModelSpec(f"{STARTS[start]}-step{step}", str(folder / f"checkpoint-{step}"))
        for step in checkpoint_steps(folder)
    ]
    say(f"finetune-after: evaluating the {len(specs)} checkpoints from {start}")
    pipeline.evaluate(layout, specs, eval_dir, say)
    # M_b's folder too: the "+ Δ" row of M_b + Δ_a refers to it.
    table = build_table(
        [layout.eval / M_B, layout.eval / TRANSFER, *(eval_dir / spec.label for spec in specs)]
    )
    column = table.columns[0]
    curve = {0: table.score(table.row(start), column)}
    for step, spec in zip(checkpoint_steps(folder), specs, strict=True):
        curve[step] = table.score(table.row(spec.label), column)
    return curve


def loss_curve(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    return next((step for step, accuracy in sorted(curve.items()) if accuracy >= target), None)


def plot(curves: dict[str, dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for start, curve in curves.items():
        loss_ax.plot(list(curve["loss"]), list(curve["loss"].values()), marker=".", label=start)
        acc_ax.plot(
            list(curve["accuracy"]), list(curve["accuracy"].values()), marker="o", label=start
        )
    acc_ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0f}%")
    loss_ax.set(xlabel="fine-tuning step", ylabel="training loss", title="Loss")
    acc_ax.set(xlabel="fine-tuning step", ylabel="held-out accuracy (%)", title="Accuracy")
    acc_ax.set_ylim(0, 100)
    for ax in (loss_ax, acc_ax):
        ax.legend(fontsize=8)
    fig.suptitle("Fine-tuning M_b vs transfer-then-finetune (M_b + Δ_a)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(layout: Layout, config: DemoConfig, seed: int, say: Stages) -> dict[str, Path]:
    """Fine-tune both starts, evaluate their checkpoints, write JSON and PNG; print a summary."""
    target = 100 * config.finetune_after.target_accuracy
    curves = {}
    for start in STARTS:
        folder = finetune_from(layout, config, start, seed, say)
        curves[start] = {
            "accuracy": accuracy_curve(layout, start, folder, say),
            "loss": loss_curve(folder),
        }
        curves[start]["steps_to_target"] = steps_to_reach(curves[start]["accuracy"], target)
    paths = {
        "finetune-after json": layout.report / "finetune_after.json",
        "finetune-after png": layout.report / "finetune_after.png",
    }
    summary = {"target_accuracy": target, "curves": curves}
    paths["finetune-after json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    plot(curves, target, paths["finetune-after png"])
    for start, curve in curves.items():
        reached = curve["steps_to_target"]
        final_step = max(curve["accuracy"])
        say(
            f"finetune-after from {start}: {curve['accuracy'][final_step]:.1f}% after "
            f"{final_step} steps; {target:.0f}% "
            + ("not reached" if reached is None else f"reached at step {reached}")
        )
    return paths
