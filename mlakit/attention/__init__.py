"""Attention kinds: MLA (naive and absorbed) and the MHA/GQA/MQA baselines."""

from mlakit.attention.common import RotaryEmbedding, position_mask
from mlakit.attention.mha import GroupedQueryAttention
from mlakit.attention.mla import AttentionPath, MultiHeadLatentAttention

__all__ = ["AttentionPath", "GroupedQueryAttention", "MultiHeadLatentAttention", "RotaryEmbedding", "position_mask"]
