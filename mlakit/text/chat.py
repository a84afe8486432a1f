"""Chat-framed windows: corpus text as requests to an instruct model, framed the way it is served.

An instruct model meets its chat template on every request: the template's system prompt at
position 0, role headers, and the generation prompt (the assistant header) as the last tokens
before its answer. Plain text windows hold none of that, and a conversion calibrated, healed and
scored on plain text alone can keep its perplexity and lose the chat. Measured on
SmolLM2-135M-Instruct (docs/conversion.md "Chat"), asked to summarise 340 to 2,850 tokens of
licence text, the original never ends its turn at once (probability <= 0.002), while the 50%
full-RoPE conversion calibrated on plain text does on 4 of 8 requests (0.89 at 2,159 tokens).
With every calibration window framed it answers all of them, at perplexity x1.083 instead of
x1.060 (512 tokens); with half of them (the default) 9 of 10, at x1.067. Healing on framed
windows does the same for the decoupled form, which training-free ends every request.

A framed window keeps its length ``S`` and its own text::

    prefix (template up to the user's content: system prompt, user header)
    + ask ("Summarize the following text ...") + the window's first tokens
    + suffix (end of the user turn, then the generation prompt)

so the window's last position is where the model chooses between answering and ending its turn,
and everything the template adds (special tokens, system prompt) is seen at the positions where
serving puts it. The prefix and suffix come from rendering the template around a placeholder, so
any template works (ChatML, Llama 3, Gemma); the turn-ending token is the suffix's first token
when that is a special token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), else EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.text.corpus import Corpus, token_windows

# what a framed window asks for; window i takes ASKS[i % len(ASKS)]
ASKS: tuple[str, ...] = (
    "Summarize the following text in three sentences.",
    "What is this text about? Answer briefly.",
    "Explain the main points of this document.",
    "List the key facts in the following text.",
)
_PLACEHOLDER = "\x00mlakit-chat-content\x00"
# share of windows framed when the tokenizer has a chat template and the caller does not say
DEFAULT_CHAT_FRACTION = 0.5


@dataclass(frozen=True)
class ChatFrame:
    """A tokenizer's chat template, cut around one user message.

    Attributes:
        prefix: ids before the user's content (system prompt, user header).
        suffix: ids after it (end of the user turn, the generation prompt).
        end_of_turn: the id that ends a turn, what a model that declines to answer emits first.
        asks: :data:`ASKS` encoded, each followed by a blank line.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    end_of_turn: int
    asks: tuple[tuple[int, ...], ...]

    def frame(self, i: int, text: torch.Tensor, length: int) -> torch.Tensor:
        """``prefix + asks[i % len(asks)] + text[:k] + suffix`` of exactly ``length`` ids (``text [>= k]``).

        Raises: MlakitError when the frame alone does not leave a token of text.
        """
        ask = self.asks[i % len(self.asks)]
        k = length - len(self.prefix) - len(ask) - len(self.suffix)
        if k < 1 or text.numel() < k:
            raise MlakitError(
                f"a chat-framed window of {length} tokens leaves {k} tokens of text (template "
                f"{len(self.prefix) + len(self.suffix)} + ask {len(ask)}): use longer windows"
            )
        parts = [torch.tensor(self.prefix + ask), text[:k].to(torch.long), torch.tensor(self.suffix)]
        return torch.cat(parts)


def _hf(tokenizer: Any) -> Any:
    """The ``transformers`` tokenizer behind ``tokenizer`` (mlakit's HFTokenizer wraps one as ``tok``)."""
    return getattr(tokenizer, "tok", tokenizer)


