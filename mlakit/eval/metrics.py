"""Perplexity, agreement with a reference model (top-1 agreement, KL divergence), generation checks.

Models are passed as callables ``tokens [B, T] -> logits [B, T, V]`` so the same code evaluates a
Hugging Face model, an mlakit :class:`~mlakit.model.Transformer`, or anything else; generation
checks take greedy generators ``(prompt [1, P], n) -> n token ids`` so callers bring their caches.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# (prompt ids [1, P], number of new tokens) -> the new token ids, greedy
GenerateFn = Callable[[torch.Tensor, int], Sequence[int]]


@dataclass(frozen=True)
class EvalResult:
    """Quality of one model on a fixed set of token windows.

    ``perplexity`` is ``exp`` of the mean next-token NLL over ``tokens`` predicted tokens.
    ``reference_perplexity``/``reference_nll``, ``top1_agreement`` (fraction of positions whose
    argmax matches the reference) and ``kl`` (mean ``KL(reference || model)`` in nats per
    token) are ``None`` without a reference.
    """

    perplexity: float
    nll: float
    tokens: int
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    kl: float | None = None
    reference_nll: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pool(results: Sequence[EvalResult]) -> EvalResult:
    """Several results as one, weighted by tokens: the numbers over all their tokens together.

    Raises:
        ValueError: no results, or some with a reference and some without.
    """
    if not results:
        raise ValueError("pool(results=[]): expected at least one EvalResult")
    with_ref = {r.reference_nll is not None for r in results}
    if len(with_ref) != 1:
        raise ValueError("pool: some results have a reference and some do not")
    tokens = sum(r.tokens for r in results)

    def mean(values: list[float]) -> float:
        return sum(v * r.tokens for v, r in zip(values, results)) / tokens

    nll = mean([r.nll for r in results])
    if not with_ref.pop():
        return EvalResult(perplexity=math.exp(nll), nll=nll, tokens=tokens)
    ref_nll = mean([r.reference_nll for r in results])  # type: ignore[misc]
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=tokens,
        reference_perplexity=math.exp(ref_nll),
        top1_agreement=mean([r.top1_agreement for r in results]),  # type: ignore[misc]
        kl=mean([r.kl for r in results]),  # type: ignore[misc]
        reference_nll=ref_nll,
    )


def as_logits_fn(model: Any) -> LogitsFn:
    """Wrap an HF model (returns an output object) or an mlakit model (returns logits)."""

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens)
        return out if isinstance(out, torch.Tensor) else out.logits

    return fn


# positions whose log-probabilities are formed at once: [ROWS, V] float32 is 6 MB at V=49152. Small
# on purpose: with 1,024 rows (200 MB temporaries, each a fresh allocation) scoring 4,096 positions of
# random logits took 1.36 s against 0.43 s (microbenchmark, 2 threads); in a whole evaluation of
# SmolLM2 at 512 + 4096 tokens the gain measured ~5% together with ScoreMemo (BENCHMARKS.md)
_ROWS = 32
# positions per forward pass, so batch size shrinks as windows grow (4096-token windows, one at a time)
_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class _Rows:
    """One model's scores on ``R`` consecutive predicted positions of a batch.

    ``logp [R, V]`` float32 log-probabilities (formed in float32: float64 over a 49k vocabulary
    cost ~10x the time, most of a 4096-token evaluation, for no digit the reported ratios show),
    ``nll``: the targets' summed negative log-probability (summed in float64), ``top1 [R]``: argmax.
    """

    logp: torch.Tensor
    nll: float
    top1: torch.Tensor


def _score_rows(logits: torch.Tensor, target: torch.Tensor) -> Iterator[_Rows]:
    """``logits [P, V]`` of ``P`` positions predicting ``target [P]``, scored ``_ROWS`` positions at a time."""
    for lo in range(0, target.numel(), _ROWS):
        logp = F.log_softmax(logits[lo : lo + _ROWS].float(), dim=-1)  # [R, V]
        nll = -logp.gather(-1, target[lo : lo + _ROWS].unsqueeze(-1)).double().sum().item()
        yield _Rows(logp, nll, logp.argmax(-1))


class ScoreMemo:
    """A logits function whose scores are kept, per batch of windows, for the next evaluation.

    A sweep compares many models with one reference on the same windows (``mlakit tradeoff``:
    every row against the original): the reference's forward, log-softmax and argmax are done
    once (on SmolLM2 at 4096 tokens the log-softmax alone is ~0.6 s per window and row). Holds
    ``V`` float32 numbers per scored position (3.2 GiB for four 4096-token windows at V=49152).
    Called directly it is the plain logits function (nothing kept).
    """

    def __init__(self, fn: LogitsFn) -> None:
        self.fn = fn
        self.store: dict[tuple[tuple[int, ...], bytes], list[_Rows]] = {}
        self.last: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fn(tokens)

    def last_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` float32 next-token probabilities at the last position of ``tokens [B, T]``, formed
        once per distinct ``tokens`` (the chat check of every row of a sweep asks the same requests)."""
        key = (tuple(tokens.shape), tokens.numpy().tobytes())
        if key not in self.last:
            self.last[key] = self.fn(tokens)[:, -1].float().softmax(-1)
        return self.last[key]

    def scored(self, tokens: torch.Tensor) -> list[_Rows]:
        """:func:`_score_rows` of ``tokens [B, T]`` (next-token targets), computed once per distinct ``tokens``."""
        key = (tuple(tokens.shape), tokens.numpy().tobytes())
        if key not in self.store:
            logits = self.fn(tokens)[:, :-1].flatten(0, 1)  # [B*(T-1), V]
            self.store[key] = list(_score_rows(logits, tokens[:, 1:].reshape(-1)))
        return self.store[key]


