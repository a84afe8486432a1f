"""Turning a Llama head's full RoPE into DeepSeek's decoupled form: a small shared rotary key.

Llama rotates all ``d`` dims of every key head: pair ``i`` (dims ``i`` and ``i + d/2``, the
"halves" convention) turns at ``theta^(-2i/d)``.  DeepSeek's MLA caches one rotary key
``k_rope`` of ``qk_rope_head_dim`` dims shared by every head, and leaves the rest position-free.

RoRoPE (TransMLA): rotating pair ``f`` of all ``G`` KV heads by the same angle commutes with any
mixing *across heads* of that pair.  So per frequency we take the principal direction ``u_f``
across heads (PCA of the ``G`` per-head pair vectors, query-weighted) as the shared rotary key,
``k_rope,f = sum_g b_g k_g,f``, and keep only the residual ``k_g,f - a_g k_rope,f`` as a
position-free ("nope") key.  Scores stay exact except for the residual's missing rotation; the
query of head ``h`` in group ``g`` reads the rotary key through ``a_g``.

Complex mixing (mlakit's extension, the default): a RoPE pair is a complex number ``z = k0 + i k1``
that RoPE multiplies by ``e^{i w t}``; *complex* weights (a rotation and a scale per head) commute
with that just as real ones do.  So the PCA runs on the Hermitian covariance ``E[z_g conj(z_h)]``:
``b_g`` and ``a_g`` become complex, the query reads ``q conj(a_g)`` (a 2x2 rotation-scale of its
pair), and heads whose keys are phase-shifted copies of each other share one rotary key exactly.
TransMLA's real weights are the special case ``Im = 0`` and capture less energy: on SmolLM2 with
no latent compression the decoupled split alone costs x1.24 instead of x1.50 (16 pairs) and
x1.14 instead of x1.26 (all 32 pairs); docs/conversion.md.

What the position-free part loses: a query at ``t`` and a key at ``s`` meet through the rotation
``R(-w (t - s))``; dropping it replaces that with the identity.  An alternative stand-in (an
option, measured *worse* on SmolLM2: attention sinks far away average high frequencies to ~0)
is the *expected* rotation under the layer's own attention, ``A = E[R(-w (t - s))]`` (measured
per head and pair on calibration text, :func:`mlakit.convert.calibrate.attention_rotation_moments`):
a high-frequency pair whose angle is random over the attended keys averages to ~0 (drop it, do
not keep it unrotated), a low-frequency one to ~I.  It is folded into the nope query,
``q_nope,h = A_h^T q_h``, so keys, cache and absorption are unchanged.

Which pairs: only the ``K`` highest frequencies (``i < K``) keep a rotary component.  The low
frequencies turn less than a radian or so over the context and lose little when made
position-free, while ranking pairs by key/query norm picks exactly those near-static pairs and
destroys the model (measured, see docs/conversion.md).  Keeping the highest pairs also keeps
the frequencies expressible: pair ``j`` of a ``2K``-dim rotary key turns at
``theta'^(-2j/2K)``, equal to the original ``theta^(-2j/d)`` when ``theta' = theta^(2K/d)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlakit.config import RopeScaling
from mlakit.convert.factorize import AttentionWeights, single_thread
from mlakit.rope import rope_inv_freq


@dataclass(frozen=True)
class SourceRope:
    """One RoPE of a source model: base, scaling (Llama 3), and the farthest distance its layers
    attend over (``window``: sliding-window layers; ``None``: the whole context)."""

    theta: float
    scaling: RopeScaling | None = None
    window: int | None = None


@dataclass(frozen=True)
class DecoupledKeys:
    """Result of :func:`decouple_rope` for one layer.

    Attributes:
        w_kr: ``[2K, n+1]`` shared rotary key (halves layout), bias as last column.
        w_q_rope: ``[H, 2K, n+1]`` per-head rotary query.
        w_k_nope: ``[G*d, n+1]`` position-free keys (residuals on the kept pairs).
        w_q_nope: ``[H*d, n+1]`` position-free queries (rotation-averaged when stats are given).
        rope_theta: base giving the kept pairs their original frequencies.
    """

    w_kr: torch.Tensor
    w_q_rope: torch.Tensor
    w_k_nope: torch.Tensor
    w_q_nope: torch.Tensor
    rope_theta: float


def _pair_rows(head: int, pair: int, d: int) -> list[int]:
    return [head * d + pair, head * d + pair + d // 2]


def decoupled_rope_theta(rope_theta: float, rope_pairs: int, head_dim: int) -> float:
    """Base under which pair ``j`` of a ``2K``-dim rotary key turns at the original ``theta^(-2j/d)``."""
    return rope_theta ** (2 * rope_pairs / head_dim)


def rope_pairs_for_context(
    rope_theta: float,
    head_dim: int,
    context_length: int,
    *,
    scaling: RopeScaling | None = None,
    min_angle: float = 1.0,
) -> int:
    """How many of the highest-frequency pairs turn by at least ``min_angle`` radians over ``context_length``.

    Pair ``j`` turns by ``L * f_j`` between the first and the last token of a context of ``L``
    tokens, ``f_j = theta^(-2j/d)`` or its rescaled value under ``scaling`` (Llama 3 slows the
    low frequencies; the rescaled frequencies still fall with ``j``). A pair that stays below
    about a radian is nearly static at every distance the model will see and loses little when
    made position-free; one that turns further must keep a
    rotary component, or the scores it adds at long distances are wrong (SmolLM2, 50% cache: 16
    pairs hold at 512 tokens and give x7.6 perplexity at 4096; docs/conversion.md).
    """
    inv_freq = rope_inv_freq(head_dim, rope_theta, scaling, dtype=torch.float64)
    return int((context_length * inv_freq >= min_angle).sum())


def source_rope_pairs(ropes: tuple[SourceRope, ...], head_dim: int, context_length: int) -> int:
    """:func:`rope_pairs_for_context` over every RoPE of a source, each over the distance its layers
    attend (a sliding layer's window when shorter than the context); the most any of them needs."""
    return max(
        rope_pairs_for_context(r.theta, head_dim, min(context_length, r.window or context_length), scaling=r.scaling)
        for r in ropes
    )


def _cmul(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Complex scalar(s) ``a`` times real pair rows ``v[..., 2, n]`` (``v[..., 0, :]`` real part)."""
    ar, ai = a.real.to(v.dtype), a.imag.to(v.dtype)
    if ar.dim():
        ar, ai = ar[..., None], ai[..., None]
    return torch.stack([ar * v[..., 0, :] - ai * v[..., 1, :], ar * v[..., 1, :] + ai * v[..., 0, :]], dim=-2)


def decouple_rope(
    w: AttentionWeights,
    sigma: torch.Tensor,
    rope_pairs: int,
    rope_theta: float,
    *,
    query_weighted: bool = True,
    rotation: torch.Tensor | None = None,
    complex_mixing: bool = True,
) -> DecoupledKeys:
    """RoRoPE on the ``rope_pairs`` highest frequencies of one layer (see module docstring).

    Args:
        sigma: ``E[x~ x~^T]`` of the layer input.
        rope_pairs: ``K``, number of frequency pairs that keep a rotary component (1..d/2).
        query_weighted: weight each head's share by the energy of the queries reading it.
        rotation: ``[H, d/2, 2]`` attention-weighted ``(E cos, E sin)`` per head and pair; when
            given, the nope query of every pair is ``A^T q`` (see module docstring), else ``q``.
        complex_mixing: mix heads with complex weights (a rotation and a scale per head, which
            commute with RoPE) instead of real ones; see the module docstring.
    """
    d, g_heads, grp = w.head_dim, w.num_kv_heads, w.group
    if not 0 < rope_pairs <= d // 2:
        raise ValueError(f"rope_pairs={rope_pairs} must lie in [1, {d // 2}]")
    n1 = w.w_k.shape[1]
    w_kr = torch.zeros(2 * rope_pairs, n1, dtype=w.w_k.dtype)
    w_q_rope = torch.zeros(w.num_heads, 2 * rope_pairs, n1, dtype=w.w_k.dtype)
    w_k_nope = w.w_k.clone()
    # every kept pair's key rows [K, G, 2, n+1], and (query-weighted) the energy E|q_f|^2 of every
    # query head's pair [K, H]: one product with sigma each, not one per pair and head (8B: 13 s -> 1 s)
    keys = torch.stack([torch.stack([w.w_k[_pair_rows(g, f, d)] for g in range(g_heads)]) for f in range(rope_pairs)])
    keys_sigma = (keys.reshape(-1, n1) @ sigma).reshape(keys.shape)  # [K, G, 2, n+1]
    if query_weighted:
        queries = torch.stack([w.w_q[_pair_rows(h, f, d)] for f in range(rope_pairs) for h in range(w.num_heads)])
        q_energy = ((queries.reshape(-1, n1) @ sigma) * queries.reshape(-1, n1)).sum(-1)  # [K * H * 2]
        q_energy = q_energy.reshape(rope_pairs, g_heads, grp * 2).sum(-1)  # [K, G]: the heads reading each kv head
    for f in range(rope_pairs):
        rows = [_pair_rows(g, f, d) for g in range(g_heads)]
        kf, ks = keys[f], keys_sigma[f]  # [G, 2, n+1]: z_g's rows, and those rows times sigma
        # Pair f of head g as a complex number z_g = k0 + i k1; RoPE multiplies it by e^{i w t}.
        # C[g, h] = E[z_g conj(z_h)]; its real part alone is the real (per-component) PCA.
        re = torch.einsum("gcn,hcn->gh", ks, kf)
        im = ks[:, 1] @ kf[:, 0].T - ks[:, 0] @ kf[:, 1].T
        cov = torch.complex(re, im if complex_mixing else torch.zeros_like(im))
        if query_weighted:
            qe = q_energy[f]
            # a pair no query reads (Gemma's quantised q-norm weights can be exactly 0 on both of its
            # dims) has no preferred mixing: weigh its heads alike instead of dividing by zero
            m = qe.clamp_min(1e-12 * qe.max()).sqrt() if qe.max() > 0 else torch.ones_like(qe)
        else:
            m = torch.ones(g_heads, dtype=sigma.dtype)
        wc = m[:, None] * cov * m[None, :]
        with single_thread():
            _, vecs = torch.linalg.eigh((wc + wc.mH) / 2)
        u = vecs[:, -1]
        b = u.conj() * m  # k_rope,f = sum_g b_g z_g (complex)
        a = u / m  # z_g ~= a_g k_rope,f
        kr = _cmul(b, kf).sum(0)  # [2, n+1]
        w_kr[f], w_kr[rope_pairs + f] = kr[0], kr[1]
        for g in range(g_heads):
            w_k_nope[rows[g]] = kf[g] - _cmul(a[g], kr)
            for h in range(g * grp, (g + 1) * grp):
                # Re(q conj(z)) with z = a k_rope: the rotary query is q conj(a).
                qf = _cmul(a[g].conj(), w.w_q[_pair_rows(h, f, d)])
                w_q_rope[h, f], w_q_rope[h, rope_pairs + f] = qf[0], qf[1]
    w_q_nope = w.w_q.clone()
    if rotation is not None:
        for h in range(w.num_heads):
            for f in range(d // 2):
                c, s = rotation[h, f, 0], rotation[h, f, 1]
                r0, r1 = w.w_q[_pair_rows(h, f, d)]
                # q' = A^T q with A = E[R(-w delta)] = [[c, s], [-s, c]]
                w_q_nope[h * d + f] = c * r0 - s * r1
                w_q_nope[h * d + f + d // 2] = s * r0 + c * r1
    theta = decoupled_rope_theta(rope_theta, rope_pairs, d)
    return DecoupledKeys(w_kr=w_kr, w_q_rope=w_q_rope, w_k_nope=w_k_nope, w_q_nope=w_q_nope, rope_theta=theta)
