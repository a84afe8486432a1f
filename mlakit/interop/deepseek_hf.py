"""mlakit <-> the DeepSeek-V2/V3 Hugging Face checkpoint layout (what transformers, vLLM and SGLang load).

One import point for the four modules that do the work:

* :mod:`mlakit.interop.deepseek_map`: the tensor-name mapping :data:`MAPPING` and the RoPE row order;
* :mod:`mlakit.interop.deepseek_plan`: export planning and its maths (what the format cannot say and
  how export writes it anyway: per-layer ranks, linear latents, biases, padding);
* :mod:`mlakit.interop.deepseek_export`: writing the checkpoint (:func:`export_hf`);
* :mod:`mlakit.interop.deepseek_import`: reading one back (:func:`load_hf`, :func:`import_hf`).
"""

from __future__ import annotations

from mlakit.interop.deepseek_export import DEFAULT_MAX_SHARD_SIZE, ExportReport, export_hf, hf_config
from mlakit.interop.deepseek_import import (
    import_hf,
    is_hf_checkpoint,
    load_hf,
    load_pretrained,
    model_config_from_hf,
    read_hf_config,
)
from mlakit.interop.deepseek_map import (
    GENERATION_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    MAPPING,
    MODEL_TYPES,
    TOKENIZER_PATTERNS,
    DTypeName,
    Mapping,
)
from mlakit.interop.deepseek_plan import (
    HF_LATENT_NORM_EPS,
    LINEAR_LATENT_TARGET,
    ExportPlan,
    LayerLatent,
    inexpressible_features,
    measure_latent_error,
    plan_export,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "GENERATION_CONFIG",
    "HF_INDEX",
    "HF_LATENT_NORM_EPS",
    "HF_WEIGHTS",
    "LINEAR_LATENT_TARGET",
    "MAPPING",
    "MODEL_TYPES",
    "TOKENIZER_PATTERNS",
    "DTypeName",
    "ExportPlan",
    "ExportReport",
    "LayerLatent",
    "Mapping",
    "export_hf",
    "hf_config",
    "import_hf",
    "inexpressible_features",
    "is_hf_checkpoint",
    "load_hf",
    "load_pretrained",
    "measure_latent_error",
    "model_config_from_hf",
    "plan_export",
    "read_hf_config",
]
