"""Decode-step attention time: MLA naive vs MLA absorbed vs MHA of the same hidden size and heads.

One decode step (T = 1) of one attention layer over a cache of S tokens, for S from 512 to 16K,
in fp32 and bf16, all measured side by side in one run. Each configuration is timed by the median
minimum of interleaved repeated steps after a warm-up; ratios are computed within the same (S, dtype) cell.

Default dims are DeepSeek-V2-Lite's attention (hidden 2048, 16 heads, kv_lora_rank 512, nope 128,
rope 64, v 128); the MHA baseline has the same hidden size and heads with head_dim 128.

    python benchmarks/bench_decode_attention.py --out benchmarks/results/decode_attention.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from mlakit.attention import GroupedQueryAttention, MultiHeadLatentAttention
from mlakit.cache import KVCache, LatentCache
from mlakit.config import AttentionConfig, MLAConfig


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def time_interleaved(fns: dict[str, Callable[[], object]], min_time: float, min_reps: int) -> dict[str, float]:
    """Best (minimum) seconds per call of each function, calls interleaved round-robin.

    Interleaving exposes every variant to the same background load, and the minimum is the
    least-disturbed run: on a shared machine both matter more than a long median of one variant.
    """
    for f in fns.values():  # warm-up
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or (time.perf_counter() - start < min_time * len(fns) and reps < 100):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        reps += 1
    return {k: min(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="cached lengths S")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-lora-rank", type=int, default=512)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    mla_cfg = MLAConfig(
        hidden_size=args.hidden,
        num_heads=args.heads,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    mha_cfg = AttentionConfig(hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.heads, head_dim=128)
    max_s = max(lengths) + 1
    torch.manual_seed(0)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        mla = MultiHeadLatentAttention(mla_cfg, max_positions=max_s).to(dtype).eval()
        mha = GroupedQueryAttention(mha_cfg, max_positions=max_s).to(dtype).eval()
        b = args.batch
        for s in lengths:
            lat = LatentCache(b, s + 1, mla_cfg.kv_lora_rank, mla_cfg.qk_rope_head_dim, dtype)
            lat.kv[:, :s].normal_()
            kv = KVCache(b, s + 1, args.heads, 128, dtype)
            kv.k[:, :s].normal_()
            kv.v[:, :s].normal_()
            x = torch.randn(b, 1, args.hidden, dtype=dtype)
            pos = torch.full((b, 1), s)
            with torch.inference_mode():
                fns = {
                    "mla_naive": partial(mla, x, pos, lat, "naive", s + 1),
                    "mla_absorbed": partial(mla, x, pos, lat, "absorbed", s + 1),
                    "mha": partial(mha, x, pos, kv, "naive", s + 1),
                }
                t = time_interleaved(fns, args.min_time, args.min_reps)
            row = {
                "dtype": dname,
                "seq_len": s,
                "batch": b,
                **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                "naive_over_absorbed": t["mla_naive"] / t["mla_absorbed"],
                "mha_over_absorbed": t["mha"] / t["mla_absorbed"],
                "mla_cache_bytes": lat.nbytes,
                "mha_cache_bytes": kv.nbytes,
            }
            rows.append(row)
            print(
                f"{dname:>5} S={s:>6}  naive {row['mla_naive_ms']:8.2f} ms  absorbed {row['mla_absorbed_ms']:7.2f} ms"
                f"  MHA {row['mha_ms']:7.2f} ms  naive/absorbed {row['naive_over_absorbed']:5.2f}x"
                f"  MHA/absorbed {row['mha_over_absorbed']:5.2f}x",
                flush=True,
            )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "mla": {
            "hidden": args.hidden,
            "heads": args.heads,
            "kv_lora_rank": args.kv_lora_rank,
            "nope": 128,
            "rope": 64,
            "v": 128,
        },
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
