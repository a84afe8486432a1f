"""The latent-size study: held-out loss against KV-cache bytes per token, MLA vs MHA/GQA/MQA.

Every variant shares the trunk (a :data:`~mlakit.train.presets.TRAIN_SIZES` entry), the
tokenizer, the training tokens in the same order, the optimizer schedule and the number of
steps; only the attention differs. MLA runs at several ``kv_lora_rank`` values, so its cache
(``kv_lora_rank + qk_rope_head_dim`` values per token per layer) can be compared at equal bytes
with GQA (``2 n_kv d_h``) and MQA (``2 d_h``).

Results are appended to ``OUT/study.json`` after each variant (a killed study resumes and skips
finished variants); :func:`write_report` turns them into a markdown table and a plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlakit.config import AttentionKind
from mlakit.errors import MlakitError
from mlakit.io import read_json_object, write_file, write_json, write_text
from mlakit.text.tokenizer import ByteTokenizer, Tokenizer
from mlakit.train.data import TokenDataset, build_token_file
from mlakit.train.presets import TRAIN_SIZES, training_config
from mlakit.train.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

CACHE_BYTES_PER_VALUE = 2  # bf16 cache
NOISE = 0.02  # nats: differences below this are called ties in the findings


@dataclass(frozen=True)
class StudyVariant:
    """One attention configuration of the study."""

    attention: AttentionKind
    kv_lora_rank: int | None = None
    num_kv_heads: int | None = None

    @property
    def label(self) -> str:
        if self.attention == "mla":
            return f"mla-r{self.kv_lora_rank}"
        if self.attention == "gqa":
            return f"gqa-g{self.num_kv_heads}" if self.num_kv_heads else "gqa"
        return self.attention

    @staticmethod
    def parse(spec: str) -> StudyVariant:
        """``mha``, ``mqa``, ``gqa`` / ``gqa:G`` (kv heads), ``mla:R`` (latent width)."""
        kind, _, arg = spec.partition(":")
        try:
            if kind == "mla":
                return StudyVariant("mla", kv_lora_rank=int(arg))
            if kind == "gqa":
                return StudyVariant("gqa", num_kv_heads=int(arg) if arg else None)
            if kind in ("mha", "mqa") and not arg:
                return StudyVariant(kind)  # type: ignore[arg-type]
        except ValueError:
            pass
        raise MlakitError(f"study variant {spec!r}: expected mha, mqa, gqa[:KV_HEADS] or mla:RANK")


DEFAULT_VARIANTS: tuple[str, ...] = ("mha", "gqa:2", "mqa", "mla:120", "mla:56", "mla:24", "mla:8", "mla:2")


@dataclass(frozen=True)
class StudyConfig:
    """What the study trains; every variant gets the same ``train`` settings and data.

    Attributes:
        size: trunk name in :data:`TRAIN_SIZES`.
        variants: attention variants (see :meth:`StudyVariant.parse`).
        train: steps, batch, schedule (checkpointing is switched off for study runs).
    """

    size: str = "tiny"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            seq_len=256,
            batch_size=16,
            max_steps=600,
            lr=3e-3,
            warmup_steps=50,
            eval_interval=0,
            eval_windows=64,
            checkpoint_interval=0,
        )
    )

    def __post_init__(self) -> None:
        if self.size not in TRAIN_SIZES:
            raise ValueError(f"StudyConfig.size={self.size!r} is invalid: one of {', '.join(TRAIN_SIZES)}")
        if not self.variants:
            raise ValueError("StudyConfig.variants is empty: give at least one variant")
        object.__setattr__(self, "variants", tuple(self.variants))
        for v in self.variants:
            StudyVariant.parse(v)

    def key(self) -> dict[str, Any]:
        """What must match for a stored result to be reused."""
        return {"size": self.size, "train": self.train.to_dict()}


def run_study(
    config: StudyConfig,
    out_dir: str | os.PathLike[str],
    *,
    train_docs: Sequence[tuple[str, str]] | None = None,
    eval_docs: Sequence[tuple[str, str]] | None = None,
    tokenizer: Tokenizer | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train every variant and return one row per variant (also kept in ``OUT/study.json``).

    ``train_docs``/``eval_docs`` default to the two sides of the built-in corpus's python-docs
    genre (:func:`mlakit.text.corpus.genre_corpora`); the tokenizer defaults to bytes.
    """
    from mlakit.text.corpus import default_corpus, genre_corpora

    def python_docs(split: Any) -> Any:
        # the published study runs on one genre (python3-doc), not the whole mix
        genres = genre_corpora(split)
        return (genres.get("python-docs") or default_corpus(split)).documents

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or ByteTokenizer()
    train_docs = train_docs if train_docs is not None else python_docs("calibration")
    eval_docs = eval_docs if eval_docs is not None else python_docs("evaluation")
    train = build_token_file(train_docs, tok, out / "train.bin")
    val = build_token_file(eval_docs, tok, out / "eval.bin")
    results_path = out / "study.json"
    stored: dict[str, Any] = read_json_object(results_path) if results_path.is_file() else {}
    if stored.get("key") != _key(config, train, val):
        stored = {"key": _key(config, train, val), "rows": {}}
    for spec in config.variants:
        variant = StudyVariant.parse(spec)
        if variant.label in stored["rows"]:
            logger.info("%s: already done, reusing", variant.label)
            continue
        stored["rows"][variant.label] = _run_one(config, variant, train, val, out, progress)
        write_json(results_path, stored)
    return [stored["rows"][StudyVariant.parse(s).label] for s in config.variants]


