"""ftt-sweep's variants: the grid as mergekit recipes, built in memory bit-identical to
what mergekit writes for the same recipe, from one read of the inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_weights, run_cli, stored_delta_recipe
from mergekit.config import ConditionalParameter

from mergekit_ftt.errors import FttError
from mergekit_ftt.modules import module_kind
from mergekit_ftt.sweep import build, grid

LLAMA_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


# --- the grid, without models ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty value"),
        ("0,,1", "empty value"),
        ("0,half,1", "'half' is not a finite number"),
        ("0,nan", "'nan' is not a finite number"),
        ("1,0.5,1.0", "lists 1.0 twice"),
    ],
)
def test_bad_alpha_lists_are_named(text, problem):
    with pytest.raises(FttError, match=problem):
        grid.parse_alphas(text)


def test_alphas_and_labels():
    assert grid.parse_alphas(" 0, 0.25,1,1.5 ,-0.5") == [0.0, 0.25, 1.0, 1.5, -0.5]
    assert [grid.format_alpha(a) for a in (0.0, 0.25, 1.0, 1.5, 0.1 + 0.2)] == [
        "0",
        "0.25",
        "1",
        "1.5",
        "0.30000000000000004",
    ]
    with pytest.raises(FttError, match="choose from embeddings, attention, mlp, norms"):
        grid.parse_kinds("attention,other")


def test_module_kinds_are_whole_path_components():
    kinds = {name: module_kind(name) for name in LLAMA_NAMES}
    assert kinds == {
        "model.embed_tokens.weight": "embeddings",
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "model.layers.0.mlp.up_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norms",
        "model.layers.0.post_attention_layernorm.weight": "norms",  # not attention
        "model.norm.weight": "norms",
        "lm_head.weight": "embeddings",
    }
    assert grid.module_filters(LLAMA_NAMES, "attention") == (".self_attn.",)
    assert grid.module_filters(LLAMA_NAMES, "norms") == (
        ".input_layernorm.",
        ".post_attention_layernorm.",
        ".norm.",
    )
    assert grid.module_filters(LLAMA_NAMES, "embeddings") == (".embed_tokens.", "lm_head.")
    # A filter that would also select another tensor falls back to the exact names.
    names = [*LLAMA_NAMES, "model.extra_mlp.weight", "model.x.mlp.weight"]
    assert grid.module_filters(names, "mlp") == (".mlp.",)
    clash = [*LLAMA_NAMES, "model.mlm_head.weight"]  # "lm_head." inside another name
    assert grid.module_filters(clash, "embeddings") == (
        "model.embed_tokens.weight",
        "lm_head.weight",
    )
    with pytest.raises(FttError, match="no tensor of this model is a mlp tensor"):
        grid.module_filters(["model.norm.weight"], "mlp")


def test_scaled_weights_keep_mergekits_meaning():
    assert grid.scale(0.8, 0.5) == 0.4
    assert grid.scale([0.0, 1.0, 2.0], 1.5) == [0.0, 1.5, 3.0]
    # One module kind: its filters first, the old setting (gradient kept) after.
    scaled = grid.scaled_weight([0.0, 1.0], 2.0, (".mlp.",), ["model.layers.0.mlp.up.weight"])
    assert scaled == [
        ConditionalParameter(filter=".mlp.", value=[0.0, 2.0]),
        ConditionalParameter(value=[0.0, 1.0]),
    ]
    # Filtered weights: each member tensor keeps the value its own condition gave it, × α.
    setting = [ConditionalParameter(filter="up", value=3.0), ConditionalParameter(value=1.0)]
    scaled = grid.scaled_weight(setting, 0.5, (".mlp.",), ["l.0.mlp.up", "l.0.mlp.down"])
    assert scaled == [
        ConditionalParameter(filter="l.0.mlp.up", value=1.5),
        ConditionalParameter(filter="l.0.mlp.down", value=0.5),
        *setting,
    ]


def test_effective_weight_follows_mergekits_lookup(tmp_path):
    from mergekit.config import MergeConfiguration

    recipe = MergeConfiguration.model_validate(
        {
            "merge_method": "finetuning_transfer",
            "base_model": "t",
            "parameters": {"weight": 0.7},
            "models": [
                {"model": "a", "parameters": {"role": "source_finetuned"}},
                {
                    "model": "b",
                    "parameters": {
                        "role": "source_finetuned",
                        "weight": [{"filter": "mlp", "value": 2.0}],  # no catch-all
                    },
                },
                {"model": "c", "parameters": {"role": "source_finetuned", "weight": 1.5}},
                {"model": "s", "parameters": {"role": "source_base"}},
            ],
        }
    )
    assert grid.effective_weight(recipe, 0) == 0.7  # the recipe's parameters
    assert grid.effective_weight(recipe, 1) == [
        ConditionalParameter(filter="mlp", value=2.0),
        ConditionalParameter(value=0.7),  # where no filter matches, mergekit moves on
    ]
    assert grid.effective_weight(recipe, 2) == 1.5
    assert grid.scaled_inputs(recipe) == [0, 1, 2]


def test_recipe_errors(tmp_path):
    other = tmp_path / "ties.yml"
    other.write_text("merge_method: ties\nbase_model: t\nmodels: [{model: a}]\n")
    with pytest.raises(FttError, match="uses merge_method 'ties'; ftt-sweep scales"):
        grid.load_recipe(other)
    with pytest.raises(FttError, match="no recipe file"):
        grid.load_recipe(tmp_path / "missing.yml")
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: [\n")
    with pytest.raises(FttError, match="is not valid YAML"):
        grid.load_recipe(broken)


# --- variants built in memory vs mergekit -------------------------------------------------


def write_recipe(path: Path, target, finetuned, source_base, **extra) -> Path:
    """``finetuned``: (model, weight setting) pairs."""
    models = [
        {"model": str(m), "parameters": {"role": "source_finetuned", "weight": w}}
        for m, w in finetuned
    ]
    models.append({"model": str(source_base), "parameters": {"role": "source_base"}})
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": models,
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def recipes(llama, tied_llama, tmp_path_factory) -> dict[str, Path]:
    """Recipes that take different planning paths: two deltas with a gradient, tied
    embeddings with filtered per-layer weights, extra vocabulary rows, and a float32
    fine-tune in a bfloat16 recipe (the preflight merges at float32, writes bfloat16)."""
    from mergekit_ftt.tiny import save_random_model, tiny_config

    folder = tmp_path_factory.mktemp("recipes")
    tokenizer = llama.tokenizer
    ft_float32 = save_random_model(
        tiny_config("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id),
        folder / "ft_float32",
        seed=9,
        tokenizer=tokenizer,
        dtype="float32",
    )
    target, base = llama.model("target", 1), llama.model("source_base", 2)
    ft_a, ft_b = llama.model("ft_a", 3), llama.model("ft_b", 4)
    ft_extra = llama.model("ft_extra_vocab", 5, extra_vocab=True)
    tied = [tied_llama.model(name, seed) for name, seed in (("t", 6), ("s", 7), ("f", 8))]
    return {
        "two_deltas": write_recipe(
            folder / "two.yml", target, [(ft_a, 1.0), (ft_b, [0.5, 1.5])], base
        ),
        "tied_filtered": write_recipe(
            folder / "tied.yml",
            tied[0],
            [(tied[2], [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.75}])],
            tied[1],
        ),
        "extra_vocab": write_recipe(
            folder / "vocab.yml",
            target,
            [(ft_extra, 1.0)],
            base,
            tokenizer={"source": str(ft_extra)},
        ),
        "float32_input": write_recipe(folder / "f32.yml", target, [(ft_float32, 1.0)], base),
    }


def variants_of(recipe_path: Path, alphas, kinds) -> tuple[list[grid.Variant], build.SweepPlan]:
    recipe = grid.load_recipe(recipe_path)
    plan = build.SweepPlan(recipe, build.merge_options())
    names = [task.tensor_name for task in plan.base.save_tasks]
    return grid.make_variants(recipe, alphas, kinds, names), plan


def mergekit_output(
    plan: build.SweepPlan, variant: grid.Variant, folder: Path
) -> dict[str, torch.Tensor]:
    """The variant written by mergekit's run_merge (what mergekit-yaml calls)."""
    plan.write(variant, folder, variant.to_yaml(Path("x")))
    return load_weights(folder)


