"""Chat-framed windows (mlakit.text.chat) and the answer check that reads them (mlakit.eval.metrics)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mlakit.errors import MlakitError
from mlakit.eval.metrics import ScoreMemo, answer_check
from mlakit.text.chat import ASKS, answer_rows, chat_frame, frame_windows, framed_rows, resolve_fraction

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_CHATML = "<|im_start|>system\nYou are helpful.<|im_end|>\n" + CHATML


def _tokenizer(template: str | None, special: bool = True):  # type: ignore[no-untyped-def]
    """Byte-level BPE (one token per byte) plus, if ``special``, ChatML's two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2])
    if special:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        fast.chat_template = template
    return fast


def test_frame_cuts_the_template_around_the_user_message() -> None:
    tok = _tokenizer(SYSTEM_CHATML)
    frame = chat_frame(tok)
    assert frame is not None
    assert tok.decode(list(frame.prefix)) == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(list(frame.suffix)) == "<|im_end|>\n<|im_start|>assistant\n"
    assert frame.end_of_turn == tok.convert_tokens_to_ids("<|im_end|>")
    # a rendered request and the frame's pieces are the same ids
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == [*frame.prefix, *tok("hi", add_special_tokens=False)["input_ids"], *frame.suffix]


def test_no_template_no_frame_and_plain_end_of_turn_falls_back_to_eos() -> None:
    assert chat_frame(_tokenizer(None)) is None
    assert resolve_fraction(None, chat_frame(_tokenizer(None))) == 0.0
    assert resolve_fraction(None, chat_frame(_tokenizer(CHATML))) == 0.5
    plain = _tokenizer(CHATML, special=False)  # the markers are ordinary bytes: no special token ends a turn
    frame = chat_frame(plain)
    assert frame is not None and frame.end_of_turn == plain.eos_token_id


def test_framed_rows_spread_over_genres_and_rounds() -> None:
    rows = framed_rows(32, 0.5, period=4)
    assert len(rows) == 16
    assert Counter(r % 4 for r in rows) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert framed_rows(4, 0.5, period=4) == [1, 3]
    assert framed_rows(8, 0.0, period=4) == []
    assert framed_rows(8, 1.0, period=4) == list(range(8))
    assert len(framed_rows(48, 0.25, period=4)) == 12
    with pytest.raises(MlakitError, match="chat fraction"):
        framed_rows(4, 1.5)


def test_frame_windows_keeps_length_and_the_windows_own_text() -> None:
    tok = _tokenizer(SYSTEM_CHATML)
    frame = chat_frame(tok)
    assert frame is not None
    windows = torch.randint(40, 200, (8, 160))
    out, n = frame_windows(windows, frame, 0.5, period=4)
    assert n == 4 and out.shape == windows.shape
    assert torch.equal(windows[0], windows.clone()[0])  # the input is not modified
    rows = framed_rows(8, 0.5, period=4)
    for r in range(8):
        if r not in rows:
            assert torch.equal(out[r], windows[r])
            continue
        ask = tok(ASKS[r % len(ASKS)] + "\n\n", add_special_tokens=False)["input_ids"]
        head = len(frame.prefix) + len(ask)
        k = 160 - head - len(frame.suffix)
        assert out[r, : len(frame.prefix)].tolist() == list(frame.prefix)
        assert out[r, len(frame.prefix) : head].tolist() == ask
        assert torch.equal(out[r, head : head + k], windows[r, :k])
        assert out[r, head + k :].tolist() == list(frame.suffix)
    assert frame_windows(windows, chat_frame(_tokenizer(None)), 0.5)[1] == 0
    with pytest.raises(MlakitError, match="use longer windows"):
        frame_windows(windows[:, :40], frame, 1.0)


def test_answer_rows_are_the_framed_requests() -> None:
    frame = chat_frame(_tokenizer(SYSTEM_CHATML))
    assert frame is not None
    windows = torch.randint(40, 200, (8, 160))
    out, _ = frame_windows(windows, frame, 0.5, period=4)
    assert answer_rows(out, frame).nonzero().flatten().tolist() == framed_rows(8, 0.5, period=4)
    assert not answer_rows(windows, frame).any()  # plain text never ends with the generation prompt
    assert not answer_rows(out, None).any() and answer_rows(out, None).shape == (8,)


def test_answer_check_counts_turns_ended_at_once() -> None:
    end, vocab = 3, 10
    requests = torch.tensor([[1, 2, 4], [1, 2, 5], [1, 2, 6]])

    def declines_after_5(tokens: torch.Tensor) -> torch.Tensor:  # [1, T] -> [1, T, V]
        logits = torch.zeros(1, tokens.shape[1], vocab)
        logits[0, -1, end if int(tokens[0, -1]) == 5 else 7] = 5.0
        return logits

    def always_answers(tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, tokens.shape[1], vocab)
        logits[0, -1, 7] = 5.0
        return logits

    memo = ScoreMemo(always_answers)
    r = answer_check(declines_after_5, requests, end, reference=memo)
    assert r["requests"] == 3 and r["answers"] == 2 and r["reference_answers"] == 3
    peak, rest = torch.tensor([0.0] * 9 + [5.0]).softmax(-1)[[-1, 0]].tolist()  # the peak's and any other's
    assert r["end_of_turn"] == pytest.approx((peak + 2 * rest) / 3, rel=1e-5)
    assert len(memo.last) == 3  # the reference's requests were kept for the next row
    assert answer_check(declines_after_5, requests, end, reference=memo)["reference_answers"] == 3
