"""One module-kind classification, shared by ftt-inspect, ftt-sweep and ftt-delta info."""

from __future__ import annotations

import pytest

from mergekit_ftt.modules import KINDS, layer_index, module_kind, module_path
from mergekit_ftt.sweep import grid

NAMES = {
    "model.embed_tokens.weight": "embeddings",
    "lm_head.weight": "embeddings",
    "transformer.wte.weight": "embeddings",
    "model.layers.3.self_attn.q_proj.weight": "attention",
    "model.layers.3.self_attn.o_proj.weight": "attention",
    "transformer.h.2.attn.c_attn.weight": "attention",
    "model.layers.3.self_attn.q_norm.weight": "norms",  # OLMo 2: a norm inside attention
    "model.layers.3.self_attn.k_norm.weight": "norms",
    "model.layers.3.input_layernorm.weight": "norms",
    "model.layers.3.post_attention_layernorm.weight": "norms",
    "model.layers.3.post_feedforward_layernorm.weight": "norms",
    "transformer.h.2.ln_1.weight": "norms",
    "model.norm.weight": "norms",
    "model.layers.3.mlp.gate_proj.weight": "mlp",
    "model.layers.3.block_sparse_moe.experts.0.w1.weight": "mlp",
    "model.extra_mlp.weight": "other",  # whole components only: not an MLP
    "model.rotary_emb.inv_freq": "other",
}


@pytest.mark.parametrize(("name", "kind"), NAMES.items())
def test_every_command_sees_the_same_kind(name, kind):
    assert module_kind(name) == kind
    # ftt-sweep selects a kind with mergekit filters built from the same classification.
    if kind in grid.MODULE_KINDS:
        filters = grid.module_filters(list(NAMES), kind)
        selected = {n for n in NAMES if any(f == n or f in n for f in filters)}
        assert selected == {n for n, k in NAMES.items() if k == kind}
    # ftt-delta info groups tensors by module path and names the path's kind.
    assert module_kind(module_path(name)) == kind


def test_kinds_layers_and_paths():
    assert set(NAMES.values()) == set(KINDS)
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("model.norm.weight") is None
    assert (
        module_path("model.layers.7.self_attn.q_proj.weight") == "layers.*.self_attn.q_proj.weight"
    )
