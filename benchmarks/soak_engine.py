"""Engine soak: thousands of random requests under a tight KV budget, checked as they go (bounded, not a test).

A tiny random MLA model (or ``--kind``) serves ``--requests`` requests that arrive in random bursts
while others run: prompt lengths 1-48, 1-32 new tokens, greedy (70%) or sampled (temperature,
top-k, top-p, seed), stop tokens, ~5% cancelled mid-flight, a few refused (empty or too long). The
KV budget holds ``--blocks`` blocks, far fewer than the requests in flight need, so the scheduler
preempts and recomputes all the time. Checked:

- 0 crashes: no exception except the MlakitError of a refused request;
- 0 leaked blocks: after every step the blocks in use are exactly those of the running sequences'
  tables, and the pool is whole at the end;
- the budget is never exceeded: the paged cache's bytes stay within ``kv_memory``;
- greedy outputs equal solo runs: every greedy request that finished by stop token or length has
  exactly the tokens ``mlakit.generate`` produces for its prompt alone (preempted ones included);
- RSS flat: resident memory sampled every 25 steps (after glibc's ``malloc_trim``, see
  :func:`rss_kib`); the slope of a least-squares line after warm-up (once the engine's bounded
  history of finished requests, ``FINISHED_HISTORY``, is full) is reported in KiB per 1,000
  requests. Finished greedy requests are written to a temporary file and compared after the run,
  so the soak's own bookkeeping does not grow the process.

    OMP_NUM_THREADS=1 python benchmarks/soak_engine.py --threads 1

(from the repository root with mlakit installed, or with ``PYTHONPATH=.``: a script's own folder,
not the current one, is first on ``sys.path``).

Writes benchmarks/results/soak_engine.json and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlakit import MlakitError, ModelConfig, SamplingConfig, Transformer, generate
from mlakit.engine import Engine, EngineConfig
from mlakit.engine.engine import FINISHED_HISTORY
from mlakit.paged import PagedCache


def rss_kib(trim: bool = True) -> int:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere).

    ``trim``: first hand freed heap pages back to the system (glibc ``malloc_trim``). Without it RSS
    also counts memory freed but kept by the allocator (varying tensor shapes fragment the heap):
    it creeps up with no leak behind it. Trimmed RSS moves only with memory still held.
    """
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``, times 1000."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def random_request(rng: random.Random, vocab: int, context: int) -> tuple[list[int], SamplingConfig, bool]:
    """``(prompt, sampling, greedy)``; prompt + new tokens fit the context (solo runs match exactly)."""
    n = rng.randint(1, 48)
    prompt = [rng.randrange(vocab) for _ in range(n)]
    new = rng.randint(1, min(32, context - n))
    stops = tuple(rng.sample(range(vocab), rng.randint(0, 2)))
    if rng.random() < 0.7:
        return prompt, SamplingConfig(max_new_tokens=new, stop_tokens=stops), True
    sampling = SamplingConfig(
        max_new_tokens=new,
        temperature=rng.choice([0.5, 0.8, 1.2]),
        top_k=rng.choice([None, 5, 50]),
        top_p=rng.choice([None, 0.9]),
        seed=rng.randrange(1000),
        stop_tokens=stops,
    )
    return prompt, sampling, False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--kind", default="tiny-mla", help="model preset (random weights)")
    ap.add_argument("--blocks", type=int, default=16, help="KV budget in blocks (tight: forces preemption)")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=24, help="most requests queued or running at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak_engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    model = Transformer(ModelConfig.from_preset(args.kind, max_seq_len=96)).eval()
    per_block = PagedCache.block_bytes(model.config, args.block_size, model.embed.weight.dtype)
    config = EngineConfig(
        kv_memory=args.blocks * per_block, block_size=args.block_size, max_batch_size=args.max_batch_size
    )
    engine = Engine(model, config)
    pool = engine.cache.pool
    vocab, context = model.config.vocab_size, model.config.max_seq_len

    issued = refused = cancelled_n = steps = 0
    max_used = 0
    failures: list[str] = []
    greedy: dict[str, tuple[list[int], SamplingConfig]] = {}
    live: set[str] = set()
    cancel_at: dict[int, list[str]] = {}  # step -> requests to cancel then
    # finished greedy requests (id, prompt, output, sampling, finish reason) go to a file, not to
    # this process's memory: the RSS measured is the engine's
    records = tempfile.TemporaryFile("w+")
    rss: list[tuple[int, int]] = []  # (requests issued, KiB)
    t0 = time.perf_counter()

    def check() -> None:
        nonlocal max_used
        held = [b for s in engine.scheduler.running for b in s.table]
        if pool.num_used != len(held) or len(set(held)) != len(held):
            failures.append(f"step {steps}: {pool.num_used} blocks in use, running tables hold {len(held)}")
        if any(s.table for s in engine.scheduler.waiting):
            failures.append(f"step {steps}: a waiting sequence holds blocks")
        if engine.cache.nbytes > config.kv_bytes:
            failures.append(f"step {steps}: cache {engine.cache.nbytes} bytes > budget {config.kv_bytes}")
        max_used = max(max_used, pool.num_used)

    while issued < args.requests or engine.has_unfinished():
        # arrivals: a burst of 0-4 requests while there is room in flight
        for _ in range(rng.randint(0, 4)):
            if issued >= args.requests or len(live) >= args.in_flight:
                break
            issued += 1
            kind = rng.random()
            try:
                if kind < 0.01:
                    engine.add_request([])  # refused: empty
                elif kind < 0.02:
                    engine.add_request([1] * (args.blocks * args.block_size + 1))  # refused: past the budget
                else:
                    prompt, sampling, is_greedy = random_request(rng, vocab, context)
                    rid = engine.add_request(prompt, sampling)
                    live.add(rid)
                    if rng.random() < 0.05:
                        cancel_at.setdefault(steps + rng.randint(0, 40), []).append(rid)
                    if is_greedy:
                        greedy[rid] = (prompt, sampling)
            except MlakitError:
                refused += 1
        # cancellations: ~5% of requests, 0-40 steps after they arrived (waiting, running or done)
        for victim in cancel_at.pop(steps, []):
            if engine.cancel(victim):
                cancelled_n += 1
                greedy.pop(victim, None)
        for event in engine.step():
            if event.finished:
                live.discard(event.request_id)
                if event.request_id in greedy:  # keep the output compactly; compared after the run
                    prompt, sampling = greedy.pop(event.request_id)
                    out = engine.output(event.request_id)
                    row = [event.request_id, prompt, out.tokens, dataclasses.asdict(sampling), out.finish_reason]
                    records.write(json.dumps(row) + "\n")
        steps += 1
        check()
        if steps % 25 == 0:
            rss.append((issued, rss_kib()))
        if steps > 200 * args.requests:
            failures.append(f"no end after {steps} steps: {engine.stats()}")
            break
    seconds = time.perf_counter() - t0

    if pool.num_free != pool.num_blocks:
        failures.append(f"{pool.num_used} blocks leaked at the end")
    # greedy outputs against solo runs of mlakit.generate (after the run: RSS above is the engine's)
    compared = mismatched = budget_stops = 0
    records.seek(0)
    for line in records:
        rid, prompt, tokens, knobs, reason = json.loads(line)
        if reason == "budget":
            budget_stops += 1  # stopped early by the pool: not comparable
            continue
        knobs["stop_tokens"] = tuple(knobs["stop_tokens"])
        want = generate(model, [prompt], SamplingConfig(**knobs))[0]
        compared += 1
        if tokens != want:
            mismatched += 1
            if mismatched <= 5:
                failures.append(f"{rid}: engine {tokens} != solo {want}")
    stats = engine.stats()
    # after warm-up: once the engine's history of finished requests is full (FINISHED_HISTORY)
    warm = FINISHED_HISTORY + args.in_flight
    steady = [(x, y) for x, y in rss if x > warm] or rss[len(rss) // 2 :]
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/soak_engine.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": args.kind,
        "kv_budget_bytes": config.kv_bytes,
        "blocks": pool.num_blocks,
        "requests": issued,
        "refused": refused,
        "cancelled": cancelled_n,
        "steps": steps,
        "preemptions": stats["preemptions"],
        "max_blocks_used": max_used,
        "leaked_blocks": pool.num_used,
        "greedy_compared_with_solo": compared,
        "greedy_mismatches": mismatched,
        "greedy_stopped_by_budget": budget_stops,
        "crashes": 0,
        "rss_kib_first_last": [rss[0][1], rss[-1][1]] if rss else None,
        "rss_kib_by_requests": {x: y for x, y in rss[:: max(1, len(rss) // 10)]},
        "rss_slope_kib_per_1000_requests": round(slope_per_1000([x for x, _ in steady], [y for _, y in steady]), 1),
        "rss_slope_window_requests": [steady[0][0], steady[-1][0]] if steady else None,
        "seconds": round(seconds, 1),
        "failures": failures,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
