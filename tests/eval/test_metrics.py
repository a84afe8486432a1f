"""Pooling results, bounded-memory evaluation, and the generation checks (degenerate text, agreement)."""

from __future__ import annotations

import pytest
import torch

from mlakit.eval.metrics import evaluate, greedy_agreement, is_degenerate, pool


class Tok:
    def decode(self, ids: list[int]) -> str:
        return "".join(" " if i == 0 else chr(ord("a") + i % 26) for i in ids)


def test_is_degenerate() -> None:
    tok = Tok()
    assert is_degenerate([], tok)
    assert is_degenerate([5] * 30 + [1, 2], tok)  # one token repeated
    assert is_degenerate([0, 0, 0, 1, 0, 0, 0], tok)  # mostly blanks
    assert not is_degenerate(list(range(1, 20)), tok)
    assert not is_degenerate([1, 2] * 10, tok)  # a loop of two tokens is not flagged (50%)


def test_greedy_agreement() -> None:
    prompt = torch.tensor([[1, 2, 3]])
    ref = [4, 5, 6, 7, 8, 9, 10, 11]

    def reference(p: torch.Tensor, n: int) -> list[int]:
        assert p.shape == (1, 3)
        return ref[:n]

    def model(p: torch.Tensor, n: int) -> list[int]:
        return [4, 5, 9, 7, 8, 9, 10][:n]  # diverges at 2, agrees again after; stops one early

    r = greedy_agreement(model, reference, prompt, tokenizer=Tok(), new_tokens=8)
    assert r["prefix_match"] == 2 and r["positional_agreement"] == r["agreement"] == 6 / 8
    assert not r["degenerate"] and r["model_text"] == Tok().decode([4, 5, 9, 7, 8, 9, 10])
    same = greedy_agreement(reference, reference, prompt, tokenizer=Tok(), new_tokens=8)
    assert same["prefix_match"] == 8 and same["agreement"] == 1.0
    with pytest.raises(ValueError, match="expected"):
        greedy_agreement(model, reference, torch.tensor([1, 2]), tokenizer=Tok())


def test_pool_and_batching_do_not_change_numbers() -> None:
    vocab = 11
    torch.manual_seed(0)
    w = torch.nn.Embedding(vocab, vocab)

    def model(t: torch.Tensor) -> torch.Tensor:
        return w(t).detach()

    def ref(t: torch.Tensor) -> torch.Tensor:
        return w(t).detach() * 0.5

    windows = torch.randint(0, vocab, (6, 40))
    whole = evaluate(model, windows, reference=ref)
    one_by_one = evaluate(model, windows, reference=ref, batch_size=1)
    pooled = pool([evaluate(model, windows[:2], reference=ref), evaluate(model, windows[2:], reference=ref)])
    for r in (one_by_one, pooled):
        assert r.tokens == whole.tokens == 6 * 39
        for k in ("perplexity", "reference_perplexity", "top1_agreement", "kl"):
            assert getattr(r, k) == pytest.approx(getattr(whole, k), rel=1e-9)
    with pytest.raises(ValueError):
        pool([])


def test_evaluate_matches_a_plain_float64_computation() -> None:
    # evaluate() forms log-probabilities in float32 (sums in float64); the plain path is float64 throughout
    import math

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    vocab = 4096
    windows = torch.randint(0, vocab, (2, 300), generator=gen)
    table_a = torch.randn(vocab, vocab, generator=gen) * 3
    table_b = table_a + torch.randn(vocab, vocab, generator=gen)

    def model_a(t: torch.Tensor) -> torch.Tensor:
        return table_a[t]

    def model_b(t: torch.Tensor) -> torch.Tensor:
        return table_b[t]

    res = evaluate(model_b, windows, reference=model_a)
    target = windows[:, 1:]
    lp = F.log_softmax(table_b[windows][:, :-1].double(), -1)
    rp = F.log_softmax(table_a[windows][:, :-1].double(), -1)
    nll = -lp.gather(-1, target.unsqueeze(-1)).mean().item()
    kl = (rp.exp() * (rp - lp)).sum(-1).mean().item()
    agree = (rp.argmax(-1) == lp.argmax(-1)).double().mean().item()
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert res.kl == pytest.approx(kl, rel=1e-5)
    assert res.top1_agreement == pytest.approx(agree)


def test_score_memo_gives_the_same_numbers_and_runs_the_reference_once() -> None:
    from mlakit.eval.metrics import ScoreMemo

    gen = torch.Generator().manual_seed(1)
    vocab = 300
    table = torch.randn(vocab, vocab, generator=gen)
    calls: list[int] = []

    def ref(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return table[t]

    def model(t: torch.Tensor) -> torch.Tensor:
        return table[t] + 0.3 * torch.sin(table[t] * 7)

    windows = torch.randint(0, vocab, (3, 1500), generator=gen)  # > _ROWS positions per window
    plain = evaluate(model, windows, reference=ref)
    memo = ScoreMemo(ref)
    base = evaluate(memo, windows)  # the reference scored as a model, then reused as reference
    for _ in range(2):
        kept = evaluate(model, windows, reference=memo)
        assert kept == plain  # bit-identical: the same float32 log-probabilities
    assert base.perplexity == plain.reference_perplexity
    assert len(calls) == 3 + 3  # the plain run's three batches, then the memo's three, once
    other = evaluate(model, windows[:, :700], reference=memo)  # new windows (two batches) are scored afresh
    assert other == evaluate(model, windows[:, :700], reference=ref) and len(calls) == 6 + 2 + 2
