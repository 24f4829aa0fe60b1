"""Model cards (README.md with Hub metadata) for transfer outputs and delta folders.

mergekit's own card lists every input as "models included" with ``base_model: []`` when
the inputs are local, and nothing about roles or weights. A transfer's lineage is its
target: the card says so in ``base_model:`` (the Hub then lists the output under the
target's "finetunes/merges") and gives, per delta, the fine-tuned model and the base it was
measured against, its weight α, and where the tokenizer came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mergekit_ftt import METHOD_NAME, PAPER_URL

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration

    from mergekit_ftt.delta.format import DeltaConfig

PROJECT_URL = "https://github.com/arcee-ai/mergekit"


def hub_id(model: str) -> str | None:
    """``model`` if it names a Hub repository rather than a local folder (no network)."""
    from mergekit_ftt.sources import hub_id as repository

    return repository(model.split("@", 1)[0])


def _metadata(base_models: Iterable[str], tags: list[str], library: str | None) -> str:
    """The card's YAML header; ``library``: what loads the folder (None: no library does)."""
    hub = list(dict.fromkeys(filter(None, map(hub_id, base_models))))
    data: dict = {}
    if hub:
        data["base_model"] = hub
    if library is not None:
        data["library_name"] = library
    data["tags"] = tags
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).strip()


def _link(model: str) -> str:
    repo = hub_id(model)
    return f"[{model}](https://huggingface.co/{repo})" if repo else f"`{model}`"


def _model_link(model) -> str:
    """A recipe's model (a ``ModelReference``), its LoRA adapter included."""
    if model.lora is None:
        return _link(str(model.model))
    return f"{_link(str(model.model))} with the LoRA adapter {_link(str(model.lora))}"


# --- transfer outputs -------------------------------------------------------------------


