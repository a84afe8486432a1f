"""``mlakit eval``: perplexity, agreement with a reference model, KV bytes per token."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, top-1 agreement and KL vs a reference, KV bytes per token",
        description="Score a model (mlakit checkpoint or HF model/GGUF/alias) on real text. Default text: "
        "the evaluation split of the Python documentation sources (python3-doc) or, without them, the "
        "standard library's docstrings; never overlapping the calibration split.",
    )
    p.add_argument("--model", required=True, help="mlakit checkpoint dir, HF dir, .gguf, alias or hub id")
    p.add_argument("--reference", default=None, help="the original model to compare against")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="evaluate on these text files")
    p.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument(
        "--cache-dtype",
        choices=("fp32", "bf16", "fp16"),
        default="bf16",
        help="dtype for KV bytes per token (default bf16)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.eval.run import evaluate_paths

    r = evaluate_paths(
        args.model,
        reference=args.reference,
        texts=args.text,
        windows=args.windows,
        seq_len=args.seq_len,
        cache_dtype=args.cache_dtype,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"model:      {r['model']}")
    print(f"text:       {r['text']} ({r['tokens']} predicted tokens)")
    print(f"perplexity: {r['perplexity']:.3f}")
    print(f"KV cache:   {r['kv_bytes_per_token']} bytes/token ({r['cache_dtype']})")
    if r["reference"]:
        print(
            f"reference:  {r['reference']}: perplexity {r['reference_perplexity']:.3f}, "
            f"{r['reference_kv_bytes_per_token']} bytes/token"
        )
        print(f"ratio:      perplexity x{r['perplexity_ratio']:.3f} at {r['kv_fraction']:.3f} of the cache")
        print(f"agreement:  top-1 {r['top1_agreement']:.3f}, KL {r['kl']:.4f} nats/token")
    return 0
