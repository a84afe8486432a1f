"""Reading DeepSeek-V2/V3 Hugging Face checkpoints into mlakit: the config, the (sharded) safetensors
tensors through :data:`~mlakit.interop.deepseek_map.MAPPING` in reverse, and conversion into an mlakit
checkpoint directory.

Import rejects mixture-of-experts layers, FP8 block-quantised weights and unknown RoPE types.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlakit.config import MLAConfig, ModelConfig, RopeScaling, llama3_rope_scaling
from mlakit.dtypes import FLOAT_DTYPES
from mlakit.errors import MlakitError
from mlakit.interop.deepseek_map import (
    GENERATION_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    MAPPING,
    MODEL_TYPES,
    TOKENIZER_PATTERNS,
    DTypeName,
    _mla,
)
from mlakit.io import read_config_json, read_json, read_json_object, write_dir
from mlakit.model import CONFIG_FILE, FORMAT, Transformer, fill_tied_head
from mlakit.rope import interleaved_to_halves

log = logging.getLogger(__name__)

_REQUIRED = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face checkpoint directory (raises MlakitError with the reason)."""
    return read_config_json(directory, CONFIG_FILE, "a Hugging Face checkpoint (config.json + safetensors)")


def _moe_layer(cfg: dict[str, Any]) -> int | None:
    """Index of the first layer the config makes a mixture of experts, or None (dense model)."""
    n_layers = int(cfg["num_hidden_layers"])
    if not cfg.get("n_routed_experts"):
        return None
    first = max(0, int(cfg.get("first_k_dense_replace") or 0))
    freq = max(1, int(cfg.get("moe_layer_freq") or 1))
    i = -(-first // freq) * freq  # the first multiple of freq at or after first
    return i if i < n_layers else None


def _rope_scaling(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, YaRN or None)`` from ``rope_parameters`` (transformers >= 5) or ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_type", params.get("type")) not in (None, "default"):
        rp: dict[str, Any] = params
    elif isinstance(cfg.get("rope_scaling"), dict):
        rp = cfg["rope_scaling"]
    else:
        rp = params if isinstance(params, dict) else {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type")) if rp else None
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        return float(theta), llama3_rope_scaling(rp, where)
    if kind not in ("yarn", "deepseek_yarn"):
        raise MlakitError(
            f"{where}: RoPE type {kind!r} is not supported (mlakit has default RoPE, DeepSeek YaRN and llama3)"
        )
    try:
        scaling = RopeScaling(
            factor=float(rp["factor"]),
            original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
            beta_fast=float(rp.get("beta_fast") or 32.0),
            beta_slow=float(rp.get("beta_slow") or 1.0),
            mscale=float(1.0 if rp.get("mscale") is None else rp["mscale"]),
            mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
        )
    except KeyError as e:
        raise MlakitError(f"{where}: YaRN RoPE settings lack {e.args[0]!r}") from e
    except ValueError as e:
        raise MlakitError(f"{where}: {e}") from e
    if rp.get("attention_factor") is not None:
        raise MlakitError(f"{where}: YaRN attention_factor is not supported (DeepSeek derives it from mscale)")
    return float(theta), scaling


def _export_meta(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``mlakit_export`` block an mlakit export wrote into ``config.json`` (empty otherwise)."""
    meta = cfg.get("mlakit_export")
    return meta if isinstance(meta, dict) else {}


def model_config_from_hf(cfg: dict[str, Any], where: str = CONFIG_FILE) -> tuple[ModelConfig, bool]:
    """``(ModelConfig, rope_interleave)`` for a dense DeepSeek-V2/V3 ``config.json`` dict.

    Raises: MlakitError for another model type, missing fields, MoE layers, quantised weights or
    unsupported settings, naming the field (and values of the wrong type, naming the file).
    """
    try:
        return _model_config_from_hf(cfg, where)
    except MlakitError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise MlakitError(f"{where}: not a valid DeepSeek-V2/V3 config: {e}") from e


def _model_config_from_hf(cfg: dict[str, Any], where: str) -> tuple[ModelConfig, bool]:
    if cfg.get("model_type") not in MODEL_TYPES:
        raise MlakitError(
            f"{where}: model_type {cfg.get('model_type')!r} is not a DeepSeek-V2/V3 checkpoint "
            f"(expected one of {', '.join(MODEL_TYPES)}); for Llama-family models use `mlakit convert`"
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise MlakitError(f"{where}: missing field(s) {', '.join(missing)}")
    moe = _moe_layer(cfg)
    if moe is not None:
        raise MlakitError(
            f"{where}: layer {moe} is a mixture-of-experts layer (first_k_dense_replace="
            f"{cfg.get('first_k_dense_replace')}, n_routed_experts={cfg.get('n_routed_experts')}); mlakit models "
            "are dense, MoE checkpoints are not supported"
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise MlakitError(f"{where}: quantised weights ({method}) are not supported; dequantise to bf16/fp32 first")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise MlakitError(f"{where}: hidden_act={act!r} is not supported (mlakit's MLP is SwiGLU: silu)")
    if cfg.get("mlp_bias"):
        raise MlakitError(f"{where}: mlp_bias=true is not supported (mlakit's SwiGLU MLP has no biases)")
    theta, scaling = _rope_scaling(cfg, where)
    interleave = True if cfg["model_type"] == "deepseek_v2" else bool(cfg.get("rope_interleave", True))
    exported = _export_meta(cfg)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) > 1:
            log.warning("import-hf: %s lists %d eos tokens; mlakit keeps the first (%s)", where, len(eos), eos[0])
        eos = eos[0] if eos else None
    try:
        att = MLAConfig(
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            q_lora_rank=None if cfg["q_lora_rank"] is None else int(cfg["q_lora_rank"]),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )
        config = ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg["intermediate_size"]),
            attention=att,
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            name=str(exported.get("source_name") or cfg.get("_name_or_path") or cfg["model_type"]),
        )
    except (TypeError, ValueError) as e:
        raise MlakitError(f"{where}: {e}") from e
    return config, interleave


class _Checkpoint:
    """The tensors of a safetensors checkpoint (single file or sharded with an index), opened lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / HF_INDEX
        if index.is_file():
            weight_map = read_json_object(index, what="a safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise MlakitError(f"{index} is not a valid safetensors index: no weight_map of tensor -> file")
            files = sorted(set(weight_map.values()))
        elif (directory / HF_WEIGHTS).is_file():
            files = [HF_WEIGHTS]
        else:
            other = "pytorch_model.bin" if (directory / "pytorch_model.bin").is_file() else None
            hint = " (only safetensors are read; re-save with safe_serialization)" if other else ""
            raise MlakitError(f"{directory} has no {HF_WEIGHTS} or {HF_INDEX}{hint}")
        self.where: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        for f in files:
            path = directory / f
            if not path.is_file():
                raise MlakitError(f"{directory}: shard {f} listed in {HF_INDEX} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises several types for damaged files
                raise MlakitError(f"cannot read {path} (truncated or damaged?): {e}") from e
            self._handles[f] = handle
            for n in names:
                self.where[n] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise MlakitError(f"{self.directory}: tensor {name} is missing")
        f = self.where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise MlakitError(f"cannot read {name} from {self.directory / f} (truncated or damaged?): {e}") from e

    def names(self) -> Iterator[str]:
        return iter(self.where)


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _mlakit_state(ckpt: _Checkpoint, config: ModelConfig, interleave: bool) -> dict[str, torch.Tensor]:
    """mlakit state dict from HF tensors, via :data:`MAPPING` (inverse transforms)."""
    att = _mla(config)
    h, dn, dr, dv, r = att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim, att.kv_lora_rank
    to_halves = interleaved_to_halves(dr) if interleave else torch.arange(dr)
    for name in ckpt.names():
        m = _LAYER_KEY.fullmatch(name)
        if m and (".mlp.experts." in name or name.endswith(".mlp.gate.weight")):
            raise MlakitError(
                f"layer {m.group(1)} is a mixture-of-experts layer ({name}); MoE checkpoints are not supported"
            )
        if name.endswith("weight_scale_inv") or name.endswith("weight_scale"):
            raise MlakitError(f"{name}: FP8 block-quantised weights are not supported; dequantise to bf16/fp32 first")

    def query_rows(w: torch.Tensor) -> torch.Tensor:
        w = w.view(h, dn + dr, -1)  # [H, d_n + d_r, in]
        return torch.cat((w[:, :dn], w[:, dn:][:, to_halves]), dim=1).reshape(h * (dn + dr), -1)

    state: dict[str, torch.Tensor] = {}
    for mp in MAPPING:
        if mp.per_layer:
            names = [(f"model.layers.{i}.{mp.hf}", f"layers.{i}.") for i in range(config.num_layers)]
        else:
            names = [(mp.hf, "")]
        for hf_name, p in names:
            if hf_name not in ckpt:
                continue  # absent tensors are checked against the model's own keys below
            t = ckpt.get(hf_name)
            if mp.how == "copy":
                state[p + mp.mlakit[0]] = t
            elif mp.how == "query_rope_rows":
                if t.shape[0] != h * (dn + dr):
                    raise MlakitError(f"{hf_name} has shape {tuple(t.shape)}: expected {h * (dn + dr)} rows")
                state[p + mp.mlakit[0]] = query_rows(t)
            elif mp.how == "latent_and_rope_key":
                if t.shape[0] != r + dr:
                    raise MlakitError(
                        f"{hf_name} has shape {tuple(t.shape)}: expected {r + dr} rows (kv_lora_rank+qk_rope_head_dim)"
                    )
                state[p + mp.mlakit[0]] = t[:r]
                state[p + mp.mlakit[1]] = t[r:][to_halves]
            elif mp.how == "kv_norm":
                state[p + mp.mlakit[0]] = t
            elif mp.how == "per_head_kv":
                if tuple(t.shape) != (h * (dn + dv), r):
                    raise MlakitError(f"{hf_name} has shape {tuple(t.shape)}: expected {(h * (dn + dv), r)}")
                kv = t.view(h, dn + dv, r)  # [H, d_n + d_v, r]
                state[p + mp.mlakit[0]] = kv[:, :dn].reshape(h * dn, r)
                state[p + mp.mlakit[1]] = kv[:, dn:].reshape(h * dv, r)
    return {k: v.contiguous() for k, v in state.items()}


def load_hf(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a dense DeepSeek-V2/V3 Hugging Face checkpoint directory as an mlakit :class:`Transformer`.

    RoPE rows are brought from interleaved (``rope_interleave: true``, and always for DeepSeek-V2)
    into mlakit's halves order; ``kv_b_proj`` is split per head into ``w_uk``/``w_uv``. Biases the
    format lacks (``q_proj``) are zero when ``attention_bias`` is set.

    Raises: MlakitError for a wrong model type, missing config fields, MoE layers, quantised
    weights, missing/truncated safetensors, or tensors whose shapes do not match the config.
    """
    d = Path(directory)
    cfg = read_hf_config(d)
    config, interleave = model_config_from_hf(cfg, str(d / CONFIG_FILE))
    ckpt = _Checkpoint(d)
    state = _mlakit_state(ckpt, config, interleave)
    exported = _export_meta(cfg)
    if exported.get("source_tie_word_embeddings") and not config.tie_word_embeddings:
        head, embed = state.get("lm_head.weight"), state.get("embed.weight")
        if head is not None and embed is not None and torch.equal(head, embed):
            config = dataclasses.replace(config, tie_word_embeddings=True)  # mlakit wrote it untied
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    state = fill_tied_head(config, state)
    for name, p in expected.items():
        if name not in state and name.endswith("attn.w_q.bias") and "embed.weight" in state:
            state[name] = torch.zeros(p.shape, dtype=state["embed.weight"].dtype)  # q_proj has no bias in the format
    missing = [k for k in expected if k not in state]
    if missing:
        raise MlakitError(f"{d}: tensors missing for {len(missing)} mlakit weights, e.g. {missing[0]}")
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise MlakitError(f"{d}: {name} has shape {tuple(state[name].shape)}, the config implies {tuple(p.shape)}")
    extra_layers = {int(m.group(1)) for n in ckpt.names() if (m := _LAYER_KEY.fullmatch(n))} - set(
        range(config.num_layers)
    )
    if extra_layers:
        log.warning("import-hf: ignoring layers %s (multi-token-prediction modules)", sorted(extra_layers))
    state = {k: v.to(device) for k, v in state.items()}
    return Transformer.from_state_dict(config, state, source=str(d), dtype=dtype, device=device)


def is_hf_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a Hugging Face (not mlakit) ``config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    cfg = read_json(path)  # a malformed config.json is an error naming it, not "some other format"
    return isinstance(cfg, dict) and cfg.get("format") != FORMAT and "model_type" in cfg


def load_pretrained(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """``Transformer.from_pretrained`` that also reads DeepSeek-V2/V3 Hugging Face directories."""
    if is_hf_checkpoint(directory):
        return load_hf(directory, dtype, device)
    return Transformer.from_pretrained(directory, dtype, device)


def import_hf(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: DTypeName | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a DeepSeek-V2/V3 Hugging Face checkpoint into an mlakit checkpoint directory ``out``.

    Tokenizer files travel along. Written as a temporary sibling and renamed at the end.
    Raises: MlakitError as :func:`load_hf`, or when ``out`` exists without ``overwrite``.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise MlakitError(f"dtype={dtype!r} is invalid: choose one of {', '.join(FLOAT_DTYPES)}")
    model = load_hf(source, FLOAT_DTYPES[dtype] if dtype else None)
    meta = {"imported_from": {"format": "deepseek-hf", "path": str(Path(source).resolve())}}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, metadata=meta)
        for pattern in (*TOKENIZER_PATTERNS, GENERATION_CONFIG):
            for f in sorted(Path(source).glob(pattern)):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)

    write_dir(Path(out), write, overwrite=overwrite)
    return Path(out)
