"""``mlakit heal``: fit a converted model's attention to its source's, layer by layer, at length."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mlakit.cli import CHAT_HELP, chat_share
from mlakit.errors import MlakitError

#: ``--precision`` choices and the ``HealConfig.bf16`` each stands for (``None``: by the device).
PRECISIONS: dict[str, bool | None] = {"auto": None, "bf16": True, "fp32": False}


def add_heal_options(p: argparse.ArgumentParser, *, prefix: str = "", defaults: Any = None) -> None:
    """The healing knobs (shared by ``mlakit heal``, ``mlakit convert --heal`` and ``mlakit
    tradeoff``); ``defaults``: a :class:`~mlakit.convert.heal.HealConfig` (default ``HealConfig()``)."""
    from mlakit.convert.heal import HEALABLE, HealConfig

    d = defaults or HealConfig()
    p.add_argument(f"--{prefix}steps", type=int, default=d.steps, help=f"Adam steps per layer (default {d.steps})")
    p.add_argument(
        f"--{prefix}seq-len",
        type=int,
        default=d.seq_len,
        help=f"tokens per healing window; long, so slow rotations are seen (default {d.seq_len})",
    )
    p.add_argument(f"--{prefix}windows", type=int, default=d.windows, help=f"healing windows (default {d.windows})")
    p.add_argument(f"--{prefix}lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument(
        f"--{prefix}params",
        nargs="+",
        choices=HEALABLE,
        default=list(d.params),
        metavar="W",
        help=f"MLA weights to fit (default: all of {' '.join(HEALABLE)})",
    )
    p.add_argument(
        f"--{prefix}distill-steps",
        type=int,
        default=d.distill_steps,
        help="then this many steps of end-to-end distillation: the --params weights of every layer together, "
        f"towards the original's next-token distribution (KL); 0 skips it (default {d.distill_steps})",
    )
    p.add_argument(
        f"--{prefix}distill-seq-len",
        type=int,
        default=d.distill_seq_len,
        help=f"tokens per end-to-end window (default {d.distill_seq_len})",
    )
    p.add_argument(
        f"--{prefix}distill-batch",
        type=int,
        default=d.distill_batch,
        help=f"end-to-end windows per step (default {d.distill_batch})",
    )
    p.add_argument(
        f"--{prefix}distill-lr",
        type=float,
        default=d.distill_lr,
        help=f"end-to-end peak learning rate (default {d.distill_lr:g})",
    )
    p.add_argument(f"--{prefix}chat", type=chat_share, default=d.chat, metavar="F", help=CHAT_HELP)
    p.add_argument(
        f"--{prefix}answer-weight",
        type=float,
        default=d.answer_weight,
        metavar="W",
        help="extra weight, in the end-to-end loss, of each chat request's answer position (the assistant "
        "header: answer or end the turn), in units of a window's mean per-token loss; keeps long requests "
        f"answered; 0 turns it off (default {d.answer_weight:g})",
    )
    p.add_argument(
        f"--{prefix}precision",
        choices=tuple(PRECISIONS),
        default=next(k for k, v in PRECISIONS.items() if v is d.bf16),
        help="matmul precision of both phases' steps: auto = bf16 autocast where the CPU has bf16 arithmetic "
        "(AVX512-BF16 or AMX; ~1.5x faster, same result), fp32 elsewhere (default auto)",
    )


def heal_config(args: argparse.Namespace, *, prefix: str = "") -> Any:
    from mlakit.convert.heal import HealConfig

    p = prefix.replace("-", "_")
    return HealConfig(
        steps=getattr(args, f"{p}steps"),
        seq_len=getattr(args, f"{p}seq_len"),
        windows=getattr(args, f"{p}windows"),
        lr=getattr(args, f"{p}lr"),
        params=tuple(getattr(args, f"{p}params")),
        distill_steps=getattr(args, f"{p}distill_steps"),
        distill_seq_len=getattr(args, f"{p}distill_seq_len"),
        distill_batch=getattr(args, f"{p}distill_batch"),
        distill_lr=getattr(args, f"{p}distill_lr"),
        bf16=PRECISIONS[getattr(args, f"{p}precision")],
        chat=getattr(args, f"{p}chat"),
        answer_weight=getattr(args, f"{p}answer_weight"),
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "heal",
        help="fit a converted model's attention to the original's, layer by layer (minutes on a CPU)",
        description="Between training-free conversion and distillation, in seven to ten minutes on two CPU cores "
        "(SmolLM2-135M). First, for each layer in order, Adam steps fit the MLA weights so that the layer "
        "reproduces the original attention output on the converted model's own activations, over long "
        "calibration windows (so the rotations the decoupled form drops are seen). Then a short end-to-end "
        "distillation fits all attention weights together to the original's next-token distribution, "
        "which the local fits cannot see. Both run in bf16 where the CPU has bf16 arithmetic. For a model with a "
        "chat template, half of both phases' windows are chat requests (--chat), which keeps it answering long "
        "requests instead of ending its turn at once, and the end-to-end loss weighs each request's answer "
        "position (--answer-weight). The shapes, cache and export format do not change. Measured on "
        "SmolLM2-135M: at 50% cache the defaults (7 minutes); at 25%, convert with --allocation sensitivity and "
        "heal with --distill-steps 40 (8-10 minutes; --answer-weight 0 for the lowest perplexity, x1.59 "
        "instead of x1.63 at 4K tokens, answering fewer long requests). See docs/conversion.md.",
    )
    p.add_argument("--model", required=True, help="mlakit checkpoint made by `mlakit convert`")
    p.add_argument(
        "--reference",
        default=None,
        help="the original model (HF dir, .gguf, alias, hub id); default: the source in the model's conversion.json",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument(
        "--calibration-text",
        nargs="+",
        default=None,
        metavar="PATH",
        help="heal on these UTF-8 text files or directories (default: the built-in genre mix, calibration split)",
    )
    add_heal_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.convert.heal import heal_checkpoint
    from mlakit.text.corpus import files_corpus

    if Path(args.out).exists() and not args.overwrite:
        raise MlakitError(f"--out {args.out} already exists; choose a new directory (or --overwrite)")
    config = heal_config(args)  # validated before the slow load
    corpus = files_corpus(args.calibration_text) if args.calibration_text else None
    out, result = heal_checkpoint(
        args.model,
        args.out,
        reference=args.reference,
        config=config,
        corpus=corpus,
        progress=True,
        overwrite=args.overwrite,
    )
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"wrote {out}")
    print(
        f"  healed {len(result.after)} layers on {result.tokens} tokens in {result.seconds:.0f} s "
        f"({'bf16' if result.bf16 else 'fp32'} matmuls): "
        f"relative attention error {mean(result.before):.4f} -> {mean(result.after):.4f} (mean over layers)"
    )
    if result.distill_kl is not None:
        print(
            f"  then {result.distill_steps} end-to-end steps in {result.distill_seconds:.0f} s: KL to the original "
            f"{result.distill_kl[0]:.4f} -> {result.distill_kl[1]:.4f} nats/token (probe window)"
        )
    return 0
