"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3), with naive and absorbed paths.

Symbols (one token ``x`` of width ``hidden_size``; H heads)::

    c_q    = q_norm(W_DQ x)                      [q_lora_rank]     (or no c_q: q = W_Q x)
    q      = W_UQ c_q  -> per head [q_nope | q_rope]   [H, qk_nope_head_dim + qk_rope_head_dim]
    c_kv   = kv_norm(W_DKV x)                    [kv_lora_rank]    <- cached
    k_rope = RoPE(W_KR x)                        [qk_rope_head_dim] shared by all heads <- cached
    k_nope = W_UK c_kv                           [H, qk_nope_head_dim]
    v      = W_UV c_kv                           [H, v_head_dim]
    o      = W_O concat_h softmax(q.k / sqrt(d_qk)) v

Two ways to attend over the cached latents, with the same result:

* naive (compute-friendly; used for prefill and as the reference)::

      K = [W_UK c_kv ; k_rope], V = W_UV c_kv for every cached token, then ordinary SDPA.

* absorbed (data-movement-friendly decode; DeepSeek-V3 ``attn_impl="absorb"``)::

      q_latent = q_nope W_UK            [H, kv_lora_rank]   (W_UK folded into the query)
      score    = q_latent . c_kv + q_rope . k_rope          (one product against [c_kv | k_rope])
      o_latent = softmax(score) c_kv    [H, kv_lora_rank]
      o_h      = W_UV o_latent          (W_UV applied after attention)

  i.e. multi-query attention with one key/value "head" of width ``kv_lora_rank + qk_rope_head_dim``
  that all H query heads share; per-head K/V are never materialised.

``rope_mode='full'`` (conversion form): no decoupled key; the decompressed key ``W_UK c_kv`` is
rotated at its position after decompression, so only the naive path exists.

Latent recomputation (training): with ``recompute_kv = True`` the naive path's decompression and
attention run under :func:`torch.utils.checkpoint.checkpoint`, so autograd keeps only the
queries and the latent ``[c_kv | k_rope]`` for backward and recomputes the per-head K/V (and the
attention) there. Forward values and gradients are those of the plain path.

Shapes: B batch, T query tokens, S key tokens, H heads, r kv_lora_rank, D widths.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlakit.attention.common import RotaryEmbedding, check_positions, position_mask
from mlakit.cache import LatentCache
from mlakit.config import MLAConfig
from mlakit.layers import RMSNorm
from mlakit.rope import softmax_scale

AttentionPath = Literal["naive", "absorbed"]


