"""Baseline attention: MHA, GQA and MQA (one module; ``num_kv_heads`` picks the kind).

Same interface as :class:`mlakit.attention.mla.MultiHeadLatentAttention`, with a standard
K/V cache holding rotated keys and values for ``num_kv_heads`` heads.

Shapes: B batch, T query tokens, S key tokens, H query heads, G kv heads, D head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from mlakit.attention.common import RotaryEmbedding, attend, check_positions, mask_or_causal
from mlakit.attention.metadata import AttentionMetadata
from mlakit.cache import KVCache
from mlakit.config import AttentionConfig
from mlakit.layers import RMSNorm, fuse_linears
from mlakit.rope import softmax_scale


class GroupedQueryAttention(nn.Module):
    """Llama-style attention with ``w_q, w_k, w_v, w_o`` (biases on q/k/v when ``qkv_bias``).

    With ``qk_norm`` each head's query and key go through an RMSNorm (``q_head_norm``,
    ``k_head_norm``) before RoPE (Qwen3, Gemma 3).
    """

    def __init__(
        self,
        config: AttentionConfig,
        rotary: RotaryEmbedding | None = None,
        max_positions: int = 4096,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx  # which of the paged cache's layers this one reads
        self.scale = softmax_scale(c.head_dim, c.rope_scaling)
        self.w_q = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.w_k = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.w_v = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.w_o = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_head_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_head_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.rotary = rotary or RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling)
        self.fused_in: nn.Module | None = None  # set by fuse_input_projections (inference)

    def fuse_input_projections(self) -> None:
        """Inference: ``w_q``, ``w_k``, ``w_v`` as one product (the originals are dropped)."""
        self.fused_in = fuse_linears([self.w_q, self.w_k, self.w_v])
        del self.w_q, self.w_k, self.w_v

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_q x, w_k x, w_v x)``, one product when fused."""
        if self.fused_in is None:
            return self.w_q(x), self.w_k(x), self.w_v(x)
        c = self.config
        kv = c.num_kv_heads * c.head_dim
        q, k, v = self.fused_in(x).split([c.num_heads * c.head_dim, kv, kv], dim=-1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        path: str = "naive",
        kv_len: int | None = None,
        meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """Attend ``x [B, T, hidden]`` at ``positions [B, T]``; ``path`` is accepted and ignored.

        With ``meta`` (the engine), ``x`` is a packed row ``[1, N, hidden]`` over the paged cache:
        decode tokens go through the backend's ``kv_decode``, each prefill chunk reads its
        sequence's gathered K/V.

        Returns: ``[B, T, hidden]``.
        """
        c = self.config
        b, t, _ = x.shape
        causal = positions is None and cache is None and c.sliding_window is None
        if positions is None:
            positions = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
        check_positions(x, positions)
        q, k, v = self._project(x)
        q = q.view(b, t, c.num_heads, c.head_dim)  # [B, T, H, D]
        k = k.view(b, t, c.num_kv_heads, c.head_dim)  # [B, T, G, D]
        if c.qk_norm:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        q = self.rotary.rotate(q, positions)
        k = self.rotary.rotate(k, positions)
        v = v.view(b, t, c.num_kv_heads, c.head_dim)  # [B, T, G, D]
        if meta is not None:
            return self.w_o(self._attend_paged(q[0], k[0], v[0], positions[0], meta).reshape(b, t, -1))
        if cache is not None:
            cache.write(positions, k, v)
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            k, v = (z.to(x.dtype) for z in cache.read(kv_len))  # [B, S, G, D]
            k_pos = torch.arange(kv_len, device=x.device)
        else:
            k_pos = positions
        mask, causal = (None, True) if causal else mask_or_causal(positions, k_pos, c.sliding_window)
        return self.w_o(self._attend(q, k, v, mask, causal).reshape(b, t, -1))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """``q [B, T, H, D]`` over ``k, v [B, S, G, D]`` (each kv head serves H/G query heads) -> ``[B, T, H, D]``."""
        c = self.config
        b, s = k.shape[:2]
        group = c.num_heads // c.num_kv_heads
        if group > 1:  # share each kv head with its group of query heads
            k = k.unsqueeze(3).expand(b, s, c.num_kv_heads, group, c.head_dim).reshape(b, s, c.num_heads, c.head_dim)
            v = v.unsqueeze(3).expand(b, s, c.num_kv_heads, group, c.head_dim).reshape(b, s, c.num_heads, c.head_dim)
        o = attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal, self.scale, c.logit_softcap
        )  # [B, H, T, D]
        return o.transpose(1, 2)

    def _attend_paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Packed ``q [N, H, D]``, new ``k, v [N, G, D]`` at ``pos [N]`` -> ``[N, H, D]`` over the paged cache."""
        c = self.config
        g = c.num_kv_heads
        k_rows, v_rows = meta.cache.layers[self.layer_idx]
        k_rows.write(meta.slot_mapping, k.flatten(1))
        v_rows.write(meta.slot_mapping, v.flatten(1))
        nd = meta.num_decodes
        parts = []
        if nd:
            parts.append(meta.backend.kv_decode(q[:nd] * self.scale, k_rows, v_rows, meta, g))  # [nd, H, D]
        for i in range(nd, meta.num_seqs):  # prefill chunks, one sequence each
            a, b = meta.query_start[i], meta.query_start[i + 1]
            parts.append(
                meta.backend.kv_prefill(q[a:b] * self.scale, k_rows, v_rows, meta, i, pos[a:b], g)
            )  # [T_i, H, D]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
