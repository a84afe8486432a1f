"""mlakit <-> the DeepSeek-V2/V3 Hugging Face checkpoint layout (what transformers, vLLM and SGLang load).

The one mapping table, :data:`MAPPING`, lists every Hugging Face tensor of a dense decoder layer and
the mlakit tensors it is made of. Per layer ``i`` (prefix ``model.layers.{i}.``; H heads; ``d_n``
``qk_nope_head_dim``, ``d_r`` ``qk_rope_head_dim``, ``d_v`` ``v_head_dim``, ``r`` ``kv_lora_rank``)::

    self_attn.q_a_proj            = w_dq                       [q_lora_rank, hidden]
    self_attn.q_a_layernorm       = q_norm                     [q_lora_rank]
    self_attn.q_b_proj            = w_uq  (rope rows of each head interleaved)   [H*(d_n+d_r), q_lora_rank]
    self_attn.q_proj              = w_q   (rope rows of each head interleaved)   [H*(d_n+d_r), hidden]
    self_attn.kv_a_proj_with_mqa  = [w_dkv ; w_kr (rows interleaved)]            [r + d_r, hidden]
    self_attn.kv_a_layernorm      = kv_norm                    [r]
    self_attn.kv_b_proj           = per head h: [w_uk_h ; w_uv_h]                [H*(d_n+d_v), r]
    self_attn.o_proj              = w_o                        [hidden, H*d_v]
    mlp.gate_proj / up_proj / down_proj = mlp.w_gate / w_up / w_down
    input_layernorm               = attn_norm
    post_attention_layernorm      = mlp_norm

plus ``model.embed_tokens = embed``, ``model.norm = norm``, ``lm_head = lm_head``.

RoPE order: mlakit rotates pairs ``(x[j], x[j + d_r/2])`` ("halves", rotate_half). DeepSeek's own
checkpoints, and vLLM/SGLang (``is_neox_style=False``), rotate pairs ``(x[2j], x[2j+1])``
("interleaved"). A rotation is a property of the weights' row order only, so export permutes the
rope rows of ``w_kr`` and of every head's rope part of the query projection into interleaved order
and writes ``rope_interleave: true``; import undoes it (or not, for ``rope_interleave: false``).
Scores are unchanged: logits match to float rounding, and a round trip is bit-identical.

What the format cannot say, and what export does about it (recorded under ``mlakit_export`` in
``config.json``):

* per-layer latent ranks (``ModelConfig.kv_lora_ranks``): one ``kv_lora_rank`` ``R`` for all
  layers, the largest. A narrower layer (rank ``r``) gets zero rows in ``w_dkv`` and zero columns
  in ``w_uk``/``w_uv``. Zero rows lower the mean square the latent RMSNorm divides by by ``r/R``;
  scaling the real rows of ``w_dkv`` (and its bias) by ``s = sqrt(R/r)`` restores it exactly
  (epsilon included) and ``kv_norm`` divided by ``s`` undoes the scale: exact in real arithmetic.
* ``kv_norm=False`` (a linear latent ``c = w_dkv x``, what conversion produces): DeepSeek-V3
  always applies ``kv_a_layernorm``, ``RMSNorm(z) = z / sqrt(mean(z^2) + eps) * gamma``. Export
  makes ``eps`` dominate the mean square: the latent rows are ``s * w_dkv`` (and ``s * b``) with
  ``s`` a small power of two, so ``mean(z^2) = s^2 |c|^2 / R << eps`` and::

      RMSNorm(s c) = gamma s c / sqrt(eps) * (1 + x)^(-1/2),   x = s^2 |c|^2 / (R eps)

  which is linear in ``c`` up to a relative error ``1 - (1 + x)^(-1/2) <= x / 2``. ``gamma`` is
  the power of two nearest ``sqrt(eps) / s`` on the real rows (0 on padding rows), so the
  normalised latent, which engines cache, has the magnitude of mlakit's ``c_kv``; ``w_uk``/``w_uv``
  are multiplied by ``up_scale = sqrt(eps) / (s gamma)`` (in ``[2^-1/2, 2^1/2]``) to undo the
  rest. ``s`` is the largest power of two with ``s^2 B^2 / (2 R eps) <= LINEAR_LATENT_TARGET``,
  ``B`` a data-free bound on ``|c|`` (``sigma_max(w_dkv diag(attn_norm)) sqrt(hidden) + |b|``,
  inputs ``attn_norm * u`` with ``rms(u) = 1``). Scaling by powers of two is exact in binary
  floating point, so bf16 rounds ``s * w_dkv`` and ``gamma`` exactly as it rounds ``w_dkv`` and 1.
  No bias is involved, so nothing is lost in vLLM and SGLang. Padding rows of narrower layers are
  zero, so no per-layer norm compensation is needed.

  ``eps`` must be the same in every runtime: transformers builds ``kv_a_layernorm`` with its
  default ``1e-6`` whatever the config says, vLLM and SGLang with ``rms_norm_eps``. So such
  exports write ``rms_norm_eps: 1e-6`` and size ``s`` for it; that also moves the eps of the
  other RMSNorms (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``; in vLLM and
  SGLang also ``q_a_layernorm``) from the source's value, a small change (SmolLM2-135M, eps
  1e-5: logits of magnitude up to 40 move by at most 2e-2) recorded in the notes and in
  ``mlakit_export`` (``source_rms_norm_eps``). fp16 cannot hold ``s * w_dkv`` (it falls below
  fp16's normal range): such exports are refused; bf16 has fp32's exponent range and is fine.
* attention biases: written (``attention_bias: true``) only when one is non-zero, and only with
  ``allow_bias``: transformers honours them, vLLM and SGLang build these projections without bias
  and skip ``.bias`` tensors. All-zero biases are dropped.

* a non-zero ``w_q`` bias without a query latent (``q_lora_rank=None``; a model converted from
  Qwen2): DeepSeek-V3's ``q_proj`` has no bias, its ``q_a_proj`` has. With ``allow_bias`` the query
  is written as a latent of width ``hidden + 1``: ``q_a_proj x + bias = s [x; 1]`` under the same
  epsilon-dominated ``q_a_layernorm``, and ``q_b_proj = u [w_q | b]`` (see
  :func:`_query_bias_through_latent`). Only transformers honours the bias (as above).
* Llama 3 RoPE scaling (``RopeScaling(type='llama3')``, a conversion of Llama 3.x): written as
  ``rope_type: llama3``, which transformers' DeepSeek-V3 computes like Llama's. vLLM's
  DeepSeek-V2/V3 model rewrites every non-default ``rope_type`` to ``deepseek_yarn``
  (``vllm/model_executor/models/deepseek_v2.py``), which is not Llama 3's rescaling: the note says
  so. Conversion drops the scaling when it leaves every kept rotary frequency unchanged.

Not expressible at all (clear error): ``rope_mode='full'`` MLA and MHA/GQA/MQA baselines, and the
converted-source features DeepSeek-V3 has no field for (:func:`inexpressible_features`: per-head
q/k norms, GeGLU, embedding scale, post norms, soft-capping, sliding windows, a local RoPE base).
Import rejects mixture-of-experts layers, FP8 block-quantised weights and unknown RoPE types.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlakit import dtypes
from mlakit.config import MLAConfig, ModelConfig, RopeScaling
from mlakit.dtypes import FLOAT_DTYPES, FloatName
from mlakit.errors import MlakitError
from mlakit.interop.card import README, export_readme
from mlakit.interop.engines import CacheShape, check_targets, fits
from mlakit.interop.pad import CacheCost, Padding, cache_bytes, plan_padding
from mlakit.io import move_file, read_config_json, read_json, read_json_object, write_dir
from mlakit.model import CONFIG_FILE, FORMAT, Transformer, fill_tied_head
from mlakit.rope import interleaved_to_halves

log = logging.getLogger(__name__)

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # the Hugging Face default shard size
# Worst-case relative error of a linear latent's epsilon-dominated RMSNorm. 400x below bf16's
# rounding (2^-8), the dtype engines serve in, and at the level of fp32 rounding in the matmuls
# around it. Lower would cost no precision (s is a power of two) but sqrt(10) more exponent range
# per decade between the latent and rope-key rows of kv_a_proj_with_mqa, which hurts
# per-tensor weight quantisation.
LINEAR_LATENT_TARGET = 1e-5
HF_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm/kv_a_layernorm with the default eps

# tokenizer and chat files copied along when the source directory has them
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "tokenizer*.py",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

DTypeName = FloatName

# -- the mapping table --------------------------------------------------------------------------

How = Literal["copy", "query_rope_rows", "latent_and_rope_key", "kv_norm", "per_head_kv"]


@dataclass(frozen=True)
class Mapping:
    """One Hugging Face tensor and the mlakit tensors it is made of.

    ``hf`` and ``mlakit`` are names below the layer prefix (``model.layers.{i}.`` and
    ``layers.{i}.``) when ``per_layer``, full names otherwise. ``how``:

    * ``copy``: the same tensor;
    * ``query_rope_rows``: the query projection, each head's last ``d_r`` rows interleaved;
    * ``latent_and_rope_key``: rows ``[w_dkv ; w_kr]``, the ``w_kr`` rows interleaved;
    * ``kv_norm``: the latent RMSNorm weight (padding/compensation happens here);
    * ``per_head_kv``: rows ``[w_uk_h ; w_uv_h]`` for every head h.
    """

    hf: str
    mlakit: tuple[str, ...]
    how: How = "copy"
    per_layer: bool = True


MAPPING: tuple[Mapping, ...] = (
    Mapping("model.embed_tokens.weight", ("embed.weight",), per_layer=False),
    Mapping("model.norm.weight", ("norm.weight",), per_layer=False),
    Mapping("lm_head.weight", ("lm_head.weight",), per_layer=False),
    Mapping("input_layernorm.weight", ("attn_norm.weight",)),
    Mapping("post_attention_layernorm.weight", ("mlp_norm.weight",)),
    Mapping("mlp.gate_proj.weight", ("mlp.w_gate.weight",)),
    Mapping("mlp.up_proj.weight", ("mlp.w_up.weight",)),
    Mapping("mlp.down_proj.weight", ("mlp.w_down.weight",)),
    Mapping("self_attn.q_proj.weight", ("attn.w_q.weight",), "query_rope_rows"),
    Mapping("self_attn.q_a_proj.weight", ("attn.w_dq.weight",)),
    Mapping("self_attn.q_a_proj.bias", ("attn.w_dq.bias",)),
    Mapping("self_attn.q_a_layernorm.weight", ("attn.q_norm.weight",)),
    Mapping("self_attn.q_b_proj.weight", ("attn.w_uq.weight",), "query_rope_rows"),
    Mapping("self_attn.kv_a_proj_with_mqa.weight", ("attn.w_dkv.weight", "attn.w_kr.weight"), "latent_and_rope_key"),
    Mapping("self_attn.kv_a_proj_with_mqa.bias", ("attn.w_dkv.bias", "attn.w_kr.bias"), "latent_and_rope_key"),
    Mapping("self_attn.kv_a_layernorm.weight", ("attn.kv_norm.weight",), "kv_norm"),
    Mapping("self_attn.kv_b_proj.weight", ("attn.w_uk.weight", "attn.w_uv.weight"), "per_head_kv"),
    Mapping("self_attn.o_proj.weight", ("attn.w_o.weight",)),
    Mapping("self_attn.o_proj.bias", ("attn.w_o.bias",)),
)


def _rope_to_interleaved(dim: int) -> torch.Tensor:
    """Row order that turns halves-layout rows into interleaved ones (inverse of interleaved_to_halves)."""
    return torch.argsort(interleaved_to_halves(dim))


# -- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerLatent:
    """How one layer's latent is written into the shared ``kv_lora_rank`` ``R``.

    ``row_scale`` multiplies the real rows of ``w_dkv`` (and bias): ``sqrt(R/r)`` for a normed
    latent, the small power of two ``s`` for a linear one; ``norm`` is the exported
    ``kv_a_layernorm`` weight ``[R]``; ``up_scale`` multiplies ``w_uk``/``w_uv``;
    ``error_bound`` is the worst-case relative error of the latent path (0 when exact).
    """

    rank: int
    row_scale: float
    norm: torch.Tensor
    up_scale: float = 1.0
    error_bound: float = 0.0


@dataclass(frozen=True)
class ExportPlan:
    """Everything export decides before writing: the HF config, each layer's latent mapping and
    the padding of the cached shapes (``padding.kv_lora_rank == kv_lora_rank``)."""

    config: ModelConfig
    kv_lora_rank: int
    attention_bias: bool
    layers: tuple[LayerLatent, ...]
    rms_norm_eps: float
    padding: Padding
    notes: tuple[str, ...] = ()

    def cache_shape(self, dtype: str) -> CacheShape:
        """What engines must cache for this export, stored as ``dtype`` (``fp32``/``bf16``/``fp16``)."""
        att = _mla(self.config)
        return CacheShape(
            kv_lora_rank=self.kv_lora_rank,
            qk_rope_head_dim=self.padding.qk_rope_head_dim,
            qk_nope_head_dim=att.qk_nope_head_dim,
            dtype=dtype,
            attention_bias=self.attention_bias,
        )

    @property
    def error_bound(self) -> float:
        return max((lay.error_bound for lay in self.layers), default=0.0)


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


def _mla(config: ModelConfig) -> MLAConfig:
    att = config.attention
    if not isinstance(att, MLAConfig):
        raise MlakitError(
            f"{config.name or 'this model'} uses {att.kind.upper()} attention; the DeepSeek-V3 format holds MLA "
            "models only: convert it first (`mlakit convert`), then export the converted model"
        )
    if att.rope_mode == "full":
        raise MlakitError(
            "rope_mode='full' MLA (RoPE applied after decompressing the key) is not expressible in the "
            "DeepSeek-V3 format, which only has a decoupled rotary key (qk_rope_head_dim > 0); convert with "
            "decoupled RoPE instead"
        )
    return att


def inexpressible_features(config: ModelConfig) -> list[str]:
    """The features of ``config`` that DeepSeek-V3's format has no field for (empty when none)."""
    att = config.attention
    out = []
    if config.mlp_act != "silu":
        out.append(f"mlp_act={config.mlp_act!r} (the MLP is SwiGLU: silu)")
    if config.embed_scale != 1.0:
        out.append(f"embed_scale={config.embed_scale:g}")
    if config.post_norms:
        out.append("post_norms=True (norms on the attention and MLP outputs)")
    if config.final_logit_softcap is not None:
        out.append(f"final_logit_softcap={config.final_logit_softcap:g}")
    if att.logit_softcap is not None:
        out.append(f"attention.logit_softcap={att.logit_softcap:g}")
    if any(config.is_sliding(i) for i in range(config.num_layers)):
        out.append(f"sliding-window layers (sliding_window={config.sliding_window})")
    if config.local_rope_theta is not None:
        out.append(f"local_rope_theta={config.local_rope_theta:g}")
    if att.qk_norm:
        out.append("attention.qk_norm=True (per-head q/k norms)")
    return out


