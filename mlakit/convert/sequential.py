"""Sequential conversion: each layer fitted on the inputs the converted layers before it produce.

For layer ``l``, with ``x_o`` its original input and ``x_c`` the converted model's on the same
tokens, keys and values use ``W T`` where ``T`` regresses ``x_o`` on ``x_c``
(:func:`sequential_correction`), and the PCA runs under the converted inputs' moments: reduced-
rank regression of the original layer's ``W x_o`` on what it will really get
(docs/conversion.md "Sequential conversion"). :class:`SequentialRun` carries the converted
model's hidden states through the layers as they are made.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mlakit.convert.arch import Getter, SourceSpec, block_weights
from mlakit.convert.factorize import AttentionWeights, single_thread
from mlakit.convert.source import OriginalLayers, run_block
from mlakit.model import Transformer

if TYPE_CHECKING:
    from mlakit.convert.convert import ConversionPlan


def sequential_correction(
    x_orig: torch.Tensor, x_conv: torch.Tensor, *, damp: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The map that best recovers the original attention input from the converted model's.

    Args:
        x_orig, x_conv: ``[N, n]`` attention inputs of layer ``l`` on the same tokens, in the
            original model and in the model whose layers ``0..l-1`` are converted.
        damp: ridge strength relative to the mean input energy; the ridge pulls ``T`` towards the
            identity (no correction), so identical inputs give exactly ``T = I``. SmolLM2, full
            RoPE, 25% cache: 1e-4 -> x1.615, 1e-2 -> x1.602, 1e-1 -> x1.654.

    Returns:
        ``(T_aug, sigma_conv)``: ``T_aug [n+1, n+1]`` with ``T = (E[x_o x_c^T] + lam I)
        (E[x_c x_c^T] + lam I)^{-1}`` in the top-left block and 1 for the bias column (no affine
        part, so a bias-free source stays bias-free), and ``sigma_conv = E[x~_c x~_c^T]``.

    With ``W' = W T_aug`` for the keys and values, PCA of ``W' x~_c`` under ``sigma_conv``
    is reduced-rank regression of the original ``W x_o`` on ``x_c``: the latent learns to undo
    what upstream compression did to its inputs.
    """
    num, n = x_conv.shape
    xa = torch.cat([x_conv.double(), torch.ones(num, 1, dtype=torch.float64)], dim=1)  # [N, n+1]
    sigma_conv = xa.T @ xa / num  # its top-left block is E[x_c x_c^T]: one product serves both
    s_cc = sigma_conv[:n, :n]
    s_oc = x_orig.double().T @ xa[:, :n] / num
    lam = damp * float(s_cc.diagonal().mean())
    eye = torch.eye(n, dtype=torch.float64)
    with single_thread():
        t = torch.linalg.solve(s_cc + lam * eye, s_oc.T + lam * eye).T  # (s_oc + lam) (s_cc + lam)^-1
    t_aug = torch.eye(n + 1, dtype=torch.float64)
    t_aug[:n, :n] = t
    return t_aug, sigma_conv


class SequentialRun:
    """Runs the calibration windows through the model as it is being converted, layer by layer.

    Args:
        windows: ``[N, T]`` token ids (the first ``sequential_windows`` calibration windows).
        device: where the converted blocks run.
    """

    def __init__(
        self,
        spec: SourceSpec,
        get: Getter,
        plan: ConversionPlan,
        windows: torch.Tensor,
        device: str | torch.device = "cpu",
    ) -> None:
        self.spec, self.get, self.config = spec, get, plan.model
        self.tokens = windows.numel()
        with torch.device("meta"):
            longest = max(self.config.max_seq_len, windows.shape[1])
            shell = Transformer(dataclasses.replace(self.config, max_seq_len=longest))
        shell.reset_rope_tables(device)
        self.device = torch.device(device)
        self.rotary = {i: shell.rotary_of(i) for i in range(self.config.num_layers)}  # the converted model's own tables
        self.hidden = OriginalLayers(spec, get, windows.shape[1], device).embed(windows)  # [N, T, n]

    def layer_inputs(self, i: int, w: AttentionWeights, x_orig: torch.Tensor) -> tuple[AttentionWeights, torch.Tensor]:
        """Layer ``i``'s weights ``w`` regressed from the original inputs ``x_orig [N*T, n]`` onto
        the converted model's, and the second moment of the converted inputs."""
        from mlakit.layers import RMSNorm

        norm = RMSNorm(self.spec.hidden_size, self.spec.rms_norm_eps).to(self.device)
        norm.weight.data = block_weights(self.spec, self.get, i)["attn_norm.weight"].to(self.device, torch.float32)
        with torch.no_grad():
            x_conv = norm(self.hidden).reshape(-1, self.hidden.shape[-1]).cpu()
        t, sigma = sequential_correction(x_orig.cpu(), x_conv)
        # queries keep the original weights: also regressing them measured worse (docs/conversion.md)
        return dataclasses.replace(w, w_k=w.w_k @ t, w_v=w.w_v @ t), sigma

    def advance(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Run the converted layer ``i`` (its block state) over the hidden states."""
        from mlakit.model import Block

        with torch.device("meta"):
            block = Block(self.config, i, self.rotary[i])
        block.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True, assign=True)
        self.hidden = run_block(block.eval(), self.hidden)
