"""Train a decoder LM from scratch: AdamW, warmup + cosine, clipping, accumulation, bf16, DDP, resume.

One optimizer step consumes a *global batch* of ``batch_size`` windows (see :mod:`mlakit.train.data`).
With ``W`` processes (``torchrun --nproc_per_node W``) each process takes ``batch_size / W`` of
them and runs them in micro-batches of ``micro_batch_size`` with gradient accumulation;
:class:`~torch.nn.parallel.DistributedDataParallel` averages gradients across processes. Because
every micro-batch has the same number of tokens, the result is the same optimizer step as one
process running the whole global batch (up to floating-point summation order).

Checkpoints (``OUT/checkpoints/step-NNNNNNNN/``) are an ordinary mlakit model directory
(``config.json`` + ``model.safetensors``, loadable by :meth:`Transformer.from_pretrained`) plus
``trainer_state.pt`` (optimizer, step, data position, RNG, the configs). A checkpoint is written
under a temporary directory name and renamed into place, and only then does ``OUT/checkpoints/latest``
(itself replaced atomically) point at it: a crash while saving leaves the last good checkpoint
untouched. :meth:`Trainer.resume` continues from ``latest`` and reproduces the uninterrupted run's
loss curve exactly (same data order, same optimizer state, same schedule).

Metrics go to ``OUT/metrics.jsonl``, one JSON object per step or evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mlakit.attention import MultiHeadLatentAttention
from mlakit.config import ModelConfig
from mlakit.errors import MlakitError
from mlakit.io import read_json_lines, remove_dir, sweep, write_dir, write_text
from mlakit.model import WEIGHTS_FILE, Transformer, fill_tied_head
from mlakit.optim import adamw, bf16_autocast, cosine_lr
from mlakit.train.data import TokenDataset, epoch_order

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
STATE_FORMAT = "mlakit-train-v1"
# fields of TrainConfig that must match to continue a run from its checkpoint
RESUME_FIELDS: tuple[str, ...] = ("seq_len", "batch_size", "seed")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's shape is a separate :class:`ModelConfig`).

    Attributes:
        seq_len: tokens per training window (T).
        batch_size: windows per optimizer step, summed over all processes (global batch).
        micro_batch_size: windows per forward/backward in one process; ``None`` means all of
            that process's share at once. Gradients are accumulated over the micro-batches.
        max_steps: optimizer steps; the cosine schedule ends here.
        lr, min_lr_ratio, warmup_steps: linear warmup to ``lr``, cosine decay to ``lr * min_lr_ratio``.
        weight_decay, betas: AdamW (decay on matrices only, not on norms or biases).
        grad_clip: max global gradient norm; 0 disables clipping.
        bf16: autocast matmuls to bfloat16 (weights and optimizer stay fp32).
        recompute_kv: MLA latent recomputation (see :mod:`mlakit.attention.mla`).
        eval_interval: steps between held-out evaluations (0: only after the last step).
        eval_windows: held-out windows per evaluation.
        checkpoint_interval: steps between checkpoints (0: none, not even at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        seed: model initialisation and data order.
    """

    seq_len: int = 256
    batch_size: int = 16
    micro_batch_size: int | None = None
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False
    recompute_kv: bool = False
    eval_interval: int = 100
    eval_windows: int = 32
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        o = "TrainConfig"
        for name in ("seq_len", "batch_size", "max_steps", "eval_windows", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{o}.{name}={v!r} is invalid: must be a positive integer")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{o}.{name}={v!r} is invalid: must be an integer >= 0")
        if self.micro_batch_size is not None and (
            not isinstance(self.micro_batch_size, int) or self.micro_batch_size <= 0
        ):
            raise ValueError(f"{o}.micro_batch_size={self.micro_batch_size!r} is invalid: must be positive or None")
        if not self.lr > 0:
            raise ValueError(f"{o}.lr={self.lr!r} is invalid: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{o}.min_lr_ratio={self.min_lr_ratio!r} is invalid: must lie in [0, 1]")
        if not self.weight_decay >= 0:
            raise ValueError(f"{o}.weight_decay={self.weight_decay!r} is invalid: must be >= 0")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{o}.betas={self.betas!r} is invalid: two values in [0, 1)")
        if not self.grad_clip >= 0:
            raise ValueError(f"{o}.grad_clip={self.grad_clip!r} is invalid: must be >= 0 (0 disables)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, config: TrainConfig) -> float:
    """:func:`cosine_lr` with ``config``'s schedule."""
    return cosine_lr(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel run (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU).

    Without torchrun's variables (``WORLD_SIZE`` unset or 1) this is a single process on CUDA
    if available, else CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


@dataclass(frozen=True)
class TrainResult:
    """What one :meth:`Trainer.train` call did.

    Attributes:
        losses: ``(step, training loss)`` for each step run in this call (1-based step numbers).
        evals: ``(step, held-out loss)`` for each evaluation in this call.
        step: the last completed step.
        tokens_per_s: training throughput of this call (all processes together).
        checkpoint: the latest checkpoint directory, if any.
    """

    losses: tuple[tuple[int, float], ...]
    evals: tuple[tuple[int, float], ...]
    step: int
    tokens_per_s: float
    checkpoint: Path | None

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


def set_recompute_kv(model: nn.Module, enabled: bool) -> int:
    """Turn MLA latent recomputation on or off in every MLA layer; returns how many layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, MultiHeadLatentAttention):
            m.recompute_kv = enabled
            n += 1
    return n


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) of ``logits [B, T, V]`` against ``targets [B, T]``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Trainer:
    """Trains ``Transformer(model_config)`` on ``train_data``; see the module docstring.

    Example::

        data = build_token_file(read_text_files(["a.txt"]), ByteTokenizer(), "out/train.bin")
        trainer = Trainer(training_config("1m", "mla", vocab_size=256, max_seq_len=256),
                          TrainConfig(seq_len=256, batch_size=16, max_steps=300), data, "out")
        trainer.resume()          # no-op on a fresh directory
        result = trainer.train()

    Raises (constructor): MlakitError when the data cannot fill one global batch, its tokens do
    not fit the vocabulary, or the batch does not split over processes and micro-batches.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        train_data: TokenDataset,
        out_dir: str | os.PathLike[str],
        *,
        val_data: TokenDataset | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = False,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = Path(out_dir)
        self.dist = dist_info or DistInfo()
        self.progress = progress
        c = config
        for name, data in (("training", train_data), ("held-out", val_data)):
            if data is not None and data.vocab_size > model_config.vocab_size:
                raise MlakitError(
                    f"{name} data was tokenized with a {data.vocab_size}-token vocabulary; the model has "
                    f"only {model_config.vocab_size}"
                )
        if c.seq_len > model_config.max_seq_len:
            raise MlakitError(f"seq_len={c.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")
        self.num_windows = train_data.num_windows(c.seq_len)
        if self.num_windows < c.batch_size:
            raise MlakitError(
                f"batch of {c.batch_size} x {c.seq_len} tokens is larger than the training data: "
                f"{len(train_data)} tokens make only {self.num_windows} windows of {c.seq_len}; "
                "use a smaller --batch-size/--seq-len or more text"
            )
        if val_data is not None and val_data.num_windows(c.seq_len) == 0:
            raise MlakitError(f"held-out data has {len(val_data)} tokens, fewer than one window of {c.seq_len}")
        w = self.dist.world_size
        if c.batch_size % w:
            raise MlakitError(f"batch_size={c.batch_size} must be divisible by the number of processes ({w})")
        self.local_batch = c.batch_size // w
        self.micro = c.micro_batch_size or self.local_batch
        if self.local_batch % self.micro:
            raise MlakitError(
                f"micro_batch_size={self.micro} must divide the per-process batch {self.local_batch} "
                f"(batch_size={c.batch_size} over {w} processes)"
            )
        torch.manual_seed(c.seed)
        self.model = Transformer(model_config).to(self.dist.device)
        set_recompute_kv(self.model, c.recompute_kv)
        self.optimizer = adamw(self.model, c.lr, c.betas, c.weight_decay)
        self.ddp: DistributedDataParallel | None = None
        if w > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.step = 0
        self.epoch = 0
        self.pos = 0  # windows of the current epoch's order already consumed
        self._order: tuple[int, np.ndarray] | None = None

    # -- paths -------------------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` points at, or ``None`` on a fresh directory."""
        pointer = self.checkpoint_root / LATEST
        if not pointer.is_file():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise MlakitError(f"{pointer} points at {path}, which is not a complete checkpoint")
        return path

    # -- data --------------------------------------------------------------------------------------

    def _global_batch(self) -> np.ndarray:
        """The next ``batch_size`` window indices; the epoch's remainder is skipped."""
        b = self.config.batch_size
        if self.pos + b > self.num_windows:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.num_windows, self.config.seed, self.epoch))
        idx = self._order[1][self.pos : self.pos + b]
        self.pos += b
        return idx

    def _micro_batches(self, idx: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share of a global batch, as ``(inputs [m, T], targets [m, T])`` micro-batches."""
        r = self.dist.rank
        mine = idx[r * self.local_batch : (r + 1) * self.local_batch]
        for i in range(0, self.local_batch, self.micro):
            w = self.train_data.windows(mine[i : i + self.micro], self.config.seq_len).to(self.dist.device)
            yield w[:, :-1], w[:, 1:]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return bf16_autocast(self.dist.device, self.config.bf16)

    # -- training ----------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over the next global batch; returns its mean loss (all processes)."""
        c = self.config
        net = self.ddp or self.model
        net.train()
        n = self.local_batch // self.micro
        total = torch.zeros((), device=self.dist.device)
        for i, (inputs, targets) in enumerate(self._micro_batches(self._global_batch())):
            sync = self.ddp is None or i == n - 1
            with contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                with self._autocast():
                    logits = net(inputs)  # [m, T, V]
                loss = lm_loss(logits, targets)
                (loss / n).backward()
            total += loss.detach() / n
        if c.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.world_size > 1:
            dist.all_reduce(total)
            total /= self.dist.world_size
        self.step += 1
        return float(total)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss on the first ``eval_windows`` held-out windows (all processes)."""
        if self.val_data is None:
            raise MlakitError("no held-out data to evaluate on")
        t = self.config.seq_len
        n = min(self.config.eval_windows, self.val_data.num_windows(t))
        mine = np.arange(n)[self.dist.rank :: self.dist.world_size]
        self.model.eval()
        stats = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # [loss sum, tokens]
        for i in range(0, len(mine), self.micro):
            w = self.val_data.windows(mine[i : i + self.micro], t).to(self.dist.device)
            with self._autocast():
                logits = self.model(w[:, :-1])
            stats[0] += lm_loss(logits, w[:, 1:]).double() * w[:, 1:].numel()
            stats[1] += w[:, 1:].numel()
        if self.dist.world_size > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[1])

    def train(self, until_step: int | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (or stop after ``until_step``, as if killed there).

        Evaluates every ``eval_interval`` steps and after the last step; checkpoints every
        ``checkpoint_interval`` steps and after the last step.
        """
        c = self.config
        stop = c.max_steps if until_step is None else min(until_step, c.max_steps)
        losses: list[tuple[int, float]] = []
        evals: list[tuple[int, float]] = []
        tokens_per_step = c.batch_size * c.seq_len
        from tqdm.auto import tqdm

        self._trim_metrics()
        if self.dist.is_main and self.checkpoint_root.is_dir():
            sweep(self.checkpoint_root)  # what a killed run left while writing or pruning checkpoints
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not (self.progress and self.dist.is_main), unit="step")
        start = time.perf_counter()
        first = self.step
        try:
            while self.step < stop:
                loss = self.train_step()
                losses.append((self.step, loss))
                self._log({"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, c)})
                elapsed = time.perf_counter() - start
                rate = (self.step - first) * tokens_per_step / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
                last = self.step == c.max_steps
                if self.val_data is not None and ((c.eval_interval and self.step % c.eval_interval == 0) or last):
                    val = self.evaluate()
                    evals.append((self.step, val))
                    self._log({"step": self.step, "eval_loss": val})
                    logger.info("step %d: held-out loss %.4f", self.step, val)
                if c.checkpoint_interval and (self.step % c.checkpoint_interval == 0 or last):
                    self.save_checkpoint()
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        rate = (self.step - first) * tokens_per_step / max(elapsed, 1e-9)
        return TrainResult(tuple(losses), tuple(evals), self.step, rate, self.latest_checkpoint())

    def _trim_metrics(self) -> None:
        """Drop metrics past the current step: a killed run logged steps that this run will redo
        (all of them when no checkpoint was reached), and its last line may be torn."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        rows = read_json_lines(self.metrics_path, torn_tail=True)
        kept = [row for row in rows if row.get("step", 0) <= self.step]
        if len(kept) != len(rows) or not self.metrics_path.read_bytes().endswith(b"\n"):
            write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "pos": self.pos,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "train_config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "data_fingerprint": self.train_data.fingerprint,
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNNNN`` atomically (main process), then point ``latest`` at it."""
        name = f"step-{self.step:08d}"
        final = self.checkpoint_root / name
        if self.dist.is_main:
            root = self.checkpoint_root
            root.mkdir(parents=True, exist_ok=True)
            sweep(root)  # a killed run may have been deleting an old checkpoint
            pointer = root / LATEST
            current = pointer.read_text().strip() if pointer.is_file() else None
            if current != name:  # re-saving the step we resumed from would only risk it

                def write(tmp: Path) -> None:
                    self.model.save_pretrained(tmp, metadata={"train_step": self.step})
                    torch.save(self._state(), tmp / STATE_FILE)

                # overwrite: a `final` already there was left by a run that died before moving `latest`
                write_dir(final, write, overwrite=True)
                write_text(pointer, name)
                self._prune(keep=name)
        if self.dist.world_size > 1:
            dist.barrier()
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(p for p in self.checkpoint_root.glob("step-*") if p.is_dir())
        for p in done[: max(0, len(done) - self.config.keep_checkpoints)]:
            if p.name != keep:
                remove_dir(p)

    def resume(self, checkpoint: str | os.PathLike[str] | None = None) -> bool:
        """Continue from ``checkpoint`` (default: ``latest`` in the output directory).

        Returns ``False`` (and changes nothing) when there is no checkpoint to resume from.

        Raises:
            MlakitError: the checkpoint is damaged or belongs to a different model, data or batch.
        """
        path = Path(checkpoint) if checkpoint is not None else self.latest_checkpoint()
        if path is None:
            return False
        try:
            state = torch.load(path / STATE_FILE, map_location=self.dist.device, weights_only=True)
        except Exception as e:  # torch.load raises many types for damaged files
            first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise MlakitError(f"{path}: cannot read {STATE_FILE} (truncated or damaged?): {first}") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MlakitError(f"{path}: not an mlakit training checkpoint")
        self._check_compatible(path, state)
        try:
            weights = fill_tied_head(
                self.model_config, load_file(str(path / WEIGHTS_FILE), device=str(self.dist.device))
            )
        except Exception as e:  # safetensors raises several types for damaged files
            raise MlakitError(f"{path}: cannot read {WEIGHTS_FILE}: {e}") from e
        try:
            self.model.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise MlakitError(f"{path}: incompatible checkpoint: {e}") from e
        self.step, self.epoch, self.pos = int(state["step"]), int(state["epoch"]), int(state["pos"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(_as_tuple(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def _check_compatible(self, path: Path, state: dict[str, Any]) -> None:
        problems = []
        if state.get("model_config") != self.model_config.to_dict():
            problems.append("the model config differs")
        saved = state.get("train_config", {})
        now = self.config.to_dict()
        for name in RESUME_FIELDS:
            if saved.get(name) != now[name]:
                problems.append(f"{name} was {saved.get(name)!r}, now {now[name]!r}")
        if state.get("data_fingerprint") != self.train_data.fingerprint:
            problems.append("the training data differs")
        if problems:
            raise MlakitError(
                f"cannot resume from {path}: incompatible checkpoint ({'; '.join(problems)}); "
                "use a new --out directory or the original settings"
            )


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
