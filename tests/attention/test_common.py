"""``mask_or_causal``: SDPA's causal path exactly when the spelled-out mask is the causal one."""

from __future__ import annotations

import torch

from mlakit.attention.common import attend, mask_or_causal, position_mask


def test_a_prefill_from_position_zero_is_causal_and_equal_to_its_mask() -> None:
    t = 7
    pos = torch.arange(t).unsqueeze(0).expand(2, t)
    mask, causal = mask_or_causal(pos, torch.arange(t))
    assert mask is None and causal
    q, k, v = (torch.randn(2, 3, t, 8) for _ in range(3))
    spelled = attend(q, k, v, position_mask(pos, torch.arange(t)), False, 0.3)
    assert torch.allclose(attend(q, k, v, None, True, 0.3), spelled, atol=1e-6)


def test_anything_else_keeps_the_mask() -> None:
    t = 6
    cases = [
        (torch.arange(4, 4 + t).unsqueeze(0), torch.arange(4 + t)),  # a later chunk over a longer cache
        (torch.stack([torch.arange(t), torch.arange(1, t + 1)]), torch.arange(t)),  # one row shifted
        (torch.arange(t).flip(0).unsqueeze(0), torch.arange(t)),  # same length, other order
        (torch.arange(1).unsqueeze(0), torch.arange(1)),  # one token: no check needed
    ]
    for q_pos, k_pos in cases:
        mask, causal = mask_or_causal(q_pos, k_pos)
        assert not causal and mask is not None and torch.equal(mask, position_mask(q_pos, k_pos)), (q_pos, k_pos)
    pos = torch.arange(t).unsqueeze(0)
    mask, causal = mask_or_causal(pos, torch.arange(t), window=3)  # a sliding window is not causal
    assert not causal and mask is not None and torch.equal(mask, position_mask(pos, torch.arange(t), 3))
