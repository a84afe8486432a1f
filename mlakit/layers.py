"""Small building blocks shared by attention and the decoder: RMSNorm and the gated MLP (SwiGLU/GeGLU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 and cast back (as Llama and DeepSeek do)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op for the normalisation (the same maths as x * rsqrt(mean(x^2) + eps), in fp32)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the concatenation of ``linears``' outputs (same input).

    For inference: one matrix product instead of several reads the input once and pays the
    per-call cost once (vLLM's merged projections). A missing bias counts as zeros.
    """
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=any(lin.bias is not None for lin in linears))
    fused.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if fused.bias is not None:
            fused.bias.copy_(
                torch.cat(
                    [lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features) for lin in linears]
                )
            )
    return fused


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class SwiGLU(nn.Module):
    """``w_down(act(w_gate x) * w_up x)``: SwiGLU with ``act='silu'``, GeGLU with ``'gelu_tanh'`` (Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.act = _ACTIVATIONS[act]
        self.w_gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w_gate_up: nn.Module | None = None  # set by fuse_input_projections (inference)

    def fuse_input_projections(self) -> None:
        """Inference: ``w_gate`` and ``w_up`` as one product (the originals are dropped)."""
        self.w_gate_up = fuse_linears([self.w_gate, self.w_up])
        del self.w_gate, self.w_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(self.act(gate) * up)
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))
