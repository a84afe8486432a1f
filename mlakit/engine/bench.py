"""Measurements for ``mlakit bench`` and ``benchmarks/bench_engine.py``.

Decode timings fill the cache with random latents (or K/V) instead of prefilling real prompts:
decode cost depends on how much is cached, not on what, and prefill is not what is measured.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch

from mlakit.attention.metadata import AttentionMetadata
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.engine.config import EngineConfig
from mlakit.engine.engine import Engine, Request
from mlakit.engine.scheduler import Scheduler, Sequence
from mlakit.generate import SamplingConfig
from mlakit.model import Block, Transformer
from mlakit.paged import BlockPool, PagedCache


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS, where Linux allows it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes of this process since the last :func:`reset_peak_rss` (0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth in GB/s: a large fp32 ``sum`` (read) and ``copy_`` (read + write)."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    x.sum()
    y.copy_(x)
    best_sum = best_copy = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best_sum = min(best_sum, time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        best_copy = min(best_copy, time.perf_counter() - t0)
    return {"read_GBps": nbytes / best_sum / 1e9, "copy_GBps": 2 * nbytes / best_copy / 1e9}


@dataclass
class DecodeResult:
    batch: int
    context: int
    steps: int
    step_ms: float
    tokens_per_s: float
    kv_bytes: int
    peak_rss: int


def _filled_engine(model: Transformer, config: EngineConfig, batch: int, context: int, room: int, seed: int = 0):
    """An engine whose cache holds ``batch`` sequences of ``context`` random tokens each (+ ``room`` slots)."""
    per_block = PagedCache.block_bytes(model.config, config.block_size, config.cache_storage(model.embed.weight.dtype))
    blocks = math.ceil((context + room) / config.block_size)
    from dataclasses import replace

    # one block more than the sequences need: a CUDA engine keeps a scratch block for graph padding
    engine = Engine(
        model,
        replace(config, kv_memory=per_block * (blocks * batch + 1), max_batch_size=max(batch, config.max_batch_size)),
    )
    device = engine.cache.layers[0][0].data.device
    g = torch.Generator(device).manual_seed(seed)  # filled where the cache lives: GBs of randn on a GPU
    for rows in engine.cache.layers:
        for r in rows:
            if r.quantized:
                r.data.copy_(torch.randint(-127, 128, r.data.shape, generator=g, dtype=torch.int8, device=device))
                assert r.scale is not None
                r.scale.fill_(1.0 / 127)
            else:
                r.data.copy_(torch.randn(r.data.shape, generator=g, device=device))
    tables = [engine.cache.pool.allocate(blocks) for _ in range(batch)]
    return engine, tables


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work, so a wall-clock timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@torch.inference_mode()
def decode_throughput(
    model: Transformer,
    config: EngineConfig,
    batch: int,
    context: int,
    steps: int = 16,
    warmup: int = 2,
    time_budget_s: float | None = None,
) -> DecodeResult:
    """Tokens/s of batched decode steps at ``context`` cached tokens per sequence (cache filled randomly).

    ``time_budget_s`` lowers ``steps`` (to no fewer than 1) when one step is slow.
    """
    reset_peak_rss()
    engine, tables = _filled_engine(model, config, batch, context, steps + warmup)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch,)).tolist()
    pos = context
    sync = _synchronizer(engine.runner.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        engine.runner.decode(tokens, [pos] * batch, tables)
        pos += 1
    sync()
    per = (time.perf_counter() - t0) / max(warmup, 1)
    if time_budget_s is not None:
        steps = max(2, min(steps, int(time_budget_s / max(per, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.runner.decode(tokens, [pos] * batch, tables)
        pos += 1
    sync()
    dt = (time.perf_counter() - t0) / steps
    res = DecodeResult(batch, context, steps, dt * 1e3, batch / dt, engine.cache.nbytes, peak_rss())
    del engine
    gc.collect()
    return res


def prefill_throughput(model: Transformer, config: EngineConfig, length: int, seed: int = 0) -> dict[str, float]:
    """Seconds and tokens/s for the engine to prefill one ``length``-token prompt and return its first token.

    The prompt is random token ids (prefill cost does not depend on which); it runs in the
    engine's ``prefill_chunk`` chunks, as a served request would.
    """
    from dataclasses import replace

    per_block = PagedCache.block_bytes(model.config, config.block_size, config.cache_storage(model.embed.weight.dtype))
    blocks = math.ceil((length + 1) / config.block_size) + 2  # + the warm-up's slack + a CUDA scratch block
    engine = Engine(model, replace(config, kv_memory=per_block * blocks))
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    sampling = SamplingConfig(max_new_tokens=1)
    engine.generate([Request(prompt[:16].tolist(), SamplingConfig(max_new_tokens=2))])  # warm-up, within the budget
    t0 = time.perf_counter()
    engine.generate([Request(prompt.tolist(), sampling)])
    dt = time.perf_counter() - t0
    del engine
    gc.collect()
    return {"tokens": length, "seconds": dt, "tokens_per_s": length / dt}


@torch.inference_mode()
def absorbed_attention_bandwidth(
    model: Transformer,
    batch: int,
    context: int,
    repeats: int = 3,
    block_size: int = 16,
    profile: bool = False,
    backend: str = "auto",
) -> dict[str, Any]:
    """GB/s at which the attention backend's ``latent_decode`` reads the latent cache.

    All layers, ``batch`` sequences of ``context`` tokens, the queries in the model's dtype.
    Also the FLOP rate it reaches and, with ``profile``, each top op's share of the time.
    """
    config = EngineConfig(block_size=block_size, attention_backend=backend)
    engine, tables = _filled_engine(model, config, batch, context, 0)
    layers = [
        (cast(MultiHeadLatentAttention, cast(Block, layer).attn), rows[0])
        for layer, rows in zip(model.layers, engine.cache.layers)
    ]
    meta = AttentionMetadata.build(
        engine.cache, engine.runner.backend, [1] * batch, [context] * batch, tables, batch, engine.runner.device
    )
    dtype = model.embed.weight.dtype
    qs = []
    for attn, _ in layers:
        c = attn.config
        qs.append((torch.randn(batch, c.num_heads, c.kv_lora_rank + c.qk_rope_head_dim) * attn.scale).to(dtype))

    def once() -> None:
        for (attn, rows), q in zip(layers, qs):
            meta.backend.latent_decode(q, rows, meta, attn.config.kv_lora_rank)

    once()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    nbytes = sum(rows.data.element_size() * rows.width for _, rows in layers) * batch * context
    # scores [H, r + d_r] x [r + d_r, S] and o_latent [H, S] x [S, r], 2 FLOPs per multiply-add
    flops = sum(2 * a.num_heads * (2 * a.config.kv_lora_rank + a.config.qk_rope_head_dim) for a, _ in layers)
    out: dict[str, Any] = {
        "seconds": best,
        "bytes": nbytes,
        "GBps": nbytes / best / 1e9,
        "GFLOPs": flops * batch * context / best / 1e9,
    }
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            once()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out["profile"] = {
            e.key: round(e.self_cpu_time_total / total, 3)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        }
    del engine
    gc.collect()
    return out


def admitted_sequences(
    model_config: Any, kv_bytes: int, seq_len: int, block_size: int = 16, dtype: torch.dtype | str = torch.float32
) -> int:
    """How many ``seq_len``-token sequences the scheduler admits at once under ``kv_bytes``.

    Runs the real admission logic on a block pool of the budget's size (no tensors allocated).
    """
    num_blocks = kv_bytes // PagedCache.block_bytes(model_config, block_size, dtype)
    if num_blocks < math.ceil(seq_len / block_size):
        return 0
    pool = BlockPool(num_blocks)
    sched = Scheduler(pool, block_size, max_batch_size=10**9, prefill_chunk=1, max_seq_len=10**9)
    n_try = pool.num_blocks // math.ceil(seq_len / block_size) + 2
    for i in range(n_try):
        sched.add(Sequence(f"s{i}", [0] * seq_len, SamplingConfig()))
    sched.schedule()
    return len(sched.running)


def as_dict(r: DecodeResult) -> dict[str, Any]:
    return asdict(r)
