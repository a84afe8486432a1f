"""Inference weight formats: fp32, bf16 and weight-only int8, and ``auto`` chosen from the CPU.

Decode at small batch reads every weight once per token, so its speed is the weights' bytes
over memory bandwidth: bf16 halves them, int8 quarters them. Weight-only int8 keeps activations
in a float dtype and stores each linear layer's weight as::

    W ~= W_q * s        W_q int8 [out, in],  s [out] = max_j |W[o, j]| / 127  (per output channel)
    y  = (x W_q^T) * s + b

For decode (up to 16 rows) on CPUs with AVX512-VNNI, :class:`Int8Linear` uses mlakit's own
kernel (``int8_gemv`` in :mod:`mlakit.native`): it quantizes the activations to int8 in blocks of
64 (as llama.cpp does for its integer dot products) and multiplies bytes by bytes, 64 per
instruction. Elsewhere it uses PyTorch's int8 matrix-vector kernel (``torch._weight_int8pack_mm``,
activations in float) for up to :data:`INT8_GEMV_ROWS` rows. For more rows (prefill) it
dequantizes to the activation dtype and runs a float GEMM, where the product, not the weight
read, dominates.

``w_uk`` and ``w_uv`` stay in the float dtype: the absorbed decode uses them as matrices.

``auto`` (see :func:`resolve_weight_format`): bf16 activations need bf16 arithmetic in the CPU
(``avx512_bf16`` or AMX) to be fast; with it, int8 weights and bf16 activations; without it,
fp32 (bf16 would be converted element by element, slower than fp32). CUDA: bf16.
"""

from __future__ import annotations

import logging
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from mlakit import dtypes
from mlakit.errors import MlakitError
from mlakit.native import INT8_GEMV_MAX_ROWS, NativeKernels, cpu_flags, load_native

logger = logging.getLogger(__name__)

WeightFormat: TypeAlias = Literal["auto", "fp32", "bf16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")
INT8_GEMV_ROWS = 24  # measured crossover: at more rows dequantizing and a bf16 GEMM is faster
KEEP_FLOAT = ("w_uk", "w_uv")  # used as matrices by the absorbed decode


