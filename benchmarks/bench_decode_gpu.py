"""GPU decode attention: Triton absorbed MLA kernel vs the PyTorch reference vs MHA (fused SDPA).

DeepSeek-V3 attention dims (128 heads, kv_lora_rank 512, rope 64; MHA baseline with 128 heads of
head_dim 128 for K and V), bf16, one decode token per sequence, all cells in one run. Reports time
per step and the bandwidth each achieves reading its cache (bytes of cache / time), against a
device-to-device copy measured in the same run.

    python benchmarks/bench_decode_gpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from mlakit.kernels import decode_kernel


def _with_config(fn, config, q, kv, lens, rank, scale):
    return fn(q, kv, lens, rank, scale, None, *config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA"
    dev = "cuda"
    rank, rope, h, d = 512, 64, args.heads, 128
    dtype = torch.bfloat16
    ref, tri = decode_kernel("torch"), decode_kernel("triton")
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = triton.testing.do_bench(partial(dst.copy_, big))
    copy_bw = 2 * big.numel() / copy_ms / 1e6  # GB/s, read + write
    del big, dst
    scale = (d + rope) ** -0.5
    # a small sweep of kernel shapes on one representative cell; the best is used everywhere
    q = torch.randn(16, h, rank + rope, device=dev, dtype=dtype)
    kv = torch.randn(16, 8192, rank + rope, device=dev, dtype=dtype)
    lens = torch.full((16,), 8192, device=dev)
    sweep = {}
    for bh, bn, nw, ns in [
        (16, 32, 4, 2),
        (32, 32, 4, 2),
        (64, 32, 8, 2),
        (64, 16, 8, 2),
        (64, 64, 8, 1),
        (32, 64, 8, 2),
        (64, 32, 4, 2),
    ]:
        try:
            f = partial(tri, q, kv, lens, rank, scale, None, bh, bn, nw, ns)
            sweep[(bh, bn, nw, ns)] = triton.testing.do_bench(f)
        except Exception as e:  # e.g. out of shared memory / registers for this shape
            print(f"config {(bh, bn, nw, ns)} failed: {type(e).__name__}: {str(e)[:120]}")
    best = min(sweep, key=sweep.__getitem__)
    print("sweep (block_h, block_n, warps, stages) -> ms:", {str(k): round(v, 4) for k, v in sweep.items()})
    tri = partial(_with_config, tri, best)
    del q, kv
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for s in (int(x) for x in args.lengths.split(",")):
            mha_bytes = 2 * b * s * h * d * 2
            if mha_bytes > 60 * 2**30:
                continue
            q = torch.randn(b, h, rank + rope, device=dev, dtype=dtype)
            kv = torch.randn(b, s, rank + rope, device=dev, dtype=dtype)
            lens = torch.full((b,), s, device=dev)
            err = (tri(q, kv, lens, rank, scale).float() - ref(q.float(), kv.float(), lens, rank, scale)).abs().max()
            t_tri = triton.testing.do_bench(lambda q=q, kv=kv, lens=lens: tri(q, kv, lens, rank, scale))
            t_ref = triton.testing.do_bench(lambda q=q, kv=kv, lens=lens: ref(q, kv, lens, rank, scale))
            del kv
            qm = torch.randn(b, h, 1, d, device=dev, dtype=dtype)
            k = torch.randn(b, h, s, d, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            t_mha = triton.testing.do_bench(lambda qm=qm, k=k, v=v: F.scaled_dot_product_attention(qm, k, v))
            del k, v
            mla_bytes = b * s * (rank + rope) * 2
            row = {
                "batch": b,
                "seq_len": s,
                "triton_ms": t_tri,
                "torch_ms": t_ref,
                "mha_sdpa_ms": t_mha,
                "triton_GBps": mla_bytes / t_tri / 1e6,
                "mha_GBps": mha_bytes / t_mha / 1e6,
                "torch_over_triton": t_ref / t_tri,
                "mha_over_triton": t_mha / t_tri,
                "max_abs_err_vs_fp32_ref": float(err),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_GBps": copy_bw,
        "heads": h,
        "rows": rows,
        "kernel_config": dict(zip(("block_h", "block_n", "num_warps", "num_stages"), best)),
        "sweep_ms": {str(k): v for k, v in sweep.items()},
        "command": "python benchmarks/bench_decode_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"device copy bandwidth {copy_bw:.0f} GB/s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
