"""Weight formats for inference: int8 weight-only linears against the float reference, ``auto``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlakit import MlakitError, ModelConfig
from mlakit.engine import Engine, EngineConfig
from mlakit.native import load_native
from mlakit.quant import INT8_GEMV_ROWS, Int8Linear, prepare_weights, resolve_weight_format
from tests.conftest import TOLERANCES, build

AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("rows", [1, 3, INT8_GEMV_ROWS, INT8_GEMV_ROWS + 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_weight(rows: int, dtype: torch.dtype) -> None:
    """Both kernels (int8 GEMV for few rows, dequantize + GEMM for many) == x @ (W_q * s)^T."""
    lin = nn.Linear(64, 48, bias=True)
    q = Int8Linear.from_linear(lin).to(dtype)
    x = torch.randn(2, rows, 64).to(dtype)
    want = (x.float() @ q.dequantized(torch.float32).T + lin.bias.float()).to(dtype)
    got = q(x)
    assert got.shape == (2, rows, 48) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    if dtype == torch.float32:  # and the quantization itself stays within half a step per weight
        step = q.scale.unsqueeze(1)
        assert ((q.dequantized(torch.float32) - lin.weight).abs() <= step / 2 + 1e-6).all()


NATIVE = load_native()


@pytest.mark.skipif(NATIVE is None or not NATIVE.has_int8_gemv, reason="needs a C compiler and AVX512-VNNI")
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("in_features", [64, 100, 576])
@pytest.mark.parametrize("out_features", [48, 37])  # 37: a last tile of 5 rows (tiles of 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_kernel_equals_the_dequantized_reference(
    rows: int, in_features: int, out_features: int, dtype: torch.dtype
) -> None:
    """int8 activations (blocks of 64) x int8 weights == x @ (W_q * s)^T within the activations' rounding."""
    lin = nn.Linear(in_features, out_features, bias=True)
    q = Int8Linear.from_linear(lin, NATIVE)
    assert q.native is not None and q.weight is None and q.weight_u8 is not None
    x = torch.randn(rows, in_features)
    x[:, 3] = 9.0  # an outlier column: its block's scale grows, other blocks keep theirs
    x = x.to(dtype)
    want = x.float() @ q.dequantized(torch.float32).T + lin.bias
    got = q(x)  # with 37 outputs, an unmasked store of the last tile would overwrite the next row's first 11
    assert got.dtype == dtype
    err = (got.float() - want).abs().max().item()
    assert err <= (2e-2 if dtype == torch.float32 else 3e-2) * want.abs().max().item(), err
    assert torch.equal(q.int8_weight(), Int8Linear.from_linear(lin).int8_weight())  # the packing round-trips
    many = torch.randn(40, in_features)  # more rows than the kernel takes: the dequantized GEMM
    assert torch.allclose(q(many), many @ q.dequantized(torch.float32).T + lin.bias, atol=1e-4)


def test_auto_follows_the_cpu() -> None:
    assert resolve_weight_format("auto", "cpu", AVX512_BF16) == ("int8", torch.bfloat16)
    assert resolve_weight_format("auto", "cpu", AVX2_ONLY) == ("fp32", torch.float32)
    assert resolve_weight_format("int8", "cpu", AVX2_ONLY) == ("int8", torch.float32)
    assert resolve_weight_format("bf16", "cpu", AVX2_ONLY) == ("bf16", torch.bfloat16)
    with pytest.raises(MlakitError, match="unknown weight dtype 'int4'"):
        resolve_weight_format("int4")


@pytest.mark.parametrize("preset", ["tiny-mla", "tiny-gqa"])
def test_int8_model_stays_close_and_the_engine_equals_its_forward(preset: str) -> None:
    model = build(ModelConfig.from_preset(preset))
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = model(tokens)[0, -1]
    assert prepare_weights(model, "int8") == "int8"
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert quantized and all(not isinstance(getattr(m, "w_uk", None), Int8Linear) for m in model.modules())
    with torch.no_grad():
        got = model(tokens)[0, -1]
    assert torch.allclose(got.float(), want, atol=0.1 * want.abs().max().item())  # int8 weights: close, not equal
    scale = max(1.0, got.abs().max().item())
    # the reference backend runs the forward's own fused SDPA: equal up to summation order; the CPU
    # kernel multiplies bf16 rows by a bf16-rounded query and bf16 probabilities: bf16 tolerance
    for backend, tol in (("torch", 1e-3), ("auto", TOLERANCES[torch.bfloat16])):
        engine = Engine(model, EngineConfig(kv_memory="1MiB", block_size=4, attention_backend=backend))
        table = engine.cache.pool.allocate(4)
        with torch.no_grad():
            paged = engine.runner.prefill(tokens[0].tolist(), 0, table)
        assert (paged - got.float()).abs().max().item() <= tol * scale, backend


@pytest.mark.parametrize("preset", ["tiny-mla", "tiny-mla-noq", "tiny-gqa"])
def test_fused_projections_equal_the_separate_ones(preset: str) -> None:
    """prepare_weights fuses q/latent/rope key (or q/k/v) and gate/up; fp32 logits stay the same."""
    model = build(ModelConfig.from_preset(preset))
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        want = model(tokens)
        prepare_weights(model, "fp32")
        got = model(tokens)
    assert all(getattr(m, "fused_in", None) is not None for m in model.modules() if hasattr(m, "fused_in"))
    assert (got - want).abs().max().item() <= 1e-4
