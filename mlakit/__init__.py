"""mlakit: Multi-head Latent Attention (DeepSeek-V2/V3) layers, caches, models, conversion and tools."""

from mlakit.attention import GroupedQueryAttention, MultiHeadLatentAttention
from mlakit.cache import KVCache, LatentCache, ModelCache
from mlakit.config import AttentionConfig, MLAConfig, ModelConfig, RopeScaling, RuntimeConfig
from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig, generate, stream
from mlakit.kv import kv_report
from mlakit.model import Transformer

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "GroupedQueryAttention",
    "KVCache",
    "LatentCache",
    "MLAConfig",
    "MlakitError",
    "ModelCache",
    "ModelConfig",
    "MultiHeadLatentAttention",
    "RopeScaling",
    "RuntimeConfig",
    "SamplingConfig",
    "Transformer",
    "generate",
    "kv_report",
    "stream",
]
