"""Small model sizes for training from scratch on a CPU, in each attention kind.

A size fixes the trunk (width, depth, heads, head width ``d_h``, MLP width); the attention kind
then fills in the attention config:

* ``mha``: ``num_kv_heads = H``; ``gqa``: ``num_kv_heads`` (default ``H / 2``); ``mqa``: 1;
* ``mla``: DeepSeek-V2's proportions, ``qk_nope_head_dim = v_head_dim = d_h``,
  ``qk_rope_head_dim = d_h / 2``, ``kv_lora_rank`` (default ``4 d_h``), no query compression.

These live here rather than in :mod:`mlakit.config`'s preset table because they are training
recipes (vocabulary and context come from the data), not published model shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlakit.config import AttentionConfig, AttentionKind, LayerAttention, MLAConfig, ModelConfig


@dataclass(frozen=True)
class TrainSize:
    """The trunk of a model; see the module docstring."""

    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainSize.{name}={v!r} is invalid: must be a positive integer")
        if self.head_dim % 4:
            raise ValueError(f"TrainSize.head_dim={self.head_dim} is invalid: must be a multiple of 4 (RoPE halves)")


#: name -> trunk. Parameter counts are for a 256-token (byte) vocabulary with MHA.
TRAIN_SIZES: dict[str, TrainSize] = {
    "tiny": TrainSize(hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128),  # ~0.1M
    "1m": TrainSize(hidden_size=128, num_layers=4, num_heads=4, head_dim=32, intermediate_size=352),  # ~0.85M
    "3m": TrainSize(hidden_size=256, num_layers=4, num_heads=4, head_dim=64, intermediate_size=704),  # ~3.3M
    "10m": TrainSize(hidden_size=384, num_layers=6, num_heads=6, head_dim=64, intermediate_size=1024),  # ~10.7M
}


def training_config(
    size: str,
    attention: AttentionKind,
    *,
    vocab_size: int,
    max_seq_len: int,
    kv_lora_rank: int | None = None,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool = False,
) -> ModelConfig:
    """A :class:`ModelConfig` of trunk ``size`` with ``attention`` (``mla``, ``mha``, ``gqa``, ``mqa``).

    Raises:
        ValueError: unknown size or kind, or an option that does not apply to the kind.
    """
    if size not in TRAIN_SIZES:
        raise ValueError(f"unknown training size {size!r}: choose one of {', '.join(TRAIN_SIZES)}")
    s = TRAIN_SIZES[size]
    if kv_lora_rank is not None and attention != "mla":
        raise ValueError(f"kv_lora_rank={kv_lora_rank} applies to attention='mla' only (got {attention!r})")
    if num_kv_heads is not None and attention != "gqa":
        raise ValueError(f"num_kv_heads={num_kv_heads} applies to attention='gqa' only (got {attention!r})")
    att: LayerAttention
    if attention == "mla":
        att = MLAConfig(
            hidden_size=s.hidden_size,
            num_heads=s.num_heads,
            kv_lora_rank=kv_lora_rank if kv_lora_rank is not None else 4 * s.head_dim,
            qk_nope_head_dim=s.head_dim,
            qk_rope_head_dim=s.head_dim // 2,
            v_head_dim=s.head_dim,
        )
    elif attention in ("mha", "gqa", "mqa"):
        kv = {"mha": s.num_heads, "mqa": 1, "gqa": num_kv_heads or max(1, s.num_heads // 2)}[attention]
        att = AttentionConfig(hidden_size=s.hidden_size, num_heads=s.num_heads, num_kv_heads=kv, head_dim=s.head_dim)
    else:
        raise ValueError(f"unknown attention kind {attention!r}: choose mla, mha, gqa or mqa")
    return ModelConfig(
        vocab_size=vocab_size,
        num_layers=s.num_layers,
        intermediate_size=s.intermediate_size,
        attention=att,
        max_seq_len=max_seq_len,
        tie_word_embeddings=tie_word_embeddings,
        name=f"train-{size}-{attention}" + (f"-r{att.kv_lora_rank}" if isinstance(att, MLAConfig) else ""),
    )
