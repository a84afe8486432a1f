"""Frozen, validated configs for MLA, baseline attention and the decoder LM.

Field names follow DeepSeek-V2/V3 (``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``,
``qk_rope_head_dim``, ``v_head_dim``) so a config reads the same here, in the papers and in a
Hugging Face ``config.json``.

Runtime choices (which decode path, cache dtype) are *not* model properties and live in
:class:`RuntimeConfig`, passed explicitly to the code that needs them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch

from mlakit import dtypes
from mlakit.dtypes import StorageName
from mlakit.errors import MlakitError
from mlakit.errors import invalid as _fail

AttentionKind: TypeAlias = Literal["mla", "mha", "gqa", "mqa"]
RopeMode: TypeAlias = Literal["decoupled", "full"]
RopeScalingType: TypeAlias = Literal["yarn", "llama3"]
MlpAct: TypeAlias = Literal["silu", "gelu_tanh"]
LayerType: TypeAlias = Literal["full", "sliding"]
DecodePath: TypeAlias = Literal["auto", "naive", "absorbed"]
CacheDType: TypeAlias = StorageName

ATTENTION_KINDS: tuple[str, ...] = ("mla", "mha", "gqa", "mqa")
DECODE_PATHS: tuple[str, ...] = ("auto", "naive", "absorbed")
MAX_SEQ_LEN = 2**24  # 16M positions: 100x DeepSeek-V3's context; beyond, a config is damaged, not long


def _positive(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(owner, name, value, "must be a positive integer")
    if value >= 2**31:  # tensor dimensions: beyond this a config is damaged, and torch overflows
        raise _fail(owner, name, value, "must be below 2**31")


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of RoPE: YaRN as DeepSeek-V2/V3 configure it, or Llama 3.1's bands.

    ``type='yarn'``: ``factor`` stretches the low frequencies; ``mscale``/``mscale_all_dim`` give
    the attention temperature correction ``0.1 * m * ln(factor) + 1``. DeepSeek multiplies the
    softmax scale by ``mscale(mscale_all_dim)**2`` and the cos/sin tables by
    ``mscale(mscale) / mscale(mscale_all_dim)`` (see :func:`mlakit.rope.softmax_scale` and
    :func:`mlakit.rope.rope_tables`).

    ``type='llama3'`` (Llama 3.1+): each inverse frequency is rescaled by its wavelength alone,
    with ``L = original_max_position_embeddings``: wavelengths below ``L / high_freq_factor`` are
    kept, above ``L / low_freq_factor`` divided by ``factor``, linearly blended in between (in
    ``L / wavelength``). No temperature correction; the ``beta``/``mscale`` fields are unused.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    type: RopeScalingType = "yarn"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        o = "RopeScaling"
        if self.type not in ("yarn", "llama3"):
            raise _fail(o, "type", self.type, "must be 'yarn' or 'llama3'")
        if not self.factor >= 1.0:
            raise _fail(o, "factor", self.factor, "must be >= 1")
        _positive(o, "original_max_position_embeddings", self.original_max_position_embeddings)
        if self.type == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise _fail(o, "beta_fast", self.beta_fast, f"must exceed beta_slow={self.beta_slow} > 0")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise _fail(
                o, "high_freq_factor", self.high_freq_factor, f"must exceed low_freq_factor={self.low_freq_factor} > 0"
            )


def _check_attention_features(owner: str, softcap: float | None, window: int | None) -> None:
    if softcap is not None and not softcap > 0:
        raise _fail(owner, "logit_softcap", softcap, "must be > 0 (or None: no soft-capping)")
    if window is not None:
        _positive(owner, "sliding_window", window)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 §2.1).

    Symbols (per token, per layer): ``c_q = W_DQ x`` (width ``q_lora_rank``; ``None`` means one
    ``W_Q`` and no query compression), ``c_kv = W_DKV x`` (width ``kv_lora_rank``), ``k_rope = RoPE(W_KR x)``
    (width ``qk_rope_head_dim``, shared by all heads), per-head ``k_nope = W_UK c_kv`` and
    ``v = W_UV c_kv``. The cache holds ``c_kv`` and ``k_rope`` only.

    ``rope_mode='full'`` is the conversion form: the latent is taken before RoPE, the decompressed
    key (all ``qk_nope_head_dim`` dims) is rotated after decompression, ``qk_rope_head_dim`` must
    be 0 and decode must decompress (no absorption), but positions stay exact.
    ``kv_norm=False`` drops the RMSNorm on ``c_kv`` (needed to represent a linear conversion).

    Converted-source features (defaults: off): ``qk_norm`` applies a per-head RMSNorm (weights
    ``[qk_nope_head_dim]``) to the query and to the decompressed key before RoPE (Qwen3, Gemma 3);
    it sits between the latent and the key, so it needs ``rope_mode='full'`` (no absorption).
    ``logit_softcap`` caps the scaled scores as ``cap * tanh(s / cap)`` (Gemma 2);
    ``sliding_window`` lets a query at ``t`` see keys at ``s > t - sliding_window`` only (set per
    layer by :meth:`ModelConfig.layer_attention`).
    """

    hidden_size: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    rope_mode: RopeMode = "decoupled"
    kv_norm: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    logit_softcap: float | None = None
    sliding_window: int | None = None

    kind: Literal["mla"] = field(default="mla", init=False)

    def __post_init__(self) -> None:
        o = "MLAConfig"
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _positive(o, name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive(o, "q_lora_rank", self.q_lora_rank)
        if self.rope_mode not in ("decoupled", "full"):
            raise _fail(o, "rope_mode", self.rope_mode, "must be 'decoupled' or 'full'")
        if self.rope_mode == "decoupled":
            _positive(o, "qk_rope_head_dim", self.qk_rope_head_dim)
            if self.qk_rope_head_dim % 2:
                raise _fail(o, "qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs: must be even")
        else:
            if self.qk_rope_head_dim != 0:
                raise _fail(o, "qk_rope_head_dim", self.qk_rope_head_dim, "must be 0 when rope_mode='full'")
            if self.qk_nope_head_dim % 2:
                raise _fail(o, "qk_nope_head_dim", self.qk_nope_head_dim, "rope_mode='full' rotates it: must be even")
        if not self.rope_theta > 0:
            raise _fail(o, "rope_theta", self.rope_theta, "must be > 0")
        if not self.rms_norm_eps > 0:
            raise _fail(o, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.qk_norm and self.rope_mode != "full":
            raise _fail(
                o,
                "qk_norm",
                self.qk_norm,
                "a per-head key norm between the latent and the key cannot be absorbed: needs rope_mode='full'",
            )
        _check_attention_features(o, self.logit_softcap, self.sliding_window)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the decoupled key, or the whole decompressed key in full mode."""
        return self.qk_rope_head_dim if self.rope_mode == "decoupled" else self.qk_nope_head_dim

    @property
    def can_absorb(self) -> bool:
        return self.rope_mode == "decoupled"

    def cache_elements_per_token(self) -> int:
        """Values one layer caches per token: ``kv_lora_rank + qk_rope_head_dim`` (DeepSeek-V2 Table 1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def with_rank(self, kv_lora_rank: int) -> MLAConfig:
        return dataclasses.replace(self, kv_lora_rank=kv_lora_rank)


@dataclass(frozen=True)
class AttentionConfig:
    """Baseline attention: MHA (``num_kv_heads == num_heads``), GQA, MQA (``num_kv_heads == 1``).

    ``qk_norm``, ``logit_softcap`` and ``sliding_window`` as in :class:`MLAConfig`.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    logit_softcap: float | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        o = "AttentionConfig"
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            _positive(o, name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise _fail(o, "num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise _fail(o, "head_dim", self.head_dim, "RoPE rotates pairs: must be even")
        if not self.rope_theta > 0:
            raise _fail(o, "rope_theta", self.rope_theta, "must be > 0")
        _check_attention_features(o, self.logit_softcap, self.sliding_window)

    @property
    def kind(self) -> AttentionKind:
        if self.num_kv_heads == self.num_heads:
            return "mha"
        return "mqa" if self.num_kv_heads == 1 else "gqa"

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def cache_elements_per_token(self) -> int:
        """``2 * n_kv * d_h`` values per token per layer (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim


LayerAttention: TypeAlias = MLAConfig | AttentionConfig


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM: embeddings, ``num_layers`` x (RMSNorm, attention, RMSNorm, SwiGLU), head.

    ``kv_lora_ranks`` optionally gives each MLA layer its own latent width (converted models
    allocate rank per layer); ``None`` means every layer uses ``attention.kv_lora_rank``.

    Features of converted sources (the defaults are Llama's, so older configs load unchanged):

    * ``mlp_act``: the gate's activation, ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU, Gemma);
    * ``embed_scale``: embeddings are multiplied by it (Gemma: ``sqrt(hidden_size)``);
    * ``post_norms``: an RMSNorm on the attention and MLP outputs before each residual add
      (Gemma 2/3's "sandwich" norms);
    * ``final_logit_softcap``: logits become ``cap * tanh(logits / cap)`` (Gemma 2);
    * ``layer_types`` (``"full"``/``"sliding"`` per layer) with ``sliding_window``: sliding layers
      attend to the last ``sliding_window`` positions only; ``local_rope_theta``: their RoPE base
      (plain RoPE, no scaling; Gemma 3's local layers), ``None`` for the global RoPE.
    """

    vocab_size: int
    num_layers: int
    intermediate_size: int
    attention: LayerAttention
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    kv_lora_ranks: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = ""
    mlp_act: MlpAct = "silu"
    embed_scale: float = 1.0
    post_norms: bool = False
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        o = "ModelConfig"
        for n in ("vocab_size", "num_layers", "intermediate_size", "max_seq_len"):
            _positive(o, n, getattr(self, n))
        if self.max_seq_len > MAX_SEQ_LEN:  # the RoPE tables hold max_seq_len rows, allocated up front
            raise _fail(o, "max_seq_len", self.max_seq_len, f"must be at most {MAX_SEQ_LEN:,} positions")
        if not isinstance(self.attention, (MLAConfig, AttentionConfig)):
            raise _fail(o, "attention", type(self.attention).__name__, "must be MLAConfig or AttentionConfig")
        if self.kv_lora_ranks is not None:
            if not isinstance(self.attention, MLAConfig):
                raise _fail(o, "kv_lora_ranks", self.kv_lora_ranks, "only MLA models have latent ranks")
            object.__setattr__(self, "kv_lora_ranks", tuple(self.kv_lora_ranks))
            if len(self.kv_lora_ranks) != self.num_layers:
                raise _fail(o, "kv_lora_ranks", self.kv_lora_ranks, f"needs one rank per layer ({self.num_layers})")
            for r in self.kv_lora_ranks:
                _positive(o, "kv_lora_ranks[i]", r)
        for n in ("bos_token_id", "eos_token_id"):
            v = getattr(self, n)
            if v is not None and not 0 <= v < self.vocab_size:
                raise _fail(o, n, v, f"must lie in [0, vocab_size={self.vocab_size})")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise _fail(o, "mlp_act", self.mlp_act, "must be 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)")
        if not self.embed_scale > 0:
            raise _fail(o, "embed_scale", self.embed_scale, "must be > 0")
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise _fail(o, "final_logit_softcap", self.final_logit_softcap, "must be > 0 (or None)")
        if self.sliding_window is not None:
            _positive(o, "sliding_window", self.sliding_window)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers or any(t not in ("full", "sliding") for t in self.layer_types):
                raise _fail(
                    o,
                    "layer_types",
                    self.layer_types,
                    f"needs 'full' or 'sliding' for each of {self.num_layers} layers",
                )
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise _fail(o, "sliding_window", None, "sliding layers need a window (positive integer)")
        if self.local_rope_theta is not None and not self.local_rope_theta > 0:
            raise _fail(o, "local_rope_theta", self.local_rope_theta, "must be > 0 (or None: the global RoPE)")

    @property
    def hidden_size(self) -> int:
        return self.attention.hidden_size

    @property
    def attention_kind(self) -> AttentionKind:
        return self.attention.kind

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding"

    def layer_attention(self, layer: int) -> LayerAttention:
        """The attention config of one layer (per-layer latent rank, sliding window and local RoPE applied)."""
        att: LayerAttention = self.attention
        if self.kv_lora_ranks is not None and isinstance(att, MLAConfig):
            att = att.with_rank(self.kv_lora_ranks[layer])
        if self.is_sliding(layer):
            att = dataclasses.replace(att, sliding_window=self.sliding_window)
            if self.local_rope_theta is not None:
                att = dataclasses.replace(att, rope_theta=self.local_rope_theta, rope_scaling=None)
        return att

    def cache_elements_per_token(self) -> int:
        """KV-cache values per token summed over all layers."""
        return sum(self.layer_attention(i).cache_elements_per_token() for i in range(self.num_layers))

    # -- presets and (de)serialisation -------------------------------------------------------

    @staticmethod
    def presets() -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (``ModelConfig.presets()``); keyword overrides replace top-level fields."""
        if name not in _PRESETS:
            raise MlakitError(f"unknown preset {name!r}: choose one of {', '.join(_PRESETS)}")
        cfg = cls.from_dict({**_PRESETS[name], "name": name})
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        att = d["attention"]
        att.pop("kind", None)
        d["attention"] = {"kind": "mla" if isinstance(self.attention, MLAConfig) else "baseline", **att}
        for k in ("kv_lora_ranks", "layer_types"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise MlakitError(f"not a valid mlakit model config: a JSON object is needed, not {type(d).__name__}")
        d = dict(d)
        try:
            att = dict(d.pop("attention"))
            kind = att.pop("kind")
            scaling = att.pop("rope_scaling", None)
            rs = RopeScaling(**scaling) if scaling else None
            attention: LayerAttention = (
                MLAConfig(**att, rope_scaling=rs) if kind == "mla" else AttentionConfig(**att, rope_scaling=rs)
            )
            ranks = d.pop("kv_lora_ranks", None)
            types = d.pop("layer_types", None)
            return cls(
                **d,
                attention=attention,
                kv_lora_ranks=tuple(ranks) if ranks is not None else None,
                layer_types=tuple(types) if types is not None else None,
            )
        except MlakitError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MlakitError(f"not a valid mlakit model config: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model, independent of its weights: the one definition of decode path and cache dtype.

    ``decode_path``: ``'absorbed'`` folds ``W_UK`` into the query and ``W_UV`` after attention and
    never materialises per-head K/V; ``'naive'`` decompresses the cached latent; ``'auto'`` picks
    absorbed where the layer allows it (``rope_mode='decoupled'``). Prefill always uses the
    compute-friendly naive path (materialise K/V for the chunk, fused SDPA).

    ``cache_dtype``: a name from :mod:`mlakit.dtypes` — ``'fp32'``, ``'bf16'``, ``'fp16'``,
    ``'auto'`` (the model's dtype) or ``'int8'`` (per-token scales; only the engine's paged cache
    quantizes). The engine's :class:`~mlakit.engine.EngineConfig` extends this class.
    """

    decode_path: DecodePath = "auto"
    cache_dtype: CacheDType = "fp32"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.decode_path not in DECODE_PATHS:
            raise _fail(owner, "decode_path", self.decode_path, f"must be one of {', '.join(DECODE_PATHS)}")
        if self.cache_dtype not in dtypes.STORAGE_NAMES:
            raise _fail(owner, "cache_dtype", self.cache_dtype, f"must be one of {', '.join(dtypes.STORAGE_NAMES)}")

    def cache_storage(self, model_dtype: torch.dtype) -> torch.dtype | str:
        """What the cache stores for a model computing in ``model_dtype``: a dtype or ``'int8'``."""
        return dtypes.storage(self.cache_dtype, model_dtype)


# -- presets -----------------------------------------------------------------------------------
# Presets are data in the shape of a checkpoint's config (ModelConfig.to_dict), so a preset reads
# like the config.json it stands for. DeepSeek dims as published in their config.json files
# (attention and dense-layer dims; MoE layers are represented by their dense intermediate size,
# which does not affect attention or KV).

_DEEPSEEK_MLA: dict[str, Any] = {
    "kind": "mla",
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 10000.0,
}
_DEEPSEEK_YARN: dict[str, Any] = {"factor": 40.0, "original_max_position_embeddings": 4096}
_DEEPSEEK_V2_YARN = {**_DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
_DEEPSEEK_V2_LM: dict[str, Any] = {
    "vocab_size": 102400,
    "max_seq_len": 163840,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}
_TINY_LM: dict[str, Any] = {"vocab_size": 256, "num_layers": 2, "intermediate_size": 128, "max_seq_len": 256}
_TINY_MLA: dict[str, Any] = {
    "kind": "mla",
    "hidden_size": 64,
    "num_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}
_TINY_BASELINE: dict[str, Any] = {"kind": "baseline", "hidden_size": 64, "num_heads": 4, "head_dim": 16}

_PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v2": {
        **_DEEPSEEK_V2_LM,
        "num_layers": 60,
        "intermediate_size": 12288,
        "attention": {
            **_DEEPSEEK_MLA,
            "hidden_size": 5120,
            "num_heads": 128,
            "q_lora_rank": 1536,
            "rope_scaling": _DEEPSEEK_V2_YARN,
        },
    },
    "deepseek-v2-lite": {
        **_DEEPSEEK_V2_LM,
        "num_layers": 27,
        "intermediate_size": 10944,
        "attention": {
            **_DEEPSEEK_MLA,
            "hidden_size": 2048,
            "num_heads": 16,
            "q_lora_rank": None,
            "rope_scaling": _DEEPSEEK_V2_YARN,
        },
    },
    "deepseek-v3": {
        "vocab_size": 129280,
        "num_layers": 61,
        "intermediate_size": 18432,
        "max_seq_len": 163840,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "attention": {
            **_DEEPSEEK_MLA,
            "hidden_size": 7168,
            "num_heads": 128,
            "q_lora_rank": 1536,
            "rope_scaling": {**_DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        },
    },
    "smollm2-135m": {
        "vocab_size": 49152,
        "num_layers": 30,
        "intermediate_size": 1536,
        "max_seq_len": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention": {
            "kind": "baseline",
            "hidden_size": 576,
            "num_heads": 9,
            "num_kv_heads": 3,
            "head_dim": 64,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
        },
    },
    "tiny-mla": {**_TINY_LM, "attention": {**_TINY_MLA, "q_lora_rank": 48}},
    "tiny-mla-noq": {**_TINY_LM, "attention": {**_TINY_MLA, "q_lora_rank": None}},
    "tiny-mha": {**_TINY_LM, "attention": {**_TINY_BASELINE, "num_kv_heads": 4}},
    "tiny-gqa": {**_TINY_LM, "attention": {**_TINY_BASELINE, "num_kv_heads": 2}},
    "tiny-mqa": {**_TINY_LM, "attention": {**_TINY_BASELINE, "num_kv_heads": 1}},
}


def yarn_mscale(scale: float, m: float) -> float:
    """DeepSeek's YaRN temperature ``0.1 * m * ln(scale) + 1`` (1 when no stretch)."""
    return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0
