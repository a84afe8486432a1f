"""Inference engine: paged latent (or K/V) cache, continuous batching, absorbed CPU decode.

See ``docs/engine.md`` for the design. Public API: :class:`Engine`, :class:`EngineConfig`,
:class:`Request`, :class:`StreamEvent`, :class:`RequestOutput`.
"""

from mlakit.engine.config import EngineConfig
from mlakit.engine.engine import Engine, Request, RequestOutput, StreamEvent
from mlakit.paged import BlockPool, PagedCache

__all__ = ["BlockPool", "Engine", "EngineConfig", "PagedCache", "Request", "RequestOutput", "StreamEvent"]
