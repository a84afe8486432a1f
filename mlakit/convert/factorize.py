"""Calibration-aware low-rank factorization of the K/V projections into one shared latent.

Symbols (one layer; ``n`` = hidden size, ``G`` KV heads, ``d`` head dim, ``r`` latent rank):

- ``x~ = [x; 1]``: the attention input (after the pre-attention RMSNorm) augmented with a 1 so
  that biases (Qwen2) are ordinary weight columns.  ``sigma = E[x~ x~^T]`` (``[n+1, n+1]``) over
  calibration text is all the calibration this module needs: the covariance of any linear
  function of ``x`` (keys, values, queries) follows from it.
- ``y = W x~``: the stacked per-KV-head keys and values to be compressed (``[2 G d, n+1]``).
- ``M``: a metric saying how much an error in each output coordinate costs; block diagonal
  (key block, value block).  The rank-``r`` latent minimising ``E || M (y - y^) ||^2`` is PCA of
  ``M y``: with ``U`` the top-``r`` eigenvectors of ``M W sigma W^T M``,
  ``c_kv = U^T M W x~`` (this is ``w_dkv``) and ``y^ = M^{-1} U c_kv`` (``w_uk``/``w_uv``).

Metrics (``key_metric`` / ``value_metric``):

- ``"balanced"``: identity, keys scaled so their calibrated energy equals the values' (without
  it the larger of the two takes all the rank);
- ``"query"``: keys weighted by ``sigma_q^{1/2}``, the second moment of the queries that read
  that KV head (all heads of its GQA group): the error that matters is ``q . (k - k^)``;
- ``"output"``: values weighted by ``(sum_h W_o,h^T W_o,h)^{1/2}`` over the heads of the group:
  the error that matters is what ``w_o`` makes of ``v - v^``.

``method="svd"`` ignores calibration and truncates the SVD of the stacked weights (baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Method = Literal["pca", "svd"]
KeyMetric = Literal["balanced", "query", "query_diag"]
ValueMetric = Literal["balanced", "output"]


@contextmanager
def single_thread() -> Iterator[None]:
    """LAPACK eigh/svd can stall when threads fight over busy cores; run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass(frozen=True)
class AttentionWeights:
    """One Llama-style attention layer in float64, biases folded in as a last column.

    Shapes: ``w_q [Hq*d, n+1]``, ``w_k [G*d, n+1]``, ``w_v [G*d, n+1]``, ``w_o [n, Hq*d]``.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _sqrtm(a: torch.Tensor, *, inverse: bool = False, damp: float = 1e-6) -> torch.Tensor:
    """Symmetric PSD square root (or inverse root), eigenvalues floored at ``damp * max``."""
    a = (a + a.T) / 2
    with single_thread():
        e, v = torch.linalg.eigh(a)
    e = e.clamp_min(damp * e.max().clamp_min(1e-300))
    p = e.rsqrt() if inverse else e.sqrt()
    return (v * p) @ v.T


def key_metric_blocks(w: AttentionWeights, sigma: torch.Tensor, kind: KeyMetric) -> list[torch.Tensor]:
    """Per-KV-head ``[d, d]`` key metric (see module docstring)."""
    d, g = w.head_dim, w.group
    blocks = []
    for j in range(w.num_kv_heads):
        if kind == "balanced":
            blocks.append(torch.eye(d, dtype=sigma.dtype))
            continue
        sq = torch.zeros(d, d, dtype=sigma.dtype)
        for h in range(j * g, (j + 1) * g):
            wq = w.w_q[h * d : (h + 1) * d]
            sq += wq @ sigma @ wq.T
        if kind == "query_diag":
            # RoPE rotates each (i, i + d/2) pair by a position-dependent angle: averaged over
            # relative positions only the pair's total energy survives.
            e = sq.diagonal()
            e = (e[: d // 2] + e[d // 2 :]) / 2
            blocks.append(torch.diag(torch.cat([e, e]).sqrt()))
        else:
            blocks.append(_sqrtm(sq))
    return blocks


def value_metric_blocks(w: AttentionWeights, kind: ValueMetric) -> list[torch.Tensor]:
    """Per-KV-head ``[d, d]`` value metric (see module docstring)."""
    d, g = w.head_dim, w.group
    blocks = []
    for j in range(w.num_kv_heads):
        if kind == "balanced":
            blocks.append(torch.eye(d, dtype=w.w_o.dtype))
            continue
        so = torch.zeros(d, d, dtype=w.w_o.dtype)
        for h in range(j * g, (j + 1) * g):
            wo = w.w_o[:, h * d : (h + 1) * d]
            so += wo.T @ wo
        blocks.append(_sqrtm(so))
    return blocks


@dataclass(frozen=True)
class LowRankKV:
    """``y^ = up @ (down @ x~)``.

    ``down [r, n+1]`` is ``w_dkv`` (bias as last column); ``up_k [Rk, r]`` and ``up_v [Rv, r]``.
    """

    down: torch.Tensor
    up_k: torch.Tensor
    up_v: torch.Tensor


def _balance(a_k: torch.Tensor, a_v: torch.Tensor, sigma: torch.Tensor) -> float:
    """Key factor that makes the calibrated energy of weighted keys equal that of values."""
    return float(torch.sqrt(torch.trace(a_v @ sigma @ a_v.T) / torch.trace(a_k @ sigma @ a_k.T).clamp_min(1e-300)))


def energy_spectrum(
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    sigma: torch.Tensor,
    m_k: torch.Tensor,
    m_v: torch.Tensor,
    key_weight: float = 1.0,
) -> torch.Tensor:
    """Eigenvalues (descending) of the weighted K/V covariance :func:`factorize` truncates (for rank allocation)."""
    a_k, a_v = m_k @ w_k, m_v @ w_v
    w = torch.cat([_balance(a_k, a_v, sigma) * key_weight * a_k, a_v])
    c = w @ sigma @ w.T
    with single_thread():
        return torch.linalg.eigvalsh((c + c.T) / 2).flip(0).clamp_min(0)


def _top_eigvecs(c: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors (descending) of a symmetric matrix, as columns."""
    with single_thread():
        _, vecs = torch.linalg.eigh((c + c.T) / 2)
    return vecs[:, vecs.shape[1] - k :].flip(1)


