"""Engine decode on a GPU: CUDA graphs vs eager, triton vs torch backend, vs transformers' DeepseekV3.

DeepSeek-V2-Lite's attention and sizes with random weights (27 layers, hidden 2048, 16 heads,
latent 512 + rope 64, dense MLP 10944: mlakit's ``deepseek-v2-lite`` preset, which has no MoE),
bf16 weights and cache, one decode token per sequence per step over a cache holding ``context``
random entries. transformers runs the same shapes as ``DeepseekV3ForCausalLM`` (all layers dense,
its SDPA attention, the ``DynamicCache`` its ``generate`` keeps, filled by a chunked prefill of
random tokens), timed per forward of one token per sequence. All rows in one run; the ratio
column is each row's tokens/s over mlakit's (graphs, triton).

    python benchmarks/bench_engine_gpu.py --points 1x4096 16x4096 64x4096 --out engine_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mlakit import ModelConfig, Transformer
from mlakit.engine import EngineConfig
from mlakit.engine.bench import decode_throughput
from mlakit.quant import prepare_weights


def hf_model(config: ModelConfig, device: torch.device):
    """transformers' DeepseekV3 with ``config``'s shapes (dense everywhere), random bf16 weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    att = config.attention
    hf_config = DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=att.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=att.num_heads,
        num_key_value_heads=att.num_heads,
        q_lora_rank=att.q_lora_rank,
        kv_lora_rank=att.kv_lora_rank,
        qk_nope_head_dim=att.qk_nope_head_dim,
        qk_rope_head_dim=att.qk_rope_head_dim,
        v_head_dim=att.v_head_dim,
        first_k_dense_replace=config.num_layers,
        max_position_embeddings=config.max_seq_len,
    )
    hf_config._attn_implementation = "sdpa"
    with device:
        return DeepseekV3ForCausalLM(hf_config).to(torch.bfloat16).eval()


@torch.inference_mode()
def hf_decode(model, batch: int, context: int, steps: int, device: torch.device) -> dict[str, float]:
    from transformers import DynamicCache

    c = model.config
    try:
        cache = DynamicCache(config=c)
    except TypeError:  # older transformers
        cache = DynamicCache()
    gen = torch.Generator(device).manual_seed(0)
    for start in range(0, context, 512):  # prefill in chunks: whatever layout this transformers caches
        n = min(512, context - start)
        ids = torch.randint(0, c.vocab_size, (batch, n), device=device, generator=gen)
        positions = torch.arange(start, start + n, device=device).expand(batch, n)
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = torch.randint(0, c.vocab_size, (batch, 1), device=device)
    pos = context

    def step() -> None:
        nonlocal pos
        positions = torch.full((batch, 1), pos, device=device)
        model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True)
        pos += 1

    for _ in range(2):
        step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    return {"step_ms": dt * 1e3, "tokens_per_s": batch / dt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["1x4096", "16x4096", "64x4096"], help="BATCHxCONTEXT")
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = ModelConfig.from_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    points = [tuple(int(v) for v in p.split("x")) for p in args.points]
    with device:
        model = Transformer(config).eval()
    prepare_weights(model, "bf16", device)
    variants = {
        "mlakit triton + CUDA graphs": EngineConfig(attention_backend="triton", cuda_graphs=True),
        "mlakit triton, eager": EngineConfig(attention_backend="triton", cuda_graphs=False),
        "mlakit torch backend, eager": EngineConfig(attention_backend="torch", cuda_graphs=False),
    }
    rows = []
    for name, cfg in variants.items():
        for batch, context in points:
            try:
                r = decode_throughput(model, cfg, batch, context, args.steps)
                row = {
                    "system": name,
                    "batch": batch,
                    "context": context,
                    "step_ms": r.step_ms,
                    "tokens_per_s": r.tokens_per_s,
                }
            except torch.cuda.OutOfMemoryError as e:
                row = {"system": name, "batch": batch, "context": context, "error": f"out of memory: {str(e)[:80]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_hf:
        hf = hf_model(config, device)
        for batch, context in points:
            try:
                row = {"system": "transformers DeepseekV3", "batch": batch, "context": context}
                row.update(hf_decode(hf, batch, context, args.steps, device))
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e)[:80]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    base = {(r["batch"], r["context"]): r.get("tokens_per_s") for r in rows if r["system"].endswith("CUDA graphs")}
    print("\n| system | batch | context | ms/step | tokens/s | / mlakit graphs |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['batch']} | {r['context']} | {r['error']} | | |")
            continue
        ref = base.get((r["batch"], r["context"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "—"
        ms, tps = r["step_ms"], r["tokens_per_s"]
        print(f"| {r['system']} | {r['batch']} | {r['context']} | {ms:.2f} | {tps:.1f} | {ratio} |")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "preset": args.preset,
        "layers": config.num_layers,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
