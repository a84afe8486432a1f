"""Calibration, healing and evaluation frame part of their windows as chat requests when the
source's tokenizer has a chat template (mlakit.text.chat), and none when it has not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlakit.cli import main
from mlakit.convert import calibrate
from mlakit.convert.heal import HealConfig, distill_windows, heal_text, heal_windows
from mlakit.eval.models import open_model
from mlakit.eval.run import evaluate_models
from mlakit.text.chat import chat_frame, framed_rows
from mlakit.text.corpus import default_corpus
from tests.convert.conftest import make_hf_model
from tests.text.test_chat import CHATML
from tests.text.test_corpus import _genres


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a ChatML template on its byte tokenizer (markers as plain bytes)."""
    from transformers import AutoTokenizer

    path = make_hf_model(tmp_path_factory.mktemp("chat-llama"), "llama")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def genres(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _genres(tmp_path_factory.mktemp("text"))


def _framed(windows: torch.Tensor, prefix: tuple[int, ...]) -> list[int]:
    return [i for i, w in enumerate(windows) if tuple(w[: len(prefix)].tolist()) == prefix]


def test_calibration_frames_half_its_windows_by_default(chat_model: Path, genres) -> None:  # type: ignore[no-untyped-def]
    corpus = default_corpus("calibration", genres)
    cal = calibrate(str(chat_model), windows=6, seq_len=160, corpus=corpus)
    frame = chat_frame(cal.loaded.tokenizer)
    assert frame is not None and cal.windows is not None
    assert _framed(cal.windows, frame.prefix) == framed_rows(6, 0.5, period=3)
    assert "3 of 6 windows framed as chat requests" in cal.corpus
    plain = calibrate(str(chat_model), windows=6, seq_len=160, corpus=corpus, chat=0.0)
    assert plain.windows is not None and _framed(plain.windows, frame.prefix) == []
    assert "framed" not in plain.corpus
    # the framed windows change what the conversion is fitted to
    assert not torch.allclose(cal.sigma[0], plain.sigma[0])


def test_no_template_no_framing(tiny_llama: Path, genres) -> None:  # type: ignore[no-untyped-def]
    cal = calibrate(str(tiny_llama), windows=4, seq_len=128, corpus=default_corpus("calibration", genres))
    assert "framed" not in cal.corpus


def test_heal_windows_framed_by_config(chat_model: Path, genres) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    frame = chat_frame(tok)
    assert frame is not None
    corpus = default_corpus("calibration", genres)
    cfg = HealConfig(windows=6, seq_len=160, distill_steps=3, distill_batch=2, distill_seq_len=128)
    assert len(_framed(heal_windows(tok, cfg, corpus), frame.prefix)) == 3
    assert len(_framed(distill_windows(tok, cfg, corpus), frame.prefix)) == 3  # type: ignore[arg-type]
    text = heal_text(tok, cfg, corpus)  # what heal trains on: the framed end-to-end windows are its answer rows
    assert text.distill is not None and text.answers is not None
    assert text.answers.nonzero().flatten().tolist() == _framed(text.distill, frame.prefix)
    assert heal_text(tok, HealConfig(windows=6, seq_len=160, distill_steps=0), corpus).answers is None
    none = HealConfig(windows=6, seq_len=160, chat=0.0)
    assert _framed(heal_windows(tok, none, corpus), frame.prefix) == []
    with pytest.raises(Exception, match="HealConfig.chat"):
        HealConfig(chat=1.5)


def test_eval_reports_answers_where_windows_hold_a_request(chat_model: Path, tmp_path: Path, genres) -> None:  # type: ignore[no-untyped-def]
    model = open_model(str(chat_model))
    reference = open_model(str(make_hf_model(tmp_path / "r", "llama", seed=1)))
    r = evaluate_models(model, reference, default_corpus("evaluation", genres), lengths=[64, 256])
    assert "chat" not in r["lengths"]["64"]  # the frame and the ask alone take ~100 tokens
    c = r["lengths"]["256"]["chat"]
    assert c["requests"] == 3 and 0 <= c["answers"] <= 3 and 0 <= c["reference_answers"] <= 3  # 8192 // 256 >= 3 genres
    assert 0 < c["end_of_turn"] < 1 and 0 < c["reference_end_of_turn"] < 1


def test_fewer_requests_at_longer_lengths(chat_model: Path, genres, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import mlakit.eval.run as run

    monkeypatch.setattr(run, "CHAT_TOKENS", 512)  # the default 8192 at 4096 tokens, scaled to this model
    r = evaluate_models(open_model(str(chat_model)), None, default_corpus("evaluation", genres), lengths=[128, 256])
    assert [r["lengths"][n]["chat"]["requests"] for n in ("128", "256")] == [3, 2]
    assert "reference_answers" not in r["lengths"]["256"]["chat"]


def test_cli_refuses_a_share_outside_0_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "x", "--out", "y", "--calibration-chat", "2"])
    assert e.value.code == 2
    assert "expected auto or a share between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("share, framed", [(None, "2 of 4 windows framed"), ("0", None)])
def test_cli_convert_records_the_framing(
    chat_model: Path, tmp_path: Path, share: str | None, framed: str | None
) -> None:
    import json

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(20000)))
    out = tmp_path / "out"
    args = ["convert", "--model", str(chat_model), "--out", str(out), "--calibration-text", str(text)]
    args += ["--calibration-windows", "4", "--calibration-seq-len", "160"]
    assert main(args + ([] if share is None else ["--calibration-chat", share])) == 0
    corpus = json.loads((out / "conversion.json").read_text())["calibration"]["corpus"]
    assert (framed in corpus) if framed else ("framed" not in corpus)
