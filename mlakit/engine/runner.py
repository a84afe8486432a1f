"""One engine step as one model call: pack the scheduled tokens, build the metadata, run the model.

The model is written once (:class:`mlakit.model.Transformer`); this module only prepares what
it needs to run many sequences over the paged cache at once (nano-vllm's ``ModelRunner``,
vLLM V1's input batch)::

    tokens    [1, N]   decode tokens first (one per decoding sequence), then prefill chunks
    positions [1, N]
    metadata           slot mapping, block tables, context lengths, query offsets, backend

and returns the logits of each sequence's last token. Everything host-side (lengths, offsets,
tables) is known before the call, so the forward never waits on the device to learn a shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from mlakit.attention.backends import AttentionBackend
from mlakit.attention.metadata import AttentionMetadata
from mlakit.config import ModelConfig, RuntimeConfig
from mlakit.engine.cpu_step import MAX_ROWS, FusedDecode, fused_decode_reason
from mlakit.engine.graphs import DecodeGraphs, graph_reason
from mlakit.errors import MlakitError
from mlakit.model import Transformer
from mlakit.paged import PagedCache

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs ``model`` over ``cache`` through ``backend``.

    Args:
        model: an mlakit Transformer (MLA or baseline attention), in eval mode.
        cache: the paged cache built for ``model.config``.
        backend: reads the cache for attention (see :mod:`mlakit.attention.backends`).
        runtime: the decode path (absorbed / naive / auto).
        max_graph_batch: capture decode-only steps of up to this many sequences as CUDA graphs
            where :func:`mlakit.engine.graphs.graph_reason` allows (0: never). Captured on the
            first decode-only step; a failed capture is logged and steps stay eager.
        fused_decode: run decode-only steps through the fused C step (one call per
            :data:`mlakit.engine.cpu_step.MAX_ROWS` sequences) where
            :func:`mlakit.engine.cpu_step.fused_decode_reason` allows (CPU); elsewhere (logged
            once) through the model.
    """

    def __init__(
        self,
        model: Transformer,
        cache: PagedCache,
        backend: AttentionBackend,
        runtime: RuntimeConfig,
        max_graph_batch: int = 0,
        fused_decode: bool = False,
    ) -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.runtime = runtime
        self.device = model.embed.weight.device
        model.attention_path(runtime, decode=True)  # raises now for absorbed on a full-RoPE model
        check_paged_support(model.config)
        self.graphs: DecodeGraphs | None = None
        self._graph_batch = max_graph_batch
        if max_graph_batch:
            why = graph_reason(model, cache, backend, runtime)
            if why:
                logger.info("decode steps run eagerly: %s", why)
                self._graph_batch = 0
        self.fused: FusedDecode | None = None
        if fused_decode:
            why = fused_decode_reason(model, cache, backend, runtime)
            if why:
                logger.info("decode steps run through the model, not the fused CPU step: %s", why)
            else:
                self.fused = FusedDecode(model, cache)
                logger.info("decode-only steps run through the fused CPU step (%d sequences per call)", MAX_ROWS)

    @torch.inference_mode()
    def execute(
        self,
        decodes: Sequence[tuple[int, int, Sequence[int]]],
        prefills: Sequence[tuple[Sequence[int], int, Sequence[int]]],
    ) -> torch.Tensor:
        """One packed forward.

        Args:
            decodes: ``(token, position, block_table)`` per decoding sequence.
            prefills: ``(tokens, start_pos, block_table)`` per prefill chunk.

        Returns: fp32 logits ``[len(decodes) + len(prefills), vocab]``, one row per sequence (its last token).
        """
        if decodes and not prefills and self._graph_batch:
            graphs = self._decode_graphs()
            if graphs is not None and graphs.fits(len(decodes), [t for _, _, t in decodes]):
                return graphs.run([t for t, _, _ in decodes], [p for _, p, _ in decodes], [t for _, _, t in decodes])
        if decodes and not prefills and self.fused is not None:
            return self.fused.run([t for t, _, _ in decodes], [p for _, p, _ in decodes], [t for _, _, t in decodes])
        ids: list[int] = [tok for tok, _, _ in decodes]
        pos: list[int] = [p for _, p, _ in decodes]
        for chunk, start, _ in prefills:
            ids.extend(chunk)
            pos.extend(range(start, start + len(chunk)))
        query_lens = [1] * len(decodes) + [len(chunk) for chunk, _, _ in prefills]
        context_lens = [p + 1 for _, p, _ in decodes] + [start + len(chunk) for chunk, start, _ in prefills]
        tables = [t for _, _, t in decodes] + [t for _, _, t in prefills]
        meta = AttentionMetadata.build(
            self.cache, self.backend, query_lens, context_lens, tables, len(decodes), self.device
        )
        tokens = torch.tensor(ids, device=self.device).unsqueeze(0)  # [1, N]
        positions = torch.tensor(pos, device=self.device).unsqueeze(0)  # [1, N]
        return self.model(tokens, positions, runtime=self.runtime, attn_metadata=meta).float()

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The captured decode steps, capturing them on first use; ``None`` after a failed capture."""
        if self.graphs is None and self._graph_batch:
            try:
                self.graphs = DecodeGraphs(self.model, self.cache, self.backend, self.runtime, self._graph_batch)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # CUDA reports capture failures as RuntimeError
                logger.warning("decode steps run eagerly: CUDA graph capture failed: %s", e)
                self._graph_batch = 0
        return self.graphs

    def prefill(self, tokens: Sequence[int], start_pos: int, table: Sequence[int]) -> torch.Tensor:
        """Write one chunk ``tokens`` at positions ``start_pos ..``; fp32 logits ``[vocab]`` of its last token."""
        return self.execute([], [(tokens, start_pos, table)])[0]

    def decode(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode step: ``tokens[b]`` at ``positions[b]`` of sequence ``b``; fp32 logits ``[B, vocab]``."""
        return self.execute(list(zip(tokens, positions, tables)), [])


def check_paged_support(config: ModelConfig) -> None:
    """Refuse what the paged attention backends do not implement: their decode kernels compute
    plain causal softmax attention, with no sliding window and no score soft-capping.

    Raises: MlakitError naming the feature (such models run through the reference forward:
    ``mlakit eval``, or generation without the engine).
    """
    missing = []
    if any(config.is_sliding(i) for i in range(config.num_layers)):
        missing.append(f"sliding-window layers (sliding_window={config.sliding_window})")
    if config.attention.logit_softcap is not None:
        missing.append(f"attention logit soft-capping (logit_softcap={config.attention.logit_softcap})")
    if missing:
        raise MlakitError(
            f"{config.name or 'this model'}: the engine's paged attention does not implement "
            f"{' or '.join(missing)} (Gemma 2/3); run it through the reference forward instead "
            "(`mlakit eval`, `mlakit.generate()`)"
        )
