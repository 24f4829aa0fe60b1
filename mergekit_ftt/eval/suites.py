"""Suites: lm-eval group YAMLs whose ``metadata.ftt`` block says how to run and tabulate them.

A suite file ``<name>.yaml`` is an ordinary lm-eval group (``group: <name>``, ``task: [...]``),
so plain ``lm_eval --include_path eval --tasks <name>`` also runs it.
lm-eval ignores the ``metadata.ftt`` block; this module reads it:

    metadata:
      ftt:
        apply_chat_template: true      # suite default
        fewshot_as_multiturn: true     # suite default
        model_args: {add_bos_token: true}   # merged into the backend's model arguments
        columns:                       # one per table column, in order
          - task: gsm8k_llama          # lm-eval task or group, run on its own
            name: GSM8K
            metrics: ["exact_match,strict_match"]   # averaged when several
            apply_chat_template: false # optional per-column override
        olmes_tasks: {GSM8K: "gsm8k::tulu"}   # optional, for delegation to OLMES
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_ftt.errors import FttError
from mergekit_ftt.package_data import data_folder

# The top-level eval/ folder: suites, the OLMES-equivalent task YAMLs and their sources.
SUITES_DIR = data_folder("eval")


@dataclass(frozen=True)
class Column:
    """One table column: an lm-eval task (or group) and the result keys it is scored by."""

    task: str
    name: str
    metrics: tuple[str, ...] = ()  # empty: the first metric lm-eval reports for the task
    apply_chat_template: bool | None = None  # None: the suite's setting
    fewshot_as_multiturn: bool | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    columns: tuple[Column, ...]
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    olmes_tasks: dict[str, str] = field(default_factory=dict)

    def chat_settings(self, column: Column) -> tuple[bool, bool]:
        """(apply_chat_template, fewshot_as_multiturn) for ``column``."""
        chat = (
            self.apply_chat_template
            if column.apply_chat_template is None
            else column.apply_chat_template
        )
        multiturn = (
            self.fewshot_as_multiturn
            if column.fewshot_as_multiturn is None
            else column.fewshot_as_multiturn
        )
        # lm-eval rejects multi-turn few-shot without a chat template.
        return chat, multiturn and chat


def _suite_file(name: str, include_paths: Sequence[Path]) -> Path:
    for folder in [*include_paths, SUITES_DIR]:
        candidate = Path(folder) / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise FttError(
        f"unknown suite {name!r}: no {name}.yaml in {[str(p) for p in [*include_paths, SUITES_DIR]]}. "
        f"Shipped suites: {', '.join(shipped_suites())}."
    )


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml") if _is_suite(_read(p)))


def _read(path: Path) -> dict[str, Any]:
    # Suite files hold no `!function` tags, so the safe loader reads them.
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _is_suite(raw: dict[str, Any]) -> bool:
    return "group" in raw and "ftt" in (raw.get("metadata") or {})


def load_suite(name: str, include_paths: Sequence[str | Path] = ()) -> Suite:
    """Read suite ``name`` from ``include_paths`` (first) or the shipped suites folder."""
    path = _suite_file(name, [Path(p) for p in include_paths])
    raw = _read(path)
    if not _is_suite(raw) or raw["group"] != name:
        raise FttError(
            f"{path} is not a suite: it needs `group: {name}` and a `metadata.ftt` block"
        )
    ftt = raw["metadata"]["ftt"]
    columns = tuple(
        Column(
            task=c["task"],
            name=c.get("name", c["task"]),
            metrics=tuple(c.get("metrics", ())),
            apply_chat_template=c.get("apply_chat_template"),
            fewshot_as_multiturn=c.get("fewshot_as_multiturn"),
        )
        for c in ftt["columns"]
    )
    return Suite(
        name=name,
        columns=columns,
        apply_chat_template=bool(ftt.get("apply_chat_template", False)),
        fewshot_as_multiturn=bool(ftt.get("fewshot_as_multiturn", False)),
        model_args=dict(ftt.get("model_args") or {}),
        olmes_tasks=dict(ftt.get("olmes_tasks") or {}),
    )


def adhoc_suite(
    tasks: Sequence[str], apply_chat_template: bool = False, fewshot_as_multiturn: bool = False
) -> Suite:
    """A suite of plain task names, one column each, scored by lm-eval's first metric."""
    return Suite(
        name="custom",
        columns=tuple(Column(task=t, name=t) for t in tasks),
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
    )
