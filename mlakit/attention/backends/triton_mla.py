"""The Triton backend: absorbed MLA decode as a split-KV ("flash decoding") kernel over block tables.

Same contract as the ``torch`` backend (see :mod:`mlakit.attention.backends.base`). Every
program owns ``BLOCK_H`` heads of one sequence and one slice of its positions; it maps positions
to cache slots through the block table (``slot = table[n // block_size] * block_size + n %
block_size``), streams ``[c_kv | k_rope]`` tiles through an online softmax and keeps
``o_latent`` for its heads in registers. All H heads share the one latent stream (MQA-like), so
grouping heads in a program divides cache traffic by ``BLOCK_H``; splitting positions fills the
device at small batch and long context. A small PyTorch epilogue merges the slices with their
log-sum-exp weights. int8 rows fold their per-row scale into the scores and probabilities.

Under ``TRITON_INTERPRET=1`` it runs on the CPU (slowly) for correctness tests; ``tl.dot`` there
takes fp32, so tiles are upcast before each product. On the GPU bf16/fp16 tiles go to the tensor
cores as they are (fp32 accumulate); fp32 inputs use exact ("ieee") products.

Baseline K/V decode and the dense gather use the reference implementations (torch ops).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from mlakit.attention.backends.torch_ref import Backend as TorchBackend
from mlakit.paged import PagedRows

if TYPE_CHECKING:
    from mlakit.attention.metadata import AttentionMetadata


@triton.jit
def _mla_decode_kernel(
    q_ptr, kv_ptr, scale_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kvs, stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    num_heads, rank, rope, page,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(lens_ptr + b)
    # each sequence splits its own length over the grid's slices, so the grid depends only on the
    # batch (a captured CUDA graph replays it for any lengths) and short sequences waste no slices
    split_len = tl.cdiv(tl.cdiv(kv_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * split_len
    stop = tl.minimum(start + split_len, kv_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    mask_h = offs_h < num_heads
    mask_r = offs_r < rank
    mask_dr = offs_dr < rope

    q_base = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
    q_lat = tl.load(q_base + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_rope = tl.load(q_base + rank + offs_dr[None, :], mask=mask_h[:, None] & mask_dr[None, :], other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        block = tl.load(table_ptr + b * stride_tb + offs_n // page, mask=mask_n, other=0)
        slot = block.to(tl.int64) * page + offs_n % page
        kv_base = kv_ptr + slot[:, None] * stride_kvs
        c_kv = tl.load(kv_base + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [N, R]
        k_rope = tl.load(kv_base + rank + offs_dr[None, :], mask=mask_n[:, None] & mask_dr[None, :], other=0.0)
        if HAS_SCALE or UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_rope = k_rope.to(tl.float32)
        else:
            c_kv = c_kv.to(q_lat.dtype)
            k_rope = k_rope.to(q_lat.dtype)
        scores = tl.dot(q_lat.to(c_kv.dtype), tl.trans(c_kv), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        scores += tl.dot(q_rope.to(c_kv.dtype), tl.trans(k_rope), input_precision=PRECISION)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + slot, mask=mask_n, other=0.0)
            scores = scores * row_scale[None, :]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_SCALE:
            p_v = p * row_scale[None, :]
        else:
            p_v = p
        acc = acc * alpha[:, None] + tl.dot(p_v.to(c_kv.dtype), c_kv, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # a slice past this sequence's end contributes nothing
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_base = o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os
    tl.store(o_base + offs_r[None, :], out, mask=mask_h[:, None] & mask_r[None, :])
    tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=mask_h)


def mla_decode_paged(
    q_joint: torch.Tensor,
    rows: PagedRows,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context: int,
    block_size: int,
    kv_lora_rank: int,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int = 32,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """``o_latent [B, H, r]`` for ``q_joint [B, H, r + d_r]`` (pre-scaled) over paged ``rows``.

    ``block_tables [B, M]`` and ``context_lens [B]`` describe each sequence; ``max_context`` (a
    host int, an upper bound) sizes the split grid. ``num_splits`` slices of each sequence's
    positions run in parallel (default: enough programs to fill the device at small batch); each
    sequence divides its own length among them.
    """
    b, h, width = q_joint.shape
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if block_h is None:  # share each cache tile among as many heads as registers allow
        block_h = 16 if interpret else min(64, max(16, triton.next_power_of_2(h)))
    rope = width - kv_lora_rank
    kv = rows.data
    if kv.stride(-1) != 1 or q_joint.stride(-1) != 1:
        raise ValueError("q_joint and the cache rows must be contiguous in their last dimension")
    if num_splits is None:
        programs = b * triton.cdiv(h, block_h)
        num_splits = max(1, min(triton.cdiv(max_context, 256), triton.cdiv(264, programs)))
    o_part = torch.empty(b, h, num_splits, kv_lora_rank, dtype=torch.float32, device=q_joint.device)
    lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q_joint.device)
    tables = block_tables.to(torch.int32)
    lens = context_lens.to(torch.int32)
    scale = rows.scale if rows.scale is not None else lens  # any pointer; unused without HAS_SCALE
    grid = (b, triton.cdiv(h, block_h), num_splits)
    _mla_decode_kernel[grid](
        q_joint, kv, scale, tables, lens, o_part, lse,
        q_joint.stride(0), q_joint.stride(1), kv.stride(0), tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        h, kv_lora_rank, rope, block_size,
        BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_R=triton.next_power_of_2(kv_lora_rank), BLOCK_DR=max(16, triton.next_power_of_2(max(rope, 1))),
        HAS_SCALE=rows.scale is not None, UPCAST=interpret,
        PRECISION="ieee" if q_joint.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    # merge slices: weights exp(lse_i - logsumexp(lse)); empty slices have lse = -inf -> weight 0
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)  # [B, H, splits, 1]
    return (o_part * weights).sum(dim=2).to(q_joint.dtype)


class Backend(TorchBackend):
    name = "triton"

    def latent_decode(
        self, q_joint: torch.Tensor, rows: PagedRows, meta: AttentionMetadata, kv_lora_rank: int
    ) -> torch.Tensor:
        # bf16/fp16 rows take a query of their own dtype: the products then run on the tensor cores,
        # where an fp32 query (the absorbed weights' default) forces exact fp32 products. The CPU
        # kernel rounds the query the same way for bf16 rows.
        low = rows.data.dtype in (torch.bfloat16, torch.float16)
        q = q_joint.to(rows.data.dtype) if low else q_joint
        o_latent = mla_decode_paged(q.contiguous(), rows, *meta.decode_tables(), meta.block_size, kv_lora_rank)
        return o_latent.to(q_joint.dtype)
