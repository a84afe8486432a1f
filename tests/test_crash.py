"""SIGKILL at random moments: `convert`, `export-hf`, `distill` and `train` never leave a broken output.

Each command runs as a real process (forked from a warm interpreter, :mod:`tests.forkserver`) and
is killed with SIGKILL, at least :data:`KILLS` times per command. Half of the kills fall at a
uniformly random moment of the run; the other half wait until the process has started writing
(its temporary sibling, named with its pid, appears) and then fall uniformly within the time a
write takes, so the write phases are hit on purpose. After every kill:

- ``convert``/``export-hf``/``distill`` (run with ``--overwrite`` over a previous good output A):
  the output directory is exactly A or exactly the new output B (every tensor equal to one of the
  two uninterrupted references), and it loads.
- ``train`` (a checkpoint every step): ``latest`` names a complete checkpoint, every checkpoint
  left loads, and rerunning the command resumes and reproduces the uninterrupted run's loss curve
  exactly.

A final uninterrupted run must leave no temporary siblings behind (the litter of killed writers
is cleared). The whole module takes about a minute or two on two cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlakit.io import write_dir
from mlakit.model import Transformer
from tests.convert.conftest import make_hf_model

pytestmark = pytest.mark.slow

KILLS = 24  # SIGKILLs that reach a live process, per command
ROOT = Path(__file__).resolve().parent.parent
TEXT = "The latent vector is cached instead of the keys and values. Each head decompresses its own. " * 300


class ForkServer:
    """Client of :mod:`tests.forkserver`: ``run(argv) -> pid``, ``wait(pid) -> exit status``."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "forkserver.py")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, argv: list[str]) -> int:
        return int(self._ask({"run": argv, "log": str(self.log)})["pid"])

    def wait(self, pid: int) -> int:
        return int(self._ask({"wait": pid})["status"])

    def run_ok(self, argv: list[str]) -> None:
        status = self.wait(self.run(argv))
        assert status == 0, f"mlakit {' '.join(argv)} exited {status}:\n{self.log.read_text()[-3000:]}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    s = ForkServer(tmp_path_factory.mktemp("logs") / "mlakit.log")
    yield s
    s.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    make_hf_model(root / "llama")
    (root / "text.txt").write_text(TEXT)
    return root


