"""Pieces every attention kind shares: the rotary tables, position-based masking, soft-capped SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlakit.config import RopeScaling
from mlakit.rope import apply_rope, rope_tables


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[max_positions, dim]`` as non-persistent buffers, looked up by position.

    A model shares one instance between its layers. Tables are fp32 and never saved.
    """

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.dim, self.max_positions, self.theta, self.scaling = dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables, e.g. after building the module on the meta device."""
        cos, sin = rope_tables(self.dim, self.max_positions, self.theta, self.scaling)
        self.cos, self.sin = cos.to(device), sin.to(device)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x [B, T, H, D]`` at ``positions [B, T]``."""
        return apply_rope(x, self.cos[positions], self.sin[positions])


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, S]``: query at position p sees keys at positions <= p.

    ``q_pos [B, T]``; ``k_pos [B, S]`` or ``[S]``. Stale cache slots beyond a sequence's end lie
    at positions greater than any of its queries, so this one rule covers causality, chunked
    prefill at ``start_pos > 0`` and ragged batches. With a sliding ``window``, only keys at
    positions ``> p - window`` are seen (Hugging Face's ``sliding_window`` semantics).
    """
    if k_pos.dim() == 1:
        k_pos = k_pos.unsqueeze(0)
    diff = q_pos.unsqueeze(2) - k_pos.unsqueeze(1)  # [B, T, S]
    seen = diff >= 0
    if window is not None:
        seen = seen & (diff < window)
    return seen.unsqueeze(1)  # [B, 1, T, S]


def mask_or_causal(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, causal)`` for :func:`attend`: ``(None, True)`` when :func:`position_mask` would be
    exactly the causal mask, else ``(position_mask(...), False)``.

    That is the case of a prefill from an empty cache: ``T == S > 1``, no window, and every row's
    query and key positions are ``0..T-1``. SDPA's ``is_causal`` path skips the masked half of the
    score tiles; with the same mask spelled out it computes them (3,072 tokens, 9 heads of 112 on
    2 CPU cores: 0.25 vs 0.14 s per layer). One comparison of the positions (a host sync on GPU,
    as the cache's ``kv_len`` already is); decode steps (``T == 1``) skip it.
    """
    t, s = q_pos.shape[-1], k_pos.shape[-1]
    if window is None and t == s and t > 1:
        ar = torch.arange(t, device=q_pos.device)
        if bool((q_pos == ar).all()) and bool((k_pos == ar).all()):
            return None, True
    return position_mask(q_pos, k_pos, window), False


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q [B, H, T, D]`` over ``k [B, H, S, D]``, ``v [B, H, S, D_v]``.

    Fused SDPA, unless ``softcap`` is set: then the scaled scores become ``softcap *
    tanh(s / softcap)`` before the mask and the softmax (Gemma 2), which SDPA cannot do, so the
    scores are materialised (softmax in fp32, as Hugging Face's eager path).
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    scores = softcap * torch.tanh(scores / softcap)
    t, s = scores.shape[-2:]
    if causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)


def check_positions(x: torch.Tensor, positions: torch.Tensor) -> None:
    """``positions`` must be ``[B, T]`` like ``x``'s leading dims."""
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {tuple(x.shape[:2])} ([B, T])")
