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


def test_one_runtime_config_for_generate_and_engine() -> None:
    """EngineConfig extends RuntimeConfig: one definition of decode path and cache dtype, one error type."""
    import torch

    from mlakit.engine import EngineConfig
    from mlakit.errors import MlakitError

    engine = EngineConfig(decode_path="naive", cache_dtype="int8")
    assert isinstance(engine, RuntimeConfig)
    assert engine.runtime == RuntimeConfig(decode_path="naive", cache_dtype="int8")
    assert EngineConfig().cache_dtype == "auto" and RuntimeConfig().cache_dtype == "fp32"
    for cls in (RuntimeConfig, EngineConfig):
        with pytest.raises(MlakitError, match=rf"{cls.__name__}\.decode_path='fast' is invalid"):
            cls(decode_path="fast")  # type: ignore[arg-type]
        with pytest.raises(MlakitError, match=rf"{cls.__name__}\.cache_dtype='fp8' is invalid: must be one of auto"):
            cls(cache_dtype="fp8")  # type: ignore[arg-type]
    assert RuntimeConfig(cache_dtype="auto").cache_storage(torch.bfloat16) == torch.bfloat16
    assert RuntimeConfig(cache_dtype="fp16").cache_storage(torch.float32) == torch.float16
    assert EngineConfig(cache_dtype="int8").cache_storage(torch.float32) == "int8"


def test_generate_refuses_an_int8_contiguous_cache() -> None:
    from mlakit import SamplingConfig, Transformer, generate
    from mlakit.errors import MlakitError

    model = Transformer(ModelConfig.from_preset("tiny-mla")).eval()
    with pytest.raises(MlakitError, match="int8' needs the engine's paged cache"):
        generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=2), RuntimeConfig(cache_dtype="int8"))


def test_presets_are_config_data() -> None:
    """Every preset is the config.json shape of a ModelConfig, named by its key."""
    from mlakit.config import _PRESETS

    for name, data in _PRESETS.items():
        config = ModelConfig.from_preset(name)
        assert config.name == name
        assert config.to_dict() == ModelConfig.from_dict({**data, "name": name}).to_dict()


def test_engine_cache_takes_what_its_kernels_read() -> None:
    from mlakit.engine import EngineConfig
    from mlakit.errors import MlakitError

    with pytest.raises(MlakitError, match=r"EngineConfig\.cache_dtype='fp16' is invalid: the engine's paged cache"):
        EngineConfig(cache_dtype="fp16")
