"""Calibration statistics beyond the input moments (study options).

The input moments ``sigma_l = E[x~ x~^T]`` that every conversion needs are measured layer by layer
in :mod:`mlakit.convert.source` (:func:`~mlakit.convert.source.attention_input_moments`).
:func:`attention_rotation_moments` measures, per head and RoPE pair, the attention-weighted mean
rotation ``E[cos(w_f (t - s))]``, ``E[sin(w_f (t - s))]`` between a query at ``t`` and the keys
at ``s`` it attends to: the best position-free stand-in for a rotation that the decoupled form
has to drop (see :mod:`mlakit.convert.rope`).
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def attention_rotation_moments(
    hf_model: Any, windows: torch.Tensor, rope_theta: float, *, batch_size: int = 2, progress: bool = False
) -> list[torch.Tensor]:
    """Per layer ``[H, d/2, 2]`` float64: attention-weighted ``(E cos, E sin)`` of ``w_f * (t - s)``.

    Attention probabilities are recomputed from the layer's own projections and the rotary
    tables the model passes in (eager softmax, causal), averaged over every query position.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = hf_model.config
    layers = hf_model.model.layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    t_len = windows.shape[1]
    hist = [torch.zeros(heads, t_len, dtype=torch.float64) for _ in layers]  # attention mass per distance
    dist = torch.arange(t_len)[:, None] - torch.arange(t_len)[None, :]  # [T, S]
    causal = dist >= 0

    def make_hook(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            b, t, _ = x.shape
            q = module.q_proj(x).view(b, t, heads, d).transpose(1, 2)  # [B, H, T, d]
            k = module.k_proj(x).view(b, t, kv_heads, d).transpose(1, 2)  # [B, G, T, d]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(heads // kv_heads, dim=1)  # [B, H, T, d]
            scores = (q @ k.transpose(-1, -2)) * module.scaling  # [B, H, T, T]
            p = scores.masked_fill(~causal[:t, :t], float("-inf")).softmax(-1).double()
            p = p.masked_fill(~causal[:t, :t], 0.0).sum(0).reshape(heads, -1)  # [H, T*T]
            sub_idx = dist[:t, :t].clamp_min(0).flatten()
            hist[i][:, :t].index_add_(1, sub_idx, p)

        return hook

    _run_hooked(hf_model, layers, make_hook, windows, batch_size, "attention stats", progress)
    inv_freq = rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    ang = torch.arange(t_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    out = []
    for h in hist:
        h = h / h.sum(1, keepdim=True).clamp_min(1e-300)
        out.append(torch.stack([h @ ang.cos(), h @ ang.sin()], dim=-1))  # [H, d/2, 2]
    return out


def _run_hooked(
    hf_model: Any, layers: Any, make_hook: Any, windows: torch.Tensor, batch_size: int, desc: str, progress: bool
) -> None:
    """Run ``windows`` through ``hf_model`` with ``make_hook(i)`` as a pre-hook on layer i's attention."""
    from tqdm.auto import tqdm

    handles = [
        layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for batch in tqdm(torch.split(windows, batch_size), desc=desc, disable=not progress, leave=False):
                hf_model(batch)
    finally:
        for h in handles:
            h.remove()
