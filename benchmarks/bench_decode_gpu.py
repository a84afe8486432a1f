"""GPU decode attention: the Triton backend (paged, absorbed MLA) vs the torch backend vs MHA (fused SDPA).

DeepSeek-V3 attention dims (128 heads, kv_lora_rank 512, rope 64; MHA baseline with 128 heads of
head_dim 128 for K and V), bf16, one decode token per sequence, the latents in the engine's paged
storage (block size 16) read through block tables (contiguous tables here). Reports time
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

from mlakit.attention.backends import get_backend
from mlakit.attention.backends.triton_mla import mla_decode_paged
from mlakit.attention.metadata import AttentionMetadata
from mlakit.paged import PagedCache, PagedRows

BLOCK = 16


def paged(kv: torch.Tensor, backend: str) -> tuple[PagedRows, AttentionMetadata]:
    """``kv [B, S, W]`` as paged rows with contiguous block tables, and decode metadata over them."""
    b, s, w = kv.shape
    rows = PagedRows(0, w, kv.dtype, kv.device)
    rows.data = kv.reshape(b * s, w)
    per = s // BLOCK
    tables = [list(range(i * per, (i + 1) * per)) for i in range(b)]
    cache = PagedCache(layers=[], pool=None, block_size=BLOCK, bytes_per_block=0, dtype=kv.dtype)  # type: ignore[arg-type]
    meta = AttentionMetadata.build(cache, get_backend(backend, kv.device), [1] * b, [s] * b, tables, b, kv.device)
    return rows, meta


def triton_call(q, rows, meta, rank, config=(None, 32, 8, 2)):
    bh, bn, nw, ns = config
    return mla_decode_paged(
        q, rows, meta.block_tables, meta.context_lens, max(meta.context_lens_host), BLOCK, rank, None, bh, bn, nw, ns
    )


def torch_call(q, rows, meta, rank):
    return meta.backend.latent_decode(q, rows, meta, rank)


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
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = triton.testing.do_bench(partial(dst.copy_, big))
    copy_bw = 2 * big.numel() / copy_ms / 1e6  # GB/s, read + write
    del big, dst
    scale = (d + rope) ** -0.5
    # a small sweep of kernel shapes on one representative cell; the best is used everywhere
    q = torch.randn(16, h, rank + rope, device=dev, dtype=dtype) * scale
    cache_rows, meta = paged(torch.randn(16, 8192, rank + rope, device=dev, dtype=dtype), "triton")
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
            f = partial(triton_call, q, cache_rows, meta, rank, (bh, bn, nw, ns))
            sweep[(bh, bn, nw, ns)] = triton.testing.do_bench(f)
        except Exception as e:  # e.g. out of shared memory / registers for this shape
            print(f"config {(bh, bn, nw, ns)} failed: {type(e).__name__}: {str(e)[:120]}")
    best = min(sweep, key=sweep.__getitem__)
    print("sweep (block_h, block_n, warps, stages) -> ms:", {str(k): round(v, 4) for k, v in sweep.items()})
    del q, cache_rows, meta
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for s in (int(x) for x in args.lengths.split(",")):
            mha_bytes = 2 * b * s * h * d * 2
            if mha_bytes > 60 * 2**30:
                continue
            q = torch.randn(b, h, rank + rope, device=dev, dtype=dtype) * scale
            kv = torch.randn(b, s, rank + rope, device=dev, dtype=dtype)
            cache_rows, meta = paged(kv, "triton")
            rows32, meta32 = paged(kv.float(), "torch")
            err = (
                (triton_call(q, cache_rows, meta, rank, best).float() - torch_call(q.float(), rows32, meta32, rank))
                .abs()
                .max()
            )
            del rows32, meta32
            _, meta_ref = paged(kv, "torch")
            t_tri = triton.testing.do_bench(lambda q=q, r=cache_rows, m=meta: triton_call(q, r, m, rank, best))
            t_ref = triton.testing.do_bench(lambda q=q, r=cache_rows, m=meta_ref: torch_call(q, r, m, rank))
            del kv, cache_rows, meta, meta_ref
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
