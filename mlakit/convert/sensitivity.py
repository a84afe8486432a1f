"""Rank allocation by measured sensitivity: what each layer's compression costs the whole model.

For every layer ``l`` and every rank ``r`` of a small grid, layer ``l`` alone is converted at rank
``r`` and the rest of the model stays original; the cost is the KL divergence of the model's next-
token distribution from the original's, per token, on a few calibration windows.
:func:`~mlakit.convert.ranks.sensitivity_ranks` then spreads the budget where it lowers that most.

Each cell runs layers ``l .. L-1`` only (the layers before ``l`` are unchanged, so their output is
the original's, computed once): ``sum_l (L - l) * |grid|`` block forwards in all, 1-2 minutes for
SmolLM2-135M (30 layers, 3 ranks, 2 x 512 tokens) on 2 cores. It needs every layer at once, so it
is measured on the in-memory path only (:func:`~mlakit.convert.convert.calibrate`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mlakit.convert.source import OriginalLayers, run_block
from mlakit.errors import MlakitError

if TYPE_CHECKING:
    from mlakit.convert.convert import Calibrated
    from mlakit.convert.options import ConversionConfig


def rank_grid(total: int, num_layers: int, max_rank: int) -> tuple[int, ...]:
    """The ranks measured per layer: half, once and twice the uniform share (within ``[1, max_rank]``)."""
    base = total // num_layers
    return tuple(sorted({max(1, base // 2), base, min(max_rank, 2 * base)}))


@torch.no_grad()
def layer_sensitivity(
    cal: Calibrated, config: ConversionConfig, grid: tuple[int, ...], *, num_windows: int = 2, progress: bool = False
) -> torch.Tensor:
    """``[L, len(grid)]`` float64: KL(original || model) per token when layer ``l`` alone is
    converted at rank ``grid[j]`` (the others original), on the first ``num_windows`` calibration windows.

    Raises:
        MlakitError: no calibration windows kept.
    """
    from tqdm.auto import tqdm

    from mlakit.convert.convert import convert_block, has_qkv_bias, plan_conversion
    from mlakit.model import Block, Transformer

    if cal.windows is None:
        raise MlakitError("sensitivity allocation needs the calibration windows: calibrate() keeps them")
    spec, get = cal.spec, cal.get
    windows = cal.windows[:num_windows]
    original = OriginalLayers(spec, get, windows.shape[1], source=str(cal.loaded.source))
    blocks = [original.block(i) for i in range(spec.num_layers)]
    hidden_in = [original.embed(windows)]  # [N, T, n] at the input of every layer
    for blk in blocks[:-1]:
        hidden_in.append(run_block(blk, hidden_in[-1]))
    ref = torch.log_softmax(original.logits(run_block(blocks[-1], hidden_in[-1])).double(), -1)  # [N, T, V]
    p_ref = ref.exp()
    has_bias = has_qkv_bias(spec, get)
    out = torch.zeros(spec.num_layers, len(grid), dtype=torch.float64)
    cells = [(i, j) for i in range(spec.num_layers) for j in range(len(grid))]
    for i, j in tqdm(cells, desc="sensitivity", disable=not progress, leave=False):
        plan = plan_conversion(spec, config, (grid[j],) * spec.num_layers, has_bias, str(cal.loaded.source))
        plan = dataclasses.replace(plan, sequential=False)
        with torch.device("meta"):
            shell = Transformer(dataclasses.replace(plan.model, max_seq_len=windows.shape[1]))
            block = Block(plan.model, i, shell.rotary_of(i))
        shell.reset_rope_tables("cpu")
        block.load_state_dict(convert_block(spec, get, plan, i, cal.weights[i], cal.sigma[i]), assign=True)
        x = run_block(block.eval(), hidden_in[i])
        for blk in blocks[i + 1 :]:
            x = run_block(blk, x)
        logp = torch.log_softmax(original.logits(x).double(), -1)
        out[i, j] = float((p_ref * (ref - logp)).sum(-1).mean())
    return out
