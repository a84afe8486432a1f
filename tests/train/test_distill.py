"""Distillation on tiny models: the student moves towards the teacher; bad input is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlakit.config import ModelConfig
from mlakit.errors import MlakitError
from mlakit.model import Transformer
from mlakit.train import ByteTokenizer
from mlakit.train.distill import DistillConfig, distill
from tests.conftest import build, tiny_mla_config
from tests.train.conftest import write_corpus


def test_distill_reduces_kl_to_teacher(tmp_path: Path) -> None:
    teacher = build(ModelConfig.from_preset("tiny-gqa"), seed=1).save_pretrained(tmp_path / "teacher")
    student = build(tiny_mla_config(), seed=2).save_pretrained(tmp_path / "student")
    train_text = write_corpus(tmp_path)
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("Evaluation text is different from the training text, by design. " * 30)
    config = DistillConfig(
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
        warmup_steps=2,
        train_params="all",
        alpha=1.0,
        eval_windows=4,
        eval_seq_len=64,
    )
    result = distill(
        str(teacher),
        str(student),
        tmp_path / "out",
        config,
        texts=[str(train_text)],
        eval_texts=[str(eval_text)],
        tokenizer=ByteTokenizer(),
    )
    assert result.steps == 12
    assert result.after["kl"] < 0.5 * result.before["kl"]
    assert (tmp_path / "out" / "distill.json").is_file()
    assert Transformer.from_pretrained(tmp_path / "out").config == Transformer.from_pretrained(student).config
    with pytest.raises(MlakitError, match="exists"):
        distill(str(teacher), str(student), tmp_path / "out", config, tokenizer=ByteTokenizer())


def test_distill_rejects_non_mlakit_student(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="not an mlakit checkpoint"):
        distill("smollm2-135m", str(tmp_path), tmp_path / "out")


def test_distill_rejects_windows_beyond_the_students_context(tmp_path: Path) -> None:
    teacher = build(ModelConfig.from_preset("tiny-gqa"), seed=1).save_pretrained(tmp_path / "teacher")
    student_model = build(tiny_mla_config(), seed=2)
    student = student_model.save_pretrained(tmp_path / "student")
    too_long = student_model.config.max_seq_len + 1
    with pytest.raises(MlakitError, match="--seq-len .* exceeds the student's context"):
        distill(
            str(teacher), str(student), tmp_path / "out", DistillConfig(seq_len=too_long), tokenizer=ByteTokenizer()
        )
    assert not (tmp_path / "out").exists()
