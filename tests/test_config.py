"""Invalid configs raise ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from mlakit.config import AttentionConfig, MLAConfig, ModelConfig, RopeScaling, RuntimeConfig

MLA = dict(hidden_size=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"kv_lora_rank": -1}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"rope_mode": "sideways"}, "rope_mode"),
        ({"rope_mode": "full"}, "qk_rope_head_dim"),
        ({"rope_theta": 0.0}, "rope_theta"),
    ],
)
def test_invalid_mla(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"MLAConfig\.{field}=.*(must|only)"):
        MLAConfig(**{**MLA, **change})


@pytest.mark.parametrize(
    "change,field",
    [({"num_kv_heads": 3}, "num_kv_heads"), ({"head_dim": 15}, "head_dim"), ({"num_heads": -4}, "num_heads")],
)
def test_invalid_baseline(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"AttentionConfig\.{field}="):
        AttentionConfig(**{**dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16), **change})


def test_invalid_model_and_runtime() -> None:
    att = MLAConfig(**MLA)
    with pytest.raises(ValueError, match="kv_lora_ranks"):
        ModelConfig(vocab_size=10, num_layers=2, intermediate_size=8, attention=att, kv_lora_ranks=(4,))
    with pytest.raises(ValueError, match="eos_token_id"):
        ModelConfig(vocab_size=10, num_layers=2, intermediate_size=8, attention=att, eos_token_id=10)
    with pytest.raises(ValueError, match="decode_path"):
        RuntimeConfig(decode_path="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factor"):
        RopeScaling(factor=0.5, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("gpt-5")


def test_frozen_and_roundtrip() -> None:
    for name in ModelConfig.presets():
        config = ModelConfig.from_preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    config = ModelConfig.from_preset("tiny-mla")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3  # type: ignore[misc]


def test_published_deepseek_dims() -> None:
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert (v3.num_layers, v3.hidden_size, v3.vocab_size) == (61, 7168, 129280)
    att = v3.attention
    assert isinstance(att, MLAConfig)
    assert (
        att.num_heads,
        att.q_lora_rank,
        att.kv_lora_rank,
        att.qk_nope_head_dim,
        att.qk_rope_head_dim,
        att.v_head_dim,
    ) == (128, 1536, 512, 128, 64, 128)
    lite = ModelConfig.from_preset("deepseek-v2-lite").attention
    assert isinstance(lite, MLAConfig) and lite.q_lora_rank is None and lite.num_heads == 16
