"""DeepSeek-V3 Hugging Face export/import, proven against transformers' own DeepseekV3 implementation.

Tiny random models only; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlakit import MlakitError, ModelConfig, RopeScaling, SamplingConfig, Transformer, generate
from mlakit.cli import main
from mlakit.config import MLAConfig
from mlakit.interop import MAPPING, deepseek_export, deepseek_hf, export_hf, load_hf, load_pretrained
from tests.conftest import TOLERANCES, build, tiny_mla_config

transformers = pytest.importorskip("transformers")

TOL = TOLERANCES[torch.float32]
YARN = RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=0.9, mscale_all_dim=0.7)


def hf_model(path: Path) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM from ``path``; every tensor present, none left over."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def max_diff(model: Transformer, hf: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(tokens) - hf(tokens).logits).abs().max())


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# -- export: transformers reads what we write --------------------------------------------------------


@pytest.mark.parametrize(
    "attention",
    [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}, {"q_lora_rank": None, "rope_scaling": YARN}],
    ids=["q_lora", "no_q_lora", "q_lora-yarn", "no_q_lora-yarn"],
)
def test_export_logits_match_transformers(attention: dict, tmp_path: Path) -> None:
    model = build(tiny_mla_config(**attention))
    export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and cfg["num_nextn_predict_layers"] == 0
    assert cfg["rope_interleave"] is True
    hf = hf_model(tmp_path / "hf")
    assert not any("experts" in n for n, _ in hf.named_parameters())
    assert max_diff(model, hf, torch.randint(0, 256, (3, 17))) <= TOL


def test_sharded_export_and_greedy_generation_match_transformers(tmp_path: Path) -> None:
    model = build(tiny_mla_config(rope_scaling=YARN))
    report = export_hf(model, tmp_path / "hf", max_shard_size=60_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert report.total_bytes == sum((tmp_path / "hf" / f).stat().st_size for f in shards)
    hf = hf_model(tmp_path / "hf")
    prompts = [[5, 9, 2, 77, 3], [100, 4, 4, 18, 250]]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out[:, 5:].tolist() == ours


def test_bf16_export_same_logits_in_transformers_and_mlakit(tmp_path: Path) -> None:
    export_hf(build(tiny_mla_config()), tmp_path / "hf", dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = load_hf(tmp_path / "hf")
    assert ours.embed.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert float((ours(tokens).float() - hf(tokens).logits.float()).abs().max()) <= TOLERANCES[torch.bfloat16]


def test_per_layer_ranks_padded_exactly(tmp_path: Path) -> None:
    config = dataclasses.replace(tiny_mla_config(), kv_lora_ranks=(32, 19))
    model = build(config)
    report = export_hf(model, tmp_path / "hf")
    assert report.kv_lora_rank == 32 and report.measured_rel_error < 1e-5
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())["mlakit_export"]
    assert meta["source_kv_lora_ranks"] == [32, 19]
    assert max_diff(model, hf_model(tmp_path / "hf"), torch.randint(0, 256, (2, 13))) <= TOL


# -- linear latents (kv_norm=False): an epsilon-dominated kv_a_layernorm, no biases -------------------

# The exported latent path is linear up to a relative error <= LINEAR_LATENT_TARGET (1e-5) per token,
# and the tiny models' logits are below 1 in magnitude, so their logits can move by ~1e-5 at most;
# fp32 rounding adds ~1e-7. The mistakes this guards against are far larger: a kv_a_layernorm eps
# of 1e-5 instead of 1e-6 (vLLM/SGLang with the source's rms_norm_eps) moves the logits by ~8e-2,
# kv_b_proj 1% off by ~1e-3.
LINEAR_TOL = 1e-5


def linear_model(ranks: tuple[int, int] | None = None, **attention: object) -> Transformer:
    config = tiny_mla_config(kv_norm=False, q_lora_rank=None, **attention)
    return build(dataclasses.replace(config, kv_lora_ranks=ranks))


def tensor_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names


def with_eps(model: Transformer, eps: float) -> Transformer:
    """``model`` with another ``rms_norm_eps`` and the same weights."""
    att = dataclasses.replace(model.config.attention, rms_norm_eps=eps)
    other = Transformer(dataclasses.replace(model.config, attention=att)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("ranks", [None, (32, 24)], ids=["uniform", "per_layer"])
def test_linear_latent_exports_without_bias(ranks: tuple[int, int] | None, tmp_path: Path) -> None:
    model = linear_model(ranks)
    report = export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["attention_bias"] is False and cfg["rms_norm_eps"] == 1e-6 and cfg["kv_lora_rank"] == 32
    assert not any(n.endswith(".bias") for n in tensor_names(tmp_path / "hf"))
    meta = cfg["mlakit_export"]
    assert meta["source_kv_norm"] is False and meta["linear_latent"]["eps"] == 1e-6
    target = deepseek_hf.LINEAR_LATENT_TARGET
    assert 0 < meta["latent_rel_error_measured_fp32"] <= meta["latent_rel_error_bound"] <= target
    assert report.error_bound == meta["latent_rel_error_bound"]
    assert report.measured_rel_error == meta["latent_rel_error_measured_fp32"]
    hf = hf_model(tmp_path / "hf")
    for i, rank in enumerate(ranks or (32, 32)):
        gamma = hf.model.layers[i].self_attn.kv_a_layernorm.weight.detach()
        g = float(gamma[0])
        assert g == 2.0 ** round(math.log2(g)) and torch.all(gamma[:rank] == g) and torch.all(gamma[rank:] == 0)
    tokens = torch.randint(0, 256, (2, 15))
    assert max_diff(model, hf, tokens) <= LINEAR_TOL
    # the tolerance is tight: a wrong latent eps or a 1% wrong kv_b_proj fails it by far
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.kv_a_layernorm.variance_epsilon = 1e-5
        assert max_diff(model, hf, tokens) > 1000 * LINEAR_TOL
        for layer in hf.model.layers:
            layer.self_attn.kv_a_layernorm.variance_epsilon = 1e-6
            layer.self_attn.kv_b_proj.weight.mul_(1.01)
        assert max_diff(model, hf, tokens) > 10 * LINEAR_TOL
    # importing gives a normed-latent model that computes what the source does
    back = load_hf(tmp_path / "hf")
    assert back.config.attention.kv_norm and back.config.attention.rms_norm_eps == 1e-6
    with torch.no_grad():
        assert float((back(tokens) - model(tokens)).abs().max()) <= LINEAR_TOL


def test_linear_latent_export_moves_rms_norm_eps_to_1e6(tmp_path: Path) -> None:
    # SmolLM2's rms_norm_eps is 1e-5; the export must use 1e-6, the latent norm's eps in transformers
    model = linear_model(rms_norm_eps=1e-5)
    report = export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["mlakit_export"]["source_rms_norm_eps"] == 1e-5
    assert any("rms_norm_eps 1e-05 -> 1e-06" in n for n in report.notes)
    hf = hf_model(tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        ours, same_eps, theirs = model(tokens), with_eps(model, 1e-6)(tokens), hf(tokens).logits
    # the export is the source with eps 1e-6 everywhere...
    assert float((same_eps - theirs).abs().max()) <= LINEAR_TOL
    # ...so all that differs from the source is the hidden-state norms' eps. Its size depends on the
    # hidden states' mean square: these random embeddings (std 0.02, mean square 4e-4) make it ~1%
    eps_effect = float((ours - same_eps).abs().max())
    assert 1e-4 < eps_effect < 2e-2 * float(ours.abs().max())
    assert abs(float((ours - theirs).abs().max()) - eps_effect) <= LINEAR_TOL


def test_linear_latent_bf16_export_rounds_like_a_plain_cast(tmp_path: Path) -> None:
    model = linear_model((32, 24))
    export_hf(model, tmp_path / "hf", dtype="bf16")
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())["mlakit_export"]["linear_latent"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    for i, block in enumerate(model.layers):
        # a power-of-two scale commutes with rounding: the rows are exactly s * bf16(w_dkv)
        w = block.attn.w_dkv.weight.detach()
        rows = hf.model.layers[i].self_attn.kv_a_proj_with_mqa.weight[: w.shape[0]]
        assert torch.equal(rows, (w.bfloat16().float() * meta["row_scales"][i]).bfloat16())
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
        assert float((model(tokens) - theirs).abs().max()) <= TOLERANCES[torch.bfloat16]
        assert float((load_hf(tmp_path / "hf")(tokens).float() - theirs).abs().max()) <= TOLERANCES[torch.bfloat16]


def test_linear_latent_fp16_export_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match=r"layer 0: float16 cannot hold the exported latent.*bf16.*fp32") as e:
        export_hf(linear_model(), tmp_path / "hf", dtype="fp16")
    assert str(e.value).count("\n") == 0
    assert not (tmp_path / "hf").exists()


def test_linear_latent_bias_needs_allow_bias_only_when_nonzero(tmp_path: Path) -> None:
    model = linear_model(attention_bias=True)  # biases built, all zero: not worth a transformers-only export
    export_hf(model, tmp_path / "zero")
    assert json.loads((tmp_path / "zero" / "config.json").read_text())["attention_bias"] is False
    assert not any(n.endswith(".bias") for n in tensor_names(tmp_path / "zero"))
    with torch.no_grad():
        model.layers[1].attn.w_dkv.bias.normal_(0, 0.5)  # what a Qwen2 source gives
    with pytest.raises(MlakitError, match=r"attention biases \(layers\.1\.attn\.w_dkv\.bias non-zero\).*--allow-bias"):
        export_hf(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = export_hf(model, tmp_path / "hf", allow_bias=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_bias"] is True
    assert report.measured_rel_error <= report.error_bound <= deepseek_hf.LINEAR_LATENT_TARGET
    assert max_diff(model, hf_model(tmp_path / "hf"), torch.randint(0, 256, (2, 11))) <= LINEAR_TOL


@pytest.fixture(scope="module")
def converted_llama(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """A tiny random Llama (saved locally) converted to MLA with decoupled RoPE at half the cache."""
    from mlakit.convert import ConversionConfig, calibrate, convert_calibrated
    from tests.convert.conftest import CALIBRATION_TOKENS, make_hf_model

    source = make_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
    cal = calibrate(str(source), tokens=CALIBRATION_TOKENS)
    return convert_calibrated(cal, ConversionConfig(kv_fraction=0.5, rope="decoupled", rope_dims=8)).model.eval()


def test_converted_llama_exports_for_vllm_and_sglang(converted_llama: Transformer, tmp_path: Path) -> None:
    model = converted_llama
    att = model.config.attention
    assert isinstance(att, MLAConfig) and not att.kv_norm and att.q_lora_rank is None
    report = export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["attention_bias"] is False and not any(n.endswith(".bias") for n in tensor_names(tmp_path / "hf"))
    assert report.measured_rel_error <= report.error_bound <= deepseek_hf.LINEAR_LATENT_TARGET
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(tokens)
        diff = float((ref - hf_model(tmp_path / "hf")(tokens).logits).abs().max())
    # the Llama source's rms_norm_eps is already 1e-6, so only the latent approximation and rounding remain
    assert diff <= LINEAR_TOL * max(1.0, float(ref.abs().max()))


def test_attention_biases_export_with_allow_bias(tmp_path: Path) -> None:
    model = build(tiny_mla_config(attention_bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    with pytest.raises(MlakitError, match="attention biases.*--allow-bias"):
        export_hf(model, tmp_path / "refused")
    export_hf(model, tmp_path / "hf", allow_bias=True)
    assert max_diff(model, hf_model(tmp_path / "hf"), torch.randint(0, 256, (2, 11))) <= TOL
    assert_same_weights(model, load_hf(tmp_path / "hf"))


def test_unexportable_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="convert it first"):
        export_hf(build(ModelConfig.from_preset("tiny-gqa")), tmp_path / "a")
    full = tiny_mla_config(rope_mode="full", qk_rope_head_dim=0)
    with pytest.raises(MlakitError, match="rope_mode='full'.*not expressible"):
        export_hf(build(full), tmp_path / "b")
    q_bias = build(tiny_mla_config(q_lora_rank=None, attention_bias=True))
    with torch.no_grad():
        q_bias.layers[1].attn.w_q.bias.fill_(0.5)
    with pytest.raises(MlakitError, match="layer 1: w_q has a non-zero bias.*--allow-bias"):
        export_hf(q_bias, tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_query_bias_is_written_through_a_query_latent(tmp_path: Path) -> None:
    # q_proj has no bias in DeepSeek-V3: a Qwen2-style w_q bias travels through q_a_proj's
    model = build(tiny_mla_config(q_lora_rank=None, attention_bias=True, kv_norm=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    report = export_hf(model, tmp_path / "hf", allow_bias=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["q_lora_rank"] == model.config.hidden_size + 1 and cfg["attention_bias"] is True
    assert any("query latent" in n for n in report.notes)
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ref = model(tokens)
    assert max_diff(model, hf_model(tmp_path / "hf"), tokens) <= LINEAR_TOL * max(1.0, float(ref.abs().max()))


def test_mapping_table_names_every_tensor(tmp_path: Path) -> None:
    for attention in ({}, {"q_lora_rank": None, "attention_bias": True}):
        model = build(tiny_mla_config(**attention))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):  # zero biases are not written; the format has no q_proj bias
                    p.fill_(0.0 if name.endswith("w_q.bias") else 0.1)
        # w_q.bias has no DeepSeek-V3 counterpart: export requires it to be zero, import zero-fills it
        ours = {re.sub(r"^layers\.\d+\.", "", k) for k in model.state_dict()} - {"attn.w_q.bias"}
        assert ours <= {n for m in MAPPING for n in m.mlakit}
        report = export_hf(model, tmp_path / str(len(attention)), allow_bias=True)
        with open(tmp_path / str(len(attention)) / report.files[0], "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        written = {re.sub(r"^model\.layers\.\d+\.", "", k) for k in header if k != "__metadata__"}
        assert written <= {m.hf for m in MAPPING}


# -- import: mlakit reads what transformers writes ---------------------------------------------------


def save_transformers_model(path: Path, seed: int = 0, **overrides: object) -> torch.nn.Module:
    kw: dict = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        first_k_dense_replace=2,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        num_mtp_layers=0,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"q_lora_rank": None, "rope_interleave": False},
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 2.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            }
        },
    ],
    ids=["q_lora-interleaved", "no_q_lora-halves", "yarn"],
)
def test_transformers_checkpoint_imports(overrides: dict, tmp_path: Path) -> None:
    hf = save_transformers_model(tmp_path / "hf", **overrides)
    model = load_hf(tmp_path / "hf")
    assert max_diff(model, hf, torch.randint(0, 128, (2, 19))) <= TOL
    assert max_diff(load_pretrained(tmp_path / "hf"), hf, torch.randint(0, 128, (1, 7))) <= TOL


def test_transformers_deepseek_v2_checkpoint_imports(tmp_path: Path) -> None:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    mla = dict(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    config = transformers.DeepseekV2Config(**kw, **mla, first_k_dense_replace=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.DeepseekV2ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert max_diff(load_hf(tmp_path / "hf"), hf, torch.randint(0, 128, (2, 19))) <= TOL


def test_roundtrip_is_bit_identical_through_the_cli(tmp_path: Path) -> None:
    config = dataclasses.replace(tiny_mla_config(rope_scaling=YARN), tie_word_embeddings=True, bos_token_id=1)
    model = build(config, seed=3)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    assert main(["export-hf", str(tmp_path / "src"), str(tmp_path / "hf"), "--max-shard-size", "100KB"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "generation_config.json").is_file()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = Transformer.from_pretrained(tmp_path / "back")
    assert back.config == model.config
    assert_same_weights(model, back)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_tied_embeddings_export_in_one_shard(tmp_path: Path) -> None:
    # embed and lm_head share memory; the export writes both into the same file
    model = build(dataclasses.replace(tiny_mla_config(), tie_word_embeddings=True))
    export_hf(model, tmp_path / "hf")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= tensor_names(tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    assert back.config.tie_word_embeddings
    assert_same_weights(model, back)


# -- bad input: one clear error each -------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    export_hf(build(tiny_mla_config()), tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_safetensors(exported: Path) -> None:
    (exported / "model.safetensors").unlink()
    with pytest.raises(MlakitError, match="no model.safetensors"):
        load_hf(exported)


def test_truncated_safetensors(exported: Path) -> None:
    data = (exported / "model.safetensors").read_bytes()
    (exported / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MlakitError, match="truncated or damaged"):
        load_hf(exported)


def test_missing_shard(tmp_path: Path) -> None:
    export_hf(build(tiny_mla_config()), tmp_path / "hf", max_shard_size=60_000)
    next((tmp_path / "hf").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(MlakitError, match="shard model-00002.*missing"):
        load_hf(tmp_path / "hf")


def test_wrong_model_type(exported: Path) -> None:
    edit_config(exported, model_type="llama")
    with pytest.raises(MlakitError, match="model_type 'llama' is not a DeepSeek"):
        load_hf(exported)


def test_mismatched_shapes(exported: Path) -> None:
    edit_config(exported, kv_lora_rank=16)
    with pytest.raises(MlakitError, match="kv_a_proj_with_mqa.weight has shape"):
        load_hf(exported)
    edit_config(exported, kv_lora_rank=32, intermediate_size=64)
    with pytest.raises(MlakitError, match="mlp.w_gate.weight has shape"):
        load_hf(exported)


def test_config_missing_field(exported: Path) -> None:
    edit_config(exported, qk_rope_head_dim=None)
    with pytest.raises(MlakitError, match="missing field.*qk_rope_head_dim"):
        load_hf(exported)


def test_moe_layers_refused(tmp_path: Path) -> None:
    save_transformers_model(tmp_path / "hf", first_k_dense_replace=1)
    with pytest.raises(MlakitError, match="layer 1 is a mixture-of-experts layer"):
        load_hf(tmp_path / "hf")
    edit_config(tmp_path / "hf", first_k_dense_replace=2)  # config lies, weights tell
    with pytest.raises(MlakitError, match="layer 1 is a mixture-of-experts layer"):
        load_hf(tmp_path / "hf")


def test_cli_prints_one_line_and_exits_2(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    edit_config(exported, model_type="llama")
    assert main(["import-hf", str(exported), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "model_type 'llama'" in err
    assert not (tmp_path / "out").exists()
    assert main(["export-hf", str(exported), str(tmp_path / "out2")]) == 2  # not an mlakit checkpoint
    assert "import-hf" in capsys.readouterr().err


def test_existing_output_needs_overwrite(exported: Path) -> None:
    model = build(tiny_mla_config())
    with pytest.raises(MlakitError, match="already exists"):
        export_hf(model, exported)
    export_hf(model, exported, overwrite=True)
    assert_same_weights(model, load_hf(exported))


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = deepseek_export.save_file
    calls = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deepseek_export, "save_file", failing)
    with pytest.raises(OSError, match="injected"):
        export_hf(build(tiny_mla_config()), tmp_path / "hf", max_shard_size=60_000)
    assert list(tmp_path.iterdir()) == []
