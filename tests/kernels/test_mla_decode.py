"""Kernel backends of absorbed MLA decode equal the PyTorch reference, and the reference equals
the MLA layer's own absorbed path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from mlakit.attention import MultiHeadLatentAttention
from mlakit.cache import LatentCache
from mlakit.config import MLAConfig
from mlakit.kernels import decode_kernel
from tests.conftest import TOLERANCES

HAS_TRITON = importlib.util.find_spec("triton") is not None

# name -> (batch, heads, kv_lora_rank, rope, max cached, kv_lens)
SCENARIOS = {
    "single": (1, 4, 32, 8, 40, [40]),
    "ragged": (3, 5, 32, 8, 70, [70, 1, 33]),
    "deepseek_dims": (2, 16, 512, 64, 100, [100, 57]),
    "odd_rank": (2, 3, 24, 6, 50, [17, 50]),
}


def make(batch: int, heads: int, rank: int, rope: int, s: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, rank + rope, generator=g).to(dtype)
    kv = torch.randn(batch, s, rank + rope, generator=g).to(dtype)
    return q, kv


def test_reference_matches_layer_absorbed_path() -> None:
    """The kernel contract equals MultiHeadLatentAttention's absorbed decode on a ragged batch."""
    cfg = MLAConfig(hidden_size=32, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    attn = MultiHeadLatentAttention(cfg, max_positions=64).eval()
    lens = torch.tensor([9, 4])
    cache = LatentCache(2, 16, 16, 8)
    with torch.no_grad():
        attn(torch.randn(2, 9, 32), torch.arange(9).expand(2, 9), cache, "naive")
        x = torch.randn(2, 1, 32)
        pos = (lens - 1).unsqueeze(1)
        want = attn(x, pos, cache, "absorbed")
        q_nope, q_rope = attn.project_q(x, pos)
        w_uk = attn.w_uk.weight.view(4, 8, 16)
        q_joint = torch.cat((torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_rope), -1)[:, 0]  # [B, H, r + d_r]
        o_latent = decode_kernel("torch")(q_joint, cache.kv, lens, 16, attn.scale)
        o = torch.einsum("bhc,hdc->bhd", o_latent, attn.w_uv.weight.view(4, 8, 16))
        got = attn.w_o(o.reshape(2, 1, -1))
    assert (got - want).abs().max().item() <= TOLERANCES[torch.float32]


def _run_triton_interpreted(name: str) -> None:
    batch, heads, rank, rope, s, lens = SCENARIOS[name]
    q, kv = make(batch, heads, rank, rope, s)
    kv_lens = torch.tensor(lens)
    want = decode_kernel("torch")(q, kv, kv_lens, rank, 0.1)
    got = decode_kernel("triton")(q, kv, kv_lens, rank, 0.1, num_splits=3)
    assert (got - want).abs().max().item() <= TOLERANCES[torch.float32], name


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("name", ["single", "ragged", "odd_rank"])
def test_triton_matches_reference_interpreted(name: str) -> None:
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter
    code = f"import tests.kernels.test_mla_decode as t; t._run_triton_interpreted({name!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_gpu(name: str, dtype: torch.dtype) -> None:
    batch, heads, rank, rope, s, lens = SCENARIOS[name]
    q, kv = make(batch, heads, rank, rope, s, dtype)
    q, kv, kv_lens = q.cuda(), kv.cuda(), torch.tensor(lens).cuda()
    want = decode_kernel("torch")(q.float(), kv.float(), kv_lens, rank, 0.1)
    got = decode_kernel("triton")(q, kv, kv_lens, rank, 0.1).float()
    tol = TOLERANCES[dtype] if dtype != torch.float32 else 2e-3  # tf32 tensor cores
    assert (got - want).abs().max().item() <= tol
