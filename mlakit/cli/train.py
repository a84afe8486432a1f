"""``mlakit train`` / ``distill`` / ``study``: thin wrappers over :mod:`mlakit.train`.

``mlakit train`` runs data-parallel unchanged under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from mlakit.config import ATTENTION_KINDS
from mlakit.errors import MlakitError


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(sub: Any) -> None:
    from mlakit.train.presets import TRAIN_SIZES

    p = sub.add_parser(
        "train",
        help="train a small decoder LM from scratch (MLA, MHA, GQA or MQA)",
        description="Train a decoder LM from scratch on text files. Resumable: rerunning with the same --out "
        "continues from the latest checkpoint. Data-parallel under `torchrun --nproc_per_node N mlakit train ...`.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training text files or directories")
    p.add_argument(
        "--val-data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out text (default: the last --val-fraction of --data)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of --data (default 0.05)")
    p.add_argument("--out", required=True, help="run directory (token files, checkpoints, metrics.jsonl)")
    p.add_argument("--attention", choices=ATTENTION_KINDS, default="mla")
    p.add_argument("--size", choices=tuple(TRAIN_SIZES), default="3m", help="model trunk (default 3m)")
    p.add_argument("--kv-lora-rank", type=int, default=None, help="MLA latent width (default 4 * head_dim)")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default heads / 2)")
    p.add_argument("--tokenizer", default="byte", help="'byte', 'smollm2' (from its GGUF), a .gguf or a directory")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences (all processes)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-process forward batch (accumulates)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--recompute-kv", action="store_true", help="MLA latent recomputation (less activation memory)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--checkpoint-interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    p.set_defaults(func=run_train)

    d = sub.add_parser(
        "distill",
        help="fine-tune a converted MLA model towards the original (KL + LM loss)",
        description="Short distillation of a converted model: KL to the teacher's logits plus LM loss on text that "
        "is not the evaluation text; prints perplexity before and after.",
    )
    d.add_argument("--teacher", required=True, help="original model: alias (smollm2-135m), .gguf, HF or mlakit dir")
    d.add_argument("--student", required=True, help="converted mlakit checkpoint (mlakit convert)")
    d.add_argument("--out", required=True, help="directory for the distilled checkpoint")
    d.add_argument("--text", nargs="+", default=None, help="training text files (default: calibration corpus)")
    d.add_argument("--eval-text", nargs="+", default=None, help="evaluation text files (default: evaluation corpus)")
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--micro-batch-size", type=int, default=None)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--lr", type=float, default=5e-5)
    d.add_argument("--alpha", type=float, default=0.8, help="KL weight; 1 - alpha weighs the LM loss")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--train-params", choices=("attention", "all"), default="attention")
    d.add_argument("--bf16", action="store_true")
    d.add_argument("--eval-windows", type=int, default=8)
    d.add_argument("--eval-seq-len", type=int, default=512)
    d.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_distill)

    s = sub.add_parser(
        "study",
        help="latent-size study: held-out loss vs KV bytes for MHA/GQA/MQA/MLA",
        description="Train one small model per attention variant on the same tokens and report held-out loss "
        "against KV-cache bytes per token (docs/study.md + docs/study.png). Resumable.",
    )
    s.add_argument("--out", default="runs/study", help="work directory (token files, runs, study.json)")
    s.add_argument("--docs", default="docs", help="where study.md and study.png go")
    s.add_argument("--size", choices=tuple(TRAIN_SIZES), default="tiny")
    s.add_argument("--variants", nargs="+", default=None, help="e.g. mha gqa:2 mqa mla:48 mla:16")
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(func=run_study)


def run_train(args: argparse.Namespace) -> int:
    _threads(args)
    from mlakit.train import TrainConfig, Trainer, build_token_file, load_tokenizer, training_config
    from mlakit.train.data import read_text_files, split_documents
    from mlakit.train.trainer import init_distributed

    info = init_distributed()
    out = Path(args.out)
    tokenizer = load_tokenizer(args.tokenizer)
    docs = read_text_files(args.data)
    if args.val_data:
        train_docs, val_docs = docs, read_text_files(args.val_data)
    else:
        train_docs, val_docs = split_documents(docs, args.val_fraction)
    if info.is_main:  # one process tokenizes; the others wait, then open the same files
        build_token_file(train_docs, tokenizer, out / "data" / "train.bin")
        build_token_file(val_docs, tokenizer, out / "data" / "val.bin")
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    from mlakit.train.data import TokenDataset

    train, val = TokenDataset(out / "data" / "train.bin"), TokenDataset(out / "data" / "val.bin")
    model_config = training_config(
        args.size,
        args.attention,
        vocab_size=tokenizer.vocab_size,
        max_seq_len=args.seq_len,
        kv_lora_rank=args.kv_lora_rank,
        num_kv_heads=args.kv_heads,
    )
    config = TrainConfig(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        bf16=args.bf16,
        recompute_kv=args.recompute_kv,
        eval_interval=args.eval_interval,
        eval_windows=args.eval_windows,
        checkpoint_interval=args.checkpoint_interval,
        seed=args.seed,
    )
    trainer = Trainer(model_config, config, train, out, val_data=val, dist_info=info, progress=True)
    if trainer.latest_checkpoint() is not None and args.no_resume:
        raise MlakitError(f"{out} already holds a run; remove --no-resume to continue it or use a new --out")
    resumed = trainer.resume()
    if info.is_main:
        print(
            f"{model_config.name}: {trainer.model.num_parameters():,} parameters, "
            f"{len(train):,} training tokens, {info.world_size} process(es)"
            + (f", resuming at step {trainer.step}" if resumed else "")
        )
    result = trainer.train()
    if info.is_main:
        val_loss = result.final_eval_loss
        print(f"step {result.step}: held-out loss {val_loss:.4f}" if val_loss is not None else f"step {result.step}")
        print(f"{result.tokens_per_s:,.0f} tokens/s; checkpoint: {result.checkpoint}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    _threads(args)
    from mlakit.train.distill import DistillConfig, distill

    config = DistillConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        alpha=args.alpha,
        temperature=args.temperature,
        train_params=args.train_params,
        bf16=args.bf16,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        max_minutes=args.max_minutes,
    )
    r = distill(
        args.teacher,
        args.student,
        args.out,
        config,
        texts=args.text,
        eval_texts=args.eval_text,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    ref = r.before["reference_perplexity"]
    print(
        f"teacher perplexity {ref:.3f}; KV {r.before['kv_bytes_per_token']} B/token "
        f"({100 * r.before['kv_fraction']:.0f}% of the teacher's)"
    )
    for label, e in (("before", r.before), ("after", r.after)):
        print(
            f"{label:>6}: perplexity {e['perplexity']:.3f} ({e['perplexity_ratio']:.3f}x teacher), "
            f"KL {e['kl']:.4f}, top-1 agreement {e['top1_agreement']:.3f}"
        )
    print(f"{r.steps} steps, {r.tokens:,} tokens, {r.seconds / 60:.1f} min; saved to {r.out}")
    return 0


def run_study(args: argparse.Namespace) -> int:
    _threads(args)
    import dataclasses

    import torch

    from mlakit.train.study import DEFAULT_VARIANTS, StudyConfig, write_report
    from mlakit.train.study import run_study as run

    base = StudyConfig()
    config = StudyConfig(
        size=args.size,
        variants=tuple(args.variants or DEFAULT_VARIANTS),
        train=dataclasses.replace(
            base.train, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr
        ),
    )
    rows = run(config, args.out, progress=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    md, png = write_report(rows, args.docs, config, command="mlakit " + shlex.join(sys.argv[1:]), machine=machine)
    for r in rows:
        print(f"{r['variant']:>10}: {r['kv_bytes_per_token']:>5} B/token  held-out loss {r['eval_loss']:.4f}")
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0