def _temps(directory: Path, pid: int) -> list[str]:
    """Temporary siblings a writer with ``pid`` has in ``directory`` (mlakit.io names them ``.NAME.<pid>.*``)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(".") and f".{pid}." in n]


def _poll(until: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until():
            return True
        time.sleep(0.0002)
    return False


@dataclass
class Timing:
    """An uninterrupted run: its length, and when its write phase began (both from the start)."""

    total: float
    write_start: float


def timed_run(server: ForkServer, argv: list[str], watch: Path) -> Timing:
    t0 = time.monotonic()
    pid = server.run(argv)
    seen = _poll(lambda: bool(_temps(watch, pid)), timeout=120)
    t_write = time.monotonic() - t0
    status = server.wait(pid)
    total = time.monotonic() - t0
    assert status == 0, server.log.read_text()[-3000:]
    assert seen, "the write phase was never seen: is the output written through mlakit.io?"
    print(f"{argv[0]}: {total:.3f} s, writing from {t_write:.3f} s")
    return Timing(total, min(t_write, total))


@dataclass
class KillStats:
    killed: int = 0  # SIGKILL reached a live process
    mid_write: int = 0  # ... that had a temporary sibling in place (killed while writing)
    finished: int = 0  # the run ended before the kill


def kill_once(
    server: ForkServer, argv: list[str], watch: Path, timing: Timing, rng: random.Random, i: int, stats: KillStats
) -> None:
    """Run ``argv`` and SIGKILL it: on even ``i`` at a uniform moment of the run, on odd ``i`` within its writes.

    A run that ends before its kill shortens ``timing`` (the machine is shared: runs vary in speed).
    """
    t0 = time.monotonic()
    pid = server.run(argv)
    if i % 2 == 0:
        delay = rng.uniform(0, timing.total)
        _poll(lambda: time.monotonic() - t0 >= delay, timeout=delay + 1)
    else:
        _poll(lambda: bool(_temps(watch, pid)), timeout=timing.total * 5 + 5)
        time.sleep(rng.uniform(0, max(timing.total - timing.write_start, 0.002)))
    litter = bool(_temps(watch, pid))
    at = time.monotonic() - t0
    os.kill(pid, signal.SIGKILL)  # a zombie (already exited, not yet reaped) ignores it
    status = server.wait(pid)
    if status == -signal.SIGKILL:
        stats.killed += 1
        stats.mid_write += litter
    else:
        assert status == 0, server.log.read_text()[-3000:]
        stats.finished += 1
        shrink = at / timing.total
        timing.total, timing.write_start = at, timing.write_start * shrink


def kill_runs(
    server: ForkServer, argv: list[str], watch: Path, timing: Timing, name: str, after: Callable[[int], None]
) -> KillStats:
    """Kill runs of ``argv`` until :data:`KILLS` kills reached a live process; ``after(i)`` checks each."""
    rng = random.Random(name)
    stats = KillStats()
    i = 0
    while stats.killed < KILLS:
        assert i < 3 * KILLS, f"{name}: {stats.finished} of {i} runs ended before their kill"
        kill_once(server, argv, watch, timing, rng, i, stats)
        after(i)
        i += 1
    return stats


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def which(out: Path, refs: dict[str, dict[str, torch.Tensor]]) -> str:
    """Which reference the directory ``out`` holds, by its tensors (fails for anything else)."""
    assert out.is_dir(), f"{out} is missing after a kill"
    got = tensors(out)
    for name, ref in refs.items():
        if same(got, ref):
            return name
    raise AssertionError(f"{out} holds neither the previous nor the new output: {sorted(os.listdir(out))}")


def restore(src: Path, out: Path) -> None:
    write_dir(out, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True), overwrite=True)


def overwrite_scenario(
    server: ForkServer,
    work: Path,
    name: str,
    argv_a: list[str],
    argv_b: list[str],
    out: Path,
    load: Callable[[Path], object],
) -> KillStats:
    """Output A in place; kill runs that overwrite it with B; after each, ``out`` is A or B and loads."""
    ref_a, ref_b = work / f"{name}-ref-a", work / f"{name}-ref-b"
    server.run_ok([*argv_a, str(ref_a)] if name == "export" else _with_out(argv_a, ref_a))
    timing = timed_run(server, [*argv_b, str(ref_b)] if name == "export" else _with_out(argv_b, ref_b), work)
    refs = {"previous": tensors(ref_a), "new": tensors(ref_b)}
    assert not same(refs["previous"], refs["new"])
    argv = [*argv_b, str(out), "--overwrite"] if name == "export" else [*_with_out(argv_b, out), "--overwrite"]
    restore(ref_a, out)

    seen: list[str] = []

    def after(i: int) -> None:
        got = which(out, refs)
        seen.append(got)
        load(out)
        if got == "new":
            restore(ref_a, out)

    stats = kill_runs(server, argv, out.parent, timing, name, after)
    assert "previous" in seen  # kills before the swap: the previous output survived them
    server.run_ok(argv)
    assert which(out, refs) == "new"
    leftovers = [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]
    assert not leftovers, f"temporary siblings left after a clean run: {leftovers}"
    return stats


def _with_out(argv: list[str], out: Path) -> list[str]:
    return [*argv, "--out", str(out)]


def check_stats(stats: KillStats, name: str) -> None:
    print(f"{name}: {stats.killed} kills ({stats.mid_write} mid-write), {stats.finished} runs finished first")
    assert stats.mid_write >= 5, f"{name}: only {stats.mid_write} kills landed in a write phase"


def _convert_argv(work: Path, fraction: str) -> list[str]:
    return [
        "convert",
        "--model",
        str(work / "llama"),
        "--calibration-text",
        str(work / "text.txt"),
        "--calibration-windows",
        "4",
        "--calibration-seq-len",
        "64",
        "--kv-fraction",
        fraction,
    ]


def test_convert_survives_sigkill(server: ForkServer, work: Path) -> None:
    stats = overwrite_scenario(
        server,
        work,
        "convert",
        _convert_argv(work, "0.5"),
        _convert_argv(work, "0.25"),
        work / "mla",
        Transformer.from_pretrained,
    )
    check_stats(stats, "convert")


def test_export_hf_survives_sigkill(server: ForkServer, work: Path) -> None:
    from mlakit.interop import load_hf

    student = work / "student"
    if not student.is_dir():
        server.run_ok(_with_out(_convert_argv(work, "0.5"), student))
    stats = overwrite_scenario(
        server,
        work,
        "export",
        ["export-hf", str(student), "--dtype", "fp32"],
        ["export-hf", str(student), "--dtype", "bf16", "--max-shard-size", "100KB"],  # several shards
        work / "hf",
        load_hf,
    )
    check_stats(stats, "export-hf")


def test_distill_survives_sigkill(server: ForkServer, work: Path) -> None:
    student = work / "student"
    if not student.is_dir():
        server.run_ok(_with_out(_convert_argv(work, "0.5"), student))
    text = str(work / "text.txt")

    def argv(steps: int) -> list[str]:
        return [
            "distill",
            "--teacher",
            str(work / "llama"),
            "--student",
            str(student),
            "--text",
            text,
            "--eval-text",
            text,
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--eval-windows",
            "1",
            "--eval-seq-len",
            "32",
            "--json",
        ]

    stats = overwrite_scenario(
        server, work, "distill", argv(1), argv(3), work / "distilled", Transformer.from_pretrained
    )
    check_stats(stats, "distill")


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _check_checkpoints(run: Path) -> None:
    root = run / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        latest = root / pointer.read_text().strip()
        assert (latest / "trainer_state.pt").is_file(), f"latest -> {latest.name}, not a complete checkpoint"
    for ckpt in sorted(root.glob("step-*")) if root.is_dir() else []:
        Transformer.from_pretrained(ckpt)  # raises on a partial checkpoint
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        assert state["step"] == int(ckpt.name.removeprefix("step-"))


def test_train_survives_sigkill_and_resumes_exactly(server: ForkServer, work: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [
            "train",
            "--data",
            str(work / "text.txt"),
            "--out",
            str(out),
            "--size",
            "tiny",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--steps",
            "8",
            "--warmup",
            "2",
            "--checkpoint-interval",
            "1",
            "--eval-interval",
            "0",
            "--eval-windows",
            "2",
        ]

    ref = work / "train-ref"
    t0 = time.monotonic()
    pid = server.run(argv(ref))
    seen = _poll(lambda: bool(_temps(ref / "checkpoints", pid)), timeout=120)
    timing = Timing(0.0, time.monotonic() - t0)
    assert server.wait(pid) == 0 and seen
    timing.total = time.monotonic() - t0
    want = _losses(ref)
    assert [s for s, _ in want] == list(range(1, 9))

    run = work / "train-run"

    def after(i: int) -> None:
        _check_checkpoints(run)
        server.run_ok(argv(run))  # resumes from `latest` (or starts over when there is none)
        assert _losses(run) == want, f"kill {i}: the resumed loss curve differs from the uninterrupted run's"
        leftovers = [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]
        assert not leftovers, f"temporary checkpoint siblings left after a clean run: {leftovers}"
        shutil.rmtree(run)  # the next kill hits a fresh run

    check_stats(kill_runs(server, argv(run), run / "checkpoints", timing, "train", after), "train")
