"""The backend interface, and the reference gather every backend may reuse.

Contract (all backends; tested against ``torch`` over one table of scenarios):

* ``gather(rows, meta, lo, hi, dtype) -> [hi - lo, S, W]``: rows of sequences ``lo .. hi - 1``
  in position order, dequantized to ``dtype``, ``S = max(context_lens[lo:hi])``; slots past a
  sequence's end hold stale values that callers mask by position.
* ``latent_decode(q_joint, rows, meta, kv_lora_rank) -> o_latent [B_d, H, r]`` for the
  ``B_d = meta.num_decodes`` decode sequences: ``q_joint [B_d, H, r + d_rope]`` is
  ``[q_nope W_UK | q_rope]`` already multiplied by the softmax scale;
  ``o_latent = softmax(q_joint . [c_kv | k_rope]^T) c_kv`` over each sequence's context.
* ``kv_decode(q, k_rows, v_rows, meta, num_kv_heads) -> [B_d, H, D]`` with ``q [B_d, H, D]``
  pre-scaled; query head ``h`` reads kv head ``h // (H / G)``.

Softmax runs in fp32 in every backend; outputs come back in ``q``'s dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch

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

    def kv_decode(
        self, q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, meta: AttentionMetadata, num_kv_heads: int
    ) -> torch.Tensor:
        """``[B_d, H, D]`` baseline decode over paged K/V (see the module docstring)."""
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
