"""mlakit.io: safe file/directory writes keep the previous good version; JSON errors name the file."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlakit
from mlakit import io
from mlakit.errors import MlakitError

PACKAGE = Path(mlakit.__file__).parent


def test_write_file_replaces_and_keeps_previous_on_failure(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    io.write_text(p, "one")
    assert p.read_text() == "one"

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        io.write_file(p, fail)
    assert p.read_text() == "one"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]  # no temporary left behind
    io.write_json(p, {"x": 1})
    assert io.read_json(p) == {"x": 1}
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_write_dir_swaps_complete_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    swaps: list[bool] = []
    real = io._exchange
    monkeypatch.setattr(io, "_exchange", lambda a, b: swaps.append(exchange and real(a, b)) or swaps[-1])
    out = tmp_path / "out"
    io.write_dir(out, lambda d: (d / "v").write_text("1"))
    with pytest.raises(MlakitError, match="already exists"):
        io.write_dir(out, lambda d: (d / "v").write_text("2"))

    def fail(d: Path) -> None:
        (d / "v").write_text("broken")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        io.write_dir(out, fail, overwrite=True)
    assert (out / "v").read_text() == "1"
    assert io.write_dir(out, lambda d: (d / "w").write_text("2") and "done", overwrite=True) == "done"
    assert sorted(p.name for p in out.iterdir()) == ["w"]  # the new directory, not a merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if exchange and sys.platform == "linux":
        assert swaps == [True]  # ext4/tmpfs/xfs/btrfs swap in one step; the fallback is for the rest


def test_write_dir_refuses_a_file_and_names_an_unwritable_parent(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(MlakitError, match="not a directory"):
        io.write_dir(tmp_path / "f", lambda d: None, overwrite=True)
    with pytest.raises(MlakitError, match="cannot write under"):
        io.write_dir(tmp_path / "f" / "sub", lambda d: None)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_dir_restores_a_version_left_aside_and_clears_litter(tmp_path: Path) -> None:
    """A writer killed between the two renames of the fallback left ``out`` missing: the next write restores it."""
    pid = _dead_pid()
    aside = tmp_path / f".out.{pid}.abc.old"
    (aside / "d").mkdir(parents=True)
    (aside / "d" / "v").write_text("previous")
    (tmp_path / f".out.{pid}.xyz.partial").mkdir()
    (tmp_path / f".other.{pid}.xyz.partial").mkdir()  # another output's: not ours to touch
    live = tmp_path / f".out.{os.getpid()}.live.partial"
    live.mkdir()  # a live writer's (this process): kept
    with pytest.raises(MlakitError, match="already exists"):
        io.write_dir(tmp_path / "out", lambda d: None)
    assert (tmp_path / "out" / "v").read_text() == "previous"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", f".other.{pid}.xyz.partial", live.name])


def test_write_file_clears_dead_writers_temporaries(tmp_path: Path) -> None:
    stale = tmp_path / f".a.bin.{_dead_pid()}.q.partial"
    stale.write_bytes(b"half")
    io.write_bytes(tmp_path / "a.bin", b"ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"a": 1', r"bad\.json is not valid JSON \(line 1, column 8\): Expecting ',' delimiter"),
        (b"{'a': 1}", r"bad\.json is not valid JSON \(line 1, column 2\): Expecting property name enclosed in"),
        (b"", r"bad\.json is not valid JSON \(line 1, column 1\): Expecting value"),
        (b"\xff\xfe{}", r"bad\.json is not valid JSON: not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, r"bad\.json: cannot read JSON"),
    ],
    ids=["truncated", "single-quotes", "empty", "binary", "too-deep"],
)
def test_read_json_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    with pytest.raises(MlakitError, match=message):
        io.read_json(p)


def test_read_json_object_and_lines(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(MlakitError, match=r"x\.json does not hold a JSON object \(found list\)"):
        io.read_json_object(p)
    with pytest.raises(MlakitError, match=r"missing\.json: no such file \(expected a checkpoint\)"):
        io.read_json(tmp_path / "missing.json", what="a checkpoint")
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"step": 1}\n\n{"step": 2\n')
    with pytest.raises(MlakitError, match=r"m\.jsonl is not valid JSON \(line 3, column 11\)"):
        io.read_json_lines(lines)


# calls that rename, replace or stage files: only mlakit/io.py may make them
_RENAMERS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}
_STAGERS = {"mkdtemp", "mkstemp", "NamedTemporaryFile", "TemporaryDirectory"}


def test_renames_happen_only_in_mlakit_io() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if (owner, node.attr) in _RENAMERS or node.attr in _STAGERS or node.attr == "rename":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {owner}.{node.attr}")
    assert not found, "rename/replace/temp staging outside mlakit/io.py:\n" + "\n".join(found)
