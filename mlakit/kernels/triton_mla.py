"""Absorbed MLA decode attention as a Triton kernel (split-KV "flash decoding").

Same contract as :func:`mlakit.kernels.torch_mla.mla_decode_absorbed`. The latent cache is read
once: every program owns ``BLOCK_H`` heads of one sequence and one slice of its cached positions,
streams ``[c_kv | k_rope]`` tiles through an online softmax, and keeps ``o_latent`` for its heads
in registers. All H heads share the one latent stream (MQA-like), so grouping heads in a program
divides cache traffic by ``BLOCK_H``. A small PyTorch epilogue merges the per-slice partial
results with their log-sum-exp weights.

Under ``TRITON_INTERPRET=1`` it runs on the CPU (slowly) for correctness tests; ``tl.dot`` there
takes fp32, so tiles are upcast before each product. On the GPU bf16/fp16 tiles go to the tensor
cores as they are (fp32 accumulate); fp32 inputs use exact ("ieee") products.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_decode_kernel(
    q_ptr, kv_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kvb, stride_kvs, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale, num_heads, rank, rope, split_len,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(lens_ptr + b)
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
        kv_base = kv_ptr + b * stride_kvb + offs_n[:, None] * stride_kvs
        c_kv = tl.load(kv_base + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [N, R]
        k_rope = tl.load(kv_base + rank + offs_dr[None, :], mask=mask_n[:, None] & mask_dr[None, :], other=0.0)
        if UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_rope = k_rope.to(tl.float32)
        scores = tl.dot(q_lat, tl.trans(c_kv), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        scores = scores * scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # a slice past this sequence's end contributes nothing
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_base = o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os
    tl.store(o_base + offs_r[None, :], out, mask=mask_h[:, None] & mask_r[None, :])
    tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=mask_h)


def mla_decode_absorbed(
    q_joint: torch.Tensor,
    kv: torch.Tensor,
    kv_lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int = 32,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """``o_latent [B, H, r]``: see :func:`mlakit.kernels.torch_mla.mla_decode_absorbed`.

    ``num_splits`` slices of the cached positions are processed in parallel (default: enough
    programs to fill the device at small batch).
    """
    b, h, width = q_joint.shape
    s = kv.shape[1]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if block_h is None:  # share each cache tile among as many heads as registers allow
        block_h = 16 if interpret else min(64, max(16, triton.next_power_of_2(h)))
    rope = width - kv_lora_rank
    if kv.stride(-1) != 1 or q_joint.stride(-1) != 1:
        raise ValueError("q_joint and kv must be contiguous in their last dimension")
    if num_splits is None:
        programs = b * triton.cdiv(h, block_h)
        num_splits = max(1, min(triton.cdiv(s, 256), triton.cdiv(264, programs)))
    split_len = triton.cdiv(triton.cdiv(s, num_splits), block_n) * block_n
    num_splits = triton.cdiv(s, split_len)
    o_part = torch.empty(b, h, num_splits, kv_lora_rank, dtype=torch.float32, device=q_joint.device)
    lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q_joint.device)
    lens = kv_lens.to(device=q_joint.device, dtype=torch.int32)
    grid = (b, triton.cdiv(h, block_h), num_splits)
    _mla_decode_kernel[grid](
        q_joint, kv, lens, o_part, lse,
        q_joint.stride(0), q_joint.stride(1), kv.stride(0), kv.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        scale, h, kv_lora_rank, rope, split_len,
        BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_R=triton.next_power_of_2(kv_lora_rank), BLOCK_DR=max(16, triton.next_power_of_2(max(rope, 1))),
        UPCAST=interpret, PRECISION="ieee" if q_joint.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    # merge slices: weights exp(lse_i - logsumexp(lse)); empty slices have lse = -inf -> weight 0
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)  # [B, H, splits, 1]
    return (o_part * weights).sum(dim=2).to(q_joint.dtype)
