"""Paged caches: a pool of fixed-size blocks, block tables per sequence, a hard byte budget.

The whole cache is allocated once from the budget (``EngineConfig.kv_memory``) as ``num_blocks``
blocks of ``block_size`` token slots, for every layer at once: block ``b`` of a sequence's table
owns slots ``b * block_size .. (b + 1) * block_size - 1`` in *every* layer's storage. So one
:class:`BlockPool` does the bookkeeping for all layers, and a sequence's cache costs exactly
``len(table) * bytes_per_block`` bytes.

What a slot holds per layer:

* MLA: one row ``[c_kv | k_rope]`` of width ``kv_lora_rank + qk_rope_head_dim`` (the latent
  cache, exactly what :class:`mlakit.cache.LatentCache` holds, paged);
* baseline MHA/GQA/MQA: a key row and a value row of width ``num_kv_heads * head_dim`` each.

``int8`` storage quantizes each row symmetrically with one fp32 scale per row (per token, per
layer, per K/V), so a row costs ``width + 4`` bytes.

Reads never gather: :func:`block_runs` turns a block table into maximal runs of consecutive
blocks, and each run is a zero-copy view of the storage (the pool hands out the lowest free
block first, so a sequence's blocks are mostly consecutive).

Shape letters: N slots written, L run length (tokens), W row width, G kv heads, D head_dim.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlakit.config import AttentionConfig, MLAConfig, ModelConfig
from mlakit.errors import MlakitError

INT8_MAX = 127.0


class BlockPool:
    """Free-list of block ids ``0 .. num_blocks-1``; the lowest free id is handed out first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise MlakitError(f"the KV budget holds {num_blocks} blocks: raise kv_memory or lower block_size")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap (sorted is a valid heap)
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids. Raises MlakitError when fewer than ``n`` are free (nothing is taken)."""
        if n > len(self._free):
            raise MlakitError(f"cannot allocate {n} blocks: {len(self._free)} of {self.num_blocks} free")
        out = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Return blocks to the pool. Raises MlakitError on a block that is not allocated."""
        for b in blocks:
            if b not in self._used:
                raise MlakitError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            heapq.heappush(self._free, b)


def block_runs(table: Sequence[int], length: int, block_size: int) -> list[tuple[int, int]]:
    """The first ``length`` tokens of a sequence as ``(first_slot, num_tokens)`` runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    nblocks = math.ceil(length / block_size)
    i = 0
    while i < nblocks:
        j = i + 1
        while j < nblocks and table[j] == table[j - 1] + 1:
            j += 1
        start = table[i] * block_size
        runs.append((start, min(j * block_size, length) - i * block_size))
        i = j
    return runs


def token_slots(table: Sequence[int], start: int, n: int, block_size: int) -> list[int]:
    """Slot index of each token ``start .. start+n-1`` of a sequence with block ``table``."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]


class PagedRows:
    """One layer's storage of one row kind: ``data [num_slots, W]`` (+ ``scale [num_slots]`` for int8)."""

    def __init__(self, num_slots: int, width: int, dtype: torch.dtype | str, device: torch.device | str | None) -> None:
        self.width = width
        self.quantized = dtype == "int8"
        store = torch.int8 if self.quantized else dtype
        assert isinstance(store, torch.dtype)
        self.data = torch.zeros(num_slots, width, dtype=store, device=device)
        self.scale = torch.ones(num_slots, dtype=torch.float32, device=device) if self.quantized else None

    @staticmethod
    def row_bytes(width: int, dtype: torch.dtype | str) -> int:
        if dtype == "int8":
            return width + 4
        assert isinstance(dtype, torch.dtype)
        return width * torch.empty((), dtype=dtype).element_size()

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows [N, W]`` at ``slots [N]`` (quantizing for int8)."""
        if self.scale is None:
            self.data[slots] = rows.to(self.data.dtype)
            return
        rows = rows.float()
        scale = rows.abs().amax(dim=-1).clamp(min=1e-12) / INT8_MAX  # [N]
        self.data[slots] = (rows / scale.unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.scale[slots] = scale

    def view(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero-copy ``(data [n, W], scale [n] or None)`` for slots ``start .. start+n-1``."""
        return self.data[start : start + n], None if self.scale is None else self.scale[start : start + n]

    def read(self, runs: Sequence[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
        """The rows of ``runs`` concatenated and dequantized, ``[sum L, W]`` in ``dtype`` (a copy)."""
        parts = []
        for start, n in runs:
            data, scale = self.view(start, n)
            parts.append(data.to(dtype) if scale is None else (data.float() * scale.unsqueeze(-1)).to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.scale is None else self.scale.numel() * 4)


@dataclass
class PagedCache:
    """All layers' paged storage plus the shared :class:`BlockPool`.

    ``layers[i]`` is ``(kv,)`` for an MLA layer (rows ``[c_kv | k_rope]``) or ``(k, v)`` for a
    baseline layer (rows ``num_kv_heads * head_dim`` wide). ``scratch_block``, when set, is one
    block of storage outside the pool (ids ``0 .. pool.num_blocks - 1``): padding rows of a
    fixed-size (graph-captured) step write there and read only there, never a sequence's block.
    """

    layers: list[tuple[PagedRows, ...]]
    pool: BlockPool
    block_size: int
    bytes_per_block: int
    dtype: torch.dtype | str
    scratch_block: int | None = None

    @staticmethod
    def row_widths(config: ModelConfig) -> list[tuple[int, ...]]:
        """Per layer, the widths of the rows one token stores."""
        out: list[tuple[int, ...]] = []
        for i in range(config.num_layers):
            att = config.layer_attention(i)
            if isinstance(att, MLAConfig):
                out.append((att.kv_lora_rank + att.qk_rope_head_dim,))
            else:
                assert isinstance(att, AttentionConfig)
                out.append((att.num_kv_heads * att.head_dim,) * 2)
        return out

    @classmethod
    def block_bytes(cls, config: ModelConfig, block_size: int, dtype: torch.dtype | str) -> int:
        """Bytes one block (``block_size`` tokens, all layers) occupies."""
        return block_size * sum(PagedRows.row_bytes(w, dtype) for ws in cls.row_widths(config) for w in ws)

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        kv_bytes: int,
        block_size: int,
        dtype: torch.dtype | str,
        device: torch.device | str | None = None,
        scratch: bool = False,
    ) -> PagedCache:
        """As many blocks as fit in ``kv_bytes`` (storage never exceeds it), one of them the
        ``scratch_block`` outside the pool when ``scratch``.

        Raises: MlakitError when not even one pool block fits.
        """
        per_block = cls.block_bytes(config, block_size, dtype)
        num_blocks = kv_bytes // per_block - int(scratch)
        if num_blocks < 1:
            raise MlakitError(
                f"kv_memory={kv_bytes} bytes holds no block: one block of {block_size} tokens needs {per_block} bytes"
                + (" (plus one scratch block for CUDA graphs)" if scratch else "")
            )
        slots = (num_blocks + int(scratch)) * block_size
        layers = [tuple(PagedRows(slots, w, dtype, device) for w in ws) for ws in cls.row_widths(config)]
        pool = BlockPool(num_blocks)
        return cls(
            layers=layers,
            pool=pool,
            block_size=block_size,
            bytes_per_block=per_block,
            dtype=dtype,
            scratch_block=num_blocks if scratch else None,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' storage (the whole preallocation)."""
        return sum(r.nbytes for rows in self.layers for r in rows)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size
