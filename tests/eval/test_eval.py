"""Corpora (disjoint splits), metrics (perplexity, agreement, KL) and the eval/convert CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mlakit.cli import main
from mlakit.errors import MlakitError
from mlakit.eval.corpus import default_corpus, files_corpus, token_windows
from mlakit.eval.metrics import evaluate
from tests.convert.conftest import make_hf_model


def test_default_splits_are_disjoint_and_nonempty() -> None:
    cal, ev = default_corpus("calibration"), default_corpus("evaluation")
    assert cal.documents and ev.documents
    assert not {n for n, _ in cal.documents} & {n for n, _ in ev.documents}
    assert "calibration" in cal.name and "evaluation" in ev.name


def test_files_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="no such file"):
        files_corpus([str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MlakitError, match="empty"):
        files_corpus([str(empty)])


def test_token_windows_shape_and_short_text(tmp_path: Path) -> None:
    class Tok:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) % 50 for c in text]}

    f = tmp_path / "t.txt"
    f.write_text("abc " * 100)
    w = token_windows(files_corpus([str(f)]), Tok(), num_windows=3, seq_len=50)
    assert w.shape == (3, 50)
    with pytest.raises(MlakitError, match="fewer than one window"):
        token_windows(files_corpus([str(f)]), Tok(), num_windows=1, seq_len=10_000)


def test_metrics_uniform_model_and_self_agreement() -> None:
    vocab = 16
    tokens = torch.randint(0, vocab, (3, 20))

    def uniform(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*t.shape, vocab)

    r = evaluate(uniform, tokens)
    assert r.perplexity == pytest.approx(vocab)
    assert r.tokens == 3 * 19

    def peaked(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(t.roll(-1, 1), vocab).float() * 5

    s = evaluate(peaked, tokens, reference=peaked)
    assert s.top1_agreement == 1.0 and s.kl == pytest.approx(0.0, abs=1e-9)
    u = evaluate(uniform, tokens, reference=peaked)
    assert u.kl > 0 and u.reference_perplexity < u.perplexity
    assert math.isclose(u.reference_perplexity, s.perplexity)


def test_cli_convert_then_eval_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_hf_model(tmp_path / "src", "qwen2")
    out = tmp_path / "mla"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert (
        main(
            [
                "convert",
                "--model",
                str(src),
                "--out",
                str(out),
                "--kv-fraction",
                "1",
                "--rope",
                "full",
                "--calibration-windows",
                "2",
                "--calibration-seq-len",
                "64",
            ]
        )
        == 0
    )
    assert (out / "conversion.json").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--reference",
                str(src),
                "--text",
                str(text),
                "--windows",
                "2",
                "--seq-len",
                "64",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "reference_perplexity", "top1_agreement", "kl", "kv_bytes_per_token"):
        assert key in r
    # kv_fraction 1 with full RoPE is the original model, exactly
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=1e-4)
    assert r["top1_agreement"] == 1.0 and r["kl"] < 1e-6
    assert r["kv_bytes_per_token"] == r["reference_kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 2  # bf16
    assert main(["convert", "--model", str(src), "--out", str(out)]) == 2  # exists: refuse, keep it
    assert (out / "conversion.json").is_file()


def test_tradeoff_writes_table_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_hf_model(tmp_path / "src", "llama")
    out = tmp_path / "tr"
    assert (
        main(
            [
                "tradeoff",
                "--model",
                str(src),
                "--kv-fraction",
                "1,0.5",
                "--out",
                str(out),
                "--windows",
                "1",
                "--seq-len",
                "32",
                "--calibration-windows",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "calibration:" in text and "evaluation:" in text and "weight-SVD" in text
    result = json.loads((out / "tradeoff.json").read_text())
    assert (out / "tradeoff.png").stat().st_size > 0
    rows = {(r["variant"], r["kv_fraction"]): r for r in result["rows"]}
    assert len(rows) == 6
    assert rows[("full (pca)", 1.0)]["perplexity_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert rows[("full (pca)", 0.5)]["kv_bytes_per_token"] <= result["original"]["kv_bytes_per_token"] // 2
