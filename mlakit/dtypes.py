"""The one table of dtype names: what configs and flags say (``fp32``...) -> torch dtypes and widths.

=========  ==================  ============  =====================================================
name       torch               bytes/value   used for
=========  ==================  ============  =====================================================
``fp32``   ``torch.float32``   4             weights, caches, export
``bf16``   ``torch.bfloat16``  2             weights, caches, export
``fp16``   ``torch.float16``   2             caches, export
``int8``   (quantized)         1 (+ scales)  the engine's paged cache, weight-only int8 linears
``auto``   —                   —             "what the model computes in", resolved by the caller
=========  ==================  ============  =====================================================

Each consumer states which names it takes (a contiguous cache cannot hold ``int8``; an export
cannot be ``auto``); the names and their meaning live only here.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

from mlakit.errors import MlakitError

FloatName: TypeAlias = Literal["fp32", "bf16", "fp16"]
StorageName: TypeAlias = Literal["auto", "fp32", "bf16", "fp16", "int8"]

FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT8 = "int8"
AUTO = "auto"
STORAGE_NAMES: tuple[str, ...] = (AUTO, *FLOAT_DTYPES, INT8)


def float_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``'fp32' | 'bf16' | 'fp16'`` (or one of those torch dtypes) -> ``torch.dtype``.

    Raises: MlakitError naming ``what`` and the choices.
    """
    if isinstance(name, torch.dtype):
        if name not in FLOAT_DTYPES.values():
            raise MlakitError(f"{what} {name} is not supported: use one of {', '.join(FLOAT_DTYPES)}")
        return name
    if name not in FLOAT_DTYPES:
        raise MlakitError(f"{what} {name!r} is not supported: use one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def float_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bf16'`` (MlakitError for a dtype not in the table)."""
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise MlakitError(f"dtype {dtype} is not supported: use one of {', '.join(FLOAT_DTYPES)}")


def hf_name(dtype: torch.dtype) -> str:
    """The name Hugging Face configs use (``torch_dtype``/``dtype``): ``torch.bfloat16`` -> ``'bfloat16'``."""
    float_name(dtype)  # only table dtypes are ever written
    return str(dtype).removeprefix("torch.")


def storage(name: str, model_dtype: torch.dtype) -> torch.dtype | str:
    """What a cache named ``name`` stores for a model computing in ``model_dtype``: a dtype or ``'int8'``."""
    if name == AUTO:
        return model_dtype
    if name == INT8:
        return INT8
    return float_dtype(name, "cache dtype")


def bytes_per_value(name: str) -> int:
    """Bytes one stored value takes (``int8``: 1, its per-row scale not counted)."""
    return 1 if name == INT8 else float_dtype(name).itemsize
