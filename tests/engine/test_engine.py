"""The engine against the solo reference (:func:`mlakit.generate`), block accounting, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlakit import MlakitError, ModelConfig, SamplingConfig, Transformer, generate
from mlakit.engine import Engine, EngineConfig, Request
from mlakit.paged import PagedCache
from tests.conftest import TOLERANCES, build, tiny_mla_config

KINDS = ["tiny-mla", "tiny-mla-noq", "tiny-mla-full", "tiny-mha", "tiny-gqa", "tiny-mqa"]
PROMPTS = [[5, 9, 2, 77, 3], [100], [8, 8, 8, *range(40)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 3]]


def tiny(kind: str) -> Transformer:
    if kind == "tiny-mla-full":
        return build(tiny_mla_config(rope_mode="full", qk_rope_head_dim=0))
    return build(ModelConfig.from_preset(kind))


def solo(model: Transformer, prompt: list[int], sampling: SamplingConfig) -> list[int]:
    return generate(model, [prompt], sampling)[0]


def budget(model: Transformer, blocks: int, block_size: int, dtype: torch.dtype | str = torch.float32) -> int:
    return blocks * PagedCache.block_bytes(model.config, block_size, dtype)


class Watch:
    """Runs an engine step by step, checking after each step that the pool and budget hold."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self) -> None:
        e = self.engine
        while e.has_unfinished():
            e.step()
            pool = e.cache.pool
            assert pool.num_used + pool.num_free == pool.num_blocks
            assert e.cache.nbytes <= e.config.kv_bytes
            held = sum(len(s.table) for s in e.scheduler.running)
            assert held == pool.num_used  # every used block belongs to exactly one running sequence


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_batching_equals_solo_greedy(kind: str) -> None:
    model = tiny(kind)
    sampling = SamplingConfig(max_new_tokens=12)
    want = [solo(model, p, sampling) for p in PROMPTS]
    # small blocks, small prefill chunks, at most 3 running: requests join as others leave
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4, prefill_chunk=6, max_batch_size=3))
    outs = engine.generate([Request(p, sampling) for p in PROMPTS])
    assert [o.tokens for o in outs] == want
    assert engine.cache.pool.num_free == engine.cache.num_blocks


def test_requests_join_between_steps() -> None:
    model = tiny("tiny-mla")
    sampling = SamplingConfig(max_new_tokens=10)
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4))
    first = engine.add_request(PROMPTS[0], sampling)
    for _ in range(4):
        engine.step()
    late = engine.add_request(PROMPTS[2], sampling)
    Watch(engine).run()
    assert engine.output(first).tokens == solo(model, PROMPTS[0], sampling)
    assert engine.output(late).tokens == solo(model, PROMPTS[2], sampling)


@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-gqa", "tiny-mla-full"])
def test_preemption_recomputes_and_returns_every_block(kind: str) -> None:
    model = tiny(kind)
    sampling = SamplingConfig(max_new_tokens=30)
    prompts = [list(range(i, i + 10)) for i in range(5)]
    want = [solo(model, p, sampling) for p in prompts]
    engine = Engine(model, EngineConfig(kv_memory=budget(model, 22, 4), block_size=4, prefill_chunk=8))
    for p in prompts:
        engine.add_request(p, sampling)
    Watch(engine).run()
    outs = [engine.output(f"req-{i}") for i in range(5)]
    assert [o.tokens for o in outs] == want
    assert engine.stats()["preemptions"] > 0
    assert engine.cache.pool.num_free == engine.cache.num_blocks


