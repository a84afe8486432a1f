"""Kernel backends for absorbed MLA decode attention, one file each, chosen by name.

``torch`` (:mod:`.torch_mla`) is the reference and runs everywhere; ``triton``
(:mod:`.triton_mla`) needs the ``triton`` package and a CUDA device (or ``TRITON_INTERPRET=1``).
All share the signature ``(q_joint [B, H, r + d_rope], kv [B, S, r + d_rope], kv_lens [B],
kv_lora_rank, scale) -> o_latent [B, H, r]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]

_BACKENDS = {"torch": "mlakit.kernels.torch_mla", "triton": "mlakit.kernels.triton_mla"}


def available_backends() -> tuple[str, ...]:
    """Backends whose imports succeed on this machine."""
    found = []
    for name, module in _BACKENDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(name)
    return tuple(found)


def decode_kernel(name: str = "torch") -> DecodeKernel:
    """The absorbed decode function of backend ``name``.

    Raises: ValueError for an unknown backend or one that cannot be imported here.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    try:
        module = importlib.import_module(_BACKENDS[name])
    except ImportError as e:
        raise ValueError(f"kernel backend {name!r} is not usable here: {e}") from e
    fn: DecodeKernel = module.mla_decode_absorbed
    return fn
