"""Open anything ``mlakit eval`` can score: an mlakit checkpoint or a Hugging Face causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlakit import dtypes
from mlakit.errors import MlakitError
from mlakit.eval.metrics import LogitsFn, as_logits_fn
from mlakit.model import Transformer, is_mlakit_checkpoint


@dataclass(frozen=True)
class ScoredModel:
    """A model ready to score text.

    Attributes:
        logits: ``tokens [B, T] -> logits [B, T, V]``.
        tokenizer: its tokenizer (``None`` if the checkpoint has none).
        kv_elements_per_token: cached values per token over all layers.
        kind: ``"mlakit"`` or ``"hf"``.
        name: what the user passed.
        vocab_size: output width.
        max_seq_len: the longest context it was built for (``max_position_embeddings`` of an HF
            config, ``max_seq_len`` of an mlakit one); ``None`` when unknown (not checked).
    """

    logits: LogitsFn
    tokenizer: Any
    kv_elements_per_token: int
    kind: str
    name: str
    vocab_size: int
    max_seq_len: int | None = None

    def kv_bytes_per_token(self, cache_dtype: str = "bf16") -> int:
        return self.kv_elements_per_token * dtypes.float_dtype(cache_dtype, "cache dtype").itemsize


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def open_model(spec: str) -> ScoredModel:
    """An mlakit checkpoint directory, or any ``--model`` that :func:`mlakit.convert.load.load_hf_model` takes.

    Raises:
        MlakitError: missing files, unsupported architecture.
    """
    if is_mlakit_checkpoint(spec):
        # scored in float32 like the reference (load_hf_model): a bf16 checkpoint widens exactly
        model = Transformer.from_pretrained(spec, dtype=torch.float32)
        return ScoredModel(
            logits=as_logits_fn(model),
            tokenizer=_tokenizer(spec),
            kv_elements_per_token=model.config.cache_elements_per_token(),
            kind="mlakit",
            name=spec,
            vocab_size=model.config.vocab_size,
            max_seq_len=model.config.max_seq_len,
        )
    from mlakit.convert.load import load_hf_model

    loaded = load_hf_model(spec)
    return from_hf(loaded.model, loaded.tokenizer, spec)


def from_hf(hf: Any, tokenizer: Any, name: str) -> ScoredModel:
    c = hf.config
    h = c.num_attention_heads
    g = getattr(c, "num_key_value_heads", None) or h
    d = getattr(c, "head_dim", None) or c.hidden_size // h
    return ScoredModel(
        logits=as_logits_fn(hf),
        tokenizer=tokenizer,
        kv_elements_per_token=2 * g * d * c.num_hidden_layers,
        kind="hf",
        name=name,
        vocab_size=c.vocab_size,
        max_seq_len=getattr(c, "max_position_embeddings", None),
    )


def check_compatible(model: ScoredModel, reference: ScoredModel) -> None:
    if model.vocab_size != reference.vocab_size:
        raise MlakitError(
            f"--reference {reference.name} has vocab size {reference.vocab_size}, "
            f"{model.name} has {model.vocab_size}: they cannot be compared token by token"
        )
