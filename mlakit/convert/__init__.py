"""Convert Llama-family (MHA/GQA) models into MLA, training-free; see docs/conversion.md."""

from mlakit.convert.convert import (
    Calibrated,
    ConversionResult,
    calibrate,
    convert,
    convert_calibrated,
    save_converted,
)
from mlakit.convert.heal import HealConfig, HealResult, heal, heal_checkpoint
from mlakit.convert.load import SUPPORTED_MODEL_TYPES, LoadedModel, load_hf_model
from mlakit.convert.options import ConversionConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Calibrated",
    "ConversionConfig",
    "ConversionResult",
    "HealConfig",
    "HealResult",
    "LoadedModel",
    "calibrate",
    "convert",
    "convert_calibrated",
    "heal",
    "heal_checkpoint",
    "load_hf_model",
    "save_converted",
]
