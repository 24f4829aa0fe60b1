"""``ftt-demo --matrix``: the paper's Table 3 in miniature, and how well ftt-inspect predicts it.

For each seed:

1. One pre-training run of the demo (``pretrain.py``) saves checkpoints spread over both
   stages: M1–M3 in stage 1 (constant learning rate), M4 and M5 in stage 2 (annealed),
   like OLMo 2's M1–M5 in the paper's Table 3 (``--quick``: three, the end of stage 1,
   the middle and the end of stage 2).
2. Each Mi is fine-tuned with the project's TRL code (``ftt-train``'s ``train``), as the
   demo does, into FT(Mi).
3. Every ordered pair Mi + Δj = Mi + (FT(Mj) − Mj), i ≠ j, is merged by the real
   ``mergekit-multi`` (one process, mergekit's executor, the ``finetuning_transfer``
   method and its preflight) from one recipe file per pair.
4. Every model is evaluated with ``mergekit_ftt.eval`` (lm-eval, hf backend, chat
   template, exact match) on chat questions about facts of the SFT set, early facts kept
   out of it and late facts (:func:`write_data`).
5. ``ftt-inspect`` (``inspect_recipe``) reads every pair's recipe before it is merged.

Transfer efficiency of a pair is (score(Mi + Δj) − score(Mi)) / (score(FT(Mi)) − score(Mi)):
1 when the transfer does what fine-tuning Mi itself does. The report gives, per seed, the
accuracy matrix laid out like Table 3, the efficiencies, ftt-inspect's score, and the
Spearman correlation of each candidate statistic with efficiency.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mergekit_ftt.cli import Stages, installed_command, library_logs
from mergekit_ftt.demo import calibration, corpus, pipeline
from mergekit_ftt.demo.config import DemoConfig, load_config
from mergekit_ftt.errors import FttError
from mergekit_ftt.sources import is_finished_model

# (stage, share of the stage) of each checkpoint: M1–M3 over the second half of stage 1
# (earlier, the tiny model recalls too few facts for fine-tuning to show), M4 the middle and
# M5 the end of stage 2 (OLMo 2: M4 = stage-2 step 6000 of 11931, M5 = the end). Presets
# whose name ends in "quick" take the three-checkpoint layout, the others the five.
LOG_FILE = "matrix.log"
CHECKPOINTS = {
    "full": ((1, 0.5), (1, 0.75), (1, 1.0), (2, 0.5), (2, 1.0)),
    "quick": ((1, 1.0), (2, 0.5), (2, 1.0)),
}
SETTINGS_FILE = "settings.json"
STAGES = Stages("ftt-demo")


@dataclass(frozen=True)
class Checkpoint:
    name: str  # M1 … M5
    stage: int
    step: int


@dataclass(frozen=True)
class Pair:
    target: str  # Mi
    source: str  # Mj: the delta is FT(Mj) − Mj

    @property
    def label(self) -> str:
        return f"{self.target} + Δ{self.source[1:]}"

    @property
    def folder(self) -> str:
        return f"{self.target}_plus_delta_{self.source}"


def finetuned(name: str) -> str:
    return f"FT({name})"


def checkpoint_shares(preset: str) -> tuple[tuple[int, float], ...]:
    return CHECKPOINTS["quick" if preset.endswith("quick") else "full"]


def checkpoints_of(config: DemoConfig, preset: str) -> list[Checkpoint]:
    stages = {1: config.pretrain.stage1.steps, 2: config.pretrain.stage2.steps}
    return [
        Checkpoint(f"M{index}", stage, round(stages[stage] * share))
        for index, (stage, share) in enumerate(checkpoint_shares(preset), start=1)
    ]


class SeedLayout(pipeline.Layout):
    """One seed's folder: the demo's layout (data, configs, eval) plus one model folder per
    checkpoint and fine-tuned model, and one transfer folder per pair."""

    def model(self, label: str) -> Path:
        return self.root / "models" / label.replace("(", "_").replace(")", "")

    def transferred(self, pair: Pair) -> Path:
        return self.transfer / pair.folder

    def recipe(self, pair: Pair) -> Path:
        return self.transfer / "recipes" / f"{pair.folder}.yml"

    def inspection(self, pair: Pair) -> Path:
        return self.root / "inspect" / f"{pair.folder}.json"


# --- data, pre-training, fine-tuning ---------------------------------------------------------


def write_data(layout: SeedLayout, config: DemoConfig, seed: int) -> corpus.World:
    """The demo's data files, with the SFT and test sets replaced by the matrix's split.

    A third of the demo's test size of early facts is kept out of the SFT set. The test asks
    about twice that many facts of the SFT set (what fine-tuning taught), the kept-out early
    facts and twice that many late facts (the last two known only from pre-training), each
    fact with every question template: every checkpoint then has something to gain from
    fine-tuning, as every OLMo 2 checkpoint gains on GSM8K in the paper's Table 3, and the
    test is large enough (200 questions in the full preset) for efficiencies to be read.
    """
    world = pipeline.write_data(layout, config, seed)
    part = config.task.test_examples // 3
    held_out, taught = world.early[:part], world.early[part:]
    corpus.write_jsonl(
        corpus.sft_examples(corpus.World(early=taught, late=()), config.task.sft_examples, seed),
        layout.data / "sft.jsonl",
    )
    test_facts = taught[: 2 * part] + held_out + world.late[: 2 * part]
    questions = [
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": str(fact.c)},
            ]
        }
        for fact in test_facts
        for question in fact.questions
    ]
    corpus.write_jsonl(questions, layout.data / "test.jsonl")
    return world


def pretrain(
    layout: SeedLayout, config: DemoConfig, world, checkpoints: list[Checkpoint], seed: int
) -> None:
    if all(is_finished_model(layout.model(c.name)) for c in checkpoints):
        return
    pipeline.pretrain(
        world,
        pipeline.build_tokenizer(),
        config.model,
        config.pretrain,
        seed,
        {(c.stage, c.step): layout.model(c.name) for c in checkpoints},
    )


def finetune(layout: SeedLayout, config: DemoConfig, checkpoint: Checkpoint, seed: int) -> None:
    tuned = layout.model(finetuned(checkpoint.name))
    if is_finished_model(tuned):
        return
    trl_config = pipeline.write_trl_config(
        layout, config, tuned.name, layout.model(checkpoint.name), tuned, seed
    )
    pipeline.finetune(trl_config, STAGES, f"fine-tuning {tuned.name}")


# --- transfers (mergekit-multi) and inspection ---------------------------------------------


def recipe(layout: SeedLayout, pair: Pair) -> dict:
    """The transfer-round recipe (recipes/transfer_round.yml) filled in for one pair, in
    float32 as the demo's own transfer."""
    from mergekit_ftt.training import iterate

    template = iterate.load_template() | {"dtype": "float32"}
    round_ = iterate.Round(
        index=1,
        target=layout.model(pair.target).resolve(),
        source_base=layout.model(pair.source).resolve(),
        source_finetuned=layout.model(finetuned(pair.source)).resolve(),
        folder=layout.transferred(pair).resolve(),
    )
    return iterate.fill_template(template, round_)


