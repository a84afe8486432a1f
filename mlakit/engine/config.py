"""The engine's runtime config: cache layout, memory budget, batching limits, decode path.

Model properties live in :class:`mlakit.config.ModelConfig`; everything here is a choice about how
to *run* a model and is passed explicitly to :class:`mlakit.engine.Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

from mlakit.errors import MlakitError
from mlakit.units import parse_bytes

EngineCacheDType: TypeAlias = Literal["auto", "fp32", "bf16", "int8"]
EngineDecodePath: TypeAlias = Literal["auto", "absorbed", "naive"]


def _fail(name: str, value: object, allowed: str) -> MlakitError:
    return MlakitError(f"EngineConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model.

    Attributes:
        kv_memory: bytes the paged cache may use in total (an int or a size such as ``"2GiB"``);
            the pool is allocated once, up front, and never grows.
        block_size: tokens per cache block (the paging granularity).
        cache_dtype: ``"auto"`` (the model's dtype), ``"fp32"``, ``"bf16"`` or ``"int8"`` (symmetric,
            one fp32 scale per token per layer; MLA latents and baseline K/V alike).
        decode_path: ``"auto"`` (absorbed where the model allows it), ``"absorbed"`` or ``"naive"``
            (decompress the cached latents; the only option for ``rope_mode="full"``).
        max_batch_size: most sequences running at once (decoding or prefilling).
        prefill_chunk: most prompt tokens prefilled per engine step, all sequences together (long
            prompts are split into chunks and run in the same model call as the decodes).
        attention_backend: ``"auto"`` (``cpu`` on CPU, ``triton`` on CUDA), ``"torch"`` (the
            reference), ``"cpu"`` or ``"triton"``; see :mod:`mlakit.attention.backends`.
        cuda_graphs: capture decode-only steps as CUDA graphs where they can be (a CUDA model,
            absorbed MLA decode, the ``triton`` backend; :mod:`mlakit.engine.graphs`); elsewhere,
            or when a capture fails (logged), steps run eagerly. Ignored on CPU.
    """

    kv_memory: int | str = "1GiB"
    block_size: int = 16
    cache_dtype: EngineCacheDType = "auto"
    decode_path: EngineDecodePath = "auto"
    max_batch_size: int = 32
    prefill_chunk: int = 512
    attention_backend: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kv_memory", parse_bytes(self.kv_memory))
        except ValueError as e:
            raise _fail("kv_memory", self.kv_memory, str(e)) from e
        for name in ("block_size", "max_batch_size", "prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise _fail(name, v, "must be a positive integer")
        if self.cache_dtype not in ("auto", "fp32", "bf16", "int8"):
            raise _fail("cache_dtype", self.cache_dtype, "must be 'auto', 'fp32', 'bf16' or 'int8'")
        if self.decode_path not in ("auto", "absorbed", "naive"):
            raise _fail("decode_path", self.decode_path, "must be 'auto', 'absorbed' or 'naive'")
        from mlakit.attention.backends import BACKEND_NAMES

        if self.attention_backend not in BACKEND_NAMES:
            raise _fail("attention_backend", self.attention_backend, f"must be one of {', '.join(BACKEND_NAMES)}")

    def cache_storage(self, model_dtype: torch.dtype) -> torch.dtype | str:
        """What the paged cache stores for a model computing in ``model_dtype``: a dtype or ``"int8"``."""
        if self.cache_dtype == "auto":
            return model_dtype
        storage: dict[str, torch.dtype | str] = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
        return storage[self.cache_dtype]

    @property
    def kv_bytes(self) -> int:
        """``kv_memory`` as a byte count."""
        assert isinstance(self.kv_memory, int)
        return self.kv_memory
