"""``mlakit tradeoff``: convert at several cache budgets, evaluate each, tabulate and plot.

One source model is loaded and calibrated once; every (variant, kv_fraction) conversion reuses
the calibration statistics, and the reference's logits are computed once and memoised.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.convert.convert import ConversionConfig, calibrate, convert_calibrated
from mlakit.errors import MlakitError
from mlakit.eval.corpus import default_corpus, files_corpus, token_windows
from mlakit.eval.metrics import as_logits_fn, evaluate
from mlakit.eval.models import from_hf

logger = logging.getLogger(__name__)

#: (label, rope, method) of the curves a tradeoff run draws.
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("decoupled (pca)", "decoupled", "pca"),
    ("full (pca)", "full", "pca"),
    ("weight-SVD (full)", "full", "svd"),
)


@dataclass(frozen=True)
class TradeoffConfig:
    model: str = "smollm2-135m"
    kv_fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    variants: tuple[tuple[str, str, str], ...] = VARIANTS
    texts: tuple[str, ...] = ()
    windows: int = 8
    seq_len: int = 512
    calibration_windows: int = 32
    calibration_seq_len: int = 512
    cache_dtype: str = "bf16"
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if not self.kv_fractions:
            raise MlakitError("kv_fractions: give at least one fraction")
        for f in self.kv_fractions:
            if not 0 < f <= 1:
                raise MlakitError(f"kv_fraction={f} must lie in (0, 1] (1 = the original cache size)")
        for n in ("windows", "seq_len", "calibration_windows", "calibration_seq_len"):
            if getattr(self, n) <= 0:
                raise MlakitError(f"{n}={getattr(self, n)} must be positive")


class _Memo:
    """Memoise a logits function by the exact tokens it is called on (the reference, here)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.store = fn, {}  # type: ignore[var-annotated]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        key = (tuple(tokens.shape), tokens.numpy().tobytes())
        if key not in self.store:
            self.store[key] = self.fn(tokens)
        return self.store[key]


def run_tradeoff(
    cfg: TradeoffConfig, out_dir: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Run the sweep; write ``tradeoff.json`` and ``tradeoff.png`` into ``out_dir`` if given."""
    from tqdm.auto import tqdm

    t0 = time.time()
    eval_corpus = files_corpus(list(cfg.texts)) if cfg.texts else default_corpus("evaluation")
    cal = calibrate(cfg.model, windows=cfg.calibration_windows, seq_len=cfg.calibration_seq_len, progress=progress)
    hf = cal.loaded.model
    source = from_hf(hf, cal.loaded.tokenizer, cfg.model)
    tokens = token_windows(eval_corpus, cal.loaded.tokenizer, num_windows=cfg.windows, seq_len=cfg.seq_len)
    reference = _Memo(as_logits_fn(hf))
    with torch.no_grad():
        base = evaluate(reference, tokens, progress=progress, desc="eval original")
    orig_bytes = source.kv_bytes_per_token(cfg.cache_dtype)
    bpe = orig_bytes // source.kv_elements_per_token
    rows: list[dict[str, Any]] = []
    jobs = [(v, f) for v in cfg.variants for f in cfg.kv_fractions]
    for (label, rope, method), frac in tqdm(jobs, desc="tradeoff", disable=not progress):
        conv = ConversionConfig(
            kv_fraction=frac,
            rope=rope,  # type: ignore[arg-type]
            method=method,  # type: ignore[arg-type]
            allocation=cfg.allocation,  # type: ignore[arg-type]
        )
        row: dict[str, Any] = {"variant": label, "rope": rope, "method": method, "kv_fraction": frac}
        try:
            res = convert_calibrated(cal, conv)
        except MlakitError as e:
            logger.warning("%s at kv_fraction=%s: %s", label, frac, e)
            rows.append({**row, "error": str(e)})
            continue
        with torch.no_grad():
            r = evaluate(
                as_logits_fn(res.model), tokens, reference=reference, progress=progress, desc=f"eval {label} {frac}"
            )
        elems = res.model.config.cache_elements_per_token()
        rows.append(
            {
                **row,
                "kv_bytes_per_token": elems * bpe,
                "kv_fraction_achieved": elems / source.kv_elements_per_token,
                "qk_rope_head_dim": res.record["qk_rope_head_dim"],
                "kv_lora_ranks": res.record["kv_lora_ranks"],
                "perplexity": r.perplexity,
                "perplexity_ratio": r.perplexity / base.perplexity,
                "top1_agreement": r.top1_agreement,
                "kl": r.kl,
            }
        )
        del res
    result = {
        "model": cfg.model,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "config": dataclasses.asdict(cfg),
        "calibration_text": f"{cal.corpus} ({cal.tokens} tokens)",
        "evaluation_text": f"{eval_corpus.name} ({base.tokens} predicted tokens)",
        "cache_dtype": cfg.cache_dtype,
        "original": {"perplexity": base.perplexity, "kv_bytes_per_token": orig_bytes},
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tradeoff.json").write_text(json.dumps(result, indent=2))
        plot_tradeoff(result, out / "tradeoff.png")
    return result


def plot_tradeoff(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """KV bytes/token (x) vs perplexity (y, log) for each variant; the original is a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["variant"] for r in result["rows"]):
        pts = sorted(
            (r["kv_bytes_per_token"], r["perplexity"])
            for r in result["rows"]
            if r["variant"] == label and "perplexity" in r
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    o = result["original"]
    ax.plot(
        [o["kv_bytes_per_token"]],
        [o["perplexity"]],
        marker="*",
        markersize=14,
        color="k",
        linestyle="none",
        label=f"original (ppl {o['perplexity']:.2f})",
    )
    ax.set_xlabel(f"KV cache bytes per token ({result['cache_dtype']})")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']}: cache size vs quality (training-free MLA conversion)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of a :func:`run_tradeoff` result."""
    o = result["original"]
    lines = [
        f"calibration: {result['calibration_text']}",
        f"evaluation:  {result['evaluation_text']}",
        f"original: perplexity {o['perplexity']:.3f}, {o['kv_bytes_per_token']} KV bytes/token "
        f"({result['cache_dtype']})",
        "",
        f"{'variant':<20} {'kv frac':>7} {'bytes/tok':>9} {'rope':>4} {'ppl':>9} {'x orig':>7} {'top1':>6} {'KL':>7}",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['variant']:<20} {r['kv_fraction']:>7.3f}  {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<20} {r['kv_fraction_achieved']:>7.3f} {r['kv_bytes_per_token']:>9} "
            f"{r['qk_rope_head_dim']:>4} {r['perplexity']:>9.3f} {r['perplexity_ratio']:>7.3f} "
            f"{r['top1_agreement']:>6.3f} {r['kl']:>7.4f}"
        )
    return "\n".join(lines)
