"""Attention backends: the kernels that read the paged cache, one thin file each, chosen by name.

The model is written once (:mod:`mlakit.attention.mla`, :mod:`mlakit.attention.mha`); when the
engine passes :class:`~mlakit.attention.metadata.AttentionMetadata`, each layer does its own
projections, writes its new rows at ``slot_mapping`` and asks the backend for the part that
depends on the cache layout:

* ``latent_decode``: absorbed MLA decode for all decoding sequences at once (MQA over
  ``[c_kv | k_rope]`` rows shared by every head);
* ``kv_decode``: baseline MHA/GQA/MQA decode for all decoding sequences at once;
* ``gather``: a sequence range's cached rows as a padded dense tensor, for the compute-friendly
  paths (prefill chunks, decompressing decode, full-RoPE MLA).

Backends:

=========  =======================================================================================
``torch``  the reference: gathers rows by block table and runs one batched masked product; any device
``cpu``    no copies: walks each sequence's runs of consecutive blocks as views of the storage
``triton`` CUDA (or ``TRITON_INTERPRET=1``): split-KV kernel that reads the block tables directly
=========  =======================================================================================

``auto`` picks ``cpu`` on CPU and ``triton`` on CUDA when Triton is installed, else ``torch``.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from mlakit.attention.backends.base import AttentionBackend
from mlakit.errors import MlakitError

_MODULES = {
    "torch": "mlakit.attention.backends.torch_ref",
    "cpu": "mlakit.attention.backends.cpu",
    "triton": "mlakit.attention.backends.triton_mla",
}
BACKEND_NAMES = ("auto", *_MODULES)


def default_backend_name(device: torch.device | str) -> str:
    """``cpu`` on CPU; ``triton`` on CUDA when Triton is installed; otherwise ``torch``."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu"
    if kind == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """The backend called ``name`` (``auto``: :func:`default_backend_name` for ``device``).

    Raises: MlakitError for an unknown name or a backend that cannot run here.
    """
    if name == "auto":
        name = default_backend_name(device)
    if name not in _MODULES:
        raise MlakitError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if name == "triton" and torch.device(device).type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise MlakitError("attention backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise MlakitError(f"attention backend {name!r} is not usable here: {e}") from e
    backend: AttentionBackend = module.Backend()
    return backend


__all__ = ["BACKEND_NAMES", "AttentionBackend", "default_backend_name", "get_backend"]