def plan_export(model: Transformer, allow_bias: bool = False, pad_to: int | None = None) -> ExportPlan:
    """Decide the exported ``kv_lora_rank``, ``rms_norm_eps`` and each layer's latent mapping.

    See the module docstring for the two latent mappings (normed: padding compensation; linear:
    epsilon-dominated RMSNorm), and :mod:`mlakit.interop.pad` for ``pad_to`` (the cached width
    ``kv_lora_rank + qk_rope_head_dim`` to widen to exactly, e.g. 576).

    Raises: MlakitError when the model cannot be written in the DeepSeek-V3 format, has
    non-zero attention biases (vLLM/SGLang ignore them) without ``allow_bias``, or ``pad_to`` is
    smaller than the model's cached width.
    """
    config = model.config
    att = _mla(config)
    missing = inexpressible_features(config)
    if missing:
        raise MlakitError(
            f"{config.name or 'this model'}: DeepSeek-V3 cannot express {', '.join(missing)}; "
            "such a model runs in mlakit only (`mlakit eval`, `mlakit.generate()`)"
        )
    state = model.state_dict()
    ranks = [_mla_layer(config, i).kv_lora_rank for i in range(config.num_layers)]
    linear = not att.kv_norm
    notes: list[str] = []
    if att.attention_bias and att.q_lora_rank is None:
        for i in range(config.num_layers):
            b = state.get(f"layers.{i}.attn.w_q.bias")
            if b is not None and bool(b.ne(0).any()):
                raise MlakitError(
                    f"layer {i}: w_q has a non-zero bias; DeepSeek-V3's q_proj has none (only q_a_proj, "
                    "kv_a_proj_with_mqa and o_proj take attention_bias): pass --allow-bias (allow_bias=True) to "
                    "write it through a query latent, for transformers only"
                )
    biased = _nonzero_biases(state, config.num_layers)
    if biased and not allow_bias:
        more = f" and {len(biased) - 1} more" if len(biased) > 1 else ""
        raise MlakitError(
            f"the model has attention biases ({biased[0]}{more} non-zero). transformers runs such a checkpoint "
            "exactly, vLLM and SGLang silently drop these biases; pass --allow-bias (allow_bias=True) for a "
            "transformers-only export"
        )
    if att.attention_bias and not biased:
        notes.append("attention_bias=True but every attention bias is zero: written without biases")
    if att.rope_scaling is not None and att.rope_scaling.type == "llama3":
        notes.append(
            "rope_scaling llama3: transformers reproduces it; vLLM's DeepSeek-V2/V3 model rewrites any non-default "
            "rope_type to deepseek_yarn, which rescales the rotary frequencies differently (vLLM does not serve "
            "this export exactly)"
        )
    padding = plan_padding(att, max(ranks), pad_to)
    big_r = padding.kv_lora_rank
    eps = HF_LATENT_NORM_EPS if linear else att.rms_norm_eps
    if linear and att.rms_norm_eps != eps:
        q_norm = ", q_a_layernorm" if att.q_lora_rank is not None else ""
        notes.append(
            f"rms_norm_eps {att.rms_norm_eps:g} -> {eps:g}: the linear latent's kv_a_layernorm needs the same eps in "
            f"every runtime and transformers hard-codes {eps:g}; the other RMSNorms (input_layernorm, "
            f"post_attention_layernorm, model.norm{q_norm}) now use it too, changing their output by about "
            "(old - new) / (2 mean(h^2)) relative"
        )
    elif eps != HF_LATENT_NORM_EPS:
        notes.append(
            f"rms_norm_eps={eps:g}: transformers normalises q/kv latents with eps {HF_LATENT_NORM_EPS:g}, vLLM/SGLang "
            "with rms_norm_eps (mlakit): tiny differences in transformers"
        )
    layers: list[LayerLatent] = []
    for i, r in enumerate(ranks):
        p = f"layers.{i}."
        if linear:
            bound = _latent_norm_bound(
                state[p + "attn.w_dkv.weight"], state.get(p + "attn.w_dkv.bias"), state[p + "attn_norm.weight"]
            )
            layers.append(_linear_latent(r, big_r, bound, eps))
        else:
            s = math.sqrt(big_r / r)
            g = state[p + "attn.kv_norm.weight"]
            norm = torch.zeros(big_r, dtype=g.dtype)
            norm[:r] = g if r == big_r else (g.double() / s).to(g.dtype)
            layers.append(LayerLatent(r, s, norm))
    how = "zero rows, exact for a linear latent" if linear else "norm-compensated, exact"
    if any(r != padding.source_kv_lora_rank for r in ranks):
        notes.append(f"per-layer latent ranks {ranks} padded to kv_lora_rank={padding.source_kv_lora_rank} ({how})")
    if padding.pads:
        notes.append(
            f"pad_to={pad_to}: kv_lora_rank {padding.source_kv_lora_rank} -> {big_r} ({how}), qk_rope_head_dim "
            f"{padding.source_qk_rope_head_dim} -> {padding.qk_rope_head_dim} (zero rotary pairs, rope_theta "
            f"{padding.source_rope_theta:g} -> {padding.rope_theta:g} keeps every frequency), query x "
            f"{padding.query_scale:.6g} for the softmax scale of the wider head"
        )
    if linear:
        bound = max(lay.error_bound for lay in layers)
        notes.append(
            f"kv_norm=False written as an epsilon-dominated kv_a_layernorm (latent rows x 2^k, eps {eps:g}): "
            f"relative error <= {bound:.1e} per token, no biases"
        )
    return ExportPlan(config, big_r, bool(biased), tuple(layers), eps, padding, tuple(notes))


