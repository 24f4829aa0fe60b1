"""The demo's own miniature pre-training: a plain causal-LM loop in two stages.

Stage 1 trains at a constant learning rate on early facts. Stage 2 continues the same run
(same optimizer state) on early and late facts with the learning rate annealed to zero, the
way OLMo 2's stage-2 "ingredient" runs continue stage 1. Snapshots of stage 2 are the
demo's checkpoints: M_a part-way through (OLMo 2's M4 is stage-2 step 6000), M_b at the end
(M5, step 11931). This is not supervised fine-tuning (that is the project's TRL code); it
only makes the two related checkpoints the transfer needs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mergekit_ftt.demo.corpus import World, documents


@dataclass(frozen=True)
class ModelConfig:
    """A tiny OLMo 2 (the demo), or a tiny Llama with grouped-query attention
    (``num_kv_heads`` < ``num_heads``) and tied embeddings (configs/llama.yaml). The fields
    are ``mergekit_ftt.tiny.tiny_config``'s arguments of the same names."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    architecture: str = "olmo2"  # a mergekit_ftt.tiny.Architecture
    num_kv_heads: int | None = None  # None: as many as num_heads
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class StageConfig:
    steps: int
    math_share: float  # share of pre-training sentences that state a fact
    late_share: float  # share of those facts drawn from the late ones (0: stage 1)
    anneal: bool  # linear decay of the learning rate to zero over the stage


@dataclass(frozen=True)
class PretrainConfig:
    stage1: StageConfig
    stage2: StageConfig
    learning_rate: float
    warmup_steps: int
    batch_size: int
    sequence_length: int
    sentences_per_document: int


def token_stream(tokenizer, texts, length: int):
    """``length`` token ids of BOS-separated documents, as pre-training corpora are packed."""
    import torch

    ids: list[int] = []
    while len(ids) < length:
        batch = [next(texts) for _ in range(256)]
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.append(tokenizer.bos_token_id)
            ids.extend(encoded)
    return torch.tensor(ids[:length])


def stage_batches(
    tokenizer, world: World, stage: StageConfig, config: PretrainConfig, rng: random.Random
):
    """The stage's batches, each ``batch_size`` contiguous windows of the packed stream."""
    window = config.batch_size * config.sequence_length
    texts = documents(world, stage.math_share, stage.late_share, config.sentences_per_document, rng)
    stream = token_stream(tokenizer, texts, stage.steps * window)
    return stream.view(stage.steps, config.batch_size, config.sequence_length)


def learning_rate(
    step: int, stage: StageConfig, config: PretrainConfig, first_stage: bool
) -> float:
    if first_stage and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if stage.anneal:
        return config.learning_rate * (1 - step / stage.steps)
    return config.learning_rate


def build_model(model_config: ModelConfig, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_ftt.tiny import tiny_config_for

    config = tiny_config_for(tokenizer, **asdict(model_config))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def train_stage(
    model, optimizer, batches, stage, config, first_stage: bool, log: list, save
) -> None:
    """Train on ``batches``; ``save(step)`` is called after every step (it saves snapshots)."""
    model.train()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, stage, config, first_stage)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"stage": 1 if first_stage else 2, "step": step + 1, "loss": loss.item()})
        save(step + 1)


def pretrain(
    world: World,
    tokenizer,
    model_config: ModelConfig,
    config: PretrainConfig,
    seed: int,
    snapshots: dict[tuple[int, int], Path],
    on_step: Callable[[], object] = lambda: None,
) -> None:
    """Pre-train in two stages, saving the model at each ``(stage, step)`` of ``snapshots``;
    ``on_step`` is called after every step (a progress bar)."""
    import torch

    rng = random.Random(seed)
    model = build_model(model_config, tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    log: list[dict] = []

    for number, stage in ((1, config.stage1), (2, config.stage2)):

        def save(step: int, number: int = number) -> None:
            on_step()
            out_dir = snapshots.get((number, step))
            if out_dir is not None:
                model.save_pretrained(out_dir)
                tokenizer.save_pretrained(out_dir)
                (out_dir / "pretrain_log.json").write_text(json.dumps(log))

        batches = stage_batches(tokenizer, world, stage, config, rng)
        train_stage(model, optimizer, batches, stage, config, number == 1, log, save)
