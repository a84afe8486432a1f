"""``mlakit generate``: stream text from a model through the inference engine."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from mlakit.engine.config import ENGINE_CACHE_DTYPES
from mlakit.errors import MlakitError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by ``generate`` and ``bench``."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--kv-memory",
        default="1GiB",
        metavar="SIZE",
        help="bytes for the paged KV/latent cache, e.g. 2GiB (default 1GiB); never exceeded",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default 16)")
    g.add_argument(
        "--cache-dtype",
        choices=ENGINE_CACHE_DTYPES,
        default="auto",
        help="cache storage; auto = the weights' dtype; int8 = per-token scales (default auto)",
    )
    g.add_argument(
        "--decode-path",
        choices=("auto", "absorbed", "naive"),
        default="auto",
        help="MLA decode: absorbed (W_UK/W_UV folded, needs decoupled RoPE) or naive "
        "(decompress the latents); auto = absorbed when possible",
    )
    g.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "int8"),
        default="auto",
        help="weights: fp32, bf16, or int8 (weight-only, per-channel scales; bf16 or fp32 activations); "
        "auto = int8 on CPUs with bf16 arithmetic (avx512_bf16/AMX), else fp32; bf16 on GPUs (default auto)",
    )
    g.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "cpu", "triton"),
        default="auto",
        help="kernel that reads the paged cache: cpu (no copies), torch (reference), triton (CUDA); "
        "auto = cpu on CPU, triton on CUDA (default auto)",
    )
    g.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    g.add_argument(
        "--no-fused-decode",
        dest="fused_decode",
        action="store_false",
        help="on CPU, run decode steps through the model instead of the fused C step (absorbed MLA and GQA models)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a model (streams to stdout)",
        description="Generate text with the mlakit inference engine (paged latent cache, continuous batching, "
        "absorbed MLA decode). MODEL is an mlakit checkpoint directory (config.json + model.safetensors, "
        "with the tokenizer files beside them), a Llama-family Hugging Face directory or .gguf file, or the "
        "alias smollm2-135m (run as its original GQA model). One prompt streams as it is generated; several "
        "prompts are served together as one continuous batch and printed in order.",
        epilog='example: mlakit generate --model ckpt/smollm2-mla "Write a haiku about caches" --max-tokens 64 '
        "--temperature 0.7 --top-p 0.9 --seed 0",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    p.add_argument("--model", required=True, help="checkpoint directory, HF dir, .gguf file or alias")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128, help="most new tokens per prompt (default 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    s.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    s.add_argument(
        "--stop-token",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="stop token id (repeatable); the model's end-of-sequence token always stops unless --ignore-eos",
    )
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    s.add_argument(
        "--no-chat",
        action="store_true",
        help="feed the prompt as plain text even when the tokenizer has a chat template",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace) -> Any:
    from mlakit.engine import EngineConfig

    return EngineConfig(
        kv_memory=args.kv_memory,
        block_size=args.block_size,
        cache_dtype=args.cache_dtype,
        decode_path=args.decode_path,
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
        fused_decode=args.fused_decode,
    )


def run(args: argparse.Namespace) -> int:
    from mlakit.engine import Engine, Request
    from mlakit.engine.load import load_model
    from mlakit.generate import SamplingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    config = engine_config(args)  # bad engine flags fail before the slow load
    loaded = load_model(args.model, weights=args.dtype)
    tok = loaded.tokenizer
    if tok is None:
        raise MlakitError(f"{args.model} has no tokenizer (tokenizer.json): cannot generate text")
    stops = list(args.stop_token)
    if not args.ignore_eos:
        for eos in (loaded.model.config.eos_token_id, tok.eos_token_id):
            if eos is not None and eos not in stops:
                stops.append(eos)
    sampling = SamplingConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=tuple(stops),
    )
    engine = Engine(loaded.model, config, tokenizer=tok)
    chat = tok.has_chat_template and not args.no_chat
    requests = [
        Request(tok.encode_chat(p) if chat else tok.encode(p), sampling, tuple(args.stop), f"{i}")
        for i, p in enumerate(prompts)
    ]
    status = 0
    timer = _Timer()
    if len(requests) == 1:
        for ev in engine.stream(requests):
            if ev.error:
                raise MlakitError(ev.error)
            timer.token()
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for ev in engine.stream(requests):
            if ev.token is not None:
                timer.token()
        for i in range(len(requests)):
            out = engine.output(f"{i}")
            err = engine.error(f"{i}")
            if err:
                print(f"[{i}] error: {err}", file=sys.stderr)
                status = 2
                continue
            print(f"[{i}] {out.text}")
    if args.verbose:
        prompt_tokens = sum(len(r.prompt) for r in requests)  # type: ignore[arg-type]
        print(timer.report(prompt_tokens, loaded.weights, engine.runner.backend.name), file=sys.stderr)
    return status


class _Timer:
    """Time to the first token and decode tokens/s after it (for ``-v``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.count = 0

    def token(self) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.count += 1

    def report(self, prompt_tokens: int, weights: str, backend: str) -> str:
        if self.first is None:
            return "no tokens generated"
        ttft = self.first - self.start
        rest = self.last - self.first
        rate = (self.count - 1) / rest if rest > 0 and self.count > 1 else float("nan")
        return (
            f"{prompt_tokens} prompt tokens, first token after {ttft:.2f} s "
            f"({prompt_tokens / ttft:.0f} prompt tokens/s); "
            f"{self.count} tokens, {rate:.1f} tokens/s after the first (weights {weights}, backend {backend})"
        )
