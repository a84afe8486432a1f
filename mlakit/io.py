"""The one home of safe writes and JSON reads: every file or directory mlakit produces goes through here.

Two guarantees, whatever moment a process dies at (SIGKILL, power loss after the fsyncs):

- :func:`write_file` — ``path`` holds either its previous content or the complete new content.
  The bytes go to a temporary sibling, are fsynced, renamed over ``path``, and the directory is
  fsynced so the rename itself survives.
- :func:`write_dir` — ``out`` is either the previous good directory or the complete new one.
  The new directory is built as a temporary sibling and fsynced (files and directories); then the
  old one is moved aside and the new one renamed in, in one atomic ``renameat2(RENAME_EXCHANGE)``
  where the kernel and file system allow it, else in two renames; the old one is deleted only
  once the new one is in place. A process killed between the two renames of the fallback leaves
  the old directory aside under a name that the next :func:`write_dir` of the same ``out`` puts
  back before it does anything else.

Temporary siblings are named ``.NAME.<pid>.<random>.partial`` (and ``.old``); a later write of the
same ``NAME`` removes those whose process is gone, so killed runs leave no litter for long.

Renames of files and directories happen here and nowhere else in mlakit (a test checks).

:func:`read_json` is the one JSON reader: a missing, unreadable or malformed file gives one
:class:`~mlakit.errors.MlakitError` that names the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mlakit.errors import MlakitError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PARTIAL = ".partial"
_OLD = ".old"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def cache_dir() -> Path:
    """Root of mlakit's on-disk cache: ``$MLAKIT_CACHE`` or ``~/.cache/mlakit``."""
    env = os.environ.get("MLAKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlakit"


# -- fsync -----------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or directory by path (directories: so the names they hold are durable)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; the data fsyncs still stand
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give (``mkstemp``/``mkdtemp`` make 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


# -- temporary siblings ------------------------------------------------------------------------------


def _temp_prefix(path: Path) -> str:
    """``.NAME.<pid>.``: the pid lets a later writer tell a dead writer's litter from a live one's."""
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# .NAME.<pid>.<mkstemp's random part>.partial|.old
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[^.]+)(?P<kind>\.partial|\.old)")


def _litter(directory: Path, name: str | None = None) -> Iterator[tuple[Path, str, str]]:
    """``(path, NAME, kind)`` of temporaries in ``directory`` left by processes that no longer run."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not _pid_alive(pid):
            yield p, m["name"], m["kind"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear(directory: Path, name: str | None = None) -> None:
    """Put back directories moved aside by writers that died before renaming the new one in; drop the rest."""
    found = sorted(_litter(directory, name), key=lambda t: t[2] != _OLD)  # restore asides first
    for path, original, kind in found:
        target = directory / original
        if kind == _OLD and not target.exists() and (path / "d").exists():
            os.replace(path / "d", target)
            logger.warning("%s: restored the previous version left aside by an interrupted write", target)
        _remove(path)


def sweep(directory: str | os.PathLike[str]) -> None:
    """Clear what killed writers left in ``directory`` (every name; :func:`write_dir` clears its own).

    For directories whose writes are not all repeated, e.g. a checkpoint folder whose old
    checkpoints were being deleted (:func:`remove_dir`) when the process died.
    """
    _clear(Path(directory))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (both exist); False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


# -- writes -------------------------------------------------------------------------------------------


def write_file(path: str | os.PathLike[str], write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, fsync it and rename it over ``path``.

    ``write`` creates the file at the path it is given (``save_file(state, str(tmp))``,
    ``tmp.write_text(...)``). The parent directory is created if needed. Returns what ``write`` returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_PARTIAL, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; outputs get the usual permissions
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return result


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_file` of a UTF-8 text."""
    write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`write_file` of raw bytes."""
    write_file(path, lambda p: p.write_bytes(data))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`write_file` of ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2))


def move_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename a finished file ``src`` to ``dst`` in the same directory (e.g. shards named at the end)."""
    os.replace(src, dst)


def write_dir(
    out: str | os.PathLike[str],
    write: Callable[[Path], T],
    *,
    overwrite: bool = False,
    exists_error: str | None = None,
) -> T:
    """Build a directory with ``write(tmp)`` in a temporary sibling of ``out`` and swap it in.

    ``out`` holds the previous good directory until the new one is complete and fsynced; then the
    two trade places (atomically where the system allows, see the module docstring) and the old
    one is deleted. Returns what ``write`` returns.

    Args:
        out: the directory to produce.
        write: fills the (empty, existing) temporary directory it is given.
        overwrite: replace an existing ``out``; otherwise an existing, non-empty ``out`` is an error.
        exists_error: the message of that error (default: names ``out`` and ``--overwrite``).

    Raises:
        MlakitError: ``out`` exists without ``overwrite``, is a file, or its parent is not writable.
    """
    out = Path(out)
    _clear(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise MlakitError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise MlakitError(exists_error or f"{out} already exists: choose another directory or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=_PARTIAL, dir=out.parent))
    except OSError as e:
        raise MlakitError(f"cannot write under {out.parent}: {e}") from e
    try:
        result = write(tmp)
        os.chmod(tmp, _default_mode(directory=True))
        _fsync_tree(tmp)
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
        else:
            aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=_OLD, dir=out.parent))
            os.replace(out, aside / "d")
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(out.parent)
    return result


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a directory so that it vanishes at once: renamed to a temporary sibling, then removed.

    A process killed while deleting leaves a ``.partial`` sibling (cleared by the next write of the
    same name), never a half-deleted directory under the real name.
    """
    path = Path(path)
    if not path.exists():
        return
    doomed = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=_PARTIAL, dir=path.parent))
    os.replace(path, doomed / "d")
    _fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def _json_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as e:
        raise MlakitError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise MlakitError(f"{path} is a directory, not a JSON file") from e
    except UnicodeDecodeError as e:
        raise MlakitError(f"{path} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise MlakitError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    except (OSError, RecursionError, ValueError) as e:
        raise MlakitError(f"{path}: cannot read JSON: {e}") from e


def read_json(path: str | os.PathLike[str], *, what: str = "a JSON file") -> Any:
    """The JSON value in ``path``.

    Raises:
        MlakitError: the file is missing, unreadable or not valid JSON; the message names the file
            (and ``what`` it should have been, for a missing file).
    """
    p = Path(path)
    if not p.exists():
        raise MlakitError(f"{p}: no such file (expected {what})")
    with _json_errors(p):
        return json.loads(p.read_bytes().decode("utf-8"))


def read_json_object(path: str | os.PathLike[str], *, what: str = "a JSON object") -> dict[str, Any]:
    """:func:`read_json` that also requires a JSON object (``{...}``) at the top."""
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise MlakitError(f"{path} does not hold a JSON object (found {type(data).__name__}): expected {what}")
    return data


def read_json_lines(path: str | os.PathLike[str], *, torn_tail: bool = False) -> list[Any]:
    """The JSON values of a JSON-lines file, one per non-empty line (a bad line names file and line).

    ``torn_tail``: an appended log may end in a line cut short by a crash (no newline after it);
    drop that one instead of failing.
    """
    p = Path(path)
    with _json_errors(p):
        text = p.read_bytes().decode("utf-8", errors="replace" if torn_tail else "strict")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if torn_tail and i == len(lines):  # the last line, not newline-terminated
                    logger.warning("%s: dropping a torn last line (an interrupted append)", p)
                    continue
                raise MlakitError(f"{p} is not valid JSON (line {i}, column {e.colno}): {e.msg}") from e
    return rows


def read_config_json(directory: str | os.PathLike[str], name: str, what: str) -> dict[str, Any]:
    """The JSON object in ``directory/name``; MlakitError says which of dir/file/JSON is wrong.

    ``what`` names the expected checkpoint kind for the messages, e.g. ``"an mlakit checkpoint"``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise MlakitError(f"{d} is not a directory: expected {what}")
    p = d / name
    if not p.is_file():
        raise MlakitError(f"{d} has no {name}: not {what}")
    return read_json_object(p, what=what)


#: safetensors' names of the dtypes mlakit writes.
_SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


class SafetensorsStream:
    """Write one ``.safetensors`` file tensor by tensor, so memory holds one tensor, not the state dict.

    The format is an 8-byte little-endian header length, a JSON header giving every tensor's dtype,
    shape and byte range, then the bytes. With the layout known in advance (a model built on the
    meta device gives it) the header goes first and each tensor is appended as it is made. The
    file is the same any safetensors reader (and :meth:`mlakit.model.Transformer.from_pretrained`)
    loads. Use it inside :func:`write_file` or :func:`write_dir`, which make the write atomic.

    Args:
        path: the file to create.
        layout: ``name -> (dtype, shape)`` in the order the tensors will be written.
        metadata: string pairs for the header's ``__metadata__``.

    Raises:
        MlakitError: a tensor out of order, of another shape or dtype, or a missing one at :meth:`close`.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[Any, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = dtype.itemsize
            for s in shape:
                size *= s
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[str(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._layout = list(layout.items())
        self._next = 0
        self._file = open(path, "wb")  # closed by close(), which checks completeness
        self._file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: Any) -> None:
        """Append ``tensor`` (cast to the layout's dtype) as ``name``, the next tensor of the layout."""
        if self._next >= len(self._layout) or self._layout[self._next][0] != name:
            expected = self._layout[self._next][0] if self._next < len(self._layout) else "nothing more"
            raise MlakitError(f"safetensors stream: got {name}, expected {expected}")
        dtype, shape = self._layout[self._next][1]
        if tuple(tensor.shape) != tuple(shape):
            raise MlakitError(f"safetensors stream: {name} has shape {tuple(tensor.shape)}, the layout says {shape}")
        import torch

        t = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
        self._file.write(memoryview(t.view(torch.uint8).numpy()))  # no copy beyond the cast
        self._next += 1

    def close(self) -> None:
        """Finish the file; every tensor of the layout must have been written."""
        self._file.close()
        if self._next != len(self._layout):
            raise MlakitError(f"safetensors stream: {self._layout[self._next][0]} was never written")
