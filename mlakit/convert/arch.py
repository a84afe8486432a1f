"""Source architectures: what a Hugging Face model type means in mlakit's terms, in one place.

Conversion (:mod:`mlakit.convert.convert`) and the baseline loader (:mod:`mlakit.engine.load`,
the unconverted model as an mlakit MHA/GQA :class:`~mlakit.model.Transformer`) both read the
source through this module: :func:`source_spec` turns a ``transformers`` config into a
:class:`SourceSpec` (or one :class:`~mlakit.errors.MlakitError` naming the unsupported field),
and the tables below name every tensor mlakit takes from the source.

=============  ==========================================================================
model_type     what differs from Llama (all map onto :class:`~mlakit.config.ModelConfig`)
=============  ==========================================================================
llama          (SmolLM, Llama 2, Llama 3.x with ``rope_type: llama3`` scaling)
mistral        ``head_dim`` != hidden / heads; ``sliding_window`` on every layer
qwen2          q/k/v biases; sliding-window layers when ``use_sliding_window``
qwen3          per-head q/k RMSNorm before RoPE (``qk_norm``)
gemma2         GeGLU, ``(1 + w)`` RMSNorms, embeddings x sqrt(hidden), pre/post norms around
               attention and MLP, attention and final logit soft-capping, every other layer
               sliding, ``query_pre_attn_scalar``
gemma3_text    Gemma 2 without soft-capping, plus q/k norms and a RoPE base of its own
               (``rope_local_base_freq``) for the sliding layers
=============  ==========================================================================

What mlakit folds into the weights, exactly (fp32 rounding aside): Gemma's ``(1 + w)`` norm
weights become ``w + 1``; ``query_pre_attn_scalar`` (softmax scale ``s**-0.5`` instead of
``head_dim**-0.5``) multiplies the query projection (or its per-head norm) by
``sqrt(head_dim / s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlakit.config import (
    AttentionConfig,
    LayerAttention,
    LayerType,
    MlpAct,
    ModelConfig,
    RopeScaling,
    llama3_rope_scaling,
)
from mlakit.convert.factorize import AttentionWeights
from mlakit.convert.rope import SourceRope
from mlakit.errors import MlakitError

#: ``config.model_type`` values mlakit converts (see the module docstring for what each adds).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")

_GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS: dict[str, MlpAct] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_LAYER_TYPES: dict[str, LayerType] = {"full_attention": "full", "sliding_attention": "sliding"}

# -- tensor names: Hugging Face (below ``model.layers.{i}.``) -> mlakit (below ``layers.{i}.``) --

#: norms of a Llama-style block
LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
#: Gemma 2/3's four norms: HF's ``post_attention_layernorm`` normalises the attention *output*
GEMMA_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "attn_post_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_post_norm",
}
#: per-head query/key norms (Qwen3, Gemma 3)
QK_NORMS = {"self_attn.q_norm": "attn.q_head_norm", "self_attn.k_norm": "attn.k_head_norm"}
MLP = {"mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up", "mlp.down_proj": "mlp.w_down"}
#: attention projections of the baseline (GQA) model; conversion replaces k/v by the latent
ATTENTION = {
    "self_attn.q_proj": "attn.w_q",
    "self_attn.k_proj": "attn.w_k",
    "self_attn.v_proj": "attn.w_v",
    "self_attn.o_proj": "attn.w_o",
}

Getter = Callable[[str], torch.Tensor | None]


@dataclass(frozen=True)
class SourceSpec:
    """Everything mlakit needs from a source model's config (see :func:`source_spec`)."""

    model_type: str
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    mlp_act: MlpAct = "silu"
    norm_offset: float = 0.0
    embed_scale: float = 1.0
    post_norms: bool = False
    qk_norm: bool = False
    query_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    local_rope_theta: float | None = None

    @property
    def norms(self) -> dict[str, str]:
        return GEMMA_NORMS if self.post_norms else LLAMA_NORMS

    def ropes(self) -> tuple[SourceRope, ...]:
        """The RoPEs the source's layers use: the global one, and its sliding layers' (over their window)."""
        sliding = self.layer_types is not None and "sliding" in self.layer_types
        out = []
        if self.layer_types is None or "full" in self.layer_types:
            out.append(SourceRope(self.rope_theta, self.rope_scaling))
        if sliding:
            own = self.local_rope_theta is not None
            theta = self.local_rope_theta if self.local_rope_theta is not None else self.rope_theta
            out.append(SourceRope(theta, None if own else self.rope_scaling, self.sliding_window))
        return tuple(out)

    def model_config(self, attention: LayerAttention, max_seq_len: int | None = None, **fields: Any) -> ModelConfig:
        """A :class:`ModelConfig` with the source's model-level features and ``attention``; ``fields`` override."""
        kw: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            attention=attention,
            max_seq_len=max_seq_len or self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            name=self.name,
            mlp_act=self.mlp_act,
            embed_scale=self.embed_scale,
            post_norms=self.post_norms,
            final_logit_softcap=self.final_softcap,
            sliding_window=self.sliding_window,
            layer_types=self.layer_types,
            local_rope_theta=self.local_rope_theta,
        )
        kw.update(fields)
        return ModelConfig(**kw)

    def baseline_config(self, max_seq_len: int | None = None) -> ModelConfig:
        """The source itself as an mlakit MHA/GQA/MQA model (same weights, same logits)."""
        att = AttentionConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            logit_softcap=self.attn_softcap,
        )
        return self.model_config(att, max_seq_len)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    v = getattr(cfg, name, default)
    return default if v is None else v


