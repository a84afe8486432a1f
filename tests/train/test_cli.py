"""``mlakit train``: trains, resumes on rerun, and fails with one line on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlakit.cli import main
from tests.train.conftest import write_corpus


def test_train_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path)
    args = [
        "train",
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "run"),
        "--size",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-interval",
        "2",
        "--eval-windows",
        "4",
        "--checkpoint-interval",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
    ]
    assert main([*args, "--steps", "2"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert main([*args, "--steps", "4"]) == 0  # rerun with a longer schedule: continues the run
    assert "resuming at step 2" in capsys.readouterr().out
    assert main([*args, "--steps", "4", "--seq-len", "16"]) == 2
    assert "incompatible checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.txt"], "no such file"),
        (["--data", "EMPTY"], "empty"),
        (["--data", "CORPUS", "--batch-size", "512", "--seq-len", "64"], "larger than the training data"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "empty.txt").write_text("")
    corpus = write_corpus(tmp_path)
    extra = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(corpus) if a == "CORPUS" else a for a in extra]
    code = main(["train", "--out", str(tmp_path / "run"), "--size", "tiny", "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
