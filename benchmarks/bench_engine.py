"""Engine benchmark: decode tokens/s, peak memory, capacity and bandwidth, SmolLM2-135M five ways.

Systems (all fp32, same machine, same thread count, one run):

  a   transformers LlamaForCausalLM, the original SmolLM2-135M (GQA cache, DynamicCache)
  b   mlakit engine, the same original model (mlakit GQA Transformer, original weights, paged K/V)
  c   mlakit engine, SmolLM2 converted to MLA, decoupled RoPE (r=64 + d_rope=32 = 96 per layer,
      25% of the original 384), absorbed decode over the paged latent cache
  c2  (c') the same with full RoPE (r=96, no rope key): decompressing decode
  d   transformers DeepseekV3ForCausalLM with (c)'s shapes (what `mlakit export-hf` produces);
      transformers 5.x caches its compressed latent + rope key (96 per layer) and decompresses
      K and V for every cached token at every decode step

(c), (c') and (d) use random weights of the exact converted shapes (speed does not depend on the
weights' quality); (a) and (b) use the real weights. Decode timings fill the cache with random
values (prefill is not timed). Each system runs in its own subprocess so peak RSS is per system;
peak RSS is reset before every point (Linux clear_refs) and includes weights.

    python benchmarks/bench_engine.py --out benchmarks/results/engine.json

Writes the JSON and prints a markdown report (pasted into BENCHMARKS.md, section "Engine").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = {
    "a": "transformers, original (GQA)",
    "b": "mlakit, original (GQA)",
    "c": "mlakit, MLA decoupled (absorbed)",
    "c2": "mlakit, MLA full RoPE (decompress)",
    "d": "transformers, DeepSeek-V3 export of (c)",
}
HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB, INTER = 576, 9, 64, 30, 49152, 1536
ROPE_DIM = 32  # decoupled: 16 rotary pairs; latent r = 96 - 32 = 64


def hf_dir() -> Path:
    from mlakit.convert.load import resolve_model_path

    return Path(resolve_model_path("smollm2-135m"))


def mlakit_model(kind: str, max_seq_len: int):
    import torch

    from mlakit.config import MLAConfig, ModelConfig
    from mlakit.engine.load import llama_to_transformer
    from mlakit.model import Transformer

    if kind == "b":
        return llama_to_transformer(hf_dir(), max_seq_len=max_seq_len)
    if kind == "c":
        att = MLAConfig(
            hidden_size=HIDDEN,
            num_heads=HEADS,
            kv_lora_rank=96 - ROPE_DIM,
            qk_nope_head_dim=HEAD_DIM,
            qk_rope_head_dim=ROPE_DIM,
            v_head_dim=HEAD_DIM,
            kv_norm=False,
            rope_theta=100000.0,
        )
    else:
        att = MLAConfig(
            hidden_size=HIDDEN,
            num_heads=HEADS,
            kv_lora_rank=96,
            qk_nope_head_dim=HEAD_DIM,
            qk_rope_head_dim=0,
            v_head_dim=HEAD_DIM,
            rope_mode="full",
            kv_norm=False,
            rope_theta=100000.0,
        )
    config = ModelConfig(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        intermediate_size=INTER,
        attention=att,
        max_seq_len=max_seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    return model.eval()


def hf_model(kind: str):
    import torch

    if kind == "a":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(hf_dir(), dtype=torch.float32).eval()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=None,
        kv_lora_rank=96 - ROPE_DIM,
        qk_nope_head_dim=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        v_head_dim=HEAD_DIM,
        first_k_dense_replace=LAYERS,
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        rope_interleave=False,
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg).eval()


def hf_decode(model, batch: int, context: int, steps: int, budget_s: float) -> dict:
    """transformers decode steps over a DynamicCache holding ``context`` random tokens per sequence."""
    import torch

    from mlakit.engine.bench import peak_rss, reset_peak_rss

    reset_peak_rss()
    with torch.inference_mode():
        ids = torch.ones(batch, 1, dtype=torch.long)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        for layer in cache.layers:
            b, h, _, dk = layer.keys.shape
            layer.keys = torch.rand(b, h, context, dk) - 0.5
            layer.values = torch.rand(b, layer.values.shape[1], context, layer.values.shape[-1]) - 0.5
        kv_bytes = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
        pos = context

        def step() -> None:
            nonlocal pos
            out = model(
                input_ids=ids,
                past_key_values=cache,
                use_cache=True,
                position_ids=torch.full((batch, 1), pos),
                cache_position=torch.tensor([pos]),
            )
            ids.copy_(out.logits[:, -1:].argmax(-1))
            pos += 1

        t0 = time.perf_counter()
        step()
        per = time.perf_counter() - t0
        steps = max(1, min(steps, int(budget_s / max(per, 1e-9))))
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dt = (time.perf_counter() - t0) / steps
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "step_ms": dt * 1e3,
        "tokens_per_s": batch / dt,
        "kv_bytes": kv_bytes,
        "peak_rss": peak_rss(),
    }


def kv_bytes_needed(system: str, batch: int, context: int) -> int:
    per_token_layer = {"a": 2 * 3 * 64, "b": 2 * 3 * 64, "c": 96, "c2": 96, "d": 96}
    return per_token_layer[system] * 4 * LAYERS * batch * context


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from mlakit.engine import EngineConfig
    from mlakit.engine.bench import absorbed_attention_bandwidth, decode_throughput, memory_bandwidth

    system = args.worker
    out: dict = {"system": system, "points": [], "skipped": []}
    max_ctx = max(args.contexts) + args.steps + 8
    model = hf_model(system) if system in ("a", "d") else mlakit_model(system, max_ctx)
    for context in args.contexts:
        for batch in args.batches:
            need = kv_bytes_needed(system, batch, context)
            if need > args.max_kv_bytes:
                out["skipped"].append(
                    {
                        "batch": batch,
                        "context": context,
                        "kv_bytes": need,
                        "why": f"cache {need / 2**30:.1f} GiB > {args.max_kv_bytes / 2**30:.0f} GiB "
                        "limit for this shared 24 GiB machine",
                    }
                )
                continue
            if system in ("a", "d"):
                pt = hf_decode(model, batch, context, args.steps, args.point_budget)
            else:
                cfg = EngineConfig(block_size=16, cache_dtype="fp32")
                pt = dataclasses.asdict(
                    decode_throughput(model, cfg, batch, context, args.steps, warmup=1, time_budget_s=args.point_budget)
                )
            print(f"[{system}] {pt}", file=sys.stderr, flush=True)
            out["points"].append(pt)
    if system == "c":
        out["bandwidth"] = memory_bandwidth(1 << 30)
        ctx = max(args.contexts)
        out["attention_bandwidth"] = {
            "batch": max(args.batches),
            "context": ctx,
            **absorbed_attention_bandwidth(model, max(args.batches), ctx, profile=True),
        }
        out["bandwidth_after"] = memory_bandwidth(1 << 30)
    print(json.dumps(out))


def capacity(budget: int, seq_len: int) -> dict:
    import torch

    from mlakit.config import ModelConfig
    from mlakit.engine.bench import admitted_sequences

    mc = {
        "b": ModelConfig.from_preset("smollm2-135m"),
        "c": mlakit_model("c", 64).config,
        "c2": mlakit_model("c2", 64).config,
    }
    out = {}
    for s, cfg in mc.items():
        out[s] = admitted_sequences(cfg, budget, seq_len, 16, torch.float32)
        out[s + "_int8"] = admitted_sequences(cfg, budget, seq_len, 16, "int8")
    # transformers keeps one contiguous cache per sequence: budget // (bytes per sequence)
    out["a"] = budget // kv_bytes_needed("a", 1, seq_len)
    out["d"] = budget // kv_bytes_needed("d", 1, seq_len)
    return out


def report(res: dict) -> str:
    lines = [f"Date: {res['date']}  ", f"Machine: {res['machine']}  ", f"Command: `{res['command']}`  ", ""]
    bw = res["bandwidth"]
    lines.append(
        f"Memory bandwidth (1 GiB fp32 sum / copy, {res['threads']} thread(s)): "
        f"read {bw['read_GBps']:.2f} GB/s, copy {bw['copy_GBps']:.2f} GB/s "
        f"(again after the attention test: read {res['bandwidth_after']['read_GBps']:.2f} GB/s)"
    )
    ab = res["attention_bandwidth"]
    lines.append(
        f"Absorbed decode attention, {ab['batch']} x {ab['context']} tokens x 30 layers "
        f"({ab['bytes'] / 2**20:.0f} MiB of latents): {ab['seconds'] * 1e3:.0f} ms -> {ab['GBps']:.2f} GB/s "
        f"= {100 * ab['GBps'] / bw['read_GBps']:.0f}% of measured read bandwidth; "
        f"{ab['GFLOPs']:.1f} GFLOP/s; time by op: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ab.get("profile", {}).items())
    )
    lines += [
        "",
        "| system | batch | context | tokens/s | ms/step | KV cache | peak RSS | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, r in res["systems"].items():
        for p in r["points"]:
            lines.append(
                f"| {s}: {SYSTEMS[s]} | {p['batch']} | {p['context']} | {p['tokens_per_s']:.2f} | "
                f"{p['step_ms']:.0f} | {p['kv_bytes'] / 2**20:.0f} MiB | {p['peak_rss'] / 2**20:.0f} MiB | "
                f"{p['steps']} |"
            )
        for p in r.get("skipped", []):
            lines.append(
                f"| {s}: {SYSTEMS[s]} | {p['batch']} | {p['context']} | skipped | | "
                f"{p['kv_bytes'] / 2**20:.0f} MiB | | ({p['why']}) |"
            )
    cap = res["capacity"]
    lines += [
        "",
        f"Capacity: concurrent {res['capacity_len']}-token sequences admitted under "
        f"{res['capacity_budget'] / 2**30:.0f} GiB of KV cache (fp32; engine admission on a block pool of "
        "that size; transformers: budget / contiguous per-sequence cache)",
        "",
    ]
    lines.append("| " + " | ".join(cap) + " |")
    lines.append("|" + "---:|" * len(cap))
    lines.append("| " + " | ".join(str(v) for v in cap.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=16, help="most timed decode steps per point")
    ap.add_argument("--point-budget", type=float, default=4.0, help="seconds of timed steps per point (>= 1 step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-kv-bytes", type=int, default=6 << 30, help="skip points whose cache is larger")
    ap.add_argument("--capacity-budget", type=int, default=16 << 30)
    ap.add_argument("--capacity-len", type=int, default=8192)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    t0 = time.time()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{model_name}, {os.cpu_count()} cores, {platform.machine()}, torch threads {args.threads}",
        "command": "python " + " ".join(sys.argv),
        "threads": args.threads,
        "systems": {},
        "capacity_budget": args.capacity_budget,
        "capacity_len": args.capacity_len,
        "capacity": capacity(args.capacity_budget, args.capacity_len),
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(args.threads)}
    base = [
        sys.executable,
        __file__,
        "--contexts",
        *map(str, args.contexts),
        "--batches",
        *map(str, args.batches),
        "--steps",
        str(args.steps),
        "--point-budget",
        str(args.point_budget),
        "--threads",
        str(args.threads),
        "--max-kv-bytes",
        str(args.max_kv_bytes),
    ]
    for s in args.systems:
        p = subprocess.run([*base, "--worker", s], capture_output=True, text=True, env=env)
        sys.stderr.write(p.stderr[-4000:])
        if p.returncode != 0:
            raise SystemExit(f"worker {s} failed")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        res["systems"][s] = r
        for k in ("bandwidth", "attention_bandwidth", "bandwidth_after"):
            if k in r:
                res[k] = r[k]
    res["wall_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = report(res) if "bandwidth" in res else json.dumps(res, indent=2)
    out.with_suffix(".md").write_text(md + f"\n\nWall time: {res['wall_s']:.0f} s\n")
    print(md)
    print(f"\nwall time {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
