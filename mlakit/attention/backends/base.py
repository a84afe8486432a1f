"""The backend interface, and the reference gather every backend may reuse.

Contract (all backends; tested against ``torch`` over one table of scenarios):

* ``gather(rows, meta, lo, hi, dtype) -> [hi - lo, S, W]``: rows of sequences ``lo .. hi - 1``
  in position order, dequantized to ``dtype``, ``S = max(context_lens[lo:hi])``; slots past a
  sequence's end hold stale values that callers mask by position.
* ``latent_decode(q_joint, rows, meta, kv_lora_rank) -> o_latent [B_d, H, r]`` for the
  ``B_d = meta.num_decodes`` decode sequences: ``q_joint [B_d, H, r + d_rope]`` is
  ``[q_nope W_UK | q_rope]`` already multiplied by the softmax scale;
  ``o_latent = softmax(q_joint . [c_kv | k_rope]^T) c_kv`` over each sequence's context.
* ``latent_prefill(q_joint, rows, meta, seq, q_pos, kv_lora_rank) -> o_latent [T, H, r]``: the
  absorbed form of one prefill chunk of sequence ``seq``, ``q_joint [T, H, r + d_rope]`` as for
  decode, query ``t`` (at position ``q_pos[t]``) reading the cached positions ``<= q_pos[t]``.
* ``kv_decode(q, k_rows, v_rows, meta, num_kv_heads) -> [B_d, H, D]`` with ``q [B_d, H, D]``
  pre-scaled; query head ``h`` reads kv head ``h // (H / G)``.
* ``kv_prefill(q, k_rows, v_rows, meta, seq, q_pos, num_kv_heads) -> [T, H, D]``: one prefill
  chunk of sequence ``seq`` over its cached K/V, ``q [T, H, D]`` pre-scaled, query ``t`` reading
  the positions ``<= q_pos[t]``; heads grouped as for ``kv_decode``.

Softmax runs in fp32 in every backend; outputs come back in ``q``'s dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from mlakit.attention.common import mask_or_causal
from mlakit.paged import PagedRows

if TYPE_CHECKING:
    from mlakit.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def gather(self, rows: PagedRows, meta: AttentionMetadata, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """``[hi - lo, S, W]`` cached rows of sequences ``lo .. hi - 1`` (see the module docstring)."""
        ...

    def latent_decode(
        self, q_joint: torch.Tensor, rows: PagedRows, meta: AttentionMetadata, kv_lora_rank: int
    ) -> torch.Tensor:
        """``o_latent [B_d, H, r]`` of the absorbed MLA decode (see the module docstring)."""
        ...

    def latent_prefill(
        self,
        q_joint: torch.Tensor,
        rows: PagedRows,
        meta: AttentionMetadata,
        seq: int,
        q_pos: torch.Tensor,
        kv_lora_rank: int,
    ) -> torch.Tensor:
        """``o_latent [T, H, r]`` of one absorbed prefill chunk (see the module docstring)."""
        ...

    def kv_decode(
        self, q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, meta: AttentionMetadata, num_kv_heads: int
    ) -> torch.Tensor:
        """``[B_d, H, D]`` baseline decode over paged K/V (see the module docstring)."""
        ...

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
        """``[T, H, D]`` baseline prefill chunk over paged K/V (see the module docstring)."""
        ...


def gather_by_table(rows: PagedRows, meta: AttentionMetadata, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Index the storage with each sequence's slots: ``[hi - lo, S, W]`` (a copy), int8 dequantized."""
    bs = meta.block_size
    s = max(meta.context_lens_host[lo:hi])
    tables = meta.block_tables[lo:hi, : math.ceil(s / bs)]  # [b, M]
    slots = (tables.unsqueeze(-1) * bs + torch.arange(bs, device=tables.device)).flatten(1)[:, :s]  # [b, S]
    data = rows.data[slots]  # [b, S, W]
    if rows.scale is not None:
        return (data.float() * rows.scale[slots].unsqueeze(-1)).to(dtype)
    return data.to(dtype)


def length_mask(context_lens: torch.Tensor, s: int) -> torch.Tensor:
    """``[B, S]`` True where key index ``< context_lens[b]``."""
    return torch.arange(s, device=context_lens.device).unsqueeze(0) < context_lens.unsqueeze(1)


def latent_prefill_sdpa(
    backend: AttentionBackend,
    q_joint: torch.Tensor,
    rows: PagedRows,
    meta: AttentionMetadata,
    seq: int,
    q_pos: torch.Tensor,
    kv_lora_rank: int,
) -> torch.Tensor:
    """The reference absorbed prefill (``latent_prefill``): ``q_joint [T, H, W]`` (pre-scaled) -> ``[T, H, r]``.

    Gathers sequence ``seq``'s rows ``kv [S, W]`` through ``backend``, then multi-query attention
    with one shared key/value "head" ``[c_kv | k_rope]`` as fused SDPA (the value is the whole row,
    since the fused kernels want equal widths; its first ``r`` outputs are ``o_latent``); query
    ``t`` reads positions ``<= q_pos[t]``.
    """
    kv = backend.gather(rows, meta, seq, seq + 1, q_joint.dtype)[0]  # [S, W]
    h = q_joint.shape[1]
    s, w = kv.shape
    mask = (torch.arange(s, device=kv.device).unsqueeze(0) <= q_pos.unsqueeze(1)).view(1, 1, -1, s)  # [1, 1, T, S]
    kv = kv.to(q_joint.dtype).view(1, 1, s, w).expand(1, h, s, w)  # [1, H, S, W], a view
    o = F.scaled_dot_product_attention(q_joint.transpose(0, 1).unsqueeze(0), kv, kv, attn_mask=mask, scale=1.0)
    return o[0, :, :, :kv_lora_rank].transpose(0, 1)  # [T, H, r]


def kv_prefill_sdpa(
    backend: AttentionBackend,
    q: torch.Tensor,
    k_rows: PagedRows,
    v_rows: PagedRows,
    meta: AttentionMetadata,
    seq: int,
    q_pos: torch.Tensor,
    num_kv_heads: int,
) -> torch.Tensor:
    """The reference baseline prefill (``kv_prefill``): ``q [T, H, D]`` (pre-scaled) -> ``[T, H, D]``.

    Gathers sequence ``seq``'s K/V ``[S, G, D]`` through ``backend``, shares each kv head with its
    ``H / G`` query heads and runs fused SDPA, on its causal path when the chunk starts at
    position 0 (:func:`mlakit.attention.common.mask_or_causal`).
    """
    h, d = q.shape[1:]
    g = num_kv_heads
    k = backend.gather(k_rows, meta, seq, seq + 1, q.dtype)[0].view(-1, g, d)  # [S, G, D]
    v = backend.gather(v_rows, meta, seq, seq + 1, q.dtype)[0].view(-1, g, d)
    s = k.shape[0]
    if g < h:  # each kv head serves its group of query heads
        k = k.unsqueeze(2).expand(s, g, h // g, d).reshape(s, h, d)
        v = v.unsqueeze(2).expand(s, g, h // g, d).reshape(s, h, d)
    mask, causal = mask_or_causal(q_pos.unsqueeze(0), torch.arange(s, device=q.device))  # [1, 1, T, S] or causal
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=1.0,
    )  # fmt: skip
    return o[0].transpose(0, 1)  # [T, H, D]
