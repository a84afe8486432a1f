"""The CPU backend: a compiled paged-decode kernel, with a PyTorch path that walks runs of blocks.

Decode goes to the C kernel ``paged_decode`` of :mod:`mlakit.native` (built on first use for
this CPU): it reads each sequence's rows through its block table, converts a tile of rows
to fp32 once, computes the scores of every head sharing those rows and folds them into an
online softmax, in parallel over sequences, kv heads and slices of long contexts. For MLA one
latent row serves all H heads (the absorbed form), for GQA one K/V row serves its H/G heads.
An absorbed prefill chunk goes to the same kernel (``latent_prefill``): each block of
``prefill_block`` consecutive query tokens is a pseudo-sequence over the block's prefix (the chunk's
block table repeated at stride 0), its rows the block's tokens x heads, each row limited to its own
token's ``position + 1`` keys (``row_lens``). The block shares every key tile: the tile is fetched,
transposed and paired for values once per block instead of once per token. A GQA/MHA prefill chunk
(``kv_prefill``) takes the same path, per kv head a block's tokens x its H/G query heads.

Without a C compiler (or with ``Backend(use_kernel=False)``) decode runs in PyTorch, as follows.

The block pool hands out the lowest free block first, so a sequence's blocks are mostly
consecutive and :func:`mlakit.paged.block_runs` turns its table into a few ``(first_slot,
length)`` runs, each a zero-copy view of the storage. Scores are computed per run and
concatenated, so the softmax is exact over the whole sequence; with one run (the usual case) a
decode is three library calls over a view::

    scores   = q_joint . [c_kv | k_rope]^T     [H, S]
    o_latent = softmax(scores) c_kv            [H, r]

int8 rows are dequantized by folding their per-row scale into the scores and the probabilities,
so the int8 storage is read as it is (upcast per run) and never rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mlakit.attention.backends.base import gather_by_table, kv_prefill_sdpa, latent_prefill_sdpa
from mlakit.paged import PagedRows

if TYPE_CHECKING:
    from mlakit.attention.metadata import AttentionMetadata

Runs = list[tuple[int, int]]


def _run(rows: PagedRows, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A run as ``(rows [L, W] in dtype, per-row scale [L] or None)``; a view unless a cast is needed."""
    data, scale = rows.view(start, n)
    return (data if data.dtype == dtype else data.to(dtype)), (None if scale is None else scale.to(dtype))


def latent_attend(q_joint: torch.Tensor, rows: PagedRows, runs: Runs, kv_lora_rank: int) -> torch.Tensor:
    """``o_latent [H, r]`` of one sequence: ``q_joint [H, r + d_r]`` (pre-scaled) over its runs."""
    r = kv_lora_rank
    if len(runs) == 1 and rows.scale is None and rows.data.dtype == q_joint.dtype:
        kv = rows.data[runs[0][0] : runs[0][0] + runs[0][1]]  # [S, r + d_r], a view
        p = F.linear(q_joint, kv).float().softmax(dim=-1).to(q_joint.dtype)  # [H, S]
        return p @ kv[:, :r]  # [H, r]
    parts = [_run(rows, start, n, q_joint.dtype) for start, n in runs]
    scores = []
    for kv, scale in parts:
        s = F.linear(q_joint, kv)  # [H, L]
        scores.append(s if scale is None else s * scale)
    p = torch.cat(scores, dim=-1).float().softmax(dim=-1).to(q_joint.dtype)  # [H, S]
    o_latent = torch.zeros(q_joint.shape[0], r, dtype=q_joint.dtype, device=q_joint.device)
    offset = 0
    for kv, scale in parts:
        n = kv.shape[0]
        p_run = p[:, offset : offset + n]
        o_latent.addmm_(p_run if scale is None else p_run * scale, kv[:, :r])
        offset += n
    return o_latent


