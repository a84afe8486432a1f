"""Attention over the paged cache: absorbed MLA decode, decompressing MLA attention, baseline K/V.

Symbols as in :mod:`mlakit.attention.mla` (``c_kv``, ``k_rope``, ``w_uk``, ``w_uv``, ``q_latent``,
``o_latent``). One sequence at a time: a sequence's cache is a list of *runs* (zero-copy views of
consecutive slots, see :func:`mlakit.engine.paged.block_runs`); scores are computed per run and
concatenated, so the softmax is exact over the whole sequence and nothing is gathered.

* :func:`absorbed_decode` (data-movement-friendly; DeepSeek-V3 ``attn_impl="absorb"``)::

      score    = q_joint . [c_kv | k_rope]^T      q_joint = [q_nope W_UK | q_rope] * scale  [H, r + d_r]
      o_latent = softmax(score) c_kv             [H, r]       (W_UV is applied by the caller, batched)

  Per token the cache row is read once for the scores and once for ``o_latent``; per-head K/V
  never exist.
* :func:`decompressed_attention` (compute-friendly; prefill chunks, ``decode_path="naive"`` and
  full-RoPE models, which cannot absorb): ``K = [W_UK c_kv ; k_rope]``, ``V = W_UV c_kv`` for all
  cached tokens, then fused SDPA.
* :func:`kv_decode` / :func:`kv_attention`: the same for baseline MHA/GQA/MQA rows.

Shapes: T query tokens, S cached tokens (this sequence), L run length, H heads, G kv heads,
r kv_lora_rank, D widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlakit.attention.mha import GroupedQueryAttention
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.engine.paged import PagedRows

Runs = Sequence[tuple[int, int]]


def _run_rows(rows: PagedRows, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A run as ``(rows [L, W] in dtype, per-row scale [L] or None)``; a view unless a cast is needed."""
    data, scale = rows.view(start, n)
    if scale is not None:
        return data.to(dtype), scale.to(dtype)
    return (data if data.dtype == dtype else data.to(dtype)), None