def transfer_all(layout: SeedLayout, pairs: Sequence[Pair], threads: int, log: Path | None) -> None:
    """Write one recipe per pair and merge the missing ones with one ``mergekit-multi``,
    its output appended to ``log`` (None: on the terminal, ``--verbose``)."""
    documents = []
    for pair in pairs:
        document = recipe(layout, pair)
        layout.recipe(pair).parent.mkdir(parents=True, exist_ok=True)
        layout.recipe(pair).write_text(yaml.safe_dump(document, sort_keys=False))
        if not is_finished_model(layout.transferred(pair)):
            documents.append({"name": pair.folder, **document})
    if not documents:
        return
    multi = installed_command("mergekit-multi")  # beside this Python, then on PATH
    batch = layout.transfer / "matrix.yml"
    batch.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    command = [multi, str(batch), "--intermediate-dir", str(layout.transfer), "--lazy-unpickle"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with contextlib.ExitStack() as stack:
        stream = None if log is None else stack.enter_context(log.open("a", encoding="utf-8"))
        result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        where = "above" if log is None else f"in {log}"
        raise FttError(f"mergekit-multi failed on {batch}; its output is {where}")


def inspect_all(layout: SeedLayout, pairs: Sequence[Pair]) -> dict[Pair, dict]:
    """``ftt-inspect``'s report of every pair's recipe, kept as JSON next to the recipes."""
    from mergekit_ftt.inspect import inspect_recipe

    reports = {}
    for pair in pairs:
        path = layout.inspection(pair)
        if not path.exists():
            report = inspect_recipe(layout.recipe(pair), progress=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        reports[pair] = json.loads(path.read_text(encoding="utf-8"))
    return reports


# --- evaluation ----------------------------------------------------------------------------


def evaluate(layout: SeedLayout, checkpoints: list[Checkpoint], pairs: Sequence[Pair]) -> dict:
    """Accuracy (%) of every base, fine-tuned and transferred model, by label."""
    from mergekit_ftt.eval import BackendOptions, ModelSpec, build_table, evaluate_models

    specs = [ModelSpec(c.name, str(layout.model(c.name).resolve())) for c in checkpoints]
    specs += [
        ModelSpec(finetuned(c.name), str(layout.model(finetuned(c.name)).resolve()))
        for c in checkpoints
    ]
    specs += [
        ModelSpec(p.label, str(layout.transferred(p).resolve()), base=p.target) for p in pairs
    ]
    evaluate_models(
        specs,
        pipeline.EVAL_SUITE,
        layout.eval,
        backend="hf",
        options=BackendOptions(device="cpu", dtype="float32", batch_size=1),
        include_path=[layout.tasks],
        log_samples=False,
    )
    table = build_table([layout.eval / spec.label for spec in specs])
    column = table.columns[0]
    return {row.label: table.score(row, column) for row in table.rows}


# --- the run ---------------------------------------------------------------------------------


def run_seed(
    root: Path, config: DemoConfig, preset: str, seed: int, threads: int, log: Path | None
) -> dict:
    """Train, transfer, inspect and evaluate one seed's matrix; return its measurements."""
    layout = SeedLayout(root / f"seed{seed}")
    checkpoints = checkpoints_of(config, preset)
    names = [c.name for c in checkpoints]
    pairs = [Pair(t, s) for t in names for s in names if t != s]
    spread = ", ".join(f"{c.name} = stage {c.stage} step {c.step}" for c in checkpoints)
    STAGES(f"seed {seed}: data and pre-training ({spread}){_cached(layout, names)}")
    with quiet(log):
        world = write_data(layout, config, seed)
        pretrain(layout, config, world, checkpoints, seed)
    for checkpoint in checkpoints:
        tuned = finetuned(checkpoint.name)
        STAGES(
            f"seed {seed}: fine-tuning {checkpoint.name} with ftt-train{_cached(layout, [tuned])}"
        )
        with quiet(log):
            finetune(layout, config, checkpoint, seed)
    missing = [p for p in pairs if not is_finished_model(layout.transferred(p))]
    STAGES(f"seed {seed}: {len(missing)} of {len(pairs)} transfers to make with mergekit-multi")
    transfer_all(layout, pairs, threads, log)
    STAGES(f"seed {seed}: ftt-inspect on every pair's recipe")
    with quiet(log):
        reports = inspect_all(layout, pairs)
    STAGES(f"seed {seed}: evaluating {2 * len(checkpoints) + len(pairs)} models with lm-eval")
    with quiet(log):
        scores = evaluate(layout, checkpoints, pairs)
    pair_reports = [
        {"target": p.target, "source": p.source, "label": p.label, "report": reports[p]}
        for p in pairs
    ]
    return {
        **calibration.seed_summary(seed, names, scores, pair_reports),
        "checkpoint_steps": [asdict(c) for c in checkpoints],
    }


def _cached(layout: SeedLayout, labels: Sequence[str]) -> str:
    done = all(is_finished_model(layout.model(label)) for label in labels)
    return ": done before, skipped" if done else ""


@contextlib.contextmanager
def quiet(log: Path | None):
    """Library logs, and what training and evaluation print (loss lines, lm-eval's bars),
    go to the log file; the matrix's stage lines stay on the terminal. ``log`` None
    (``--verbose``): everything stays on the terminal."""
    if log is None:
        yield
        return
    with (
        library_logs(log),
        log.open("a", encoding="utf-8") as stream,
        contextlib.redirect_stdout(stream),
        contextlib.redirect_stderr(stream),
    ):
        yield


def prepare(root: Path, settings: dict, overwrite: bool) -> None:
    """Start, resume (same settings) or, with ``overwrite``, restart the matrix in ``root``."""
    record = root / SETTINGS_FILE
    if root.exists() and overwrite:
        shutil.rmtree(root)
    elif record.exists():
        if json.loads(record.read_text(encoding="utf-8")) != settings:
            raise FttError(
                f"{root} holds a matrix run with other settings; pass --overwrite to replace "
                "it, or choose another --out"
            )
        STAGES(f"resuming the matrix in {root}: finished stages are skipped")
    elif root.exists() and any(root.iterdir()):
        raise FttError(f"{root} is not empty and holds no matrix run; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))


def run(
    out: Path,
    preset: str,
    seeds: Sequence[int],
    threads: int,
    overwrite: bool,
    split: calibration.SeedSplit | None = None,
    verbose: bool = False,
) -> dict:
    """The whole matrix for ``seeds``; writes and prints the report. With ``split``, the
    report fits the verdict's curve on its calibration seeds only and scores it, and the
    shipped calibration, on its held-out seeds (:func:`calibration.heldout_report`); a held-out
    seed that a fit used is refused before anything runs. The libraries' logs go to
    ``matrix.log`` in the matrix folder, or, ``verbose``, to the terminal."""
    if split is not None:
        try:
            calibration.check_heldout(
                [(preset, n) for n in split.calibration], [(preset, n) for n in split.heldout]
            )
        except ValueError as error:
            raise FttError(str(error)) from None
    config = load_config(preset)
    root = out / f"matrix-{preset}"
    settings = {
        "preset": preset,
        "config": config.to_dict(),
        "checkpoints": checkpoint_shares(preset),
    }
    prepare(root, json.loads(json.dumps(settings)), overwrite)
    started, load_before = time.monotonic(), os.getloadavg()
    cpu_before = _cpu_seconds()
    log = None if verbose else root / LOG_FILE
    results = [run_seed(root, config, preset, s, threads, log) for s in seeds]
    summary = {
        "preset": preset,
        **({"split": split.to_dict()} if split else {}),
        "seeds": results,
        "wall_seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_before, 1),
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }
    paths = calibration.write(summary, root / "report")
    print(calibration.markdown(summary))
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    STAGES("done")
    return summary


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (mergekit-multi)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
