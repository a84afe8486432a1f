"""Loading a model and its tokenizer for inference: mlakit checkpoints, or Hugging Face source models.

``--model`` may be an mlakit checkpoint directory (``config.json`` + ``model.safetensors``, with
tokenizer files saved by Hugging Face tokenizers beside them), or anything
:func:`mlakit.convert.load.resolve_model_path` accepts (an HF directory, a ``.gguf`` file, the
``smollm2-135m`` alias), which is mapped onto an mlakit MHA/GQA :class:`~mlakit.model.Transformer`
with the original weights (no conversion to MLA) by :mod:`mlakit.convert.arch`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.model import CONFIG_FILE, FORMAT, Transformer
from mlakit.quant import prepare_weights

logger = logging.getLogger(__name__)


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer: ``encode``/``decode`` and the chat template."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tok, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_chat(self, text: str) -> list[int]:
        """``text`` as one user message, with the generation prompt appended."""
        return self.encode_messages([{"role": "user", "content": text}])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (``[{"role": ..., "content": ...}]``) through the chat template, ready for the reply."""
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(directory: str | Path) -> HFTokenizer | None:
    """The tokenizer saved in ``directory`` (``tokenizer.json`` ...), or ``None`` when there is none."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        logger.warning("transformers is not installed: no tokenizer")
        return None
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(d)))
    except (OSError, ValueError, TypeError) as e:
        logger.warning("%s: cannot load the tokenizer (%s)", d, e)
        return None


def _is_mlakit_dir(d: Path) -> bool:
    try:
        header = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


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
    try:
        hf_config = AutoConfig.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise MlakitError(f"{d}: cannot read the model config: {e}") from e
    spec = source_spec(hf_config, str(d))
    config = spec.baseline_config(max_seq_len)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MlakitError(f"{d} has no *.safetensors weights")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state.update(load_file(str(f)))
    state = baseline_state(spec, hf_state.get)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MlakitError(f"{d}: weights do not match a {spec.model_type} model of its config: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_rope_tables("cpu")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


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


def _load(spec: str) -> LoadedForInference:
    p = Path(spec).expanduser()
    if p.is_dir() and _is_mlakit_dir(p):
        return LoadedForInference(Transformer.from_pretrained(p), load_tokenizer(p), p)
    if p.is_dir() and not (p / CONFIG_FILE).is_file() and not list(p.glob("*.gguf")):
        raise MlakitError(f"{spec} is not a checkpoint: no {CONFIG_FILE} (expected config.json + model.safetensors)")
    from mlakit.convert.load import resolve_model_path

    path = resolve_model_path(spec)
    if isinstance(path, str) or not Path(path).is_dir():
        raise MlakitError(f"{spec}: not a local checkpoint (downloads are not supported here)")
    path = Path(path)
    model = source_to_transformer(path)
    return LoadedForInference(model, load_tokenizer(path), path)