def test_cancel_frees_blocks_at_once() -> None:
    model = tiny("tiny-gqa")
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4))
    keep = engine.add_request(PROMPTS[0], SamplingConfig(max_new_tokens=8))
    drop = engine.add_request(PROMPTS[2], SamplingConfig(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    used = engine.cache.pool.num_used
    held = len(engine.scheduler.running[1].table)
    assert engine.cancel(drop) and not engine.cancel(drop)
    assert engine.cache.pool.num_used == used - held
    Watch(engine).run()
    assert engine.output(drop).finish_reason == "cancelled"
    assert engine.output(keep).tokens == solo(model, PROMPTS[0], SamplingConfig(max_new_tokens=8))
    assert engine.cache.pool.num_free == engine.cache.num_blocks
    waiting = engine.add_request(PROMPTS[1], SamplingConfig(max_new_tokens=3))
    assert engine.cancel(waiting)  # a waiting request holds no blocks; it just leaves the queue
    assert [e.finish_reason for e in engine.step()] == ["cancelled"] and not engine.has_unfinished()


@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-gqa", "tiny-mla-full"])
def test_paged_logits_equal_contiguous(kind: str) -> None:
    """Prefill in chunks and decode over a fragmented block table == the uncached full forward."""
    model = tiny(kind)
    engine = Engine(model, EngineConfig(kv_memory=budget(model, 12, 4), block_size=4))
    table = [9, 3, 4, 0, 7, 11, 1]  # non-consecutive on purpose
    seq = [int(t) for t in torch.randint(0, 256, (25,))]
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]  # [T, vocab]
    tol = TOLERANCES[torch.float32] * 10  # logits, after two layers and the head
    got = engine.runner.prefill(seq[:7], 0, table)
    assert (got - full[6]).abs().max() < tol
    got = engine.runner.prefill(seq[7:20], 7, table)  # a chunk at start_pos > 0
    assert (got - full[19]).abs().max() < tol
    for p in range(20, 25):  # decode steps
        got = engine.runner.decode([seq[p]], [p], [table])[0]
        assert (got - full[p]).abs().max() < tol


@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-gqa"])
@pytest.mark.parametrize("cache_dtype,tol", [("int8", 0.01), ("bf16", 0.01)])
def test_low_precision_cache_within_tolerance(kind: str, cache_dtype: str, tol: float) -> None:
    """int8 (per-token scales) and bf16 caches: logits within ``tol`` x logit range of the fp32 cache (~0.1% seen)."""
    model = tiny(kind)
    seq = [int(t) for t in torch.randint(0, 256, (40,))]
    logits = {}
    for dt in ("fp32", cache_dtype):
        engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=8, cache_dtype=dt))  # type: ignore[arg-type]
        table = engine.cache.pool.allocate(6)
        out = [engine.runner.prefill(seq[:30], 0, table)]
        out += [engine.runner.decode([seq[p]], [p], [table])[0] for p in range(30, 40)]
        logits[dt] = torch.stack(out)
    ref = logits["fp32"]
    err = (logits[cache_dtype] - ref).abs().max() / (ref.max() - ref.min())
    assert err < tol


def test_seeded_sampling_matches_solo_and_stop_tokens() -> None:
    model = tiny("tiny-mla")
    s = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=3)
    want = [solo(model, p, s) for p in PROMPTS[:3]]
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4))
    assert [o.tokens for o in engine.generate([Request(p, s) for p in PROMPTS[:3]])] == want
    greedy = solo(model, PROMPTS[0], SamplingConfig(max_new_tokens=6))
    stop = SamplingConfig(max_new_tokens=20, stop_tokens=(greedy[2],))
    out = engine.generate([Request(PROMPTS[0], stop)])[0]
    assert out.tokens == greedy[: greedy.index(greedy[2]) + 1] and out.finish_reason == "stop"


