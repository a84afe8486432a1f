"""RoRoPE head mixing, separate K/V budgets and wide first layers."""

from __future__ import annotations

import math

import pytest
import torch

from mlakit.convert import ConversionConfig, convert_calibrated
from mlakit.convert.factorize import AttentionWeights, factorize
from mlakit.convert.rope import decouple_rope
from mlakit.errors import MlakitError


def _rotate_pairs(w: torch.Tensor, angles: torch.Tensor, d: int) -> torch.Tensor:
    """Rotate pair ``f`` (rows ``f``, ``f + d/2``) of a ``[d, n]`` head by ``angles[f]``."""
    out = w.clone()
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    out[: d // 2] = c * w[: d // 2] - s * w[d // 2 :]
    out[d // 2 :] = s * w[: d // 2] + c * w[d // 2 :]
    return out


def _phase_shifted_layer(seed: int = 0) -> tuple[AttentionWeights, torch.Tensor]:
    """3 KV heads whose keys are one head's keys turned by a fixed angle per pair, and scaled."""
    g = torch.Generator().manual_seed(seed)
    n, d, kv, heads = 24, 8, 3, 6
    base = torch.randn(d, n + 1, generator=g, dtype=torch.float64)
    w_k = torch.cat(
        [_rotate_pairs(base, torch.rand(d // 2, generator=g, dtype=torch.float64) * 6, d) * (1 + j) for j in range(kv)]
    )
    w_q = torch.randn(heads * d, n + 1, generator=g, dtype=torch.float64)
    w_v = torch.randn(kv * d, n + 1, generator=g, dtype=torch.float64)
    w_o = torch.randn(n, heads * d, generator=g, dtype=torch.float64)
    x = torch.randn(500, n, generator=g, dtype=torch.float64)
    x = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)
    return AttentionWeights(w_q, w_k, w_v, w_o, heads, kv, d), x.T @ x / 500


def _scores(
    w: AttentionWeights, dk, x: torch.Tensor, pos: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head attention scores ``[H, T, T]`` of the original layer and of the decoupled one."""
    d, K = w.head_dim, dk.w_kr.shape[0] // 2

    def rope(v: torch.Tensor, dim: int, base: float) -> torch.Tensor:  # v [T, dim]
        inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = pos[:, None] * inv[None]
        c, s = ang.cos(), ang.sin()
        a, b = v[:, : dim // 2], v[:, dim // 2 :]
        return torch.cat([a * c - b * s, a * s + b * c], 1)

    ref, got = [], []
    for h in range(w.num_heads):
        j = h // w.group
        q = x @ w.w_q[h * d : (h + 1) * d].T
        k = x @ w.w_k[j * d : (j + 1) * d].T
        ref.append(rope(q, d, theta) @ rope(k, d, theta).T)
        qn = x @ dk.w_q_nope[h * d : (h + 1) * d].T
        kn = x @ dk.w_k_nope[j * d : (j + 1) * d].T
        qr = rope(x @ dk.w_q_rope[h].T, 2 * K, dk.rope_theta)
        kr = rope(x @ dk.w_kr.T, 2 * K, dk.rope_theta)
        got.append(qn @ kn.T + qr @ kr.T)
    return torch.stack(ref), torch.stack(got)


def test_complex_mixing_is_exact_for_phase_shifted_heads_and_real_is_not() -> None:
    w, sigma = _phase_shifted_layer()
    x = torch.cat([torch.randn(12, 24, dtype=torch.float64), torch.ones(12, 1, dtype=torch.float64)], 1)
    pos = torch.arange(12, dtype=torch.float64) * 3
    cx = decouple_rope(w, sigma, 4, 100.0, complex_mixing=True)
    re = decouple_rope(w, sigma, 4, 100.0, complex_mixing=False)
    # all pairs rotary: the heads' keys are exactly one complex multiple of a shared key
    assert cx.w_k_nope.abs().max().item() < 1e-10
    assert re.w_k_nope.abs().max().item() > 0.1
    ref, got = _scores(w, cx, x, pos, 100.0)
    assert (got - ref).abs().max().item() < 1e-9 * ref.abs().max().item()
    _, got_re = _scores(w, re, x, pos, 100.0)
    assert (got_re - ref).abs().max().item() > 1e-2 * ref.abs().max().item()


def test_complex_mixing_keeps_more_energy_on_a_real_layer(cal_llama) -> None:  # type: ignore[no-untyped-def]
    w, sigma = cal_llama.weights[0], cal_llama.sigma[0]

    def residual(dk) -> float:  # type: ignore[no-untyped-def]
        return float(torch.trace(dk.w_k_nope @ sigma @ dk.w_k_nope.T))

    cx = decouple_rope(w, sigma, w.head_dim // 2, 1e4, complex_mixing=True)
    re = decouple_rope(w, sigma, w.head_dim // 2, 1e4, complex_mixing=False)
    assert residual(cx) < residual(re)


def test_key_share_gives_block_latent(cal_llama) -> None:  # type: ignore[no-untyped-def]
    w, sigma = cal_llama.weights[0], cal_llama.sigma[0]
    f = factorize(w.w_k, w.w_v, sigma, 20, key_share=0.75)
    # the first 15 latent dims serve keys only, the last 5 values only
    assert f.up_k[:, 15:].abs().max().item() == 0 and f.up_v[:, :15].abs().max().item() == 0
    assert f.up_k[:, :15].abs().max().item() > 0 and f.up_v[:, 15:].abs().max().item() > 0
    # at full rank it is exact like the joint latent
    rk = w.w_k.shape[0]
    f = factorize(w.w_k, w.w_v, sigma, 2 * rk, key_share=0.5)
    assert (f.up_k @ f.down - w.w_k).abs().max().item() < 1e-8


def test_keep_first_wide(cal_llama) -> None:  # type: ignore[no-untyped-def]
    res = convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.75, rope="full", keep_first_wide=1))
    ranks = res.record["kv_lora_ranks"]
    assert ranks[0] == 64 and sum(ranks) == math.floor(0.75 * 64 * 2)
    with pytest.raises(MlakitError, match="keep fewer layers wide"):
        convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.25, rope="full", keep_first_wide=1))
    with pytest.raises(MlakitError, match="keep_first_wide"):
        ConversionConfig(keep_first_wide=-1)


def test_rope_pairs_follow_the_target_context() -> None:
    from mlakit.convert.options import ConversionConfig, default_rope_dims
    from mlakit.convert.rope import SourceRope, rope_pairs_for_context, source_rope_pairs

    # SmolLM2: theta 1e5, head dim 64 -> pair j turns by L * 1e5^(-j/32) radians over L tokens
    assert [rope_pairs_for_context(1e5, 64, n) for n in (512, 2048, 4096, 8192)] == [18, 22, 24, 26]
    assert rope_pairs_for_context(1e5, 64, 10**9) == 32
    # the rotary key takes at most half of a layer's cache: 96 values -> at most 24 pairs
    smollm2 = (SourceRope(1e5),)
    assert default_rope_dims(192, 64, ropes=smollm2, context_length=8192) == 52
    assert default_rope_dims(96, 64, ropes=smollm2, context_length=8192) == 48
    assert default_rope_dims(48, 64, ropes=smollm2, context_length=8192) == 24
    cfg = ConversionConfig(kv_fraction=0.5, context_length=2048)
    assert cfg.resolved_rope_dims(64, 3, smollm2, 8192) == 44
    assert ConversionConfig(kv_fraction=0.5, rope="full").resolved_rope_dims(64, 3, smollm2, 8192) == 0
    # a sliding layer needs only the pairs that turn within its window; the most any RoPE needs wins
    assert source_rope_pairs((SourceRope(1e5, window=512),), 64, 8192) == 18
    assert source_rope_pairs((SourceRope(1e6), SourceRope(1e4, window=512)), 64, 8192) == max(
        rope_pairs_for_context(1e6, 64, 8192), rope_pairs_for_context(1e4, 64, 512)
    )


def test_a_pair_no_query_reads_is_decoupled_without_nan(cal_llama) -> None:  # type: ignore[no-untyped-def]
    # Gemma's quantised q-norm weights can zero both dims of a pair in every head
    import dataclasses

    from mlakit.convert.rope import decouple_rope

    w = cal_llama.weights[0]
    w_q = w.w_q.clone().view(w.num_heads, w.head_dim, -1)
    w_q[:, [0, w.head_dim // 2]] = 0  # pair 0 of every head
    dk = decouple_rope(dataclasses.replace(w, w_q=w_q.reshape(w.w_q.shape)), cal_llama.sigma[0], 4, 1e4)
    for t in (dk.w_kr, dk.w_q_rope, dk.w_k_nope, dk.w_q_nope):
        assert torch.isfinite(t).all()
