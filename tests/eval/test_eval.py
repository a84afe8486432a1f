"""Corpora (disjoint splits), metrics (perplexity, agreement, KL) and the eval/convert CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mlakit.cli import main
from mlakit.eval.metrics import evaluate
from mlakit.text.corpus import default_corpus
from tests.convert.conftest import make_hf_model


def test_default_splits_are_disjoint_and_nonempty() -> None:
    cal, ev = default_corpus("calibration"), default_corpus("evaluation")
    assert [p.genre for p in cal.genres] == [p.genre for p in ev.genres]
    for c, e in zip(cal.genres, ev.genres):
        assert c.names() and e.names() and not set(c.names()) & set(e.names())
    assert "calibration" in cal.name and "evaluation" in ev.name


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
    assert r["seq_len"] == 64 and list(r["lengths"]) == ["64"] and list(r["lengths"]["64"]["genres"]) == ["files"]
    assert r["lengths"]["64"]["overall"]["perplexity"] == r["perplexity"]
    # kv_fraction 1 with full RoPE is the original model, exactly
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=1e-4)
    assert r["top1_agreement"] == 1.0 and r["kl"] < 1e-6
    assert r["kv_bytes_per_token"] == r["reference_kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 2  # bf16
    assert main(["convert", "--model", str(src), "--out", str(out)]) == 2  # exists: refuse, keep it
    assert (out / "conversion.json").is_file()


def test_tradeoff_writes_table_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_hf_model(tmp_path / "src", "llama")
    out = tmp_path / "tr"
    args = ["tradeoff", "--model", str(src), "--kv-fraction", "1,0.5", "--out", str(out), "--windows", "1"]
    args += ["--lengths", "32", "96", "--calibration-windows", "1", "--generation-prompt", "40"]
    args += ["--heal-steps", "2", "--heal-seq-len", "64", "--heal-windows", "1", "--svd-baseline"]
    args += ["--heal-distill-steps", "2", "--heal-distill-seq-len", "64"]
    (tmp_path / "eval.txt").write_text("Evaluation prose about caches and attention. " * 40)
    (tmp_path / "cal.txt").write_text("Calibration prose, other words entirely; " * 80)
    args += ["--text", str(tmp_path / "eval.txt"), "--calibration-text", str(tmp_path / "cal.txt")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "calibration:" in text and "evaluation:" in text and "weight-SVD" in text and "x ppl@96" in text
    assert "cal.txt" in text and "eval.txt" in text
    assert "heal: 2 local steps per layer + 2 end-to-end steps" in text
    result = json.loads((out / "tradeoff.json").read_text())
    assert (out / "tradeoff.png").stat().st_size > 0
    rows = {(r["variant"], r["kv_fraction"]): r for r in result["rows"]}
    # full, decoupled and healed at both fractions; the SVD baseline at the largest only
    assert len(rows) == 7 and ("weight-SVD (full)", 0.5) not in rows
    for length in ("32", "96"):
        exact = rows[("full (pca)", 1.0)]["lengths"][length]["overall"]
        assert exact["perplexity_ratio"] == pytest.approx(1.0, rel=1e-4) and exact["top1_agreement"] == 1.0
        assert list(rows[("decoupled + heal", 0.5)]["lengths"][length]["genres"]) == ["files"]
    assert rows[("full (pca)", 0.5)]["kv_bytes_per_token"] <= result["original"]["kv_bytes_per_token"] // 2
    assert rows[("decoupled + heal", 0.5)]["healed"] and rows[("decoupled + heal", 0.5)]["heal_seconds"] >= 0
    # the healed row heals a copy of the training-free conversion, which keeps its own scores
    plain, healed = (rows[(v, 0.5)]["lengths"]["96"]["overall"]["kl"] for v in ("decoupled (pca)", "decoupled + heal"))
    assert plain != healed
    gen = rows[("full (pca)", 1.0)]["generation"]
    assert gen["prefix_match"] == 32 and gen["positional_agreement"] == 1.0  # the exact conversion generates the same
