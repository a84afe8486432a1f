"""Absorbed MLA decode attention in plain PyTorch: the reference every kernel backend must match.

Inputs follow the absorbed form (see :mod:`mlakit.attention.mla`)::

    q_joint  [B, H, r + d_rope]   = [q_nope W_UK | q_rope] for one new token per sequence
    kv       [B, S, r + d_rope]   the latent cache, [c_kv | k_rope] per position
    kv_lens  [B]                  valid cached positions per sequence (the new token included)

    o_latent [B, H, r]            = softmax(scale * q_joint . kv[:len]) @ c_kv[:len]

``W_UV`` is applied by the caller afterwards.
"""

from __future__ import annotations

import torch


def mla_decode_absorbed(
    q_joint: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, kv_lora_rank: int, scale: float
) -> torch.Tensor:
    """``o_latent [B, H, r]`` (dtype of ``q_joint``); softmax in fp32."""
    s = kv.shape[1]
    scores = torch.matmul(q_joint, kv.transpose(1, 2).to(q_joint.dtype)).float() * scale  # [B, H, S]
    valid = torch.arange(s, device=kv.device).unsqueeze(0) < kv_lens.unsqueeze(1)  # [B, S]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1).to(q_joint.dtype)
    return torch.matmul(probs, kv[..., :kv_lora_rank].to(q_joint.dtype))  # [B, H, r]