class CharTokenizer:
    """Token id = byte value (vocab 256), enough to test text streaming and stop strings."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def test_streaming_text_and_stop_strings() -> None:
    model = tiny("tiny-mla")
    tok = CharTokenizer()
    engine = Engine(model, EngineConfig(kv_memory="1MiB"), tokenizer=tok)
    ids = solo(model, tok.encode("hello"), SamplingConfig(max_new_tokens=12))
    full = tok.decode(ids)
    events = list(engine.stream([Request("hello", SamplingConfig(max_new_tokens=12))]))
    assert [e.token for e in events] == ids and events[-1].finished
    text = "".join(e.text for e in events)
    assert text == full or "\ufffd" in full
    stop = next((full[i : i + 2] for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2]), None)
    if stop is not None:
        out = engine.generate([Request("hello", SamplingConfig(max_new_tokens=12), stop_strings=(stop,))])[0]
        assert out.finish_reason == "stop" and stop not in out.text and full.startswith(out.text)


def test_bad_requests_get_one_error_each_and_others_are_served() -> None:
    model = tiny("tiny-mla")  # context 256
    sampling = SamplingConfig(max_new_tokens=5)
    engine = Engine(model, EngineConfig(kv_memory=budget(model, 20, 4), block_size=4))  # 80 tokens
    reqs = [
        Request(PROMPTS[0], sampling),
        Request([], sampling),  # empty
        Request(list(range(100)) * 3, sampling),  # longer than the context
        Request(list(range(90)), sampling),  # fits the context, not the whole budget
        Request([1, 999], sampling),  # outside the vocabulary
        Request("text", sampling),  # text without a tokenizer
        Request(PROMPTS[1], sampling),
    ]
    outs = engine.generate(reqs)
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[-1] is None
    for e, msg in zip(
        errors[1:6],
        ["empty", "longer than the model's context", "whole KV budget", "outside the vocabulary", "needs a tokenizer"],
    ):
        assert e is not None and msg in e
    assert outs[0].tokens == solo(model, PROMPTS[0], sampling)
    assert outs[-1].tokens == solo(model, PROMPTS[1], sampling)
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=-1)]:
        with pytest.raises(MlakitError, match="SamplingConfig"):
            SamplingConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(MlakitError, match="sampling must be"):
        engine.add_request([1, 2], sampling={"temperature": 1})  # type: ignore[arg-type]


def test_sequence_longer_than_budget_stops_with_budget_reason() -> None:
    model = tiny("tiny-mla")
    engine = Engine(model, EngineConfig(kv_memory=budget(model, 3, 4), block_size=4))  # 12 tokens
    out = engine.generate([Request([1, 2, 3], SamplingConfig(max_new_tokens=50))])[0]
    assert out.finish_reason == "budget" and len(out.tokens) == 10
    assert engine.cache.pool.num_free == 3


def test_engine_config_validation() -> None:
    for bad, msg in [
        (dict(block_size=0), "block_size"),
        (dict(kv_memory="lots"), "kv_memory"),
        (dict(cache_dtype="fp8"), "cache_dtype"),
        (dict(decode_path="fast"), "decode_path"),
    ]:
        with pytest.raises(MlakitError, match=msg):
            EngineConfig(**bad)  # type: ignore[arg-type]
    full = tiny("tiny-mla-full")
    with pytest.raises(MlakitError, match="decoupled"):
        Engine(full, EngineConfig(decode_path="absorbed"))
    assert dataclasses.replace(EngineConfig(), kv_memory="2GiB").kv_bytes == 2**31


@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-mla-full"])
def test_naive_decode_path_equals_fast_path(kind: str) -> None:
    """Fully decompressing decode == absorbed (decoupled) / value-absorbed (full RoPE) decode."""
    model = tiny(kind)
    sampling = SamplingConfig(max_new_tokens=10)
    outs = {}
    for path in ("auto", "naive"):
        engine = Engine(model, EngineConfig(kv_memory="1MiB", decode_path=path))  # type: ignore[arg-type]
        outs[path] = [o.tokens for o in engine.generate([Request(p, sampling) for p in PROMPTS])]
    assert outs["auto"] == outs["naive"]


@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-gqa", "tiny-mla-full"])
def test_bf16_weights_run_and_match_the_bf16_forward(kind: str) -> None:
    model = tiny(kind).to(torch.bfloat16)
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4))
    assert engine.cache.layers[0][0].data.dtype == torch.bfloat16  # cache_dtype="auto" follows the weights
    seq = [int(t) for t in torch.randint(0, 256, (20,))]
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0].float()  # [T, vocab]
    table = engine.cache.pool.allocate(5)
    got = [engine.runner.prefill(seq[:16], 0, table)]
    got += [engine.runner.decode([seq[p]], [p], [table])[0] for p in range(16, 20)]
    err = (torch.stack(got) - full[15:20]).abs().max() / (full.max() - full.min())
    assert err < TOLERANCES[torch.bfloat16]
    engine.cache.pool.free(table)
    out = engine.generate([Request(seq[:5], SamplingConfig(max_new_tokens=4))])[0]
    assert len(out.tokens) == 4 and engine.cache.pool.num_free == engine.cache.num_blocks


def test_finished_requests_are_forgotten_beyond_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-running engine holds the requests in flight plus a bounded history, not all it served."""
    from mlakit.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "FINISHED_HISTORY", 3)
    model = tiny("tiny-mla")
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4))
    sampling = SamplingConfig(max_new_tokens=2)
    outs = engine.generate([Request(p, sampling) for p in PROMPTS] * 2)  # more than the history
    assert [o.tokens for o in outs[: len(PROMPTS)]] == [solo(model, p, sampling) for p in PROMPTS]
    for _ in range(3):
        engine.add_request(PROMPTS[0], sampling)
        while engine.has_unfinished():
            engine.step()
    engine.step()  # the last finished events went out: retire them too
    assert len(engine._seqs) == 3  # the history, nothing more
    with pytest.raises(MlakitError, match="unknown request id 'req-0'"):
        engine.output("req-0")
