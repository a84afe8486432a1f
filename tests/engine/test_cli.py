"""``mlakit generate`` and ``mlakit bench`` on a tiny checkpoint with a byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlakit import ModelConfig
from mlakit.cli import main
from tests.conftest import build, save_byte_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-mla")
    build(ModelConfig.from_preset("tiny-mla")).save_pretrained(d)
    save_byte_tokenizer(d)
    return d


def test_generate_streams_text(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--model", str(checkpoint), "hello", "--max-tokens", "6", "--threads", "1"])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")
    rc = main(
        [
            "generate",
            "--model",
            str(checkpoint),
            "a",
            "b",
            "--max-tokens",
            "3",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "1",
            "--stop",
            "zz",
            "--cache-dtype",
            "int8",
            "--block-size",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("[0] ") and "\n[1] " in out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--top-p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--kv-memory", "0"], "kv_memory"),
        (["--max-tokens", "-2"], "max_new_tokens"),
    ],
)
def test_generate_bad_values(checkpoint: Path, argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(checkpoint), "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_generate_refuses_a_non_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "bench",
            "--preset",
            "tiny-gqa",
            "--batch",
            "1",
            "2",
            "--context",
            "16",
            "--steps",
            "2",
            "--kv-memory",
            "1MiB",
            "--threads",
            "1",
            "--dtype",
            "int8",
            "--prefill-len",
            "40",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["batch"] for p in out["decode"]] == [1, 2] and out["capacity"]["sequences"] >= 0
    assert out["bandwidth"]["read_GBps"] > 0
    assert out["weights"] == "int8" and out["prefill"]["tokens"] == 40 and out["prefill"]["tokens_per_s"] > 0


def test_generate_verbose_reports_speed(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-v", "generate", "--model", str(checkpoint), "hello", "--max-tokens", "5", "--ignore-eos", "--no-chat"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "tokens/s after the first" in err and "prompt tokens/s" in err