def _rope_params(cfg: Any) -> dict[str, Any]:
    """RoPE settings: transformers >= 5 ``rope_parameters``, or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    scaling = getattr(cfg, "rope_scaling", None)
    out: dict[str, Any] = dict(scaling) if isinstance(scaling, dict) else {}
    out.setdefault("rope_theta", _get(cfg, "rope_theta", 10000.0))
    if getattr(cfg, "rope_local_base_freq", None) is not None:  # Gemma 3 in transformers 4.x
        return {"full_attention": out, "sliding_attention": {"rope_theta": cfg.rope_local_base_freq}}
    return out


def _rope(params: dict[str, Any], where: str, field: str) -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` of one flat RoPE settings dict; refuses what mlakit cannot reproduce."""
    kind = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise MlakitError(f"{where}: {field}.partial_rotary_factor={partial} is not supported (RoPE on every dim only)")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise MlakitError(
            f"{where}: {field}.rope_type={kind!r} is not supported for conversion (supported: default, llama3)"
        )
    scaling = llama3_rope_scaling(params, f"{where}: {field}")
    return theta, scaling


def source_spec(cfg: Any, where: str) -> SourceSpec:
    """Read a ``transformers`` config (``PretrainedConfig``) of a supported model type.

    Raises:
        MlakitError: an unsupported architecture, or a feature mlakit cannot reproduce exactly
            (naming the config field): another activation, MLP biases, another RoPE scaling,
            partial rotary dims, bidirectional attention.
    """
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gemma3":
        raise MlakitError(
            f"{where}: model_type 'gemma3' is the multimodal Gemma 3; convert its text model (gemma3_text)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise MlakitError(f"{where}: unsupported architecture {model_type!r}; supported model types: {supported}")
    archs = getattr(cfg, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise MlakitError(f"{where}: config.json architectures={archs!r} is not a list of class names")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise MlakitError(f"{where}: {archs} is not a causal language model")
    act_field = "hidden_activation" if model_type in _GEMMA else "hidden_act"
    act = _get(cfg, act_field, "silu")
    if act not in _ACTIVATIONS:
        raise MlakitError(f"{where}: {act_field}={act!r} is not supported (silu or gelu_pytorch_tanh)")
    if getattr(cfg, "mlp_bias", False):
        raise MlakitError(f"{where}: mlp_bias=true is not supported (the gated MLP has no biases)")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise MlakitError(f"{where}: use_bidirectional_attention=true is not supported (causal decoders only)")
    heads = int(cfg.num_attention_heads)
    head_dim = int(_get(cfg, "head_dim", cfg.hidden_size // heads))
    n_layers = int(cfg.num_hidden_layers)
    rope = _rope_params(cfg)
    local_theta: float | None = None
    if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
        theta, scaling = _rope(rope.get("full_attention") or {}, where, "rope_parameters.full_attention")
        local_theta, local_scaling = _rope(
            rope.get("sliding_attention") or {}, where, "rope_parameters.sliding_attention"
        )
        if local_scaling is not None:
            raise MlakitError(f"{where}: rope_parameters.sliding_attention: scaled local RoPE is not supported")
        if local_theta == theta and scaling is None:
            local_theta = None
    else:
        theta, scaling = _rope(rope, where, "rope_parameters")
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    layer_types: tuple[LayerType, ...] | None = None
    if types is not None:
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise MlakitError(f"{where}: layer_types {unknown} are not supported (full_attention, sliding_attention)")
        layer_types = tuple(_LAYER_TYPES[t] for t in types)
    elif window is not None:  # Mistral: the window applies to every layer
        sliding: LayerType = "sliding"
        layer_types = (sliding,) * n_layers
    max_pos = int(_get(cfg, "max_position_embeddings", 4096))
    if layer_types is not None and ("sliding" not in layer_types or (window is not None and window >= max_pos)):
        layer_types, window = None, None  # no layer slides, or the window spans the whole context
    if layer_types is not None and not window:
        raise MlakitError(f"{where}: layer_types has sliding layers but sliding_window={window!r}")
    if layer_types is None or "sliding" not in layer_types:
        local_theta = None
    gemma = model_type in _GEMMA
    qpas = getattr(cfg, "query_pre_attn_scalar", None) if gemma else None
    eos = getattr(cfg, "eos_token_id", None)
    return SourceSpec(
        model_type=model_type,
        name=str(getattr(cfg, "_name_or_path", "") or model_type),
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(getattr(cfg, "attention_bias", False)) or model_type == "qwen2",
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        mlp_act=_ACTIVATIONS[act],
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=math.sqrt(cfg.hidden_size) if gemma else 1.0,
        post_norms=gemma,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        query_scale=math.sqrt(head_dim / qpas) if qpas else 1.0,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) if gemma else None,
        sliding_window=int(window) if layer_types is not None and window is not None else None,
        layer_types=layer_types,
        local_rope_theta=local_theta,
    )


# -- weights ------------------------------------------------------------------------------------


def _need(get: Getter, name: str) -> torch.Tensor:
    t = get(name)
    if t is None:
        raise MlakitError(f"tensor {name} is missing from the source")
    return t


def _norm(spec: SourceSpec, w: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight as mlakit multiplies it (Gemma stores ``w`` for a scale of ``1 + w``)."""
    return w.float() + spec.norm_offset if spec.norm_offset else w


def model_weights(spec: SourceSpec, get: Getter) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and head (``lm_head`` is the embedding when tied or absent)."""
    embed = _need(get, "model.embed_tokens.weight")
    head = get("lm_head.weight")
    return {
        "embed.weight": embed,
        "norm.weight": _norm(spec, _need(get, "model.norm.weight")),
        "lm_head.weight": embed if spec.tie_word_embeddings or head is None else head,
    }


def block_weights(spec: SourceSpec, get: Getter, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s norms and MLP (names below ``layers.{layer}.``); not the attention projections."""
    p = f"model.layers.{layer}."
    out = {f"{dst}.weight": _norm(spec, _need(get, f"{p}{src}.weight")) for src, dst in spec.norms.items()}
    out.update({f"{dst}.weight": _need(get, f"{p}{src}.weight") for src, dst in MLP.items()})
    return out


def head_norms(spec: SourceSpec, get: Getter, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q_head_norm, k_head_norm)`` weights ``[head_dim]`` as mlakit applies them, or None.

    The query norm carries :attr:`SourceSpec.query_scale` (a per-head RMSNorm's output scales
    with its weight, so the scale folds exactly).
    """
    if not spec.qk_norm:
        return None
    p = f"model.layers.{layer}.self_attn."
    q = _norm(spec, _need(get, p + "q_norm.weight")).float() * spec.query_scale
    return q, _norm(spec, _need(get, p + "k_norm.weight")).float()


def attention_weights(spec: SourceSpec, get: Getter, layer: int) -> AttentionWeights:
    """Layer ``layer``'s q/k/v/o in float64 with biases as a last column (what conversion factorises).

    Without q/k norms the query scale folds into ``w_q``; with them, into the query norm.
    """
    p = f"model.layers.{layer}.self_attn."

    def aug(name: str) -> torch.Tensor:
        w = _need(get, p + name + ".weight").detach().double()
        b = get(p + name + ".bias")
        bias = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        return torch.cat([w, bias[:, None]], dim=1)

    o_bias = get(p + "o_proj.bias")
    if o_bias is not None and bool(o_bias.ne(0).any()):
        raise MlakitError(f"layer {layer}: a non-zero o_proj bias is not supported")
    w_q = aug("q_proj")
    if not spec.qk_norm and spec.query_scale != 1.0:
        w_q = w_q * spec.query_scale
    return AttentionWeights(
        w_q,
        aug("k_proj"),
        aug("v_proj"),
        _need(get, p + "o_proj.weight").detach().double(),
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
    )


def baseline_layer_state(spec: SourceSpec, get: Getter, layer: int) -> dict[str, torch.Tensor]:
    """One block of :meth:`SourceSpec.baseline_config`'s model (names below ``layers.{layer}.``):
    the source layer's weights, renamed (the query scale folded as :func:`baseline_state` says)."""
    p = f"model.layers.{layer}."
    state = block_weights(spec, get, layer)
    for src, dst in ATTENTION.items():
        for kind in ("weight", "bias"):
            t = get(f"{p}{src}.{kind}")
            if t is not None and (kind == "weight" or dst != "attn.w_o"):
                state[f"{dst}.{kind}"] = t
    norms = head_norms(spec, get, layer)
    if norms is not None:
        state["attn.q_head_norm.weight"], state["attn.k_head_norm.weight"] = norms
    elif spec.query_scale != 1.0:
        state["attn.w_q.weight"] = state["attn.w_q.weight"].float() * spec.query_scale
        if "attn.w_q.bias" in state:
            state["attn.w_q.bias"] = state["attn.w_q.bias"].float() * spec.query_scale
    return state


def baseline_state(spec: SourceSpec, get: Getter) -> dict[str, torch.Tensor]:
    """The state dict of :meth:`SourceSpec.baseline_config`'s model: the source's weights, renamed."""
    state = model_weights(spec, get)
    for i in range(spec.num_layers):
        state.update({f"layers.{i}.{k}": v for k, v in baseline_layer_state(spec, get, i).items()})
    return state