CASES = {
    "two_deltas": ([0.0, 0.5, 1.0, 1.25], ["attention", "mlp", "embeddings"]),
    "tied_filtered": ([0.25, 1.5], ["attention", "mlp"]),
    "extra_vocab": ([0.0, 1.5], ["embeddings"]),
    "float32_input": ([0.5], ["mlp"]),
}


@pytest.mark.parametrize("case", CASES)
def test_in_memory_variants_equal_mergekit_from_one_read(case, recipes, tmp_path):
    alphas, kinds = CASES[case]
    variants, plan = variants_of(recipes[case], alphas, kinds)
    built = {}
    with build.read_once(plan.base.recipe.referenced_models(), plan.base.options) as loaders:
        for variant in [*variants, variants[0]]:  # the first again: inputs left intact
            built.setdefault(variant.label, []).append(dict(plan.tensors(variant)))
    for loader in loaders.values():  # every input tensor read from disk exactly once
        assert loader.reads == len(loader.index.tensor_paths)
    for variant in variants:
        written = mergekit_output(plan, variant, tmp_path / variant.label)
        (in_memory, *again) = built[variant.label]
        assert in_memory.keys() == written.keys(), variant.label
        for name, tensor in written.items():
            assert torch.equal(in_memory[name], tensor), (variant.label, name)
            assert in_memory[name].dtype == tensor.dtype
        for repeat in again:
            assert all(torch.equal(repeat[n], t) for n, t in in_memory.items())


