"""One recipe reader for every command: one-line errors, answered before mergekit loads."""

from __future__ import annotations

import pytest
from helpers import run_cli

COMMANDS = {
    "ftt-inspect": ["ftt-inspect", "{recipe}"],
    "ftt-sweep": ["ftt-sweep", "{recipe}", "--alphas", "1", "--tasks", "t", "--out", "{out}"],
    "ftt-delta": ["ftt-delta", "extract", "{recipe}", "{out}"],
}
RECIPES = {
    "missing": (None, "no recipe file {recipe}; give the YAML file mergekit-yaml would take"),
    "empty": ("", "{recipe} is empty; give the YAML file mergekit-yaml would take"),
    "broken YAML": (
        "models: [1,\n",
        "{recipe} is not valid YAML (line 2, column 1): expected the node content, but "
        "found '<stream end>'",
    ),
    "not a recipe": (
        "- a\n- b\n",
        "{recipe} is not a mergekit recipe: it has no `merge_method:` key; give the YAML "
        "file mergekit-yaml would take",
    ),
}


@pytest.mark.parametrize("case", RECIPES)
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_recipe_files_get_one_line(tmp_path, command, case):
    text, message = RECIPES[case]
    recipe, out = tmp_path / "recipe.yml", tmp_path / "out"
    if text is not None:
        recipe.write_text(text)
    args = [a.format(recipe=recipe, out=out) for a in COMMANDS[command]]
    result = run_cli(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{command}: error: {message.format(recipe=recipe)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["recipe.yml"] if text is not None else []
    )


def test_an_invalid_recipe_names_the_key_not_a_pydantic_dump(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: finetuning_transfer\nbase_model: t\nmodels: 3\n")
    result = run_cli("ftt-inspect", str(recipe))
    assert result.returncode == 2
    assert result.stderr == (
        f"ftt-inspect: error: {recipe} is not a mergekit recipe: models: Input should be a "
        "valid list\n"
    )
