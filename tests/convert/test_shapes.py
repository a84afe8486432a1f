"""Direct shapes: ``--kv-lora-rank R --rope-dim D`` beside ``--kv-fraction``, and their bad values.

The tiny source has head_dim 16, 2 KV heads (K+V width 64), hidden 96.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlakit.cli import main
from mlakit.convert import ConversionConfig, convert_calibrated
from mlakit.errors import MlakitError

FAST = ["--calibration-windows", "2", "--calibration-seq-len", "64"]


def test_direct_shapes_through_the_cli(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mla"
    argv = ["convert", "--model", str(tiny_llama), "--out", str(out), "--kv-lora-rank", "24", "--rope-dim", "6"]
    assert main([*argv, *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["attention"]["kv_lora_rank"] == 24 and cfg["attention"]["qk_rope_head_dim"] == 6
    assert cfg["kv_lora_ranks"] == [24, 24]
    printed = capsys.readouterr().out
    assert "24 + 6 = 30 values/token/layer" in printed and "--pad-to 576" in printed


def test_rope_dim_with_kv_fraction_takes_the_rest_of_the_budget(cal_llama) -> None:  # type: ignore[no-untyped-def]
    res = convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.5, rope_dims=6))
    assert res.record["qk_rope_head_dim"] == 6 and res.record["kv_lora_ranks"] == [32 - 6, 32 - 6]


def test_rope_dim_wider_than_the_head_is_refused(cal_llama) -> None:  # type: ignore[no-untyped-def]
    for config in (ConversionConfig(rope_dims=18), ConversionConfig(ranks=(8,), rope_dims=64)):
        with pytest.raises(MlakitError, match=r"rope_dims=\d+ is larger than the source's head_dim 16"):
            convert_calibrated(cal_llama, config)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rope-dim", "5"], "rope_dims=5 is invalid: must be a positive even number"),
        (["--rope-dim", "0"], "rope_dims=0 is invalid"),
        (["--rope-dim", "32"], "rope_dims=32 is larger than the source's head_dim 16"),
        (["--kv-lora-rank", "512"], "kv_lora_rank 512 is larger than the source can fill (64"),
        (["--rope", "full", "--rope-dim", "4"], "--rope-dim 4 applies to --rope decoupled only"),
    ],
)
def test_bad_shapes_one_line_before_calibrating(
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    import mlakit.convert

    def no_calibration(*a: object, **k: object) -> None:
        raise AssertionError("calibration ran before the shapes were checked")

    monkeypatch.setattr(mlakit.convert, "calibrate", no_calibration)
    out = tmp_path / "out"
    assert main(["convert", "--model", str(tiny_llama), "--out", str(out), *args, *FAST]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it at most the model's loading bar
    assert last.startswith("mlakit convert: error:") and message in last and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["--kv-lora-rank", "8", "--kv-fraction", "0.5"],
        ["--kv-lora-rank", "8", "--ranks", "8"],
        ["--kv-lora-rank", "-3"],
    ],
)
def test_exclusive_or_invalid_flags_are_usage_errors(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", str(tiny_llama), "--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err or "positive integer" in err
