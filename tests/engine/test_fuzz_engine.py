"""Random request streams through the engine (hypothesis): no crash, no hang, no leaked cache block.

A stream interleaves requests (prompt lengths up to past the budget and the context, bad token
ids, empty prompts, every sampling knob including invalid values, stop strings and stop tokens),
cancellations (of running, waiting, finished and unknown requests) and engine steps, under a KV
budget of a few blocks so that preemption and "budget" finishes happen. After every step the
blocks in use are exactly those in the running sequences' tables; at the end every request has
finished once, within its token limit, and the pool is whole again.

The default suite runs a few derandomized streams; ``-m slow`` many more.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlakit import MlakitError, ModelConfig, SamplingConfig, Transformer
from mlakit.engine import Engine, EngineConfig
from mlakit.engine.scheduler import Status
from mlakit.paged import PagedCache
from mlakit.text import ByteTokenizer
from tests.conftest import build

COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=15, derandomize=True, **COMMON)  # type: ignore[arg-type]
SLOW = settings(max_examples=1000, **COMMON)  # type: ignore[arg-type]
MAX_STEPS = 20_000  # far above what any stream needs: more means the engine stopped making progress
REASONS = {"stop", "length", "cancelled", "budget"}

MODELS: dict[str, Transformer] = {}


def model(kind: str) -> Transformer:
    if kind not in MODELS:
        MODELS[kind] = build(ModelConfig.from_preset(kind, max_seq_len=64))
    return MODELS[kind]


INVALID_KNOBS: dict[str, Any] = {
    "max_new_tokens": -1,
    "temperature": -1.0,
    "top_k": 0,
    "top_p": 0.0,
    "logprobs": 25,
}


@st.composite
def sampling(draw: st.DrawFn) -> dict[str, Any]:
    """Valid sampling knobs; one in six streams' requests gets one invalid knob."""
    knobs = dict(
        max_new_tokens=draw(st.integers(0, 24)),
        temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.5])),
        top_k=draw(st.sampled_from([None, None, 1, 5, 300])),
        top_p=draw(st.sampled_from([None, None, 0.5, 1.0])),
        seed=draw(st.sampled_from([None, 0, 7])),
        stop_tokens=tuple(draw(st.lists(st.integers(0, 255), max_size=3))),
        logprobs=draw(st.sampled_from([None, None, 0, 3])),
    )
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from(sorted(INVALID_KNOBS)))
        knobs[bad] = INVALID_KNOBS[bad]
    return knobs


@st.composite
def request(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["ids"] * 6 + ["text"] * 2 + ["empty", "bad-id"]))
    n = draw(st.one_of(st.integers(1, 12), st.integers(1, 80)))  # sometimes past the context and the budget
    if kind == "ids":
        prompt: Any = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    elif kind == "text":
        prompt = draw(st.text(alphabet="ab é\n", min_size=1, max_size=n))
    elif kind == "empty":
        prompt = []
    else:
        prompt = [1, 2, draw(st.sampled_from([256, -1, 10**9]))]
    stops = tuple(draw(st.lists(st.text(alphabet="ab é", min_size=1, max_size=2), max_size=2)))
    if draw(st.integers(0, 19)) == 0:
        stops += ("",)  # refused: an empty stop string
    return "add", (prompt, draw(sampling()), stops)


