"""Latent-rank budgets: from a KV fraction to per-layer ``kv_lora_rank``.

The budget is counted in cached values per token: the original caches ``2 * G * d`` per layer
(K and V of ``G`` KV heads); a converted layer caches ``kv_lora_rank + qk_rope_head_dim``.
``kv_fraction`` is the ratio of the two totals (for every cache dtype alike).

Allocation:

- ``uniform``: the same rank everywhere;
- ``greedy``: the largest remaining *relative* eigenvalue (share of that layer's calibrated,
  metric-weighted K/V energy) wins the next rank, over all layers: equalises the fraction of
  residual energy each layer gives up.  Measured to help at small budgets only (see
  docs/conversion.md), so it is an option, not the default.
- ``sensitivity``: measured, not estimated: the model's KL from the original when one layer
  alone is compressed at a few ranks (:func:`mlakit.convert.sensitivity.layer_sensitivity`);
  ranks go where they lower that most (:func:`sensitivity_ranks`). Better at both lengths and
  budgets on SmolLM2 (docs/conversion.md), an option because it needs the whole model in memory.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch

from mlakit.errors import MlakitError

Allocation = Literal["uniform", "greedy", "sensitivity"]


def latent_budget(kv_fraction: float, *, original_per_layer: int, num_layers: int, rope_dims: int) -> int:
    """Total latent width over all layers that fits ``kv_fraction`` of the original cache.

    Raises:
        MlakitError: the fraction does not leave every layer at least one latent dimension.
    """
    if not 0 < kv_fraction <= 1:
        raise MlakitError(f"kv_fraction={kv_fraction} must lie in (0, 1] (1 = the original cache size)")
    total = int(kv_fraction * original_per_layer * num_layers + 1e-9)
    latent = total - rope_dims * num_layers
    if latent < num_layers:
        raise MlakitError(
            f"kv_fraction={kv_fraction} leaves {total // num_layers} cached values per layer, not enough for "
            f"{rope_dims} rotary dims plus a latent; raise --kv-fraction or lower --rope-dims"
        )
    return latent


def uniform_ranks(total: int, num_layers: int, max_rank: int) -> tuple[int, ...]:
    """Spread ``total`` as evenly as possible (earlier layers get the remainder), capped at ``max_rank``."""
    base, extra = divmod(total, num_layers)
    return tuple(min(max_rank, base + (1 if i < extra else 0)) for i in range(num_layers))


def greedy_ranks(spectra: list[torch.Tensor], total: int, max_rank: int, min_rank: int = 1) -> tuple[int, ...]:
    """Greedy allocation on relative residual energy.

    Args:
        spectra: per layer, eigenvalues in descending order.
        total: latent dimensions to hand out over all layers.
    """
    num_layers = len(spectra)
    min_rank = min(min_rank, total // num_layers, max_rank)
    gains = []
    for i, s in enumerate(spectra):
        rel = (s / s.sum().clamp_min(1e-300))[:max_rank]
        gains += [(float(g), i) for g in rel[min_rank:]]
    gains.sort(key=lambda t: -t[0])
    ranks = [min_rank] * num_layers
    for _, i in gains[: max(0, total - min_rank * num_layers)]:
        ranks[i] += 1
    return tuple(ranks)


def sensitivity_ranks(kl: torch.Tensor, grid: tuple[int, ...], total: int, max_rank: int) -> tuple[int, ...]:
    """Ranks from measured per-layer sensitivity curves.

    Args:
        kl: ``[L, len(grid)]`` loss when layer ``l`` alone is compressed at ``grid[j]`` (ascending).
        grid: the ranks measured; every layer gets at least ``grid[0]`` and at most ``grid[-1]``.
        total: latent dimensions over all layers.

    Between measured ranks the loss is taken as linear, and each layer's curve as convex (its
    lower hull): then handing out one dimension at a time to the steepest remaining segment is
    optimal, and the result sums to ``total`` when the grid allows it.
    """
    num_layers = kl.shape[0]
    lo, hi = grid[0], min(grid[-1], max_rank)
    if not lo * num_layers <= total <= hi * num_layers:
        raise MlakitError(f"sensitivity ranks: total={total} cannot be spread over {num_layers} layers in [{lo}, {hi}]")
    segments: list[tuple[float, int, int]] = []  # (loss drop per dimension, layer, dimensions)
    for i in range(num_layers):
        pts = [(grid[0], float(kl[i, 0]))]
        for r, v in zip(grid[1:], kl[i, 1:].tolist()):
            if r > hi:
                break
            pts.append((r, float(v)))
            # lower convex hull: drop a middle point above the chord
            while len(pts) >= 3:
                (r0, v0), (r1, v1), (r2, v2) = pts[-3:]
                if (v0 - v1) / (r1 - r0) < (v1 - v2) / (r2 - r1):
                    del pts[-2]
                else:
                    break
        segments += [((a[1] - b[1]) / (b[0] - a[0]), i, b[0] - a[0]) for a, b in itertools.pairwise(pts)]
    segments.sort(key=lambda t: -t[0])  # per layer, hull slopes fall, so a layer's segments stay in order
    ranks = [lo] * num_layers
    left = total - lo * num_layers
    for _, i, n in segments:
        take = min(n, left)
        ranks[i] += take
        left -= take
    return tuple(ranks)


def check_ranks(ranks: tuple[int, ...], num_layers: int, max_rank: int) -> tuple[int, ...]:
    """Validate explicit ranks (one value for all layers, or one per layer)."""
    if len(ranks) == 1:
        ranks = ranks * num_layers
    if len(ranks) != num_layers:
        raise MlakitError(f"ranks: got {len(ranks)} values, need 1 or one per layer ({num_layers})")
    for r in ranks:
        if not 0 < r <= max_rank:
            raise MlakitError(f"rank {r} is invalid: must lie in [1, {max_rank}] (the K+V width this layer can hold)")
    return ranks
