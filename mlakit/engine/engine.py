"""The inference engine: paged cache + continuous batching + sampling + streaming.

Example::

    engine = Engine(model, EngineConfig(kv_memory="2GiB", block_size=16))
    outs = engine.generate([Request([1, 2, 3], SamplingConfig(max_new_tokens=16)), Request([4, 5])])
    for event in engine.stream([Request("Hello", SamplingConfig(temperature=0.7, seed=0))]):
        print(event.text, end="")

Requests join and leave between steps (:meth:`Engine.add_request`, :meth:`Engine.cancel`,
:meth:`Engine.step`); :meth:`Engine.stream` and :meth:`Engine.generate` drive the loop for a
batch. A bad request (empty prompt, too long, invalid sampling values, ...) is refused with one
:class:`mlakit.errors.MlakitError` by ``add_request`` and reported as an ``error`` event/output by
``stream``/``generate``; the other requests are served as usual.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mlakit.attention.backends import get_backend
from mlakit.config import MLAConfig
from mlakit.engine.config import EngineConfig
from mlakit.engine.runner import ModelRunner
from mlakit.engine.scheduler import Scheduler, Sequence, Status
from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig, sample
from mlakit.model import Transformer
from mlakit.paged import PagedCache

logger = logging.getLogger(__name__)

#: finished requests whose :meth:`Engine.output` stays available; older ones are forgotten, so a
#: long-running engine (``mlakit serve``) holds memory for the requests in flight, not all it served
FINISHED_HISTORY = 1024


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (text prompts, streamed text, stop strings)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Request:
    """One generation request: token ids (or text, with a tokenizer), sampling, stop strings."""

    prompt: Seq[int] | str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_strings: tuple[str, ...] = ()
    request_id: str | None = None


@dataclass(frozen=True)
class StreamEvent:
    """A new token of one request (``token is None`` for events without one, e.g. errors)."""

    request_id: str
    token: int | None
    text: str = ""  # new text (with a tokenizer); held back while it ends inside a UTF-8 character
    finished: bool = False
    # "stop" | "length" | "cancelled" | "budget" | "error" (and the server's "internal_error")
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None  # with SamplingConfig.logprobs: the token's log-probability
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # ... and the most likely tokens'


@dataclass
class RequestOutput:
    """The result of one request."""

    request_id: str
    prompt: list[int]
    tokens: list[int]
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0


class Engine:
    """Serves many requests at once from one model over a paged KV/latent cache of fixed bytes.

    Args:
        model: an mlakit Transformer (MLA, or MHA/GQA/MQA), weights in fp32 or bf16.
        config: runtime choices (budget, block size, cache dtype, decode path, batch limits).
        tokenizer: optional; needed for text prompts, streamed text and stop strings.

    Raises: MlakitError when the budget holds no block, or ``decode_path='absorbed'`` is asked
    of a full-RoPE model.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, tokenizer: Tokenizer | None = None):
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        mc = model.config
        c = self.config
        dtype = model.embed.weight.dtype
        device = model.embed.weight.device
        att = mc.attention
        is_mla = isinstance(att, MLAConfig)
        runtime = c.runtime
        absorb = model.attention_path(runtime, decode=True) == "absorbed"
        backend = get_backend(c.attention_backend, device)
        graphs = c.cuda_graphs and device.type == "cuda"  # padding rows of captured steps need a scratch block
        self.cache = PagedCache.allocate(mc, c.kv_bytes, c.block_size, c.cache_storage(dtype), device, scratch=graphs)
        graph_batch = c.max_batch_size if graphs else 0
        fused = c.fused_decode and device.type == "cpu"
        self.runner = ModelRunner(model, self.cache, backend, runtime, max_graph_batch=graph_batch, fused_decode=fused)
        self.scheduler = Scheduler(self.cache.pool, c.block_size, c.max_batch_size, c.prefill_chunk, mc.max_seq_len)
        self._seqs: dict[str, Sequence] = {}
        self._events: list[StreamEvent] = []
        self._errors: dict[str, str] = {}  # request id -> why it was refused
        self._finished: dict[str, None] = {}  # finished request ids, oldest first (insertion order)
        self._just_finished: list[str] = []  # finished in the events last handed out
        self._ids = itertools.count()
        logger.info(
            "engine: %d blocks x %d tokens (%d tokens, %.1f MiB of %.1f MiB budget), %s decode, %s backend",
            self.cache.num_blocks,
            c.block_size,
            self.cache.capacity_tokens(),
            self.cache.nbytes / 2**20,
            c.kv_bytes / 2**20,
            "absorbed" if absorb else "decompressing" if is_mla else "K/V",
            backend.name,
        )

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Seq[int] | str,
        sampling: SamplingConfig | None = None,
        stop_strings: Iterable[str] = (),
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises MlakitError for a request that cannot be served."""
        sampling = sampling if sampling is not None else SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise MlakitError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        stops = tuple(stop_strings)
        if any(not isinstance(s, str) or not s for s in stops):
            raise MlakitError(f"stop strings must be non-empty strings, got {stops!r}")
        if stops and self.tokenizer is None:
            raise MlakitError("stop strings need a tokenizer: pass one to Engine(...)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._seqs and self._seqs[rid].status is not Status.FINISHED:
            raise MlakitError(f"request id {rid!r} is already in use")
        self._finished.pop(rid, None)  # a finished id reused: the new request is not history
        ids = self._tokenize(prompt)
        seq = Sequence(
            request_id=rid,
            prompt=ids,
            sampling=sampling,
            stop_strings=stops,
            generator=sampling.generator(self.model.embed.weight.device),
        )
        if sampling.max_new_tokens == 0:
            seq.status, seq.finish_reason = Status.FINISHED, "length"
            self._seqs[rid] = seq
            self._events.append(StreamEvent(rid, None, finished=True, finish_reason="length"))
            return rid
        self.scheduler.add(seq)
        self._seqs[rid] = seq
        return rid

    def _tokenize(self, prompt: Seq[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MlakitError("a text prompt needs a tokenizer: pass one to Engine(...) or give token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError) as e:
                raise MlakitError(f"prompt must be text or a sequence of token ids: {e}") from e
        if not ids:
            raise MlakitError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise MlakitError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its cache blocks; ``False`` if it is unknown or already finished."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return False
        self.scheduler.release(seq, "cancelled")
        self._events.append(StreamEvent(request_id, None, finished=True, finish_reason="cancelled"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._events)

    def error(self, request_id: str) -> str | None:
        """Why request ``request_id`` was refused by :meth:`stream`, or ``None``."""
        return self._errors.get(request_id)

    def output(self, request_id: str) -> RequestOutput:
        """The request's output so far (or final: the last :data:`FINISHED_HISTORY` finished ones are kept).

        Raises: MlakitError for an unknown request id, or one finished too long ago.
        """
        seq = self._seqs.get(request_id)
        if seq is None:
            raise MlakitError(
                f"unknown request id {request_id!r} (or finished more than {FINISHED_HISTORY} requests ago)"
            )
        return RequestOutput(
            request_id, seq.prompt, list(seq.output), seq.text, seq.finish_reason, num_preemptions=seq.num_preemptions
        )

    # -- the loop ----------------------------------------------------------------------------

    def step(self) -> list[StreamEvent]:
        """Run one engine step: every decode and this step's prefill chunks in one model call.

        Returns the events it produced.
        """
        self._retire(self._just_finished)
        self._just_finished = []
        events, self._events = self._events, []
        plan = self.scheduler.schedule()
        for seq in self.scheduler.stuck():
            logger.warning("%s needs more cache than the whole KV budget; stopping it", seq.request_id)
            self.scheduler.release(seq, "budget")
            events.append(StreamEvent(seq.request_id, None, finished=True, finish_reason="budget"))
        decode = [s for s in plan.decode if s.status is Status.RUNNING]
        if not decode and not plan.prefill:
            self._just_finished = [e.request_id for e in events if e.finished]
            return events
        logits = self.runner.execute(
            [(s.tokens[-1], s.num_cached, s.table) for s in decode],
            [(seq.tokens[start : start + n], start, seq.table) for seq, start, n in plan.prefill],
        )  # [len(decode) + len(prefill), vocab]
        ready: list[tuple[Sequence, int]] = []
        for i, seq in enumerate(decode):
            seq.num_cached += 1
            ready.append((seq, i))
        for j, (seq, _, n) in enumerate(plan.prefill):
            seq.num_cached += n
            if seq.num_cached == seq.num_tokens:  # the prompt is in: its last logits give a token
                ready.append((seq, len(decode) + j))
        for (seq, row), tok in zip(ready, self._sample(logits, ready)):
            event = self._emit(seq, tok)
            if seq.sampling.logprobs is not None:
                event = self._with_logprobs(event, logits[row], tok, seq.sampling.logprobs)
            events.append(event)
        self._just_finished = [e.request_id for e in events if e.finished]
        return events

    def _retire(self, request_ids: list[str]) -> None:
        """Move finished requests into the bounded history, forgetting the oldest beyond it.

        Called one step after their finished events went out, so the caller that saw the event
        can still read :meth:`output`.
        """
        for rid in request_ids:
            self._finished[rid] = None
        while len(self._finished) > FINISHED_HISTORY:
            old = next(iter(self._finished))
            del self._finished[old]
            if old in self._seqs and self._seqs[old].status is Status.FINISHED:
                del self._seqs[old]
                self._errors.pop(old, None)

    @staticmethod
    def _with_logprobs(event: StreamEvent, logits: torch.Tensor, tok: int, top: int) -> StreamEvent:
        """``event`` with the model's log-probabilities (before temperature and filtering, as vLLM reports)."""
        lp = logits.float().log_softmax(dim=-1)
        best = lp.topk(top) if top else None
        pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
        return dataclasses.replace(event, logprob=float(lp[tok]), top_logprobs=pairs)

    def _sample(self, logits: torch.Tensor, ready: list[tuple[Sequence, int]]) -> list[int]:
        """Next tokens for ``ready`` sequences from their rows of ``logits``: one device sync for all greedy rows."""
        out: list[int | None] = [None] * len(ready)
        greedy = [k for k, (seq, _) in enumerate(ready) if seq.sampling.temperature == 0]
        if greedy:
            rows = torch.tensor([ready[k][1] for k in greedy], device=logits.device)
            for k, tok in zip(greedy, logits[rows].argmax(dim=-1).tolist()):
                out[k] = tok
        for k, (seq, row) in enumerate(ready):
            if out[k] is None:
                out[k] = int(sample(logits[row].unsqueeze(0), seq.sampling, seq.generator)[0])
        return [int(t) for t in out]  # type: ignore[arg-type]

    def _emit(self, seq: Sequence, tok: int) -> StreamEvent:
        """Append ``tok`` to ``seq``, update its text and finish conditions."""
        cfg = seq.sampling
        seq.output.append(tok)
        reason = None
        delta = ""
        if self.tokenizer is not None:
            delta, reason = self._detokenize(seq, final=False)
        if reason is None:
            if tok in cfg.stop_tokens:
                reason = "stop"
            elif len(seq.output) >= cfg.max_new_tokens or seq.num_tokens >= self.model.config.max_seq_len:
                reason = "length"
            if reason is not None and self.tokenizer is not None:
                more, _ = self._detokenize(seq, final=True)
                delta += more
        if reason is not None:
            self.scheduler.release(seq, reason)
        return StreamEvent(seq.request_id, tok, delta, reason is not None, reason)

    def _detokenize(self, seq: Sequence, final: bool) -> tuple[str, str | None]:
        """New text of ``seq`` since the last call, and ``"stop"`` when a stop string appeared.

        Incremental (vLLM/TGI): only the tokens from ``seq.prefix_offset`` are decoded, so a step
        costs O(new tokens), not O(output). Text that ends inside a UTF-8 character is held back
        until the character completes (or the request finishes, ``final``).
        """
        assert self.tokenizer is not None
        ids = seq.output
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset])
        full = self.tokenizer.decode(ids[seq.prefix_offset :])
        if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return "", None
        delta = full[len(prefix) :] if full.startswith(prefix) else full
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        if seq.stop_strings and delta:
            # a stop string may straddle the old text and the new: search the joined tail only
            longest = max(len(s) for s in seq.stop_strings)
            tail_start = max(0, len(seq.text) - longest + 1)
            text = seq.text + delta
            hits = [k for k in (text.find(s, tail_start) for s in seq.stop_strings) if k >= 0]
            if hits:
                cut = min(hits)
                delta = text[len(seq.text) : cut] if cut > len(seq.text) else ""
                seq.text = text[:cut]
                return delta, "stop"
        seq.text += delta
        return delta, None

    def stream(self, requests: Iterable[Request | Seq[int] | str]) -> Iterator[StreamEvent]:
        """Serve ``requests`` together, yielding events as tokens are produced.

        A request that cannot be served yields one event with ``error`` set and
        ``finish_reason="error"``; the others continue.
        """
        for req in requests:
            if not isinstance(req, Request):
                req = Request(req)
            rid = req.request_id if req.request_id is not None else f"req-{next(self._ids)}"
            try:
                self.add_request(req.prompt, req.sampling, req.stop_strings, rid)
            except MlakitError as e:
                logger.info("request %s refused: %s", rid, e)
                self._seqs[rid] = Sequence(rid, [], req.sampling, status=Status.FINISHED, finish_reason="error")
                self._errors[rid] = str(e)
                self._retire([rid])
                yield StreamEvent(rid, None, finished=True, finish_reason="error", error=str(e))
        while self.has_unfinished():
            yield from self.step()

    def generate(self, requests: Iterable[Request | Seq[int] | str]) -> list[RequestOutput]:
        """Serve ``requests`` to completion; one :class:`RequestOutput` per request, in order."""
        reqs = [r if isinstance(r, Request) else Request(r) for r in requests]
        reqs = [
            r if r.request_id is not None else Request(r.prompt, r.sampling, r.stop_strings, f"req-{next(self._ids)}")
            for r in reqs
        ]
        done: dict[str, RequestOutput] = {}
        for event in self.stream(reqs):
            if event.finished:  # read now: older finished requests are forgotten (FINISHED_HISTORY)
                done[event.request_id] = self.output(event.request_id)
                done[event.request_id].error = self._errors.get(event.request_id)
        return [done[r.request_id] for r in reqs if r.request_id is not None]

    def stats(self) -> dict[str, int]:
        """Pool and scheduler counters (blocks used/free, running, waiting, preemptions)."""
        pool = self.cache.pool
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used,
            "blocks_free": pool.num_free,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "cache_bytes": self.cache.nbytes,
        }
