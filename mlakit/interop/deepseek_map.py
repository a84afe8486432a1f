"""The tensor-name mapping between mlakit and the DeepSeek-V2/V3 Hugging Face layout, and its RoPE row order.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mlakit.config import MLAConfig, ModelConfig
from mlakit.dtypes import FloatName
from mlakit.errors import MlakitError
from mlakit.rope import interleaved_to_halves

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

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


def _mla_layer(config: ModelConfig, layer: int) -> MLAConfig:
    att = config.layer_attention(layer)
    assert isinstance(att, MLAConfig)
    return att
