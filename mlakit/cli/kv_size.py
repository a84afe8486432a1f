"""``mlakit kv-size``: KV-cache bytes of a model, MLA beside its MHA/GQA/MQA equivalents."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlakit.config import ModelConfig
from mlakit.dtypes import FLOAT_DTYPES
from mlakit.errors import MlakitError
from mlakit.kv import KVReport, kv_report
from mlakit.model import load_config
from mlakit.units import format_bytes, parse_bytes


def register(sub: Any) -> None:
    p = sub.add_parser(
        "kv-size",
        help="KV-cache size per token and in total; MLA vs MHA/GQA/MQA",
        description="Print the KV cache a model needs per token per layer and in total, MLA beside the "
        "MHA/GQA/MQA equivalents of the same model (DeepSeek-V2 Table 1), with compression ratios and "
        "how many tokens or sequences fit in a memory budget.",
        epilog=f"presets: {', '.join(ModelConfig.presets())}",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a named model config (default: deepseek-v3)")
    src.add_argument(
        "--config", default=None, metavar="DIR_OR_JSON", help="an mlakit checkpoint directory or its config.json"
    )
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--dtype", choices=tuple(FLOAT_DTYPES), default="bf16", help="cache dtype (default bf16)")
    p.add_argument("--memory", default=None, help="memory for the cache, e.g. 80GiB: report what fits")
    p.add_argument("--gqa-groups", type=int, default=None, help="KV groups of the GQA equivalent")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> ModelConfig:
    if args.config is None:
        return ModelConfig.from_preset(args.preset or "deepseek-v3")
    from pathlib import Path

    path = Path(args.config)
    return load_config(path.parent if path.name == "config.json" else path)


def run(args: argparse.Namespace) -> int:
    config = _load(args)
    memory = parse_bytes(args.memory) if args.memory is not None else None
    try:
        report = kv_report(config, args.seq_len, args.batch, args.dtype, memory, args.gqa_groups)
    except ValueError as e:
        raise MlakitError(str(e)) from e
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))
    return 0


def render(r: KVReport) -> str:
    lines = [
        f"{r.model}: {r.num_layers} layers, {r.batch} x {r.seq_len} tokens, {r.dtype} ({r.bytes_per_element} B/value)",
        "",
    ]
    head = f"{'attention':<46} {'values/tok/layer':>16} {'bytes/token':>12} {'total':>11} {'MHA/x':>7}"
    if r.memory is not None:
        head += f" {'tokens fit':>12} {'seqs fit':>9}"
    lines += [head, "-" * len(head)]
    for row in r.rows:
        mark = "*" if row.is_model else " "
        line = (
            f"{mark}{row.label:<45} {row.elements_per_token_per_layer:>16g} {format_bytes(row.bytes_per_token):>12}"
            f" {format_bytes(row.total_bytes):>11} {row.ratio_to_mha:>6.1f}x"
        )
        if r.memory is not None:
            line += f" {row.tokens_fit:>12,} {row.sequences_fit:>9,}"
        lines.append(line)
    mla = r.row("mla")
    per_layer = mla.elements_per_token_per_layer
    lines += [
        "",
        f"* this model's own attention. MLA caches {per_layer:g} values per token per layer"
        f" = {per_layer / r.head_dim:.3g} d_h, like GQA with {per_layer / (2 * r.head_dim):.3g} groups;"
        f" {mla.ratio_to_mha:.1f}x smaller than MHA.",
    ]
    if r.memory is not None:
        lines.append(f"memory budget: {format_bytes(r.memory)} (cache only; weights and activations excluded)")
    return "\n".join(lines)
