"""The one tokenizer wrapper: bytes, or a Hugging Face tokenizer, behind one small interface.

Training, conversion, evaluation and the engine all need the same few things from a tokenizer —
``encode`` without special tokens, ``decode``, the vocabulary size, the end-of-sequence id and the
chat template — and call it the Hugging Face way (``tok(text, add_special_tokens=False)``) in the
corpus code. :class:`ByteTokenizer` and :class:`HFTokenizer` both provide all of it.

Two loaders: :func:`load_tokenizer` takes what ``mlakit train --tokenizer`` accepts and raises when
it cannot; :func:`saved_tokenizer` reads the tokenizer saved beside a checkpoint and returns
``None`` when there is none (a checkpoint may come without one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mlakit.errors import MlakitError
from mlakit.packaged import packaged_file

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What mlakit needs from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): no files, no unknown tokens, no special tokens."""

    name = "byte"
    vocab_size = 256
    eos_token_id: int | None = None
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        """Hugging Face calling convention, for code written against ``transformers`` tokenizers."""
        return {"input_ids": self.encode(text)}


class HFTokenizer:
    """A ``transformers`` tokenizer: ``encode`` without special tokens, ``decode``, the chat template.

    Attributes:
        tok: the wrapped ``transformers`` tokenizer.
        name: where it came from (for fingerprints and messages).
    """

    def __init__(self, tok: Any, name: str = "") -> None:
        self.tok = tok
        self.name = name or str(getattr(tok, "name_or_path", "") or "hf")

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tok, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok(text, add_special_tokens=False)["input_ids"]]

    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        return self.tok(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, text: str) -> list[int]:
        """``text`` as one user message, with the generation prompt appended."""
        return self.encode_messages([{"role": "user", "content": text}])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (``[{"role": ..., "content": ...}]``) through the chat template, ready for the reply."""
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Any:
        return self.tok.save_pretrained(str(directory))


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``'byte'``, ``'smollm2'`` (SmolLM2's tokenizer from its GGUF), a ``.gguf`` file or an HF directory.

    Raises:
        MlakitError: the tokenizer cannot be found or read.
    """
    if spec == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    path = packaged_file("smollm2-135m", "tokenizer 'smollm2'") if spec == "smollm2" else Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            raise MlakitError(f"tokenizer {spec!r}: expected 'byte', 'smollm2', a .gguf file or a tokenizer directory")
    except MlakitError:
        raise
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise MlakitError(f"tokenizer {spec!r}: cannot load: {e}") from e
    return HFTokenizer(tok, name=spec)


def saved_tokenizer(directory: str | os.PathLike[str]) -> HFTokenizer | None:
    """The tokenizer saved in ``directory`` (``tokenizer.json`` ...), or ``None`` when there is none."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        logger.warning("transformers is not installed: no tokenizer")
        return None
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(d)), name=str(d))
    except Exception as e:  # transformers raises many types for damaged tokenizer files
        logger.warning("%s: cannot load the tokenizer (%s)", d, e)
        return None
