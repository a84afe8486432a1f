"""Baseline attention (MHA/GQA/MQA): cached decode equals the full forward; kinds are right."""

from __future__ import annotations

import pytest
import torch

from mlakit.config import ModelConfig, RuntimeConfig
from tests.attention.test_mla import run_cached
from tests.conftest import TOLERANCES, build


@pytest.mark.parametrize("preset,kind", [("tiny-mha", "mha"), ("tiny-gqa", "gqa"), ("tiny-mqa", "mqa")])
def test_baseline_cached_equals_full(preset: str, kind: str) -> None:
    config = ModelConfig.from_preset(preset)
    assert config.attention_kind == kind
    model = build(config)
    tokens = torch.randint(0, config.vocab_size, (3, 10))
    with torch.no_grad():
        full = model(tokens)
        for chunks in ([1] * 10, [4, 1, 1, 4], [6, 4]):
            cached = run_cached(model, tokens, chunks, "naive")
            assert (cached - full).abs().max().item() <= TOLERANCES[torch.float32]


def test_gqa_matches_mha_with_repeated_heads() -> None:
    """GQA equals MHA whose K/V projections repeat each group's head: head sharing is wired right."""
    gqa = build(ModelConfig.from_preset("tiny-gqa"))
    mha = build(ModelConfig.from_preset("tiny-mha"))
    state = {k: v for k, v in gqa.state_dict().items() if not k.endswith(("w_k.weight", "w_v.weight"))}
    mha.load_state_dict(state, strict=False)
    with torch.no_grad():
        for g, m in zip(gqa.layers, mha.layers):
            d = g.attn.config.head_dim
            for name in ("w_k", "w_v"):
                w = getattr(g.attn, name).weight.view(2, d, -1)  # [G, D, hidden]
                getattr(m.attn, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * d, -1))
        tokens = torch.randint(0, 256, (2, 9))
        assert (gqa(tokens) - mha(tokens)).abs().max().item() <= TOLERANCES[torch.float32]
        cache = gqa.new_cache(2, 9)
        pos = torch.arange(9).expand(2, 9)
        assert (gqa(tokens, pos, cache, RuntimeConfig()) - mha(tokens)).abs().max().item() <= 1e-4
