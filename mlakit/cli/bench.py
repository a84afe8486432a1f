"""``mlakit bench``: decode throughput, cache capacity and memory bandwidth of one model in the engine."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from mlakit.cli import device_arg
from mlakit.cli.generate import add_engine_args, engine_config
from mlakit.config import ModelConfig
from mlakit.errors import MlakitError
from mlakit.units import format_bytes, parse_bytes


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure decode tokens/s, cache capacity and memory bandwidth in the engine",
        description="Time batched decode steps of the inference engine at given batch sizes and context lengths "
        "(the cache is filled with random latents or K/V; prefill is not timed), report how many sequences of "
        "--capacity-len tokens the KV budget admits, and this machine's memory bandwidth. For the full "
        "comparison against transformers see benchmarks/bench_engine.py.",
        epilog="example: mlakit bench --model ckpt/smollm2-mla --batch 1 8 --context 512 8192 --steps 16 --json",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory, HF dir, .gguf file or alias (see mlakit generate)")
    src.add_argument("--preset", help=f"random weights of a preset: {', '.join(ModelConfig.presets())}")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048], help="cached tokens (default 512 2048)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per point (default 16)")
    p.add_argument("--capacity-len", type=int, default=8192, help="sequence length for the capacity count")
    p.add_argument(
        "--prefill-len",
        type=int,
        default=4096,
        help="prompt tokens for the prefill timing (capped at the model's context; 0 skips it; default 4096)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model and its cache live: cpu (default) or cuda[:N] (auto backend there: triton)",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.engine.bench import admitted_sequences, decode_throughput, memory_bandwidth, prefill_throughput
    from mlakit.model import Transformer
    from mlakit.quant import prepare_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(b <= 0 for b in args.batch) or any(c <= 0 for c in args.context) or args.steps <= 0:
        raise MlakitError("--batch, --context and --steps must be positive")
    if args.prefill_len < 0:
        raise MlakitError(f"--prefill-len must be >= 0, got {args.prefill_len}")
    device = device_arg(args.device)
    if args.model:
        from mlakit.engine.load import load_model

        loaded = load_model(args.model, weights=args.dtype, device=device)
        model, weights = loaded.model, loaded.weights
    else:
        try:
            config = ModelConfig.from_preset(args.preset)
        except ValueError as e:
            raise MlakitError(str(e)) from e
        with device:  # random weights made where they will live (a GPU initialises GBs in a blink)
            model = Transformer(config).eval()
        weights = prepare_weights(model, args.dtype, device)
    too_long = [c for c in args.context if c + args.steps + 2 > model.config.max_seq_len]
    if too_long:
        raise MlakitError(f"--context {too_long} (+ steps) exceeds the model's context {model.config.max_seq_len}")
    cfg = engine_config(args)
    points = [decode_throughput(model, cfg, b, c, args.steps).__dict__ for c in args.context for b in args.batch]
    prefill = None
    if args.prefill_len:
        prefill = prefill_throughput(model, cfg, min(args.prefill_len, model.config.max_seq_len - 1))
    cache_dtype = cfg.cache_storage(model.embed.weight.dtype)
    capacity = admitted_sequences(model.config, cfg.kv_bytes, args.capacity_len, cfg.block_size, cache_dtype)
    from mlakit.native import cpu_flags

    result = {
        "model": args.model or args.preset,
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))),
        "threads": torch.get_num_threads(),
        "weights": weights,
        "engine": {
            k: getattr(cfg, k)
            for k in (
                "kv_memory",
                "block_size",
                "cache_dtype",
                "decode_path",
                "attention_backend",
                "cuda_graphs",
                "fused_decode",
            )
        },
        "decode": points,
        "prefill": prefill,
        "capacity": {"kv_memory": cfg.kv_bytes, "seq_len": args.capacity_len, "sequences": capacity},
        "bandwidth": memory_bandwidth(parse_bytes("512MiB")),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"weights {weights}, attention backend {cfg.attention_backend}, {result['threads']} threads")
    print(f"{'batch':>5} {'context':>7} {'ms/step':>9} {'tokens/s':>9} {'cache':>10} {'peak RSS':>10}")
    for pt in points:
        print(
            f"{pt['batch']:>5} {pt['context']:>7} {pt['step_ms']:>9.1f} {pt['tokens_per_s']:>9.1f} "
            f"{format_bytes(pt['kv_bytes']):>10} {format_bytes(pt['peak_rss']):>10}"
        )
    if prefill:
        print(
            f"prefill: {prefill['tokens']} tokens in {prefill['seconds']:.2f} s "
            f"= {prefill['tokens_per_s']:.0f} tokens/s"
        )
    print(f"capacity: {capacity} sequences of {args.capacity_len} tokens in {format_bytes(cfg.kv_bytes)}")
    bw = result["bandwidth"]
    print(f"memory bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    return 0
