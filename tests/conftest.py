"""Shared test helpers: the one table of numerical tolerances, and small model builders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlakit.config import MLAConfig, ModelConfig
from mlakit.model import Transformer

# max abs difference allowed between a fast path and the reference path, per compute dtype
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tiny_mla_config(**attention: object) -> ModelConfig:
    base = ModelConfig.from_preset("tiny-mla")
    assert isinstance(base.attention, MLAConfig)
    return dataclasses.replace(base, attention=dataclasses.replace(base.attention, **attention))


def build(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    # make norms non-trivial so a missing norm shows up as a difference
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def save_byte_tokenizer(directory: object, chat_template: str | None = None) -> None:
    """Save a byte-level BPE tokenizer (no merges: one token per byte) beside a tiny checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
