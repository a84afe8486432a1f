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
