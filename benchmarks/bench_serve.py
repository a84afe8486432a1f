"""Serving benchmark: `mlakit serve` under load, MLA conversion vs the original model, one run.

Each server is started as users start it (`mlakit serve --model M --kv-memory B`, loopback), then a
bounded load generator (asyncio + httpx, streaming completions) sends real-text prompts from
mlakit's evaluation split at a fixed concurrency: every client sends its next request as soon as
the previous one finished, until each client has sent --requests-per-client. Reported per server
and concurrency: requests/s, output tokens/s, time to first token and inter-token latency
(p50/p99), and how many requests failed.

    python benchmarks/bench_serve.py --concurrency 1 8 32 --prompt-tokens 2048 --max-tokens 128

Servers: the healed 25% MLA conversion (made once, as in bench_engine.py) and the original GQA
SmolLM2, both with the same --kv-memory, so the original has to queue or preempt where the
conversion fits everything. Optional reference row: llama.cpp's own OpenAI server
(`--llama-python`, an interpreter with `llama-cpp-python[server]`; same GGUF, 2 threads).
Writes benchmarks/results/serve.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import gguf_path, mla_checkpoint, real_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """Start a server (its output goes to ``log``: an unread pipe would fill and stall it) and wait until it answers."""
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server failed to start: {cmd}\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


async def load(
    base: str, model: str, prompts: list[list[int]], concurrency: int, per_client: int, max_tokens: int
) -> dict:
    ttft: list[float] = []
    itl: list[float] = []
    done = failed = tokens = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal done, failed, tokens
        for k in range(per_client):
            prompt = prompts[(c * per_client + k) % len(prompts)]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True}  # fmt: skip
            t0 = last = time.monotonic()
            first = True
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        failed += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        now = time.monotonic()
                        (ttft if first else itl).append(now - (t0 if first else last))
                        first, last = False, now
                        tokens += 1
                done += 1
            except httpx.HTTPError:
                failed += 1

    t0 = time.monotonic()
    async with httpx.AsyncClient(
        base_url=base, timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as http:
        await asyncio.gather(*(client(c, http) for c in range(concurrency)))
    wall = time.monotonic() - t0

    def pct(xs: list[float], p: float) -> float | None:
        return statistics.quantiles(xs, n=100)[int(p) - 1] if len(xs) >= 2 else (xs[0] if xs else None)

    return {
        "concurrency": concurrency,
        "requests": done,
        "failed": failed,
        "seconds": wall,
        "requests_per_s": done / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
    }


def engine_worker(model: str, prompt_file: str, max_tokens: int, threads: int) -> None:
    """The engine alone on the first prompt (the server's concurrency-1 request, without HTTP): JSON to stdout."""
    import torch

    from mlakit.engine import Engine, EngineConfig, Request
    from mlakit.engine.load import load_model
    from mlakit.generate import SamplingConfig

    torch.set_num_threads(threads)
    loaded = load_model(model, weights="auto")
    engine = Engine(loaded.model, EngineConfig(kv_memory="256MiB"), tokenizer=loaded.tokenizer)
    prompt = json.loads(Path(prompt_file).read_text())[0]
    engine.generate([Request(prompt[:32], SamplingConfig(max_new_tokens=4))])  # warm-up, as the server's first request
    times = []
    t0 = time.monotonic()
    for ev in engine.stream([Request(prompt, SamplingConfig(max_new_tokens=max_tokens))]):
        if ev.token is not None:
            times.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(json.dumps({"ttft": times[0] - t0, "itl_p50": statistics.median(gaps), "tokens": len(times)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--kv-memory", default="1GiB", help="the same KV budget for both mlakit servers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python[server] (reference row)")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    ap.add_argument(
        "--serve-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for every `mlakit serve` (repeat; e.g. --serve-flag=--engine-thread)",
    )
    ap.add_argument("--only", choices=["mla", "original"], default=None, help="run one of the two mlakit servers")
    ap.add_argument("--engine-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_worker:
        engine_worker(args.engine_worker, args.prompt_file, args.max_tokens, args.threads)
        return
    t_start = time.time()
    n_prompts = max(args.concurrency) * args.requests_per_client
    prompts = real_prompts(n_prompts, args.prompt_tokens, 16)["long"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    entry = "import sys; from mlakit.cli import main; sys.exit(main(sys.argv[1:]))"
    servers = {
        "mlakit, MLA 25% (healed)": str(mla_checkpoint()),
        "mlakit, original GQA": "smollm2-135m",
    }
    if args.only:
        servers = {k: v for k, v in servers.items() if (args.only == "mla") == ("MLA" in k)}
    results: dict[str, list[dict]] = {}
    baselines: dict[str, dict] = {}
    prompt_file = logs / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    for name, model in servers.items():
        # the engine alone, same weights and threads, the first prompt: what the server adds at concurrency 1
        base_cmd = [sys.executable, __file__, "--engine-worker", model, "--prompt-file", str(prompt_file)]
        base_cmd += ["--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
        done = subprocess.run(base_cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"engine baseline failed: {done.stderr[-2000:]}")
        baselines[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, "engine alone", baselines[name], file=sys.stderr, flush=True)
        port = free_port()
        flags = ["--port", str(port), "--kv-memory", args.kv_memory, "--threads", str(args.threads)]
        cmd = [sys.executable, "-c", entry, "serve", "--model", model, *flags, "--served-model-name", "m"]
        cmd += ["--max-batch-size", "64", *args.serve_flag]
        print(f"starting {name}", file=sys.stderr, flush=True)
        proc = start(cmd, port, env, logs / f"{name.split(',')[0]}-{len(results)}.log")
        try:
            results[name] = []
            for c in args.concurrency:
                r = asyncio.run(
                    load(f"http://127.0.0.1:{port}", "m", prompts, c, args.requests_per_client, args.max_tokens)
                )
                print(name, r, file=sys.stderr, flush=True)
                results[name].append(r)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    if args.llama_python:
        port = free_port()
        cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--port", str(port),
               "--n_threads", str(args.threads), "--n_ctx", str(args.prompt_tokens + args.max_tokens + 64)]  # fmt: skip
        print("starting llama.cpp server", file=sys.stderr, flush=True)
        proc = start(cmd, port, env, logs / "llama-cpp-server.log")
        # its API takes text prompts only: the same windows as text (it re-tokenizes them alike)
        from mlakit.engine.load import load_model

        tok = load_model("smollm2-135m").tokenizer
        assert tok is not None
        texts = [tok.decode(p) for p in prompts]
        try:
            name = "llama.cpp server (reference)"
            results[name] = [
                asyncio.run(
                    load(
                        f"http://127.0.0.1:{port}",
                        str(gguf_path()),
                        texts,
                        c,
                        args.requests_per_client,
                        args.max_tokens,
                    )
                )
                for c in args.concurrency
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{info.get('Model name', '?').strip()}, {os.cpu_count()} cores, {platform.machine()}",
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args),
        "results": results,
        "engine_alone": baselines,
        "wall_s": time.time() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    header = (
        "| server | concurrency | requests/s | output tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | failed |"
    )
    lines = [f"Date: {res['date']}  ", f"Machine: {res['machine']}  ", f"Command: `{res['command']}`", "", header]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")

    def f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "—" if x is None else f"{x * scale:.{digits}f}"

    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['concurrency']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
                f"{f(r['ttft_p50'])} / {f(r['ttft_p99'])} | {f(r['itl_p50'], 1e3, 0)} / {f(r['itl_p99'], 1e3, 0)} | "
                f"{r['failed']} |"
            )
    lines += [
        "",
        "Concurrency 1, the engine alone (same weights, threads and first prompt, no HTTP) against the server:",
        "",
    ]
    lines += ["| model | engine TTFT (s) | server TTFT (s) | engine ITL p50 (ms) | server ITL p50 (ms) | server adds |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for name, b in baselines.items():
        r = results[name][0] if results[name] and results[name][0]["concurrency"] == 1 else None
        if r is None or r["itl_p50"] is None:
            continue
        added = 100 * (r["itl_p50"] / b["itl_p50"] - 1)
        lines.append(
            f"| {name} | {b['ttft']:.2f} | {r['ttft_p50']:.2f} | {b['itl_p50'] * 1e3:.1f} | {r['itl_p50'] * 1e3:.1f} | "
            f"{added:+.1f}% per token |"
        )
    md = "\n".join(lines)
    out.with_suffix(".md").write_text(md + f"\n\nWall time: {res['wall_s']:.0f} s\n")
    print(md)


if __name__ == "__main__":
    main()
