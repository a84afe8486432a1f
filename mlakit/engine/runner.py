"""Runs a :class:`mlakit.model.Transformer` over the paged cache: chunked prefill and batched decode.

The model's own modules do the projections (``project_q``, ``project_kv_latent``, ``w_q/w_k/w_v``,
``w_o``, norms, MLP); this module only decides where K/V or latents go and which attention path
reads them (:mod:`mlakit.engine.decode`).

* prefill (one sequence, a chunk of ``T`` tokens at ``start_pos``): write the chunk's latents, then
  the compute-friendly path: decompress K/V for all ``start_pos + T`` tokens, fused SDPA.
* decode (``B`` sequences, one token each): projections, absorption and ``W_UV`` are batched
  matrix products over the batch; attention runs per sequence over its pages.

Weights are absorbed once, in :class:`ModelRunner`'s constructor: ``w_uk`` as ``[H, d_nope, r]``
and ``w_uv`` as ``[H, r, d_v]`` contiguous, ready for ``bmm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from mlakit.attention.mha import GroupedQueryAttention
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.engine.decode import (
    absorbed_decode,
    decompressed_attention,
    full_rope_decode,
    kv_attention,
    kv_decode,
)
from mlakit.engine.paged import PagedCache, block_runs, token_slots
from mlakit.errors import MlakitError
from mlakit.model import Block, Transformer


@dataclass(frozen=True)
class AbsorbedWeights:
    """One MLA layer's up-projections laid out for the absorbed decode (computed once at load)."""

    w_uk: torch.Tensor  # [H, d_nope, r]: q_latent = q_nope @ w_uk
    w_uv: torch.Tensor  # [H, r, d_v]:    o = o_latent @ w_uv

    @classmethod
    def from_layer(cls, attn: MultiHeadLatentAttention) -> AbsorbedWeights:
        c = attn.config
        h, r = attn.num_heads, c.kv_lora_rank
        w_uk = attn.w_uk.weight.detach().view(h, c.qk_nope_head_dim, r).contiguous()  # [H, d_nope, r]
        w_uv = attn.w_uv.weight.detach().view(h, c.v_head_dim, r).transpose(1, 2).contiguous()  # [H, r, d_v]
        return cls(w_uk=w_uk, w_uv=w_uv)


