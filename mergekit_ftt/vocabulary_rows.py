"""How many embedding rows a transfer writes when its tokenizer comes from another model.

With ``tokenizer: {source: MODEL}`` mergekit writes one embedding row per token of MODEL's
tokenizer. Models such as OLMo 2 pad their embedding matrices past the tokenizer (the
config's ``vocab_size`` of 100352 for 100278 tokens), so the output would silently lose
the padding rows, and the next round's delta (``ftt-iterate``) would no longer match it.
By default a transfer keeps the row count of the model whose tokenizer it takes: when
the recipe leaves ``pad_to_multiple_of`` unset, it is set to the smallest multiple that
rounds the tokenizer's length up to that model's rows. mergekit fills padding rows with
the mean of the token rows; no token ever reads them.
"""

from __future__ import annotations

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME


def padding_multiple(rows: int, tokens: int) -> int | None:
    """The smallest ``m`` with ``ceil(tokens / m) · m == rows``; None without padding rows."""
    if not 0 < tokens < rows:
        return None
    return next(m for m in range(rows - tokens + 1, rows + 1) if rows % m == 0)


def _tokenizer_length(model: ModelReference, options: MergeOptions) -> int:
    from transformers import AutoTokenizer

    path = model.local_path(cache_dir=options.transformers_cache, ignore_lora=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    return len(tokenizer)


def _rows(model: ModelReference, options: MergeOptions) -> int | None:
    config = model.config(trust_remote_code=options.trust_remote_code)
    return getattr(config.get_text_config(), "vocab_size", None)


def plan_rows(
    config: MergeConfiguration, options: MergeOptions
) -> tuple[MergeConfiguration, str | None]:
    """The configuration to run, with ``pad_to_multiple_of`` chosen when the recipe leaves
    it unset, and one line when the output's rows differ from the target's."""
    tokenizer = config.tokenizer
    if (
        config.merge_method != METHOD_NAME
        or tokenizer is None
        or not isinstance(tokenizer.source, ModelReference)
        or config.base_model is None
    ):
        return config, None
    donor = tokenizer.source
    donor_rows, tokens = _rows(donor, options), _tokenizer_length(donor, options)
    multiple = tokenizer.pad_to_multiple_of
    chosen = ""
    if multiple is None and donor_rows is not None:
        multiple = padding_multiple(donor_rows, tokens)
        if multiple is not None:
            config = config.model_copy(
                update={"tokenizer": tokenizer.model_copy(update={"pad_to_multiple_of": multiple})}
            )
            chosen = (
                f", keeping the {donor_rows - tokens} padding rows of {donor} "
                f"(pad_to_multiple_of: {multiple} chosen; set it in `tokenizer:` to choose)"
            )
    rows = -(-tokens // multiple) * multiple if multiple else tokens
    target_rows = _rows(config.base_model, options)
    if target_rows is None or rows == target_rows:
        return config, None
    change = "adds" if rows > target_rows else "drops"
    return config, (
        f"the output has {rows} embedding rows ({tokens} tokens of {donor}'s tokenizer"
        f"{chosen}), the target {target_rows}: the transfer {change} "
        f"{abs(rows - target_rows)} rows."
    )