def transfer_card(config: MergeConfiguration, config_yaml: str, name: str) -> str:
    """The card of a ``finetuning_transfer`` output."""
    from mergekit_ftt.delta.format import is_delta_folder, read_config
    from mergekit_ftt.preflight.recipe import model_entries

    target = str(config.base_model.model) if config.base_model else "?"
    source_base = next(
        (
            _model_link(m)
            for m, p in model_entries(config)
            if (p or {}).get("role") == "source_base"
        ),
        "`?`",
    )
    rows, rounded_deltas = [], []
    for model, parameters in model_entries(config):
        parameters = parameters or {}
        role, alpha = parameters.get("role"), _alpha(parameters.get("weight", 1.0))
        path = str(model.model)
        if role == "source_finetuned":
            rows.append(f"| {_model_link(model)} − {source_base} | {alpha} | the two models |")
        elif role == "delta":
            local = _local(model)
            if local is not None and is_delta_folder(local):
                delta = read_config(local)
                if not (delta.encoding.kind == "dense" and delta.encoding.exact):
                    rounded_deltas.append(path)
                rows.append(
                    f"| {_link(delta.finetuned.model)} − {_link(delta.base.model)} | {alpha} | "
                    f"delta folder {_link(path)} ({_encoding_text(delta)}) |"
                )
            else:
                rows.append(f"| delta folder {_link(path)} | {alpha} | |")
    tokenizer = _tokenizer_text(config)
    lines = [
        "---",
        _metadata(
            [target], ["mergekit", "merge", "mergekit-ftt", "finetuning-transfer"], "transformers"
        ),
        "---",
        f"# {name}",
        "",
        f"This model is {_link(target)} plus the fine-tuning delta(s) below, merged with the "
        f"[Fine-tuning Transfer]({PAPER_URL}) method (Lin et al., 2025; `{METHOD_NAME}` from "
        f"mergekit-ftt) using [mergekit]({PROJECT_URL}). Every tensor is target + Σ α · "
        f"(fine-tuned − its base), computed in float64 and {_rounding_text(config)}."
        + "".join(
            f" The delta folder {_link(path)} stores Δ already rounded, so its part is rounded "
            "twice in all."
            for path in rounded_deltas
        ),
        "",
        f"- **Target (base model):** {_link(target)}",
        f"- **Tokenizer and chat template:** {tokenizer}",
        "",
        "| delta (fine-tuned − its base) | α | read from |",
        "|---|---|---|",
        *rows,
        "",
        "### Configuration",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _rounding_text(config: MergeConfiguration) -> str:
    """How the float64 sum reaches the written dtype: straight (once), or through the
    method's ``output_dtype`` and then mergekit's cast to ``out_dtype`` (twice)."""
    written = config.out_dtype or config.dtype
    kernel = (config.parameters or {}).get("output_dtype") or config.dtype
    if written is None:
        return "rounded once to the inputs' dtype"
    if kernel is None or kernel == written:
        return f"rounded once to {written}"
    return f"rounded twice: to {kernel} by the method, then to {written} by mergekit"


def _alpha(weight) -> str:
    if isinstance(weight, int | float):
        return f"{weight:g}"
    return "per layer (see the configuration)"


def _local(model) -> str | None:
    path = str(model.model.path)
    return path if os.path.isdir(path) else None


def _tokenizer_text(config: MergeConfiguration) -> str:
    source = None
    if config.tokenizer is not None:
        source = config.tokenizer.source
    elif config.tokenizer_source is not None:
        source = config.tokenizer_source
    if source is None:
        return f"copied from the target {_link(str(config.base_model.model))}"
    if isinstance(source, str):
        return f"mergekit's `{source}` vocabulary"
    text = f"from {_link(str(source.model))}"
    if config.chat_template:
        text += f"; chat template `{config.chat_template}`"
    return text + " (generation config too)"


# --- delta folders ----------------------------------------------------------------------


def _encoding_text(delta: DeltaConfig) -> str:
    encoding = delta.encoding
    if encoding.kind == "dense":
        return f"dense {encoding.dtype}, {'exact' if encoding.exact else 'rounded'}"
    if encoding.kind == "sparse":
        method = "DARE" if encoding.method == "random" else "magnitude"
        return f"sparse {method}, density {encoding.density:g}, {encoding.dtype} values"
    return f"1-bit sign, a scale per {encoding.scale}"


def delta_card(delta: DeltaConfig, name: str) -> str:
    """The card of a delta folder."""
    finetuned, base = delta.finetuned, delta.base
    recipe = RECIPE_TEMPLATE.format(name=name, dtype=delta.encoding.dtype)
    exactness = {
        True: "bit-identical to a transfer from the two models",
        False: "approximate; the reconstruction error is below",
    }[delta.encoding.kind == "dense" and delta.encoding.exact]
    vocabulary = (
        f"{len(delta.vocabulary.added_tokens)} tokens only the fine-tuned model has are stored "
        f"as its full rows: {', '.join(delta.vocabulary.added_tokens[:8])}"
        + (" …" if len(delta.vocabulary.added_tokens) > 8 else "")
        if delta.vocabulary.added_tokens
        else "the same vocabulary rows as the base"
    )
    lines = [
        "---",
        # No library_name: transformers cannot load a delta folder; mergekit-yaml applies it.
        _metadata(
            [finetuned.model, base.model], ["mergekit-ftt", "delta", "finetuning-transfer"], None
        ),
        "---",
        f"# {name}",
        "",
        f"A fine-tuning delta Δ = {_link(finetuned.model)} − {_link(base.model)}, extracted "
        "with mergekit-ftt's `ftt-delta extract`. Added to another base model of the same "
        f"architecture ({delta.model_type}, {', '.join(delta.architectures)}), it transfers "
        f"the fine-tuning without training ([fine-tuning transfer]({PAPER_URL}), Lin et al., "
        "2025). The folder also holds the fine-tuned model's tokenizer, chat template and "
        "generation config.",
        "",
        "| | |",
        "|---|---|",
        f"| fine-tuned model | {_source_text(finetuned)} |",
        f"| its base | {_source_text(base)} |",
        f"| stored as | {_encoding_text(delta)}; {format_bytes(delta.stored_bytes)} in "
        f"{len(delta.files)} file(s) |",
        f"| applying it is | {exactness} |",
        f"| vocabulary | {vocabulary} |",
        "",
        "## Apply it with mergekit",
        "",
        "```yaml",
        recipe,
        "```",
        "",
        "`mergekit-yaml recipe.yml OUT` with mergekit-ftt installed; `weight` is α. "
        "`ftt-delta info` shows what the folder holds.",
        "",
        "## Reconstruction error by module",
        "",
        "‖decoded Δ − Δ‖ / ‖Δ‖ over all layers:",
        "",
        "| module | tensors | relative error |",
        "|---|---:|---:|",
        *(f"| {row[0]} | {row[1]} | {row[2]:.3g} |" for row in delta.module_errors()),
        "",
    ]
    return "\n".join(lines)


RECIPE_TEMPLATE = """merge_method: finetuning_transfer
base_model: TARGET           # a model of the same architecture as the fine-tune's base
dtype: {dtype}
models:
  - model: {name}
    parameters: {{role: delta, weight: 1.0}}   # weight = α
tokenizer:
  source: {name}             # the fine-tuned model's tokenizer and chat template"""


def format_bytes(count: int) -> str:
    """A byte count in GB, MB or kB (decimal), as the cards and ``ftt-delta info`` print it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} bytes"


def _source_text(source) -> str:
    parts = [_link(source.model)]
    if source.revision:
        parts.append(f"revision `{source.revision}`")
    if source.commit:
        parts.append(f"commit `{source.commit}`")
    if source.weights_sha256:
        parts.append(f"weights sha256 `{source.weights_sha256[:16]}…`")
    parts.append(source.dtype)
    return ", ".join(parts)


def write_transfer_card(
    config: MergeConfiguration, out_path: str | Path, name: str | None = None
) -> None:
    """Replace mergekit's README.md in ``out_path`` with the transfer card (if it wrote one);
    ``name`` is the model's name in the card (default: the folder's)."""
    out = Path(out_path)
    readme, recipe = out / "README.md", out / "mergekit_config.yml"
    if config.merge_method != METHOD_NAME or not readme.exists():
        return
    config_yaml = recipe.read_text(encoding="utf-8") if recipe.exists() else config.to_yaml()
    readme.write_text(transfer_card(config, config_yaml, name or out.name), encoding="utf-8")
