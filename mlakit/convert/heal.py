"""Heal a converted MLA model layer by layer: fit its attention to the original's, at length.

Between training-free conversion (closed-form, from second moments) and distillation (end-to-end
training of the whole model), healing is a cheap local fit. For layer ``l`` in order:

1. ``x_c``: the attention input that the converted model (layers ``0..l-1`` already healed)
   produces on calibration windows; ``y = Attn_orig,l(x_c)``: what the *original* attention
   layer computes from those same inputs.
2. A few hundred Adam steps on layer ``l``'s MLA weights (``w_q``, ``w_kr``, ``w_dkv``, ``w_uk``,
   ``w_uv``, ``w_o`` by default) minimise the relative error ``||MLA_l(x_c) - y||^2 / ||y||^2``
   over random query positions of long windows, so that the rotations the decoupled form drops
   (low-frequency RoPE pairs that barely move inside 512 tokens) are seen at the distances that
   matter.
3. The healed block advances ``x_c`` to layer ``l + 1``. A layer whose error on a fixed probe
   (the same query positions of every window) did not fall keeps its unhealed weights.

Then, end to end (``distill_steps``, default on): a short distillation of the same weights of
every layer together towards the reference's next-token distribution (KL only, AdamW, bf16 where
the CPU has bf16 arithmetic) on windows of ``distill_seq_len`` tokens. The local fits cannot see
how one layer's remaining error changes what later layers and the head make of it; a few dozen
end-to-end steps can (SmolLM2-135M at 25% cache: perplexity x2.68 | x3.15 at 512 | 4096 tokens
after the local fits alone, x1.65 | x1.87 with 24 end-to-end steps; docs/conversion.md "Healing").

Why local targets (the original layer applied to the converted inputs) and not the original
layer's output on the original inputs: the latter asks each layer to undo the drift upstream,
which for the decoupled form is large and position-dependent; regressing onto it shrinks keys
(measured for the closed-form sequential pass, docs/conversion.md). The shapes of the model do not
change: the cache, absorption and export work as before.

Cost per local step: the latent and rotary key of every position of one window (``T`` tokens)
and attention for ``Q`` sampled query positions against them (``O(Q T)``, not ``O(T^2)``). An
end-to-end step is a forward of both models and a backward of the converted one.

Shapes: N windows, T tokens per window, Q sampled query positions, n hidden size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlakit.attention.common import position_mask
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.errors import MlakitError
from mlakit.model import Block, Transformer
from mlakit.optim import DistillConfig, bf16_autocast, distill_loss, fit_to_teacher
from mlakit.quant import has_bf16_arithmetic
from mlakit.text.chat import answer_rows, chat_frame, mixed_windows
from mlakit.text.corpus import Corpus, default_corpus

logger = logging.getLogger(__name__)

#: MLA parameter names (relative to a layer's ``attn``) that healing may fit.
HEALABLE: tuple[str, ...] = ("w_q", "w_kr", "w_dkv", "w_uk", "w_uv", "w_o")


@dataclass(frozen=True)
class HealConfig:
    """How to heal.

    Attributes:
        windows: calibration windows (``N``).
        seq_len: tokens per window (``T``); long, so that slow rotations are seen.
        steps: Adam steps per layer.
        lr: Adam learning rate (SmolLM2: 1e-4 best of those tried; 3e-4 made one layer diverge).
        query_tokens: query positions sampled per step (``Q``); half of them from the last
            quarter of the window, where the long-range errors are.
        params: which MLA weights are fitted (subset of :data:`HEALABLE`).
        seed: sampling seed (healing is deterministic given the seed, the thread count and the
            CPU's bf16 support).
        distill_steps: AdamW steps of the end-to-end phase that follows the per-layer fits: the
            ``params`` of every layer at once, towards the reference's next-token distribution (KL),
            so that errors the local fits leave, and their compounding across layers, are seen
            (0: off).
        distill_seq_len, distill_batch: tokens per window and windows per step of that phase.
        distill_lr: its peak learning rate (2 warm-up steps, cosine to a tenth).
        bf16: autocast the matmuls of both phases to bfloat16 (targets, probes and the running
            activations stay fp32); ``None`` (default): where the device has bf16 arithmetic
            (CPUs with AVX512-BF16 or AMX, GPUs), which makes a step ~1.5x faster here with the
            same result.
        chat: share of both phases' windows framed as chat requests (:mod:`mlakit.text.chat`);
            ``None``: 0.5 when the tokenizer has a chat template, else 0. Healed on plain text
            only, the 50% decoupled SmolLM2 scored well and ended its turn at once on 6 of 10
            long requests; with half the windows framed, p(end of turn) fell below 0.01 on 8 of them
            (docs/conversion.md "Chat").
        answer_weight: extra weight, in the end-to-end loss, of the last position of every
            chat-framed window (the assistant header, where the model answers or ends its turn),
            in units of the window's mean per-token KL: one position among ``distill_seq_len``
            decides whether a request is answered, and at its plain weight (1/T of the window)
            long requests still ended at once. 0.1 (that position counts as ~103 tokens of a
            1,024-token window) made the 50% SmolLM2 answer all ten long requests of the chat
            check, for x1.069 | x1.155 -> x1.081 | x1.168 on plain text; 0.25 cost more
            (docs/conversion.md "Chat"). 0: off.
    """

    windows: int = 4
    seq_len: int = 2048
    steps: int = 80
    lr: float = 1e-4
    query_tokens: int = 256
    params: tuple[str, ...] = HEALABLE
    seed: int = 0
    distill_steps: int = 24
    distill_seq_len: int = 1024
    distill_batch: int = 2
    distill_lr: float = 6e-5
    bf16: bool | None = None
    chat: float | None = None
    answer_weight: float = 0.1

    def __post_init__(self) -> None:
        for name in ("windows", "seq_len", "steps", "query_tokens", "distill_seq_len", "distill_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise MlakitError(f"HealConfig.{name}={v!r} is invalid: must be a positive integer")
        if not isinstance(self.distill_steps, int) or isinstance(self.distill_steps, bool) or self.distill_steps < 0:
            raise MlakitError(f"HealConfig.distill_steps={self.distill_steps!r} is invalid: must be >= 0 (0: off)")
        for name in ("lr", "distill_lr"):
            if not getattr(self, name) > 0:
                raise MlakitError(f"HealConfig.{name}={getattr(self, name)!r} is invalid: must be > 0")
        if not isinstance(self.answer_weight, (int, float)) or not 0 <= self.answer_weight < float("inf"):
            raise MlakitError(f"HealConfig.answer_weight={self.answer_weight!r} is invalid: must be >= 0 (0: off)")
        if self.chat is not None and not 0 <= self.chat <= 1:
            raise MlakitError(f"HealConfig.chat={self.chat!r} is invalid: must lie in [0, 1] (share of framed windows)")
        bad = [p for p in self.params if p not in HEALABLE]
        if bad or not self.params:
            raise MlakitError(f"HealConfig.params={self.params!r} is invalid: choose from {', '.join(HEALABLE)}")

    def use_bf16(self, device: torch.device | None = None) -> bool:
        """Whether the fits run under bf16 autocast on ``device`` (default the CPU)."""
        if self.bf16 is not None:
            return self.bf16
        return (device is not None and device.type != "cpu") or has_bf16_arithmetic()

    def distillation(self, device: torch.device | None = None) -> DistillConfig:
        """The end-to-end phase as a :class:`mlakit.optim.DistillConfig` (KL only; bf16 resolved
        for ``device``, default the CPU). :func:`heal` narrows its trainable weights to ``params``."""
        return DistillConfig(
            steps=max(1, self.distill_steps),
            batch_size=self.distill_batch,
            micro_batch_size=1,
            seq_len=self.distill_seq_len,
            lr=self.distill_lr,
            warmup_steps=2,
            alpha=1.0,
            train_params="attention",
            bf16=self.use_bf16(device),
            seed=self.seed,
        )


@dataclass
class HealResult:
    """Per-layer relative attention-output error before and after the fit (on sampled queries)."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    distill_steps: int = 0
    distill_seconds: float = 0.0
    distill_kl: tuple[float, float] | None = None  # KL(reference || model) on a probe window, before/after
    bf16: bool = False  # whether the steps ran under bf16 autocast (HealConfig.bf16 resolved)

    def to_dict(self) -> dict[str, Any]:
        return {
            "relative_error_before": [round(v, 5) for v in self.before],
            "relative_error_after": [round(v, 5) for v in self.after],
            "seconds": round(self.seconds, 1),
            "tokens": self.tokens,
            "distill_steps": self.distill_steps,
            "distill_seconds": round(self.distill_seconds, 1),
            "distill_kl_before_after": None if self.distill_kl is None else [round(v, 4) for v in self.distill_kl],
            "bf16": self.bf16,
        }


def _hf_attention(hf: Any, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The original layer's attention output ``[N, T, n]`` on inputs ``x [N, T, n]`` (causal,
    positions ``0..T-1``), through the Hugging Face module itself (its RoPE, scaling and biases)."""
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
    cos_sin = hf.model.rotary_emb(x, pos)
    out = hf.model.layers[layer].self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def attention_at(attn: MultiHeadLatentAttention, x: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
    """MLA output for the query positions ``q_idx [Q]`` of one window ``x [1, T, n]`` attending
    causally to all its positions; ``[1, Q, n]``. Same maths as ``attn(x)`` restricted to rows
    ``q_idx`` (tested), at ``O(Q T)`` attention cost."""
    t = x.shape[1]
    k_pos = torch.arange(t).unsqueeze(0)  # [1, T]
    q_pos = q_idx.unsqueeze(0)  # [1, Q]
    q_nope, q_rope = attn.project_q(x[:, q_idx], q_pos)
    c_kv, k_rope = attn.project_kv_latent(x, k_pos)
    kv_joint = c_kv if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)  # [1, T, r + d_rope]
    mask = position_mask(q_pos, k_pos, attn.config.sliding_window)
    o = attn._attend_naive(q_nope, q_rope, kv_joint, k_pos, mask, False)
    return attn.w_o(o.reshape(1, q_idx.numel(), -1))


def _sample_queries(t: int, q: int, gen: torch.Generator) -> torch.Tensor:
    """Up to ``Q`` distinct sorted positions: half from the window's last quarter, half uniform
    over it (the two halves may overlap)."""
    q = min(q, t)
    late = torch.randperm(t - 3 * t // 4, generator=gen)[: q // 2] + 3 * t // 4
    rest = torch.randperm(t, generator=gen)[: q - late.numel()]
    return torch.unique(torch.cat([late, rest]))


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def heal(
    model: Transformer,
    reference: Any,
    tokens: torch.Tensor,
    config: HealConfig | None = None,
    *,
    distill_tokens: torch.Tensor | None = None,
    answers: torch.Tensor | None = None,
    progress: bool = False,
) -> HealResult:
    """Fit ``model``'s MLA layers in place to ``reference`` (the Hugging Face source) on ``tokens [N, T]``,
    then (``config.distill_steps > 0``) the ``config.params`` weights of every layer together
    towards the reference's logits on ``distill_tokens [M, S]`` (default: ``tokens``; see
    :func:`distill_windows`). ``answers [M]`` (bool, optional) marks the distillation windows that
    end where the model answers (:func:`mlakit.text.chat.answer_rows`); their last position gets
    ``config.answer_weight`` in that loss.

    Raises:
        MlakitError: the models do not match (layers, hidden size, vocabulary) or the windows are
            longer than the model's context.
    """
    from tqdm.auto import tqdm

    config = config or HealConfig()
    hc = reference.config
    mc = model.config
    if mc.num_layers != hc.num_hidden_layers or mc.hidden_size != hc.hidden_size or mc.vocab_size != hc.vocab_size:
        raise MlakitError(
            f"--reference has {hc.num_hidden_layers} layers, hidden size {hc.hidden_size}, vocab {hc.vocab_size}; "
            f"the model has {mc.num_layers}, {mc.hidden_size}, {mc.vocab_size}: not its source"
        )
    distill_tokens = tokens if distill_tokens is None else distill_tokens
    for what, t in (("heal", tokens), ("distillation", distill_tokens)):
        if t.shape[1] > mc.max_seq_len:
            raise MlakitError(f"{what} windows of {t.shape[1]} tokens exceed the model's context {mc.max_seq_len}")
    if config.distill_steps and distill_tokens.shape[0] < config.distill_batch:
        raise MlakitError(
            f"{distill_tokens.shape[0]} distillation windows, fewer than one batch of {config.distill_batch}: "
            "give more healing text or a smaller distill_batch"
        )
    if any(mc.is_sliding(i) for i in range(mc.num_layers)) or mc.attention.logit_softcap is not None:
        # the reference layer is called alone, without the mask/cos-sin its model would build for it
        raise MlakitError(
            "heal does not support sliding-window layers or attention soft-capping (Gemma 2/3) yet: "
            "convert without --heal"
        )
    gen = torch.Generator().manual_seed(config.seed)
    result = HealResult(tokens=tokens.numel())
    flags = [p.requires_grad for p in model.parameters()]  # restored at the end
    t0 = time.time()
    model.train(False)
    reference.train(False)
    with torch.no_grad():
        hidden = model.embed_tokens(tokens).float()  # [N, T, n]
    device = next(model.parameters()).device
    result.bf16 = config.use_bf16(device)
    autocast = bf16_autocast(device, result.bf16)
    bar = tqdm(total=mc.num_layers * config.steps, desc="heal", disable=not progress, leave=False)
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        attn = block.attn
        if not isinstance(attn, MultiHeadLatentAttention):
            raise MlakitError(f"layer {i} is not MLA: only converted MLA models can be healed")
        with torch.no_grad():
            x = block.attn_norm(hidden)  # [N, T, n]
            target = torch.cat([_hf_attention(reference, i, xw) for xw in x.split(1)])  # [N, T, n]
        params = _chosen(attn, config.params)
        for p in attn.parameters():
            p.requires_grad_(any(p is q for q in params))
        start = {k: v.clone() for k, v in attn.state_dict().items()}
        opt = torch.optim.Adam(params, lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
        probe = _sample_queries(x.shape[1], config.query_tokens, torch.Generator().manual_seed(config.seed + i))
        with torch.no_grad():
            result.before.append(_probe_error(attn, x, target, probe))
        for step in range(config.steps):
            w = step % x.shape[0]
            idx = _sample_queries(x.shape[1], config.query_tokens, gen)
            with autocast:
                pred = attention_at(attn, x[w : w + 1], idx)
            loss = _relative_error(pred.float(), target[w : w + 1, idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        with torch.no_grad():
            after = _probe_error(attn, x, target, probe)
            if not after < result.before[-1]:
                # a fit that made the layer worse (too high a learning rate) is undone
                logger.warning(
                    "heal layer %d: error %.4f -> %.4f, keeping the unhealed layer", i, result.before[-1], after
                )
                attn.load_state_dict(start)
                after = result.before[-1]
            result.after.append(after)
            hidden = torch.cat([block(h, None, None, "naive", None) for h in hidden.split(1)])
        bar.set_postfix(layer=i, err=f"{result.before[-1]:.3f}->{result.after[-1]:.3f}")
        logger.info("heal layer %d: relative error %.4f -> %.4f", i, result.before[-1], result.after[-1])
    bar.close()
    if config.distill_steps:
        dc = config.distillation(device)
        probe_window = tokens[:1, -dc.seq_len :]  # fixed, so before and after compare (may overlap training text)
        before = _kl(model, reference, probe_window, dc.bf16)
        chosen = [p for block in model.layers for p in _chosen(block.attn, config.params)]
        result.distill_steps, result.distill_seconds, _ = fit_to_teacher(
            model,
            lambda t: reference(t).logits,
            distill_tokens,
            dc,
            params=chosen,
            last_weights=None if answers is None else config.answer_weight * answers.float(),
            progress=progress,
            desc="heal: end to end",
        )
        result.distill_kl = (before, _kl(model, reference, probe_window, dc.bf16))
        logger.info(
            "heal end to end: %d steps in %.0f s, KL to the reference on a probe window %.4f -> %.4f",
            result.distill_steps,
            result.distill_seconds,
            *result.distill_kl,
        )
    model.train(False)
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    result.seconds = time.time() - t0
    return result


def _chosen(attn: Any, names: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The parameters of ``attn``'s weights named in ``names`` (those it has): what healing fits."""
    return [p for name in names if hasattr(attn, name) for p in getattr(attn, name).parameters()]


