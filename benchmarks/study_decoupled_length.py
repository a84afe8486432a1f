"""Decoupled (absorbable) conversion at length: rotary width and healing, scored at 512 and 4096 tokens.

The study behind the decoupled defaults in docs/conversion.md ("Healing"): one calibration of the
source, then for each variant a conversion (:class:`mlakit.convert.ConversionConfig` fields), an
optional heal (:class:`mlakit.convert.HealConfig` fields), and a score against the original on
held-out GNU info manual nodes, which neither the old calibration text (python-docs) nor
evaluation used: ``--short`` windows of 512 tokens and ``--long`` windows of 4096.

    python benchmarks/study_decoupled_length.py \
        '[[{"kv_fraction": 0.5, "rope_dims": 32}, null], [{"kv_fraction": 0.5, "rope_dims": 48}, {"steps": 60}]]'

Each variant prints one line (perplexity / original at both lengths, top-1 agreement at 4096,
seconds) as soon as it is done; ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mlakit.convert import ConversionConfig, HealConfig, calibrate, convert_calibrated, heal, load_hf_model
from mlakit.convert.heal import heal_windows
from mlakit.eval.metrics import ScoreMemo, as_logits_fn, evaluate
from mlakit.text.corpus import genre_corpora, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", help="JSON list of [conversion fields, heal fields or null]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--short", type=int, default=4, help="512-token evaluation windows (default 4)")
    ap.add_argument("--long", type=int, default=1, help="4096-token evaluation windows (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_hf_model(args.model)
    tok = loaded.tokenizer
    cal_genres, eval_genres = genre_corpora("calibration"), genre_corpora("evaluation")
    cal_tokens = torch.cat(
        [token_windows(cal_genres[g], tok, num_windows=16, seq_len=512) for g in ("python-docs", "info")]
    )
    cal = calibrate(loaded, tokens=cal_tokens)
    info = eval_genres["info"]
    short = token_windows(info, tok, num_windows=args.short + 8, seq_len=512)[8:]  # not the long window's text
    long = token_windows(info, tok, num_windows=args.long, seq_len=4096)
    reference = ScoreMemo(as_logits_fn(loaded.model))
    rows = []
    for conv_fields, heal_fields in json.loads(args.variants):
        t0 = time.time()
        model = convert_calibrated(cal, ConversionConfig(**conv_fields)).model
        row = {"conversion": conv_fields, "heal": heal_fields}
        if heal_fields is not None:
            hc = HealConfig(**heal_fields)
            row["heal_seconds"] = round(heal(model, loaded.model, heal_windows(tok, hc), hc).seconds, 1)
        f = as_logits_fn(model)
        a = evaluate(f, short, reference=reference)
        b = evaluate(f, long, reference=reference)
        assert a.reference_perplexity and b.reference_perplexity
        row |= {
            "x_ppl_512": a.perplexity / a.reference_perplexity,
            "x_ppl_4096": b.perplexity / b.reference_perplexity,
            "top1_4096": b.top1_agreement,
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
