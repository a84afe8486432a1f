"""Writing a DeepSeek-V3 Hugging Face checkpoint from an mlakit MLA model: ``config.json``, the
tensors of :data:`~mlakit.interop.deepseek_map.MAPPING` in safetensors shards, tokenizer files and a
model card, following the plan of :mod:`mlakit.interop.deepseek_plan`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlakit import dtypes
from mlakit.config import ModelConfig
from mlakit.dtypes import FLOAT_DTYPES
from mlakit.errors import MlakitError
from mlakit.interop.card import README, export_readme
from mlakit.interop.deepseek_map import (
    GENERATION_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    MAPPING,
    TOKENIZER_PATTERNS,
    DTypeName,
    Mapping,
    _mla,
    _rope_to_interleaved,
)
from mlakit.interop.deepseek_plan import (
    LINEAR_LATENT_TARGET,
    ExportPlan,
    LayerLatent,
    _check_latent_dtype,
    _query_bias_through_latent,
    measure_latent_error,
    plan_export,
)
from mlakit.interop.engines import check_targets, fits
from mlakit.interop.pad import CacheCost, cache_bytes
from mlakit.io import move_file, read_config_json, write_dir
from mlakit.model import CONFIG_FILE, FORMAT, Transformer

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # the Hugging Face default shard size


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_hf` wrote (``total_bytes``: size of the safetensors files)."""

    directory: Path
    files: tuple[str, ...]
    total_bytes: int
    kv_lora_rank: int
    notes: tuple[str, ...] = ()
    measured_rel_error: float = 0.0
    error_bound: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    engines: tuple[tuple[str, str | None], ...] = ()  # (engine name, why it cannot load it or None)
    cache: CacheCost | None = None