def _kl(model: Transformer, reference: Any, tokens: torch.Tensor, bf16: bool) -> float:
    """KL(reference || model) per token on ``tokens [1, T]``."""
    model.train(False)
    with torch.no_grad(), bf16_autocast(tokens.device, bf16):
        _, kl, _ = distill_loss(model(tokens), reference(tokens).logits, tokens, 1.0, 1.0)
    return float(kl)


def _probe_error(attn: MultiHeadLatentAttention, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean relative error over all windows at fixed query positions ``idx``."""
    errs = [
        float(_relative_error(attention_at(attn, x[w : w + 1], idx), target[w : w + 1, idx])) for w in range(x.shape[0])
    ]
    return sum(errs) / len(errs)


def heal_windows(tokenizer: Any, config: HealConfig, corpus: Corpus | None = None) -> torch.Tensor:
    """``[N, T]`` healing windows: ``config.windows`` x ``config.seq_len`` tokens of ``corpus``
    (default: the calibration side of the built-in genre mix, one genre after another), a
    ``config.chat`` share of them framed as chat requests."""
    corpus = corpus or default_corpus("calibration")
    return mixed_windows(corpus, tokenizer, num_windows=config.windows, seq_len=config.seq_len, chat=config.chat)[0]


def distill_windows(tokenizer: Any, config: HealConfig, corpus: Corpus | None = None) -> torch.Tensor | None:
    """``[M, S]`` windows for the end-to-end phase: ``distill_steps x distill_batch`` windows of
    ``distill_seq_len`` tokens of ``corpus`` (default: the calibration side of the built-in genre
    mix), each seen once, a ``config.chat`` share of them framed as chat requests; ``None`` when
    the phase is off (``distill_steps == 0``)."""
    if not config.distill_steps:
        return None
    corpus = corpus or default_corpus("calibration")
    n = config.distill_steps * config.distill_batch
    return mixed_windows(corpus, tokenizer, num_windows=n, seq_len=config.distill_seq_len, chat=config.chat)[0]


@dataclass(frozen=True)
class HealText:
    """What :func:`heal` trains on: ``windows [N, T]`` for the per-layer fits, ``distill [M, S]``
    for the end-to-end phase (``None`` when it is off) and ``answers [M]``, which of those end
    where the model answers (chat-framed requests)."""

    windows: torch.Tensor
    distill: torch.Tensor | None
    answers: torch.Tensor | None


def heal_text(tokenizer: Any, config: HealConfig, corpus: Corpus | None = None) -> HealText:
    """:func:`heal_windows`, :func:`distill_windows` and their answer rows (:func:`mlakit.text.chat.answer_rows`)."""
    distill = distill_windows(tokenizer, config, corpus)
    answers = None if distill is None else answer_rows(distill, chat_frame(tokenizer))
    return HealText(heal_windows(tokenizer, config, corpus), distill, answers)


def heal_recorded(
    model: Transformer,
    reference: Any,
    tokenizer: Any,
    record: dict[str, Any],
    *,
    reference_name: str,
    config: HealConfig,
    corpus: Corpus | None = None,
    progress: bool = False,
) -> HealResult:
    """Heal ``model`` in place against the Hugging Face ``reference`` on :func:`heal_windows`, and
    note how in ``record["heal"]`` (the ``conversion.json`` of the checkpoint that will be written)."""
    text = heal_text(tokenizer, config, corpus)
    result = heal(
        model, reference, text.windows, config, distill_tokens=text.distill, answers=text.answers, progress=progress
    )
    record["heal"] = {"reference": reference_name, "config": dataclasses.asdict(config), **result.to_dict()}
    return result


def heal_checkpoint(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    reference: str | None = None,
    config: HealConfig | None = None,
    corpus: Corpus | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> tuple[Path, HealResult]:
    """Heal the mlakit checkpoint ``model`` against ``reference`` and write it to ``out`` atomically.

    Args:
        reference: the source model (anything ``mlakit convert --model`` takes); default: the
            ``source`` recorded in ``model``'s ``conversion.json``.
        corpus: healing text (default: the built-in calibration split).

    Raises:
        MlakitError: ``out`` exists, ``model`` is not an mlakit checkpoint, no reference is known,
            or the reference does not match.
    """
    from mlakit.convert.convert import RECORD_FILE, ConversionResult, save_converted
    from mlakit.convert.load import load_hf_model
    from mlakit.io import read_config_json

    config = config or HealConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise MlakitError(f"--out {out} already exists; choose a new directory (or --overwrite)")
    student = Transformer.from_pretrained(model)
    record_path = Path(model) / RECORD_FILE
    record: dict[str, Any] = (
        read_config_json(model, RECORD_FILE, "a conversion record") if record_path.is_file() else {}
    )
    reference = reference or record.get("source")
    if not reference:
        raise MlakitError(f"{model}: no conversion.json names its source; pass --reference")
    loaded = load_hf_model(reference)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise MlakitError(f"--reference {reference}: a tokenizer is needed for the healing text")
    result = heal_recorded(
        student,
        loaded.model,
        tokenizer,
        record,
        reference_name=str(reference),
        config=config,
        corpus=corpus,
        progress=progress,
    )
    written = save_converted(
        ConversionResult(model=student, record=record, tokenizer=tokenizer), out, overwrite=overwrite
    )
    return written, result
