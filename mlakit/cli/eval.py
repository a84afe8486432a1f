"""``mlakit eval``: perplexity and agreement with a reference, per context length and text genre."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlakit.dtypes import FLOAT_DTYPES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, top-1 agreement and KL vs a reference at several lengths, KV bytes per token",
        description="Score a model (mlakit checkpoint or HF model/GGUF/alias) on real text at several context "
        "lengths. Default text: the evaluation split of a mix of genres installed on Debian (Python docs, man "
        "pages, info manuals, Debian policy and licenses), scored genre by genre; never overlapping the "
        "calibration split. Without any of them, the standard library's docstrings.",
    )
    p.add_argument("--model", required=True, help="mlakit checkpoint dir, HF dir, .gguf, alias or hub id")
    p.add_argument("--reference", default=None, help="the original model to compare against")
    p.add_argument(
        "--text", nargs="+", default=None, metavar="FILE", help="evaluate on these text files or directories"
    )
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument(
        "--lengths", type=int, nargs="+", default=None, metavar="N", help="context lengths (default 512 4096)"
    )
    lengths.add_argument("--seq-len", type=int, default=None, metavar="N", help="one context length (--lengths N)")
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help="windows per genre at every length (default 2 at 512, max(1, 1024 // N) at length N)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=tuple(FLOAT_DTYPES),
        default="bf16",
        help="dtype for KV bytes per token (default bf16)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(r: dict[str, Any]) -> list[str]:
    """One line per (length, genre) and an ``overall`` line per length."""
    ref = r["reference"] is not None
    head = f"{'length':>6}  {'genre':<18} {'windows':>7} {'tokens':>7} {'ppl':>9}"
    if ref:
        head += f" {'ref ppl':>9} {'ratio':>7} {'top-1':>6} {'KL':>7}"
    lines = [head]
    for length, entry in r["lengths"].items():
        rows = list(entry["genres"].items())
        if len(rows) > 1:
            rows.append(("overall", entry["overall"]))
        for genre, s in rows:
            line = f"{length:>6}  {genre:<18} {s['windows']:>7} {s['tokens']:>7} {s['perplexity']:>9.3f}"
            if ref:
                line += (
                    f" {_num(s['reference_perplexity'], '9.3f')} {_num(s['perplexity_ratio'], '7.3f')}"
                    f" {_num(s['top1_agreement'], '6.3f')} {_num(s['kl'], '7.4f')}"
                )
            lines.append(line)
    chats = [(n, e["chat"]) for n, e in r["lengths"].items() if "chat" in e]
    if chats:
        lines.append("")
        for n, c in chats:
            line = (
                f"chat @{n}: answers {c['answers']} of {c['requests']} requests (p end of turn {c['end_of_turn']:.3f})"
            )
            if "reference_answers" in c:
                line += f"; reference {c['reference_answers']} of {c['requests']} ({c['reference_end_of_turn']:.3f})"
            lines.append(line)
    return lines


def run(args: argparse.Namespace) -> int:
    from mlakit.eval.run import evaluate_paths

    r = evaluate_paths(
        args.model,
        reference=args.reference,
        texts=args.text,
        lengths=args.lengths,
        windows=args.windows,
        seq_len=args.seq_len,
        cache_dtype=args.cache_dtype,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"model:      {r['model']}")
    if r["reference"]:
        print(f"reference:  {r['reference']}")
    print(f"text:       {r['text']}")
    kv = f"{r['kv_bytes_per_token']} bytes/token ({r['cache_dtype']})"
    if r["reference"]:
        kv += f", reference {r['reference_kv_bytes_per_token']}: {r['kv_fraction']:.3f} of the cache"
    print(f"KV cache:   {kv}")
    print()
    print("\n".join(table(r)))
    if r["reference"]:
        print("ratio = perplexity / reference perplexity; top-1 = argmax agreement; KL(reference || model), nats/token")
    if any("chat" in e for e in r["lengths"].values()):
        print(
            "chat: each genre's first window (two genres at 4096 tokens) framed as a request through the chat "
            "template; answers = the most likely first token is not the end of the turn"
        )
    return 0
