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
    """The tokenizer, chat template and end-of-turn tokens the output will have, with notes
    where they differ from the fine-tuned model's (whose format the delta learned).

    mergekit copies the target's tokenizer files (with its generation_config.json) when
    the recipe has no tokenizer section; with ``tokenizer: {source: MODEL}`` it saves that
    model's tokenizer and mergekit-ftt copies its generation config; ``tokenizer: {source:
    base | union}`` builds on the target's tokenizer; a ``chat_template:`` key replaces the
    template either way.
    """
    config = recipe.config
    labelled = roles(recipe)
    source = config.tokenizer.source if config.tokenizer else config.tokenizer_source
    if isinstance(source, ModelReference):
        tokenizer_from = _role_of(source, labelled)
        tokenizer = tokenizers.get(tokenizer_from) or load_tokenizer(source, options)
        generation_from = source
    else:
        tokenizer_from, tokenizer = source or "target", tokenizers.get("target")
        generation_from = labelled["target"] if source is None else None
    template = config.chat_template or (tokenizer.chat_template if tokenizer else None)
    if isinstance(template, dict):
        template = template.get("default")
    eos_ids = _end_of_turn_ids(generation_from, tokenizer, options)
    output = {
        "tokenizer_from": tokenizer_from,
        "chat_template": template,
        "chat_template_from": "recipe" if config.chat_template else tokenizer_from,
        "generation_config_from": _role_of(generation_from, labelled),
        "end_of_turn_ids": eos_ids,
        "end_of_turn_tokens": [
            tokenizer.convert_ids_to_tokens(i) if tokenizer else None for i in eos_ids
        ],
    }
    return {**output, "notes": _chat_notes(output, labelled, tokenizers, options)}


def _end_of_turn_ids(model: ModelReference | None, tokenizer, options: MergeOptions) -> list:
    """The generation config's ``eos_token_id`` (one or several), else the tokenizer's."""
    ids = _generation_config(model, options).get("eos_token_id") if model else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    return [] if ids is None else ids if isinstance(ids, list) else [ids]


def _chat_notes(output: dict, labelled: dict, tokenizers: dict, options: MergeOptions) -> list:
    finetuned = tokenizers.get("source_finetuned")
    if finetuned is None:
        return []
    notes = []
    if finetuned.chat_template and not output["chat_template"]:
        notes.append(
            "the output will have no chat template, while the fine-tuned model has one "
            "(its delta learned that format): add `tokenizer: {source: "
            f"{labelled['source_finetuned']}}}` to the recipe"
        )
    elif finetuned.chat_template and output["chat_template"] != finetuned.chat_template:
        notes.append(
            "the output's chat template differs from the fine-tuned model's, whose format "
            "the delta learned"
        )
    finetuned_ids = _end_of_turn_ids(labelled["source_finetuned"], finetuned, options)
    finetuned_tokens = [finetuned.convert_ids_to_tokens(i) for i in finetuned_ids]
    if set(finetuned_tokens) - set(output["end_of_turn_tokens"]):
        stops = ", ".join(map(str, output["end_of_turn_tokens"])) or "nothing"
        notes.append(
            f"the fine-tuned model ends a turn with {', '.join(finetuned_tokens)} but the "
            f"output stops on {stops}: generation may run past the end of a reply"
        )
    return notes


def _role_of(model: ModelReference | None, labelled: dict) -> str | None:
    if model is None:
        return None
    return next((role for role, m in labelled.items() if m == model), str(model))


def _generation_config(model: ModelReference, options: MergeOptions) -> dict:
    path = Path(model.local_path(cache_dir=options.transformers_cache)) / "generation_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
