"""CUDA graphs of the decode step: one capture per padded batch size, replayed every step.

At batch 1 a decode step of a 27-layer model launches ~600 small kernels; on an H200 the host
needs ~26 ms to launch them while the GPU works ~1 ms (BENCHMARKS.md, "The engine on the H200").
A CUDA graph records the launches once and replays them with one call (nano-vllm's
``capture_cudagraph``, vLLM's CUDA graph runner).

A graph replays fixed shapes and fixed addresses, so every input lives in a static buffer that
each step overwrites before the replay::

    tokens        [1, Bmax]        positions [1, Bmax]
    slot_mapping  [Bmax]           context_lens [Bmax]
    block_tables  [Bmax, Mmax]     int32, Mmax = blocks of the longest possible sequence

A batch of ``B`` sequences runs the graph of the smallest captured size ``Bp >= B``; rows
``B .. Bp - 1`` are padding that writes into and reads from the cache's scratch block only
(:attr:`mlakit.paged.PagedCache.scratch_block`). Columns of a block table past a sequence's
length keep stale ids: the kernel never reads past ``context_lens``. The decode kernel sizes its
grid by the batch alone (each sequence splits its own length, ``AttentionMetadata.max_decode_context``
fixed at capture), so one graph serves every context length.

Only the MLA absorbed decode through the ``triton`` backend is captured: baseline attention and
the naive path gather a host-sized ``[B, S, W]`` view per step. Everything else runs eagerly.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import torch

from mlakit.attention.backends import AttentionBackend
from mlakit.attention.metadata import AttentionMetadata
from mlakit.config import MLAConfig, RuntimeConfig
from mlakit.model import Transformer
from mlakit.paged import PagedCache, token_slots

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 16 up to ``max_batch_size`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


def graph_reason(model: Transformer, cache: PagedCache, backend: AttentionBackend, runtime: RuntimeConfig) -> str:
    """Why decode steps cannot be captured here (``""``: they can)."""
    device = model.embed.weight.device
    if device.type != "cuda":
        return f"the model is on {device.type}, not CUDA"
    if backend.name != "triton":
        return f"attention backend {backend.name!r} (only 'triton' reads the cache with graph-stable shapes)"
    if cache.scratch_block is None:
        return "the cache has no scratch block for padding rows"
    mla = all(isinstance(model.config.layer_attention(i), MLAConfig) for i in range(model.config.num_layers))
    if not mla or model.attention_path(runtime, decode=True) != "absorbed":
        return "only the absorbed MLA decode is captured"
    return ""


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``cache`` for batch sizes up to ``max_batch_size``.

    Raises: RuntimeError (from CUDA) when a capture fails; the caller falls back to eager steps.
    """

    def __init__(
        self,
        model: Transformer,
        cache: PagedCache,
        backend: AttentionBackend,
        runtime: RuntimeConfig,
        max_batch_size: int,
    ) -> None:
        assert cache.scratch_block is not None
        self.model, self.cache, self.backend, self.runtime = model, cache, backend, runtime
        self.sizes = graph_batch_sizes(max_batch_size)
        bmax, bs = self.sizes[-1], cache.block_size
        self.max_blocks = min(cache.num_blocks, -(-model.config.max_seq_len // bs))
        self.max_context = self.max_blocks * bs
        device = model.embed.weight.device
        scratch = cache.scratch_block
        self.scratch_slot = scratch * bs
        self.tokens = torch.zeros(1, bmax, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, bmax, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((bmax,), self.scratch_slot, dtype=torch.long, device=device)
        self.context_lens = torch.ones(bmax, dtype=torch.long, device=device)
        self.block_tables = torch.full((bmax, self.max_blocks), scratch, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(bmax, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            meta = self._metadata(b)
            with torch.inference_mode():
                self._forward(b, meta)  # compiles the kernels outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(b, meta)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _metadata(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            cache=self.cache,
            backend=self.backend,
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b],
            logits_index=self.logits_index[:b],
            query_start=tuple(range(b + 1)),
            context_lens_host=(1,) * b,  # placeholders: the graph reads the device tensors
            tables_host=((self.cache.scratch_block or 0,),) * b,
            num_decodes=b,
            max_decode_context=self.max_context,
        )

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(self.tokens[:, :b], self.positions[:, :b], runtime=self.runtime, attn_metadata=meta)

    def fits(self, num_seqs: int, tables: Sequence[Sequence[int]]) -> bool:
        """Whether a decode step of these sequences can replay a graph."""
        return num_seqs <= self.sizes[-1] and all(len(t) <= self.max_blocks for t in tables)

    def run(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits ``[B, vocab]`` (fp32) of one decode step, like ``ModelRunner.execute`` with decodes only."""
        b = len(tokens)
        padded = self.sizes[bisect.bisect_left(self.sizes, b)]
        bs = self.cache.block_size
        scratch = self.cache.scratch_block
        assert scratch is not None
        slots = [token_slots(t, p, 1, bs)[0] for t, p in zip(tables, positions)]
        width = max(len(t) for t in tables)
        host = torch.tensor(
            [list(t) + [scratch] * (width - len(t)) for t in tables] + [[scratch] * width] * (padded - b),
            dtype=torch.int32,
        )
        pad = padded - b
        self.tokens[0, :padded].copy_(torch.tensor(list(tokens) + [0] * pad))
        self.positions[0, :padded].copy_(torch.tensor(list(positions) + [0] * pad))
        self.slot_mapping[:padded].copy_(torch.tensor(slots + [self.scratch_slot] * pad))
        self.context_lens[:padded].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad))
        self.block_tables[:padded, :width].copy_(host)
        graph, out = self.graphs[padded]
        graph.replay()
        return out[:b].float()
