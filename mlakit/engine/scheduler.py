"""Continuous batching: which sequences prefill, decode, wait or get preempted at each step.

Between two engine steps requests may join (``add``), leave (finished or ``cancel``, which frees
their blocks at once) and be preempted. Each :meth:`Scheduler.schedule`:

1. gives every decoding sequence the slot for its next token, allocating a block when it crosses
   a block boundary; when the pool is empty it *preempts* the most recently admitted running
   sequence (frees all its blocks; it goes back to the head of the queue and is recomputed by
   prefill over prompt + generated tokens when re-admitted);
2. admits waiting sequences, oldest first, while a batch slot is free and the pool holds blocks
   for their whole prompt (admission by free blocks; nothing is admitted in a step that had to
   preempt);
3. hands out prefill work: up to ``prefill_chunk`` prompt tokens per step in total.

The pool never over-commits, so the cache never exceeds its byte budget; a request that could
never fit (longer than the context, or than the whole pool) is refused by :meth:`Scheduler.add`.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig
from mlakit.paged import BlockPool

logger = logging.getLogger(__name__)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state. ``tokens = prompt + output``; ``num_cached`` of them are in the cache."""

    request_id: str
    prompt: list[int]
    sampling: SamplingConfig
    stop_strings: tuple[str, ...] = ()
    output: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    num_cached: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: str = ""  # detokenized output so far (when the engine has a tokenizer)
    prefix_offset: int = 0  # incremental detokenization: output[prefix_offset:read_offset] is decoded
    read_offset: int = 0
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (1 while decoding: the last sampled token)."""
        return self.num_tokens - self.num_cached


@dataclass
class Plan:
    """One step's work: prefill chunks ``(seq, start_pos, num_tokens)`` and the decode batch."""

    prefill: list[tuple[Sequence, int, int]]
    decode: list[Sequence]
    preempted: list[Sequence]


class Scheduler:
    """Admission, growth, preemption and release of sequences over one :class:`BlockPool`.

    Args:
        pool: the block pool of the engine's paged cache.
        block_size: tokens per block.
        max_batch_size: most running sequences.
        prefill_chunk: most prompt tokens prefilled per step (all sequences together).
        max_seq_len: the model's context; a sequence stops growing there.
    """

    def __init__(self, pool: BlockPool, block_size: int, max_batch_size: int, prefill_chunk: int, max_seq_len: int):
        self.pool = pool
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``. Raises MlakitError if its prompt can never fit the context or the pool."""
        n = len(seq.prompt)
        if n > self.max_seq_len:
            raise MlakitError(f"prompt of {n} tokens is longer than the model's context ({self.max_seq_len} tokens)")
        if self.blocks_for(n) > self.pool.num_blocks:
            raise MlakitError(
                f"prompt of {n} tokens needs {self.blocks_for(n)} cache blocks but the whole KV budget holds "
                f"{self.pool.num_blocks} ({self.pool.num_blocks * self.block_size} tokens): raise kv_memory"
            )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, seq: Sequence, reason: str) -> None:
        """Finish ``seq`` (``reason`` e.g. ``"stop"``, ``"length"``, ``"cancelled"``) and free its blocks now."""
        self.pool.free(seq.table)
        seq.table = []
        seq.num_cached = 0
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.table)
        seq.table = []
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        logger.info("preempted %s (%d tokens, recomputed later)", seq.request_id, seq.num_tokens)

    def schedule(self) -> Plan:
        """Decide this step's work (allocating and preempting as needed). See the module docstring."""
        preempted: list[Sequence] = []
        decode: list[Sequence] = []
        # 1. room for every decoding sequence's next token, oldest first
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1 or seq.num_cached == 0:
                continue
            while self.blocks_for(seq.num_cached + 1) > len(seq.table):
                if self.pool.num_free:
                    seq.table += self.pool.allocate(1)
                    continue
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    break  # alone and the pool is full: the caller finishes it ("budget")
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING and self.blocks_for(seq.num_cached + 1) <= len(seq.table):
                decode.append(seq)
        # 2. admission by free blocks (not in a step that had to preempt)
        if not preempted:
            while self.waiting and len(self.running) < self.max_batch_size:
                seq = self.waiting[0]
                need = self.blocks_for(seq.num_tokens)
                if need > self.pool.num_free:
                    break
                self.waiting.popleft()
                seq.table = self.pool.allocate(need)
                seq.num_cached = 0
                seq.status = Status.RUNNING
                self.running.append(seq)
        # 3. prefill chunks
        prefill: list[tuple[Sequence, int, int]] = []
        budget = self.prefill_chunk
        for seq in self.running:
            if budget == 0:
                break
            if seq.pending > 1 or (seq.pending == 1 and seq.num_cached == 0):
                n = min(seq.pending, budget)
                prefill.append((seq, seq.num_cached, n))
                budget -= n
        return Plan(prefill=prefill, decode=decode, preempted=preempted)

    def stuck(self) -> list[Sequence]:
        """Running sequences that need a block the pool cannot give even after preempting the rest."""
        return [
            s
            for s in self.running
            if s.pending == 1 and s.num_cached > 0 and self.blocks_for(s.num_cached + 1) > len(s.table)
        ]
