"""``mlakit serve``: an OpenAI-compatible HTTP server over the engine (docs/serving.md)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from mlakit.cli.generate import add_engine_args, engine_config
from mlakit.errors import MlakitError

DEFAULT_NAME = "smollm2-135m-mla50"
# the default model's recipe; part of its cache directory's name, so a changed recipe is remade
# (2: calibration and heal with chat-framed windows, which keep it answering long requests;
# 3: the heal's end-to-end loss weighs each request's answer position, HealConfig.answer_weight)
DEFAULT_RECIPE = 3


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model with the mlakit engine behind OpenAI-compatible endpoints: /v1/completions, "
        "/v1/chat/completions (streaming as server-sent events), /v1/models, /health, /metrics (Prometheus). "
        "Requests from all clients share the engine's continuous batch and its paged latent cache. With no "
        "--model it serves the embedded SmolLM2-135M converted to MLA at 50%% of the cache in the absorbable "
        "form and healed (made on first use, ~10 minutes, and cached). Binds to 127.0.0.1 unless --host says "
        "otherwise. SIGTERM stops admitting, lets running requests finish for --grace seconds, then exits 0. "
        "--threads: all cores (the default) for throughput under load; all but one for the lowest latency "
        "at low load.",
        epilog="example: mlakit serve --model runs/smol-mla50-healed --port 8000 --kv-memory 2GiB --api-key sk-local",
    )
    p.add_argument("--model", default=None, help="checkpoint directory, HF dir, .gguf or alias (default: see above)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $MLAKIT_API_KEY)")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond the batch before 429 (default 256)"
    )
    p.add_argument("--max-body", default="4MiB", metavar="SIZE", help="largest request body (default 4MiB)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get after SIGTERM (default 30)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoding together (default 32)")
    p.add_argument(
        "--engine-thread",
        action="store_true",
        help="run the engine on a thread of the server's process instead of its own process (one process and "
        "one copy of the weights, but each decode step then waits for the HTTP side's Python: ~0.5 ms per token)",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def default_model() -> Path:
    """The embedded SmolLM2 converted at 50% (decoupled, healed), made once under ``$MLAKIT_CACHE/serve``."""
    from mlakit.convert import ConversionConfig, calibrate, convert_calibrated, save_converted
    from mlakit.convert.heal import HealConfig, heal_recorded
    from mlakit.io import cache_dir

    out = cache_dir() / "serve" / f"{DEFAULT_NAME}.r{DEFAULT_RECIPE}"
    if (out / "config.json").is_file():
        print(f"serving the cached default model {out}", flush=True)
        return out
    print(f"making the default model once (SmolLM2-135M -> MLA at 50%, healed; ~10 minutes) at {out}", flush=True)
    cal = calibrate("smollm2-135m", progress=True)
    result = convert_calibrated(cal, ConversionConfig(kv_fraction=0.5), progress=True)
    heal_recorded(
        result.model, cal.loaded.model, cal.loaded.tokenizer, result.record,
        reference_name="smollm2-135m", config=HealConfig(), progress=True,
    )  # fmt: skip
    return save_converted(result, out)


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MlakitError(
            f"mlakit serve needs the serve extra ({e.name} is missing): pip install 'mlakit[serve]'"
        ) from e

    from mlakit.engine import Engine
    from mlakit.engine.load import load_model, load_tokenizer, resolve_for_inference
    from mlakit.serve.app import ServeConfig, build_app
    from mlakit.serve.worker import EngineProcess, EngineSpec, EngineWorker, Worker
    from mlakit.units import parse_bytes

    if args.threads:
        # all cores (torch's default) give the most throughput under load; one core left to the HTTP
        # side gives the lowest latency per token at low load (BENCHMARKS.md "Serving")
        torch.set_num_threads(args.threads)
    if args.max_queue < 0 or args.max_batch_size <= 0 or args.grace < 0:
        raise MlakitError("--max-queue and --grace must be >= 0, --max-batch-size > 0")
    cfg = dataclasses.replace(engine_config(args), max_batch_size=args.max_batch_size)
    model_path = str(resolve_for_inference(args.model or str(default_model())))
    tok = load_tokenizer(model_path)  # before any weights load: the server needs it in either mode
    if tok is None:
        raise MlakitError(f"{model_path} has no tokenizer (tokenizer.json): cannot serve text")
    worker: Worker
    if args.engine_thread:
        loaded = load_model(model_path, weights=args.dtype)
        thread_worker = EngineWorker(lambda: Engine(loaded.model, cfg, tokenizer=tok))
        max_seq_len, eos_id, weights = loaded.model.config.max_seq_len, loaded.model.config.eos_token_id, loaded.weights
        capacity, worker, where = thread_worker.engine.cache.capacity_tokens(), thread_worker, "a thread"
    else:
        engine_process = EngineProcess(EngineSpec(model_path, args.dtype, cfg, args.threads))
        info = engine_process.info
        max_seq_len, eos_id, weights, capacity = (
            info["max_seq_len"], info["eos_token_id"], info["weights"], info["capacity_tokens"]
        )  # fmt: skip
        worker, where = engine_process, f"process {engine_process.pid}"
    eos = tuple(t for t in {eos_id, tok.eos_token_id} if t is not None)
    name = args.served_model_name or (DEFAULT_NAME if args.model is None else Path(model_path).name)
    serve_cfg = ServeConfig(
        model_name=name,
        max_seq_len=max_seq_len,
        max_batch_size=cfg.max_batch_size,
        api_key=args.api_key or os.environ.get("MLAKIT_API_KEY") or None,
        max_queue=args.max_queue,
        max_body_bytes=parse_bytes(args.max_body),
    )
    app = build_app(worker, tok, serve_cfg, eos)
    print(
        f"serving {name} ({weights} weights, {capacity} cached tokens in {cfg.kv_bytes / 2**20:.0f} MiB; "
        f"engine in {where}) on http://{args.host}:{args.port}/v1",
        flush=True,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=int(args.grace) or None
    )

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT that ended in a graceful shutdown exits 0.

        (uvicorn re-raises the captured signal once it has shut down, so the process would end with
        143; a server that drained as asked has succeeded.)
        """

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    GracefulServer(config).run()
    return 0
