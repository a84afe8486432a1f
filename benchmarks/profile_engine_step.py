"""Where one engine decode step spends its time: torch.profiler over a few batched decode steps.

Random weights of a preset (optionally cut to ``--layers`` layers), the cache filled with random
latents, ``--batch`` sequences of ``--context`` tokens, one decode token each; prints the ops
that take the most device time and the most host time. Meant for a GPU (``--device cuda``), works on CPU.

    python benchmarks/profile_engine_step.py --device cuda --layers 4 --batch 16 --context 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mlakit import ModelConfig, Transformer
from mlakit.engine import EngineConfig
from mlakit.engine.bench import _filled_engine
from mlakit.quant import prepare_weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = dataclasses.replace(ModelConfig.from_preset(args.preset), num_layers=args.layers)
    with device:
        model = Transformer(config).eval()
    weights = prepare_weights(model, args.dtype, device)
    engine_config = EngineConfig(attention_backend=args.attention_backend)
    engine, tables = _filled_engine(model, engine_config, args.batch, args.context, args.steps * 3 + 4)
    tokens = torch.randint(0, config.vocab_size, (args.batch,)).tolist()
    pos = args.context

    def step() -> None:
        nonlocal pos
        engine.runner.decode(tokens, [pos] * args.batch, tables)
        pos += 1
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.steps):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    print(
        f"{args.preset} x{args.layers} layers, weights {weights}, backend {engine.runner.backend.name}, "
        f"batch {args.batch} x context {args.context}: {ms:.2f} ms/step"
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
