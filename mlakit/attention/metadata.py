"""Per-step attention metadata: how a packed, variable-length batch maps onto the paged cache.

The engine packs every running sequence's new tokens into one row and calls the model once
(nano-vllm, vLLM V1)::

    tokens   [1, N]   decode tokens first (one per decoding sequence), then each prefill chunk
    positions[1, N]   each token's position in its own sequence

and passes an :class:`AttentionMetadata` that tells each attention layer where those tokens go
(``slot_mapping``) and what each sequence may read (``block_tables``, ``context_lens``). The
model itself is unchanged: training, evaluation and :func:`mlakit.generate.generate` call the
same ``forward`` without metadata.

Sequence ``i`` owns packed tokens ``query_start[i] .. query_start[i + 1] - 1``; the first
``num_decodes`` sequences have exactly one (a decode step), the rest are prefill chunks (which
may start at ``position > 0``: chunked prefill). Host-side copies of the lengths are kept so
that no attention layer has to synchronise with the device to learn a shape.

Shapes: N packed tokens, B sequences, M blocks per sequence (padded), W row width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from mlakit.paged import PagedCache, block_runs, token_slots

if TYPE_CHECKING:
    from mlakit.attention.backends import AttentionBackend


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """One engine step's description of the packed batch (built by the engine, read by attention).

    Attributes:
        cache: all layers' paged storage; layer ``i`` reads and writes ``cache.layers[i]``.
        backend: the attention backend that reads the cache (see :mod:`mlakit.attention.backends`).
        slot_mapping: ``[N]`` cache slot of each packed token (where its K/V or latent is written).
        block_tables: ``[B, M]`` block ids per sequence, padded with any valid id past its end.
        context_lens: ``[B]`` tokens each sequence may attend to after this step's writes.
        logits_index: ``[B]`` packed index of each sequence's last token (its logits are returned).
        query_start: host ``B + 1`` offsets of each sequence's tokens in the packed row.
        context_lens_host: host copy of ``context_lens``.
        tables_host: host copy of the block tables (unpadded), for backends that walk them.
        num_decodes: the first ``num_decodes`` sequences are one-token decode steps.
        max_decode_context: an upper bound on the decode sequences' context lengths that decode
            kernels size their grid by; ``None``: the longest of ``context_lens_host``. A captured
            CUDA graph fixes it (with placeholder host lengths), so replays serve any lengths.
    """

    cache: PagedCache
    backend: AttentionBackend
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    logits_index: torch.Tensor
    query_start: tuple[int, ...]
    context_lens_host: tuple[int, ...]
    tables_host: tuple[tuple[int, ...], ...]
    num_decodes: int
    max_decode_context: int | None = None
    _runs: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        cache: PagedCache,
        backend: AttentionBackend,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        tables: Sequence[Sequence[int]],
        num_decodes: int,
        device: torch.device | str | None = None,
    ) -> AttentionMetadata:
        """Metadata for sequences with ``query_lens[i]`` new tokens ending at ``context_lens[i]``.

        Sequence ``i``'s new tokens sit at positions ``context_lens[i] - query_lens[i] ..
        context_lens[i] - 1``; ``tables[i]`` must cover ``context_lens[i]`` tokens.

        Raises: ValueError when a table is too short or the first ``num_decodes`` queries are not single tokens.
        """
        bs = cache.block_size
        if any(q != 1 for q in query_lens[:num_decodes]):
            raise ValueError(f"the first {num_decodes} sequences must be single-token decodes, got {query_lens}")
        slots: list[int] = []
        starts = [0]
        for q, n, table in zip(query_lens, context_lens, tables):
            if len(table) * bs < n or q > n or q <= 0:
                raise ValueError(f"a sequence of {n} tokens ({q} new) does not fit its {len(table)}-block table")
            slots.extend(token_slots(table, n - q, q, bs))
            starts.append(starts[-1] + q)
        width = max(len(t) for t in tables)
        padded = [list(t) + [t[0]] * (width - len(t)) for t in tables]
        return cls(
            cache=cache,
            backend=backend,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            context_lens=torch.tensor(list(context_lens), dtype=torch.long, device=device),
            logits_index=torch.tensor([s - 1 for s in starts[1:]], dtype=torch.long, device=device),
            query_start=tuple(starts),
            context_lens_host=tuple(int(n) for n in context_lens),
            tables_host=tuple(tuple(int(b) for b in t) for t in tables),
            num_decodes=num_decodes,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @cached_property
    def decode_context_lens(self) -> torch.Tensor:
        """``[num_decodes]`` context lengths of the decode sequences."""
        return self.context_lens[: self.num_decodes]

    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What a decode kernel reads: ``(block_tables [B_d, M], context_lens [B_d], longest context)``."""
        nd = self.num_decodes
        longest = self.max_decode_context or max(self.context_lens_host[:nd])
        return self.block_tables[:nd], self.decode_context_lens, longest

    def runs(self, i: int) -> list[tuple[int, int]]:
        """Sequence ``i``'s cached tokens as ``(first_slot, length)`` runs of consecutive slots."""
        if i not in self._runs:
            self._runs[i] = block_runs(self.tables_host[i], self.context_lens_host[i], self.block_size)
        return self._runs[i]
