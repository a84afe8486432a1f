"""``mlakit export-hf`` and ``mlakit import-hf``: the DeepSeek-V3 Hugging Face layout out and in."""

from __future__ import annotations

import argparse
from typing import Any

from mlakit.interop.engines import TARGETS
from mlakit.units import format_bytes, parse_bytes

EXPORT_EPILOG = """\
The output directory is the DeepSeek-V3 Hugging Face layout: config.json (model_type deepseek_v3,
dense MLP in every layer, rope_interleave true), safetensors weights, generation_config.json, the
source's tokenizer files, and a README.md saying which engines load it (transformers, vLLM CPU and
GPU backends, SGLang, FlashMLA: one table, mlakit.interop.engines) and what its cache costs.

Engines' MLA kernels take few cached widths kv_lora_rank + qk_rope_head_dim: 576 = 512 + 64 (FlashMLA,
vLLM's CPU backend), 320/512/576 (vLLM's other GPU backends). transformers takes any. A converted
model is narrower (SmolLM2 at 50%: 144 + 48); --pad-to 576 widens it exactly: zero latent rows, zero
rotary pairs with rope_theta moved so every frequency is kept, queries rescaled for the wider head's
softmax scale. Same logits; the cache grows to 576 values per token and layer (printed).
  mlakit export-hf runs/smollm2-mla50 OUT --pad-to 576 --dtype bf16 --target vllm

Not carried over: the quantized cache (a runtime choice) and per-layer latent ranks (padded to
the largest, exactly). Full-RoPE MLA and MHA/GQA models cannot be exported (convert them first).

Converted models (kv_norm=False, a linear latent) export without biases, for all three engines:
the latent rows are scaled by a tiny power of two s so that kv_a_layernorm's eps dominates and the
norm acts linearly; kv_b_proj undoes the scale. Relative error per token <= s^2 B^2 / (2 R eps)
<= 1e-5 (B bounds the latent's norm; bound and fp32 measurement are written to config.json under
mlakit_export). These exports write rms_norm_eps 1e-6, the latent norm's eps in transformers, which
also applies to the other norms (SmolLM2's is 1e-5: a small change, noted). fp16 cannot hold the
scaled rows: use bf16 or fp32. See docs/serving.md.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write an mlakit MLA model as a DeepSeek-V3 Hugging Face checkpoint (vLLM/SGLang/transformers)",
        description="Write an mlakit MLA checkpoint as a DeepSeek-V3 Hugging Face directory. The directory is "
        "written under a temporary name and renamed when complete.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="mlakit checkpoint directory (config.json + model.safetensors)")
    p.add_argument("out", metavar="OUT", help="directory to create")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MiB (default 5GB)"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="weight dtype (default: as stored)")
    p.add_argument(
        "--allow-bias",
        action="store_true",
        help="permit attention_bias=true, needed when an attention bias is non-zero (e.g. a model converted "
        "from Qwen2): exact in transformers, but vLLM and SGLang ignore these biases",
    )
    p.add_argument(
        "--pad-to",
        type=int,
        default=None,
        metavar="N",
        help="widen the cached kv_lora_rank + qk_rope_head_dim to N values exactly (576 = 512 + 64 for "
        "FlashMLA and vLLM's CPU backend, 320 for some vLLM GPU backends; N >= the model's own width)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        choices=list(TARGETS),
        metavar="ENGINE",
        help=f"refuse (before writing) unless the export loads in ENGINE; repeatable. One of: {', '.join(TARGETS)} "
        "(vllm: its CPU backend and FlashMLA, i.e. 512 + 64)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_export)

    q = sub.add_parser(
        "import-hf",
        help="read a dense DeepSeek-V2/V3 Hugging Face checkpoint into an mlakit checkpoint",
        description="Convert a dense DeepSeek-V2/V3 Hugging Face checkpoint (safetensors, single or sharded) into "
        "an mlakit checkpoint directory; RoPE rows are brought from interleaved into mlakit's halves order. "
        "Mixture-of-experts layers, FP8-quantised weights and non-DeepSeek models are refused.",
        epilog="Python: mlakit.interop.load_hf(DIR) loads such a directory directly as a Transformer.",
    )
    q.add_argument("src", metavar="SRC", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    q.add_argument("out", metavar="OUT", help="mlakit checkpoint directory to create")
    q.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="weight dtype (default: as stored)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    from mlakit.interop import export_hf

    report = export_hf(
        args.src,
        args.out,
        max_shard_size=parse_bytes(args.max_shard_size),
        dtype=args.dtype,
        allow_bias=args.allow_bias,
        pad_to=args.pad_to,
        targets=tuple(args.target),
        overwrite=args.overwrite,
        progress=None,
    )
    print(f"wrote {report.directory}: {len(report.files)} files, {format_bytes(report.total_bytes)} of weights")
    # report.notes were logged as warnings by the library
    if report.measured_rel_error or report.error_bound:
        print(
            f"  latent relative error: bound {report.error_bound:.2e}, measured (fp32) {report.measured_rel_error:.2e}"
        )
    if report.cache is not None:
        for line in report.cache.lines():
            print(f"  {line}")
    loads = [name for name, why in report.engines if why is None]
    print(f"  loads in: {', '.join(loads)}")
    for name, why in report.engines:
        if why is not None:
            print(f"  not {name}: {why}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from mlakit.interop import import_hf

    out = import_hf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
