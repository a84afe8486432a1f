"""Loading a model and its tokenizer for inference: mlakit checkpoints, or Llama-family HF models.

``--model`` may be an mlakit checkpoint directory (``config.json`` + ``model.safetensors``, with
tokenizer files saved by Hugging Face tokenizers beside them), or anything
:func:`mlakit.convert.load.resolve_model_path` accepts (an HF directory, a ``.gguf`` file, the
``smollm2-135m`` alias), which is mapped onto an mlakit MHA/GQA :class:`~mlakit.model.Transformer`
with the original weights (no conversion to MLA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.config import AttentionConfig, ModelConfig
from mlakit.errors import MlakitError
from mlakit.io import read_config_json
from mlakit.model import CONFIG_FILE, Transformer, check_layer_count, is_mlakit_checkpoint
from mlakit.quant import prepare_weights
from mlakit.text.tokenizer import HFTokenizer, saved_tokenizer

logger = logging.getLogger(__name__)

# Hugging Face Llama parameter names -> mlakit names ({i}: layer index)
LLAMA_TO_MLAKIT: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.w_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.w_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.w_v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.w_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.w_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.w_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.w_o.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w_down.weight",
}


def llama_config(hf: dict[str, Any], max_seq_len: int | None = None, source: str = "config.json") -> ModelConfig:
    """An mlakit MHA/GQA config equal to a Hugging Face Llama-family ``config.json``.

    ``max_seq_len`` overrides ``max_position_embeddings`` (the size of the RoPE tables).

    Raises: MlakitError naming ``source`` for a missing key or a value of the wrong type or range.
    """
    try:
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise MlakitError("only plain RoPE Llama models can be loaded for inference (no rope scaling)")
        att = AttentionConfig(
            hidden_size=hf["hidden_size"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(hf.get("attention_bias", False)) or hf.get("model_type") == "qwen2",
        )
        eos = hf.get("eos_token_id")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            intermediate_size=hf["intermediate_size"],
            attention=att,
            max_seq_len=max_seq_len or hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            name=hf.get("_name_or_path", "") or hf.get("model_type", ""),
        )
    except MlakitError as e:  # a config field out of range: the message names the field
        raise MlakitError(f"{source}: {e}") from e
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise MlakitError(f"{source}: not a valid Llama-family config: {what}") from e


def llama_to_transformer(
    directory: str | Path, dtype: torch.dtype | None = None, max_seq_len: int | None = None
) -> Transformer:
    """Build an mlakit GQA Transformer holding a Hugging Face Llama checkpoint's weights (unchanged).

    Raises: MlakitError for missing files or weights that do not match the config.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    config = llama_config(
        read_config_json(d, CONFIG_FILE, "a Hugging Face checkpoint"), max_seq_len, str(d / CONFIG_FILE)
    )
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
    state = {}
    for i in range(config.num_layers):
        for src, dst in LLAMA_TO_MLAKIT.items():
            if "{i}" in src and src.format(i=i) in hf_state:
                state[dst.format(i=i)] = hf_state[src.format(i=i)]
    for src, dst in LLAMA_TO_MLAKIT.items():
        if "{i}" not in src and src in hf_state:
            state[dst] = hf_state[src]
    if "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]  # Llama checkpoints that tie omit the head
    return Transformer.from_state_dict(config, state, source=f"{d} (as a Llama model)", dtype=dtype)


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
    if p.is_dir() and is_mlakit_checkpoint(p):
        return LoadedForInference(Transformer.from_pretrained(p), saved_tokenizer(p), p)
    if p.is_dir() and not (p / CONFIG_FILE).is_file() and not list(p.glob("*.gguf")):
        raise MlakitError(f"{spec} is not a checkpoint: no {CONFIG_FILE} (expected config.json + model.safetensors)")
    from mlakit.convert.load import resolve_model_path

    path = resolve_model_path(spec)
    if isinstance(path, str) or not Path(path).is_dir():
        raise MlakitError(f"{spec}: not a local checkpoint (downloads are not supported here)")
    path = Path(path)
    model = llama_to_transformer(path)
    return LoadedForInference(model, saved_tokenizer(path), path)
