"""KV accounting follows DeepSeek-V2 Table 1 for the presets."""

from __future__ import annotations

import json

import pytest

from mlakit.cli import main
from mlakit.config import AttentionConfig, MLAConfig, ModelConfig
from mlakit.kv import kv_report


@pytest.mark.parametrize("preset", ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "tiny-mla"])
def test_mla_presets_follow_table_1(preset: str) -> None:
    config = ModelConfig.from_preset(preset)
    att = config.attention
    assert isinstance(att, MLAConfig)
    n_h, d_h, l = att.num_heads, att.qk_nope_head_dim, config.num_layers
    r = kv_report(config, seq_len=1000, batch=3, dtype="bf16", gqa_groups=8 if n_h % 8 == 0 else 2)
    g = 8 if n_h % 8 == 0 else 2
    assert r.row("mha").elements_per_token == 2 * n_h * d_h * l
    assert r.row("gqa").elements_per_token == 2 * g * d_h * l
    assert r.row("mqa").elements_per_token == 2 * d_h * l
    assert r.row("mla").elements_per_token == (att.kv_lora_rank + att.qk_rope_head_dim) * l
    assert r.row("mla").total_bytes == (att.kv_lora_rank + att.qk_rope_head_dim) * l * 2 * 1000 * 3
    assert r.row("mla").is_model


def test_deepseek_v2_is_4_5_d_h() -> None:
    config = ModelConfig.from_preset("deepseek-v2")
    r = kv_report(config)
    assert r.row("mla").elements_per_token_per_layer == 4.5 * 128
    assert r.row("mla").ratio_to_mha == pytest.approx(2 * 128 * 128 / 576)


def test_baseline_model_and_memory_fit() -> None:
    config = ModelConfig.from_preset("smollm2-135m")
    att = config.attention
    assert isinstance(att, AttentionConfig)
    r = kv_report(config, seq_len=8192, dtype="fp32", memory=2**30)
    gqa = r.row("gqa")
    assert gqa.is_model and gqa.elements_per_token == 2 * 3 * 64 * 30
    assert gqa.tokens_fit == 2**30 // (2 * 3 * 64 * 30 * 4)
    assert gqa.sequences_fit == gqa.tokens_fit // 8192


def test_cli_kv_size_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-size", "--preset", "deepseek-v2", "--seq-len", "128", "--memory", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mla = next(r for r in out["rows"] if r["kind"] == "mla")
    assert mla["elements_per_token"] == 576 * 60
    assert mla["sequences_fit"] == 2**30 // (576 * 60 * 2 * 128)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["kv-size", "--preset", "nope"], "unknown preset"),
        (["kv-size", "--memory", "lots"], "cannot read"),
        (["kv-size", "--seq-len", "0"], "seq_len"),
        (["kv-size", "--config", "/nonexistent"], "not a directory"),
        (["kv-size", "--gqa-groups", "7"], "gqa_groups"),
    ],
)
def test_cli_kv_size_errors(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
