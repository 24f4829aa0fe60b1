"""The demo's settings: one YAML preset per mode (``configs/full.yaml``, ``configs/quick.yaml``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_ftt.demo.corpus import TaskConfig
from mergekit_ftt.demo.pretrain import ModelConfig, PretrainConfig, StageConfig
from mergekit_ftt.package_data import with_includes

CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class FinetuneConfig:
    """The project's TRL fine-tuning as the demo runs it."""

    trl_config: str  # ftt-train YAML in CONFIGS_DIR; the demo fills in models, data and paths
    max_steps: int


@dataclass(frozen=True)
class FinetuneAfterConfig:
    """Transfer-then-finetune: fine-tune M_b and M_b + Δ_a, evaluating every ``eval_every`` steps."""

    max_steps: int
    eval_every: int
    target_accuracy: float


@dataclass(frozen=True)
class DemoConfig:
    task: TaskConfig
    model: ModelConfig
    pretrain: PretrainConfig
    # M_a is the snapshot taken after this share of stage 2, M_b the end of stage 2: two
    # checkpoints of one annealing run, like OLMo 2's M4 (stage-2 step 6000) and M5 (11931).
    checkpoint_a_at: float
    finetune: FinetuneConfig
    finetune_after: FinetuneAfterConfig
    torch_threads: int

    @property
    def checkpoint_a_step(self) -> int:
        return round(self.pretrain.stage2.steps * self.checkpoint_a_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(preset: str) -> DemoConfig:
    """Read ``configs/<preset>.yaml`` (``quick`` includes ``full`` and makes it smaller)."""
    path = CONFIGS_DIR / f"{preset}.yaml"
    raw = with_includes(yaml.safe_load(path.read_text(encoding="utf-8")), CONFIGS_DIR)
    pretrain = dict(raw["pretrain"])
    pretrain["stage1"] = StageConfig(**pretrain["stage1"])
    pretrain["stage2"] = StageConfig(**pretrain["stage2"])
    config = DemoConfig(
        task=TaskConfig(**raw["task"]),
        model=ModelConfig(**raw["model"]),
        pretrain=PretrainConfig(**pretrain),
        checkpoint_a_at=raw["checkpoint_a_at"],
        finetune=FinetuneConfig(**raw["finetune"]),
        finetune_after=FinetuneAfterConfig(**raw["finetune_after"]),
        torch_threads=raw["torch_threads"],
    )
    if not 0 < config.checkpoint_a_at < 1:
        raise ValueError(f"{path}: checkpoint_a_at must lie strictly between 0 and 1")
    return config
