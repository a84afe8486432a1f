"""MLA: cached decode (naive and absorbed) equals the uncached forward; absorbed equals naive."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlakit.attention import MultiHeadLatentAttention
from mlakit.cache import LatentCache
from mlakit.config import MLAConfig, ModelConfig, RopeScaling, RuntimeConfig
from tests.conftest import TOLERANCES, build, tiny_mla_config

TOL = TOLERANCES[torch.float32]

# name -> model config; each scenario below runs over all of them
CONFIGS = {
    "q_lora": tiny_mla_config(),
    "no_q_lora": tiny_mla_config(q_lora_rank=None),
    "yarn": tiny_mla_config(
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707)
    ),
    "full_rope_no_norm": tiny_mla_config(rope_mode="full", qk_rope_head_dim=0, kv_norm=False, q_lora_rank=None),
    "bias_wide_v": tiny_mla_config(attention_bias=True, v_head_dim=24, qk_nope_head_dim=8),
}


def decode_paths(config: ModelConfig) -> list[str]:
    assert isinstance(config.attention, MLAConfig)
    return ["naive", "absorbed"] if config.attention.can_absorb else ["naive"]


def run_cached(model, tokens: torch.Tensor, chunks: list[int], path: str) -> torch.Tensor:
    """Feed ``tokens [B, T]`` through the cache in chunks (size 1 = decode); logits ``[B, T, V]``."""
    b, t = tokens.shape
    cache = model.new_cache(b, t + 4)
    runtime = RuntimeConfig(decode_path=path)
    out, start = [], 0
    for size in chunks:
        pos = torch.arange(start, start + size).unsqueeze(0).expand(b, size)
        out.append(model(tokens[:, start : start + size], pos, cache, runtime))
        start += size
    assert start == t
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "chunks",
    [[1] * 12, [5] + [1] * 7, [4, 4, 4], [3, 6, 1, 1, 1]],
    ids=["decode", "prefill+decode", "chunked", "mixed"],
)
def test_cached_equals_full_forward(name: str, chunks: list[int]) -> None:
    config = CONFIGS[name]
    model = build(config)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        for path in decode_paths(config):
            cached = run_cached(model, tokens, chunks, path)
            assert (cached - full).abs().max().item() <= TOL, (name, path)


@pytest.mark.parametrize("name", CONFIGS)
def test_ragged_batch_matches_solo(name: str) -> None:
    """Sequences of different lengths decoded together equal each decoded alone."""
    config = CONFIGS[name]
    model = build(config)
    lengths = [7, 3, 5]
    seqs = [torch.randint(0, config.vocab_size, (n + 4,)) for n in lengths]
    with torch.no_grad():
        for path in decode_paths(config):
            runtime = RuntimeConfig(decode_path=path)
            cache = model.new_cache(len(seqs), 16)
            t = max(lengths)
            tokens = torch.zeros(len(seqs), t, dtype=torch.long)
            for i, s in enumerate(seqs):
                tokens[i, : lengths[i]] = s[: lengths[i]]
            pos = torch.arange(t).unsqueeze(0).expand(len(seqs), t)
            model(tokens, pos, cache, runtime)  # prefill, right-padded
            cur = torch.tensor(lengths)
            for step in range(4):
                nxt = torch.stack([s[lengths[i] + step] for i, s in enumerate(seqs)]).unsqueeze(1)
                logits = model(nxt, (cur + step).unsqueeze(1), cache, runtime)[:, 0]
                for i, s in enumerate(seqs):
                    solo = model(s[: lengths[i] + step + 1].unsqueeze(0))[0, -1]
                    assert (logits[i] - solo).abs().max().item() <= TOL, (name, path, i, step)


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 4),
    nope=st.sampled_from([4, 8, 16]),
    rope=st.sampled_from([2, 4, 8]),
    v=st.sampled_from([4, 8, 12]),
    rank=st.integers(2, 24),
    q_rank=st.one_of(st.none(), st.integers(4, 24)),
    kv_norm=st.booleans(),
    t=st.integers(1, 5),
    cached=st.integers(0, 9),
)
def test_absorbed_equals_naive(heads, nope, rope, v, rank, q_rank, kv_norm, t, cached) -> None:
    cfg = MLAConfig(
        hidden_size=32,
        num_heads=heads,
        kv_lora_rank=rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        q_lora_rank=q_rank,
        kv_norm=kv_norm,
    )
    attn = MultiHeadLatentAttention(cfg, max_positions=64).eval()
    b = 2
    x_old = torch.randn(b, cached, 32)
    x = torch.randn(b, t, 32)
    outs = {}
    with torch.no_grad():
        for path in ("naive", "absorbed"):
            cache = LatentCache(b, 32, rank, rope)
            if cached:
                attn(x_old, torch.arange(cached).expand(b, cached), cache, "naive")
            pos = torch.arange(cached, cached + t).expand(b, t)
            outs[path] = attn(x, pos, cache, path)
        # also without a cache (the chunk attends to itself)
        uncached = {p: attn(x, None, None, p) for p in ("naive", "absorbed")}
    assert (outs["naive"] - outs["absorbed"]).abs().max().item() <= TOL
    assert (uncached["naive"] - uncached["absorbed"]).abs().max().item() <= TOL


def test_absorbed_rejects_full_rope() -> None:
    config = CONFIGS["full_rope_no_norm"]
    model = build(config)
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="absorbed"):
        model(torch.tensor([[1]]), torch.tensor([[0]]), cache, RuntimeConfig(decode_path="absorbed"))


def test_bf16_absorbed_close_to_fp32_naive() -> None:
    config = CONFIGS["q_lora"]
    model = build(config)
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        ref = run_cached(model, tokens, [4] + [1] * 6, "naive")
        model16 = build(config).to(torch.bfloat16)
        cache = model16.new_cache(2, 12, "bf16")
        out = []
        for i, size in enumerate([4] + [1] * 6):
            start = 0 if i == 0 else 3 + i
            pos = torch.arange(start, start + size).expand(2, size)
            out.append(model16(tokens[:, start : start + size], pos, cache, RuntimeConfig("absorbed", "bf16")).float())
    diff = (torch.cat(out, 1).softmax(-1) - ref.softmax(-1)).abs().max().item()
    assert diff <= TOLERANCES[torch.bfloat16]


def test_wrong_weights_are_detected() -> None:
    """The equivalence check can fail: perturbing W_UV changes absorbed but not the reference copy."""
    config = CONFIGS["q_lora"]
    model = build(config)
    tokens = torch.randint(0, config.vocab_size, (1, 6))
    with torch.no_grad():
        full = model(tokens)
        model.layers[0].attn.w_uv.weight.add_(0.1)
        cached = run_cached(model, tokens, [1] * 6, "absorbed")
    assert (cached - full).abs().max().item() > TOL


def test_rope_dims_must_be_even() -> None:
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        dataclasses.replace(CONFIGS["q_lora"].attention, qk_rope_head_dim=3)