def _scored(fn: LogitsFn, tokens: torch.Tensor) -> Iterable[_Rows]:
    """``fn``'s scores on ``tokens [B, T]``: kept ones for a :class:`ScoreMemo`, else formed lazily."""
    if isinstance(fn, ScoreMemo):
        return fn.scored(tokens)
    return _score_rows(fn(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(
    model: LogitsFn,
    windows: torch.Tensor,
    *,
    reference: LogitsFn | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on ``windows`` ``[N, T]``, optionally against ``reference``.

    Every window predicts its tokens 1..T-1 from their prefixes. Memory stays bounded whatever
    ``T``: ``batch_size`` defaults to ``max(1, 2048 // T)`` windows per forward pass, the
    reference's logits are computed batch by batch and dropped (unless it is a
    :class:`ScoreMemo`), and log-probabilities (float32, summed in float64) are formed ``32``
    positions at a time.
    """
    from tqdm.auto import tqdm

    bs = batch_size or max(1, _BATCH_TOKENS // windows.shape[1])
    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = count = 0
    for tokens in tqdm(torch.split(windows, bs), desc=desc, disable=not progress, leave=False):
        count += tokens.shape[0] * (tokens.shape[1] - 1)
        ours = _scored(model, tokens)
        theirs = _scored(reference, tokens) if reference is not None else itertools.repeat(None)
        for m, r in zip(ours, theirs):
            nll_sum += m.nll
            if r is not None:
                ref_nll_sum += r.nll
                kl_sum += (r.logp.exp() * (r.logp - m.logp)).sum(-1).double().sum().item()
                agree += int((r.top1 == m.top1).sum().item())
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
        reference_nll=ref_nll_sum / count,
    )


@torch.no_grad()
def answer_check(
    model: LogitsFn, requests: torch.Tensor, end_of_turn: int, reference: LogitsFn | None = None
) -> dict[str, Any]:
    """Does the model answer chat requests, or end its turn at once? (:mod:`mlakit.text.chat`)

    ``requests [N, S]`` end at the generation prompt (the assistant header); at that last position
    a model that answers puts its weight on a first word, one that declines on ``end_of_turn``.
    Perplexity on plain text does not see this: SmolLM2's 50% conversions kept x1.08 and ended
    every long request at once (docs/conversion.md "Chat").

    Returns:
        ``requests``; ``answers``: how many argmaxes are not ``end_of_turn``; ``end_of_turn``:
        its mean probability; and the same two as ``reference_answers`` /
        ``reference_end_of_turn`` when a reference is given.
    """

    def last(fn: LogitsFn) -> torch.Tensor:  # [N, V] float32 probabilities at each request's last position
        if isinstance(fn, ScoreMemo):
            return torch.cat([fn.last_probs(r[None]) for r in requests])
        return torch.cat([fn(r[None])[:, -1].float().softmax(-1) for r in requests])

    out: dict[str, Any] = {"requests": len(requests)}
    for key, fn in (("", model), ("reference_", reference)):
        if fn is None:
            continue
        p = last(fn)
        out[f"{key}answers"] = int((p.argmax(-1) != end_of_turn).sum())
        out[f"{key}end_of_turn"] = float(p[:, end_of_turn].mean())
    return out


def is_degenerate(ids: Sequence[int], tokenizer: Any) -> bool:
    """Whether a generated continuation is a collapse rather than text.

    Degenerate: empty, at least 75% of it one repeated token, or nothing but whitespace once
    decoded. A converted model that has lost long-range attention typically loops on one token
    or emits blank lines, while its perplexity can still look tolerable.
    """
    if not ids:
        return True
    if Counter(ids).most_common(1)[0][1] >= 0.75 * len(ids):
        return True
    return not tokenizer.decode(list(ids)).strip()


def greedy_agreement(
    model_generate: GenerateFn,
    reference_generate: GenerateFn,
    prompt: torch.Tensor,
    *,
    tokenizer: Any,
    new_tokens: int = 32,
) -> dict[str, Any]:
    """Greedy continuations of ``prompt`` ``[1, P]`` by a model and its reference, compared.

    The callers pass generators (``(prompt_ids [1, P], n) -> n new token ids``) so each side can
    use its own KV cache: re-running the full forward for each token is too slow at ``P ~ 3000``.

    Returns:
        ``prefix_match``: length of the common prefix (tokens until the first divergence);
        ``positional_agreement`` (also ``agreement``): fraction of the ``new_tokens`` positions
        holding the same token in both (a continuation that stopped early disagrees from there);
        ``degenerate``: :func:`is_degenerate` of the model's continuation;
        ``model_text``/``reference_text``: the decoded continuations.

    Raises:
        ValueError: ``prompt`` is not ``[1, P]`` or ``new_tokens < 1``.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1 or new_tokens < 1:
        raise ValueError(
            f"greedy_agreement: prompt {tuple(prompt.shape)}, new_tokens={new_tokens}: expected [1, P], >= 1"
        )
    ours = list(model_generate(prompt, new_tokens))[:new_tokens]
    theirs = list(reference_generate(prompt, new_tokens))[:new_tokens]
    prefix = 0
    while prefix < min(len(ours), len(theirs)) and ours[prefix] == theirs[prefix]:
        prefix += 1
    same = sum(a == b for a, b in zip(ours, theirs))
    return {
        "prefix_match": prefix,
        "positional_agreement": same / new_tokens,
        "agreement": same / new_tokens,
        "degenerate": is_degenerate(ours, tokenizer),
        "model_text": tokenizer.decode(ours),
        "reference_text": tokenizer.decode(theirs),
    }
