"""Interoperability with other checkpoint formats: the DeepSeek-V2/V3 Hugging Face layout.

``export_hf`` writes what transformers, vLLM and SGLang load; ``load_hf``/``import_hf`` read it
back; ``load_pretrained`` opens either an mlakit or a DeepSeek Hugging Face directory.
``ENGINES`` is the one table of what each serving engine loads; ``export_hf(pad_to=576)`` widens
a converted model's cache exactly to what they take.
"""

from mlakit.interop.deepseek_hf import (
    MAPPING,
    ExportPlan,
    ExportReport,
    Mapping,
    export_hf,
    hf_config,
    import_hf,
    is_hf_checkpoint,
    load_hf,
    load_pretrained,
    measure_latent_error,
    model_config_from_hf,
    plan_export,
)
from mlakit.interop.engines import ENGINES, TARGETS, CacheShape, Engine, check_targets, fits
from mlakit.interop.pad import Padding, plan_padding

__all__ = [
    "ENGINES",
    "MAPPING",
    "TARGETS",
    "CacheShape",
    "Engine",
    "ExportPlan",
    "ExportReport",
    "Mapping",
    "Padding",
    "check_targets",
    "export_hf",
    "fits",
    "hf_config",
    "import_hf",
    "is_hf_checkpoint",
    "load_hf",
    "load_pretrained",
    "measure_latent_error",
    "model_config_from_hf",
    "plan_export",
    "plan_padding",
]
