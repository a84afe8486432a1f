"""Activation memory and step time of one training step: plain MLA, MLA with latent recomputation, MHA.

Three memory numbers per configuration, all measured on CPU without a GPU allocator:

* ``kept after forward``: bytes the CPU allocator holds at the end of the forward pass that were
  allocated during it (``torch.profiler`` memory events, ``Total Allocated``) — what the step keeps
  alive for backward, including the checkpoint's own inputs. This is the activation number.
* ``peak fwd+bwd``: the allocator's peak over forward and backward (activations, temporaries and
  the gradients, which are allocated during backward).
* ``saved by autograd``: distinct storages packed by ``saved_tensors_hooks`` during forward,
  parameters excluded. With recomputation the checkpointed region saves nothing itself, and the
  tensors it will replay from are held by the checkpoint (counted in the first column).

Step time is the median of ``--steps`` timed forward + backward + AdamW steps after one warm-up.

    python benchmarks/bench_train_memory.py [--batch 4 --seq-len 1024 --threads 1 --json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mlakit.config import AttentionConfig, MLAConfig, ModelConfig
from mlakit.model import Transformer
from mlakit.train.presets import training_config
from mlakit.train.trainer import lm_loss, set_recompute_kv


def _wide(attention: str) -> ModelConfig:
    """DeepSeek-like proportions: heads x head width = 2 x hidden (V3: 16384 vs 7168)."""
    if attention == "mla":
        att: MLAConfig | AttentionConfig = MLAConfig(
            hidden_size=256, num_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64
        )
    else:
        att = AttentionConfig(hidden_size=256, num_heads=8, num_kv_heads=8, head_dim=64)
    return ModelConfig(vocab_size=256, num_layers=4, intermediate_size=704, attention=att, max_seq_len=4096)


def _allocated_trace(fn) -> list[int]:  # type: ignore[no-untyped-def]
    """Bytes allocated since ``fn()`` started, after every allocator event while it runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return [0]
    # the counter carries over between profiling sessions: measure from where this one started
    base = int(mem[0]["args"]["Total Allocated"]) - int(mem[0]["args"]["Bytes"])
    return [int(e["args"]["Total Allocated"]) - base for e in mem]


def measure(config: ModelConfig, recompute: bool, batch: int, seq_len: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Transformer(config).train()
    set_recompute_kv(model, recompute)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step() -> None:
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists before measuring
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    holder: list[torch.Tensor] = []

    def forward() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            holder.append(lm_loss(model(x), y))

    kept = _allocated_trace(forward)[-1]
    holder.pop().backward()
    opt.zero_grad(set_to_none=True)
    peak = max(_allocated_trace(lambda: lm_loss(model(x), y).backward()))
    opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "kept_after_forward_bytes": kept,
        "peak_fwd_bwd_bytes": peak,
        "saved_by_autograd_bytes": sum(saved.values()),
        "step_s": statistics.median(times),
        "params": model.num_parameters(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {
        "3m (hidden 256, 4 x 64 heads)": lambda kind: training_config(
            "3m", kind, vocab_size=256, max_seq_len=args.seq_len
        ),
        "wide (hidden 256, 8 x 64 heads)": _wide,
    }
    rows = []
    for shape, make in shapes.items():
        for label, kind, recompute in (("MLA", "mla", False), ("MLA + recompute", "mla", True), ("MHA", "mha", False)):
            config = dataclasses.replace(make(kind), max_seq_len=args.seq_len)
            r = measure(config, recompute, args.batch, args.seq_len, args.steps)
            rows.append({"shape": shape, "variant": label, **r})
            mib = {
                k: r[k] / 2**20 for k in ("kept_after_forward_bytes", "peak_fwd_bwd_bytes", "saved_by_autograd_bytes")
            }
            print(f"{shape:34} {label:16} " + "  ".join(f"{k} {v:8.1f} MiB" for k, v in mib.items()), file=sys.stderr)
    print(f"batch {args.batch} x {args.seq_len} tokens, fp32, {args.threads} thread(s), torch {torch.__version__}\n")
    print(
        "| shape | variant | params | kept for backward (MiB) | peak fwd+bwd (MiB) | saved by autograd (MiB) | step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = [r[k] / 2**20 for k in ("kept_after_forward_bytes", "peak_fwd_bwd_bytes", "saved_by_autograd_bytes")]
        cells = " | ".join(f"{v:.1f}" for v in mib)
        print(f"| {r['shape']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {cells} | {r['step_s']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
