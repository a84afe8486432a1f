"""The ``mlakit`` command: thin subcommands over the library API.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func(args) -> int`` does the work. Bad input raises :class:`mlakit.errors.MlakitError`
(or ``ValueError``/``OSError``); :func:`main` prints one line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# module names under mlakit.cli, in the order `mlakit --help` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "kv_size",
    "convert",
    "heal",
    "eval",
    "tradeoff",
    "generate",
    "serve",
    "export_hf",
    "bench",
    "train",
)


def chat_share(text: str) -> float | None:
    """An argparse type: the share of windows framed as chat requests, ``auto`` (``None``) or 0..1."""
    import argparse

    if text == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a share between 0 and 1")
    return v


CALIBRATION_WINDOWS_HELP = (
    "calibration sequences; the full-RoPE form's sequential pass runs all of them (default 32; 64 measured "
    "better on SmolLM2, x1.077 -> x1.073 at 50%% cache, for ~60 s more per conversion)"
)
CHAT_HELP = (
    "share of the windows framed as chat requests through the model's chat template (system prompt at "
    "position 0, ending at the assistant header), so the conversion keeps answering chats; auto = 0.5 when "
    "the tokenizer has a chat template, else 0 (default auto)"
)


def device_arg(name: str) -> torch.device:
    """``--device`` as a torch device (``auto``: cuda when present), refusing one this machine does not have."""
    import torch

    from mlakit.errors import MlakitError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MlakitError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from e
    if device.type not in ("cpu", "cuda"):
        raise MlakitError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlakitError(f"--device {name!r}: no CUDA device is available here")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlakit",
        description="Multi-head Latent Attention toolkit: convert, measure, run and ship MLA models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mlakit.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"mlakit.cli.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # MlakitError is a ValueError
        print(f"mlakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