def _query_bias_through_latent(model: Transformer) -> tuple[Transformer, str | None]:
    """``model`` with a non-zero ``w_q`` bias carried by a query latent DeepSeek-V3 can write.

    ``q = w_q x + b`` becomes ``w_uq q_norm(w_dq x + b_dq)`` with ``q_lora_rank = n + 1``:
    ``w_dq x + b_dq = s [x; 1]``, ``q_norm`` the epsilon-dominated RMSNorm of a linear latent
    (module docstring; ``s``, the norm weight and ``u`` from :func:`_linear_latent`, sized for
    transformers' ``q_a_layernorm`` eps) and ``w_uq = u [w_q | b]``. Linear to within the bound in
    the returned note. Returns ``(model, None)`` unchanged when there is no such bias.
    """
    att = model.config.attention
    if not isinstance(att, MLAConfig) or att.q_lora_rank is not None or not att.attention_bias:
        return model, None
    state = model.state_dict()
    n, num_layers = att.hidden_size, model.config.num_layers
    if not any(bool(state[f"layers.{i}.attn.w_q.bias"].ne(0).any()) for i in range(num_layers)):
        return model, None
    config = dataclasses.replace(model.config, attention=dataclasses.replace(att, q_lora_rank=n + 1))
    new = {k: v for k, v in state.items() if ".attn.w_q." not in k}
    worst = 0.0
    for i in range(num_layers):
        p = f"layers.{i}.attn."
        w_q, b_q = state[p + "w_q.weight"], state[p + "w_q.bias"]
        # |[x; 1]| for inputs x = attn_norm * u, rms(u) = 1
        x_bound = _latent_norm_bound(torch.eye(n, dtype=w_q.dtype), None, state[f"layers.{i}.attn_norm.weight"])
        lay = _linear_latent(n + 1, n + 1, math.sqrt(x_bound**2 + 1), HF_LATENT_NORM_EPS)
        w_dq = torch.zeros(n + 1, n, dtype=w_q.dtype)
        w_dq[:n] = torch.eye(n, dtype=w_q.dtype) * lay.row_scale
        b_dq = torch.zeros(n + 1, dtype=w_q.dtype)
        b_dq[n] = lay.row_scale
        new[p + "w_dq.weight"], new[p + "w_dq.bias"] = w_dq, b_dq
        new[p + "q_norm.weight"] = lay.norm.to(w_q.dtype)
        new[p + "w_uq.weight"] = (torch.cat([w_q, b_q[:, None]], dim=1).double() * lay.up_scale).to(w_q.dtype)
        worst = max(worst, lay.error_bound)
    with torch.device("meta"):
        out = Transformer(config)
    out.load_state_dict(new, strict=True, assign=True)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.embed.weight
    out.reset_rope_tables(model.embed.weight.device)
    note = (
        f"w_q bias written through a query latent (q_lora_rank={n + 1} = hidden + 1, q_a_proj with bias, "
        f"epsilon-dominated q_a_layernorm): relative error <= {worst:.1e} per token, transformers only"
    )
    return out.eval(), note


