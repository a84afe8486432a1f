"""Preallocated KV caches: the MLA latent cache and the standard K/V cache, with byte accounting.

Every cache is written at explicit positions (``positions [B, T]``, one row per sequence), so
sequences in a batch may have different lengths, a chunk may be appended at ``start_pos > 0``, and
the decode step has static shapes that ``torch.compile`` can trace. Entries past a sequence's
length may hold stale values; attention masks them by position (a key at position ``s`` is visible
to a query at position ``p`` iff ``s <= p``), and they are overwritten when the sequence grows.

Shape letters: B batch, S cache capacity (max_seq_len), T new tokens, H heads, D widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlakit import dtypes
from mlakit.config import AttentionConfig, LayerAttention, MLAConfig, ModelConfig
from mlakit.dtypes import FloatName
from mlakit.errors import MlakitError


def _batch_index(positions: torch.Tensor) -> torch.Tensor:
    b, t = positions.shape
    return torch.arange(b, device=positions.device).unsqueeze(1).expand(b, t)  # [B, T]


class LatentCache:
    """One MLA layer's cache: ``kv_norm(c_kv)`` and the rotated ``k_rope``, nothing else.

    Stored as one tensor ``kv [B, S, kv_lora_rank + qk_rope_head_dim]`` so the absorbed decode
    reads both parts with a single matrix product; :attr:`c_kv` and :attr:`k_rope` are views.
    In ``rope_mode='full'`` the rope part has width 0.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv = torch.zeros(batch_size, max_seq_len, kv_lora_rank + qk_rope_head_dim, dtype=dtype, device=device)

    @property
    def c_kv(self) -> torch.Tensor:
        return self.kv[..., : self.kv_lora_rank]  # [B, S, r]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank :]  # [B, S, d_r]

    def write(self, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor | None) -> None:
        """Store ``c_kv [B, T, r]`` and ``k_rope [B, T, d_r]`` at ``positions [B, T]``."""
        entry = c_kv if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)  # [B, T, r + d_r]
        self.kv.index_put_((_batch_index(positions), positions), entry.to(self.kv.dtype))

    def read(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_kv [B, kv_len, r], k_rope [B, kv_len, d_r])`` for the first ``kv_len`` positions."""
        kv = self.kv[:, :kv_len]
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]

    def read_joint(self, kv_len: int) -> torch.Tensor:
        """The joint latent ``[B, kv_len, r + d_r]`` (absorbed decode scores against it directly)."""
        return self.kv[:, :kv_len]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class KVCache:
    """One baseline layer's cache: rotated keys and values ``[B, S, H_kv, D]`` each."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.k = torch.zeros(batch_size, max_seq_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [B, T, H_kv, D]`` at ``positions [B, T]``."""
        idx = (_batch_index(positions), positions)
        self.k.index_put_(idx, k.to(self.k.dtype))
        self.v.index_put_(idx, v.to(self.v.dtype))

    def read(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :kv_len], self.v[:, :kv_len]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


LayerCache = LatentCache | KVCache


def layer_cache(
    att: LayerAttention, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str | None
) -> LayerCache:
    if isinstance(att, MLAConfig):
        return LatentCache(batch_size, max_seq_len, att.kv_lora_rank, att.qk_rope_head_dim, dtype, device)
    assert isinstance(att, AttentionConfig)
    return KVCache(batch_size, max_seq_len, att.num_kv_heads, att.head_dim, dtype, device)


@dataclass
class ModelCache:
    """All layers' caches for one batch of ``batch_size`` sequences of up to ``max_seq_len`` tokens."""

    layers: list[LayerCache]
    batch_size: int
    max_seq_len: int
    dtype: torch.dtype

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: FloatName | torch.dtype = "fp32",
        device: torch.device | str | None = None,
    ) -> ModelCache:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} is invalid: must be a positive integer")
        s = config.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < s <= config.max_seq_len:
            raise ValueError(f"max_seq_len={s} is invalid: must lie in [1, {config.max_seq_len}] for this model")
        if dtype == dtypes.INT8:
            raise MlakitError(
                "cache_dtype='int8' needs the engine's paged cache (mlakit.engine); "
                f"a contiguous cache holds {', '.join(dtypes.FLOAT_DTYPES)}"
            )
        dt = dtypes.float_dtype(dtype, "cache dtype")
        layers = [layer_cache(config.layer_attention(i), batch_size, s, dt, device) for i in range(config.num_layers)]
        return cls(layers=layers, batch_size=batch_size, max_seq_len=s, dtype=dt)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers (the full preallocation)."""
        return sum(c.nbytes for c in self.layers)

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies across all layers."""
        return self.nbytes // (self.batch_size * self.max_seq_len)

    def elements_per_token(self) -> int:
        return self.bytes_per_token() // torch.empty((), dtype=self.dtype).element_size()
