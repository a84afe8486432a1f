"""Every supported source architecture, as a tiny random model built by transformers (no download).

Per architecture: the source runs unchanged as an mlakit GQA baseline; a full-rank, full-RoPE
conversion reproduces its logits (fp32, 1e-4) over a sequence longer than every threshold (Llama 3's
scaling bands, sliding windows); a 50% conversion runs (its error is printed); the absorbable form
(decoupled RoPE) exports to DeepSeek-V3 and reloads in transformers, or is refused with one error
naming what DeepSeek-V3 cannot express; the layer-by-layer path gives the in-memory path's
weights exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mlakit import MlakitError, SamplingConfig, Transformer, generate
from mlakit.config import MLAConfig, RopeScaling, RuntimeConfig
from mlakit.convert import ConversionConfig, calibrate, convert_calibrated, save_converted
from mlakit.convert.arch import source_spec
from mlakit.convert.stream import convert_checkpoint
from mlakit.engine.load import source_to_transformer
from mlakit.interop import deepseek_hf, export_hf
from mlakit.rope import rope_inv_freq
from tests.convert.conftest import TINY_SOURCE, _byte_tokenizer

transformers = pytest.importorskip("transformers")

T_LONG = 96  # past Llama 3's original context (64), the sliding windows (16, 48) and every scaling band
TOKENS = torch.randint(0, 256, (2, T_LONG), generator=torch.Generator().manual_seed(3))
CALIBRATION = torch.randint(0, 256, (8, T_LONG), generator=torch.Generator().manual_seed(0))
EXACT = 1e-4  # fp32, the bar for a full-rank full-RoPE conversion
EXPORT_TOL = 1e-5  # relative: the linear latent's epsilon-dominated kv_a_layernorm (interop docstring)

BASE: dict[str, Any] = dict(
    **TINY_SOURCE,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
GEMMA = dict(BASE, num_hidden_layers=3, sliding_window=16, query_pre_attn_scalar=24)


def _configs() -> dict[str, Callable[[], Any]]:
    t = transformers
    return {
        "llama2": lambda: t.LlamaConfig(**BASE),
        "llama3": lambda: t.LlamaConfig(**BASE, rope_parameters=LLAMA3_ROPE),
        "smollm": lambda: t.LlamaConfig(**dict(BASE, num_key_value_heads=1), tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**dict(BASE, head_dim=32), sliding_window=None),  # v0.2+
        "mistral-swa": lambda: t.MistralConfig(**dict(BASE, head_dim=32), sliding_window=48),  # v0.1
        "qwen2": lambda: t.Qwen2Config(**BASE),
        "qwen3": lambda: t.Qwen3Config(**BASE),
        "gemma2": lambda: t.Gemma2Config(**GEMMA, attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
        "gemma3": lambda: t.Gemma3TextConfig(
            **GEMMA,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    }


ARCHS = tuple(_configs())
GEMMAS = ("gemma2", "gemma3")
NOT_EXPORTABLE = {  # what DeepSeek-V3 cannot express, as the export names it
    "gemma2": ("mlp_act='gelu_tanh'", "sliding-window", "softcap", "embed_scale"),
    "gemma3": ("mlp_act='gelu_tanh'", "sliding-window", "local_rope_theta", "post_norms"),
    "mistral-swa": ("sliding-window layers (sliding_window=48)",),
}


def make_source(path: Path, arch: str, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model with non-trivial norms and biases, and a byte tokenizer."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_configs()[arch]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma stores w for a scale of (1 + w): both conventions get scales in [0.5, 1.5]
                p.uniform_(-0.5, 0.5) if arch in GEMMAS else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(std=0.5)
    model.save_pretrained(path)
    _byte_tokenizer(256).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_CACHE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def source(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if ("dir", arch) not in _CACHE:
        _CACHE["dir", arch] = make_source(tmp_path_factory.mktemp(arch), arch)
    return _CACHE["dir", arch]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cal(arch: str, source: Path) -> Any:
    if ("cal", arch) not in _CACHE:
        _CACHE["cal", arch] = calibrate(str(source), tokens=CALIBRATION)
    return _CACHE["cal", arch]


def hf_logits(cal: Any, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return cal.loaded.model(tokens).logits


def logits(model: Transformer, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def conversion(**kw: Any) -> ConversionConfig:
    """A conversion config; the decoupled form folds q/k norms (Qwen3, Gemma 3), which it refuses by default."""
    return ConversionConfig(fold_qk_norm=True, **kw)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


# -- the source as itself ----------------------------------------------------------------------


def test_baseline_loader_runs_the_source_unchanged(arch: str, source: Path, cal: Any) -> None:
    model = source_to_transformer(source)
    assert (logits(model) - hf_logits(cal)).abs().max().item() < EXACT


def test_llama3_frequencies_match_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _configs()["llama3"]()
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    scaling = source_spec(cfg, "llama3").rope_scaling
    assert scaling is not None and scaling.type == "llama3"
    ours = rope_inv_freq(16, 10000.0, scaling)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    plain = rope_inv_freq(16, 10000.0)
    # the tiny config exercises all three bands: kept, blended, divided by the factor
    assert ours[0] == plain[0] and torch.allclose(ours[-1], plain[-1] / 8) and plain[1] / 8 < ours[1] < plain[1]


# -- conversion ---------------------------------------------------------------------------------


def test_full_rank_full_rope_reproduces_the_source(arch: str, cal: Any, tmp_path: Path) -> None:
    res = convert_calibrated(cal, ConversionConfig(kv_fraction=1.0, rope="full"))
    out = logits(res.model)
    assert (out - hf_logits(cal)).abs().max().item() < EXACT
    assert res.record["kv_fraction_achieved"] <= 1.0 and res.record["approximations"] == []
    back = Transformer.from_pretrained(save_converted(res, tmp_path / "mla"))
    assert torch.equal(logits(back), out)


@pytest.mark.parametrize("rope", ["full", "decoupled"])
def test_half_cache_runs_and_reports_its_error(arch: str, cal: Any, rope: str) -> None:
    res = convert_calibrated(cal, conversion(kv_fraction=0.5, rope=rope, rope_dims=8))  # type: ignore[arg-type]
    assert res.record["kv_fraction_achieved"] <= 0.5
    err = rel_error(logits(res.model), hf_logits(cal))
    print(f"\n{arch} {rope} 50%: relative logit error {err:.4f}")
    assert 0 < err < 1.0


@pytest.mark.parametrize("rope", ["full", "decoupled"])
def test_layer_by_layer_equals_the_in_memory_path(arch: str, source: Path, cal: Any, rope: str, tmp_path: Path) -> None:
    # the lean path reads one layer at a time from the shards; the conversion must not change
    cfg = conversion(kv_fraction=0.5, rope=rope, rope_dims=8)  # type: ignore[arg-type]
    ref = convert_calibrated(cal, cfg)
    record = convert_checkpoint(source, tmp_path / "lean", cfg, tokens=CALIBRATION)
    lean = Transformer.from_pretrained(tmp_path / "lean")
    assert record["kv_lora_ranks"] == ref.record["kv_lora_ranks"]
    assert record["calibration"] == ref.record["calibration"]
    want, got = ref.model.state_dict(), lean.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert json.loads((tmp_path / "lean" / "conversion.json").read_text())["kv_lora_ranks"] == record["kv_lora_ranks"]


@pytest.mark.parametrize("arch", ["llama3"], indirect=True)
def test_llama3_scaling_is_carried_into_both_forms(cal: Any) -> None:
    full = convert_calibrated(cal, ConversionConfig(kv_fraction=1.0, rope="full")).model.config.attention
    assert full.rope_scaling is not None and full.rope_scaling.type == "llama3"
    dec = convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=8))
    att = dec.model.config.attention
    # the 4 kept pairs turn at the source's scaled frequencies of pairs 0..3
    kept = rope_inv_freq(att.qk_rope_head_dim, att.rope_theta, att.rope_scaling)
    assert torch.allclose(kept, rope_inv_freq(16, 10000.0, full.rope_scaling)[:4], rtol=1e-5)
    # only the highest pair: a band the scaling leaves alone, so the rotary key needs no scaling
    one = convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="decoupled", rope_dims=2))
    assert one.model.config.attention.rope_scaling is None


@pytest.mark.parametrize("arch", ["llama3"], indirect=True)
def test_convert_says_which_rotary_width_vllm_serves_exactly(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlakit.cli import main

    args = ["convert", "--model", str(source), "--calibration-windows", "2", "--calibration-seq-len", "96"]
    assert main([*args, "--rope-dim", "8", "--out", str(tmp_path / "a")]) == 0
    assert "for vLLM convert with --rope-dim 2" in capsys.readouterr().out
    assert main([*args, "--rope-dim", "2", "--out", str(tmp_path / "b")]) == 0
    assert "--pad-to 576" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama3"], indirect=True)
def test_vllm_target_refuses_llama3_scaling_and_names_the_rotary_width_that_drops_it(cal: Any, tmp_path: Path) -> None:
    # vLLM and SGLang compute every DeepSeek RoPE scaling as YaRN: a llama3-scaled export is not theirs
    scaled = convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model
    with pytest.raises(MlakitError, match=r"rope_scaling = llama3 exactly.*convert with --rope-dim 2 or less"):
        export_hf(scaled, tmp_path / "a", pad_to=576, targets=("vllm",))
    assert not (tmp_path / "a").exists()
    unscaled = convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=2)).model
    report = export_hf(unscaled, tmp_path / "b", pad_to=576, targets=("vllm",))
    assert report.measured_rel_error <= report.error_bound
    assert not any("llama3" in n for n in report.notes)
    assert "rope_scaling" not in json.loads((tmp_path / "b" / "config.json").read_text()) or json.loads(
        (tmp_path / "b" / "config.json").read_text()
    )["rope_scaling"] in (None, {})


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"], indirect=True)
def test_qk_norm_decoupled_is_folded_and_recorded(cal: Any, arch: str) -> None:
    res = convert_calibrated(cal, conversion(kv_fraction=1.0, rope="decoupled", rope_dims=16))
    att = res.model.config.attention
    assert isinstance(att, MLAConfig) and not att.qk_norm and att.can_absorb
    assert "folded" in res.record["approximations"][0]
    err = rel_error(logits(res.model), hf_logits(cal))
    print(f"\n{arch}: q/k norms folded at full rank, all pairs rotary: relative logit error {err:.4f}")
    assert 0 < err < 1.0


def test_cached_decode_equals_the_forward(arch: str, cal: Any) -> None:
    # windows, soft-capping and local RoPE on both paths: naive (full RoPE) and absorbed (decoupled)
    for rope in ("full", "decoupled"):
        model = convert_calibrated(cal, conversion(kv_fraction=0.5, rope=rope, rope_dims=8)).model  # type: ignore[arg-type]
        full = logits(model)
        cache = model.new_cache(2, T_LONG)
        pos = torch.arange(T_LONG).expand(2, T_LONG)
        with torch.no_grad():
            chunks = [model(TOKENS[:, :40], pos[:, :40], cache), model(TOKENS[:, 40:80], pos[:, 40:80], cache)]
            runtime = RuntimeConfig(decode_path="auto")
            chunks += [model(TOKENS[:, t : t + 1], pos[:, t : t + 1], cache, runtime) for t in range(80, T_LONG)]
        assert (torch.cat(chunks, 1) - full).abs().max().item() < EXACT


# -- export to DeepSeek-V3 --------------------------------------------------------------------------


def test_decoupled_form_exports_or_is_refused(arch: str, cal: Any, tmp_path: Path) -> None:
    model = convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model
    out = tmp_path / "hf"
    if arch in NOT_EXPORTABLE:
        with pytest.raises(MlakitError, match="DeepSeek-V3 cannot express") as e:
            export_hf(model, out, allow_bias=True)
        assert all(f in str(e.value) for f in NOT_EXPORTABLE[arch]), str(e.value)
        assert not out.exists() and not list(tmp_path.iterdir())
        return
    report = export_hf(model, out, allow_bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ref = logits(model)
    with torch.no_grad():
        got = hf(TOKENS).logits
    assert report.measured_rel_error <= report.error_bound <= deepseek_hf.LINEAR_LATENT_TARGET
    assert (got - ref).abs().max().item() <= EXPORT_TOL * max(1.0, ref.abs().max().item())
    cfg = json.loads((out / "config.json").read_text())
    scaling = model.config.attention.rope_scaling
    if scaling is not None:
        assert cfg["rope_scaling"]["rope_type"] == "llama3"
        assert any("vLLM" in n for n in report.notes)


# -- model features outside conversion ----------------------------------------------------------------


@pytest.mark.parametrize("arch", GEMMAS, indirect=True)
def test_gemma_runs_in_training_and_generation_but_not_in_the_engine(cal: Any) -> None:
    from mlakit.engine import Engine, EngineConfig

    model = convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model
    prompt = TOKENS[0, :30].tolist()
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=4))[0]
    seq = prompt + list(out)[:3]
    step = logits(model, torch.tensor([seq]))[0, len(prompt) - 1 :].argmax(-1)
    assert list(out) == step.tolist()
    model.train()
    for layer in model.layers:
        layer.attn.recompute_kv = True  # type: ignore[union-attr]
    loss = model(TOKENS).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with pytest.raises(MlakitError, match="sliding-window layers"):
        Engine(model, EngineConfig(kv_memory="16MiB", block_size=16))


def test_unsupported_sources_get_one_error_naming_the_field() -> None:
    t = transformers
    cases = [
        (t.LlamaConfig(**BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type"),
        (t.LlamaConfig(**BASE, hidden_act="gelu"), "hidden_act='gelu'"),
        (t.LlamaConfig(**BASE, mlp_bias=True), "mlp_bias"),
        (t.GPT2Config(), "unsupported architecture 'gpt2'"),
    ]
    for cfg, field in cases:
        with pytest.raises(MlakitError, match=field):
            source_spec(cfg, "src")


def test_rope_scaling_config_round_trips() -> None:
    from mlakit.config import ModelConfig

    rs = RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192)
    base = ModelConfig.from_preset("tiny-gqa")
    cfg = ModelConfig.from_dict({**base.to_dict(), "layer_types": ["sliding", "full"], "sliding_window": 4})
    assert cfg.layer_types == ("sliding", "full") and cfg.layer_attention(0).sliding_window == 4
    assert cfg.layer_attention(1).sliding_window is None
    assert RopeScaling(**json.loads(json.dumps(rs.__dict__))) == rs
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=64, high_freq_factor=0.5)


@pytest.mark.parametrize("arch", ["qwen3", "llama3"], indirect=True)
def test_the_engine_serves_qk_norms_and_llama3_scaling(source: Path, cal: Any) -> None:
    from mlakit.engine import Engine, EngineConfig, Request

    sampling = SamplingConfig(max_new_tokens=6)
    prompts = [TOKENS[0, :70].tolist(), TOKENS[1, :75].tolist()]  # decode past llama3's original context (64)
    models = [
        source_to_transformer(source),  # GQA: per-head norms before the paged write
        convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="full")).model,  # MLA naive decode
        convert_calibrated(cal, conversion(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model,  # absorbed
    ]
    for model in models:
        want = [list(generate(model, [p], sampling)[0]) for p in prompts]
        engine = Engine(model, EngineConfig(kv_memory="4MiB", block_size=16, prefill_chunk=32))
        assert [list(o.tokens) for o in engine.generate([Request(p, sampling) for p in prompts])] == want


def test_a_window_spanning_the_context_is_no_window() -> None:
    spec = source_spec(transformers.MistralConfig(**dict(BASE, max_position_embeddings=64), sliding_window=64), "m")
    assert spec.layer_types is None and spec.sliding_window is None
    spec = source_spec(transformers.MistralConfig(**BASE, sliding_window=64), "m")
    assert spec.layer_types == ("sliding", "sliding") and spec.sliding_window == 64


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"], indirect=True)
def test_qk_norm_sources_refuse_the_decoupled_form_unless_folding_is_asked(source: Path, cal: Any) -> None:
    with pytest.raises(MlakitError, match="q_norm, k_norm.*--rope full.*--fold-qk-norm"):
        calibrate(str(source), tokens=CALIBRATION[:1], config=ConversionConfig(rope="decoupled"))
    with pytest.raises(MlakitError, match="cannot absorb a key norm"):
        convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="decoupled"))