def _key(config: StudyConfig, train: TokenDataset, val: TokenDataset) -> dict[str, Any]:
    return config.key() | {"train_data": train.fingerprint, "eval_data": val.fingerprint}


def _run_one(
    config: StudyConfig, variant: StudyVariant, train: TokenDataset, val: TokenDataset, out: Path, progress: bool
) -> dict[str, Any]:
    model_config = training_config(
        config.size,
        variant.attention,
        vocab_size=train.vocab_size,
        max_seq_len=config.train.seq_len,
        kv_lora_rank=variant.kv_lora_rank,
        num_kv_heads=variant.num_kv_heads,
    )
    train_config = dataclasses.replace(config.train, checkpoint_interval=0)
    trainer = Trainer(model_config, train_config, train, out / "runs" / variant.label, val_data=val, progress=progress)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    values = model_config.layer_attention(0).cache_elements_per_token()
    tail = [loss for _, loss in result.losses[-10:]]
    row = {
        "variant": variant.label,
        "attention": variant.attention,
        "kv_lora_rank": variant.kv_lora_rank,
        "num_kv_heads": getattr(model_config.attention, "num_kv_heads", None),
        "kv_values_per_token_per_layer": values,
        "kv_bytes_per_token": model_config.cache_elements_per_token() * CACHE_BYTES_PER_VALUE,
        "parameters": trainer.model.num_parameters(),
        "eval_loss": result.final_eval_loss,
        "train_loss": sum(tail) / len(tail),
        "tokens": result.step * config.train.batch_size * config.train.seq_len,
        "seconds": seconds,
    }
    logger.info("%s: held-out loss %.4f, %d B/token", variant.label, row["eval_loss"], row["kv_bytes_per_token"])
    return row


# -- report ----------------------------------------------------------------------------------------


