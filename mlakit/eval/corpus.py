"""Real text that exists on any machine with Python, split into disjoint calibration/evaluation sets.

Sources, in order of preference:

1. Debian's ``python3-doc`` reStructuredText sources (``/usr/share/doc/python3*/html/_sources``),
   English prose with code samples;
2. otherwise the docstrings of the standard library's own source files (read with :mod:`ast`,
   never imported).

The split is by document: a document goes to evaluation iff ``crc32(name) % 4 == 0`` (about a
quarter of the documents), so calibration and evaluation text never overlap, on every machine.
"""

from __future__ import annotations

import ast
import glob
import logging
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mlakit.errors import MlakitError

logger = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class Corpus:
    """Named documents and where they came from.

    Attributes:
        name: human-readable description of the source (printed by the CLI).
        documents: ``(name, text)`` pairs in a fixed order.
    """

    name: str
    documents: tuple[tuple[str, str], ...]

    def text(self) -> str:
        return "\n\n".join(t for _, t in self.documents)


def _python_doc_dir() -> Path | None:
    for d in sorted(glob.glob("/usr/share/doc/python3*/html/_sources"), reverse=True):
        if any(Path(d).rglob("*.txt")):
            return Path(d)
    return None


def _in_split(name: str, split: Split) -> bool:
    is_eval = zlib.crc32(name.encode()) % 4 == 0
    return is_eval if split == "evaluation" else not is_eval


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc)
    return "\n\n".join(out)


def default_corpus(split: Split) -> Corpus:
    """The built-in corpus, one side of the fixed calibration/evaluation split."""
    doc_dir = _python_doc_dir()
    docs: list[tuple[str, str]] = []
    if doc_dir is not None:
        for p in sorted(doc_dir.rglob("*.txt")):
            rel = str(p.relative_to(doc_dir))
            if _in_split(rel, split):
                docs.append((rel, p.read_text(encoding="utf-8", errors="replace")))
        name = f"python3-doc reST sources ({doc_dir}), {split} split"
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for p in sorted(stdlib.glob("*.py")):
            rel = p.name
            if _in_split(rel, split):
                text = _docstrings(p)
                if text:
                    docs.append((rel, text))
        name = f"standard-library docstrings ({stdlib}), {split} split"
    if not docs:
        raise MlakitError(f"no text found for the default {split} corpus")
    return Corpus(name=name, documents=tuple(docs))


def files_corpus(paths: list[str] | tuple[str, ...]) -> Corpus:
    """User-supplied text files.

    Raises:
        MlakitError: a file is missing, unreadable or empty.
    """
    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise MlakitError(f"--text {p}: no such file")
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MlakitError(f"--text {p}: cannot read: {e}") from e
        if not text.strip():
            raise MlakitError(f"--text {p}: file is empty")
        docs.append((str(path), text))
    return Corpus(name="files: " + ", ".join(paths), documents=tuple(docs))


def token_windows(corpus: Corpus, tokenizer: Any, *, num_windows: int, seq_len: int) -> torch.Tensor:
    """Tokenize the corpus and cut it into non-overlapping windows.

    Returns:
        ``[N, seq_len]`` int64 token ids, ``N <= num_windows`` (fewer only if the text runs out).

    Raises:
        MlakitError: the text is shorter than one window.
    """
    ids: list[int] = []
    need = num_windows * seq_len
    for _, text in corpus.documents:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    n = min(num_windows, len(ids) // seq_len)
    if n == 0:
        raise MlakitError(f"{corpus.name}: only {len(ids)} tokens, fewer than one window of {seq_len}")
    if n < num_windows:
        logger.warning("%s: only %d windows of %d tokens available (asked %d)", corpus.name, n, seq_len, num_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [N, T]
