"""Every shipped suite resolves in lm-eval's TaskManager, offline, and its YAML is valid.

Only lm-eval's task index is built (no task is instantiated), so no dataset, NLTK
resource or other network access is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval import SUITES_DIR, load_suite, runner
from mergekit_ftt.eval.suites import shipped_suites

pytestmark = pytest.mark.slow  # indexing lm-eval's ~10k task files takes ~30 s on 2 cores

SUITES = ["llama3-instruct", "olmes-base", "olmes-instruct"]
GROUP_KEYS = {"group", "group_alias", "task", "aggregate_metric_list", "metadata"}


@pytest.fixture(scope="module")
def manager():
    tasks = [
        name for suite in SUITES for name in [suite, *(c.task for c in load_suite(suite).columns)]
    ]
    return runner.task_manager([], tasks)  # raises if any name or group member is unknown


def test_shipped_suites_are_the_paper_suites():
    assert shipped_suites() == SUITES


@pytest.mark.parametrize("name", SUITES)
def test_suite_columns_are_its_group_members_and_resolve(name, manager):
    suite = load_suite(name)
    group = yaml.safe_load((SUITES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    assert [c.task for c in suite.columns] == group["task"]
    assert not runner._missing(manager.task_index, [name])
    assert [c.name for c in suite.columns] == ["GSM8K", "MATH", "ARC-C", "GPQA", "MMLU", "IFEval"]
    assert all(c.metrics for c in suite.columns)


def _leaf_configs(entry, index) -> list[dict]:
    """Task configs as lm-eval's factory merges them: member YAML < group keys < item keys."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=False)
    if "group" not in cfg:
        return [cfg]
    shared = {k: v for k, v in cfg.items() if k not in GROUP_KEYS}
    leaves = []
    for item in cfg["task"]:
        item = {"task": item} if isinstance(item, str) else item
        member = index.get(item["task"])
        base = load_yaml(member.yaml_path, resolve_func=False) if member else {}
        leaves.append({**base, **shared, **item})
    return leaves


def test_our_task_yamls_are_valid_lm_eval_configs(manager):
    from lm_eval.config.task import TaskConfig

    ours = [
        e for e in manager.task_index.values() if e.yaml_path and SUITES_DIR in e.yaml_path.parents
    ]
    own_tasks = [e for e in ours if e.yaml_path.parent.name == "olmes"]
    assert len(own_tasks) == 8
    for entry in own_tasks:
        text = entry.yaml_path.read_text(encoding="utf-8")
        assert "# Sources: OLMES" in text and "label: OLMES-equivalent" in text, entry.yaml_path
        for leaf in _leaf_configs(entry, manager.task_index):
            leaf.pop("include", None)
            TaskConfig(**{k: v for k, v in leaf.items() if k not in ("group", "tag")})


def test_mmlu_groups_cover_the_57_subjects_with_a_macro_average():
    for name in ("mmlu_0shot_cot_tulu3", "mmlu_mc_olmes"):
        cfg = yaml.safe_load((SUITES_DIR / "olmes" / f"{name}.yaml").read_text(encoding="utf-8"))
        assert len({t["dataset_name"] for t in cfg["task"]}) == 57
        assert cfg["aggregate_metric_list"][0]["weight_by_size"] is False


def test_unknown_task_fails_before_any_model_loads(tmp_path: Path, manager, olmo2):
    from mergekit_ftt.eval import ModelSpec, evaluate_models

    model = ModelSpec("m", str(olmo2.model("m", seed=0)))
    with pytest.raises(FttError, match="knows no task or group named no_such_task"):
        evaluate_models([model], ["no_such_task"], tmp_path / "o", backend="hf")
    assert not (tmp_path / "o").exists()