class MultiHeadLatentAttention(nn.Module):
    """MLA layer. ``forward(x, positions, cache, path)``; see the module docstring for the maths.

    ``recompute_kv`` (default ``False``): when set and autograd is recording, recompute per-head
    K/V in backward instead of keeping them (the trainer sets it; see the module docstring).
    """

    def __init__(self, config: MLAConfig, rotary: RotaryEmbedding | None = None, max_positions: int = 4096) -> None:
        super().__init__()
        c = config
        self.config = c
        self.num_heads = c.num_heads
        self.scale = softmax_scale(c.qk_head_dim, c.rope_scaling)
        if c.q_lora_rank is None:
            self.w_q = nn.Linear(c.hidden_size, c.num_heads * c.qk_head_dim, bias=c.attention_bias)
        else:
            self.w_dq = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.w_uq = nn.Linear(c.q_lora_rank, c.num_heads * c.qk_head_dim, bias=False)
        self.w_dkv = nn.Linear(c.hidden_size, c.kv_lora_rank, bias=c.attention_bias)
        if c.rope_mode == "decoupled":
            self.w_kr = nn.Linear(c.hidden_size, c.qk_rope_head_dim, bias=c.attention_bias)
        if c.kv_norm:
            self.kv_norm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.w_uk = nn.Linear(c.kv_lora_rank, c.num_heads * c.qk_nope_head_dim, bias=False)
        self.w_uv = nn.Linear(c.kv_lora_rank, c.num_heads * c.v_head_dim, bias=False)
        self.w_o = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.rotary = rotary or RotaryEmbedding(c.rope_dim, max_positions, c.rope_theta, c.rope_scaling)
        self.recompute_kv = False

    # -- projections -----------------------------------------------------------------------------

    def project_q(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_nope [B, T, H, d_nope], q_rope [B, T, H, d_rope])``, the rotary part rotated.

        In full mode ``q_nope`` is the whole (rotated) query and ``q_rope`` has width 0.
        """
        c = self.config
        b, t, _ = x.shape
        q = self.w_q(x) if c.q_lora_rank is None else self.w_uq(self.q_norm(self.w_dq(x)))
        q = q.view(b, t, self.num_heads, c.qk_head_dim)  # [B, T, H, d_nope + d_rope]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        if c.rope_mode == "full":
            return self.rotary.rotate(q_nope, positions), q_rope
        return q_nope, self.rotary.rotate(q_rope, positions)

    def project_kv_latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(c_kv [B, T, r], k_rope [B, T, d_rope] or None)``: exactly what the cache stores."""
        c_kv = self.w_dkv(x)
        if self.config.kv_norm:
            c_kv = self.kv_norm(c_kv)
        if self.config.rope_mode == "full":
            return c_kv, None
        k_rope = self.w_kr(x).unsqueeze(2)  # [B, T, 1, d_rope]
        return c_kv, self.rotary.rotate(k_rope, positions).squeeze(2)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        path: AttentionPath = "naive",
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Attend ``x [B, T, hidden]`` at ``positions [B, T]`` (default ``0..T-1``).

        With ``cache``, the new latents are written at ``positions`` and attention reads the first
        ``kv_len`` cached positions (default ``positions.max() + 1``); without it, the chunk attends
        to itself causally. ``path`` picks naive or absorbed; both give the same result.

        Returns: ``[B, T, hidden]``.
        Raises: ValueError for the absorbed path in full-RoPE mode or a malformed ``positions``.
        """
        b, t, _ = x.shape
        causal = positions is None and cache is None
        if positions is None:
            positions = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
        check_positions(x, positions)
        if path == "absorbed" and not self.config.can_absorb:
            raise ValueError("path='absorbed' needs rope_mode='decoupled'; full-RoPE MLA must decompress (naive)")
        q_nope, q_rope = self.project_q(x, positions)
        c_kv, k_rope = self.project_kv_latent(x, positions)
        if cache is not None:
            cache.write(positions, c_kv, k_rope)
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            kv_joint = cache.read_joint(kv_len).to(x.dtype)  # [B, S, r + d_rope]
            k_pos = torch.arange(kv_len, device=x.device)
        else:
            kv_joint = c_kv if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)
            k_pos = positions
        mask = None if causal else position_mask(positions, k_pos)
        if path == "absorbed":
            o = self._attend_absorbed(q_nope, q_rope, kv_joint, mask, causal)
        elif self.recompute_kv and torch.is_grad_enabled():
            # keep [c_kv | k_rope] (and q) for backward; per-head K/V are rebuilt there
            o = checkpoint(self._attend_naive, q_nope, q_rope, kv_joint, k_pos, mask, causal, use_reentrant=False)
        else:
            o = self._attend_naive(q_nope, q_rope, kv_joint, k_pos, mask, causal)
        return self.w_o(o.reshape(b, t, -1))

    def _attend_naive(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        kv_joint: torch.Tensor,
        k_pos: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Decompress K/V for all S keys of ``kv_joint [B, S, r + d_rope]``, then fused SDPA.

        Returns ``[B, T, H, d_v]``.
        """
        c = self.config
        b, s, _ = kv_joint.shape
        h = self.num_heads
        c_kv, k_rope = kv_joint.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        k_nope = self.w_uk(c_kv).view(b, s, h, c.qk_nope_head_dim)  # [B, S, H, d_nope]
        v = self.w_uv(c_kv).view(b, s, h, c.v_head_dim)  # [B, S, H, d_v]
        if c.rope_mode == "full":
            kp = k_pos if k_pos.dim() == 2 else k_pos.unsqueeze(0).expand(b, s)
            q, k = q_nope, self.rotary.rotate(k_nope, kp)
        else:
            q = torch.cat((q_nope, q_rope), dim=-1)  # [B, T, H, d_qk]
            k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(b, s, h, c.qk_rope_head_dim)), dim=-1)
        d_v = v.shape[-1]
        if d_v < q.shape[-1]:
            # fused (flash) SDPA kernels need equal q/k and v widths; zero-padded V columns give zero
            # output columns, sliced off below. Without this CPU falls back to the math path, which
            # keeps the [B, H, T, S] probabilities for backward.
            v = F.pad(v, (0, q.shape[-1] - d_v))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=self.scale
        )  # [B, H, T, d_qk or d_v]
        return o.transpose(1, 2)[..., :d_v]

    def _attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        kv_joint: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Attention in latent space: MQA with one shared key ``kv_joint = [c_kv | k_rope]``.

        Returns ``[B, T, H, d_v]``.
        """
        c = self.config
        b, t, h, _ = q_nope.shape
        s = kv_joint.shape[1]
        r = c.kv_lora_rank
        w_uk = self.w_uk.weight.view(h, c.qk_nope_head_dim, r)  # [H, d_nope, r]
        w_uv = self.w_uv.weight.view(h, c.v_head_dim, r)  # [H, d_v, r]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # [B, T, H, r]
        q_joint = torch.cat((q_latent, q_rope), dim=-1).reshape(b, t * h, r + c.qk_rope_head_dim)
        # plain batched products (not SDPA): CPU SDPA kernels are tuned for narrow heads, and this
        # "head" is r + d_rope wide with T*H query rows sharing one key/value stream
        scores = torch.matmul(q_joint, kv_joint.transpose(1, 2)).float() * self.scale  # [B, T*H, S]
        if causal:
            mask = torch.ones(t, s, dtype=torch.bool, device=q_nope.device).tril(s - t).view(1, 1, t, s)
        if mask is not None:
            # one row per (query token, head): row t*H + h uses query token t's mask
            rows = mask.squeeze(1).unsqueeze(2).expand(mask.shape[0], t, h, s).reshape(mask.shape[0], t * h, s)
            scores = scores.masked_fill(~rows, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv_joint.dtype)
        o_latent = torch.matmul(probs, kv_joint[..., :r])  # [B, T*H, r]
        o_latent = o_latent.view(b, t, h, r)
        return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # [B, T, H, d_v]