def _encode(tok: Any, text: str) -> list[int]:
    return [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def chat_frame(tokenizer: Any) -> ChatFrame | None:
    """The frame of ``tokenizer``'s chat template; ``None`` when it has none (a base model).

    Raises: MlakitError when the template does not render a user message's content verbatim.
    """
    tok = _hf(tokenizer)
    if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
        return None
    text = tok.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    name = getattr(tok, "name_or_path", "") or "tokenizer"
    if not isinstance(text, str) or text.count(_PLACEHOLDER) != 1:
        raise MlakitError(f"{name}: its chat template does not show a user message verbatim")
    before, after = text.split(_PLACEHOLDER)
    prefix, suffix = _encode(tok, before), _encode(tok, after)
    if not suffix:
        raise MlakitError(f"{name}: its chat template adds no generation prompt")
    special = set(getattr(tok, "all_special_ids", ()) or ()) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    eos = getattr(tok, "eos_token_id", None)
    end = suffix[0] if suffix[0] in special or eos is None else int(eos)
    asks = tuple(tuple(_encode(tok, a + "\n\n")) for a in ASKS)
    return ChatFrame(tuple(prefix), tuple(suffix), end, asks)


def framed_rows(n: int, fraction: float, period: int = 1) -> list[int]:
    """Which of ``n`` windows to frame: a ``fraction`` spread evenly over rounds and genres.

    Windows come round robin over ``period`` genres (:func:`mlakit.text.corpus.token_windows`):
    window ``i`` is genre ``i % period`` in round ``i // period``. It is framed when
    ``j = round + genre`` steps ``floor(j * fraction)`` up, so every genre gets its share and every
    prefix of the rounds is balanced (0.5 of 4 genres: a checkerboard).
    """
    if not 0 <= fraction <= 1:
        raise MlakitError(f"chat fraction {fraction} must lie in [0, 1]")
    period = max(1, period)
    rows = []
    for i in range(n):
        j = i // period + i % period
        if math.floor((j + 1) * fraction) > math.floor(j * fraction):
            rows.append(i)
    return rows


def frame_windows(
    windows: torch.Tensor, frame: ChatFrame | None, fraction: float, period: int = 1
) -> tuple[torch.Tensor, int]:
    """``windows [N, S]`` with :func:`framed_rows` of them framed as chat requests of ``S`` tokens.

    Returns ``(windows, how many were framed)``; unchanged (and 0) without a ``frame`` (a tokenizer
    with no chat template) or with ``fraction`` 0. The input is not modified.

    Raises: MlakitError when ``S`` is too short to hold the frame and some text.
    """
    rows = framed_rows(len(windows), fraction, period) if frame is not None else []
    if frame is None or not rows:
        return windows, 0
    out = windows.clone()
    for r in rows:
        out[r] = frame.frame(r, windows[r], windows.shape[1])
    return out, len(rows)


def answer_rows(windows: torch.Tensor, frame: ChatFrame | None) -> torch.Tensor:
    """``[N]`` bool: which of ``windows [N, S]`` end with ``frame``'s generation prompt, i.e. are
    framed requests whose last position is where the model answers or ends its turn (all false
    without a frame)."""
    if frame is None or len(frame.suffix) > windows.shape[1]:
        return torch.zeros(len(windows), dtype=torch.bool)
    suffix = torch.tensor(frame.suffix, dtype=windows.dtype)
    return (windows[:, -len(frame.suffix) :] == suffix).all(dim=-1)


def resolve_fraction(fraction: float | None, frame: ChatFrame | None) -> float:
    """``fraction``, or (``None``) :data:`DEFAULT_CHAT_FRACTION` when there is a chat ``frame``, else 0."""
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise MlakitError(f"chat fraction {fraction} must lie in [0, 1]")
        return fraction
    return DEFAULT_CHAT_FRACTION if frame is not None else 0.0


def mixed_windows(
    corpus: Corpus, tokenizer: Any, *, num_windows: int, seq_len: int, chat: float | None
) -> tuple[torch.Tensor, str]:
    """:func:`~mlakit.text.corpus.token_windows` of ``corpus`` with a ``chat`` share framed
    (:func:`resolve_fraction`: ``None`` is 0.5 for a tokenizer with a chat template, else 0).

    Returns ``([N, seq_len] ids, a description of the text)`` for records and logs.
    """
    windows = token_windows(corpus, tokenizer, num_windows=num_windows, seq_len=seq_len)
    frame = chat_frame(tokenizer)
    framed, n = frame_windows(windows, frame, resolve_fraction(chat, frame), period=len(corpus.genres))
    name = corpus.name + (f", {n} of {len(framed)} windows framed as chat requests" if n else "")
    return framed, name
