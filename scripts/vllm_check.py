"""vLLM vs mlakit on the same export: run by ``scripts/vllm-check`` (which builds vLLM's venv).

Two processes, two interpreters: this file runs with mlakit's Python (convert, export, mlakit's
engine, the comparison) and again, as ``--worker``, with the vLLM venv's Python (vLLM's offline
``LLM``); the worker imports nothing from mlakit. Both read the same token ids, so tokenizers
cannot differ.

What is compared, per prompt:

* greedy tokens over ``--new-tokens``: the common prefix. bf16 arithmetic differs between any
  two engines, so greedy paths may part where two tokens are nearly tied. At the first divergence
  the script takes mlakit's own logits (a full forward over the common prefix) and the gap
  between mlakit's token and vLLM's; it counts as a near-tie when that gap is below twice the
  largest prompt-logprob difference the two engines show (the most two logits can move apart).
* prompt logprobs: the log-probability of every prompt token given the ones before, max abs diff.

Against two mlakit models: the export itself read back (``load_hf``: the very weights vLLM runs)
and the mlakit checkpoint it came from (unpadded; rms_norm_eps 1e-5 where the export has 1e-6).
Then vLLM's OpenAI server answers one completion on 127.0.0.1. Results: a JSON file and a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press. Within fifty years",
)
# vLLM CPU: MLA only at head size 576 with block size 16; its CPU rotary kernel silently corrupts
# MLA's rotary key, so the custom op is disabled and the PyTorch rotary used instead
VLLM_COMPILATION = {"custom_ops": ["-rotary_embedding"]}
MAX_MODEL_LEN = 512


# -- the vLLM side (runs in the vLLM venv) ---------------------------------------------------------


def worker(export: str, request: str, result: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(request).read_text())
    t0 = time.time()
    llm = LLM(
        export,
        dtype=job["dtype"],
        block_size=16,
        max_model_len=MAX_MODEL_LEN,
        compilation_config=VLLM_COMPILATION,
        enforce_eager=True,
    )
    load_s = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True, logprobs=2, prompt_logprobs=1)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], sp)
    gen_s = time.time() - t0
    rows = []
    for ids, o in zip(job["prompts"], outs):
        prompt_lp = [None] + [float(d[t].logprob) for d, t in zip(o.prompt_logprobs[1:], ids[1:])]
        step_lp = [{str(k): float(v.logprob) for k, v in d.items()} for d in o.outputs[0].logprobs]
        rows.append({"tokens": list(o.outputs[0].token_ids), "prompt_logprobs": prompt_lp, "logprobs": step_lp})
    import vllm

    out = {"vllm_version": vllm.__version__, "load_s": load_s, "generate_s": gen_s, "rows": rows}
    Path(result).write_text(json.dumps(out))


# -- the mlakit side ---------------------------------------------------------------------------------


def mlakit_side(model: Any, prompts: list[list[int]], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy tokens from mlakit's engine and prompt logprobs from a full forward."""
    import torch

    from mlakit import SamplingConfig
    from mlakit.engine import Engine, EngineConfig, Request

    engine = Engine(model, EngineConfig(kv_memory="256MiB", block_size=16))
    outs = engine.generate([Request(p, SamplingConfig(max_new_tokens=new_tokens)) for p in prompts])
    rows = []
    for ids, o in zip(prompts, outs):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # [T, V]
        prompt_lp = [None] + [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        rows.append({"tokens": list(o.tokens), "prompt_logprobs": prompt_lp})
    return rows


def compare(model: Any, prompts: list[list[int]], ours: list[dict], theirs: list[dict]) -> list[dict[str, Any]]:
    """Per prompt: common greedy prefix, the gap at the first divergence, prompt-logprob max diff."""
    import torch

    lp_diff = [
        max(abs(a - b) for a, b in zip(o["prompt_logprobs"][1:], t["prompt_logprobs"][1:]))
        for o, t in zip(ours, theirs)
    ]
    tie = 2 * max(lp_diff)
    out = []
    for ids, o, t, d in zip(prompts, ours, theirs, lp_diff):
        a, b = o["tokens"], t["tokens"]
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row: dict[str, Any] = {"new_tokens": len(a), "equal_prefix": n, "prompt_logprob_max_diff": d}
        if n < min(len(a), len(b)):
            with torch.no_grad():
                logits = model(torch.tensor([ids + a[:n]])).float()[0, -1]  # [V]
            top2 = torch.topk(logits, 2)
            gap = float(logits[a[n]] - logits[b[n]])
            vllm_lp = t["logprobs"][n]
            vllm_gap = vllm_lp.get(str(b[n]), float("nan")) - vllm_lp.get(str(a[n]), float("nan"))
            row["divergence"] = {
                "position": n,
                "mlakit_token": a[n],
                "vllm_token": b[n],
                "mlakit_gap": gap,  # mlakit's logit of its token minus of vLLM's
                "vllm_gap": vllm_gap,  # vLLM's logprob of its token minus of mlakit's (nan: not in its top 2)
                "vllm_token_is_mlakit_second": int(top2.indices[1]) == b[n],
                "near_tie": gap <= tie,
                "near_tie_threshold": tie,
            }
        out.append(row)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_env() -> dict[str, str]:
    """vLLM CPU reserves 92% of memory by default; 1 GiB of cache is plenty here (shared machine)."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def serve_once(vllm_python: str, export: Path, log: Path, prompt: str, timeout: float) -> dict[str, Any]:
    """Start vLLM's OpenAI server on loopback, wait until healthy, send one completion, stop it."""
    port = free_port()
    cmd = [
        vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
        "--served-model-name", "mlakit-export", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--block-size", "16", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--compilation-config", json.dumps(VLLM_COMPILATION),
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {proc.returncode} before it was ready: see {log}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"vLLM's server not ready after {timeout:.0f} s: see {log}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        ready_s = time.time() - t0
        body = {"model": "mlakit-export", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        req = urllib.request.Request(
            base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        t1 = time.time()
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        return {
            "url": base + "/v1/completions",
            "ready_s": ready_s,
            "request_s": time.time() - t1,
            "text": answer["choices"][0]["text"],
            "usage": answer.get("usage"),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="the vLLM venv's python")
    ap.add_argument("--model", default=None, help="mlakit MLA checkpoint (default: convert SmolLM2-135M at 50%%)")
    ap.add_argument("--work", default=None, help="working directory (default: $MLAKIT_CACHE/vllm-check)")
    ap.add_argument("--out", default="benchmarks/results/vllm_check.json", help="result JSON")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--server-timeout", type=float, default=600.0)
    ap.add_argument("--worker", nargs=3, metavar=("EXPORT", "REQUEST", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0

    import torch

    from mlakit.convert import ConversionConfig, convert
    from mlakit.engine.load import load_tokenizer
    from mlakit.interop import export_hf, load_hf
    from mlakit.io import cache_dir
    from mlakit.model import Transformer

    work = Path(args.work) if args.work else cache_dir() / "vllm-check"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.model:
        ckpt = Path(args.model)
    else:
        ckpt = work / "smollm2-135m-mla50"
        if not (ckpt / "config.json").is_file():
            print(f"converting SmolLM2-135M at --kv-fraction 0.5 (decoupled RoPE) into {ckpt}", flush=True)
            convert("smollm2-135m", ckpt, ConversionConfig(kv_fraction=0.5), progress=True)
    export = work / f"{ckpt.name}-576"
    report = export_hf(ckpt, export, pad_to=576, dtype="bf16", targets=("vllm-cpu",), overwrite=True)
    tok = load_tokenizer(ckpt)
    assert tok is not None, f"{ckpt} has no tokenizer"
    prompts = [tok.encode(p) for p in PROMPTS]

    def run_vllm(dtype: str) -> dict[str, Any]:
        print(f"vLLM (offline LLM, {dtype}) on {export} ...", flush=True)
        request, result = work / f"request_{dtype}.json", work / f"vllm_{dtype}.json"
        request.write_text(json.dumps({"prompts": prompts, "new_tokens": args.new_tokens, "dtype": dtype}))
        with open(work / f"vllm_offline_{dtype}.log", "w") as log:
            subprocess.run(
                [args.vllm_python, __file__, "--vllm-python", args.vllm_python, "--worker", str(export),
                 str(request), str(result)],
                check=True, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(),
            )  # fmt: skip
        return json.loads(result.read_text())

    vl = {dtype: run_vllm(dtype) for dtype in ("float32", "bfloat16")}
    # fp32: the same computation in both engines, so anything above rounding is a bug in the export;
    # bf16: what serving runs, where greedy paths may part at near-ties
    runs = (
        ("export in fp32 (load_hf)", "float32", load_hf(export, dtype=torch.float32)),
        ("export in bf16 (load_hf)", "bfloat16", load_hf(export, dtype=torch.bfloat16)),
        ("mlakit checkpoint in bf16", "bfloat16", Transformer.from_pretrained(ckpt, dtype=torch.bfloat16)),
    )
    refs: dict[str, Any] = {}
    ours: dict[str, list[dict[str, Any]]] = {}
    for name, dtype, model in runs:
        ours[name] = mlakit_side(model, prompts, args.new_tokens)
        refs[name] = {"vllm_dtype": dtype, "prompts": compare(model, prompts, ours[name], vl[dtype]["rows"])}
    # bf16's own noise: mlakit bf16 against mlakit fp32 on the same export
    floor = [
        max(abs(a - b) for a, b in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:]))
        for x, y in zip(ours["export in bf16 (load_hf)"], ours["export in fp32 (load_hf)"])
    ]

    print("vLLM's OpenAI server on 127.0.0.1 ...", flush=True)
    server = serve_once(args.vllm_python, export, work / "vllm_server.log", PROMPTS[0], args.server_timeout)
    # the server stops at the end-of-text token, as serving does; the offline run ignored it
    offline = vl["bfloat16"]["rows"][0]["tokens"][:16]
    eos = tok.eos_token_id
    offline = offline[: offline.index(eos)] if eos in offline else offline
    server["offline_text"] = tok.decode(offline)
    server["same_as_offline"] = server["text"] == server["offline_text"]

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vllm_version": vl["bfloat16"]["vllm_version"],
        "command": "scripts/vllm-check " + " ".join(_user_args(sys.argv[1:])),
        "checkpoint": str(ckpt),
        "export": str(export),
        "export_shape": {"kv_lora_rank": report.kv_lora_rank, "qk_rope_head_dim": 64, "dtype": "bf16"},
        "cache": report.cache.to_dict() if report.cache else None,
        "vllm_settings": {"block_size": 16, "compilation_config": VLLM_COMPILATION, "enforce_eager": True},
        "vllm_load_s": {k: v["load_s"] for k, v in vl.items()},
        "vllm_generate_s": {k: v["generate_s"] for k, v in vl.items()},
        "prompts": list(PROMPTS),
        "prompt_tokens": [len(p) for p in prompts],
        "vllm_bf16_text": [tok.decode(r["tokens"]) for r in vl["bfloat16"]["rows"]],
        "comparisons": refs,
        "bf16_noise_floor_prompt_logprob": floor,
        "server": server,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def _user_args(argv: list[str]) -> list[str]:
    """The command line as typed at scripts/vllm-check (without the --vllm-python it adds)."""
    i = argv.index("--vllm-python") if "--vllm-python" in argv else -2
    return argv[:i] + argv[i + 2 :] if i >= 0 else argv


def print_table(r: dict[str, Any]) -> None:
    print(f"\nvLLM {r['vllm_version']} (CPU backend, block 16) vs mlakit's engine, export {r['export']}")
    print(f"{'mlakit reference':28} {'vLLM':9} {'prompt':>6} {'equal greedy':>13} {'prompt logprob':>15}  first")
    print(f"{'':28} {'':9} {'':>6} {'tokens':>13} {'max abs diff':>15}  divergence")
    for ref, c in r["comparisons"].items():
        for i, row in enumerate(c["prompts"]):
            dv = row.get("divergence")
            if dv is None:
                what = "none"
            else:
                kind = "near-tie" if dv["near_tie"] else "NOT a near-tie"
                gap, tie = dv["mlakit_gap"], dv["near_tie_threshold"]
                what = f"at {dv['position']}: mlakit logit gap {gap:+.3f} ({kind}, < {tie:.3f})"
            eq = f"{row['equal_prefix']}/{row['new_tokens']}"
            lp = row["prompt_logprob_max_diff"]
            print(f"{ref:28} {c['vllm_dtype']:9} {i:>6} {eq:>13} {lp:>15.2e}  {what}")
    floor = ", ".join(f"{x:.3f}" for x in r["bf16_noise_floor_prompt_logprob"])
    print(f"bf16 noise floor (mlakit bf16 vs fp32, prompt logprob max abs diff per prompt): {floor}")
    s = r["server"]
    print(f"server: ready in {s['ready_s']:.0f} s; completion {s['text']!r} (same as offline: {s['same_as_offline']})")


if __name__ == "__main__":
    sys.exit(main())
