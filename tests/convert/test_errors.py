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
