"""Convert a checkpoint layer by layer: memory for one layer, not for the model.

:func:`~mlakit.convert.convert.calibrate` + :func:`~mlakit.convert.convert.convert_calibrated`
hold the whole source in float32 (and every layer's statistics), which is what ``mlakit tradeoff``
wants: one calibration, many conversions. A single conversion of a large model needs only one
layer at a time, so :func:`convert_checkpoint` makes one pass over the layers::

    for layer l (the source's shards read lazily, in their own dtype):
        x      = attention input of l in the original model      [N, T, n]   (one block forward)
        sigma  = E[x~ x~^T]                                     [n+1, n+1]
        MLA    = convert_block(weights of l, sigma)             (the same code as the in-memory path)
        write MLA block l into the output file                  (its tensors, then drop them)
        hidden = original block l (hidden)                      (and the converted one, when sequential)

Peak memory: the interpreter, the calibration activations (``2 N T n`` float32: two hidden-state
sets), one layer's weights in float32 plus its conversion in float64, and the embedding table once
at the start. The output is written into one ``model.safetensors`` whose header is known in
advance (:class:`~mlakit.io.SafetensorsStream`), in the source's dtype by default.

Greedy rank allocation needs every layer's spectrum before the first layer is converted: it runs
one extra calibration pass that keeps only the spectra.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from mlakit.convert.arch import attention_weights, model_weights
from mlakit.convert.convert import (
    RECORD_FILE,
    attention_input,
    conversion_record,
    convert_block,
    has_qkv_bias,
    max_latent_rank,
    plan_conversion,
    source_ranks,
    spectrum,
)
from mlakit.convert.options import ConversionConfig
from mlakit.convert.sequential import SequentialRun
from mlakit.convert.source import CheckpointSource, OriginalLayers, attention_input_moments
from mlakit.errors import MlakitError
from mlakit.io import SafetensorsStream, write_dir, write_json
from mlakit.model import FORMAT, WEIGHTS_FILE, Transformer, save_config
from mlakit.text.chat import mixed_windows
from mlakit.text.corpus import Corpus, default_corpus

logger = logging.getLogger(__name__)

__all__ = ["convert_checkpoint"]


def _layout(model_config: Any, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of the converted checkpoint, in writing order: embedding, final norm, head, then
    the layers in order. Shapes come from the model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        shell = Transformer(model_config)
    state = shell.state_dict()
    if model_config.tie_word_embeddings:
        state.pop("lm_head.weight")
    top = [k for k in state if not k.startswith("layers.")]
    layers = [k for i in range(model_config.num_layers) for k in state if k.startswith(f"layers.{i}.")]
    return {k: (dtype, tuple(state[k].shape)) for k in top + layers}


def convert_checkpoint(
    source: str | os.PathLike[str] | CheckpointSource,
    out: str | os.PathLike[str],
    config: ConversionConfig | None = None,
    *,
    corpus: Corpus | None = None,
    tokens: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert a Hugging Face safetensors checkpoint into an mlakit MLA checkpoint, one layer at a time.

    Args:
        source: the source directory (``config.json``, ``*.safetensors``, tokenizer files).
        out: the output directory, written atomically (nothing appears until it is complete).
        config: how to convert (``rotation_average`` is not available here).
        corpus / tokens: calibration text (default: the built-in genre mix, calibration split), or
            ready ``[N, T]`` token ids.
        dtype: the output's weight dtype (default: the source's, e.g. bfloat16).
        device: where the block forwards run (``cuda``: the forwards are the cost); the
            factorisation runs on the CPU in float64.

    Returns:
        The conversion record (also written as ``conversion.json``).

    Raises:
        MlakitError: a source this form cannot take, a missing shard or tensor, non-finite
            results, or an existing ``out`` without ``overwrite``; nothing is written then.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    config = config or ConversionConfig()
    if config.rotation_average:
        raise MlakitError("rotation_average needs the in-memory path (calibrate + convert_calibrated)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise MlakitError(f"--out {out} already exists; choose a new directory (or --overwrite)")
    src = source if isinstance(source, CheckpointSource) else CheckpointSource(source)
    spec, get = src.spec, src.get
    config.check_source(spec, src.name)
    if tokens is None:
        if src.tokenizer is None:
            raise MlakitError(f"{src.name}: a tokenizer is needed for calibration text")
        corpus = corpus or default_corpus("calibration")
        tokens, corpus_name = mixed_windows(
            corpus,
            src.tokenizer,
            num_windows=config.calibration_windows,
            seq_len=config.calibration_seq_len,
            chat=config.calibration_chat,
        )
    else:
        corpus_name = "given tokens"
    out_dtype = dtype or src.dtype
    has_bias = has_qkv_bias(spec, get)
    original = OriginalLayers(spec, get, tokens.shape[1], device, source=src.name)

    def spectra() -> list[torch.Tensor]:
        recipe = plan_conversion(spec, config, (1,) * spec.num_layers, has_bias, src.name).recipe
        return [
            spectrum(spec, get, i, attention_weights(spec, get, i), attention_input_moments(blk, h), recipe)
            for i, blk, h in tqdm(
                original.layers(tokens), total=spec.num_layers, desc="spectra", disable=not progress, leave=False
            )
        ]

    ranks = source_ranks(spec, config, max_latent_rank(spec, has_bias), spectra)
    plan = plan_conversion(spec, config, ranks, has_bias, src.name)
    layout = _layout(plan.model, out_dtype)
    k = min(config.sequential_inputs(), tokens.shape[0])
    logger.info(
        "converting %s layer by layer (%s, ranks %s) on %d x %d tokens of %s",
        src.name,
        config.rope,
        sorted(set(ranks)),
        *tokens.shape,
        corpus_name,
    )

    def write(tmp: Path) -> dict[str, Any]:
        stream = SafetensorsStream(tmp / WEIGHTS_FILE, layout, {"format": FORMAT})
        top = model_weights(spec, get)
        for name in (n for n in layout if not n.startswith("layers.")):
            stream.write(name, top[name])
        del top
        run = SequentialRun(spec, get, plan, tokens[:k], device) if plan.sequential else None
        layers = tqdm(
            original.layers(tokens),
            total=spec.num_layers,
            desc=f"convert ({config.rope}, {config.method})",
            disable=not progress,
        )
        for i, blk, hidden in layers:
            w = attention_weights(spec, get, i)
            if run is not None:
                x_orig = attention_input(blk, hidden[:k]).reshape(-1, hidden.shape[-1])
                w, sigma = run.layer_inputs(i, w, x_orig)
            else:
                sigma = attention_input_moments(blk, hidden)
            state = convert_block(spec, get, plan, i, w, sigma)
            for name in (n for n in layout if n.startswith(f"layers.{i}.")):
                stream.write(name, state[name.split(".", 2)[2]])
            if run is not None:
                run.advance(i, state)
            del w, sigma, state
        stream.close()
        record = conversion_record(
            spec,
            config,
            plan,
            source=src.name,
            corpus=corpus_name,
            tokens=tokens.numel(),
            sequential_tokens=run.tokens if run is not None else 0,
            seconds=time.time() - t0,
        )
        record["layer_by_layer"] = {"dtype": str(out_dtype).removeprefix("torch."), "device": str(device)}
        save_config(tmp, plan.model, {"conversion": record})
        if src.tokenizer is not None:
            src.tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
        return record

    return write_dir(out.resolve(), write, overwrite=True)
