"""Distil a converted MLA model back towards its original: KL to the teacher's logits plus LM loss.

A conversion (``mlakit convert``) replaces each layer's K/V projections by a low-rank latent and
loses a little quality. A short fine-tune of the student on text the teacher scores recovers much
of it::

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, next token)

averaged over tokens. Training text is the calibration side of the built-in corpus (or the
user's files) — never the evaluation side — and perplexity is measured before and after on the
evaluation side with :func:`mlakit.eval.run.evaluate_models`, the same numbers ``mlakit eval`` prints.

By default only attention weights train (``train_params='attention'``): conversion changed only
those, and freezing the rest skips most weight gradients (the 49k x 576 head alone is a fifth of
SmolLM2-135M).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlakit.errors import MlakitError
from mlakit.io import write_dir, write_json
from mlakit.model import Transformer, is_mlakit_checkpoint
from mlakit.optim import DistillConfig, fit_to_teacher
from mlakit.text.corpus import Corpus, default_corpus, files_corpus, token_windows

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class DistillResult:
    """Before/after evaluation (dicts as :func:`mlakit.eval.run.evaluate_models` returns) and the run."""

    before: dict[str, Any]
    after: dict[str, Any]
    steps: int
    tokens: int
    seconds: float
    losses: tuple[tuple[int, float, float, float], ...]  # (step, loss, kl, lm)
    out: Path

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def distill(
    teacher: str,
    student: str,
    out: str | os.PathLike[str],
    config: DistillConfig | None = None,
    *,
    texts: list[str] | None = None,
    eval_texts: list[str] | None = None,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DistillResult:
    """Fine-tune ``student`` (an mlakit checkpoint) towards ``teacher`` and save it to ``out``.

    Args:
        teacher: the original model: an mlakit checkpoint, HF directory, ``.gguf`` or alias
            (anything :func:`mlakit.eval.models.open_model` opens).
        student: the converted mlakit checkpoint directory.
        out: where the distilled checkpoint goes (written to a temporary name, then renamed).
        texts: training text files; default the calibration side of the built-in corpus.
        eval_texts: evaluation text files; default the evaluation side of the built-in corpus.
        tokenizer: overrides the checkpoints' tokenizer (called like a Hugging Face tokenizer).

    Raises:
        MlakitError: unreadable models, vocabularies that differ, no tokenizer, too little text,
            or ``out`` exists without ``overwrite``.
    """
    from mlakit.eval.models import ScoredModel, open_model
    from mlakit.eval.run import evaluate_models

    c = config or DistillConfig()
    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise MlakitError(f"{out_dir} exists; pass --overwrite to replace it")
    if not is_mlakit_checkpoint(student):
        raise MlakitError(f"--student {student}: not an mlakit checkpoint (expected the output of mlakit convert)")
    train_corpus: Corpus = files_corpus(texts) if texts else default_corpus("calibration")
    eval_corpus: Corpus = files_corpus(eval_texts) if eval_texts else default_corpus("evaluation")
    teacher_m = open_model(teacher)
    student_m = open_model(student)
    if teacher_m.vocab_size != student_m.vocab_size:
        raise MlakitError(f"teacher vocabulary {teacher_m.vocab_size} != student vocabulary {student_m.vocab_size}")
    tokenizer = tokenizer or student_m.tokenizer or teacher_m.tokenizer
    if tokenizer is None:
        raise MlakitError("neither the teacher nor the student has a tokenizer")
    model = Transformer.from_pretrained(student)
    for name in ("seq_len", "eval_seq_len"):
        if getattr(c, name) > model.config.max_seq_len:
            raise MlakitError(
                f"--{name.replace('_', '-')} {getattr(c, name)} exceeds the student's context "
                f"({model.config.max_seq_len} tokens)"
            )
    scored = ScoredModel(
        logits=lambda t: model(t),
        tokenizer=tokenizer,
        kv_elements_per_token=model.config.cache_elements_per_token(),
        kind="mlakit",
        name=str(student),
        vocab_size=model.config.vocab_size,
        max_seq_len=model.config.max_seq_len,
    )

    def evaluate_now(label: str) -> dict[str, Any]:
        model.eval()
        return evaluate_models(
            scored, teacher_m, eval_corpus, windows=c.eval_windows, seq_len=c.eval_seq_len, progress=progress
        ) | {"label": label}

    before = evaluate_now("before")
    logger.info("before: perplexity %.3f (teacher %.3f)", before["perplexity"], before["reference_perplexity"])

    windows = token_windows(train_corpus, tokenizer, num_windows=c.steps * c.batch_size, seq_len=c.seq_len)
    if len(windows) < c.batch_size:
        raise MlakitError(f"{train_corpus.name}: {len(windows)} windows of {c.seq_len} tokens, fewer than one batch")
    step, seconds, losses = fit_to_teacher(model, teacher_m.logits, windows, c, progress=progress)
    after = evaluate_now("after")
    logger.info("after: perplexity %.3f (teacher %.3f)", after["perplexity"], after["reference_perplexity"])
    result = DistillResult(before, after, step, step * c.batch_size * c.seq_len, seconds, tuple(losses), out_dir)
    _save(model, Path(student), out_dir, result, c, teacher)
    return result


def _save(model: Transformer, student: Path, out: Path, result: DistillResult, c: DistillConfig, teacher: str) -> None:
    """Write the distilled checkpoint (+ the student's tokenizer files, + distill.json) atomically."""
    record = {"teacher": teacher, "student": str(student), "config": dataclasses.asdict(c)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, metadata={"distillation": record})
        for name in TOKENIZER_FILES:
            if (student / name).is_file():
                shutil.copy2(student / name, tmp / name)
        write_json(tmp / "distill.json", result.to_dict() | record)

    write_dir(out, write, overwrite=True)  # distill() refused an existing out without --overwrite
