"""The engine's runtime config: cache layout, memory budget, batching limits (+ decode path, cache dtype).

Model properties live in :class:`mlakit.config.ModelConfig`; everything here is a choice about how
to *run* a model and is passed explicitly to :class:`mlakit.engine.Engine`. The decode path and
cache dtype are :class:`mlakit.config.RuntimeConfig`'s, which this class extends: one definition
for ``mlakit.generate`` and the engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlakit.config import CacheDType, RuntimeConfig
from mlakit.errors import invalid
from mlakit.units import parse_bytes

#: the names of :mod:`mlakit.dtypes` the paged cache stores (its native kernels read fp32, bf16, int8)
ENGINE_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True, kw_only=True)
class EngineConfig(RuntimeConfig):
    """How the engine runs a model.

    Attributes:
        decode_path: as :class:`~mlakit.config.RuntimeConfig`: ``"auto"`` (absorbed where the model
            allows it), ``"absorbed"`` or ``"naive"`` (decompress the cached latents; the only
            option for ``rope_mode="full"``).
        cache_dtype: as :class:`~mlakit.config.RuntimeConfig`, default ``"auto"`` (the model's
            dtype); ``"int8"`` is symmetric, one fp32 scale per token per layer (MLA latents and
            baseline K/V alike).
        kv_memory: bytes the paged cache may use in total (an int or a size such as ``"2GiB"``);
            the pool is allocated once, up front, and never grows.
        block_size: tokens per cache block (the paging granularity).
        max_batch_size: most sequences running at once (decoding or prefilling).
        prefill_chunk: most prompt tokens prefilled per engine step, all sequences together (long
            prompts are split into chunks and run in the same model call as the decodes).
        attention_backend: ``"auto"`` (``cpu`` on CPU, ``triton`` on CUDA), ``"torch"`` (the
            reference), ``"cpu"`` or ``"triton"``; see :mod:`mlakit.attention.backends`.
        cuda_graphs: capture decode-only steps as CUDA graphs where they can be (a CUDA model,
            absorbed MLA decode, the ``triton`` backend; :mod:`mlakit.engine.graphs`); elsewhere,
            or when a capture fails (logged), steps run eagerly. Ignored on CPU.
        fused_decode: on CPU, run decode-only steps of up to 16 sequences through one C call
            for all layers where the model allows it (absorbed MLA or GQA, int8, fp32 or bf16 weights, the
            ``cpu`` backend; :mod:`mlakit.engine.cpu_step`); elsewhere (logged) through the model.
    """

    cache_dtype: CacheDType = "auto"
    kv_memory: int | str = "1GiB"
    block_size: int = 16
    max_batch_size: int = 32
    prefill_chunk: int = 512
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    fused_decode: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_dtype not in ENGINE_CACHE_DTYPES:
            allowed = f"the engine's paged cache holds one of {', '.join(ENGINE_CACHE_DTYPES)}"
            raise invalid("EngineConfig", "cache_dtype", self.cache_dtype, allowed)
        try:
            object.__setattr__(self, "kv_memory", parse_bytes(self.kv_memory))
        except ValueError as e:
            raise invalid("EngineConfig", "kv_memory", self.kv_memory, str(e)) from e
        for name in ("block_size", "max_batch_size", "prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise invalid("EngineConfig", name, v, "must be a positive integer")
        from mlakit.attention.backends import BACKEND_NAMES

        if self.attention_backend not in BACKEND_NAMES:
            allowed = f"must be one of {', '.join(BACKEND_NAMES)}"
            raise invalid("EngineConfig", "attention_backend", self.attention_backend, allowed)

    @property
    def runtime(self) -> RuntimeConfig:
        """The plain :class:`RuntimeConfig` part (what the model's forward reads)."""
        return RuntimeConfig(decode_path=self.decode_path, cache_dtype=self.cache_dtype)

    @property
    def kv_bytes(self) -> int:
        """``kv_memory`` as a byte count."""
        assert isinstance(self.kv_memory, int)
        return self.kv_memory