def hf_config(plan: ExportPlan, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSeek-V3 ``config.json`` for ``plan`` (dense MLP in every layer, no MTP layers)."""
    config = plan.config
    att = _mla(config)
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": att.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_heads,
        "q_lora_rank": att.q_lora_rank,
        "kv_lora_rank": plan.kv_lora_rank,
        "qk_nope_head_dim": att.qk_nope_head_dim,
        "qk_rope_head_dim": plan.padding.qk_rope_head_dim,
        "v_head_dim": att.v_head_dim,
        "head_dim": plan.padding.qk_rope_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": plan.rms_norm_eps,
        "attention_bias": plan.attention_bias,
        "attention_dropout": 0.0,
        "rope_theta": plan.padding.rope_theta,
        "rope_scaling": None,
        "rope_interleave": True,
        # dense everywhere: every layer index is below first_k_dense_replace, so no reader
        # (transformers, vLLM, SGLang, DeepSeek's reference) builds an MoE layer; the expert
        # fields are minimal valid values that nothing reads
        "first_k_dense_replace": config.num_layers,
        "moe_layer_freq": 1,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": config.intermediate_size,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0,
        # written untied (lm_head stored) because not every serving stack ties DeepSeek heads
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtypes.hf_name(dtype),
        "dtype": dtypes.hf_name(dtype),
    }
    rs = att.rope_scaling
    if rs is not None and rs.type == "llama3":
        llama3 = {
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
        d["rope_scaling"] = {"rope_type": "llama3", "type": "llama3", **llama3}
        d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": att.rope_theta, **llama3}
    elif rs is not None:
        yarn = {
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "mscale": rs.mscale,
            "mscale_all_dim": rs.mscale_all_dim,
        }
        d["rope_scaling"] = {"type": "yarn", **yarn}  # transformers 4.x, vLLM, SGLang, DeepSeek
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": plan.padding.rope_theta, **yarn}  # transformers >= 5
    else:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": plan.padding.rope_theta}
    return d


Entry = tuple[str, Callable[[], torch.Tensor]]


class _Exporter:
    """Builds each Hugging Face tensor of :data:`MAPPING` from mlakit's state dict, lazily."""

    def __init__(self, model: Transformer, plan: ExportPlan, dtype: torch.dtype) -> None:
        att = _mla(plan.config)
        self.plan, self.dtype = plan, dtype
        self.h, self.dn, self.dr, self.dv = att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
        self.pad = plan.padding
        self.to_il = _rope_to_interleaved(self.pad.qk_rope_head_dim)
        self.state = model.state_dict()

    def entries(self) -> list[Entry]:
        """``(hf_name, make)`` for every tensor the export writes, embeddings first, then layer by layer."""
        first = [m for m in MAPPING if not m.per_layer and "embed" in m.hf]
        last = [m for m in MAPPING if not m.per_layer and "embed" not in m.hf]
        out: list[Entry] = [(mp.hf, partial(self.build, mp, "")) for mp in first]
        for i in range(self.plan.config.num_layers):
            for mp in MAPPING:
                if mp.per_layer and self.applies(mp, f"layers.{i}."):
                    out.append((f"model.layers.{i}.{mp.hf}", partial(self.build, mp, f"layers.{i}.", i)))
        return out + [(mp.hf, partial(self.build, mp, "")) for mp in last]

    def applies(self, mp: Mapping, prefix: str) -> bool:
        if mp.how == "kv_norm":
            return True  # written even for kv_norm=False models (the format always normalises)
        if mp.hf.endswith(".bias"):
            weight_source = prefix + mp.mlakit[0].removesuffix(".bias") + ".weight"
            return self.plan.attention_bias and weight_source in self.state
        return prefix + mp.mlakit[0] in self.state

    def build(self, mp: Mapping, prefix: str, layer: int = -1) -> torch.Tensor:
        src = [self.state.get(prefix + n) for n in mp.mlakit]
        if mp.how == "copy":
            t = src[0]
            if t is None:  # a bias the format has and mlakit lacks
                t = torch.zeros(self._bias_width(mp, prefix))
        elif mp.how == "query_rope_rows":
            assert src[0] is not None
            t = self._query_rows(src[0])
        elif mp.how == "latent_and_rope_key":
            t = self._latent_and_rope_key(mp, prefix, self.plan.layers[layer])
        elif mp.how == "kv_norm":
            t = self.plan.layers[layer].norm
        else:
            t = self._per_head_kv(prefix, self.plan.layers[layer])
        return t.detach().to(self.dtype).contiguous()

    def _bias_width(self, mp: Mapping, prefix: str) -> int:
        return self.state[prefix + mp.mlakit[0].removesuffix(".bias") + ".weight"].shape[0]

    def _query_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Each head's ``[nope ; rope]`` rows, rope rows padded (zero pairs) and interleaved, all rows
        times ``query_scale`` (the wider head's softmax scale)."""
        h, dn, dr, width = self.h, self.dn, self.dr, self.pad.qk_rope_head_dim
        w = w.view(h, dn + dr, -1)  # [H, d_n + d_r, in]
        rope = self.pad.pad_rope_rows(w[:, dn:].transpose(0, 1)).transpose(0, 1)  # [H, d_r', in]
        out = torch.cat((w[:, :dn], rope[:, self.to_il]), dim=1).reshape(h * (dn + width), -1)
        return out if self.pad.query_scale == 1 else out.double() * self.pad.query_scale

    def _latent_and_rope_key(self, mp: Mapping, prefix: str, lay: LayerLatent) -> torch.Tensor:
        """Rows ``[row_scale * w_dkv ; 0 (padding) ; w_kr interleaved]`` (weight or bias)."""
        big_r, r = self.plan.kv_lora_rank, lay.rank
        dkv, kr = (self.state.get(prefix + n) for n in mp.mlakit)
        is_bias = mp.hf.endswith(".bias")
        ref = self.state[prefix + "attn.w_dkv.weight"]
        exact = lay.row_scale == 1
        width = self.pad.qk_rope_head_dim
        out = torch.zeros(
            (big_r + width, *(() if is_bias else ref.shape[1:])), dtype=ref.dtype if exact else torch.float64
        )
        if dkv is not None:
            out[:r] = dkv if exact else dkv.double() * lay.row_scale
        if kr is not None:
            out[big_r:] = self.pad.pad_rope_rows(kr)[self.to_il]
        return out

    def _per_head_kv(self, prefix: str, lay: LayerLatent) -> torch.Tensor:
        """Rows ``[w_uk_h ; w_uv_h]`` per head, columns padded to ``kv_lora_rank`` (times ``up_scale``)."""
        h, dn, dv, r = self.h, self.dn, self.dv, lay.rank
        uk = self.state[prefix + "attn.w_uk.weight"].view(h, dn, r)  # [H, d_n, r]
        uv = self.state[prefix + "attn.w_uv.weight"].view(h, dv, r)  # [H, d_v, r]
        kv = torch.cat((uk, uv), dim=1)  # [H, d_n + d_v, r]
        if lay.up_scale != 1:
            kv = kv.double() * lay.up_scale
        out = torch.zeros(h, dn + dv, self.plan.kv_lora_rank, dtype=kv.dtype)
        out[..., :r] = kv
        return out.reshape(h * (dn + dv), -1)  # [H*(d_n+d_v), R]


def _write_shards(entries: list[Entry], directory: Path, max_shard_size: int, progress: bool | None) -> dict[str, str]:
    """Write tensors into shards of at most ``max_shard_size`` bytes; returns ``{tensor: file}``.

    One shard is ``model.safetensors``; more are ``model-0000k-of-0000N.safetensors`` (N is known
    only at the end, so shards are written under provisional names and renamed).
    """
    from tqdm.auto import tqdm

    groups: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_file(pending, str(directory / f"shard-{len(groups)}.partial"), metadata={"format": "pt"})
            groups.append(list(pending))
            pending, size = {}, 0
            storages.clear()

    disable = None if progress is None else not progress
    for name, make in tqdm(entries, unit="tensor", desc=f"writing {directory.name}", disable=disable):
        t = make()
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_size:
            flush()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # tied embed/lm_head: safetensors refuses tensors sharing memory in one file
        storages.add(t.untyped_storage().data_ptr())
        pending[name] = t
        size += nbytes
    flush()
    n = len(groups)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups):
        fname = HF_WEIGHTS if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        move_file(directory / f"shard-{k}.partial", directory / fname)
        weight_map.update(dict.fromkeys(names, fname))
    return weight_map


def export_hf(
    source: Transformer | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: DTypeName | None = None,
    allow_bias: bool = False,
    pad_to: int | None = None,
    targets: tuple[str, ...] = (),
    tokenizer_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ExportReport:
    """Write a DeepSeek-V3 Hugging Face checkpoint of an mlakit MLA model into ``out``.

    Args:
        source: a :class:`Transformer` or an mlakit checkpoint directory (its tokenizer files are
            copied too unless ``tokenizer_dir`` says otherwise).
        out: the directory to create; it is written as a temporary sibling and renamed at the end,
            so an interrupted export leaves nothing that loads.
        max_shard_size: bytes per ``.safetensors`` shard; more than one shard adds
            ``model.safetensors.index.json``.
        dtype: ``fp32``/``bf16``/``fp16``; default the model's parameter dtype.
        allow_bias: permit ``attention_bias: true``, needed when an attention bias is non-zero
            (e.g. a model converted from Qwen2); transformers honours it, vLLM/SGLang do not.
        pad_to: widen the cached ``kv_lora_rank + qk_rope_head_dim`` to this many values exactly
            (576 = 512 + 64 for FlashMLA and vLLM's CPU backend; see :mod:`mlakit.interop.pad`).
        targets: engines the export must load in (:data:`mlakit.interop.engines.TARGETS`, e.g.
            ``("vllm",)``); checked before anything is written.
        tokenizer_dir: where to copy tokenizer files from.
        overwrite: replace an existing ``out``.
        progress: tqdm bar over the tensors as shards are written (``None``: only on a terminal).

    Returns: an :class:`ExportReport` (with which engines load it and what the cache costs).
    Raises: MlakitError for models the format cannot express (baseline attention, full-RoPE MLA,
        non-zero biases without ``allow_bias``), a ``dtype`` that cannot hold a linear latent's
        scaled rows (fp16), a ``pad_to`` below the model's cached width, a target the shapes
        cannot meet, an existing ``out`` without ``overwrite``, or a bad source.
    """
    source_values = None  # the source's cached values per token, when a conversion record says
    if isinstance(source, Transformer):
        model = source
    else:
        model = Transformer.from_pretrained(source)
        tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else source
        record = read_config_json(source, CONFIG_FILE, "an mlakit checkpoint").get("conversion")
        if isinstance(record, dict):
            source_values = record.get("source_cache_elements_per_token")
    if max_shard_size <= 0:
        raise MlakitError(f"max_shard_size={max_shard_size} must be a positive byte count")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise MlakitError(f"dtype={dtype!r} is invalid: choose one of {', '.join(FLOAT_DTYPES)}")
    q_note = None
    if allow_bias:
        model, q_note = _query_bias_through_latent(model)
    plan = plan_export(model, allow_bias=allow_bias, pad_to=pad_to)
    if q_note is not None:
        plan = dataclasses.replace(plan, notes=(*plan.notes, q_note))
    torch_dtype = FLOAT_DTYPES[dtype] if dtype is not None else model.embed.weight.dtype
    if torch_dtype not in FLOAT_DTYPES.values():
        raise MlakitError(f"model dtype {torch_dtype} cannot be exported: pass dtype='fp32', 'bf16' or 'fp16'")
    shape = plan.cache_shape(next(k for k, v in FLOAT_DTYPES.items() if v == torch_dtype))
    check_targets(shape, targets)
    _check_latent_dtype(model, plan, torch_dtype)
    for note in plan.notes:
        log.warning("export-hf: %s", note)
    measured = measure_latent_error(model, plan)
    att = _mla(model.config)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "source_kv_lora_ranks": [lay.rank for lay in plan.layers],
        "source_kv_norm": att.kv_norm,
        "source_rms_norm_eps": att.rms_norm_eps,
        "source_name": model.config.name,
        "source_tie_word_embeddings": model.config.tie_word_embeddings,
        "notes": list(plan.notes),
    }
    if not att.kv_norm:
        meta["linear_latent"] = {
            "method": "epsilon-dominated kv_a_layernorm",
            "eps": plan.rms_norm_eps,
            "rel_error_target": LINEAR_LATENT_TARGET,
            "row_scales": [lay.row_scale for lay in plan.layers],
            "norm_weights": [float(lay.norm.max()) for lay in plan.layers],
            "up_scales": [lay.up_scale for lay in plan.layers],
        }
    if plan.error_bound or measured:
        meta["latent_rel_error_bound"] = plan.error_bound
        meta["latent_rel_error_measured_fp32"] = measured
    pad = plan.padding
    if pad.pads:
        meta["padding"] = {
            "pad_to": pad_to,
            "source_kv_lora_rank": pad.source_kv_lora_rank,
            "source_qk_rope_head_dim": pad.source_qk_rope_head_dim,
            "source_rope_theta": pad.source_rope_theta,
            "query_scale": pad.query_scale,
        }
    cost = cache_bytes(meta["source_kv_lora_ranks"], pad, torch_dtype.itemsize, source_values)
    meta["cache"] = cost.to_dict()
    engines = tuple((e.name, why) for e, why in fits(shape))
    meta["engines"] = {name: why or "loads" for name, why in engines}
    config = hf_config(plan, torch_dtype)
    config["mlakit_export"] = meta
    out = Path(out)
    entries = _Exporter(model, plan, torch_dtype).entries()

    def write(tmp: Path) -> tuple[list[str], int]:
        weight_map = _write_shards(entries, tmp, max_shard_size, progress)
        shards = sorted(set(weight_map.values()))
        total = sum((tmp / f).stat().st_size for f in shards)
        if len(shards) > 1:
            index = {"metadata": {"total_size": _tensor_bytes(tmp, shards)}, "weight_map": weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        files = [*shards, *([HF_INDEX] if len(shards) > 1 else []), CONFIG_FILE]
        files += _copy_side_files(tokenizer_dir, tmp, model.config)
        readme = export_readme(model.config.name or out.name, shape, pad, cost, plan.notes, model.config.num_layers)
        (tmp / README).write_text(readme)
        return [*files, README], total

    files, total = write_dir(out, write, overwrite=overwrite)
    log.info("export-hf: wrote %s (%d files, %d bytes)", out, len(files), total)
    return ExportReport(
        out, tuple(files), total, plan.kv_lora_rank, plan.notes, measured, plan.error_bound, meta, engines, cost
    )


def _tensor_bytes(directory: Path, shards: list[str]) -> int:
    """Bytes of tensor data in ``shards`` (the index's ``total_size``: files minus their headers)."""
    total = 0
    for f in shards:
        with open(directory / f, "rb") as fh:
            total += (directory / f).stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    return total


def _copy_side_files(src: str | os.PathLike[str] | None, dst: Path, config: ModelConfig) -> list[str]:
    """Copy tokenizer files (and a generation config) from ``src``; write a generation config if none."""
    copied: list[str] = []
    if src is not None and Path(src).is_dir():
        for pattern in (*TOKENIZER_PATTERNS, GENERATION_CONFIG):
            for f in sorted(Path(src).glob(pattern)):
                if f.is_file() and not (dst / f.name).exists():
                    shutil.copy2(f, dst / f.name)
                    copied.append(f.name)
    if GENERATION_CONFIG not in copied:
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
        (dst / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2))
        copied.append(GENERATION_CONFIG)
    return copied