def factorize(
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    sigma: torch.Tensor | None,
    rank: int,
    *,
    m_k: torch.Tensor | None = None,
    m_v: torch.Tensor | None = None,
    key_scale: float | None = None,
    key_weight: float = 1.0,
    method: Method = "pca",
    key_share: float | None = None,
) -> LowRankKV:
    """Rank-``rank`` shared latent for keys ``w_k [Rk, n+1]`` and values ``w_v [Rv, n+1]``.

    Args:
        sigma: ``E[x~ x~^T]`` (needed for ``method="pca"``).
        m_k, m_v: metrics (identity when ``None``); must be invertible.
        key_scale: factor on the key metric; ``None`` balances calibrated K and V energy.
        key_weight: multiplies ``key_scale`` (after balancing): > 1 gives keys more of the rank.
        method: ``"pca"`` (calibrated) or ``"svd"`` (weights only; metrics and sigma ignored).
        key_share: separate K and V budgets: ``round(key_share * rank)`` latent dims are the
            keys' own PCA, the rest the values' (a block latent: ``w_uk`` reads only the first
            block, ``w_uv`` only the second). ``None``: one joint PCA decides the split.
    """
    rk, rv = w_k.shape[0], w_v.shape[0]
    if not 0 < rank <= min(rk + rv, w_k.shape[1]):
        raise ValueError(f"rank={rank} must lie in [1, {min(rk + rv, w_k.shape[1])}]")
    if method == "svd":
        w = torch.cat([w_k, w_v])
        with single_thread():
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return LowRankKV(down=s[:rank, None] * vh[:rank], up_k=u[:rk, :rank], up_v=u[rk:, :rank])
    assert sigma is not None
    m_k = torch.eye(rk, dtype=w_k.dtype) if m_k is None else m_k
    m_v = torch.eye(rv, dtype=w_v.dtype) if m_v is None else m_v
    a_k, a_v = m_k @ w_k, m_v @ w_v
    if key_scale is None:
        key_scale = _balance(a_k, a_v, sigma)
    key_scale *= key_weight
    a = torch.cat([key_scale * a_k, a_v])  # [Rk+Rv, n+1]
    if key_share is None:
        u = _top_eigvecs(a @ sigma @ a.T, rank)  # [Rk+Rv, r]
    else:
        r_k = min(rk, max(0, round(key_share * rank)))
        r_v = rank - r_k
        if r_v > rv:
            r_k, r_v = rank - rv, rv
        u = torch.zeros(rk + rv, rank, dtype=a.dtype)
        u[:rk, :r_k] = _top_eigvecs(a[:rk] @ sigma @ a[:rk].T, r_k)
        u[rk:, r_k:] = _top_eigvecs(a[rk:] @ sigma @ a[rk:].T, r_v)
    down = u.T @ a
    up_k = torch.linalg.solve(key_scale * m_k, u[:rk])
    up_v = torch.linalg.solve(m_v, u[rk:])
    return LowRankKV(down=down, up_k=up_k, up_v=up_v)
