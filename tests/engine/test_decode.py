"""Fast attention paths over pages against the plain reference (decompress K/V, ordinary softmax)."""

from __future__ import annotations

import pytest
import torch

from mlakit import MLAConfig
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.engine.decode import absorbed_decode, decompressed_attention
from mlakit.engine.paged import PagedRows, block_runs
from mlakit.engine.runner import AbsorbedWeights
from tests.conftest import TOLERANCES

ATT = MLAConfig(hidden_size=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)

# name -> (block table, tokens cached, block size)
SCENARIOS = {
    "single_block": ([0], 3, 4),
    "one_run": ([0, 1, 2, 3], 15, 4),
    "fragmented": ([5, 2, 3, 0, 7], 18, 4),
    "long_context": (list(range(64)), 1000, 16),
}


def reference(attn: MultiHeadLatentAttention, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor):
    """Decompress K/V for every cached token and run ordinary softmax attention: ``[H, d_v]``."""
    c = attn.config
    c_kv, k_rope = kv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
    k = torch.cat(
        (attn.w_uk(c_kv).view(-1, c.num_heads, c.qk_nope_head_dim), k_rope.unsqueeze(1).expand(-1, c.num_heads, -1)),
        dim=-1,
    )  # [S, H, d_qk]
    v = attn.w_uv(c_kv).view(-1, c.num_heads, c.v_head_dim)  # [S, H, d_v]
    q = torch.cat((q_nope, q_rope), dim=-1)  # [H, d_qk]
    p = torch.einsum("hd,shd->hs", q, k).mul(attn.scale).softmax(-1)
    return torch.einsum("hs,shd->hd", p, v)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, "int8"])
def test_absorbed_decode_matches_reference(scenario: str, storage: torch.dtype | str) -> None:
    table, n, bs = SCENARIOS[scenario]
    attn = MultiHeadLatentAttention(ATT).eval()
    rows = PagedRows((max(table) + 1) * bs, ATT.kv_lora_rank + ATT.qk_rope_head_dim, storage, None)
    rows.data.zero_()
    kv = torch.randn(n, rows.width)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
    rows.write(slots, kv)
    stored = rows.read(block_runs(table, n, bs), torch.float32)  # what the cache really holds
    q_nope, q_rope = torch.randn(ATT.num_heads, 16), torch.randn(ATT.num_heads, 8)
    w = AbsorbedWeights.from_layer(attn)
    q_joint = torch.cat((torch.einsum("hd,hdc->hc", q_nope, w.w_uk), q_rope), -1) * attn.scale
    with torch.no_grad():
        o_latent = absorbed_decode(q_joint, rows, block_runs(table, n, bs), ATT.kv_lora_rank)
        got = torch.einsum("hc,hcd->hd", o_latent, w.w_uv)
        want = reference(attn, q_nope, q_rope, stored)
        # the decompressing path the engine uses for prefill and full-RoPE decode, one query at n-1
        naive = decompressed_attention(attn, q_nope[None], q_rope[None], stored, torch.tensor([n - 1]))[0]
    tol = TOLERANCES[torch.float32]
    assert (got - want).abs().max() < tol
    assert (naive - want).abs().max() < tol


def test_decompressed_attention_is_causal_by_position() -> None:
    attn = MultiHeadLatentAttention(ATT).eval()
    kv = torch.randn(10, 40)
    q_nope, q_rope = torch.randn(3, 4, 16), torch.randn(3, 4, 8)
    with torch.no_grad():
        chunk = decompressed_attention(attn, q_nope, q_rope, kv, torch.tensor([7, 8, 9]))
        for t, p in enumerate([7, 8, 9]):
            alone = decompressed_attention(attn, q_nope[t : t + 1], q_rope[t : t + 1], kv[: p + 1], torch.tensor([p]))
            assert torch.allclose(chunk[t], alone[0], atol=1e-5)