@st.composite
def stream(draw: st.DrawFn) -> dict[str, Any]:
    ops = draw(
        st.lists(
            st.one_of(
                request(),
                st.tuples(st.just("cancel"), st.integers(0, 30)),
                st.tuples(st.just("step"), st.integers(1, 6)),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return dict(
        kind=draw(st.sampled_from(["tiny-mla", "tiny-gqa"])),
        blocks=draw(st.integers(2, 10)),
        block_size=draw(st.sampled_from([2, 4, 8])),
        max_batch_size=draw(st.integers(1, 4)),
        prefill_chunk=draw(st.integers(1, 24)),
        cache_dtype=draw(st.sampled_from(["auto", "int8"])),
        ops=ops,
    )


def check_invariants(engine: Engine) -> None:
    pool, sched = engine.cache.pool, engine.scheduler
    held = [b for s in sched.running for b in s.table]
    assert len(held) == len(set(held)), "a block is in two tables"
    assert pool.num_used == len(held), f"{pool.num_used} blocks in use, {len(held)} in running tables: a leak"
    assert all(not s.table for s in sched.waiting), "a waiting sequence holds blocks"
    assert pool.num_used + pool.num_free == pool.num_blocks
    assert engine.cache.nbytes <= engine.config.kv_bytes, "the cache outgrew its budget"


def run_stream(s: dict[str, Any]) -> dict[str, int]:
    m = model(s["kind"])
    per_block = PagedCache.block_bytes(
        m.config, s["block_size"], "int8" if s["cache_dtype"] == "int8" else torch.float32
    )
    config = EngineConfig(
        kv_memory=s["blocks"] * per_block,
        block_size=s["block_size"],
        max_batch_size=s["max_batch_size"],
        prefill_chunk=s["prefill_chunk"],
        cache_dtype=s["cache_dtype"],
        attention_backend="torch",
    )
    engine = Engine(m, config, tokenizer=ByteTokenizer())
    assert engine.cache.pool.num_blocks == s["blocks"]
    ids: list[str] = []
    limits: dict[str, int] = {}
    counts = {"refused": 0, "accepted": 0, "steps": 0, "cancelled": 0}
    finished: dict[str, str] = {}

    def step() -> None:
        for event in engine.step():
            if event.finished:
                assert event.request_id not in finished, f"{event.request_id} finished twice"
                assert event.finish_reason in REASONS, event
                finished[event.request_id] = event.finish_reason
        counts["steps"] += 1
        check_invariants(engine)

    for op, arg in s["ops"]:
        if op == "add":
            prompt, knobs, stops = arg
            try:
                rid = engine.add_request(prompt, SamplingConfig(**knobs), stops)
            except MlakitError as e:
                assert str(e)
                counts["refused"] += 1
                continue
            ids.append(rid)
            limits[rid] = knobs["max_new_tokens"]
            counts["accepted"] += 1
        elif op == "cancel":
            target = ids[arg % len(ids)] if ids and arg < 25 else f"unknown-{arg}"
            counts["cancelled"] += engine.cancel(target)
        else:
            for _ in range(arg):
                step()
        check_invariants(engine)
    while engine.has_unfinished():
        assert counts["steps"] < MAX_STEPS, f"no end after {MAX_STEPS} steps: {engine.stats()}"
        step()
    pool = engine.cache.pool
    assert pool.num_free == pool.num_blocks, f"{pool.num_used} blocks leaked"
    counts["preemptions"] = engine.stats()["preemptions"]
    for rid in ids:
        out = engine.output(rid)
        assert engine._seqs[rid].status is Status.FINISHED
        assert out.finish_reason in REASONS and finished.get(rid) == out.finish_reason, (rid, out, finished.get(rid))
        assert len(out.tokens) <= limits[rid]
    return counts


@FAST
@given(s=stream())
def test_random_request_streams(s: dict[str, Any]) -> None:
    run_stream(s)


@pytest.mark.slow
@SLOW
@given(s=stream())
def test_random_request_streams_many(s: dict[str, Any]) -> None:
    run_stream(s)


def test_streams_exercise_refusal_preemption_and_cancellation() -> None:
    """The generator reaches the interesting cases (else the properties above prove little)."""
    seen = {"refused": 0, "cancelled": 0, "budget": 0, "preemptions": 0}
    m = model("tiny-mla")
    engine = Engine(m, EngineConfig(kv_memory=3 * PagedCache.block_bytes(m.config, 2, torch.float32), block_size=2))
    a = engine.add_request([1, 2, 3], SamplingConfig(max_new_tokens=20))
    b = engine.add_request([4, 5], SamplingConfig(max_new_tokens=20))
    with pytest.raises(MlakitError, match="needs 4 cache blocks"):
        engine.add_request(list(range(8)))
    seen["refused"] += 1
    for _ in range(3):
        engine.step()
    seen["cancelled"] += engine.cancel(b)
    while engine.has_unfinished():
        for ev in engine.step():
            seen["budget"] += ev.finish_reason == "budget"
    seen["preemptions"] = engine.stats()["preemptions"]
    assert engine.output(a).finish_reason == "budget" and engine.cache.pool.num_free == 3
    assert seen["refused"] and seen["cancelled"] and seen["budget"]