def kv_attend(q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, runs: Runs, num_kv_heads: int) -> torch.Tensor:
    """``[H, D]`` baseline decode of one sequence; query heads grouped per kv head, K/V never expanded."""
    g = num_kv_heads
    h, d = q.shape
    qg = q.view(g, h // g, d)  # [G, H/G, D]
    parts = [(_run(k_rows, s0, n, q.dtype), _run(v_rows, s0, n, q.dtype)) for s0, n in runs]
    scores = []
    for (k, ks), _ in parts:
        s = torch.matmul(qg, k.view(-1, g, d).permute(1, 2, 0))  # [G, H/G, L]
        scores.append(s if ks is None else s * ks)
    p = torch.cat(scores, dim=-1).float().softmax(dim=-1).to(q.dtype)  # [G, H/G, S]
    o = torch.zeros_like(qg)
    offset = 0
    for _, (v, vs) in parts:
        n = v.shape[0]
        p_run = p[..., offset : offset + n]
        o += torch.matmul(p_run if vs is None else p_run * vs, v.view(n, g, d).transpose(0, 1))  # [G, H/G, D]
        offset += n
    return o.reshape(h, d)


PREFILL_BLOCK = 8
"""Query tokens per pseudo-sequence in the kernel's prefill, MLA (absorbed) and GQA (see the module docstring).
Measured on SmolLM2's 25% conversion (9 heads, width 48 + 48; 4096-token prompt in chunks of 512,
2 threads, ``benchmarks/bench_prefill_block.py``): 1.34x block 1's speed at 8, 1.28x at 4, 1.36x
at 16; 8 takes nearly all of it while wasting at most 7 keys per block at the causal edge."""


class Backend:
    """``use_kernel``: ``None`` = the compiled kernel when it builds; ``False`` = the PyTorch path.

    ``prefill_block``: query tokens that share each key tile in the kernel's prefill (``latent_prefill``
    and ``kv_prefill``; 1 = every token its own pseudo-sequence).
    """

    name = "cpu"

    def __init__(self, use_kernel: bool | None = None, prefill_block: int = PREFILL_BLOCK) -> None:
        if prefill_block < 1:
            raise ValueError(f"prefill_block must be >= 1, got {prefill_block}")
        self.prefill_block = prefill_block
        from mlakit.native import load_native

        self.kernel = load_native() if use_kernel is not False else None
        if use_kernel and self.kernel is None:
            raise RuntimeError("mlakit's CPU kernels are not available here (see the log for why)")

    def gather(self, rows: PagedRows, meta: AttentionMetadata, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        if hi - lo == 1:
            runs = meta.runs(lo)
            if len(runs) == 1 and rows.scale is None:
                data, _ = rows.view(*runs[0])
                return data.to(dtype).unsqueeze(0)  # [1, S, W], a view when the dtype matches
        return gather_by_table(rows, meta, lo, hi, dtype)

    def latent_decode(
        self, q_joint: torch.Tensor, rows: PagedRows, meta: AttentionMetadata, kv_lora_rank: int
    ) -> torch.Tensor:
        nd = meta.num_decodes
        if self.kernel is not None:
            o = self.kernel.paged_decode(
                q_joint.unsqueeze(1),  # [B, 1, H, r + d_rope]: one group, all heads share the row
                rows,
                rows,
                *meta.decode_tables(),
                meta.block_size,
                kv_lora_rank,
                0,
            )
            return o[:, 0].to(q_joint.dtype)  # [B, H, r]
        return torch.stack([latent_attend(q_joint[i], rows, meta.runs(i), kv_lora_rank) for i in range(nd)])

    def latent_prefill(
        self,
        q_joint: torch.Tensor,
        rows: PagedRows,
        meta: AttentionMetadata,
        seq: int,
        q_pos: torch.Tensor,
        kv_lora_rank: int,
    ) -> torch.Tensor:
        if self.kernel is not None:  # one group: every head reads the latent row
            o = self._blocked_prefill(q_joint.unsqueeze(1), rows, rows, meta, seq, q_pos, kv_lora_rank, 0)
            return o[:, 0].to(q_joint.dtype)  # [T, H, r]
        return latent_prefill_sdpa(self, q_joint, rows, meta, seq, q_pos, kv_lora_rank)

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
        t, h, d = q.shape
        if self.kernel is not None:  # G groups of H / G query heads, kv head g at columns g * D
            qg = q.view(t, num_kv_heads, h // num_kv_heads, d)  # [T, G, H/G, D]
            o = self._blocked_prefill(qg, k_rows, v_rows, meta, seq, q_pos, d, d)
            return o.reshape(t, h, d).to(q.dtype)
        return kv_prefill_sdpa(self, q, k_rows, v_rows, meta, seq, q_pos, num_kv_heads)

    def _blocked_prefill(
        self,
        q: torch.Tensor,
        k_rows: PagedRows,
        v_rows: PagedRows,
        meta: AttentionMetadata,
        seq: int,
        q_pos: torch.Tensor,
        dv: int,
        group_stride: int,
    ) -> torch.Tensor:
        """One prefill chunk through the kernel: ``q [T, G, n, dk]`` (pre-scaled) -> fp32 ``[T, G, n, dv]``.

        Blocks of ``k = prefill_block`` consecutive query tokens, each a decode over the block's
        prefix whose rows (per group: k tokens x n heads) stop at their own token's position
        (``row_lens``); the kernel's work items are (block, group), split across threads. A last
        partial block repeats its last token.
        """
        assert self.kernel is not None
        t, g, n, dk = q.shape
        k = min(self.prefill_block, t)
        nb = -(-t // k)
        pad = nb * k - t
        lens = q_pos + 1  # [T]
        if pad:
            q = torch.cat((q, q[-1:].expand(pad, g, n, dk)))
            lens = torch.cat((lens, lens[-1:].expand(pad)))
        q_blocks = q.view(nb, k, g, n, dk).transpose(1, 2).reshape(nb, g, k * n, dk)  # [nb, G, k * n, dk]
        row_lens = lens.view(nb, 1, k, 1).expand(nb, g, k, n).reshape(nb, g, k * n)
        o = self.kernel.paged_decode(
            q_blocks,
            k_rows,
            v_rows,
            meta.block_tables[seq : seq + 1].expand(nb, -1),
            lens.view(nb, k).amax(dim=1),
            meta.context_lens_host[seq],
            meta.block_size,
            dv,
            group_stride,
            row_lens=row_lens,
        )  # [nb, G, k * n, dv]
        return o.view(nb, g, k, n, dv).transpose(1, 2).reshape(nb * k, g, n, dv)[:t]

    def kv_decode(
        self, q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, meta: AttentionMetadata, num_kv_heads: int
    ) -> torch.Tensor:
        b, h, d = q.shape
        if self.kernel is not None:
            o = self.kernel.paged_decode(
                q.view(b, num_kv_heads, h // num_kv_heads, d),  # [B, G, H/G, D]
                k_rows,
                v_rows,
                *meta.decode_tables(),
                meta.block_size,
                d,
                d,
            )
            return o.view(b, h, d).to(q.dtype)
        return torch.stack([kv_attend(q[i], k_rows, v_rows, meta.runs(i), num_kv_heads) for i in range(b)])
