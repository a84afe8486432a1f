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

Why local targets (the original layer applied to the converted inputs) and not the original
layer's output on the original inputs: the latter asks each layer to undo the drift upstream,
which for the decoupled form is large and position-dependent; regressing onto it shrinks keys
(measured for the closed-form sequential pass, docs/conversion.md). The shapes of the model do not
change: the cache, absorption and export work as before.

Cost per step: the latent and rotary key of every position of one window (``T`` tokens) and
attention for ``Q`` sampled query positions against them (``O(Q T)``, not ``O(T^2)``).

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
from mlakit.text.corpus import Corpus, default_corpus, token_windows

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
        seed: sampling seed (healing is deterministic given the seed and thread count).
    """

    windows: int = 4
    seq_len: int = 2048
    steps: int = 80
    lr: float = 1e-4
    query_tokens: int = 256
    params: tuple[str, ...] = HEALABLE
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("windows", "seq_len", "steps", "query_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise MlakitError(f"HealConfig.{name}={v!r} is invalid: must be a positive integer")
        if not self.lr > 0:
            raise MlakitError(f"HealConfig.lr={self.lr!r} is invalid: must be > 0")
        bad = [p for p in self.params if p not in HEALABLE]
        if bad or not self.params:
            raise MlakitError(f"HealConfig.params={self.params!r} is invalid: choose from {', '.join(HEALABLE)}")


@dataclass
class HealResult:
    """Per-layer relative attention-output error before and after the fit (on sampled queries)."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "relative_error_before": [round(v, 5) for v in self.before],
            "relative_error_after": [round(v, 5) for v in self.after],
            "seconds": round(self.seconds, 1),
            "tokens": self.tokens,
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
    progress: bool = False,
) -> HealResult:
    """Fit ``model``'s MLA layers in place to ``reference`` (the Hugging Face source) on ``tokens [N, T]``.

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
    if tokens.shape[1] > mc.max_seq_len:
        raise MlakitError(f"heal windows of {tokens.shape[1]} tokens exceed the model's context {mc.max_seq_len}")
    if any(mc.is_sliding(i) for i in range(mc.num_layers)) or mc.attention.logit_softcap is not None:
        # the reference layer is called alone, without the mask/cos-sin its model would build for it
        raise MlakitError(
            "heal does not support sliding-window layers or attention soft-capping (Gemma 2/3) yet: "
            "convert without --heal"
        )
    gen = torch.Generator().manual_seed(config.seed)
    result = HealResult(tokens=tokens.numel())
    t0 = time.time()
    model.train(False)
    reference.train(False)
    with torch.no_grad():
        hidden = model.embed_tokens(tokens).float()  # [N, T, n]
    bar = tqdm(total=mc.num_layers * config.steps, desc="heal", disable=not progress, leave=False)
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        attn = block.attn
        if not isinstance(attn, MultiHeadLatentAttention):
            raise MlakitError(f"layer {i} is not MLA: only converted MLA models can be healed")
        with torch.no_grad():
            x = block.attn_norm(hidden)  # [N, T, n]
            target = torch.cat([_hf_attention(reference, i, xw) for xw in x.split(1)])  # [N, T, n]
        params = [p for name in config.params if hasattr(attn, name) for p in getattr(attn, name).parameters()]
        frozen = [p for p in attn.parameters() if all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        start = {k: v.clone() for k, v in attn.state_dict().items()}
        opt = torch.optim.Adam(params, lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
        probe = _sample_queries(x.shape[1], config.query_tokens, torch.Generator().manual_seed(config.seed + i))
        with torch.no_grad():
            result.before.append(_probe_error(attn, x, target, probe))
        for step in range(config.steps):
            w = step % x.shape[0]
            idx = _sample_queries(x.shape[1], config.query_tokens, gen)
            loss = _relative_error(attention_at(attn, x[w : w + 1], idx), target[w : w + 1, idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        for p in attn.parameters():
            p.requires_grad_(True)
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
    result.seconds = time.time() - t0
    return result


def _probe_error(attn: MultiHeadLatentAttention, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean relative error over all windows at fixed query positions ``idx``."""
    errs = [
        float(_relative_error(attention_at(attn, x[w : w + 1], idx), target[w : w + 1, idx])) for w in range(x.shape[0])
    ]
    return sum(errs) / len(errs)


def heal_windows(tokenizer: Any, config: HealConfig, corpus: Corpus | None = None) -> torch.Tensor:
    """``[N, T]`` healing windows: ``config.windows`` x ``config.seq_len`` tokens of ``corpus``
    (default: the calibration side of the built-in genre mix, one genre after another)."""
    corpus = corpus or default_corpus("calibration")
    return token_windows(corpus, tokenizer, num_windows=config.windows, seq_len=config.seq_len)


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
    result = heal(model, reference, heal_windows(tokenizer, config, corpus), config, progress=progress)
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
