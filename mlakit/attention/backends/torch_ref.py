"""The reference backend: gather each sequence's rows by block table, one batched masked product.

Any device. Every other backend is tested against this one; it is also what runs on CUDA without
Triton. Decode reads are copies (``rows.data[slots]``), which costs an extra pass over the
cache: simple and exact, not the fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mlakit.attention.backends.base import gather_by_table, kv_prefill_sdpa, latent_prefill_sdpa, length_mask
from mlakit.paged import PagedRows

if TYPE_CHECKING:
    from mlakit.attention.metadata import AttentionMetadata


class Backend:
    name = "torch"

    def gather(self, rows: PagedRows, meta: AttentionMetadata, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return gather_by_table(rows, meta, lo, hi, dtype)

    def latent_decode(
        self, q_joint: torch.Tensor, rows: PagedRows, meta: AttentionMetadata, kv_lora_rank: int
    ) -> torch.Tensor:
        kv = gather_by_table(rows, meta, 0, meta.num_decodes, q_joint.dtype)  # [B, S, r + d_r]
        scores = torch.matmul(q_joint, kv.transpose(1, 2)).float()  # [B, H, S]
        valid = length_mask(meta.decode_context_lens, kv.shape[1])  # [B, S]
        probs = scores.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(dim=-1).to(q_joint.dtype)
        return torch.matmul(probs, kv[..., :kv_lora_rank])  # [B, H, r]

    def latent_prefill(
        self,
        q_joint: torch.Tensor,
        rows: PagedRows,
        meta: AttentionMetadata,
        seq: int,
        q_pos: torch.Tensor,
        kv_lora_rank: int,
    ) -> torch.Tensor:
        return latent_prefill_sdpa(self, q_joint, rows, meta, seq, q_pos, kv_lora_rank)

    def kv_decode(
        self, q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, meta: AttentionMetadata, num_kv_heads: int
    ) -> torch.Tensor:
        b, h, d = q.shape
        g = num_kv_heads
        k = gather_by_table(k_rows, meta, 0, b, q.dtype).view(b, -1, g, d)  # [B, S, G, D]
        v = gather_by_table(v_rows, meta, 0, b, q.dtype).view(b, -1, g, d)
        qg = q.view(b, g, h // g, d)  # [B, G, H/G, D]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()  # [B, G, H/G, S]
        valid = length_mask(meta.decode_context_lens, k.shape[1])  # [B, S]
        probs = scores.masked_fill(~valid.view(b, 1, 1, -1), float("-inf")).softmax(dim=-1).to(q.dtype)
        return torch.matmul(probs, v.transpose(1, 2)).reshape(b, h, d)  # [B, H, D]

    def kv_prefill(
        self,
        q: torch.Tensor,
        k_rows: PagedRows,
        v_rows: PagedRows,
        meta: AttentionMetadata,
        seq: int,
        q_pos: torch.Tensor,
        num_kv_heads: int,
    ) -> torch.Tensor:
        return kv_prefill_sdpa(self, q, k_rows, v_rows, meta, seq, q_pos, num_kv_heads)
