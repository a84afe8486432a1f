"""Exact padding of an export's cached shapes to the widths engines' kernels take (``pad_to``).

A converted model caches ``r + d_r`` values per token and layer (SmolLM2 at 50%: ``144 + 48``);
vLLM and FlashMLA take ``512 + 64`` (:mod:`mlakit.interop.engines`). ``export_hf(pad_to=N)``
writes the same model with ``kv_lora_rank R' = N - d_r'`` and ``qk_rope_head_dim d_r'``
(``d_r' = 64``, DeepSeek's, when ``d_r <= 64`` and it fits; else ``d_r``), exactly:

* latent: zero rows of ``w_dkv``, zero columns of ``w_uk``/``w_uv``. The cached latent gains
  zeros that no query reads. DeepSeek-V3's ``kv_a_layernorm`` divides by the latent's mean
  square, which zero rows lower by ``r/R'``: the export's two latent mappings already absorb that
  exactly (normed latents: rows x ``sqrt(R'/r)``, norm weight / the same; linear latents: the
  epsilon-dominated norm is sized for ``R'``). This is the per-layer-rank padding of
  :mod:`mlakit.interop.deepseek_plan` with a wider ``R``.
* rotary key: DeepSeek-V3 has one ``rope_theta`` for ``d_r'/2`` pairs, pair ``k`` turning at
  ``theta'^(-2k/d_r')``. With ``theta' = theta^(d_r'/d_r)`` pair ``k < d_r/2`` turns at
  ``theta^(-2k/d_r)``, exactly the model's pair ``k``; so the model's pairs keep their indices
  (halves layout: rows ``k`` and ``k + d_r'/2``), the new low-frequency pairs ``k >= d_r/2`` are
  zero rows of ``w_kr`` and of each head's rotary query, and contribute nothing to any score.
  YaRN's ramp depends on ``dim / log(theta)``, which the substitution keeps, so the same holds
  under YaRN; :func:`plan_padding` checks the frequencies numerically and refuses otherwise.
* softmax scale: engines use ``1/sqrt(d_n + d_r')``; the query rows (``q_proj`` or ``q_b_proj``)
  are multiplied by ``query_scale = sqrt((d_n + d_r') / (d_n + d_r))`` so every score is unchanged.
  Exact in real arithmetic; in the export dtype one rounding of the scaled query weights (none
  beyond the cast itself when an fp32 model is exported as bf16).

What it costs: the cache grows from ``r + d_r`` to ``N`` values per token and layer
(:func:`cache_bytes`); attention FLOPs grow with it. Padding buys the engines' fast kernels, not
memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlakit.config import MLAConfig
from mlakit.errors import MlakitError
from mlakit.interop.engines import DEEPSEEK_ROPE_DIM
from mlakit.rope import rope_inv_freq

# relative tolerance on the kept frequencies: both sides are float64 maths rounded to fp32
_FREQ_RTOL = 1e-6


@dataclass(frozen=True)
class Padding:
    """Exported cached shapes and what keeps the model exact (identity when nothing is padded).

    Attributes:
        kv_lora_rank / qk_rope_head_dim / rope_theta: what ``config.json`` says.
        query_scale: multiplies every query row, ``sqrt((d_n + d_r') / (d_n + d_r))``.
        source_*: the model's own values.
    """

    kv_lora_rank: int
    qk_rope_head_dim: int
    rope_theta: float
    query_scale: float
    source_kv_lora_rank: int
    source_qk_rope_head_dim: int
    source_rope_theta: float

    @property
    def pads_rope(self) -> bool:
        return self.qk_rope_head_dim != self.source_qk_rope_head_dim

    @property
    def pads(self) -> bool:
        return self.pads_rope or self.kv_lora_rank != self.source_kv_lora_rank

    def pad_rope_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Rotary rows ``[d_r, ...]`` (halves layout) -> ``[d_r', ...]``: pair ``k`` at rows ``k`` and
        ``k + d_r'/2``, zero rows for the added pairs."""
        dr, width = self.source_qk_rope_head_dim, self.qk_rope_head_dim
        if width == dr:
            return w
        p, q = dr // 2, width // 2
        out = w.new_zeros((width, *w.shape[1:]))
        out[:p] = w[:p]
        out[q : q + p] = w[p:]
        return out


def plan_padding(att: MLAConfig, kv_lora_rank: int, pad_to: int | None) -> Padding:
    """The exported shapes for ``pad_to`` (``None``: unpadded) of a model with latent ``kv_lora_rank``.

    ``kv_lora_rank`` is the widest layer's (per-layer ranks are padded to it in any case).

    Raises: MlakitError when ``pad_to`` is smaller than the model's ``kv_lora_rank +
    qk_rope_head_dim``, or when the rotary frequencies cannot be kept under ``rope_scaling``.
    """
    dr, dn = att.qk_rope_head_dim, att.qk_nope_head_dim
    if pad_to is None:
        return Padding(kv_lora_rank, dr, att.rope_theta, 1.0, kv_lora_rank, dr, att.rope_theta)
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to <= 0:
        raise MlakitError(f"pad_to={pad_to!r} is invalid: a positive cache width such as 576 (512 + 64) or 320")
    need = kv_lora_rank + dr
    if pad_to < need:
        raise MlakitError(
            f"pad_to={pad_to} is smaller than the model's cached width: kv_lora_rank + qk_rope_head_dim = "
            f"{kv_lora_rank} + {dr} = {need}; padding only widens (choose pad_to >= {need}, e.g. 576)"
        )
    width = dr
    if 0 < dr < DEEPSEEK_ROPE_DIM:
        width = min(DEEPSEEK_ROPE_DIM, (pad_to - kv_lora_rank) // 2 * 2)
    theta = att.rope_theta ** (width / dr) if width != dr else att.rope_theta
    if width != dr:
        _check_frequencies(att, width, theta)
    scale = math.sqrt((dn + width) / (dn + dr))
    return Padding(pad_to - width, width, theta, scale, kv_lora_rank, dr, att.rope_theta)


def _check_frequencies(att: MLAConfig, width: int, theta: float) -> None:
    """Refuse a rotary widening under which a kept pair would turn at another frequency."""
    dr = att.qk_rope_head_dim
    if not math.isfinite(theta):
        raise MlakitError(
            f"rope_theta={att.rope_theta:g}: widening qk_rope_head_dim {dr} -> {width} needs rope_theta "
            f"{att.rope_theta:g}^({width}/{dr}), which overflows; pad_to must leave qk_rope_head_dim at {dr}"
        )
    old = rope_inv_freq(dr, att.rope_theta, att.rope_scaling).double()
    new = rope_inv_freq(width, theta, att.rope_scaling).double()[: dr // 2]
    err = float(((new - old).abs() / old.abs().clamp_min(1e-30)).max())
    if err > _FREQ_RTOL:
        raise MlakitError(
            f"rope_scaling: widening qk_rope_head_dim {dr} -> {width} moves a rotary frequency by {err:.1e} "
            f"relative under {att.rope_scaling}; this model cannot be padded exactly"
        )


@dataclass(frozen=True)
class CacheCost:
    """Cache bytes per token (all layers) of the model, its unpadded and padded exports, and the source."""

    dtype_bytes: int
    model: int  # mlakit's own cache: each layer's rank + d_r
    unpadded: int  # the export without pad_to: the widest rank in every layer
    padded: int
    source: int | None = None  # the GQA model it was converted from, when known

    def lines(self) -> list[str]:
        """Human-readable summary lines (what padding costs)."""
        out = [
            f"cache per token: {self.padded:,} bytes exported vs {self.model:,} in mlakit "
            f"(x{self.padded / self.model:.2f}); unpadded export {self.unpadded:,}"
        ]
        if self.source:
            out.append(
                f"vs the source's original cache {self.source:,} bytes/token: "
                f"x{self.padded / self.source:.2f} padded, x{self.model / self.source:.2f} in mlakit"
            )
        return out

    def to_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = {
            "dtype_bytes": self.dtype_bytes,
            "mlakit_bytes_per_token": self.model,
            "unpadded_export_bytes_per_token": self.unpadded,
            "export_bytes_per_token": self.padded,
            "export_vs_mlakit": self.padded / self.model,
            "source_bytes_per_token": self.source,
        }
        if self.source:
            d["export_vs_source"] = self.padded / self.source
        return d


def cache_bytes(
    ranks: list[int] | tuple[int, ...], padding: Padding, dtype_bytes: int, source_values: int | None = None
) -> CacheCost:
    """Per-token cache bytes; ``source_values`` is the source's cached values per token (all layers)."""
    n, dr = len(ranks), padding.source_qk_rope_head_dim
    return CacheCost(
        dtype_bytes=dtype_bytes,
        model=(sum(ranks) + n * dr) * dtype_bytes,
        unpadded=n * (max(ranks) + dr) * dtype_bytes,
        padded=n * (padding.kv_lora_rank + padding.qk_rope_head_dim) * dtype_bytes,
        source=source_values * dtype_bytes if source_values else None,
    )
