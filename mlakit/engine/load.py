"""Loading a model and its tokenizer for inference: mlakit checkpoints, or Hugging Face source models.

``--model`` may be an mlakit checkpoint directory (``config.json`` + ``model.safetensors``, with
tokenizer files saved by Hugging Face tokenizers beside them), or anything
:func:`mlakit.convert.load.resolve_model_path` accepts (an HF directory, a ``.gguf`` file, the
``smollm2-135m`` alias), which is mapped onto an mlakit MHA/GQA :class:`~mlakit.model.Transformer`
with the original weights (no conversion to MLA) by :mod:`mlakit.convert.arch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mlakit.errors import MlakitError
from mlakit.io import read_config_json
from mlakit.model import CONFIG_FILE, Transformer, check_layer_count, is_mlakit_checkpoint
from mlakit.quant import prepare_weights
from mlakit.text.tokenizer import HFTokenizer, saved_tokenizer

logger = logging.getLogger(__name__)


def source_to_transformer(
    directory: str | Path, dtype: torch.dtype | None = None, max_seq_len: int | None = None
) -> Transformer:
    """Build an mlakit MHA/GQA Transformer holding a Hugging Face checkpoint's weights (unchanged).

    Any architecture :mod:`mlakit.convert.arch` supports (Llama, Mistral, Qwen2/3, Gemma 2/3):
    the source runs as itself, the baseline a conversion is measured against. ``max_seq_len``
    overrides ``max_position_embeddings`` (the size of the RoPE tables).

    Raises: MlakitError for missing files, an unsupported architecture, or weights that do not
    match the config.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mlakit.convert.arch import baseline_state, source_spec

    d = Path(directory)
    read_config_json(d, CONFIG_FILE, "a Hugging Face checkpoint")  # a malformed file: one error naming it
    try:
        hf_config = AutoConfig.from_pretrained(d)
        spec = source_spec(hf_config, str(d))
        config = spec.baseline_config(max_seq_len)
    except MlakitError:
        raise
    except Exception as e:  # transformers' config classes raise many types for damaged values
        raise MlakitError(f"{d / CONFIG_FILE}: not a valid model config ({type(e).__name__}): {e}") from e
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MlakitError(f"{d} has no *.safetensors weights")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf_state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for damaged files
            raise MlakitError(f"cannot read {f}: {e}") from e
    check_layer_count(config, (n.removeprefix("model.") for n in hf_state), str(d))
    state = baseline_state(spec, hf_state.get)
    return Transformer.from_state_dict(config, state, source=f"{d} (as a {spec.model_type} model)", dtype=dtype)


@dataclass
class LoadedForInference:
    model: Transformer
    tokenizer: HFTokenizer | None
    path: Path
    weights: str = "fp32"  # the weight format the model runs in (see mlakit.quant)


def load_model(spec: str, weights: str = "fp32", device: str | torch.device = "cpu") -> LoadedForInference:
    """Load ``spec`` (an mlakit checkpoint dir, or an HF dir / .gguf / alias) and its tokenizer.

    ``weights`` is the weight format for inference (``auto``, ``fp32``, ``bf16``, ``int8``; see
    :mod:`mlakit.quant`); the model is loaded as stored and then converted.

    Raises: MlakitError naming what is missing when ``spec`` is not a loadable checkpoint.
    """
    loaded = _load(spec)
    loaded.weights = prepare_weights(loaded.model.to(device), weights, device)
    return loaded


def resolve_for_inference(spec: str) -> Path:
    """The local directory ``spec`` names: an mlakit checkpoint, or an HF source directory (a ``.gguf``
    or an alias is dequantized once and cached by :func:`mlakit.convert.load.resolve_model_path`).

    Raises: MlakitError when ``spec`` is not a loadable local checkpoint.
    """
    p = Path(spec).expanduser()
    if p.is_dir() and is_mlakit_checkpoint(p):
        return p
    if p.is_dir() and not (p / CONFIG_FILE).is_file() and not list(p.glob("*.gguf")):
        raise MlakitError(f"{spec} is not a checkpoint: no {CONFIG_FILE} (expected config.json + model.safetensors)")
    from mlakit.convert.load import resolve_model_path

    path = resolve_model_path(spec)
    if isinstance(path, str) or not Path(path).is_dir():
        raise MlakitError(f"{spec}: not a local checkpoint (downloads are not supported here)")
    return Path(path)


def load_tokenizer(spec: str) -> HFTokenizer | None:
    """The tokenizer saved with ``spec`` (no weights loaded): for a process that only encodes and decodes."""
    return saved_tokenizer(resolve_for_inference(spec))


def _load(spec: str) -> LoadedForInference:
    path = resolve_for_inference(spec)
    if is_mlakit_checkpoint(path):
        return LoadedForInference(Transformer.from_pretrained(path), saved_tokenizer(path), path)
    return LoadedForInference(source_to_transformer(path), saved_tokenizer(path), path)
