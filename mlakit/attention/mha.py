"""Baseline attention: MHA, GQA and MQA (one module; ``num_kv_heads`` picks the kind).

Same interface as :class:`mlakit.attention.mla.MultiHeadLatentAttention`, with a standard
K/V cache holding rotated keys and values for ``num_kv_heads`` heads.

Shapes: B batch, T query tokens, S key tokens, H query heads, G kv heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlakit.attention.common import RotaryEmbedding, check_positions, position_mask
from mlakit.cache import KVCache
from mlakit.config import AttentionConfig
from mlakit.rope import softmax_scale


class GroupedQueryAttention(nn.Module):
    """Llama-style attention with ``w_q, w_k, w_v, w_o`` (biases on q/k/v when ``qkv_bias``)."""

    def __init__(
        self, config: AttentionConfig, rotary: RotaryEmbedding | None = None, max_positions: int = 4096
    ) -> None:
        super().__init__()
        c = config
        self.config = c
        self.scale = softmax_scale(c.head_dim, c.rope_scaling)
        self.w_q = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.w_k = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.w_v = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.w_o = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.rotary = rotary or RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        path: str = "naive",
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Attend ``x [B, T, hidden]`` at ``positions [B, T]``; ``path`` is accepted and ignored.

        Returns: ``[B, T, hidden]``.
        """
        c = self.config
        b, t, _ = x.shape
        causal = positions is None and cache is None
        if positions is None:
            positions = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
        check_positions(x, positions)
        q = self.rotary.rotate(self.w_q(x).view(b, t, c.num_heads, c.head_dim), positions)  # [B, T, H, D]
        k = self.rotary.rotate(self.w_k(x).view(b, t, c.num_kv_heads, c.head_dim), positions)  # [B, T, G, D]
        v = self.w_v(x).view(b, t, c.num_kv_heads, c.head_dim)  # [B, T, G, D]
        if cache is not None:
            cache.write(positions, k, v)
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            k, v = (z.to(x.dtype) for z in cache.read(kv_len))  # [B, S, G, D]
            k_pos = torch.arange(kv_len, device=x.device)
        else:
            k_pos = positions
        mask = None if causal else position_mask(positions, k_pos)
        group = c.num_heads // c.num_kv_heads
        s = k.shape[1]
        if group > 1:  # share each kv head with its group of query heads
            k = k.unsqueeze(3).expand(b, s, c.num_kv_heads, group, c.head_dim).reshape(b, s, c.num_heads, c.head_dim)
            v = v.unsqueeze(3).expand(b, s, c.num_kv_heads, group, c.head_dim).reshape(b, s, c.num_heads, c.head_dim)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=self.scale
        )  # [B, H, T, D]
        return self.w_o(o.transpose(1, 2).reshape(b, t, -1))
