"""``mlakit eval`` scores every genre at every context length, and refuses lengths a model cannot take."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mlakit.cli import main
from mlakit.errors import MlakitError
from mlakit.eval.models import open_model
from mlakit.eval.run import evaluate_models, windows_at
from mlakit.text.corpus import default_corpus
from tests.convert.conftest import make_hf_model
from tests.text.test_corpus import _genres


def test_windows_per_genre_shrink_with_length() -> None:
    assert [windows_at(n) for n in (256, 512, 1024, 4096)] == [4, 2, 1, 1]
    assert windows_at(4096, 3) == 3


def test_eval_two_lengths_per_genre_and_overall(tmp_path: Path) -> None:
    model = open_model(str(make_hf_model(tmp_path / "m", "llama", seed=1)))
    reference = open_model(str(make_hf_model(tmp_path / "r", "llama", seed=0)))
    corpus = default_corpus("evaluation", _genres(tmp_path / "text"))
    r = evaluate_models(model, reference, corpus, lengths=[64, 256])
    assert list(r["lengths"]) == ["64", "256"]
    for length, entry in r["lengths"].items():
        genres = entry["genres"]
        assert list(genres) == ["docs", "man", "info"]
        assert entry["windows"] == windows_at(int(length))
        overall = entry["overall"]
        assert overall["tokens"] == sum(g["tokens"] for g in genres.values())
        assert all(g["tokens"] == g["windows"] * (int(length) - 1) for g in genres.values())
        # overall pools tokens: its log-perplexity is the token-weighted mean of the genres'
        pooled = sum(math.log(g["perplexity"]) * g["tokens"] for g in genres.values()) / overall["tokens"]
        assert math.log(overall["perplexity"]) == pytest.approx(pooled)
        for s in (overall, *genres.values()):
            assert s["perplexity_ratio"] == pytest.approx(s["perplexity"] / s["reference_perplexity"])
            assert 0 <= s["top1_agreement"] <= 1 and s["kl"] > 0
    # the top level keeps the first length's overall numbers (the single-length API)
    assert r["seq_len"] == 64 and r["perplexity"] == r["lengths"]["64"]["overall"]["perplexity"]


def test_length_beyond_context_is_refused(tmp_path: Path) -> None:
    model = open_model(str(make_hf_model(tmp_path / "m", "llama")))
    assert model.max_seq_len == 1024
    text = tmp_path / "t.txt"
    text.write_text("words " * 1000)
    from mlakit.text.corpus import files_corpus

    with pytest.raises(MlakitError, match=r"--lengths 2048: beyond the context of .* \(1024 tokens\)"):
        evaluate_models(model, None, files_corpus([str(text)]), lengths=[512, 2048])


def test_cli_eval_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_hf_model(tmp_path / "src", "llama")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["eval", "--model", str(src), "--reference", str(src), "--text", str(text), "--windows", "2"]
    assert main([*argv, "--lengths", "32", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["32"], ["128"])]
    assert [(r[0], r[1], r[2]) for r in rows] == [("32", "files", "2"), ("128", "files", "2")]
    assert all(float(r[6]) == pytest.approx(1.0) and float(r[7]) == 1.0 for r in rows)  # ratio, top-1
    assert main([*argv, "--lengths", "4096"]) == 2
    assert "beyond the context" in capsys.readouterr().err