def test_alpha_scales_the_delta_on_the_chosen_tensors(recipes):
    """An independent check of what the variants mean: α = 0 gives the target back
    exactly; mlp@0 is the target on MLP tensors and all@1 everywhere else."""
    variants, plan = variants_of(recipes["two_deltas"], [0.0, 1.0], ["mlp"])
    out = {v.label: dict(plan.tensors(v)) for v in variants}
    target = load_weights(Path(str(plan.base.recipe.base_model.model.path)))
    for name, tensor in out["all@0"].items():
        assert torch.equal(tensor, target[name]), name
    for name, tensor in out["mlp@0"].items():
        expected = target[name] if ".mlp." in name else out["all@1"][name]
        assert torch.equal(tensor, expected), name
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(out["all@1"][name], target[name])  # the checks above bite


def test_planned_weights_are_checked(recipes):
    variants, plan = variants_of(recipes["tied_filtered"], [0.5], ["attention"])
    unscaled = build.planned_weights(plan.base.save_tasks)
    scaled = [str(plan.base.recipe.models[0].model)]
    for variant in variants:
        plan.check_weights(variant, scaled)
    # The gradient inside the filtered weights is kept: layer 0 and 1 of self_attn differ.
    attention = {k: v for k, v in unscaled.items() if ".self_attn." in k[0]}
    assert sorted(set(attention.values())) == [0.0, 1.0]
    wrong = grid.Variant("mlp", 0.5, variants[1].recipe)  # attention@0.5 claimed as mlp
    with pytest.raises(FttError, match=r"variant mlp@0.5: mergekit would give .* weight"):
        plan.check_weights(wrong, scaled)


@pytest.mark.slow
def test_recipes_run_by_mergekit_yaml_equal_the_in_memory_variants(recipes, tmp_path):
    """The recipe files a sweep writes, run by the real mergekit-yaml."""
    for case, kind, alpha in (("two_deltas", "embeddings", 1.25), ("tied_filtered", "mlp", 1.5)):
        variants, plan = variants_of(recipes[case], [alpha], [kind])
        variant = next(v for v in variants if v.kind == kind)
        recipe_file = tmp_path / f"{variant.label}.yml"
        recipe_file.write_text(variant.to_yaml(recipes[case]))
        result = run_cli("mergekit-yaml", str(recipe_file), str(tmp_path / variant.label))
        assert result.returncode == 0, result.stderr
        written = load_weights(tmp_path / variant.label)
        in_memory = dict(plan.tensors(variant))
        assert written.keys() == in_memory.keys()
        assert all(torch.equal(in_memory[n], t) for n, t in written.items()), case


