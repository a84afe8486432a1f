"""Conversion of tiny random Llama/Qwen2 checkpoints: exactness at full rank, budgets, decode, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlakit.config import RuntimeConfig
from mlakit.convert import ConversionConfig, convert_calibrated, load_hf_model, save_converted
from mlakit.model import Transformer

PROMPT = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["cal_llama", "cal_qwen2"])
def test_full_rope_at_full_rank_reproduces_original_logits(kind: str, request: pytest.FixtureRequest) -> None:
    cal = request.getfixturevalue(kind)
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=1.0, rope="full"))
    ref = cal.loaded.model(PROMPT).logits
    out = res.model(PROMPT)
    assert (out - ref).abs().max().item() < 1e-4
    assert res.record["kv_fraction_achieved"] <= 1.0


def test_svd_full_rank_is_exact_too(cal_llama) -> None:  # type: ignore[no-untyped-def]
    cal = cal_llama
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=1.0, rope="full", method="svd"))
    assert (res.model(PROMPT) - cal.loaded.model(PROMPT).logits).abs().max().item() < 1e-4


def test_calibrated_pca_beats_weight_svd_on_calibration_error(cal_llama) -> None:  # type: ignore[no-untyped-def]
    # PCA under sigma minimises E||y - y^||^2 over calibration inputs; weight SVD ignores sigma
    from mlakit.convert.factorize import factorize

    w = cal_llama.weights[0]
    sigma = cal_llama.sigma[0]
    target = torch.cat([w.w_k, w.w_v])

    def err(f) -> float:  # type: ignore[no-untyped-def]
        e = target - torch.cat([f.up_k, f.up_v]) @ f.down
        return float(torch.trace(e @ sigma @ e.T))

    pca = factorize(w.w_k, w.w_v, sigma, 16, key_scale=1.0)
    svd = factorize(w.w_k, w.w_v, None, 16, method="svd")
    assert 0 < err(pca) < err(svd)
    full = factorize(w.w_k, w.w_v, sigma, 64, key_scale=1.0)
    assert err(full) < 1e-8 * err(svd)


@pytest.mark.parametrize("rope", ["decoupled", "full"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_budget_accounting(cal_qwen2, rope: str, fraction: float) -> None:  # type: ignore[no-untyped-def]
    cal = cal_qwen2
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=fraction, rope=rope, rope_dims=8))  # type: ignore[arg-type]
    cfg = res.model.config
    original = 2 * 2 * 16 * 2  # K and V, 2 KV heads x 16 dims, 2 layers
    assert res.record["source_cache_elements_per_token"] == original
    cached = cfg.cache_elements_per_token()
    assert (
        cached
        == res.record["cache_elements_per_token"]
        == sum(res.record["kv_lora_ranks"]) + 2 * (8 if rope == "decoupled" else 0)
    )
    assert cached <= fraction * original
    assert cached >= fraction * original - cfg.num_layers  # rounding only
    cache = res.model.new_cache(1, 8)
    assert (
        sum(layer.elements_per_token() for layer in cache.layers) == cached
        if hasattr(cache.layers[0], "elements_per_token")
        else True
    )


def test_decoupled_scale_and_rope_dims(cal_llama) -> None:  # type: ignore[no-untyped-def]
    res = convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.5, rope="decoupled", rope_dims=8))
    att = res.model.config.attention
    assert (att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim) == (16, 8, 16)
    # rope base chosen so the kept 4 pairs turn at the original 4 highest frequencies
    assert att.rope_theta == pytest.approx(10000.0 ** (8 / 16))


@pytest.mark.parametrize("rope", ["decoupled", "full"])
def test_cached_decode_equals_forward(cal_qwen2, rope: str) -> None:  # type: ignore[no-untyped-def]
    res = convert_calibrated(cal_qwen2, ConversionConfig(kv_fraction=0.5, rope=rope, rope_dims=8))  # type: ignore[arg-type]
    model = res.model
    full = model(PROMPT)
    cache = model.new_cache(2, 64)
    pos = torch.arange(40).expand(2, 40)
    chunks = [model(PROMPT[:, :30], pos[:, :30], cache)]
    runtime = RuntimeConfig(decode_path="auto")
    chunks += [model(PROMPT[:, t : t + 1], pos[:, t : t + 1], cache, runtime) for t in range(30, 40)]
    assert (torch.cat(chunks, 1) - full).abs().max().item() < 1e-4


def test_grouped_ranks_greedy_sum_to_budget(cal_llama) -> None:  # type: ignore[no-untyped-def]
    cal = cal_llama
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="full", allocation="greedy"))
    assert sum(res.record["kv_lora_ranks"]) == 64
    assert len(set(res.record["kv_lora_ranks"])) >= 1


def test_explicit_ranks(cal_llama) -> None:  # type: ignore[no-untyped-def]
    res = convert_calibrated(cal_llama, ConversionConfig(ranks=(20, 12), rope="full"))
    assert res.record["kv_lora_ranks"] == [20, 12]
    assert res.model.config.kv_lora_ranks == (20, 12)


def test_save_and_reload(cal_llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cal = cal_llama
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=0.5))
    out = save_converted(res, tmp_path / "mla")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "conversion.json", "tokenizer.json"} <= names
    record = json.loads((out / "conversion.json").read_text())
    assert record["kv_lora_ranks"] == list(res.model.config.kv_lora_ranks)
    assert record["calibration"]["corpus"] == "given tokens"
    back = Transformer.from_pretrained(out)
    assert torch.equal(back(PROMPT), res.model(PROMPT))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_hf_loader_reads_dir(tiny_llama: Path) -> None:
    lm = load_hf_model(str(tiny_llama))
    assert lm.model.config.model_type == "llama"
    assert lm.tokenizer is not None


def test_rotation_average_option(tiny_llama: Path, cal_llama) -> None:  # type: ignore[no-untyped-def]
    from mlakit.convert import calibrate
    from mlakit.errors import MlakitError
    from tests.convert.conftest import CALIBRATION_TOKENS

    cfg = ConversionConfig(kv_fraction=0.5, rope="decoupled", rope_dims=8, rotation_average=True)
    with pytest.raises(MlakitError, match="rotation_windows"):
        convert_calibrated(cal_llama, cfg)
    cal = calibrate(str(tiny_llama), tokens=CALIBRATION_TOKENS, rotation_windows=2)
    assert cal.rotation is not None and cal.rotation[0].shape == (4, 8, 2)
    assert float(cal.rotation[0][..., 0].max()) <= 1 + 1e-9
    out = convert_calibrated(cal, cfg).model(PROMPT)
    plain = convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model(PROMPT)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
