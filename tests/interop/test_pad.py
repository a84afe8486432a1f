"""Padded exports (``pad_to``) and the engine table: exact in transformers, refused when they cannot fit.

Tiny random models only; nothing is downloaded. The reference for a padded export is the same
model exported unpadded and the mlakit model itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mlakit import MlakitError, RopeScaling, Transformer
from mlakit.cli import main
from mlakit.config import MLAConfig
from mlakit.interop import ENGINES, CacheShape, check_targets, export_hf, fits, import_hf, load_hf, plan_padding
from tests.conftest import TOLERANCES, build, tiny_mla_config

transformers = pytest.importorskip("transformers")

TOL = TOLERANCES[torch.float32]
# a linear latent's export is linear up to 1e-5 relative (test_deepseek_hf.py); padding adds rounding only
LINEAR_TOL = 1e-5
YARN = RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=0.9, mscale_all_dim=0.7)


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(tokens).logits


def linear_model(**attention: object) -> Transformer:
    """What conversion produces: no q_lora, a linear latent (kv_norm=False)."""
    return build(tiny_mla_config(kv_norm=False, q_lora_rank=None, **attention))


@pytest.mark.parametrize("pad_to", [576, 320], ids=["576", "320"])
@pytest.mark.parametrize(
    "model_fn",
    [
        lambda: linear_model(),
        lambda: linear_model(rope_scaling=YARN),
        lambda: build(dataclasses.replace(tiny_mla_config(), kv_lora_ranks=(32, 19))),  # normed latent, q_lora
    ],
    ids=["linear", "linear-yarn", "normed-per-layer"],
)
def test_padded_export_gives_the_same_logits(model_fn, pad_to: int, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = model_fn()
    att = model.config.attention
    assert isinstance(att, MLAConfig)
    plain = export_hf(model, tmp_path / "plain")
    padded = export_hf(model, tmp_path / "padded", pad_to=pad_to)
    cfg = json.loads((tmp_path / "padded" / "config.json").read_text())
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == pad_to and cfg["qk_rope_head_dim"] == 64
    assert padded.kv_lora_rank == pad_to - 64 and plain.kv_lora_rank == 32
    tokens = torch.randint(0, 256, (2, 40))
    long = torch.randint(0, 256, (1, 100))  # past YaRN's original_max_position_embeddings (64)
    tol = LINEAR_TOL if not att.kv_norm else TOL
    for t in (tokens, long):
        with torch.no_grad():
            ours = model(t)
        theirs_plain, theirs_padded = hf_logits(tmp_path / "plain", t), hf_logits(tmp_path / "padded", t)
        assert float((theirs_padded - theirs_plain).abs().max()) <= tol
        assert float((theirs_padded - ours).abs().max()) <= tol
        # mlakit's importer reads the padded export as a (wider) model with the same logits
        with torch.no_grad():
            assert float((load_hf(tmp_path / "padded")(t) - ours).abs().max()) <= tol


def test_padding_is_exact_zero_rows_and_kept_frequencies(tmp_path: Path) -> None:
    model = linear_model()
    att = model.config.attention
    assert isinstance(att, MLAConfig)
    export_hf(model, tmp_path / "hf", pad_to=576)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    meta = cfg["mlakit_export"]["padding"]
    assert meta["source_kv_lora_rank"] == 32 and meta["source_qk_rope_head_dim"] == att.qk_rope_head_dim
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    a = hf.model.layers[0].self_attn
    kv_a = a.kv_a_proj_with_mqa.weight.detach()  # [512 + 64, hidden]
    assert torch.all(kv_a[32:512] == 0)  # zero latent rows
    rope = kv_a[512:]  # interleaved: pair k at rows 2k, 2k+1
    pairs = att.qk_rope_head_dim // 2
    assert torch.all(rope[2 * pairs :] == 0) and torch.all(rope[: 2 * pairs].abs().sum(-1) > 0)
    assert torch.all(a.kv_b_proj.weight[:, 32:] == 0)  # zero latent columns
    # every kept pair turns at its original frequency under the exported rope_theta
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    orig = 1.0 / att.rope_theta ** (
        torch.arange(0, att.qk_rope_head_dim, 2, dtype=torch.float64) / att.qk_rope_head_dim
    )
    assert torch.allclose(inv[:pairs], orig, rtol=1e-12)
    # and import gives back a model that still runs the same (zero rows stay zero)
    import_hf(tmp_path / "hf", tmp_path / "back")
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert float((Transformer.from_pretrained(tmp_path / "back")(tokens) - model(tokens)).abs().max()) <= LINEAR_TOL


def test_pad_to_smaller_than_the_latent_is_refused(tmp_path: Path) -> None:
    model = linear_model()  # 32 + 8 = 40
    with pytest.raises(MlakitError, match=r"pad_to=39 is smaller.*kv_lora_rank \+ qk_rope_head_dim = 32 \+ 8 = 40"):
        export_hf(model, tmp_path / "hf", pad_to=39)
    with pytest.raises(MlakitError, match="pad_to=0 is invalid"):
        export_hf(model, tmp_path / "hf", pad_to=0)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary sibling left


def test_pad_to_exactly_the_width_is_a_no_op(tmp_path: Path) -> None:
    model = linear_model()
    report = export_hf(model, tmp_path / "hf", pad_to=40)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (32, 8) and "padding" not in cfg["mlakit_export"]
    assert report.cache is not None and report.cache.padded == report.cache.unpadded


def test_yarn_ramp_that_moves_a_frequency_is_refused() -> None:
    # YaRN's ramp top is clamped at dim - 1: with a tiny rope_theta the clamp differs between 8 and 64
    # rotary dims, so a kept pair would be blended differently; padding must refuse, not drift
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=1024)
    att = dataclasses.replace(tiny_mla_config().attention, rope_theta=10.0, rope_scaling=scaling)
    with pytest.raises(MlakitError, match=r"rope_scaling: widening qk_rope_head_dim 8 -> 64 moves a rotary frequency"):
        plan_padding(att, 32, 576)
    assert plan_padding(att, 32, 32 + 8).qk_rope_head_dim == 8  # no widening, nothing to check


def test_targets_are_checked_before_writing(tmp_path: Path) -> None:
    model = linear_model()
    with pytest.raises(MlakitError, match=r"target vllm: vLLM CPU .* 32 \+ 8 = 40 \(it takes 576\); pass --pad-to 576"):
        export_hf(model, tmp_path / "a", targets=("vllm",))
    with pytest.raises(MlakitError, match=r"target vllm-cpu: .*256 \+ 64 = 320 \(it takes 576\)"):
        export_hf(model, tmp_path / "b", pad_to=320, targets=("vllm-cpu",))
    with pytest.raises(MlakitError, match="target='vlm' is not known"):
        export_hf(model, tmp_path / "c", pad_to=576, targets=("vlm",))
    assert not list(tmp_path.iterdir())
    report = export_hf(model, tmp_path / "ok", pad_to=576, targets=("vllm", "transformers", "flashmla"))
    loads = {name for name, why in report.engines if why is None}
    assert {"vLLM CPU (CPU_MLA)", "vLLM GPU, FlashMLA", "transformers (DeepseekV3ForCausalLM)"} <= loads
    readme = (tmp_path / "ok" / "README.md").read_text()
    assert "vLLM CPU (CPU_MLA) | yes" in readme and "512 + 64" in readme and "cache per token" in readme
    assert "README.md" in report.files


def test_engine_table() -> None:
    assert len({e.key for e in ENGINES}) == len(ENGINES) and all(e.source for e in ENGINES)

    def loads(r: int, d: int, nope: int = 64, bias: bool = False) -> set[str]:
        return {e.key for e, why in fits(CacheShape(r, d, nope, "bf16", bias)) if why is None}

    everything = {e.key for e in ENGINES}
    assert loads(512, 64) == everything  # DeepSeek-V3's shape loads everywhere
    assert loads(144, 48) == {"transformers"}  # a SmolLM2 conversion at 50%, unpadded
    assert loads(256, 64) == {"transformers", "vllm-flashinfer-mla", "vllm-flashattn-mla", "vllm-triton-mla"}
    assert loads(512, 64, nope=96) == everything - {"vllm-flashinfer-mla"}
    assert loads(512, 64, bias=True) == {"transformers"}
    with pytest.raises(MlakitError, match=r"vLLM CPU .*qk_rope_head_dim = 96.*--rope-dim 64 or less"):
        check_targets(CacheShape(480, 96, 64), ["vllm-cpu"])
    with pytest.raises(MlakitError, match=r"attention_bias = true.*without --allow-bias"):
        check_targets(CacheShape(512, 64, 64, attention_bias=True), ["vllm"])


def test_cache_cost_is_reported(tmp_path: Path) -> None:
    model = linear_model()
    report = export_hf(model, tmp_path / "hf", pad_to=576, dtype="bf16")
    assert report.cache is not None
    layers = model.config.num_layers
    assert report.cache.model == layers * 40 * 2 and report.cache.padded == layers * 576 * 2
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())["mlakit_export"]["cache"]
    assert meta["export_bytes_per_token"] == layers * 576 * 2 and meta["export_vs_mlakit"] == 576 / 40


def test_cli_pad_to_and_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mla"
    linear_model().save_pretrained(src)
    assert main(["export-hf", str(src), str(tmp_path / "a"), "--target", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pad-to 576" in err and "Traceback" not in err
    assert main(["export-hf", str(src), str(tmp_path / "b"), "--pad-to", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pad_to=12 is smaller" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["export-hf", str(src), str(tmp_path / "c"), "--pad-to", "576", "--target", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "loads in: " in out and "vLLM CPU" in out and "cache per token: 4,608 bytes exported vs 320" in out
