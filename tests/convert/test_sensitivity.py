"""Rank allocation by measured per-layer sensitivity (``allocation="sensitivity"``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlakit import MlakitError
from mlakit.cli import main
from mlakit.convert import ConversionConfig, convert_calibrated
from mlakit.convert.ranks import sensitivity_ranks
from mlakit.convert.sensitivity import layer_sensitivity, rank_grid
from mlakit.convert.stream import convert_checkpoint
from tests.convert.conftest import CALIBRATION_TOKENS


def test_sensitivity_ranks_sum_to_the_budget_and_favour_the_sensitive_layer() -> None:
    grid = (8, 16, 32)
    kl = torch.tensor([[1.0, 0.5, 0.3], [0.2, 0.1, 0.05], [4.0, 1.0, 0.1]], dtype=torch.float64)
    ranks = sensitivity_ranks(kl, grid, 48, 64)
    assert sum(ranks) == 48 and all(8 <= r <= 32 for r in ranks)
    # steepest segments first: layer 2 8->16 (0.375/dim), layer 0 8->16 (0.0625), layer 2 16->24 (0.056)
    assert ranks == (16, 8, 24)
    # a non-convex curve is replaced by its lower hull: layer 0 goes straight to 32
    kl = torch.tensor([[1.0, 0.99, 0.0], [1.0, 0.8, 0.75]], dtype=torch.float64)
    assert sensitivity_ranks(kl, grid, 40, 64) == (32, 8)
    with pytest.raises(MlakitError, match="cannot be spread"):
        sensitivity_ranks(kl, grid, 100, 64)
    assert rank_grid(96, 2, 64) == (24, 48, 64)


def test_layer_sensitivity_is_zero_when_nothing_is_lost_and_grows_with_compression(cal_llama) -> None:  # type: ignore[no-untyped-def]
    # full RoPE at full rank reproduces the layer exactly: the swapped-in MLA layer changes nothing
    kl = layer_sensitivity(cal_llama, ConversionConfig(rope="full"), (4, 64), num_windows=1)
    assert kl.shape == (len(cal_llama.weights), 2)
    assert kl[:, 1].abs().max().item() < 1e-6
    assert (kl[:, 0] > 1e-4).all()


def test_sensitivity_allocation_keeps_the_budget_and_needs_the_whole_model(
    cal_llama, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    cfg = ConversionConfig(kv_fraction=0.5, rope_dims=8, allocation="sensitivity")
    res = convert_calibrated(cal_llama, cfg)
    base = convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.5, rope_dims=8))
    assert res.record["config"]["allocation"] == "sensitivity"
    assert sum(res.record["kv_lora_ranks"]) == sum(base.record["kv_lora_ranks"])
    with pytest.raises(MlakitError, match="sensitivity' runs the whole model many times"):
        convert_checkpoint(tiny_llama, tmp_path / "lean", cfg, tokens=CALIBRATION_TOKENS)
    with pytest.raises(MlakitError, match="does not combine with keep_first_wide"):
        convert_calibrated(cal_llama, ConversionConfig(kv_fraction=0.5, allocation="sensitivity", keep_first_wide=1))
    # the CLI takes the in-memory path for it
    args = ["convert", "--model", str(tiny_llama), "--out", str(tmp_path / "cli"), "--allocation", "sensitivity"]
    assert main([*args, "--calibration-windows", "4", "--calibration-seq-len", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
