"""Bad input: one clear MlakitError each, and no partial output directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlakit.cli import main
from mlakit.convert import ConversionConfig, convert_calibrated, load_hf_model
from mlakit.errors import MlakitError


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_kv_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(MlakitError, match="kv_fraction"):
        ConversionConfig(kv_fraction=fraction)


def test_fraction_too_small_for_rope_dims(cal_llama) -> None:  # type: ignore[no-untyped-def]
    cal = cal_llama
    with pytest.raises(MlakitError, match="rotary"):
        convert_calibrated(cal, ConversionConfig(kv_fraction=0.05, rope="decoupled", rope_dims=8))


def test_rank_larger_than_dims(cal_llama) -> None:  # type: ignore[no-untyped-def]
    cal = cal_llama
    with pytest.raises(MlakitError, match="rank 65"):
        convert_calibrated(cal, ConversionConfig(ranks=(65,), rope="full"))
    with pytest.raises(MlakitError, match="one per layer"):
        convert_calibrated(cal, ConversionConfig(ranks=(8, 8, 8), rope="full"))


def test_missing_path() -> None:
    with pytest.raises(MlakitError, match="no such file"):
        load_hf_model("/nonexistent/model-dir")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="no config.json"):
        load_hf_model(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(MlakitError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        load_hf_model(str(tmp_path))


def test_bad_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(MlakitError, match="GGUF"):
        load_hf_model(str(bad))


def test_cli_errors_without_traceback_and_no_partial_output(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases = [
        ["convert", "--model", str(tiny_llama), "--out", str(out), "--kv-fraction", "0"],
        ["convert", "--model", str(tiny_llama), "--out", str(out), "--kv-fraction", "1.5"],
        ["convert", "--model", str(tmp_path / "missing"), "--out", str(out)],
        [
            "convert",
            "--model",
            str(tiny_llama),
            "--out",
            str(out),
            "--ranks",
            "999",
            "--rope",
            "full",
            "--calibration-windows",
            "1",
            "--calibration-seq-len",
            "32",
        ],
        ["eval", "--model", str(tmp_path / "missing")],
        ["eval", "--model", str(tiny_llama), "--text", str(tmp_path / "missing.txt")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, (argv, err)
        assert not out.exists()
    assert (
        [p.name for p in tmp_path.iterdir()] == ["out"]
        or not any(tmp_path.iterdir())
        or all(not p.name.startswith(".out") for p in tmp_path.iterdir())
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"tiny", "too short"),
        (b"caf\xe9 au lait " * 50, "not UTF-8"),
    ],
)
def test_cli_bad_calibration_text_one_line_no_output(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    text = tmp_path / "cal.txt"
    text.write_bytes(content)
    out = tmp_path / "out"
    for argv in (
        ["convert", "--model", str(tiny_llama), "--out", str(out), "--calibration-text", str(text)],
        ["tradeoff", "--model", str(tiny_llama), "--out", str(out), "--calibration-text", str(text)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # above it at most the model's loading bar
        assert last.startswith("mlakit ") and message in last and "cal.txt" in last and "Traceback" not in err, err
        assert not out.exists()


def test_cli_heal_bad_inputs(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conv = tmp_path / "conv"
    assert main(["convert", "--model", str(tiny_llama), "--out", str(conv), "--calibration-windows", "2"]) == 0
    capsys.readouterr()
    cases = [
        (["--model", str(tmp_path), "--out", str(tmp_path / "o1")], "not an mlakit checkpoint"),
        (["--model", str(conv), "--out", str(tmp_path / "o2"), "--heal-seq-len", "1"], "unrecognized"),
        (["--model", str(conv), "--out", str(tmp_path / "o3"), "--seq-len", "4096"], "context"),
        (["--model", str(conv), "--out", str(tmp_path / "o4"), "--steps", "0"], "steps"),
        (["--model", str(conv), "--out", str(tmp_path / "o5"), "--distill-steps", "-1"], "distill_steps"),
        (["--model", str(conv), "--out", str(conv)], "already exists"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if message == "unrecognized" else _nothing():
            assert main(["heal", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert (conv / "model.safetensors").is_file()  # --out refused: the existing checkpoint is untouched


def test_cli_heal_writes_a_healed_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    import json

    conv, healed = tmp_path / "conv", tmp_path / "healed"
    assert main(["convert", "--model", str(tiny_llama), "--out", str(conv), "--kv-fraction", "0.25"]) == 0
    argv = ["heal", "--model", str(conv), "--out", str(healed), "--steps", "3", "--seq-len", "128"]
    argv += ["--distill-steps", "2", "--distill-seq-len", "128", "--precision", "fp32"]
    assert main([*argv, "--windows", "2"]) == 0  # reference: the source named in conversion.json
    record = json.loads((healed / "conversion.json").read_text())
    assert record["heal"]["reference"] == str(tiny_llama) and len(record["heal"]["relative_error_after"]) == 2
    assert record["heal"]["distill_steps"] == 2 and len(record["heal"]["distill_kl_before_after"]) == 2
    assert record["heal"]["config"]["bf16"] is False and record["heal"]["bf16"] is False  # --precision fp32
    assert record["kv_lora_ranks"] == json.loads((conv / "conversion.json").read_text())["kv_lora_ranks"]


def _nothing():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


def test_cli_convert_heal_in_one_go(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    out = tmp_path / "healed"
    argv = ["convert", "--model", str(tiny_llama), "--out", str(out), "--kv-fraction", "0.25", "--heal"]
    argv += ["--heal-distill-steps", "2", "--heal-distill-seq-len", "128"]
    assert main([*argv, "--heal-steps", "3", "--heal-seq-len", "128", "--heal-windows", "2"]) == 0
    assert "healed in" in capsys.readouterr().out
    heal = json.loads((out / "conversion.json").read_text())["heal"]
    assert len(heal["relative_error_before"]) == len(heal["relative_error_after"]) == 2
    assert heal["config"]["steps"] == 3 and heal["reference"] == str(tiny_llama)  # same record as `mlakit heal`
    assert heal["config"]["bf16"] is None  # --heal-precision auto: resolved per device when healing
    from mlakit.quant import has_bf16_arithmetic

    assert heal["bf16"] is has_bf16_arithmetic()
    assert all(a <= b for a, b in zip(heal["relative_error_after"], heal["relative_error_before"]))


def test_non_finite_weights_are_refused_before_anything_is_written(
    cal_llama,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    import sys

    import torch

    convert_module = sys.modules["mlakit.convert.convert"]  # the package re-exports a function of that name
    real = convert_module.convert_layer

    calls: list[int] = []

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        state, theta = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # layer 1
            state["w_uv.weight"][0, 0] = float("nan")
        return state, theta

    monkeypatch.setattr(convert_module, "convert_layer", poisoned)
    with pytest.raises(MlakitError, match=r"layer 1: .*non-finite weights \(attn.w_uv.weight\)"):
        convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.5, rope="full"))
    assert torch.isfinite(cal_llama.weights[1].w_v).all()
