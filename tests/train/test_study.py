"""The study runs every variant on the same tokens, resumes finished variants, and writes its report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlakit.errors import MlakitError
from mlakit.train import TrainConfig
from mlakit.train.study import StudyConfig, StudyVariant, run_study, write_report
from tests.train.conftest import SENTENCES


def test_study_rows_resume_and_report(tmp_path: Path) -> None:
    docs = [(f"doc{i}", "".join(SENTENCES) * 20) for i in range(3)]
    train = TrainConfig(
        seq_len=32, batch_size=4, max_steps=3, warmup_steps=1, eval_interval=0, eval_windows=4, checkpoint_interval=0
    )
    config = StudyConfig(size="tiny", variants=("mqa", "mla:8"), train=train)
    rows = run_study(config, tmp_path / "work", train_docs=docs[:2], eval_docs=docs[2:])
    assert [r["variant"] for r in rows] == ["mqa", "mla-r8"]
    assert [r["kv_values_per_token_per_layer"] for r in rows] == [32, 16]  # 2 * d_h; r + d_h / 2
    assert all(r["tokens"] == 3 * 4 * 32 for r in rows)
    again = run_study(
        dataclasses.replace(config, variants=("mla:8",)), tmp_path / "work", train_docs=docs[:2], eval_docs=docs[2:]
    )
    assert again == rows[1:]  # reused, not retrained (seconds would differ)
    md, png = write_report(rows, tmp_path / "docs", config, command="mlakit study", machine="test")
    text = md.read_text()
    assert "| mla-r8 | 16 | 64 |" in text and "Best MLA: kv_lora_rank=8" in text
    assert png is not None and png.stat().st_size > 0


def test_bad_variant() -> None:
    with pytest.raises(MlakitError, match="study variant"):
        StudyVariant.parse("mla")
