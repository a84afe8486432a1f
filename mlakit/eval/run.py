"""``mlakit eval`` as a library call: perplexity, agreement with a reference, KV bytes per token."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.eval.corpus import Corpus, default_corpus, files_corpus, token_windows
from mlakit.eval.metrics import evaluate
from mlakit.eval.models import ScoredModel, check_compatible, open_model

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS = 8
DEFAULT_SEQ_LEN = 512


def eval_corpus(texts: list[str] | tuple[str, ...] | None) -> Corpus:
    """The user's files, or the built-in evaluation split (disjoint from calibration)."""
    return files_corpus(texts) if texts else default_corpus("evaluation")


def evaluate_models(
    model: ScoredModel,
    reference: ScoredModel | None,
    corpus: Corpus,
    *,
    windows: int = DEFAULT_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
    cache_dtype: str = "bf16",
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (and compare with ``reference``) on ``windows`` x ``seq_len`` tokens of ``corpus``.

    Returns:
        A JSON-able dict with ``perplexity``, ``reference_perplexity``, ``top1_agreement``, ``kl``
        (nats/token, ``KL(reference || model)``), ``kv_bytes_per_token`` (at ``cache_dtype``),
        ``reference_kv_bytes_per_token``, ``kv_fraction``, ``tokens`` and ``text``.
    """
    tokenizer = model.tokenizer or (reference.tokenizer if reference else None)
    if tokenizer is None:
        raise MlakitError(f"{model.name}: no tokenizer found (and no --reference with one)")
    if reference is not None:
        check_compatible(model, reference)
    tokens = token_windows(corpus, tokenizer, num_windows=windows, seq_len=seq_len)
    with torch.no_grad():
        res = evaluate(
            model.logits,
            tokens,
            reference=reference.logits if reference else None,
            progress=progress,
            desc=f"eval {model.name}",
        )
    out: dict[str, Any] = {
        "model": model.name,
        "reference": reference.name if reference else None,
        "text": corpus.name,
        "tokens": res.tokens,
        "perplexity": res.perplexity,
        "reference_perplexity": res.reference_perplexity,
        "perplexity_ratio": res.perplexity / res.reference_perplexity if res.reference_perplexity else None,
        "top1_agreement": res.top1_agreement,
        "kl": res.kl,
        "cache_dtype": cache_dtype,
        "kv_bytes_per_token": model.kv_bytes_per_token(cache_dtype),
        "reference_kv_bytes_per_token": reference.kv_bytes_per_token(cache_dtype) if reference else None,
    }
    out["kv_fraction"] = (out["kv_bytes_per_token"] / out["reference_kv_bytes_per_token"]) if reference else None
    return out


def evaluate_paths(
    model: str,
    *,
    reference: str | None = None,
    texts: list[str] | None = None,
    windows: int = DEFAULT_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
    cache_dtype: str = "bf16",
    progress: bool = False,
) -> dict[str, Any]:
    """Open ``model`` / ``reference`` (mlakit checkpoints or HF models) and run :func:`evaluate_models`."""
    corpus = eval_corpus(texts)  # fail on missing files before loading models
    m = open_model(model)
    r = open_model(reference) if reference else None
    return evaluate_models(m, r, corpus, windows=windows, seq_len=seq_len, cache_dtype=cache_dtype, progress=progress)