class ModelRunner:
    """Forward passes of ``model`` that read and write ``cache`` through block tables.

    Args:
        model: an mlakit Transformer (MLA or baseline attention), in eval mode.
        cache: the paged cache built for ``model.config``.
        absorb: decode MLA layers by the absorbed path (needs ``rope_mode='decoupled'``);
            ``False`` decompresses the latents (the naive path).
        absorb_values: for full-RoPE MLA (which cannot absorb ``W_UK``), still fold ``W_UV`` after
            attention and decompress only the keys (:func:`~mlakit.engine.decode.full_rope_decode`).

    Raises: MlakitError when ``absorb`` is asked of a full-RoPE model.
    """

    def __init__(self, model: Transformer, cache: PagedCache, absorb: bool, absorb_values: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.dtype = model.embed.weight.dtype
        self.blocks = [cast(Block, layer) for layer in model.layers]
        self.absorbed: list[AbsorbedWeights | None] = []
        self.values_absorbed: list[AbsorbedWeights | None] = []  # full-RoPE layers: W_UV only
        for layer in self.blocks:
            attn = layer.attn
            if not isinstance(attn, MultiHeadLatentAttention):
                self.absorbed.append(None)
                self.values_absorbed.append(None)
                continue
            if absorb and not attn.config.can_absorb:
                raise MlakitError("the absorbed decode needs rope_mode='decoupled'; this model uses full RoPE")
            weights = AbsorbedWeights.from_layer(attn)
            self.absorbed.append(weights if absorb else None)
            full = attn.config.rope_mode == "full"
            self.values_absorbed.append(weights if full and absorb_values else None)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], start_pos: int, table: Sequence[int]) -> torch.Tensor:
        """Write ``tokens`` at positions ``start_pos ..`` of the sequence with ``table``.

        Returns: fp32 logits ``[vocab]`` of the last token.
        """
        model, bs = self.model, self.block_size
        device = model.embed.weight.device
        t = len(tokens)
        end = start_pos + t
        q_pos = torch.arange(start_pos, end, device=device)  # [T]
        positions = q_pos.unsqueeze(0)  # [1, T]
        slots = torch.tensor(token_slots(table, start_pos, t, bs), device=device)
        runs = block_runs(table, end, bs)
        x = model.embed(torch.tensor([list(tokens)], device=device))  # [1, T, hidden]
        for i, layer in enumerate(self.blocks):
            a = layer.attn_norm(x)
            attn = layer.attn
            rows = self.cache.layers[i]
            if isinstance(attn, MultiHeadLatentAttention):
                q_nope, q_rope = attn.project_q(a, positions)  # [1, T, H, D]
                c_kv, k_rope = attn.project_kv_latent(a, positions)  # [1, T, r], [1, T, d_r]
                rows[0].write(slots, c_kv[0] if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)[0])
                kv_joint = rows[0].read(runs, self.dtype)  # [S, r + d_r]
                o = decompressed_attention(attn, q_nope[0], q_rope[0], kv_joint, q_pos)  # [T, H, d_v]
            else:
                assert isinstance(attn, GroupedQueryAttention)
                q, k, v = self._project_qkv(attn, a, positions)
                rows[0].write(slots, k[0].flatten(1))
                rows[1].write(slots, v[0].flatten(1))
                g = attn.config.num_kv_heads
                k_all = rows[0].read(runs, self.dtype).view(end, g, -1)  # [S, G, D]
                v_all = rows[1].read(runs, self.dtype).view(end, g, -1)
                o = kv_attention(attn, q[0], k_all, v_all, q_pos)  # [T, H, D]
            x = x + attn.w_o(o.reshape(1, t, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        return model.lm_head(model.norm(x[0, -1])).float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode step for ``B`` sequences: token ``tokens[b]`` at ``positions[b]``.

        Each sequence attends to its positions ``0 .. positions[b]`` (the new token included).

        Returns: fp32 logits ``[B, vocab]``.
        """
        model, bs = self.model, self.block_size
        device = model.embed.weight.device
        b = len(tokens)
        pos = torch.tensor(list(positions), device=device).unsqueeze(1)  # [B, 1]
        slots = torch.tensor([tables[i][p // bs] * bs + p % bs for i, p in enumerate(positions)], device=device)
        runs = [block_runs(tables[i], p + 1, bs) for i, p in enumerate(positions)]
        x = model.embed(torch.tensor(list(tokens), device=device).unsqueeze(1))  # [B, 1, hidden]
        for i, layer in enumerate(self.blocks):
            a = layer.attn_norm(x)
            attn = layer.attn
            rows = self.cache.layers[i]
            if isinstance(attn, MultiHeadLatentAttention):
                c = attn.config
                q_nope, q_rope = attn.project_q(a, pos)  # [B, 1, H, D]
                c_kv, k_rope = attn.project_kv_latent(a, pos)  # [B, 1, r], [B, 1, d_r]
                rows[0].write(slots, c_kv[:, 0] if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)[:, 0])
                absorbed = self.absorbed[i]
                if absorbed is not None:
                    q_latent = torch.bmm(q_nope[:, 0].transpose(0, 1), absorbed.w_uk)  # [H, B, r]
                    q_joint = torch.cat((q_latent.transpose(0, 1), q_rope[:, 0]), dim=-1) * attn.scale  # [B, H, r+d_r]
                    o_latent = torch.stack(
                        [absorbed_decode(q_joint[j], rows[0], runs[j], c.kv_lora_rank) for j in range(b)]
                    )  # [B, H, r]
                    o = torch.bmm(o_latent.transpose(0, 1), absorbed.w_uv).transpose(0, 1)  # [B, H, d_v]
                elif self.values_absorbed[i] is not None:
                    w_uv = self.values_absorbed[i].w_uv  # type: ignore[union-attr]
                    o = torch.stack(
                        [
                            full_rope_decode(attn, q_nope[j, 0], rows[0].read(runs[j], self.dtype), w_uv)
                            for j in range(b)
                        ]
                    )  # [B, H, d_v]
                else:
                    o = torch.stack(
                        [
                            decompressed_attention(
                                attn, q_nope[j], q_rope[j], rows[0].read(runs[j], self.dtype), pos[j]
                            )[0]
                            for j in range(b)
                        ]
                    )  # [B, H, d_v]
            else:
                assert isinstance(attn, GroupedQueryAttention)
                q, k, v = self._project_qkv(attn, a, pos)
                rows[0].write(slots, k[:, 0].flatten(1))
                rows[1].write(slots, v[:, 0].flatten(1))
                o = torch.stack([kv_decode(attn, q[j, 0], rows[0], rows[1], runs[j]) for j in range(b)])  # [B, H, D]
            x = x + attn.w_o(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        return model.lm_head(model.norm(x[:, 0])).float()

    @staticmethod
    def _project_qkv(
        attn: GroupedQueryAttention, a: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated ``q [B, T, H, D]``, rotated ``k`` and ``v`` ``[B, T, G, D]`` (as the baseline module does)."""
        c = attn.config
        b, t, _ = a.shape
        q = attn.rotary.rotate(attn.w_q(a).view(b, t, c.num_heads, c.head_dim), positions)  # [B, T, H, D]
        k = attn.rotary.rotate(attn.w_k(a).view(b, t, c.num_kv_heads, c.head_dim), positions)  # [B, T, G, D]
        v = attn.w_v(a).view(b, t, c.num_kv_heads, c.head_dim)  # [B, T, G, D]
        return q, k, v