def has_bf16_arithmetic(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_weight_format(
    name: str, device: torch.device | str = "cpu", flags: frozenset[str] | None = None
) -> tuple[str, torch.dtype]:
    """``(weight format, activation dtype)`` for ``name`` on ``device``; ``auto`` as the module docstring says.

    Raises: MlakitError for an unknown name.
    """
    if name not in WEIGHT_FORMATS:
        raise MlakitError(f"unknown weight dtype {name!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    kind = torch.device(device).type
    if name == "auto":
        if kind != "cpu":
            name = "bf16"
        else:
            name = "int8" if has_bf16_arithmetic(flags) else "fp32"
    if name != dtypes.INT8:
        return name, dtypes.float_dtype(name)
    # int8: activations in bf16 where the CPU has bf16 arithmetic (or on a GPU), else fp32
    return name, torch.bfloat16 if kind != "cpu" or has_bf16_arithmetic(flags) else torch.float32


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and one scale per output channel (see the module docstring).

    Buffers: the weight, either ``weight [out, in]`` int8 (PyTorch's kernels) or, with ``native``
    kernels on a CPU with AVX512-VNNI, ``weight_u8`` (int8 + 128 in the tiles ``int8_gemv`` reads,
    :func:`pack_int8_tiles`; the other is then None); ``scale [out]``; ``bias [out]`` or None.
    """

    weight: torch.Tensor | None
    weight_u8: torch.Tensor | None
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, native: NativeKernels | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.native = native if native is not None and native.has_int8_gemv else None
        if self.native is not None:
            kp = -(-self.in_features // 64) * 64
            self.register_buffer("weight", None)
            self.register_buffer("weight_u8", pack_int8_tiles(weight, kp))
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("weight_u8", None)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        # fp32 copies for the native kernel, kept outside the buffers so that casting the model to the
        # activation dtype leaves them alone (the kernel is CPU-only, so they never move device)
        self._scale_f32 = scale.float()
        self._bias_f32 = None if bias is None else bias.float()

    @classmethod
    def from_linear(cls, linear: nn.Linear, native: NativeKernels | None = None) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        q = (w / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.to(linear.weight.dtype), bias, native)

    def int8_weight(self) -> torch.Tensor:
        """``W_q``, ``[out, in]`` int8 (unpacked from ``weight_u8`` when that is the stored form)."""
        if self.weight is not None:
            return self.weight
        assert self.weight_u8 is not None
        t, nb = self.weight_u8.shape[:2]
        rows = self.weight_u8.permute(0, 2, 1, 3).reshape(t * 16, nb * 64)  # [16 * tiles, Kp]
        return (rows[: self.out_features, : self.in_features] ^ 128).view(torch.int8)  # (w + 128) ^ 0x80 == w as a byte

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """``W_q * s`` in ``dtype``, ``[out, in]``."""
        return (self.int8_weight().to(dtype) * self.scale.to(dtype).unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, in]
        m = x2.shape[0]
        if self.native is not None and m <= INT8_GEMV_MAX_ROWS and x2.device.type == "cpu":
            assert self.weight_u8 is not None
            y = self.native.int8_gemv(
                x2, self.weight_u8, self._scale_f32, self._bias_f32, self.in_features, self.out_features
            )
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.weight is not None and m <= INT8_GEMV_ROWS and x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(x2.dtype))  # [M, out]
        else:
            y = F.linear(x2, self.dequantized(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "VNNI kernel" if self.native is not None else "torch kernels"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kind}"


def pack_int8_tiles(weight: torch.Tensor, kp: int) -> torch.Tensor:
    """int8 ``weight [N, K]`` as ``int8_gemv``'s uint8 tiles ``[ceil(N / 16), kp / 64, 16, 64]``.

    Each value is stored + 128 (VPDPBUSD multiplies unsigned by signed bytes); columns ``K .. kp - 1``
    and the rows past ``N`` in the last tile hold 128 (a zero weight). Tile ``t``, block ``b``
    holds bytes ``64 b .. 64 b + 63`` of rows ``16 t .. 16 t + 15`` one after another, so the
    kernel reads each tile as one sequential stream.
    """
    n, k = weight.shape
    tiles = -(-n // 16)
    rows = torch.full((tiles * 16, kp), 128, dtype=torch.uint8)
    rows[:n, :k] = (weight.to(torch.int16) + 128).to(torch.uint8)
    return rows.view(tiles, 16, kp // 64, 64).permute(0, 2, 1, 3).contiguous()  # [N/16, Kp/64, 16, 64]


def prepare_weights(model: nn.Module, weights: str = "fp32", device: torch.device | str = "cpu") -> str:
    """Put ``model``'s weights in format ``weights`` (in place, for inference); returns the format used.

    Projections of the same input are fused into one product first (attention's q / latent / rope
    key or q/k/v, the MLP's gate and up). ``int8`` then replaces every ``nn.Linear`` but
    ``w_uk``/``w_uv`` with :class:`Int8Linear`
    (scales computed from the weights as loaded) and casts the rest to the activation dtype.
    A model so prepared is for running, not for saving or training.

    Raises: MlakitError for an unknown format.
    """
    name, act = resolve_weight_format(weights, device)
    for module in list(model.modules()):
        fuse = getattr(module, "fuse_input_projections", None)
        if fuse is not None:
            fuse()  # products of the same input as one (q/latent/rope key; gate/up)
    if name == "int8":
        targets = [
            (parent, child_name, child)
            for parent in model.modules()
            for child_name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child_name not in KEEP_FLOAT
        ]
        native = load_native() if torch.device(device).type == "cpu" else None
        for parent, child_name, child in targets:
            setattr(parent, child_name, Int8Linear.from_linear(child, native))
    model.to(act)
    for module in model.modules():
        prepare = getattr(module, "prepare_absorbed", None)
        if prepare is not None:
            prepare(torch.float32)  # MLA: W_UK / W_UV laid out once for the absorbed decode
    logger.info("weights: %s (activations %s)", name, str(act).removeprefix("torch."))
    return name
