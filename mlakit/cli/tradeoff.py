"""``mlakit tradeoff``: the memory-quality curve of training-free MLA conversion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"fractions must be numbers separated by commas, got {text!r}") from e


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tradeoff",
        help="convert at several cache budgets, evaluate, print a table, write a plot and JSON",
        description="Convert --model at each --kv-fraction with both --rope kinds and the weight-SVD "
        "baseline, evaluate each against the original, print a table and write tradeoff.png / "
        "tradeoff.json into --out.",
    )
    p.add_argument("--model", default="smollm2-135m", help="HF dir, .gguf, alias (default smollm2-135m) or hub id")
    p.add_argument(
        "--kv-fraction",
        type=_fractions,
        default=(1.0, 0.5, 0.25, 0.125),
        help="comma-separated fractions (default 1,0.5,0.25,0.125)",
    )
    p.add_argument(
        "--out", default="tradeoff", help="directory for tradeoff.png and tradeoff.json (default ./tradeoff)"
    )
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="evaluate on these text files")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--calibration-windows", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--allocation", choices=("uniform", "greedy"), default="uniform", help="rank allocation")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.eval.tradeoff import TradeoffConfig, format_table, run_tradeoff

    cfg = TradeoffConfig(
        model=args.model,
        kv_fractions=args.kv_fraction,
        texts=tuple(args.text or ()),
        windows=args.windows,
        seq_len=args.seq_len,
        calibration_windows=args.calibration_windows,
        allocation=args.allocation,
    )
    result = run_tradeoff(cfg, args.out, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        print(
            f"\nwrote {Path(args.out) / 'tradeoff.png'} and {Path(args.out) / 'tradeoff.json'} "
            f"({result['seconds']:.0f} s)"
        )
    return 0
