"""Token data for training: a memory-mapped token file and the window order (tokenizers: :mod:`mlakit.text`).

Text is tokenized once into a flat file of token ids (``uint16`` when the vocabulary fits, else
``uint32``) with a JSON sidecar describing it; training reads it through :class:`numpy.memmap`,
so corpora larger than memory work and every process of a distributed run shares the pages.

A training example is a *window* of ``seq_len + 1`` consecutive tokens (inputs are the first
``seq_len``, targets the last ``seq_len``); window ``i`` starts at token ``i * seq_len``. Each
epoch visits all windows once in an order fixed by ``(seed, epoch)``, so a run's data position is
just ``(epoch, index into that order)``: saving those two numbers makes resumption exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlakit.errors import MlakitError
from mlakit.io import read_json_object, write_file, write_json
from mlakit.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def read_text_files(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    """``(name, text)`` for each file; directories contribute their ``*.txt`` files (recursively).

    Raises:
        MlakitError: no paths, a missing path, or no text at all.
    """
    if not paths:
        raise MlakitError("no training text given: pass one or more text files (--data FILE ...)")
    docs: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise MlakitError(f"{path}: directory holds no *.txt files")
        elif path.is_file():
            files = [path]
        else:
            raise MlakitError(f"{path}: no such file or directory")
        for f in files:
            try:
                docs.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
            except OSError as e:
                raise MlakitError(f"{f}: cannot read: {e}") from e
    if not any(t.strip() for _, t in docs):
        raise MlakitError(f"the corpus ({', '.join(map(str, paths))}) is empty: no text to train on")
    return docs


def build_token_file(
    documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, path: str | os.PathLike[str], *, separator: str = "\n\n"
) -> TokenDataset:
    """Tokenize ``documents`` (``(name, text)`` pairs) into ``path`` (+ ``path.json``), atomically.

    If ``path`` already holds the same documents tokenized by the same tokenizer (by content
    hash) it is reused. Returns the opened :class:`TokenDataset`.

    Raises:
        MlakitError: the documents contain no tokens.
    """
    docs = list(documents)
    digest = hashlib.sha256(tokenizer.name.encode())
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace") + b"\0")
    fingerprint = digest.hexdigest()[:16]
    out = Path(path)
    meta_path = out.with_name(out.name + ".json")
    if out.is_file() and meta_path.is_file():
        try:
            if read_json_object(meta_path).get("fingerprint") == fingerprint:
                return TokenDataset(out)
        except MlakitError:
            pass  # a damaged sidecar: rebuild below
    ids: list[int] = []
    for _, text in docs:
        if text.strip():
            ids.extend(tokenizer.encode(text + separator))
    if not ids:
        raise MlakitError("the corpus is empty: tokenization produced no tokens")
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    write_file(out, arr.tofile)
    meta = {
        "tokens": len(arr),
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        "fingerprint": fingerprint,
        "documents": len(docs),
    }
    write_json(meta_path, meta)
    logger.info("tokenized %d documents into %d tokens at %s", len(docs), len(arr), out)
    return TokenDataset(out)


class TokenDataset:
    """A token file written by :func:`build_token_file`, opened as a read-only memmap.

    Attributes:
        path: the ``.bin`` file; its ``.json`` sidecar gives dtype, vocabulary and fingerprint.
        meta: the sidecar's contents.
        tokens: the memmap ``[N]``.

    Raises:
        MlakitError: the file or sidecar is missing or they disagree.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path.with_name(self.path.name + ".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise MlakitError(f"{self.path}: token file or its .json sidecar is missing")
        self.meta: dict[str, Any] = read_json_object(meta_path, what="a token file's sidecar")
        try:
            self.tokens: np.ndarray = np.memmap(self.path, dtype=np.dtype(self.meta["dtype"]), mode="r")
        except (KeyError, TypeError, ValueError) as e:
            raise MlakitError(f"{self.path}: unreadable token file: {e}") from e
        if len(self.tokens) != self.meta["tokens"]:
            raise MlakitError(f"{self.path}: holds {len(self.tokens)} tokens, its sidecar says {self.meta['tokens']}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of ``seq_len + 1`` tokens (consecutive windows share one token)."""
        return max(0, (len(self.tokens) - 1) // seq_len)

    def windows(self, indices: Sequence[int] | np.ndarray, seq_len: int) -> torch.Tensor:
        """Windows ``indices`` as ``[N, seq_len + 1]`` int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        rows = [np.asarray(self.tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))  # [N, T + 1]


def epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation fixed by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def split_documents(
    documents: Sequence[tuple[str, str]], fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hold out the last ``fraction`` of the text (by characters) as ``(train, held_out)`` documents.

    Raises:
        MlakitError: ``fraction`` outside (0, 1) or a split that leaves either side empty.
    """
    if not 0 < fraction < 1:
        raise MlakitError(f"held-out fraction {fraction!r} must lie in (0, 1)")
    total = sum(len(t) for _, t in documents)
    cut = int(total * (1 - fraction))
    train: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    seen = 0
    for name, text in documents:
        if seen + len(text) <= cut:
            train.append((name, text))
        elif seen >= cut:
            held.append((name, text))
        else:
            k = cut - seen
            train.append((name, text[:k]))
            held.append((name + "#held-out", text[k:]))
        seen += len(text)
    if not any(t.strip() for _, t in train) or not any(t.strip() for _, t in held):
        raise MlakitError(f"holding out {fraction:.0%} of the text leaves nothing to train or evaluate on")
    return train, held
