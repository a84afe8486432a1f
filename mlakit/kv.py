"""KV-cache accounting: elements and bytes per token, MLA beside its MHA/GQA/MQA equivalents.

Per token, summed over ``l`` layers (DeepSeek-V2 paper, Table 1; ``n_h`` heads of width ``d_h``,
``n_g`` KV groups, latent ``d_c = kv_lora_rank``, decoupled key ``d_h^R = qk_rope_head_dim``)::

    MHA  2 * n_h * d_h * l        GQA  2 * n_g * d_h * l
    MQA  2 * d_h * l              MLA  (d_c + d_h^R) * l

For an MLA model the equivalents use its own ``n_h`` and ``d_h = qk_nope_head_dim``; for a
baseline model the MLA line uses DeepSeek-V2's proportions (``d_c = 4 d_h``, ``d_h^R = d_h / 2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlakit import dtypes
from mlakit.config import AttentionConfig, MLAConfig, ModelConfig
from mlakit.dtypes import FloatName


@dataclass(frozen=True)
class KVRow:
    """One attention kind's cache for the same model depth and head count."""

    kind: str
    label: str
    elements_per_token_per_layer: float
    elements_per_token: int
    bytes_per_token: int
    total_bytes: int
    ratio_to_mha: float
    tokens_fit: int | None
    sequences_fit: int | None
    is_model: bool


@dataclass(frozen=True)
class KVReport:
    model: str
    num_layers: int
    num_heads: int
    head_dim: int
    seq_len: int
    batch: int
    dtype: str
    bytes_per_element: int
    memory: int | None
    rows: tuple[KVRow, ...]

    def row(self, kind: str) -> KVRow:
        return next(r for r in self.rows if r.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_groups(num_heads: int) -> int:
    # a common GQA setting: 8 groups when the head count allows, else the largest divisor below heads
    for g in (8, 4, 2):
        if num_heads % g == 0 and g < num_heads:
            return g
    return 1


def kv_report(
    config: ModelConfig,
    seq_len: int = 4096,
    batch: int = 1,
    dtype: FloatName = "bf16",
    memory: int | None = None,
    gqa_groups: int | None = None,
) -> KVReport:
    """Cache size of ``config`` and its equivalents for ``batch`` sequences of ``seq_len`` tokens.

    ``memory`` (bytes) adds how many tokens, and sequences of ``seq_len``, fit in it.
    Raises: ValueError for non-positive sizes or a ``gqa_groups`` that does not divide the heads.
    """
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if v <= 0:
            raise ValueError(f"{name}={v} is invalid: must be a positive integer")
    width = dtypes.float_dtype(dtype, "cache dtype").itemsize
    att = config.attention
    layers = config.num_layers
    n_h = att.num_heads
    if isinstance(att, MLAConfig):
        d_h = att.qk_nope_head_dim
        mla_elems = config.cache_elements_per_token()
        mla_label = (
            f"MLA (d_c={att.kv_lora_rank}, d_R={att.qk_rope_head_dim})"
            if config.kv_lora_ranks is None
            else f"MLA (d_c {min(config.kv_lora_ranks)}-{max(config.kv_lora_ranks)}, d_R={att.qk_rope_head_dim})"
        )
        own = "mla"
    else:
        assert isinstance(att, AttentionConfig)
        d_h = att.head_dim
        mla_elems = (4 * d_h + d_h // 2) * layers
        mla_label = f"MLA (DeepSeek-V2 proportions: d_c={4 * d_h}, d_R={d_h // 2})"
        own = att.kind
    g = (
        gqa_groups
        if gqa_groups is not None
        else (att.num_kv_heads if isinstance(att, AttentionConfig) and att.kind == "gqa" else _default_groups(n_h))
    )
    if g <= 0 or n_h % g:
        raise ValueError(f"gqa_groups={g} is invalid: must divide num_heads={n_h}")
    per_layer = {
        "mha": (2 * n_h * d_h, f"MHA (n_h={n_h}, d_h={d_h})"),
        "gqa": (2 * g * d_h, f"GQA (n_g={g}, d_h={d_h})"),
        "mqa": (2 * d_h, f"MQA (d_h={d_h})"),
    }
    mha_elems = per_layer["mha"][0] * layers
    rows = []
    for kind, elems, label in (
        ("mla", mla_elems, mla_label),
        *((k, e * layers, lab) for k, (e, lab) in per_layer.items()),
    ):
        bpt = elems * width
        total = bpt * seq_len * batch
        rows.append(
            KVRow(
                kind=kind,
                label=label,
                elements_per_token_per_layer=elems / layers,
                elements_per_token=elems,
                bytes_per_token=bpt,
                total_bytes=total,
                ratio_to_mha=mha_elems / elems,
                tokens_fit=None if memory is None else memory // bpt,
                sequences_fit=None if memory is None else memory // (bpt * seq_len),
                is_model=(kind == own),
            )
        )
    return KVReport(
        model=config.name or "custom",
        num_layers=layers,
        num_heads=n_h,
        head_dim=d_h,
        seq_len=seq_len,
        batch=batch,
        dtype=str(dtype),
        bytes_per_element=width,
        memory=memory,
        rows=tuple(rows),
    )
