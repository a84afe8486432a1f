"""The fused CPU decode step against the model's own decode: same process, same cache, steps interleaved.

One engine, its cache filled with random latents (:func:`mlakit.engine.bench._filled_engine`);
each round times one decode step through the model (``runner.fused`` off) and one through the
fused C step, alternating which goes first, so both see the same machine load. Prints the median
milliseconds per step of each and the median of the per-round ratios, per (context x batch).

    python benchmarks/ab_fused_decode.py --model /path/to/mla-checkpoint --threads 1 --points 512x1 4096x1 4096x8

Check ``uptime`` first: on a busy machine use one thread (OpenMP barriers with a preempted
thread cost a time slice each, and a step has ~150 of them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mlakit.engine import EngineConfig
from mlakit.engine.bench import _filled_engine
from mlakit.engine.load import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto", help="weight format (mlakit.quant)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", nargs="+", default=["512x1", "4096x1"], help="CONTEXTxBATCH")
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, weights=args.dtype)
    print(f"weights {loaded.weights}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for point in args.points:
        ctx, batch = (int(v) for v in point.split("x"))
        engine, tables = _filled_engine(loaded.model, EngineConfig(), batch, ctx, args.steps + 4)
        runner = engine.runner
        fused = runner.fused
        if fused is None:
            print(f"{point}: no fused step for this model (see the log for why)")
            continue
        times: dict[str, list[float]] = {"model": [], "fused": []}
        tokens = [5] * batch
        with torch.inference_mode():
            for i in range(args.steps):
                order = (("model", None), ("fused", fused)) if i % 2 == 0 else (("fused", fused), ("model", None))
                for name, step in order:
                    runner.fused = step
                    t0 = time.perf_counter()
                    runner.decode(tokens, [ctx + i] * batch, tables)
                    times[name].append(time.perf_counter() - t0)
        runner.fused = fused
        a, b = times["model"][2:], times["fused"][2:]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(
            f"{point}: model {statistics.median(a) * 1e3:.2f} ms, fused {statistics.median(b) * 1e3:.2f} ms "
            f"({batch / statistics.median(b):.1f} tokens/s), speedup {ratio:.2f} (load {os.getloadavg()[0]:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
