"""``mlakit tradeoff``: the memory-quality curve of MLA conversion, training-free and healed, at length."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mlakit.cli import CALIBRATION_WINDOWS_HELP, CHAT_HELP, chat_share
from mlakit.cli.heal import add_heal_options, heal_config


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"fractions must be numbers separated by commas, got {text!r}") from e


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tradeoff",
        help="convert at several cache budgets (training-free and healed), evaluate at 512 and 4096 tokens, "
        "table + plot + JSON",
        description="Convert --model at each --kv-fraction with full RoPE, decoupled RoPE, decoupled RoPE healed "
        "(`mlakit heal`) and, with --svd-baseline, plain SVD of the weights; score each against the original on "
        "every genre of "
        "the evaluation text at every --lengths, greedily continue one long real-text prompt beside the "
        "original (flagging blank or repeated output), print a table and write tradeoff.png / "
        "tradeoff.json into --out.",
    )
    p.add_argument("--model", default="smollm2-135m", help="HF dir, .gguf, alias (default smollm2-135m) or hub id")
    p.add_argument(
        "--kv-fraction",
        type=_fractions,
        default=(0.5, 0.25),
        help="comma-separated fractions (default 0.5,0.25)",
    )
    p.add_argument(
        "--out", default="tradeoff", help="directory for tradeoff.png and tradeoff.json (default ./tradeoff)"
    )
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[512, 4096],
        metavar="N",
        help="context lengths to score at (default 512 4096)",
    )
    p.add_argument(
        "--text", nargs="+", default=None, metavar="PATH", help="evaluate on these text files (default: genre mix)"
    )
    p.add_argument(
        "--calibration-text",
        nargs="+",
        default=None,
        metavar="PATH",
        help="calibrate and heal on these text files (default: the genre mix's calibration split)",
    )
    p.add_argument(
        "--windows", type=int, default=None, help="evaluation windows per genre (default: 2 at 512, 1 at 4096)"
    )
    p.add_argument("--calibration-windows", type=int, default=32, help=CALIBRATION_WINDOWS_HELP)
    p.add_argument("--calibration-chat", type=chat_share, default=None, metavar="F", help=CHAT_HELP)
    p.add_argument(
        "--generation-prompt",
        type=int,
        default=3072,
        metavar="N",
        help="tokens of real text the generation check continues (default 3072; 0 skips it)",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "greedy", "sensitivity"),
        default="uniform",
        help="rank allocation (sensitivity: by the measured loss of each layer alone, +1-2 minutes per conversion)",
    )
    p.add_argument(
        "--svd-baseline",
        action="store_true",
        help="add the uncalibrated weight-SVD row at the largest fraction (x14 perplexity at 50%% on SmolLM2, "
        "+1.5 min)",
    )
    from mlakit.convert.heal import HealConfig
    from mlakit.eval.tradeoff import TRADEOFF_HEAL

    heal = p.add_argument_group(
        "healing (the 'decoupled + heal' rows: mlakit heal's per-layer fits without its end-to-end phase, "
        f"to keep the run within 20 minutes; --heal-distill-steps {HealConfig().distill_steps} adds it, "
        "~5 minutes per healed row)"
    )
    add_heal_options(heal, prefix="heal-", defaults=TRADEOFF_HEAL)  # type: ignore[arg-type]
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.eval.tradeoff import SVD_BASELINE, VARIANTS, TradeoffConfig, format_table, run_tradeoff

    cfg = TradeoffConfig(
        model=args.model,
        kv_fractions=args.kv_fraction,
        texts=tuple(args.text or ()),
        calibration_texts=tuple(args.calibration_text or ()),
        lengths=tuple(args.lengths),
        windows=args.windows,
        calibration_windows=args.calibration_windows,
        calibration_chat=args.calibration_chat,
        heal=heal_config(args, prefix="heal-"),
        generation_prompt=args.generation_prompt,
        allocation=args.allocation,
        variants=VARIANTS + ((SVD_BASELINE,) if args.svd_baseline else ()),
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
