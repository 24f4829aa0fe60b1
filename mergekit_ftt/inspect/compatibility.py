"""What the merge will make of its inputs besides the arithmetic: architecture, tensors,
stored dtypes, vocabularies by token string, and the output's chat template and
end-of-turn tokens.

Errors (a missing role, different architectures or shapes, missing tensors) are the
preflight's and stop before this runs (:mod:`mergekit_ftt.inspect.recipe`); this module
reports what is allowed but worth knowing, with a note where the merge will not do what
a user of an instruct delta expects.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from mergekit_ftt.inspect.checkpoint import Checkpoint
from mergekit_ftt.inspect.recipe import Recipe

_EXAMPLES = 5


def roles(recipe: Recipe) -> dict[str, ModelReference]:
    """Every input model under a role label: target, source_base, source_finetuned[, _2 …]."""
    inputs = recipe.inputs
    target, source_base, finetuned = inputs.target, inputs.source_base, inputs.source_finetuned
    labelled = {"target": target, "source_base": source_base}
    for index, model in enumerate(finetuned):
        labelled["source_finetuned" + (f"_{index + 1}" if index else "")] = model
    return labelled


def architecture(recipe: Recipe, options: MergeOptions) -> dict:
    def describe(model: ModelReference) -> dict:
        config = model.config(trust_remote_code=options.trust_remote_code)
        text = config.get_text_config()
        return {
            "model_type": config.model_type,
            "architectures": list(config.architectures or []),
            "layers": getattr(text, "num_hidden_layers", None),
            "hidden_size": getattr(text, "hidden_size", None),
            "vocab_size": getattr(text, "vocab_size", None),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        }

    return {role: describe(model) for role, model in roles(recipe).items()}


def tensors(recipe: Recipe, checkpoints: dict[ModelReference, Checkpoint]) -> dict:
    """The tensors the merge writes, where each input's copy comes from, its stored dtype
    and rows, and the tensors of each input the merge does not read."""
    per_role: dict[str, dict] = {}
    for role, model in roles(recipe).items():
        checkpoint = checkpoints[model]
        used, dtypes, substituted, rows = set(), Counter(), [], {}
        for planned in recipe.tensors:
            source = next(s for s in _sources(planned) if s.model == model)
            name = checkpoint.resolve(source)
            used.add(name)
            dtypes[checkpoint.dtype(name)] += 1
            if name != planned.name:
                substituted.append(f"{planned.name} ← {name}")
            if planned.vocabulary_axis == 0:
                rows[planned.name] = checkpoint.shape(name)[0]
        unused = sorted(set(checkpoint.names) - used)
        per_role[role] = {
            "stored_dtypes": dict(dtypes),
            "read_under_another_name": substituted,
            "not_merged": {"count": len(unused), "examples": unused[:_EXAMPLES]},
            "vocabulary_rows": rows,
        }
    return {"count": len(recipe.tensors), "inputs": per_role}


def _sources(planned):
    return (planned.target, planned.source_base, *(source for source, _ in planned.finetuned))


def load_tokenizer(model: ModelReference, options: MergeOptions):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            model.model.path,
            revision=model.model.revision,
            trust_remote_code=options.trust_remote_code,
        )
    except (OSError, ValueError):
        return None


def vocabulary(recipe: Recipe, tokenizers: dict) -> dict:
    """Sizes and overlap of the inputs' vocabularies by token string."""
    vocabs = {role: tok.get_vocab() for role, tok in tokenizers.items() if tok is not None}
    report: dict = {
        "sizes": {role: len(vocab) for role, vocab in vocabs.items()},
        "missing_tokenizer": sorted(role for role, tok in tokenizers.items() if tok is None),
        "pairs": [],
    }
    role_names = list(vocabs)
    for i, first in enumerate(role_names):
        for second in role_names[i + 1 :]:
            a, b = vocabs[first], vocabs[second]
            shared = a.keys() & b.keys()
            only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
            report["pairs"].append(
                {
                    "models": [first, second],
                    "shared": len(shared),
                    "same_id": sum(1 for token in shared if a[token] == b[token]),
                    f"only_in_{first}": {"count": len(only_a), "examples": only_a[:_EXAMPLES]},
                    f"only_in_{second}": {"count": len(only_b), "examples": only_b[:_EXAMPLES]},
                }
            )
    return report


