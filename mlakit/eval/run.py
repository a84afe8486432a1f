"""``mlakit eval`` as a library call: perplexity and agreement with a reference, per context length
and per text genre, and KV bytes per token.

Conversions to MLA can hold up on the 512-token windows everybody evaluates on and collapse at
4096, and can hold up on the genre they were calibrated on and not on the next. So a result is a
grid: for each length, for each genre of the corpus (:mod:`mlakit.text.corpus`), the same
windows scored by the model and its reference; ``overall`` pools all tokens of a length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.eval.metrics import EvalResult, answer_check, evaluate, pool
from mlakit.eval.models import ScoredModel, check_compatible, open_model
from mlakit.text.chat import ChatFrame, chat_frame, frame_windows
from mlakit.text.corpus import Corpus, default_corpus, files_corpus, genre_windows

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS: tuple[int, ...] = (512, 4096)
# windows per genre at BASE_LENGTH; longer lengths get proportionally fewer (at least one)
DEFAULT_WINDOWS = 2
BASE_LENGTH = 512
# chat-check tokens per length: one request per genre while they fit (512: all four genres; 4096:
# two). Each request is a forward of the whole window; four at 4096 added ~50 s per row to the tradeoff
CHAT_TOKENS = 8192


def windows_at(length: int, windows: int | None = None) -> int:
    """Windows per genre at ``length``: ``windows`` if given, else ``max(1, 2 * 512 // length)``.

    The default keeps the tokens scored per length roughly constant, so adding a 4096 length
    does not multiply the run time by eight.
    """
    return windows if windows is not None else max(1, DEFAULT_WINDOWS * BASE_LENGTH // length)


def check_lengths(lengths: Sequence[int], models: Sequence[ScoredModel]) -> tuple[int, ...]:
    """``lengths`` in the given order, once each.

    Raises:
        MlakitError: no length, a length below 2, or one beyond a model's context.
    """
    if not lengths:
        raise MlakitError("--lengths: expected at least one context length")
    out = tuple(dict.fromkeys(lengths))
    for n in out:
        if n < 2:
            raise MlakitError(f"--lengths {n}: a window needs at least 2 tokens")
        for m in models:
            if m.max_seq_len is not None and n > m.max_seq_len:
                raise MlakitError(
                    f"--lengths {n}: beyond the context of {m.name} ({m.max_seq_len} tokens); "
                    f"use lengths up to {m.max_seq_len}"
                )
    return out


def eval_corpus(texts: Sequence[str] | None) -> Corpus:
    """The user's files (one genre, ``files``), or the built-in evaluation split of the genre mix."""
    return files_corpus(texts) if texts else default_corpus("evaluation")


_SCORES = ("tokens", "perplexity", "reference_perplexity", "perplexity_ratio", "top1_agreement", "kl")


def _scores(res: EvalResult, windows: int) -> dict[str, Any]:
    ratio = res.perplexity / res.reference_perplexity if res.reference_perplexity else None
    return {
        "windows": windows,
        "tokens": res.tokens,
        "perplexity": res.perplexity,
        "reference_perplexity": res.reference_perplexity,
        "perplexity_ratio": ratio,
        "top1_agreement": res.top1_agreement,
        "kl": res.kl,
    }


def evaluate_models(
    model: ScoredModel,
    reference: ScoredModel | None,
    corpus: Corpus,
    *,
    lengths: Sequence[int] | None = None,
    windows: int | None = None,
    seq_len: int | None = None,
    cache_dtype: str = "bf16",
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (and compare with ``reference``) on every genre of ``corpus`` at every length.

    Args:
        lengths: context lengths (tokens per window), default :data:`DEFAULT_LENGTHS`.
        windows: windows per genre at every length; default :func:`windows_at`.
        seq_len: one length (the former single-length API); not together with ``lengths``.

    Returns:
        A JSON-able dict. ``lengths`` maps ``str(length)`` to ``{"windows": per genre,
        "overall": scores, "genres": {genre: scores}}`` (and ``"chat"``, :func:`_answers`, for a
        tokenizer with a chat template), where scores are ``windows``, ``tokens``
        (predicted), ``perplexity``, ``reference_perplexity``, ``perplexity_ratio``,
        ``top1_agreement`` and ``kl`` (nats/token, ``KL(reference || model)``), and
        ``overall`` pools every token of that length. The top level repeats the first length's
        overall scores (``tokens``, ``perplexity``, ...) and adds ``model``, ``reference``,
        ``text``, ``seq_len`` (that first length), ``kv_bytes_per_token`` (at ``cache_dtype``),
        ``reference_kv_bytes_per_token`` and ``kv_fraction``.

    Raises:
        MlakitError: no tokenizer, incompatible vocabularies, a length beyond a model's context,
            a genre shorter than one window.
    """
    if seq_len is not None and lengths is not None:
        raise MlakitError("give lengths or seq_len (one length), not both")
    if windows is not None and windows < 1:
        raise MlakitError(f"--windows {windows}: expected at least 1 window per genre")
    tokenizer = model.tokenizer or (reference.tokenizer if reference else None)
    if tokenizer is None:
        raise MlakitError(f"{model.name}: no tokenizer found (and no --reference with one)")
    if reference is not None:
        check_compatible(model, reference)
    todo = check_lengths(
        (seq_len,) if seq_len is not None else tuple(lengths or DEFAULT_LENGTHS),
        [model, reference] if reference is not None else [model],
    )
    from tqdm.auto import tqdm

    frame = chat_frame(tokenizer)  # None: no chat template, no chat check
    bar = tqdm(total=len(todo) * len(corpus.genres), desc=f"eval {model.name}", disable=not progress)
    grid: dict[str, Any] = {}
    for length in todo:
        per_genre = windows_at(length, windows)
        genre_tokens = genre_windows(corpus, tokenizer, num_windows_per_genre=per_genre, seq_len=length)
        results: dict[str, EvalResult] = {}
        for genre, tokens in genre_tokens.items():
            bar.set_postfix_str(f"{length} tokens, {genre}")
            with torch.no_grad():
                results[genre] = evaluate(
                    model.logits,
                    tokens,
                    reference=reference.logits if reference else None,
                    progress=progress,
                    desc=f"{genre} @ {length}",
                )
            bar.update()
        grid[str(length)] = {
            "windows": per_genre,
            "overall": _scores(pool(list(results.values())), sum(len(t) for t in genre_tokens.values())),
            "genres": {g: _scores(r, len(genre_tokens[g])) for g, r in results.items()},
        }
        chat = _answers(model, reference, frame, genre_tokens) if frame is not None else None
        if chat is not None:
            grid[str(length)]["chat"] = chat
    bar.close()
    first = grid[str(todo[0])]["overall"]
    out: dict[str, Any] = {
        "model": model.name,
        "reference": reference.name if reference else None,
        "text": corpus.name,
        "seq_len": todo[0],
        **{k: first[k] for k in _SCORES},
        "cache_dtype": cache_dtype,
        "kv_bytes_per_token": model.kv_bytes_per_token(cache_dtype),
        "reference_kv_bytes_per_token": reference.kv_bytes_per_token(cache_dtype) if reference else None,
        "lengths": grid,
    }
    out["kv_fraction"] = (out["kv_bytes_per_token"] / out["reference_kv_bytes_per_token"]) if reference else None
    return out


def _answers(
    model: ScoredModel, reference: ScoredModel | None, frame: ChatFrame, genre_tokens: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """:func:`~mlakit.eval.metrics.answer_check` on the first window of each genre (of the first
    ``max(1, CHAT_TOKENS // length)`` genres) framed as a chat request of the same length; ``None``
    for windows too short to frame."""
    length = next(iter(genre_tokens.values())).shape[1]
    first = torch.stack([t[0] for t in genre_tokens.values()][: max(1, CHAT_TOKENS // length)])  # [R, length]
    try:
        requests, _ = frame_windows(first, frame, 1.0)
    except MlakitError as e:
        logger.info("no chat check: %s", e)
        return None
    with torch.no_grad():
        return answer_check(model.logits, requests, frame.end_of_turn, reference.logits if reference else None)


def evaluate_paths(
    model: str,
    *,
    reference: str | None = None,
    texts: Sequence[str] | None = None,
    lengths: Sequence[int] | None = None,
    windows: int | None = None,
    seq_len: int | None = None,
    cache_dtype: str = "bf16",
    progress: bool = False,
) -> dict[str, Any]:
    """Open ``model`` / ``reference`` (mlakit checkpoints or HF models) and run :func:`evaluate_models`."""
    corpus = eval_corpus(texts)  # fail on missing files before loading models
    m = open_model(model)
    r = open_model(reference) if reference else None
    return evaluate_models(
        m,
        r,
        corpus,
        lengths=lengths,
        windows=windows,
        seq_len=seq_len,
        cache_dtype=cache_dtype,
        progress=progress,
    )
