"""Distil a converted MLA model back towards its original: KL to the teacher's logits plus LM loss.

A conversion (``mlakit convert``) replaces each layer's K/V projections by a low-rank latent and
loses a little quality. A short fine-tune of the student on text the teacher scores recovers much
of it::

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, next token)

averaged over tokens. Training text is the calibration side of the built-in corpus (or the
user's files) — never the evaluation side — and perplexity is measured before and after on the
evaluation side with :func:`mlakit.eval.run.evaluate_models`, the same numbers ``mlakit eval`` prints.

By default only attention weights train (``train_params='attention'``): conversion changed only
those, and freezing the rest skips most weight gradients (the 49k x 576 head alone is a fifth of
SmolLM2-135M).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mlakit.errors import MlakitError
from mlakit.io import write_dir, write_json
from mlakit.model import Transformer, is_mlakit_checkpoint
from mlakit.text.corpus import Corpus, default_corpus, files_corpus, token_windows
from mlakit.train.trainer import adamw, cosine_lr

logger = logging.getLogger(__name__)

TrainParams = Literal["attention", "all"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class DistillConfig:
    """A short distillation run.

    Attributes:
        steps: optimizer steps (upper bound; ``max_minutes`` may stop earlier).
        batch_size, micro_batch_size: windows per step, and per forward (accumulated).
        seq_len: tokens per training window.
        lr, warmup_steps, min_lr_ratio, weight_decay, grad_clip: AdamW with warmup + cosine.
        alpha: weight of the KL term; ``1 - alpha`` weighs the LM loss.
        temperature: softening ``T`` of both distributions in the KL term.
        train_params: ``'attention'`` (only attention weights train) or ``'all'``.
        bf16: autocast matmuls to bfloat16.
        eval_windows, eval_seq_len: held-out evaluation before and after (windows per genre, tokens each).
        max_minutes: stop training after this wall time (``None``: run all steps).
        seed: data order.
    """

    steps: int = 100
    batch_size: int = 4
    micro_batch_size: int | None = None
    seq_len: int = 256
    lr: float = 5e-5
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    alpha: float = 0.8
    temperature: float = 1.0
    train_params: TrainParams = "attention"
    bf16: bool = False
    eval_windows: int = 2
    eval_seq_len: int = 512
    max_minutes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        o = "DistillConfig"
        for name in ("steps", "batch_size", "seq_len", "eval_windows", "eval_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{o}.{name}={v!r} is invalid: must be a positive integer")
        mb = self.micro_batch_size
        if mb is not None and (not isinstance(mb, int) or mb <= 0 or self.batch_size % mb):
            raise ValueError(f"{o}.micro_batch_size={mb!r} is invalid: must divide batch_size={self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"{o}.lr={self.lr!r} is invalid: must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"{o}.alpha={self.alpha!r} is invalid: must lie in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"{o}.temperature={self.temperature!r} is invalid: must be > 0")
        if self.train_params not in ("attention", "all"):
            raise ValueError(f"{o}.train_params={self.train_params!r} is invalid: 'attention' or 'all'")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"{o}.max_minutes={self.max_minutes!r} is invalid: must be > 0 or None")


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, lm)`` for logits ``student, teacher [B, T, V]`` of ``tokens [B, T]``.

    ``kl`` is ``T^2 KL(teacher || student)`` per token over all T positions; ``lm`` is the
    next-token cross entropy over positions ``0..T-2``.
    """
    s = student.float()
    log_p_s = F.log_softmax(s / temperature, dim=-1)  # [B, T, V]
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # [B, T, V]
    kl = F.kl_div(log_p_s.flatten(0, 1), log_p_t.flatten(0, 1), log_target=True, reduction="batchmean")
    kl = kl * temperature**2
    lm = F.cross_entropy(s[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return alpha * kl + (1 - alpha) * lm, kl.detach(), lm.detach()


@dataclass(frozen=True)
class DistillResult:
    """Before/after evaluation (dicts as :func:`mlakit.eval.run.evaluate_models` returns) and the run."""

    before: dict[str, Any]
    after: dict[str, Any]
    steps: int
    tokens: int
    seconds: float
    losses: tuple[tuple[int, float, float, float], ...]  # (step, loss, kl, lm)
    out: Path

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def _trainable(model: Transformer, which: TrainParams) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or ".attn." in name)
    return [p for p in model.parameters() if p.requires_grad]


def distill(
    teacher: str,
    student: str,
    out: str | os.PathLike[str],
    config: DistillConfig | None = None,
    *,
    texts: list[str] | None = None,
    eval_texts: list[str] | None = None,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DistillResult:
    """Fine-tune ``student`` (an mlakit checkpoint) towards ``teacher`` and save it to ``out``.

    Args:
        teacher: the original model: an mlakit checkpoint, HF directory, ``.gguf`` or alias
            (anything :func:`mlakit.eval.models.open_model` opens).
        student: the converted mlakit checkpoint directory.
        out: where the distilled checkpoint goes (written to a temporary name, then renamed).
        texts: training text files; default the calibration side of the built-in corpus.
        eval_texts: evaluation text files; default the evaluation side of the built-in corpus.
        tokenizer: overrides the checkpoints' tokenizer (called like a Hugging Face tokenizer).

    Raises:
        MlakitError: unreadable models, vocabularies that differ, no tokenizer, too little text,
            or ``out`` exists without ``overwrite``.
    """
    from tqdm.auto import tqdm

    from mlakit.eval.models import ScoredModel, open_model
    from mlakit.eval.run import evaluate_models

    c = config or DistillConfig()
    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise MlakitError(f"{out_dir} exists; pass --overwrite to replace it")
    if not is_mlakit_checkpoint(student):
        raise MlakitError(f"--student {student}: not an mlakit checkpoint (expected the output of mlakit convert)")
    train_corpus: Corpus = files_corpus(texts) if texts else default_corpus("calibration")
    eval_corpus: Corpus = files_corpus(eval_texts) if eval_texts else default_corpus("evaluation")
    teacher_m = open_model(teacher)
    student_m = open_model(student)
    if teacher_m.vocab_size != student_m.vocab_size:
        raise MlakitError(f"teacher vocabulary {teacher_m.vocab_size} != student vocabulary {student_m.vocab_size}")
    tokenizer = tokenizer or student_m.tokenizer or teacher_m.tokenizer
    if tokenizer is None:
        raise MlakitError("neither the teacher nor the student has a tokenizer")
    model = Transformer.from_pretrained(student)
    for name in ("seq_len", "eval_seq_len"):
        if getattr(c, name) > model.config.max_seq_len:
            raise MlakitError(
                f"--{name.replace('_', '-')} {getattr(c, name)} exceeds the student's context "
                f"({model.config.max_seq_len} tokens)"
            )
    scored = ScoredModel(
        logits=lambda t: model(t),
        tokenizer=tokenizer,
        kv_elements_per_token=model.config.cache_elements_per_token(),
        kind="mlakit",
        name=str(student),
        vocab_size=model.config.vocab_size,
        max_seq_len=model.config.max_seq_len,
    )

    def evaluate_now(label: str) -> dict[str, Any]:
        model.eval()
        return evaluate_models(
            scored, teacher_m, eval_corpus, windows=c.eval_windows, seq_len=c.eval_seq_len, progress=progress
        ) | {"label": label}

    before = evaluate_now("before")
    logger.info("before: perplexity %.3f (teacher %.3f)", before["perplexity"], before["reference_perplexity"])

    windows = token_windows(train_corpus, tokenizer, num_windows=c.steps * c.batch_size, seq_len=c.seq_len)
    if len(windows) < c.batch_size:
        raise MlakitError(f"{train_corpus.name}: {len(windows)} windows of {c.seq_len} tokens, fewer than one batch")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(c.seed))
    params = _trainable(model, c.train_params)
    optimizer = adamw(model, c.lr, (0.9, 0.95), c.weight_decay)
    micro = c.micro_batch_size or c.batch_size
    n_micro = c.batch_size // micro
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if c.bf16 else contextlib.nullcontext()
    losses: list[tuple[int, float, float, float]] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=c.steps, disable=not progress, desc="distill", unit="step")
    model.train()
    while step < c.steps:
        if c.max_minutes is not None and time.perf_counter() - start > 60 * c.max_minutes:
            logger.info("stopping after %.1f minutes (max_minutes)", c.max_minutes)
            break
        first = (step * c.batch_size) % (len(windows) - c.batch_size + 1)
        batch = windows[order[first : first + c.batch_size]]  # [B, T]
        totals = torch.zeros(3)
        for chunk in batch.split(micro):
            with torch.no_grad(), autocast:
                t_logits = teacher_m.logits(chunk)
            with autocast:
                s_logits = model(chunk)
            loss, kl, lm = distill_loss(s_logits, t_logits, chunk, c.alpha, c.temperature)
            (loss / n_micro).backward()
            totals += torch.stack((loss.detach(), kl, lm)) / n_micro
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, c.lr, c.warmup_steps, c.steps, c.min_lr_ratio)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_v, kl_v, lm_v = (float(x) for x in totals)
        losses.append((step, loss_v, kl_v, lm_v))
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(
            loss=f"{totals[0]:.3f}", kl=f"{totals[1]:.3f}", tok_s=f"{step * c.batch_size * c.seq_len / elapsed:.0f}"
        )
    bar.close()
    seconds = time.perf_counter() - start
    after = evaluate_now("after")
    logger.info("after: perplexity %.3f (teacher %.3f)", after["perplexity"], after["reference_perplexity"])
    result = DistillResult(before, after, step, step * c.batch_size * c.seq_len, seconds, tuple(losses), out_dir)
    _save(model, Path(student), out_dir, result, c, teacher)
    return result


def _save(model: Transformer, student: Path, out: Path, result: DistillResult, c: DistillConfig, teacher: str) -> None:
    """Write the distilled checkpoint (+ the student's tokenizer files, + distill.json) atomically."""
    record = {"teacher": teacher, "student": str(student), "config": dataclasses.asdict(c)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, metadata={"distillation": record})
        for name in TOKENIZER_FILES:
            if (student / name).is_file():
                shutil.copy2(student / name, tmp / name)
        write_json(tmp / "distill.json", result.to_dict() | record)

    write_dir(out, write, overwrite=True)  # distill() refused an existing out without --overwrite
