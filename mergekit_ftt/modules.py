"""Module kinds: which part of a transformer a tensor belongs to, from its name.

One classification for every command, so that ``ftt-inspect``'s per-kind statistics,
``ftt-sweep --modules`` and ``ftt-delta info`` agree on every tensor. A kind is decided by
whole components of the dotted name (``model.layers.0.self_attn.q_proj.weight`` →
``self_attn``), never by substrings (``extra_mlp`` is not an MLP), checked in this order:

1. embeddings (``embed_tokens``, ``lm_head``, …);
2. norms: a component that contains ``norm`` or starts with ``ln_`` — before attention, so
   that OLMo 2's ``self_attn.q_norm`` is a norm, as are ``post_attention_layernorm`` and
   the final ``norm``;
3. attention, then mlp;
4. other.
"""

from __future__ import annotations

import re

KINDS = ("embeddings", "attention", "mlp", "norms", "other")

_COMPONENTS: dict[str, frozenset[str]] = {
    "embeddings": frozenset(
        {"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings"}
    ),
    "attention": frozenset(
        {"self_attn", "attn", "attention", "self_attention", "q_proj", "k_proj", "v_proj"}
        | {"o_proj"}
    ),
    "mlp": frozenset(
        {"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "gate_proj", "up_proj"}
        | {"down_proj"}
    ),
}
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


def _is_norm(component: str) -> bool:
    return "norm" in component or component.startswith("ln_")


def kind_component(name: str) -> tuple[str, int | None]:
    """The kind of tensor ``name`` and the index of the name component that decides it
    (None for ``other``)."""
    components = name.split(".")
    checks = (
        ("embeddings", _COMPONENTS["embeddings"].__contains__),
        ("norms", _is_norm),
        ("attention", _COMPONENTS["attention"].__contains__),
        ("mlp", _COMPONENTS["mlp"].__contains__),
    )
    for kind, matches in checks:
        for index, component in enumerate(components):
            if matches(component):
                return kind, index
    return "other", None


def module_kind(name: str) -> str:
    """embeddings, attention, mlp, norms or other (see the module's docstring)."""
    return kind_component(name)[0]


def kind_description(kind: str) -> str:
    """What the names of ``kind``'s tensors contain, for messages."""
    if kind == "norms":
        return "a path component containing 'norm' or starting with 'ln_'"
    if kind == "other":
        return "no component of another kind"
    return "path components " + ", ".join(sorted(_COMPONENTS[kind]))


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None (embeddings, final norm)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_path(name: str) -> str:
    """The tensor's name with its layer index as ``*``:
    ``model.layers.7.self_attn.q_proj.weight`` → ``layers.*.self_attn.q_proj.weight``."""
    return _ANY_INDEX.sub(".*.", name, count=1).removeprefix("model.")