def absorbed_decode(q_joint: torch.Tensor, rows: PagedRows, runs: Runs, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA attention of one decode query over one sequence's paged latents.

    Args:
        q_joint: ``[H, r + d_r]`` = ``[q_latent | q_rope]``, already multiplied by the softmax scale.
        rows: the layer's latent storage (rows ``[c_kv | k_rope]``).
        runs: the sequence's cached tokens as ``(first_slot, length)`` runs, in position order.
        kv_lora_rank: ``r``, the width of ``c_kv`` at the start of each row.

    Returns: ``o_latent [H, r]`` in ``q_joint``'s dtype.
    """
    r = kv_lora_rank
    if len(runs) == 1 and not rows.quantized and rows.data.dtype == q_joint.dtype:
        kv = rows.data[runs[0][0] : runs[0][0] + runs[0][1]]  # [S, r + d_r], a view
        p = F.linear(q_joint, kv).softmax(dim=-1)  # [H, S]
        return p @ kv[:, :r]  # [H, r]
    parts = [_run_rows(rows, start, n, q_joint.dtype) for start, n in runs]
    scores = []
    for kv, scale in parts:
        s = F.linear(q_joint, kv)  # [H, L]
        scores.append(s if scale is None else s * scale)
    p = torch.cat(scores, dim=-1).softmax(dim=-1)  # [H, S]
    o_latent = torch.zeros(q_joint.shape[0], r, dtype=q_joint.dtype, device=q_joint.device)
    offset = 0
    for kv, scale in parts:
        n = kv.shape[0]
        p_run = p[:, offset : offset + n]
        o_latent.addmm_(p_run if scale is None else p_run * scale, kv[:, :r])
        offset += n
    return o_latent


def decompressed_attention(
    attn: MultiHeadLatentAttention,
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_joint: torch.Tensor,
    q_pos: torch.Tensor,
) -> torch.Tensor:
    """Naive MLA attention of ``T`` queries of one sequence over its ``S`` cached latents.

    Args:
        q_nope: ``[T, H, d_nope]`` (already rotated in full-RoPE mode).
        q_rope: ``[T, H, d_rope]`` (rotated; width 0 in full-RoPE mode).
        kv_joint: ``[S, r + d_r]`` latents of positions ``0 .. S-1`` (contiguous, compute dtype).
        q_pos: ``[T]`` positions of the queries; a query sees keys at positions ``<= q_pos``.

    Returns: ``[T, H, d_v]``.
    """
    c = attn.config
    s = kv_joint.shape[0]
    h = attn.num_heads
    c_kv, k_rope = kv_joint.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
    k_nope = attn.w_uk(c_kv).view(s, h, c.qk_nope_head_dim)  # [S, H, d_nope]
    v = attn.w_uv(c_kv).view(s, h, c.v_head_dim)  # [S, H, d_v]
    if c.rope_mode == "full":
        k_pos = torch.arange(s, device=kv_joint.device).unsqueeze(0)  # [1, S]
        q, k = q_nope, attn.rotary.rotate(k_nope.unsqueeze(0), k_pos).squeeze(0)
    else:
        q = torch.cat((q_nope, q_rope), dim=-1)  # [T, H, d_qk]
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(s, h, c.qk_rope_head_dim)), dim=-1)  # [S, H, d_qk]
    return _sdpa(q, k, v, q_pos, attn.scale)


def full_rope_decode(
    attn: MultiHeadLatentAttention, q_nope: torch.Tensor, kv_joint: torch.Tensor, w_uv: torch.Tensor
) -> torch.Tensor:
    """Decode for full-RoPE MLA (keys cannot absorb ``W_UK``): decompress keys, absorb ``W_UV``.

    RoPE sits between ``q`` and ``W_UK c_kv`` at every key position, so the keys must be
    decompressed and rotated; values carry no rotation, so ``o = W_UV (softmax(score) c_kv)``
    still holds and halves the decompression work.

    Args:
        q_nope: ``[H, d_nope]`` the rotated query of the new token (at position ``S - 1``).
        kv_joint: ``[S, r]`` latents of positions ``0 .. S-1``.
        w_uv: ``[H, r, d_v]`` (see :class:`mlakit.engine.runner.AbsorbedWeights`).

    Returns: ``[H, d_v]``.
    """
    c = attn.config
    s = kv_joint.shape[0]
    k = attn.w_uk(kv_joint).view(1, s, attn.num_heads, c.qk_nope_head_dim)  # [1, S, H, d_nope]
    k = attn.rotary.rotate(k, torch.arange(s, device=kv_joint.device).unsqueeze(0))[0]  # [S, H, d_nope]
    p = torch.einsum("hd,shd->hs", q_nope * attn.scale, k).softmax(dim=-1)  # [H, S]
    o_latent = p @ kv_joint  # [H, r]
    return torch.bmm(o_latent.unsqueeze(1), w_uv).squeeze(1)  # [H, d_v]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of ``q [T, H, D]`` over ``k, v [S, H, D]`` keys at positions ``0..S-1``; returns ``[T, H, D_v]``."""
    t, s = q.shape[0], k.shape[0]
    mask = None
    if t > 1 or int(q_pos[0]) < s - 1:
        mask = torch.arange(s, device=q.device).unsqueeze(0) <= q_pos.unsqueeze(1)  # [T, S]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [H, T, D_v]
    return o.transpose(0, 1)


def kv_attention(
    attn: GroupedQueryAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor
) -> torch.Tensor:
    """Baseline attention of ``q [T, H, D]`` over one sequence's ``k, v [S, G, D]``; returns ``[T, H, D]``."""
    c = attn.config
    group = c.num_heads // c.num_kv_heads
    if group > 1:  # each kv head serves its group of query heads
        k = k.repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group, dim=1)
    return _sdpa(q, k, v, q_pos, attn.scale)


def kv_decode(
    attn: GroupedQueryAttention, q: torch.Tensor, k_rows: PagedRows, v_rows: PagedRows, runs: Runs
) -> torch.Tensor:
    """Baseline decode of one query ``q [H, D]`` over one sequence's paged K/V; returns ``[H, D]``.

    Query heads are grouped per kv head (``[G, H/G, D]``) so each cached K/V row is read once,
    without expanding K/V to all heads.
    """
    c = attn.config
    g, d = c.num_kv_heads, c.head_dim
    qg = q.view(g, -1, d) * attn.scale  # [G, H/G, D]
    parts = [(_run_rows(k_rows, s0, n, q.dtype), _run_rows(v_rows, s0, n, q.dtype)) for s0, n in runs]
    scores = []
    for (k, ks), _ in parts:
        s = torch.matmul(qg, k.view(-1, g, d).permute(1, 2, 0))  # [G, H/G, L]
        scores.append(s if ks is None else s * ks)
    p = torch.cat(scores, dim=-1).softmax(dim=-1)  # [G, H/G, S]
    o = torch.zeros_like(qg)
    offset = 0
    for _, (v, vs) in parts:
        n = v.shape[0]
        p_run = p[..., offset : offset + n]
        o += torch.matmul(p_run if vs is None else p_run * vs, v.view(n, g, d).transpose(0, 1))  # [G, H/G, D]
        offset += n
    return o.reshape(c.num_heads, d)
