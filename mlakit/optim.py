"""Optimisation pieces shared by training, distillation and healing.

``adamw`` and ``cosine_lr`` are the optimizer and schedule of :mod:`mlakit.train.trainer`;
:func:`fit_to_teacher` is the teacher-student loop of ``mlakit distill``
(:mod:`mlakit.train.distill`) and of the end-to-end phase of ``mlakit heal``
(:mod:`mlakit.convert.heal`), which sits below ``train`` in the package layers and so cannot
import it. Shapes: B windows per step, T tokens per window, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

TrainParams = Literal["attention", "all"]


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


def bf16_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Autocast of matmuls to bfloat16 on ``device`` when ``enabled`` (weights, optimizer state and
    anything computed outside stay fp32); the one switch training, distillation and healing share."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup to ``lr``, cosine to ``lr * min_lr_ratio``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    low = lr * min_lr_ratio
    return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tokens: torch.Tensor,
    alpha: float,
    temperature: float,
    last_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, lm)`` for logits ``student, teacher [B, T, V]`` of ``tokens [B, T]``.

    ``kl`` is ``T^2 KL(teacher || student)`` per token over all T positions; ``lm`` is the
    next-token cross entropy over positions ``0..T-2``. ``last_weight [B]`` (optional) adds each
    window's last-position KL to the loss with that weight, in units of the mean per-token KL
    (weight ``w`` counts the position as ``1 + w T`` tokens); ``kl`` is reported without it.
    """
    s = student.float()
    log_p_s = F.log_softmax(s / temperature, dim=-1)  # [B, T, V]
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # [B, T, V]
    kl = F.kl_div(log_p_s.flatten(0, 1), log_p_t.flatten(0, 1), log_target=True, reduction="batchmean")
    kl = kl * temperature**2
    lm = F.cross_entropy(s[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss = alpha * kl + (1 - alpha) * lm
    if last_weight is not None and bool((last_weight != 0).any()):
        last = (log_p_t[:, -1].exp() * (log_p_t[:, -1] - log_p_s[:, -1])).sum(-1) * temperature**2  # [B]
        loss = loss + alpha * (last_weight.to(last) * last).mean()
    return loss, kl.detach(), lm.detach()


def trainable(model: nn.Module, which: TrainParams) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` by ``which`` (``attention``: parameters of ``.attn.`` modules) and return
    the trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or ".attn." in name)
    return [p for p in model.parameters() if p.requires_grad]


def fit_to_teacher(
    model: nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    c: DistillConfig,
    *,
    params: Sequence[nn.Parameter] | None = None,
    last_weights: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "distill",
) -> tuple[int, float, list[tuple[int, float, float, float]]]:
    """Train ``model`` in place towards ``teacher``'s logits on ``windows [N, T]`` (token ids).

    The loop of :func:`distill` (also the end-to-end phase of :func:`mlakit.convert.heal.heal`):
    ``c.steps`` AdamW steps of ``c.batch_size`` windows in a seeded random order, cycling when
    they run out; ``teacher(tokens [b, T]) -> logits [b, T, V]`` runs without gradients. Only
    ``params`` train (default: ``c.train_params``); every parameter's ``requires_grad`` is
    restored afterwards. The loss is :func:`distill_loss` (``alpha`` KL + ``(1 - alpha)`` LM);
    ``last_weights [N]`` (optional) weighs each window's last position on top (its ``last_weight``).

    Returns:
        ``(steps done, seconds, losses)``, ``losses`` one ``(step, loss, kl, lm)`` per step.
    """
    from tqdm.auto import tqdm

    flags = [p.requires_grad for p in model.parameters()]
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(c.seed))
    if params is None:
        params = trainable(model, c.train_params)
    else:
        chosen = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    optimizer = adamw(model, c.lr, (0.9, 0.95), c.weight_decay)
    micro = c.micro_batch_size or c.batch_size
    n_micro = c.batch_size // micro
    device = next(model.parameters()).device
    autocast = bf16_autocast(device, c.bf16)
    losses: list[tuple[int, float, float, float]] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=c.steps, disable=not progress, desc=desc, unit="step", leave=False)
    was_training = model.training
    model.train()
    try:
        while step < c.steps:
            if c.max_minutes is not None and time.perf_counter() - start > 60 * c.max_minutes:
                logger.info("stopping after %.1f minutes (max_minutes)", c.max_minutes)
                break
            first = (step * c.batch_size) % (len(windows) - c.batch_size + 1)
            rows = order[first : first + c.batch_size]
            batch = windows[rows]  # [B, T]
            weights = last_weights[rows].split(micro) if last_weights is not None else (None,) * n_micro
            totals = torch.zeros(3)
            for chunk, weight in zip(batch.split(micro), weights, strict=True):
                with torch.no_grad(), autocast:
                    t_logits = teacher(chunk)
                with autocast:
                    s_logits = model(chunk)
                loss, kl, lm = distill_loss(s_logits, t_logits, chunk, c.alpha, c.temperature, weight)
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
                loss=f"{loss_v:.3f}", kl=f"{kl_v:.3f}", tok_s=f"{step * c.batch_size * windows.shape[1] / elapsed:.0f}"
            )
    finally:
        bar.close()
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return step, time.perf_counter() - start, losses