def _findings(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language answers computed from the rows."""
    mla = sorted((r for r in rows if r["attention"] == "mla"), key=lambda r: -r["kv_bytes_per_token"])
    base = [r for r in rows if r["attention"] != "mla"]
    lines = []
    for b in sorted(base, key=lambda r: -r["kv_bytes_per_token"]):
        same = [m for m in mla if m["kv_bytes_per_token"] == b["kv_bytes_per_token"]]
        if same:
            m = same[0]
            d = m["eval_loss"] - b["eval_loss"]
            verdict = "better than" if d < -NOISE else "worse than" if d > NOISE else "on par with"
            lines.append(
                f"At {b['kv_bytes_per_token']} B/token (equal cache), {m['variant']} reaches {m['eval_loss']:.3f} "
                f"vs {b['variant']} {b['eval_loss']:.3f} ({d:+.3f} nats): MLA is {verdict} {b['attention'].upper()}."
            )
        else:
            cheaper = [m for m in mla if m["kv_bytes_per_token"] <= b["kv_bytes_per_token"]]
            if cheaper:
                m = min(cheaper, key=lambda r: r["eval_loss"])
                lines.append(
                    f"{b['variant']} ({b['kv_bytes_per_token']} B/token, loss {b['eval_loss']:.3f}): the best MLA at "
                    f"no more bytes is {m['variant']} ({m['kv_bytes_per_token']} B/token, loss {m['eval_loss']:.3f})."
                )
    if mla:
        best = min(mla, key=lambda r: r["eval_loss"])
        spread = ", ".join(f"r={m['kv_lora_rank']} {m['eval_loss'] - best['eval_loss']:+.3f}" for m in mla)
        lines.append(
            f"Best MLA: kv_lora_rank={best['kv_lora_rank']} ({best['kv_bytes_per_token']} B/token, loss "
            f"{best['eval_loss']:.3f}); relative to it: {spread} nats."
        )
        falls = [
            m
            for m in mla
            if m["kv_bytes_per_token"] < best["kv_bytes_per_token"] and m["eval_loss"] > best["eval_loss"] + NOISE
        ]
        if falls:
            first = max(falls, key=lambda r: r["kv_bytes_per_token"])
            lines.append(
                f"Quality starts to fall below kv_lora_rank={best['kv_lora_rank']}: kv_lora_rank="
                f"{first['kv_lora_rank']} ({first['kv_bytes_per_token']} B/token) loses "
                f"{first['eval_loss'] - best['eval_loss']:+.3f} nats."
            )
        else:
            lines.append(
                f"No rank tried below the best hurt: the fall lies below kv_lora_rank={mla[-1]['kv_lora_rank']}."
            )
    return lines


def write_report(
    rows: list[dict[str, Any]], docs_dir: str | os.PathLike[str], config: StudyConfig, *, command: str, machine: str
) -> tuple[Path, Path | None]:
    """Write ``study.md`` (table, findings, how it was run) and ``study.png`` (if matplotlib is there)."""
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    s = TRAIN_SIZES[config.size]
    t = config.train
    table = [
        "| variant | KV values/token/layer | KV bytes/token (bf16, all layers) | params | held-out loss (nats/byte) "
        "| bits/byte | train loss (last 10 steps) | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (-r["kv_bytes_per_token"], r["attention"] != "mla")):
        table.append(
            f"| {r['variant']} | {r['kv_values_per_token_per_layer']} | {r['kv_bytes_per_token']} "
            f"| {r['parameters'] / 1e6:.2f}M | {r['eval_loss']:.4f} | {r['eval_loss'] / math.log(2):.3f} "
            f"| {r['train_loss']:.4f} | {r['seconds']:.0f} |"
        )
    tokens = rows[0]["tokens"] if rows else 0
    md = [
        "# Latent-size study: held-out loss vs KV-cache bytes",
        "",
        "Generated by `mlakit study` (mlakit/train/study.py); numbers from one run, one seed.",
        "",
        "## Setup",
        "",
        f"- trunk `{config.size}`: hidden {s.hidden_size}, {s.num_layers} layers, {s.num_heads} heads of "
        f"d_h={s.head_dim}, SwiGLU {s.intermediate_size}; byte-level tokens (vocabulary 256).",
        f"- MLA: qk_nope_head_dim = v_head_dim = {s.head_dim}, qk_rope_head_dim = {s.head_dim // 2}, "
        "no query compression; cache = kv_lora_rank + qk_rope_head_dim values per token per layer.",
        f"- every variant: {t.max_steps} steps x {t.batch_size} x {t.seq_len} tokens = {tokens:,} tokens, same order; "
        f"AdamW lr {t.lr} (warmup {t.warmup_steps}, cosine to {t.lr * t.min_lr_ratio:g}), clip {t.grad_clip}, fp32.",
        "- training text: the calibration side of mlakit's built-in corpus (python3-doc reST sources); held-out: "
        f"the evaluation side (disjoint documents), first {t.eval_windows} windows of {t.seq_len}.",
        f"- machine: {machine}",
        f"- command: `{command}`",
        "",
        "## Results",
        "",
        *table,
        "",
        "![held-out loss vs KV bytes per token](study.png)",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in _findings(rows)],
        "",
        f"Caveat: tiny models, {tokens / 1e6:.1f}M tokens each, one seed; differences below ~{NOISE} nats are "
        "called ties above, and the spread between neighbouring MLA ranks shows how large run-to-run noise is.",
        "",
    ]
    md_path = docs / "study.md"
    write_text(md_path, "\n".join(md))
    return md_path, _plot(rows, docs / "study.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mla = sorted((r for r in rows if r["attention"] == "mla"), key=lambda r: r["kv_bytes_per_token"])
    if mla:
        ax.plot([r["kv_bytes_per_token"] for r in mla], [r["eval_loss"] for r in mla], "o-", label="MLA")
        for r in mla:
            ax.annotate(
                f"r={r['kv_lora_rank']}",
                (r["kv_bytes_per_token"], r["eval_loss"]),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, 4),
            )
    markers = {"mha": "s", "gqa": "^", "mqa": "v"}
    for r in rows:
        if r["attention"] != "mla":
            ax.plot(
                r["kv_bytes_per_token"],
                r["eval_loss"],
                markers[r["attention"]],
                markersize=9,
                label=r["variant"].upper(),
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token (bf16, all layers)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("Quality vs cache size at equal training tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_file(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path
