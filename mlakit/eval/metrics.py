"""Perplexity, and agreement with a reference model (top-1 agreement, KL divergence).

Models are passed as callables ``tokens [B, T] -> logits [B, T, V]`` so the same code evaluates a
Hugging Face model, an mlakit :class:`~mlakit.model.Transformer`, or anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    """Quality of one model on a fixed set of token windows.

    ``perplexity`` is ``exp`` of the mean next-token NLL over ``tokens`` predicted tokens.
    ``top1_agreement`` (fraction of positions whose argmax matches the reference) and ``kl``
    (mean ``KL(reference || model)`` in nats per token) are ``None`` without a reference.
    """

    perplexity: float
    nll: float
    tokens: int
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_logits_fn(model: Any) -> LogitsFn:
    """Wrap an HF model (returns an output object) or an mlakit model (returns logits)."""

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens)
        return out if isinstance(out, torch.Tensor) else out.logits

    return fn


@torch.no_grad()
def evaluate(
    model: LogitsFn,
    windows: torch.Tensor,
    *,
    reference: LogitsFn | None = None,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on ``windows`` ``[N, T]``, optionally against ``reference``.

    Every window predicts its tokens 1..T-1 from their prefixes.
    """
    from tqdm.auto import tqdm

    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = count = 0
    batches = list(torch.split(windows, batch_size))
    for tokens in tqdm(batches, desc=desc, disable=not progress, leave=False):
        target = tokens[:, 1:]  # [B, T-1]
        logp = F.log_softmax(model(tokens)[:, :-1].double(), dim=-1)  # [B, T-1, V]
        nll_sum += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference(tokens)[:, :-1].double(), dim=-1)  # [B, T-1, V]
            ref_nll_sum += -ref_logp.gather(-1, target.unsqueeze(-1)).sum().item()
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum().item())
    nll = nll_sum / count
    if reference is None:
        return EvalResult(perplexity=math.exp(nll), nll=nll, tokens=count)
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        reference_perplexity=math.exp(ref_nll_sum / count),
        top1_agreement=agree / count,
        kl=kl_sum / count,
    )
