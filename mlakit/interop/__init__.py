"""Interoperability with other checkpoint formats: the DeepSeek-V2/V3 Hugging Face layout.

``export_hf`` writes what transformers, vLLM and SGLang load; ``load_hf``/``import_hf`` read it
back; ``load_pretrained`` opens either an mlakit or a DeepSeek Hugging Face directory.
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

__all__ = [
    "MAPPING",
    "ExportPlan",
    "ExportReport",
    "Mapping",
    "export_hf",
    "hf_config",
    "import_hf",
    "is_hf_checkpoint",
    "load_hf",
    "load_pretrained",
    "measure_latent_error",
    "model_config_from_hf",
    "plan_export",
]
