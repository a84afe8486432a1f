"""Latent recomputation: same loss and gradients as the plain path, fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch

from mlakit.train.trainer import set_recompute_kv
from tests.conftest import build, tiny_mla_config

CONFIGS = {
    "decoupled": tiny_mla_config(),
    "full_rope": tiny_mla_config(rope_mode="full", qk_rope_head_dim=0, kv_norm=False, q_lora_rank=None),
}


def loss_and_grads(config, recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build(config).train()
    assert set_recompute_kv(model, recompute) == config.num_layers
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(config, recompute: bool) -> int:
    """Bytes autograd keeps for backward (distinct storages), the recomputed region excluded."""
    model = build(config).train()
    set_recompute_kv(model, recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(2, 64, dtype=torch.long)).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_recompute_gradients_equal_plain(name: str) -> None:
    loss_a, grads_a = loss_and_grads(CONFIGS[name], recompute=False)
    loss_b, grads_b = loss_and_grads(CONFIGS[name], recompute=True)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-6, atol=1e-7, msg=n)


def test_recompute_keeps_fewer_bytes() -> None:
    config = CONFIGS["decoupled"]
    assert saved_bytes(config, recompute=True) < saved_bytes(config, recompute=False)


def test_recompute_off_in_eval() -> None:
    config = CONFIGS["decoupled"]
    model = build(config)
    set_recompute_kv(model, True)
    tokens = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        out = model(tokens)
    set_recompute_kv(model, False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), out, rtol=0, atol=0)
