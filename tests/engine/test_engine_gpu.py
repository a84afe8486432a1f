"""The engine on a CUDA device: every backend there against the solo reference on the same device.

Skipped without CUDA (CI has none); run with ``pytest -m gpu`` where a GPU is present.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mlakit import SamplingConfig, generate
from mlakit.engine import Engine, EngineConfig, Request
from tests.conftest import TOLERANCES
from tests.engine.test_engine import PROMPTS, tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-mla-full", "tiny-gqa"])
def test_engine_on_cuda_equals_solo_greedy(kind: str, backend: str) -> None:
    model = tiny(kind).cuda()
    sampling = SamplingConfig(max_new_tokens=12)
    want = [generate(model, [p], sampling)[0] for p in PROMPTS]
    engine = Engine(
        model,
        EngineConfig(kv_memory="1MiB", block_size=4, prefill_chunk=6, max_batch_size=3, attention_backend=backend),
    )
    assert engine.cache.layers[0][0].data.device.type == "cuda"
    outs = engine.generate([Request(p, sampling) for p in PROMPTS])
    assert [o.tokens for o in outs] == want
    assert engine.cache.pool.num_free == engine.cache.num_blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny-mla", "tiny-gqa"])
def test_paged_logits_on_cuda_equal_the_full_forward(kind: str, backend: str) -> None:
    model = tiny(kind).cuda()
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4, attention_backend=backend))
    table = [9, 3, 4, 0, 7, 11, 1]
    seq = [int(t) for t in torch.randint(0, 256, (25,))]
    with torch.no_grad():
        full = model(torch.tensor([seq], device="cuda"))[0]  # [T, vocab]
    tol = TOLERANCES[torch.float32] * 10
    assert (engine.runner.prefill(seq[:20], 0, table) - full[19]).abs().max() < tol
    for p in range(20, 25):
        assert (engine.runner.decode([seq[p]], [p], [table])[0] - full[p]).abs().max() < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_engine_on_cuda_runs_within_tolerance(backend: str) -> None:
    model = tiny("tiny-mla").cuda().to(torch.bfloat16)
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4, attention_backend=backend))
    seq = [int(t) for t in torch.randint(0, 256, (20,))]
    with torch.no_grad():
        full = model(torch.tensor([seq], device="cuda"))[0].float()
    table = engine.cache.pool.allocate(5)
    got = [engine.runner.prefill(seq[:16], 0, table)]
    got += [engine.runner.decode([seq[p]], [p], [table])[0] for p in range(16, 20)]
    err = (torch.stack(got).float() - full[15:20]).abs().max() / (full.max() - full.min())
    assert err < TOLERANCES[torch.bfloat16]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("cache_dtype", ["auto", "bf16"])
def test_cuda_graph_decode_equals_eager(cache_dtype: str) -> None:
    """Captured decode steps (padded batches, any context) give the eager steps' tokens; ragged
    batches that shrink as requests finish replay smaller graphs."""
    model = tiny("tiny-mla").cuda()
    prompts = [*PROMPTS, list(range(60)), [7] * 33]
    sampling = [SamplingConfig(max_new_tokens=n) for n in (12, 3, 20, 7, 16, 9, 25)]
    outs = {}
    for graphs in (False, True):
        config = EngineConfig(
            kv_memory="1MiB", block_size=4, max_batch_size=6, cache_dtype=cache_dtype, cuda_graphs=graphs
        )
        engine = Engine(model, config)
        outs[graphs] = [o.tokens for o in engine.generate([Request(p, s) for p, s in zip(prompts, sampling)])]
        assert (engine.runner.graphs is not None) == graphs
        assert engine.cache.pool.num_free == engine.cache.num_blocks
        assert engine.cache.nbytes <= config.kv_bytes
    assert outs[True] == outs[False]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_cuda_graph_logits_equal_the_full_forward() -> None:
    model = tiny("tiny-mla").cuda()
    engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4, max_batch_size=3))
    seq = [int(t) for t in torch.randint(0, 256, (30,))]
    with torch.no_grad():
        full = model(torch.tensor([seq], device="cuda"))[0]  # [T, vocab]
    table = [9, 3, 4, 0, 7, 11, 1, 2]
    engine.runner.prefill(seq[:20], 0, table)
    for p in range(20, 30):
        got = engine.runner.decode([seq[p]], [p], [table])[0]
        assert (got - full[p]).abs().max() < TOLERANCES[torch.float32] * 10
    assert engine.runner.graphs is not None and engine.runner.graphs.sizes == [1, 2, 3]


def test_baseline_attention_decodes_eagerly_on_cuda() -> None:
    engine = Engine(tiny("tiny-gqa").cuda(), EngineConfig(kv_memory="1MiB", block_size=4))
    engine.generate([Request(PROMPTS[0], SamplingConfig(max_new_tokens=3))])
    assert engine.runner.graphs is None
