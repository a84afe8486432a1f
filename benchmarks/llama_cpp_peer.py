"""llama.cpp side of benchmarks/bench_engine.py: the same protocol through llama-cpp-python's C API.

Runs in an interpreter that has ``llama-cpp-python`` (it never imports mlakit):

    python benchmarks/llama_cpp_peer.py --gguf M.gguf --prompts P.json --steps 32 --threads 2 --flash-attn 0

One context with a per-sequence KV cache (``kv_unified=False``: each sequence attends over its
own cells only), llama.cpp's default f16 K/V, ``n_seq_max`` = the largest batch. Protocol (the
mlakit side runs the same one):

1. prefill the long prompts one by one (the first alone is timed: prefill tokens/s);
2. greedy decode all of them together: 2 warm-up steps, then ``--steps`` timed steps; then drop
   all but the first half and time again; then all but one and time again;
3. a fresh short prompt: prefill, warm up, time ``--steps`` steps at batch 1.

Each decode point is timed ``--rounds`` times (its best counts). With ``--gated`` every timed
section waits for the orchestrator first (``benchmarks/turns.py``), so that it runs alone and the
systems' rounds alternate.

Prints one JSON object: tokens/s per point, prefill tokens/s, the tokens generated for the first
long prompt, peak RSS and the KV cache bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import llama_cpp as L
import numpy as np
from turns import gate, timed_point


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True, help="JSON: {long: [[ids]...], short: [ids]}")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 8, 1])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--gated", action="store_true")
    args = ap.parse_args()
    spec = json.loads(open(args.prompts).read())
    long_prompts, short = spec["long"], spec["short"]
    batches = sorted(args.batches, reverse=True)
    n_seq = batches[0]
    per_seq = max(len(p) for p in long_prompts) + (len(batches) + 1) * (args.rounds * args.steps + 2) + 64

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.gguf.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx = per_seq * n_seq
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = n_seq
    cp.kv_unified = False
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    cp.flash_attn_type = args.flash_attn
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def run(tokens: list[int], positions: list[int], seqs: list[int], want: list[bool]) -> None:
        batch.n_tokens = len(tokens)
        for i, (t, p, s, w) in enumerate(zip(tokens, positions, seqs, want)):
            batch.token[i] = t
            batch.pos[i] = p
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = s
            batch.logits[i] = w
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def argmax(i: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def prefill(ids: list[int], seq: int) -> int:
        chunk: list[int] = []
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            want = [start + i == len(ids) - 1 for i in range(len(chunk))]
            run(chunk, list(range(start, start + len(chunk))), [seq] * len(chunk), want)
        return argmax(len(chunk) - 1)

    out: dict = {"flash_attn": args.flash_attn, "points": []}
    prefill(long_prompts[0][:64], 0)  # warm-up (graph allocation), then forget it
    L.llama_memory_seq_rm(mem, 0, -1, -1)
    gate("prefill", args.gated)
    t0 = time.perf_counter()
    nxt = [prefill(long_prompts[0], 0)]
    dt = time.perf_counter() - t0
    out["prefill"] = {"tokens": len(long_prompts[0]), "seconds": dt, "tokens_per_s": len(long_prompts[0]) / dt}
    for s in range(1, n_seq):
        nxt.append(prefill(long_prompts[s], s))
    pos = [len(p) for p in long_prompts[:n_seq]]
    generated = [nxt[0]]

    def steps(live: list[int], n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            run([nxt[s] for s in live], [pos[s] for s in live], live, [True] * len(live))
            for i, s in enumerate(live):
                nxt[s] = argmax(i)
                pos[s] += 1
            generated.append(nxt[0])
        return time.perf_counter() - t

    def timed(live: list[int], context: int) -> dict:
        return timed_point(
            len(live), context, args.rounds, args.gated, lambda: len(live) * args.steps / steps(live, args.steps)
        )

    for b in batches:
        live = list(range(b))
        for s in range(b, n_seq):
            L.llama_memory_seq_rm(mem, s, -1, -1)
        steps(live, 2)
        out["points"].append(timed(live, len(long_prompts[0])))
    out["generated"] = generated
    L.llama_memory_seq_rm(mem, 0, -1, -1)
    first = prefill(short, 0)
    nxt[0], pos[0] = first, len(short)
    steps([0], 2)
    out["points"].append(timed([0], len(short)))
    layers, kv_heads, head_dim = 30, 3, 64  # SmolLM2-135M
    out["kv_bytes_per_token"] = layers * 2 * kv_heads * head_dim * 2  # f16 K and V
    out["kv_bytes"] = out["kv_bytes_per_token"] * cp.n_ctx
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["system_info"] = L.llama_print_system_info().decode()
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
