"""``mlakit convert``: turn a GQA model (Llama, Mistral, Qwen, Gemma) into an MLA checkpoint, training-free."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mlakit.cli import CALIBRATION_WINDOWS_HELP, CHAT_HELP, chat_share, device_arg
from mlakit.cli.heal import add_heal_options, heal_config
from mlakit.errors import MlakitError


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"ranks must be integers separated by commas, got {text!r}") from e


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3/SmolLM model (HF dir, GGUF, alias) to MLA",
        description="Convert a pretrained MHA/GQA model into a true MLA model without training: a "
        "calibrated low-rank latent replaces K and V, and the cache shrinks to --kv-fraction of the "
        "original, or to --kv-lora-rank R plus --rope-dim D values per token and layer. See docs/conversion.md.",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="HF model directory, .gguf file, alias (smollm2-135m, the default) or hub id",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--kv-fraction",
        type=float,
        default=0.5,
        help="cache bytes per token as a fraction of the original, in (0, 1] (default 0.5)",
    )
    budget.add_argument(
        "--kv-lora-rank",
        type=_positive,
        default=None,
        metavar="R",
        help="latent width of every layer, directly (DeepSeek's name; e.g. with --rope-dim: the cache holds "
        "R + D values per token and layer). Serving engines take 512 + 64: convert narrower and export with "
        "`mlakit export-hf --pad-to 576`",
    )
    budget.add_argument(
        "--ranks",
        type=_ranks,
        default=None,
        help="explicit kv_lora_rank per layer: one value, or one per layer (comma-separated)",
    )
    p.add_argument(
        "--rope",
        choices=("decoupled", "full"),
        default="decoupled",
        help="decoupled: DeepSeek form, shared rotary key, absorbed decode (default); "
        "full: latent before RoPE, exact positions, no absorption",
    )
    p.add_argument(
        "--method",
        choices=("pca", "svd"),
        default="pca",
        help="pca: calibrated, metric-weighted (default); svd: plain SVD of the weights (baseline)",
    )
    p.add_argument(
        "--rope-dim",
        "--rope-dims",
        dest="rope_dims",
        type=int,
        default=None,
        metavar="D",
        help="decoupled rotary key width qk_rope_head_dim: even, at most the source's head_dim (default: every "
        "frequency pair that turns by a radian or more over --context-length, at most half of a layer's cache); "
        "with --kv-fraction the latent gets the rest of the budget",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        metavar="L",
        help="decoupled: the context the converted model must hold, in tokens; picks the rotary pairs "
        "(default: the source's max_position_embeddings, at most 4096)",
    )
    p.add_argument(
        "--rope-mixing",
        choices=("complex", "real"),
        default="complex",
        help="decoupled: how each frequency's KV heads are mixed into the shared rotary key: complex "
        "(a rotation and scale per head, commutes with RoPE; default) or real (TransMLA's RoRoPE)",
    )
    p.add_argument(
        "--fold-qk-norm",
        action="store_true",
        help="decoupled, Qwen3/Gemma 3 sources: fold their per-head q/k norms into constant scales "
        "(an approximation measured to break Gemma 3 270M; refused without this flag; --rope full is exact)",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "greedy", "sensitivity"),
        default="uniform",
        help="rank allocation over layers: uniform (default), greedy (by calibrated spectra) or sensitivity (by "
        "the measured loss of converting each layer alone; better on SmolLM2 at both lengths, holds the whole "
        "model in float32 and adds minutes)",
    )
    p.add_argument(
        "--keep-first-wide",
        type=int,
        default=0,
        metavar="N",
        help="keep the first N layers at full latent rank; the others share the rest of the budget (default 0)",
    )
    p.add_argument(
        "--key-weight",
        type=float,
        default=None,
        metavar="W",
        help="how much more the keys weigh than the values in the joint latent, after balancing their "
        "energies (default 3, measured best on SmolLM2 for both RoPE forms)",
    )
    p.add_argument(
        "--key-share",
        type=float,
        default=None,
        metavar="S",
        help="separate K and V budgets: share S of every latent goes to the keys' own PCA, the rest to "
        "the values' (default: one joint K/V PCA decides)",
    )
    p.add_argument(
        "--sequential",
        choices=("auto", "on", "off"),
        default="auto",
        help="convert layer by layer on the converted model's own activations, regressing each layer's keys "
        "and values onto the original's (auto: on for --rope full, off for decoupled, as measured)",
    )
    p.add_argument(
        "--calibration-text",
        nargs="+",
        default=None,
        metavar="PATH",
        help="calibrate (and heal) on these UTF-8 text files or directories (default: the built-in genre mix "
        "of Python docs, manual pages, GNU info manuals and Debian policy/licence texts, calibration split)",
    )
    p.add_argument("--calibration-windows", type=int, default=32, help=CALIBRATION_WINDOWS_HELP)
    p.add_argument("--calibration-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--calibration-chat", type=chat_share, default=None, metavar="F", help=CHAT_HELP)
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weight dtype of the output (default auto: the source's, e.g. bf16 for published checkpoints)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the calibration forwards run: cpu, cuda, cuda:N (default auto: cuda when present); the "
        "conversion reads one layer at a time, so memory scales with one layer (docs/conversion.md)",
    )
    p.add_argument(
        "--heal",
        action="store_true",
        help="after converting, heal the model (what `mlakit heal` does; the --heal-* options tune it). Healing "
        "holds the whole source and the result in float32 (about 8 bytes per source parameter)",
    )
    add_heal_options(p, prefix="heal-")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlakit.config import RopeScaling
    from mlakit.convert import ConversionConfig, calibrate, convert_calibrated, load_hf_model, save_converted
    from mlakit.convert.heal import heal_recorded
    from mlakit.convert.load import source_directory
    from mlakit.convert.stream import convert_checkpoint
    from mlakit.dtypes import float_dtype
    from mlakit.rope import unscaled_rope_dim
    from mlakit.text.corpus import files_corpus

    if Path(args.out).exists() and not args.overwrite:
        raise MlakitError(f"--out {args.out} already exists; choose a new directory (or --overwrite)")
    if not 0 < args.kv_fraction <= 1:
        raise MlakitError(f"--kv-fraction {args.kv_fraction} must lie in (0, 1] (1 = the original cache size)")
    if args.rope == "full" and args.rope_dims is not None:
        raise MlakitError(
            f"--rope-dim {args.rope_dims} applies to --rope decoupled only: full RoPE rotates the whole "
            "decompressed key and caches no separate rotary key"
        )
    cfg = ConversionConfig(
        kv_fraction=args.kv_fraction,
        ranks=(args.kv_lora_rank,) if args.kv_lora_rank is not None else args.ranks,
        rope=args.rope,
        method=args.method,
        rope_dims=args.rope_dims,
        context_length=args.context_length,
        allocation=args.allocation,
        rope_mixing=args.rope_mixing,
        key_share=args.key_share,
        **({} if args.key_weight is None else {"key_weight": args.key_weight}),
        sequential={"auto": None, "on": True, "off": False}[args.sequential],
        keep_first_wide=args.keep_first_wide,
        fold_qk_norm=args.fold_qk_norm,
        calibration_windows=args.calibration_windows,
        calibration_seq_len=args.calibration_seq_len,
        calibration_chat=args.calibration_chat,
    )  # validated before the slow load
    hcfg = heal_config(args, prefix="heal-") if args.heal else None
    corpus = files_corpus(args.calibration_text) if args.calibration_text else None
    dtype = None if args.dtype == "auto" else float_dtype(args.dtype, "--dtype")
    device = device_arg(args.device)
    if hcfg is None and cfg.allocation != "sensitivity":  # layer by layer: memory for one layer of the source
        r = convert_checkpoint(
            source_directory(args.model),
            args.out,
            cfg,
            corpus=corpus,
            dtype=dtype,
            device=device,
            overwrite=args.overwrite,
            progress=True,
        )
        out = Path(args.out)
    else:
        loaded = load_hf_model(args.model)
        cal = calibrate(  # config: checked against the source before calibrating
            loaded,
            windows=args.calibration_windows,
            seq_len=args.calibration_seq_len,
            corpus=corpus,
            progress=True,
            config=cfg,
        )
        result = convert_calibrated(cal, cfg, progress=True)
        if hcfg is not None:
            heal_recorded(
                result.model,
                cal.loaded.model,
                cal.loaded.tokenizer,
                result.record,
                reference_name=str(args.model),
                config=hcfg,
                corpus=corpus,
                progress=True,
            )
        if dtype is not None:
            result.model.to(dtype)
        out = save_converted(result, args.out, overwrite=args.overwrite)
        r = result.record
    print(f"wrote {out}")
    seq = r["calibration"]["sequential_tokens"]
    print(
        f"  calibration text: {r['calibration']['corpus']} ({r['calibration']['tokens']} tokens"
        + (f"; sequential pass over the first {seq})" if seq else ")")
    )
    print(
        f"  cache: {r['cache_elements_per_token']} values/token vs {r['source_cache_elements_per_token']} "
        f"original ({r['kv_fraction_achieved']:.3f}); rope={cfg.rope}, qk_rope_head_dim={r['qk_rope_head_dim']}, "
        f"method={cfg.method}"
    )
    print(f"  kv_lora_ranks: {json.dumps(r['kv_lora_ranks'])}")
    if cfg.rope == "decoupled":
        width = max(r["kv_lora_ranks"]) + r["qk_rope_head_dim"]
        shape = f"{max(r['kv_lora_ranks'])} + {r['qk_rope_head_dim']} = {width} values/token/layer"
        scaling = r["rope_scaling"]
        if scaling is not None and scaling["type"] == "llama3":
            keep = unscaled_rope_dim(r["qk_rope_head_dim"], r["rope_theta"], RopeScaling(**scaling))
            print(
                f"  serve: caches {shape} with Llama 3's RoPE scaling, which vLLM and SGLang compute as DeepSeek's "
                f"YaRN: mlakit's engine and transformers serve it exactly; for vLLM convert with --rope-dim {keep}"
            )
        elif width <= 576 and r["qk_rope_head_dim"] <= 64:
            print(f"  serve: caches {shape}; vLLM and FlashMLA take 512 + 64: mlakit export-hf {out} OUT --pad-to 576")
        else:
            print(f"  serve: caches {shape}, wider than vLLM's 512 + 64: transformers only (mlakit export-hf)")
    if cfg.rope == "decoupled" and "heal" not in r:
        print(
            f"  next: mlakit heal --model {out} --out {out}-healed   (minutes; the decoupled form loses most "
            "at long context until healed, docs/conversion.md)"
        )
    if "heal" in r:
        h = r["heal"]
        b, a = h["relative_error_before"], h["relative_error_after"]
        print(
            f"  healed in {h['seconds']:.0f} s: relative attention error {sum(b) / len(b):.4f} -> "
            f"{sum(a) / len(a):.4f} (mean over layers)"
            + (
                f"; end to end, KL to the source {h['distill_kl_before_after'][0]:.4f} -> "
                f"{h['distill_kl_before_after'][1]:.4f}"
                if h.get("distill_kl_before_after")
                else ""
            )
        )
    return 0