def _nonzero_biases(state: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """mlakit names of the non-zero biases the format would write (``attention_bias`` tensors)."""
    names = [n for mp in MAPPING if mp.per_layer and mp.hf.endswith(".bias") for n in mp.mlakit]
    out = []
    for i in range(num_layers):
        for n in names:
            b = state.get(f"layers.{i}.{n}")
            if b is not None and bool(b.ne(0).any()):
                out.append(f"layers.{i}.{n}")
    return out


def _linear_latent(rank: int, big_r: int, bound: float, eps: float) -> LayerLatent:
    """The epsilon-dominated RMSNorm mapping of a linear latent with ``|c| <= bound``."""
    if bound <= 0:  # an all-zero latent: nothing to approximate
        s = 1.0
    else:
        # largest power of two with s^2 bound^2 / (2 R eps) <= target
        s = 2.0 ** math.floor(math.log2(math.sqrt(2 * big_r * eps * LINEAR_LATENT_TARGET) / bound))
    gamma = 2.0 ** round(math.log2(math.sqrt(eps) / s))
    norm = torch.zeros(big_r)
    norm[:rank] = gamma
    error = s * s * bound * bound / (2 * big_r * eps)
    return LayerLatent(rank, s, norm, math.sqrt(eps) / (s * gamma), error)


def _mla_layer(config: ModelConfig, layer: int) -> MLAConfig:
    att = config.layer_attention(layer)
    assert isinstance(att, MLAConfig)
    return att


def _latent_norm_bound(w_dkv: torch.Tensor, b_dkv: torch.Tensor | None, attn_norm: torch.Tensor) -> float:
    """Upper bound on ``|w_dkv x + b|`` for ``x = attn_norm * u`` with ``rms(u) = 1`` (so ``|u| = sqrt(d)``)."""
    w = w_dkv.detach().double() * attn_norm.detach().double()  # [r, d]
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    b = float(b_dkv.detach().double().norm()) if b_dkv is not None else 0.0
    return sigma * math.sqrt(w.shape[1]) + b


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


def measure_latent_error(model: Transformer, plan: ExportPlan, probes: int = 256, seed: int = 0) -> float:
    """Largest relative error of the exported latent path against mlakit's, over random inputs.

    Replays, in fp32 as transformers does and with the exported ``rms_norm_eps``,
    ``kv_b_proj(kv_a_layernorm(kv_a_proj(x)))`` for the exported tensors against
    ``[w_uk; w_uv] c_kv`` for the original layer, on ``probes`` random inputs
    ``x = attn_norm * u`` with ``rms(u) = 1`` (the inputs this projection sees). The result is
    the approximation plus fp32 rounding. 0 when every layer is copied unchanged.
    """
    big_r = plan.kv_lora_rank
    if all(lay.row_scale == 1 and lay.up_scale == 1 and lay.rank == big_r for lay in plan.layers):
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    eps = plan.rms_norm_eps
    worst = 0.0
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    att = _mla(model.config)
    with torch.no_grad():
        for i, lay in enumerate(plan.layers):
            p = f"layers.{i}."
            w_dkv, b_dkv = state[p + "attn.w_dkv.weight"], state.get(p + "attn.w_dkv.bias")
            d = w_dkv.shape[1]
            u = torch.randn(probes, d, generator=gen)
            u = u / u.pow(2).mean(-1, keepdim=True).sqrt()
            x = u * state[p + "attn_norm.weight"]  # [N, d]
            ref_c = x @ w_dkv.T + (b_dkv if b_dkv is not None else 0.0)  # [N, r]
            if att.kv_norm:
                ms = ref_c.pow(2).mean(-1, keepdim=True)
                ref_c = ref_c * torch.rsqrt(ms + att.rms_norm_eps) * state[p + "attn.kv_norm.weight"]
            up = torch.cat((state[p + "attn.w_uk.weight"], state[p + "attn.w_uv.weight"]))  # [H*(d_n+d_v), r]
            ref = ref_c @ up.T
            # exported path, fp32
            r = lay.rank
            w = torch.zeros(big_r, d)
            w[:r] = w_dkv * lay.row_scale
            z = x @ w.T  # [N, R]
            if b_dkv is not None:
                z[:, :r] += b_dkv * lay.row_scale
            c = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * lay.norm.float()
            up_x = torch.zeros(up.shape[0], big_r)
            up_x[:, :r] = up * lay.up_scale
            got = c @ up_x.T
            rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
            worst = max(worst, float(rel.max()))
    return worst


def _check_latent_dtype(model: Transformer, plan: ExportPlan, dtype: torch.dtype) -> None:
    """Refuse an export ``dtype`` that cannot hold the scaled latent rows or norm weights.

    A linear latent's rows ``s * w_dkv`` are tiny; fp16 flushes them into its subnormal range
    (or to zero). Casting loses more than the dtype's own rounding (``finfo.eps``) exactly then.

    Raises: MlakitError naming the layer, the loss and the dtypes that work.
    """
    if dtype == torch.float32 or _mla(plan.config).kv_norm:
        return
    state = model.state_dict()
    for i, lay in enumerate(plan.layers):
        scaled = [state[f"layers.{i}.attn.w_dkv.weight"].detach().double() * lay.row_scale, lay.norm.double()]
        b = state.get(f"layers.{i}.attn.w_dkv.bias")
        if plan.attention_bias and b is not None:
            scaled.append(b.detach().double() * lay.row_scale)
        for t in scaled:
            cast = t.to(dtype).double()
            loss = float((cast - t).norm() / t.norm().clamp_min(1e-300))
            if not bool(cast.isfinite().all()) or loss > torch.finfo(dtype).eps:
                name = str(dtype).removeprefix("torch.")
                raise MlakitError(
                    f"layer {i}: {name} cannot hold the exported latent (w_dkv x {lay.row_scale:.3g} for the "
                    f"epsilon-dominated kv_a_layernorm, norm weight {float(lay.norm.max()):g}): the cast loses "
                    f"{loss:.1e} relative, more than {name}'s rounding; export as bf16 (--dtype bf16, fp32's "
                    "exponent range) or fp32"
                )


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


# -- import -------------------------------------------------------------------------------------

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
        try:
            return float(theta), RopeScaling(
                type="llama3",
                factor=float(rp["factor"]),
                original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
                low_freq_factor=float(rp["low_freq_factor"]),
                high_freq_factor=float(rp["high_freq_factor"]),
            )
        except KeyError as e:
            raise MlakitError(f"{where}: llama3 RoPE settings lack {e.args[0]!r}") from e
        except ValueError as e:
            raise MlakitError(f"{where}: {e}") from e
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
