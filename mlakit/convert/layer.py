"""Convert one Llama attention layer into MLA weights (mlakit parameter names).

Both forms share the latent: ``c_kv = w_dkv x`` compresses every KV head's position-free key
and value at once; ``w_uk``/``w_uv`` decompress it for all query heads (GQA: the heads of a group
read the same rows).

- ``rope_mode="full"``: the latent is taken before RoPE (``qk_nope_head_dim = d``,
  ``qk_rope_head_dim = 0``); the decompressed key is rotated.  Exact positions, no absorption.
- ``rope_mode="decoupled"``: :func:`mlakit.convert.rope.decouple_rope` splits a shared rotary key
  ``w_kr`` (``2K`` dims, cached beside the latent) off the ``K`` highest frequencies; queries are
  ``[q_nope (d) | q_rope (2K)]`` per head.  The head dim grows from ``d`` to ``d + 2K``, so the
  query is multiplied by ``sqrt((d + 2K) / d)`` to keep the original ``1/sqrt(d)`` softmax scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from mlakit.convert.factorize import (
    AttentionWeights,
    KeyMetric,
    Method,
    ValueMetric,
    factorize,
    key_metric_blocks,
    value_metric_blocks,
)
from mlakit.convert.rope import decouple_rope

RopeKind = Literal["decoupled", "full"]


@dataclass(frozen=True)
class LayerRecipe:
    """How to convert every layer (ranks come per layer, separately)."""

    rope: RopeKind = "decoupled"
    method: Method = "pca"
    rope_pairs: int = 16
    key_metric: KeyMetric = "query"
    value_metric: ValueMetric = "output"
    rope_query_weighted: bool = True
    key_weight: float = 1.0
    rotation_average: bool = False
    complex_mixing: bool = True
    key_share: float | None = None


def fold_head_norms(
    w: AttentionWeights, q_norm: torch.Tensor, k_norm: torch.Tensor, sigma: torch.Tensor, eps: float
) -> AttentionWeights:
    """Per-head q/k RMSNorms (Qwen3, Gemma 3) folded into the projections, approximately.

    ``RMSNorm(z) = g * z / rms(z)`` divides each token's head by its own RMS; no linear map does
    that, and decoupled RoPE needs a linear key (the rotary key mixes heads before RoPE, the latent
    must be absorbable). The fold replaces ``rms(z)`` by the head's calibrated
    ``sqrt(E[mean(z^2)] + eps)`` (from ``sigma = E[x~ x~^T]``): exact for tokens of average norm,
    off by the ratio for the rest. Measured in docs/conversion.md.

    Args:
        q_norm, k_norm: ``[d]`` norm weights as applied (offsets and query scale included).
    """
    d = w.head_dim

    def fold(rows: torch.Tensor, g: torch.Tensor, heads: int) -> torch.Tensor:
        blocks = rows.view(heads, d, -1)  # [heads, d, n+1]
        ms = torch.einsum("hdn,nm,hdm->h", blocks, sigma, blocks) / d  # E[mean(z^2)] per head
        scale = g.double().view(1, d, 1) / (ms + eps).sqrt().view(heads, 1, 1)
        return (blocks * scale).reshape(heads * d, -1)

    return dataclasses.replace(w, w_q=fold(w.w_q, q_norm, w.num_heads), w_k=fold(w.w_k, k_norm, w.num_kv_heads))


def layer_dims(recipe: LayerRecipe, head_dim: int) -> tuple[int, int]:
    """``(qk_nope_head_dim, qk_rope_head_dim)`` of a converted layer."""
    return (head_dim, 2 * recipe.rope_pairs) if recipe.rope == "decoupled" else (head_dim, 0)


def _expand(rows_per_kv: torch.Tensor, w: AttentionWeights) -> torch.Tensor:
    """``[G*d, r]`` -> ``[H*d, r]``: each query head reads its KV group's rows."""
    d = w.head_dim
    blocks = rows_per_kv.view(w.num_kv_heads, d, -1)  # [G, d, r]
    return blocks.repeat_interleave(w.group, dim=0).reshape(w.num_heads * d, -1)  # [H*d, r]


def metrics(w: AttentionWeights, sigma: torch.Tensor, recipe: LayerRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    # Measured: the full (unrotated) query metric beats the rotation-averaged diagonal one even
    # in full mode, where the key is rotated after decompression (docs/conversion.md).
    m_k = torch.block_diag(*key_metric_blocks(w, sigma, recipe.key_metric))
    m_v = torch.block_diag(*value_metric_blocks(w, recipe.value_metric))
    return m_k, m_v


def convert_layer(
    w: AttentionWeights,
    sigma: torch.Tensor,
    rank: int,
    recipe: LayerRecipe,
    rope_theta: float,
    rotation: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """MLA weights for one layer.

    Returns:
        ``(state, rope_theta')``: ``state`` maps mlakit names (``w_q.weight``, ``w_dkv.weight``,
        ``w_kr.weight``, ``w_uk.weight``, ``w_uv.weight``, ``w_o.weight``, and ``*.bias`` where
        the source had biases) to float64 tensors; ``rope_theta'`` the base for the new rotary dims.
    """
    n = w.w_q.shape[1] - 1
    d, heads = w.head_dim, w.num_heads
    if recipe.method == "svd":
        eye = torch.eye(n + 1, dtype=w.w_k.dtype)
        sigma_rope = eye
    else:
        sigma_rope = sigma
    state: dict[str, torch.Tensor] = {}
    if recipe.rope == "decoupled":
        dk = decouple_rope(
            w,
            sigma_rope,
            recipe.rope_pairs,
            rope_theta,
            query_weighted=recipe.rope_query_weighted and recipe.method != "svd",
            rotation=rotation if recipe.rotation_average and recipe.method != "svd" else None,
            complex_mixing=recipe.complex_mixing,
        )
        w_k_nope, theta = dk.w_k_nope, dk.rope_theta
        dr = 2 * recipe.rope_pairs
        fix = math.sqrt((d + dr) / d)  # keep the original 1/sqrt(d) softmax scale
        q = torch.cat([dk.w_q_nope.view(heads, d, n + 1), dk.w_q_rope], dim=1) * fix  # [H, d+dr, n+1]
        w_q = q.reshape(heads * (d + dr), n + 1)
        state["w_kr.weight"], state["w_kr.bias"] = dk.w_kr[:, :n], dk.w_kr[:, n]
    else:
        w_k_nope, theta, w_q = w.w_k, rope_theta, w.w_q
    if recipe.method == "svd":
        f = factorize(w_k_nope, w.w_v, None, rank, method="svd")
    else:
        m_k, m_v = metrics(w, sigma, recipe)
        f = factorize(
            w_k_nope, w.w_v, sigma, rank, m_k=m_k, m_v=m_v, key_weight=recipe.key_weight, key_share=recipe.key_share
        )
    state["w_q.weight"], state["w_q.bias"] = w_q[:, :n], w_q[:, n]
    state["w_dkv.weight"], state["w_dkv.bias"] = f.down[:, :n], f.down[:, n]
    state["w_uk.weight"] = _expand(f.up_k, w)
    state["w_uv.weight"] = _expand(f.up_v, w)
    state["w_o.weight"] = w.w_o
    return state, theta
