"""File helpers shared by checkpoints, conversion, export and training: atomic writes, JSON configs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlakit.errors import MlakitError


def cache_dir() -> Path:
    """Root of mlakit's on-disk cache: ``$MLAKIT_CACHE`` or ``~/.cache/mlakit``."""
    env = os.environ.get("MLAKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlakit"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it into place.

    An interrupted write never leaves a half-written file under the real name.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MlakitError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MlakitError(f"{p} does not hold a JSON object")
    return data
