"""The latent cache holds exactly what MLA promises, and byte accounting matches the tensors."""

from __future__ import annotations

import pytest
import torch

from mlakit.cache import LatentCache, ModelCache
from mlakit.config import MLAConfig, ModelConfig
from tests.conftest import build, tiny_mla_config


@pytest.mark.parametrize("dtype,width", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_latent_cache_holds_exactly_rank_plus_rope(dtype: str, width: int) -> None:
    config = ModelConfig.from_preset("tiny-mla")
    att = config.attention
    assert isinstance(att, MLAConfig)
    model = build(config)
    t = 11
    cache = model.new_cache(1, t, dtype)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, t)), torch.arange(t).unsqueeze(0), cache)
    per_token = att.kv_lora_rank + att.qk_rope_head_dim
    held = sum(layer.kv.numel() for layer in cache.layers)
    assert held == config.num_layers * t * per_token
    assert cache.nbytes == config.num_layers * t * per_token * width
    assert cache.elements_per_token() == config.num_layers * per_token
    # every cached slot was written (no position left at its zero init)
    assert all(bool((layer.kv.abs().sum(-1) > 0).all()) for layer in cache.layers)


def test_latent_cache_stores_normed_latent_and_rotated_rope() -> None:
    config = tiny_mla_config()
    model = build(config)
    x = torch.randint(0, 256, (1, 5))
    cache = model.new_cache(1, 5)
    with torch.no_grad():
        model(x, torch.arange(5).unsqueeze(0), cache)
        attn = model.layers[0].attn
        h = model.layers[0].attn_norm(model.embed(x))
        pos = torch.arange(5).unsqueeze(0)
        c_kv, k_rope = attn.project_kv_latent(h, pos)
    assert torch.allclose(cache.layers[0].c_kv, c_kv)
    assert torch.allclose(cache.layers[0].k_rope, k_rope)


def test_per_layer_ranks_size_the_cache() -> None:
    config = ModelConfig.from_preset("tiny-mla", kv_lora_ranks=(8, 20))
    cache = ModelCache.allocate(config, 2, 16, "bf16")
    assert [c.kv.shape[-1] for c in cache.layers] == [8 + 8, 20 + 8]
    assert cache.bytes_per_token() == (16 + 28) * 2
    assert config.cache_elements_per_token() == 16 + 28


def test_full_rope_cache_has_no_rope_part() -> None:
    config = tiny_mla_config(rope_mode="full", qk_rope_head_dim=0, kv_norm=False)
    cache = ModelCache.allocate(config, 1, 4)
    assert isinstance(cache.layers[0], LatentCache)
    assert cache.elements_per_token() == config.num_layers * 32


def test_baseline_cache_accounting() -> None:
    config = ModelConfig.from_preset("tiny-gqa")
    cache = ModelCache.allocate(config, 3, 10, "fp16")
    assert cache.nbytes == 2 * config.num_layers * 3 * 10 * 2 * 16 * 2


def test_cache_rejects_bad_sizes() -> None:
    config = ModelConfig.from_preset("tiny-mla")
    with pytest.raises(ValueError, match="max_seq_len"):
        ModelCache.allocate(config, 1, config.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch_size"):
        ModelCache.allocate(config, 0, 4)
    with pytest.raises(ValueError, match="dtype"):
        ModelCache.allocate(config, 1, 4, "int4")  # type: ignore[arg-type]