@pytest.mark.parametrize("case", ["extra_vocab", "tied_filtered"])
def test_in_memory_model_is_what_from_pretrained_loads(case, recipes, tmp_path):
    """Config, tokenizer, generation config and float32 weights of the in-memory model
    equal those transformers loads from mergekit's output folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    variants, plan = variants_of(recipes[case], [1.5], [])
    (variant,) = variants
    written = tmp_path / "written"
    mergekit_output(plan, variant, written)
    files = tmp_path / "files"
    plan.write_model_files(files)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        if (written / name).exists() or (files / name).exists():
            assert json.loads((files / name).read_text()) == json.loads(
                (written / name).read_text()
            )
    model = build.InMemoryModel(files, "cpu", "float32", trust_remote_code=False)
    model.load(plan.tensors(variant))
    loaded = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32)
    expected = loaded.state_dict()
    actual = model.model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[n], t) for n, t in expected.items())
    assert model.model.generation_config.to_dict() == loaded.generation_config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(written)
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert model.tokenizer.chat_template == tokenizer.chat_template


def test_the_preflight_checks_a_sweep_once(recipes, tmp_path):
    """Variants differ only in weights: the preflight (which reads every checkpoint's
    headers) runs once per sweep, and each variant is planned by mergekit once, for the
    check of its weights, its tensors and its folder alike. A profiler counts the real
    calls."""
    from mergekit_ftt import mergekit_adapter, preflight

    watched = {
        preflight.check_inputs.__code__: "preflight",
        mergekit_adapter.plan_save_tasks.__code__: "plan",
    }
    calls = []

    def watch(frame, event, _argument):
        if event == "call" and frame.f_code in watched:
            calls.append(watched[frame.f_code])

    sys.setprofile(watch)
    try:
        variants, plan = variants_of(recipes["two_deltas"], [0.0, 0.5, 1.0], ["mlp"])
        scaled = [str(model.model) for model in plan.base.recipe.models[:2]]  # ft_a, ft_b
        for variant in variants:
            plan.check_weights(variant, scaled)
            dict(plan.tensors(variant))
        mergekit_output(plan, variants[1], tmp_path / "written")
    finally:
        sys.setprofile(None)
    assert calls.count("preflight") == 1
    assert calls.count("plan") == 1 + len(variants)  # the recipe's, then one per variant
    weights = [build.planned_weights(plan.variant(v).save_tasks) for v in variants]
    assert weights[0] != weights[1]  # each variant still gets its own weights


@pytest.mark.slow
def test_a_sweep_over_a_stored_delta_equals_mergekit(llama, tmp_path):
    """A recipe with `role: delta` (a folder from ftt-delta extract): each variant built in
    memory, and each written to disk by the sweep, equals the one the real mergekit-yaml
    command writes from the variant's recipe file, bit for bit."""
    recipe_path = stored_delta_recipe(llama, tmp_path)
    variants, plan = variants_of(recipe_path, [0.5, 1.5], ["mlp"])
    memory = build.memory_plan(plan.base.recipe, plan.base.options, "auto", "hf", "cpu", 4)
    assert memory.input_bytes > 0
    for variant in variants[:2]:
        variant_recipe = tmp_path / f"{variant.label}.yml"
        variant_recipe.write_text(variant.to_yaml(recipe_path))
        result = run_cli("mergekit-yaml", str(variant_recipe), str(tmp_path / variant.label))
        assert result.returncode == 0, result.stderr
        written = load_weights(tmp_path / variant.label)
        in_memory = dict(plan.tensors(variant))
        assert written.keys() == in_memory.keys()
        assert all(torch.equal(in_memory[n], t) for n, t in written.items()), variant.label
        on_disk = mergekit_output(plan, variant, tmp_path / f"disk-{variant.label}")
        assert all(torch.equal(on_disk[n], t) for n, t in written.items()), variant.label
