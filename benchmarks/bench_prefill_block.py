"""Absorbed prefill attention on the CPU kernel: query tokens per shared key tile (``prefill_block``).

One layer's attention for a whole prompt, prefilled in engine-sized chunks: for each chunk
``[a, a + chunk)`` the CPU backend's ``latent_prefill`` over the paged bf16 latent rows of
positions ``0 .. a + chunk - 1``, causal. Default shapes are SmolLM2-135M's 25% decoupled
conversion (9 heads, kv_lora_rank 48, rope 48). Every block size is timed in each round, the order
rotating between rounds (this host's speed drifts), best of the rounds; ratios are against block 1
(each token its own pseudo-sequence, the kernel's behaviour before blocks).

    python benchmarks/bench_prefill_block.py --out benchmarks/results/prefill_block.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mlakit.attention.backends.cpu import Backend as CpuBackend
from mlakit.attention.metadata import AttentionMetadata
from mlakit.paged import PagedCache, PagedRows


def lscpu_flags() -> dict[str, str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    keep = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "fma")
    flags = [f for f in info.get("Flags", "").split() if f in keep]
    return {"model": info.get("Model name", "?"), "flags": " ".join(flags)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk, as the engine's prefill_chunk (512)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--rank", type=int, default=48, help="kv_lora_rank (default 48: SmolLM2 at 25%%)")
    ap.add_argument("--rope", type=int, default=48, help="qk_rope_head_dim (default 48)")
    ap.add_argument("--blocks", default="1,2,4,8,16", help="prefill_block values to time (default 1,2,4,8,16)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blocks = [int(b) for b in args.blocks.split(",")]

    bs, n, w = 16, args.length, args.rank + args.rope
    gen = torch.Generator().manual_seed(0)
    rows = PagedRows(n, w, torch.bfloat16, "cpu")
    rows.write(torch.arange(n), torch.randn(n, w, generator=gen))
    table = list(range(n // bs))
    cache = PagedCache(layers=[], pool=None, block_size=bs, bytes_per_block=0, dtype="bf16")  # type: ignore[arg-type]
    backends = {b: CpuBackend(use_kernel=True, prefill_block=b) for b in blocks}
    meta = AttentionMetadata.build(cache, backends[blocks[0]], [n], [n], [table], 0, "cpu")
    q = (torch.randn(n, args.heads, w, generator=gen) * w**-0.5).to(torch.bfloat16)
    chunks = [(a, min(a + args.chunk, n)) for a in range(0, n, args.chunk)]

    def attend(b: int) -> torch.Tensor:
        """``[n, H, r]``: the whole prompt's attention, chunk by chunk, with blocks of ``b`` tokens."""
        outs = [backends[b].latent_prefill(q[a:e], rows, meta, 0, torch.arange(a, e), args.rank) for a, e in chunks]
        return torch.cat(outs)

    def prefill(b: int) -> float:
        t0 = time.perf_counter()
        attend(b)
        return time.perf_counter() - t0

    want = attend(blocks[0]).float()
    for b in blocks[1:]:  # every block size computes the same attention (bf16 probabilities: ~1e-2)
        assert (attend(b).float() - want).abs().max().item() < 5e-2, b
    best = {b: float("inf") for b in blocks}
    for r in range(args.rounds):
        order = blocks[r % len(blocks) :] + blocks[: r % len(blocks)]
        for b in order:
            best[b] = min(best[b], prefill(b))
    # causal: token at position p scores p + 1 keys; per key and head 2 (r + d_r) + 2 r FLOPs
    flops = sum(p + 1 for p in range(n)) * args.heads * 2 * (2 * args.rank + args.rope)
    base = best[1] if 1 in best else best[blocks[0]]
    rows_out = [
        {"block": b, "ms": best[b] * 1e3, "GFLOPs": flops / best[b] / 1e9, "speedup_vs_1": base / best[b]}
        for b in blocks
    ]
    print(
        f"{args.length}-token prompt, chunks of {args.chunk}, {args.heads} heads, "
        f"width {args.rank}+{args.rope}, {args.threads} threads"
    )
    print("| prefill_block | ms per layer | GFLOP/s | vs block 1 |\n|---:|---:|---:|---:|")
    for row in rows_out:
        print(f"| {row['block']} | {row['ms']:.1f} | {row['GFLOPs']:.0f} | {row['speedup_vs_1']:.2f}x |")
    if args.out:
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": lscpu_flags(),
            "command": "python benchmarks/bench_prefill_block.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
            "results": rows_out,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
