"""The layer-by-layer conversion (``convert_checkpoint``): source dtypes, shards, failures, the CLI.

Its equality with the in-memory path on every architecture is in ``test_archs.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mlakit import MlakitError, Transformer
from mlakit.cli import main
from mlakit.convert import ConversionConfig, calibrate, convert_calibrated
from mlakit.convert.source import CheckpointSource
from mlakit.convert.stream import convert_checkpoint
from mlakit.io import SafetensorsStream
from tests.convert.conftest import CALIBRATION_TOKENS, TINY_SOURCE, _byte_tokenizer

convert_module = sys.modules["mlakit.convert.convert"]

CONFIGS = {
    "decoupled": ConversionConfig(kv_fraction=0.5, rope_dims=8),
    "full": ConversionConfig(kv_fraction=0.25, rope="full"),  # sequential by default
    "greedy": ConversionConfig(kv_fraction=0.5, rope_dims=8, allocation="greedy"),
    "wide": ConversionConfig(kv_fraction=0.5, rope="full", keep_first_wide=1, sequential=False),
}


def _bf16_source(path: Path, shard: str | None = None) -> Path:
    """A tiny Llama saved in bf16 (as published checkpoints are), optionally in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY_SOURCE, num_hidden_layers=3), tie_word_embeddings=True)).to(
        torch.bfloat16
    )
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    _byte_tokenizer(256).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bf16_source(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def bf16_cal(bf16_source: Path):  # type: ignore[no-untyped-def]
    return calibrate(str(bf16_source), tokens=CALIBRATION_TOKENS)  # loads in float32: bf16 widens exactly


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_bf16_source_converts_to_the_in_memory_weights(
    name: str, bf16_source: Path, bf16_cal, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cfg = CONFIGS[name]
    ref = convert_calibrated(bf16_cal, cfg).model.state_dict()
    convert_checkpoint(bf16_source, tmp_path / "fp32", cfg, tokens=CALIBRATION_TOKENS, dtype=torch.float32)
    convert_checkpoint(bf16_source, tmp_path / "own", cfg, tokens=CALIBRATION_TOKENS)
    exact = Transformer.from_pretrained(tmp_path / "fp32").state_dict()
    own = Transformer.from_pretrained(tmp_path / "own").state_dict()
    for k in ref:
        assert torch.equal(exact[k], ref[k]), k
        assert own[k].dtype == torch.bfloat16 and torch.equal(own[k], ref[k].to(torch.bfloat16)), k


def test_sharded_sources_read_through_their_index(bf16_source: Path, tmp_path: Path) -> None:
    sharded = _bf16_source(tmp_path / "sharded", shard="100KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    cfg = CONFIGS["decoupled"]
    convert_checkpoint(sharded, tmp_path / "a", cfg, tokens=CALIBRATION_TOKENS)
    convert_checkpoint(bf16_source, tmp_path / "b", cfg, tokens=CALIBRATION_TOKENS)
    a, b = (Transformer.from_pretrained(tmp_path / n).state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)

    shards[1].unlink()
    with pytest.raises(MlakitError, match=rf"{shards[1].name}: missing \(named by model.safetensors.index.json\)"):
        convert_checkpoint(sharded, tmp_path / "c", cfg, tokens=CALIBRATION_TOKENS)
    assert not (tmp_path / "c").exists()


def test_a_failure_mid_conversion_leaves_nothing(
    bf16_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = convert_module.convert_layer
    calls: list[int] = []

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        state, theta = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the last layer: two layers are already in the output file
            state["w_dkv.weight"][0, 0] = float("inf")
        return state, theta

    monkeypatch.setattr(convert_module, "convert_layer", poisoned)
    with pytest.raises(MlakitError, match=r"layer 2: .*non-finite weights \(attn.w_dkv.weight\); nothing was written"):
        convert_checkpoint(bf16_source, tmp_path / "out", CONFIGS["decoupled"], tokens=CALIBRATION_TOKENS)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_a_damaged_source_gets_one_error_naming_it(bf16_source: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in bf16_source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    up = state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.up_proj.weight"] = up[:100]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MlakitError, match=r"bad \(layer 1\) do not match its config: .*mlp.w_up.weight is \[100, 96\]"):
        convert_checkpoint(bad, tmp_path / "out", CONFIGS["decoupled"], tokens=CALIBRATION_TOKENS)
    state["model.layers.1.mlp.up_proj.weight"] = up
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MlakitError, match=r"bad \(layer 2\) do not match its config: 1 missing, e.g. attn.w_k.weight"):
        convert_checkpoint(bad, tmp_path / "out", CONFIGS["decoupled"], tokens=CALIBRATION_TOKENS)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MlakitError, match=r"cannot read .*bad/model.safetensors"):
        CheckpointSource(bad)
    assert not (tmp_path / "out").exists()


def test_the_stream_writer_refuses_what_its_layout_does_not_say(tmp_path: Path) -> None:
    layout = {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))}
    s = SafetensorsStream(tmp_path / "x.safetensors", layout, {"format": "pt"})
    with pytest.raises(MlakitError, match="got b, expected a"):
        s.write("b", torch.zeros(4))
    with pytest.raises(MlakitError, match=r"a has shape \(3, 2\), the layout says \(2, 3\)"):
        s.write("a", torch.zeros(3, 2))
    s.write("a", torch.ones(2, 3))
    with pytest.raises(MlakitError, match="b was never written"):
        s.close()


def test_cli_converts_layer_by_layer_in_the_sources_dtype(
    bf16_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mla"
    args = ["convert", "--model", str(bf16_source), "--out", str(out), "--calibration-windows", "4"]
    assert main([*args, "--calibration-seq-len", "32", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = Transformer.from_pretrained(out)
    assert model.embed.weight.dtype == torch.bfloat16
    record = json.loads((out / "conversion.json").read_text())
    assert record["layer_by_layer"] == {"dtype": "bfloat16", "device": "cpu"}
    assert main([*args[:-4], "--out", str(tmp_path / "x"), "--device", "tpu"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["decoupled", "full"])
def test_the_cuda_forward_gives_the_cpu_conversion(name: str, bf16_source: Path, tmp_path: Path) -> None:
    # the block forwards run on the GPU, the factorisation on the CPU: the same model up to float rounding
    cfg = CONFIGS[name]
    for device in ("cpu", "cuda"):
        convert_checkpoint(
            bf16_source, tmp_path / device, cfg, tokens=CALIBRATION_TOKENS, dtype=torch.float32, device=device
        )
    cpu, gpu = (Transformer.from_pretrained(tmp_path / d) for d in ("cpu", "cuda"))
    with torch.no_grad():
        a, b = cpu(CALIBRATION_TOKENS), gpu(CALIBRATION_TOKENS)
    assert float((a - b).norm() / a.norm()) < 1e-4