def aligned_rows(tokenizers: dict, rows: int) -> torch.Tensor | None:
    """Rows 0..rows-1 that hold the same token string in every input's tokenizer."""
    if any(tok is None for tok in tokenizers.values()) or not tokenizers:
        return None
    mask = torch.ones(rows, dtype=torch.bool)
    by_id = []
    for tok in tokenizers.values():
        table = [None] * rows
        for token, index in tok.get_vocab().items():
            if index < rows:
                table[index] = token
        by_id.append(table)
    for index in range(rows):
        tokens = {table[index] for table in by_id}
        mask[index] = len(tokens) == 1 and None not in tokens
    return mask


def chat(recipe: Recipe, tokenizers: dict, options: MergeOptions) -> dict:
    """The tokenizer, chat template and end-of-turn tokens the output will have.

    mergekit copies the target's tokenizer files (with its generation_config.json) when
    the recipe has no tokenizer section; with ``tokenizer: {source: MODEL}`` it saves that
    model's tokenizer and mergekit-ftt copies its generation config; a ``chat_template:``
    key replaces the template either way.
    """
    config = recipe.config
    labelled = roles(recipe)
    source = config.tokenizer.source if config.tokenizer else config.tokenizer_source
    if isinstance(source, ModelReference):
        donor_role = next((r for r, m in labelled.items() if m == source), str(source))
        tokenizer = tokenizers.get(donor_role) or load_tokenizer(source, options)
        generation_from = source
    else:  # None, "base" or "union": built on the target's tokenizer
        donor_role, tokenizer, generation_from = "target", tokenizers.get("target"), None
        if source is None:
            generation_from = labelled["target"]
    template = config.chat_template or (tokenizer.chat_template if tokenizer else None)
    if isinstance(template, dict):
        template = template.get("default")
    generation = _generation_config(generation_from, options) if generation_from else {}
    eos_ids = generation.get("eos_token_id")
    if eos_ids is None and tokenizer is not None:
        eos_ids = tokenizer.eos_token_id
    eos_ids = [] if eos_ids is None else eos_ids if isinstance(eos_ids, list) else [eos_ids]
    tokens = [tokenizer.convert_ids_to_tokens(i) if tokenizer else None for i in eos_ids]
    report = {
        "tokenizer_from": donor_role
        if isinstance(source, ModelReference)
        else (source or "target"),
        "chat_template": template,
        "chat_template_from": "recipe" if config.chat_template else donor_role,
        "generation_config_from": _role_of(generation_from, labelled),
        "end_of_turn_ids": eos_ids,
        "end_of_turn_tokens": tokens,
        "notes": [],
    }
    finetuned = tokenizers.get("source_finetuned")
    if finetuned is not None:
        finetuned_template = finetuned.chat_template
        if finetuned_template and not template:
            report["notes"].append(
                "the output will have no chat template, while the fine-tuned model has one "
                "(its delta learned that format): add `tokenizer: {source: "
                f"{labelled['source_finetuned']}}}` to the recipe"
            )
        elif finetuned_template and template != finetuned_template:
            report["notes"].append(
                "the output's chat template differs from the fine-tuned model's, whose format "
                "the delta learned"
            )
        finetuned_eos = _generation_config(labelled["source_finetuned"], options).get(
            "eos_token_id", finetuned.eos_token_id
        )
        finetuned_eos = finetuned_eos if isinstance(finetuned_eos, list) else [finetuned_eos]
        finetuned_tokens = [finetuned.convert_ids_to_tokens(i) for i in finetuned_eos]
        if set(finetuned_tokens) - set(tokens):
            report["notes"].append(
                f"the fine-tuned model ends a turn with {', '.join(finetuned_tokens)} but the "
                f"output stops on {', '.join(map(str, tokens)) or 'nothing'}: generation may "
                "run past the end of a reply"
            )
    return report


def _role_of(model: ModelReference | None, labelled: dict) -> str | None:
    if model is None:
        return None
    return next((role for role, m in labelled.items() if m == model), str(model))


def _generation_config(model: ModelReference, options: MergeOptions) -> dict:
    path = Path(model.local_path(cache_dir=options.transformers_cache)) / "generation_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
