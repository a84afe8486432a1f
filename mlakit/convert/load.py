"""Load a supported Hugging Face causal LM (local dir, GGUF file, alias or hub id) for conversion.

GGUF files are dequantized by ``transformers`` (slow: ~30 s for 135M parameters), so the float
result is cached once under ``$MLAKIT_CACHE`` (default ``~/.cache/mlakit``) as an ordinary
Hugging Face directory (safetensors + config + tokenizer) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.convert.arch import SUPPORTED_MODEL_TYPES, source_spec
from mlakit.errors import MlakitError
from mlakit.io import cache_dir, read_json_object, write_dir
from mlakit.packaged import ALIASES, packaged_file

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "LoadedModel", "load_hf_model", "resolve_model_path", "source_directory"]


@dataclass(frozen=True)
class LoadedModel:
    """A Hugging Face causal LM ready for conversion.

    Attributes:
        model: ``transformers`` ``*ForCausalLM`` in float32, eval mode.
        tokenizer: its tokenizer (``None`` when the source has none).
        source: what the user passed (``--model``).
        path: local directory holding ``config.json`` + weights (the GGUF cache for GGUF inputs).
    """

    model: Any
    tokenizer: Any
    source: str
    path: Path


def _check_config(config: Any, source: str) -> None:
    try:
        source_spec(config, source)  # raises for an unsupported architecture or feature
    except MlakitError:
        raise
    except Exception as e:  # a damaged value of a type the spec's arithmetic does not expect
        raise MlakitError(f"{source}: not a valid model config ({type(e).__name__}): {e}") from e


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _save_plain(model: Any, out: Path) -> None:
    """Save a GGUF-loaded (already dequantized) model as a plain float HF checkpoint.

    ``save_pretrained`` refuses models that still carry the GGUF quantizer, so rebuild a clean
    model from the config (without ``quantization_config``) and copy the weights in.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out)


def _implied_weights(config: Any) -> int:
    """A lower bound on the weights of any Llama-family model with ``config``: embedding, w_q, w_o, SwiGLU."""
    try:
        h, f = int(config.hidden_size), int(config.intermediate_size)
        return int(config.vocab_size) * h + int(config.num_hidden_layers) * (2 * h * h + 3 * h * f)
    except (AttributeError, TypeError, ValueError) as e:
        raise MlakitError(f"{config.name_or_path}: config lacks a model dimension: {e}") from e


def _check_weight_bytes(config: Any, directory: Path) -> None:
    """Refuse a config whose dimensions need far more bytes than the directory's weight files hold.

    ``transformers`` allocates and initialises the model its config describes before it reads the
    weights: a damaged dimension would cost minutes or the machine's memory before the mismatch.
    """
    stored = sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    implied = _implied_weights(config)
    if implied // 2 > stored + 10**6:  # half a byte per weight: even 4-bit files hold more
        raise MlakitError(
            f"{directory}: its config.json describes at least {implied:,} weights, more than its weight files "
            f"({stored:,} bytes) can hold: a damaged config or missing weights"
        )


def _check_gguf_tensors(config: Any, gguf: Path) -> None:
    """Refuse a header that disagrees with the tensors the file holds: layer count, size.

    A damaged (bit-flipped) dimension would otherwise make ``transformers`` build and initialise a
    model of that shape before it notices: seconds per missing layer, or the machine's memory for
    a dimension grown by a power of two.
    """
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(gguf)).tensors
    except Exception as e:  # gguf raises many types for damaged files
        raise MlakitError(f"{gguf}: cannot read as a GGUF model: {e}") from e
    stored = sum(int(t.n_elements) for t in tensors)
    layers = {int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if len(layers) != config.num_hidden_layers:
        raise MlakitError(
            f"{gguf}: its header says {config.num_hidden_layers} layers, its tensors hold {len(layers)}: "
            "damaged, or not a supported GGUF"
        )
    implied = _implied_weights(config)
    if implied > 2 * stored + 10**6:
        raise MlakitError(
            f"{gguf}: its header describes a model of at least {implied:,} weights but the file holds {stored:,}: "
            "damaged, or not a supported GGUF"
        )


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file once into an HF directory under the cache; return that directory."""
    out = _gguf_cache_path(gguf)
    if (out / "config.json").is_file():
        logger.info("using cached dequantized %s at %s", gguf.name, out)
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise MlakitError(f"{gguf}: cannot read as a GGUF model: {e}") from e
    _check_config(config, str(gguf))
    _check_gguf_tensors(config, gguf)
    logger.info("dequantizing %s (once; cached at %s)", gguf.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise MlakitError(f"{gguf}: cannot load as a causal LM: {e}") from e

    def write(tmp: Path) -> None:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)

    write_dir(out, write, overwrite=True)  # another process may have filled the cache meanwhile: same bytes
    return out


def resolve_model_path(model: str) -> Path | str:
    """Map ``--model`` to a local HF directory (GGUF and aliases go through the cache) or a hub id.

    Raises:
        MlakitError: a path that looks local but does not exist, or an unreadable GGUF.
    """
    if model in ALIASES:
        return _gguf_to_hf_dir(packaged_file(model))
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise MlakitError(f"{model}: a model file must be .gguf (or pass a Hugging Face directory)")
        return _gguf_to_hf_dir(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return _gguf_to_hf_dir(ggufs[0])
            raise MlakitError(f"{model}: no config.json in this directory (not a Hugging Face model)")
        return p
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") != 1
    if looks_local:
        raise MlakitError(
            f"{model}: no such file or directory (and not a hub id 'org/name' or an alias: {', '.join(ALIASES)})"
        )
    return model  # hub id: transformers downloads it


def source_directory(model: str) -> Path:
    """``--model`` as a local Hugging Face directory: itself, the GGUF cache, or a hub download.

    A hub id (``org/name``) is fetched with ``huggingface_hub`` (config, tokenizer and safetensors
    files only) into its usual cache; nothing else in mlakit downloads.

    Raises:
        MlakitError: what :func:`resolve_model_path` raises, or a failed download.
    """
    path = resolve_model_path(model)
    if isinstance(path, Path):
        return path
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (config, tokenizer, safetensors) from the Hugging Face hub", path)
    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # network, authentication (gated models), a wrong id
        raise MlakitError(f"{model}: cannot download from the Hugging Face hub: {e}") from e


def load_hf_model(model: str, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a supported Hugging Face causal LM and its tokenizer.

    Args:
        model: local HF directory, ``.gguf`` file, alias (``smollm2-135m``) or hub id.
        dtype: weight dtype (conversion math runs in float32/float64 regardless).

    Raises:
        MlakitError: missing files, unsupported architecture, not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    if isinstance(path, Path):
        read_json_object(path / "config.json", what="a Hugging Face model config")  # names a malformed file
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise MlakitError(f"{model}: cannot read model config: {e}") from e
    _check_config(config, model)
    if isinstance(path, Path):
        _check_weight_bytes(config, path)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        hf: Any = loaded[0]
        info: dict[str, Any] = loaded[1]
    except Exception as e:  # transformers raises many types for missing or mismatched weights
        raise MlakitError(f"{model}: cannot load weights: {e}") from e
    # transformers only warns about these and initialises the gaps at random: refuse instead
    gaps = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(gaps.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}" for k, v in gaps.items() if v)
        raise MlakitError(f"{model}: its weights do not match its config ({detail})")
    hf.eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:  # a directory without tokenizer files
        logger.warning("%s: no tokenizer (%s)", model, e)
        tok = None
    return LoadedModel(model=hf, tokenizer=tok, source=model, path=Path(path))
