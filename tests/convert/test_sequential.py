"""Sequential (layer-by-layer, error-correcting) conversion."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from mlakit.convert import ConversionConfig, convert_calibrated
from mlakit.model import Block
from tests.convert.conftest import CALIBRATION_TOKENS

convert_module = sys.modules["mlakit.convert.convert"]
sequential = sys.modules["mlakit.convert.sequential"]


def test_correction_is_identity_on_identical_inputs_and_inverts_a_linear_distortion() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=g, dtype=torch.float64)
    t, sigma = sequential.sequential_correction(x, x)
    assert (t - torch.eye(13, dtype=torch.float64)).abs().max().item() < 1e-12
    xa = torch.cat([x, torch.ones(4000, 1, dtype=torch.float64)], 1)
    assert torch.allclose(sigma, xa.T @ xa / 4000)
    a = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    t, _ = sequential.sequential_correction(x, x @ a.T, damp=1e-9)  # x_c = A x_o
    assert (t[:12, :12] - torch.linalg.inv(a)).abs().max() < 1e-5
    assert t[12, 12] == 1 and t[:12, 12].abs().max() == 0  # no affine part


def test_sequential_run_replays_the_converted_model(cal_llama) -> None:  # type: ignore[no-untyped-def]
    # the activations layer l is fitted on are exactly what the finished model computes there
    for rope in ("full", "decoupled"):
        cfg = ConversionConfig(kv_fraction=0.5, rope=rope, rope_dims=8, sequential=True, sequential_windows=4)  # type: ignore[arg-type]
        res = convert_calibrated(cal_llama, cfg)
        assert res.record["calibration"]["sequential_tokens"] == 4 * CALIBRATION_TOKENS.shape[1]
        plan = SimpleNamespace(model=res.model.config)  # all the run reads of the plan
        run = sequential.SequentialRun(cal_llama.spec, cal_llama.get, plan, CALIBRATION_TOKENS[:4])
        model = res.model
        with torch.no_grad():
            x = model.embed_tokens(CALIBRATION_TOKENS[:4])
            assert torch.equal(x, run.hidden)
            for i, block in enumerate(model.layers):
                x = block(x, None, None, "naive", None)
                state = {k.split(".", 2)[2]: v for k, v in model.state_dict().items() if k.startswith(f"layers.{i}.")}
                replay = Block(model.config, i, run.rotary[i])
                replay.load_state_dict(state)
                run.hidden = replay(run.hidden, None, None, "naive", None)
                assert (x - run.hidden).abs().max().item() < 1e-6


@torch.no_grad()
def test_sequential_lowers_the_output_error(cal_llama) -> None:  # type: ignore[no-untyped-def]
    ref = cal_llama.loaded.model(CALIBRATION_TOKENS).logits

    def err(sequential: bool) -> float:
        cfg = ConversionConfig(kv_fraction=0.25, rope="full", sequential=sequential)
        return float((convert_calibrated(cal_llama, cfg).model(CALIBRATION_TOKENS) - ref).pow(2).mean())

    assert err(True) < err(False)


def test_sequential_defaults() -> None:
    assert ConversionConfig(rope="full").resolved_sequential()
    assert not ConversionConfig(rope="decoupled").resolved_sequential()
    assert ConversionConfig(rope="decoupled", sequential=True).resolved_sequential()


def test_calibration_keeps_the_inputs_a_second_pass_would_compute(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    # calibrate(keep_inputs=k) hands the sequential pass the original model's attention inputs
    # from its own pass: equal to a separate pass of the original, and the conversion equal too
    cfg = ConversionConfig(kv_fraction=0.25, rope="full", sequential_windows=4)
    assert cfg.sequential_inputs() == 4 and ConversionConfig(rope="decoupled").sequential_inputs() == 0
    assert ConversionConfig(rope="full", calibration_windows=6).sequential_inputs() == 6  # default: every window
    kept = convert_module.calibrate(str(tiny_llama), tokens=CALIBRATION_TOKENS, config=cfg)
    plain = convert_module.calibrate(str(tiny_llama), tokens=CALIBRATION_TOKENS, keep_inputs=0)
    assert list(kept._inputs) == [4] and not plain._inputs
    ours = kept.original_inputs(4)
    theirs = plain.original_inputs(4)  # computed by a second pass of the original model
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    a = convert_calibrated(kept, cfg).model.state_dict()
    b = convert_calibrated(plain, cfg).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
