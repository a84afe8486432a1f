"""Trainer: learns, resumes exactly after a kill, keeps the last good checkpoint, rejects bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlakit.errors import MlakitError
from mlakit.model import Transformer
from mlakit.train import ByteTokenizer, TokenDataset, build_token_file
from mlakit.train.data import read_text_files
from mlakit.train.trainer import LATEST
from tests.train.conftest import tiny_trainer, write_corpus


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_few_steps_reduce_loss(corpus: TokenDataset, tmp_path: Path, kind: str) -> None:
    trainer = tiny_trainer(corpus, tmp_path / "out", kind, max_steps=25, lr=1e-2, warmup_steps=3)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.final_eval_loss is not None
    assert result.final_eval_loss < before - 1.0
    assert result.losses[-1][1] < result.losses[0][1] - 1.0


def test_resume_after_kill_reproduces_loss_curve(tmp_path: Path) -> None:
    corpus = build_token_file(read_text_files([write_corpus(tmp_path, repeats=4)]), ByteTokenizer(), tmp_path / "t.bin")
    assert corpus.num_windows(32) // 4 < 10  # the run crosses an epoch boundary (a new window order)
    opts = dict(max_steps=10, checkpoint_interval=3, recompute_kv=True, micro_batch_size=2)
    whole = tiny_trainer(corpus, tmp_path / "a", **opts).train()

    killed = tiny_trainer(corpus, tmp_path / "b", **opts)
    killed.train(until_step=7)  # dies after step 7; the last checkpoint is step 6
    del killed
    resumed = tiny_trainer(corpus, tmp_path / "b", **opts)
    assert resumed.resume()
    assert resumed.step == 6
    rest = resumed.train()
    assert [s for s, _ in rest.losses] == [7, 8, 9, 10]
    assert rest.losses == whole.losses[6:]  # exact, not approximate
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "loss" in r] == [loss for _, loss in whole.losses]
    # the checkpoint is also an ordinary model directory
    model = Transformer.from_pretrained(rest.checkpoint)
    assert model.config == resumed.model_config


def test_resume_rejects_incompatible_checkpoint(corpus: TokenDataset, tmp_path: Path) -> None:
    tiny_trainer(corpus, tmp_path / "out", max_steps=2, checkpoint_interval=2).train()
    other_model = tiny_trainer(corpus, tmp_path / "out", "mha", max_steps=4)
    with pytest.raises(MlakitError, match="incompatible checkpoint.*model config"):
        other_model.resume()
    other_batch = tiny_trainer(corpus, tmp_path / "out", max_steps=4, batch_size=2)
    with pytest.raises(MlakitError, match="incompatible checkpoint.*batch_size was 4, now 2"):
        other_batch.resume()


def test_crash_during_save_keeps_last_good_checkpoint(
    corpus: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = tiny_trainer(corpus, tmp_path / "out", max_steps=4, checkpoint_interval=2)
    trainer.train(until_step=2)
    good = trainer.latest_checkpoint()
    assert good is not None and good.name == "step-00000002"
    real_save = torch.save

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"half")  # type: ignore[arg-type]
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        trainer.train()
    monkeypatch.undo()
    root = tmp_path / "out" / "checkpoints"
    assert (root / LATEST).read_text() == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-00000002"]  # no half-written leftovers
    again = tiny_trainer(corpus, tmp_path / "out", max_steps=4, checkpoint_interval=2)
    assert again.resume() and again.step == 2


def test_missing_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="no such file"):
        read_text_files([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MlakitError, match="empty"):
        read_text_files([tmp_path / "empty.txt"])
    with pytest.raises(MlakitError, match="no training text"):
        read_text_files([])


def test_batch_larger_than_data(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("a short text of a few dozen bytes only.")
    data = build_token_file(read_text_files([tmp_path / "short.txt"]), ByteTokenizer(), tmp_path / "t.bin")
    with pytest.raises(MlakitError, match="larger than the training data"):
        tiny_trainer(data, tmp_path / "out", batch_size=4, seq_len=32)


def test_train_clears_what_a_killed_run_left_in_checkpoints(corpus: TokenDataset, tmp_path: Path) -> None:
    """A run killed while pruning leaves a half-deleted checkpoint aside: the next run clears it, with no step left."""
    import subprocess
    import sys

    tiny_trainer(corpus, tmp_path / "out", max_steps=2, checkpoint_interval=1).train()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    litter = tmp_path / "out" / "checkpoints" / f".step-00000001.{dead.pid}.abc.partial"
    (litter / "d").mkdir(parents=True)
    again = tiny_trainer(corpus, tmp_path / "out", max_steps=2, checkpoint_interval=1)
    assert again.resume() and again.step == 2
    again.train()  # nothing to train: it still tidies up
    assert not litter.exists()
