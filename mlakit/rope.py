"""Rotary position embedding (RoPE) with DeepSeek's YaRN and Llama 3.1's scaling, as pure functions.

Layout: "halves" (the Llama / Hugging Face ``rotate_half`` convention): for a rotary width ``D`` the
pair ``(x[i], x[i + D/2])`` rotates by ``pos * inv_freq[i]``. DeepSeek's own checkpoints store the
rotary projections *interleaved* (pairs ``(x[2i], x[2i+1])``); :func:`interleaved_to_halves`
is the row permutation that maps one onto the other, used by ``mlakit.convert`` at the boundary.

The softmax scale, including YaRN's ``mscale``, is computed here and nowhere else.
"""

from __future__ import annotations

import math

import torch

from mlakit.config import RopeScaling, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # the rotary dim index whose wavelength completes `num_rotations` turns over `max_pos` tokens
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(
    dim: int, theta: float, scaling: RopeScaling | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse frequencies ``[dim // 2]`` (computed in fp64, returned in ``dtype``), rescaled when ``scaling`` is given.

    YaRN keeps high frequencies (many turns within the original context) as they are,
    divides low frequencies by ``factor`` and ramps linearly between the two, by dim index.
    Llama 3 does the same by wavelength (:func:`llama3_inv_freq`).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is None:
        return inv_freq.to(dtype)
    if scaling.type == "llama3":
        return llama3_inv_freq(inv_freq, scaling).to(dtype)
    orig = scaling.original_max_position_embeddings
    low = float(max(math.floor(_yarn_correction_dim(scaling.beta_fast, dim, theta, orig)), 0))
    high = float(min(math.ceil(_yarn_correction_dim(scaling.beta_slow, dim, theta, orig)), dim - 1))
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 -> keep original frequency, 0 -> interpolate
    blended = inv_freq / scaling.factor * (1 - extrapolate) + inv_freq * extrapolate
    return blended.to(dtype)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaling of ``inv_freq`` (any shape), a function of each frequency alone.

    With ``L = original_max_position_embeddings`` and wavelength ``w = 2 pi / f``: ``w < L /
    high_freq_factor`` keeps ``f``; ``w > L / low_freq_factor`` gives ``f / factor``; in between
    ``(1 - s) f / factor + s f`` with ``s = (L / w - low_freq_factor) / (high_freq_factor -
    low_freq_factor)``. Because it depends on the frequency and not on its index, a rotary key
    that keeps some of the original frequencies (decoupled conversion) is rescaled alike.
    """
    orig = scaling.original_max_position_embeddings
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > orig / lo, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < orig / hi, inv_freq, out)


def unscaled_rope_dim(dim: int, theta: float, scaling: RopeScaling | None) -> int | None:
    """The widest rotary width (even, <= ``dim``) whose pairs ``scaling`` leaves unchanged; None without scaling.

    Llama 3's scaling and YaRN keep the high frequencies and rescale the low ones; a decoupled
    conversion keeps the highest-frequency pairs first, so a rotary key this wide carries no
    scaling (what engines that rewrite every scaling as DeepSeek's YaRN need: vLLM, SGLang).
    """
    if scaling is None:
        return None
    same = (rope_inv_freq(dim, theta, scaling, torch.float64) == rope_inv_freq(dim, theta, None, torch.float64)).long()
    return 2 * int(same.cumprod(0).sum())


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """Multiplier on the cos/sin tables (Hugging Face's YaRN ``attention_factor``; 1 for Llama 3)."""
    if scaling is None or scaling.type != "yarn":
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor, 1.0)


def softmax_scale(qk_head_dim: int, scaling: RopeScaling | None = None) -> float:
    """``1/sqrt(d_qk)``, times DeepSeek's ``mscale(factor, mscale_all_dim)**2`` under YaRN."""
    scale = qk_head_dim**-0.5
    if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
        m = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_tables(
    dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_positions, dim]`` (fp32, halves layout) to be indexed by position."""
    inv_freq = rope_inv_freq(dim, theta, scaling)
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    factor = rope_attention_factor(scaling)
    return emb.cos() * factor, emb.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by per-position ``cos``/``sin`` ``[B, T, D]`` (halves layout)."""
    cos = cos.unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
    sin = sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def interleaved_to_halves(dim: int) -> torch.Tensor:
    """Permutation ``p`` with ``halves = interleaved[..., p]``: ``[0, 2, 4, ..., 1, 3, 5, ...]``."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))
