"""Block pool, block runs, budgets and the int8 row format of the paged cache."""

from __future__ import annotations

import pytest
import torch

from mlakit import MlakitError, ModelConfig
from mlakit.paged import BlockPool, PagedCache, PagedRows, block_runs, token_slots


def test_pool_allocates_lowest_first_and_refuses_overcommit() -> None:
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert (a, b) == ([0, 1], [2, 3, 4]) and pool.num_free == 1
    with pytest.raises(MlakitError, match="cannot allocate 2"):
        pool.allocate(2)
    assert pool.num_free == 1  # a failed allocation takes nothing
    pool.free(a)
    assert pool.allocate(3) == [0, 1, 5]
    with pytest.raises(MlakitError, match="not allocated"):
        pool.free([0, 0])


def test_block_runs_and_slots() -> None:
    table = [4, 5, 6, 1, 2, 9]
    assert block_runs(table, 23, 4) == [(16, 12), (4, 8), (36, 3)]
    assert block_runs(table, 5, 4) == [(16, 5)]
    assert token_slots(table, 10, 4, 4) == [26, 27, 4, 5]


@pytest.mark.parametrize("preset", ["tiny-mla", "tiny-gqa", "smollm2-135m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
def test_cache_never_exceeds_budget(preset: str, dtype: torch.dtype | str) -> None:
    config = ModelConfig.from_preset(preset)
    per_block = PagedCache.block_bytes(config, 16, dtype)
    budget = 3 * per_block + per_block // 2
    if preset != "smollm2-135m":
        cache = PagedCache.allocate(config, budget, 16, dtype)
        assert cache.num_blocks == 3 and cache.nbytes == 3 * per_block <= budget
    with pytest.raises(MlakitError, match="holds no block"):
        PagedCache.allocate(config, per_block - 1, 16, dtype)


def test_latent_block_bytes_are_what_mla_promises() -> None:
    config = ModelConfig.from_preset("tiny-mla")  # r=32, d_rope=8, 2 layers
    assert PagedCache.block_bytes(config, 16, torch.float32) == 16 * 2 * (32 + 8) * 4
    assert PagedCache.block_bytes(config, 16, "int8") == 16 * 2 * (32 + 8 + 4)


def test_int8_rows_roundtrip_within_half_a_step() -> None:
    rows = PagedRows(8, 40, "int8", None)
    x = torch.randn(5, 40) * torch.tensor([0.01, 1.0, 30.0, 2.0, 5.0]).unsqueeze(1)
    slots = torch.tensor([7, 0, 3, 2, 5])
    rows.write(slots, x)
    back = rows.read([(0, 8)], torch.float32)[slots]
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 + 1e-7).all()


def test_scratch_block_lies_outside_the_pool_and_inside_the_budget() -> None:
    config = ModelConfig.from_preset("tiny-mla")
    per_block = PagedCache.block_bytes(config, 4, torch.float32)
    plain = PagedCache.allocate(config, 10 * per_block, 4, torch.float32)
    with_scratch = PagedCache.allocate(config, 10 * per_block, 4, torch.float32, scratch=True)
    assert plain.scratch_block is None and plain.num_blocks == 10
    assert with_scratch.num_blocks == 9 and with_scratch.scratch_block == 9
    assert with_scratch.nbytes == plain.nbytes <= 10 * per_block
    assert with_scratch.layers[0][0].data.shape[0] == 10 * 4
    assert 9 not in with_scratch.pool.allocate(9)
    with pytest.raises(MlakitError, match="scratch block"):
        PagedCache.allocate(config, per_block, 4, torch.float32, scratch=True)


def test_graph_batch_sizes_and_reasons() -> None:
    from mlakit.attention.backends import get_backend
    from mlakit.config import RuntimeConfig
    from mlakit.engine.graphs import graph_batch_sizes, graph_reason
    from mlakit.model import Transformer

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    config = ModelConfig.from_preset("tiny-mla")
    cache = PagedCache.allocate(config, 1 << 20, 4, torch.float32, scratch=True)
    reason = graph_reason(Transformer(config), cache, get_backend("torch"), RuntimeConfig())
    assert "not CUDA" in reason
