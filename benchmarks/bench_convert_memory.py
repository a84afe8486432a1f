"""Peak memory of `mlakit convert` on a model with Llama-3.2-1B's (or Llama-3.1-8B's) shapes, random bf16 weights.

The 1B source is made once by transformers (``LlamaForCausalLM`` with Llama-3.2-1B's config: 16
layers, hidden 2048, 32 heads, 8 KV heads, head dim 64, MLP 8192, vocabulary 128,256, tied
embeddings, ``llama3`` RoPE scaling), saved as bf16 safetensors shards (~2.5 GB) with SmolLM2's
tokenizer (its ids fit the vocabulary), and cached under ``$MLAKIT_CACHE/bench``. The 8B source
(``--shape llama-3.1-8b``: 32 layers, hidden 4096, MLP 14336, untied head; ~15 GB) is drawn tensor
by tensor and streamed into 2 GB shards, since this machine cannot hold it in float32. Random
weights say nothing about quality; they cost exactly what real ones cost.

Each conversion runs in its own process, which reports its resident memory after its imports
(the interpreter's baseline: Python, torch, transformers, mlakit) and its peak (``VmHWM``, file
pages of the memory-mapped shards included). Paths:

* ``layer-by-layer``: :func:`mlakit.convert.stream.convert_checkpoint` (what ``mlakit convert``
  runs): one layer of the source at a time, output streamed into one file in the source's dtype;
* ``in-memory`` (``--in-memory``): ``load_hf_model`` + ``calibrate`` + ``convert_calibrated`` +
  ``save_converted``, the path ``mlakit tradeoff`` and ``--heal`` use (the whole source in float32).

    python benchmarks/bench_convert_memory.py [--in-memory] [--windows 32 --seq-len 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

LLAMA_31_8B = dict(
    LLAMA_32_1B,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    tie_word_embeddings=False,
    rope_parameters=dict(LLAMA_32_1B["rope_parameters"], factor=8.0),  # type: ignore[arg-type]
)
SHAPES = {"llama-3.2-1b": LLAMA_32_1B, "llama-3.1-8b": LLAMA_31_8B}

# 8B in float32 would not fit this machine: the tensors are drawn one at a time and streamed into shards
STREAM_SOURCE = """
import json, sys, torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from mlakit.io import SafetensorsStream
cfg = LlamaConfig(**{cfg})
out = Path(sys.argv[1])
with torch.device("meta"):
    names = {{k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}}
if cfg.tie_word_embeddings:
    names.pop("lm_head.weight")
shards, current, size = [], [], 0
for k, shape in names.items():
    n = 2 * torch.Size(shape).numel()
    if current and size + n > 2 * 2**30:
        shards.append(current); current, size = [], 0
    current.append(k); size += n
shards.append(current)
g = torch.Generator().manual_seed(0)
weight_map = {{}}
for i, keys in enumerate(shards):
    name = f"model-{{i + 1:05d}}-of-{{len(shards):05d}}.safetensors"
    stream = SafetensorsStream(out / name, {{k: (torch.bfloat16, names[k]) for k in keys}}, {{"format": "pt"}})
    for k in keys:
        t = torch.ones(names[k]) if k.endswith("norm.weight") else torch.randn(names[k], generator=g) * 0.02
        stream.write(k, t.to(torch.bfloat16))
        weight_map[k] = name
    stream.close()
(out / "model.safetensors.index.json").write_text(json.dumps({{"metadata": {{}}, "weight_map": weight_map}}))
cfg.torch_dtype = torch.bfloat16
cfg.save_pretrained(out)
AutoTokenizer.from_pretrained(sys.argv[2]).save_pretrained(out)
"""

MAKE_SOURCE = """
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(**{cfg})
torch.manual_seed(0)
with torch.device("cpu"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
AutoTokenizer.from_pretrained(sys.argv[2]).save_pretrained(sys.argv[1])
"""

# runs in a fresh process: baseline after imports, then the conversion, then the peak
CONVERT = """
import json, sys, time
import torch, transformers
import mlakit.convert, mlakit.convert.stream
from mlakit.convert import ConversionConfig

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

source, out, path, windows, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cfg = ConversionConfig(kv_fraction=0.5, calibration_windows=windows, calibration_seq_len=seq_len)
baseline = status("VmRSS")
t0 = time.time()
if path == "layer-by-layer":
    record = mlakit.convert.stream.convert_checkpoint(source, out, cfg, progress=True)
else:
    from mlakit.convert import calibrate, convert_calibrated, save_converted
    cal = calibrate(source, windows=windows, seq_len=seq_len, progress=True)
    result = convert_calibrated(cal, cfg, progress=True)
    save_converted(result, out)
    record = result.record
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "seconds": time.time() - t0,
                  "kv_lora_ranks": record["kv_lora_ranks"], "qk_rope_head_dim": record["qk_rope_head_dim"]}))
"""


def _source(cache: Path, shape: str) -> Path:
    """The random bf16 checkpoint of ``shape`` (made once)."""
    from mlakit.convert.load import resolve_model_path

    path = cache / "bench" / f"{shape}-shapes-random-bf16"
    if (path / "config.json").is_file():
        return path
    tokenizer = resolve_model_path("smollm2-135m")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent))
    print(f"making the source once: {path}", file=sys.stderr)
    code = (MAKE_SOURCE if shape == "llama-3.2-1b" else STREAM_SOURCE).format(cfg=repr(SHAPES[shape]))
    subprocess.run([sys.executable, "-c", code, str(tmp), str(tokenizer)], check=True)
    tmp.rename(path)
    return path


def _convert(source: Path, path: str, windows: int, seq_len: int) -> dict[str, object]:
    out = Path(tempfile.mkdtemp()) / "mla"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CONVERT, str(source), str(out), path, str(windows), str(seq_len)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["output_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        return result
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    from mlakit.io import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-1b", help="the source's shapes")
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path, for comparison")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows (default 32, mlakit's)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512, mlakit's)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    source = _source(cache_dir(), args.shape)
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    rows = []
    for path in ["layer-by-layer"] + (["in-memory"] if args.in_memory else []):
        print(f"converting ({path}) ...", file=sys.stderr)
        r = _convert(source, path, args.windows, args.seq_len)
        r["path"] = path
        r["above_baseline"] = int(r["peak"]) - int(r["baseline"])  # type: ignore[call-overload]
        rows.append(r)
    gib = 2**30
    print(
        f"source: {args.shape} shapes, random bf16, {source_bytes / gib:.2f} GiB; 50% cache; "
        f"calibration {args.windows} x {args.seq_len} tokens\n"
    )
    print("| path | baseline RSS | peak RSS | above baseline | output | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['path']} | {int(r['baseline']) / gib:.2f} GiB | {int(r['peak']) / gib:.2f} GiB | "  # type: ignore[call-overload]
            f"**{int(r['above_baseline']) / gib:.2f} GiB** | {int(r['output_bytes']) / gib:.2f} GiB | "  # type: ignore[call-overload]
            f"{float(r['seconds']):.0f} |"  # type: ignore[arg-type]
        )
    if args.json:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), [])
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(),
            "cpu_flags": [f for f in flags if f.startswith(("avx", "amx", "fma"))],
            "command": " ".join(sys.argv),
            "shape": args.shape,
            "source_bytes": source_bytes,
            "windows": args.windows,
            "seq_len": args.seq_len,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
