"""Helpers for training tests: a small synthetic corpus and a tiny trainer factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mlakit.train import ByteTokenizer, TokenDataset, TrainConfig, Trainer, build_token_file, training_config
from mlakit.train.data import read_text_files

SENTENCES = (
    "The latent vector is cached instead of the keys and values. ",
    "Each head decompresses its keys from the shared latent. ",
    "A small model learns the byte statistics of this text quickly. ",
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the CI box is shared: one intra-op thread is faster than two contending ones, and deterministic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_corpus(directory: Path, repeats: int = 40) -> Path:
    path = directory / "corpus.txt"
    path.write_text("".join(SENTENCES[i % 3] for i in range(3 * repeats)))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> TokenDataset:
    return build_token_file(read_text_files([write_corpus(tmp_path)]), ByteTokenizer(), tmp_path / "train.bin")


def tiny_trainer(data: TokenDataset, out: Path, kind: str = "mla", **overrides: object) -> Trainer:
    settings: dict[str, object] = dict(
        seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, eval_interval=0, checkpoint_interval=0
    )
    settings.update(overrides)
    config = training_config("tiny", kind, vocab_size=256, max_seq_len=64)  # type: ignore[arg-type]
    return Trainer(config, TrainConfig(**settings), data, out, val_data=data)  # type: ignore[arg-type]
