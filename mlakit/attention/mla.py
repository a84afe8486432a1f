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
rotated at its position after decompression, so only the naive path exists. With ``qk_norm``
(converted Qwen3 / Gemma 3) each head's query and decompressed key go through an RMSNorm
(``q_head_norm``, ``k_head_norm``) before RoPE. ``logit_softcap`` and ``sliding_window`` act on
the scores and the mask of either path (see :class:`~mlakit.config.MLAConfig`).

Paged (engine) form: with :class:`~mlakit.attention.metadata.AttentionMetadata` the layer takes a
packed row of ``N`` tokens from many sequences, writes ``[c_kv | k_rope]`` at each token's cache
slot, then decode tokens attend through the engine's attention backend (absorbed: one batched
``latent_decode``; naive: a gathered, masked dense pass). Each prefill chunk attends in latent
space through the backend's ``latent_prefill`` when that costs fewer multiply-adds
(:meth:`MultiHeadLatentAttention.prefill_absorbed`: always for conversions' small latents), else
decompresses its sequence's cached latents. The projections and the absorption are the same code
as above; only the read of the cache is the backend's.

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

from mlakit.attention.common import RotaryEmbedding, attend, check_positions, mask_or_causal, position_mask
from mlakit.attention.metadata import AttentionMetadata
from mlakit.cache import LatentCache
from mlakit.config import MLAConfig
from mlakit.layers import RMSNorm, fuse_linears
from mlakit.rope import softmax_scale

AttentionPath = Literal["naive", "absorbed"]


class MultiHeadLatentAttention(nn.Module):
    """MLA layer. ``forward(x, positions, cache, path)``; see the module docstring for the maths.

    ``recompute_kv`` (default ``False``): when set and autograd is recording, recompute per-head
    K/V in backward instead of keeping them (the trainer sets it; see the module docstring).
    """

    def __init__(
        self, config: MLAConfig, rotary: RotaryEmbedding | None = None, max_positions: int = 4096, layer_idx: int = 0
    ) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx  # which of the paged cache's layers this one reads
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
        if c.qk_norm:
            self.q_head_norm = RMSNorm(c.qk_nope_head_dim, c.rms_norm_eps)
            self.k_head_norm = RMSNorm(c.qk_nope_head_dim, c.rms_norm_eps)
        self.rotary = rotary or RotaryEmbedding(c.rope_dim, max_positions, c.rope_theta, c.rope_scaling)
        self.recompute_kv = False
        self.fused_in: nn.Module | None = None  # set by fuse_input_projections (inference)
        self._fused_sizes: list[int] = []

    # -- projections -----------------------------------------------------------------------------

    def fuse_input_projections(self) -> None:
        """Inference: every product of ``x`` (``w_q`` or ``w_dq``, ``w_dkv``, ``w_kr``) as one.

        The originals are dropped; :meth:`project` splits the fused output.
        """
        c = self.config
        parts = [self.w_q if c.q_lora_rank is None else self.w_dq, self.w_dkv]
        if c.rope_mode == "decoupled":
            parts.append(self.w_kr)
        self.fused_in = fuse_linears(parts)
        self._fused_sizes = [p.out_features for p in parts]
        for name in ("w_q", "w_dq", "w_dkv", "w_kr"):
            if hasattr(self, name):
                delattr(self, name)

    def _finish_q(self, q: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``w_q x`` (or ``c_q = w_dq x``) to the rotated ``(q_nope, q_rope)``."""
        c = self.config
        b, t, _ = q.shape
        if c.q_lora_rank is not None:
            q = self.w_uq(self.q_norm(q))
        q = q.view(b, t, self.num_heads, c.qk_head_dim)  # [B, T, H, d_nope + d_rope]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        if c.rope_mode == "full":
            if c.qk_norm:
                q_nope = self.q_head_norm(q_nope)
            return self.rotary.rotate(q_nope, positions), q_rope
        return q_nope, self.rotary.rotate(q_rope, positions)

    def _finish_kv(
        self, c_kv: torch.Tensor, k_r: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """From ``w_dkv x`` and ``w_kr x`` to what the cache stores."""
        if self.config.kv_norm:
            c_kv = self.kv_norm(c_kv)
        if k_r is None:
            return c_kv, None
        return c_kv, self.rotary.rotate(k_r.unsqueeze(2), positions).squeeze(2)  # via [B, T, 1, d_rope]

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q_nope, q_rope, c_kv, k_rope)`` of the same tokens (one product when fused)."""
        if self.fused_in is None:
            return (*self.project_q(x, positions), *self.project_kv_latent(x, positions))
        parts = self.fused_in(x).split(self._fused_sizes, dim=-1)
        k_r = parts[2] if len(parts) > 2 else None
        return (*self._finish_q(parts[0], positions), *self._finish_kv(parts[1], k_r, positions))

    def project_q(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_nope [B, T, H, d_nope], q_rope [B, T, H, d_rope])``, the rotary part rotated.

        In full mode ``q_nope`` is the whole (rotated) query and ``q_rope`` has width 0.
        """
        if self.fused_in is not None:
            return self.project(x, positions)[:2]
        return self._finish_q(self.w_q(x) if self.config.q_lora_rank is None else self.w_dq(x), positions)

    def project_kv_latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(c_kv [B, T, r], k_rope [B, T, d_rope] or None)``: exactly what the cache stores."""
        if self.fused_in is not None:
            _, _, c_kv, k_rope = self.project(x, positions)
            return c_kv, k_rope
        k_r = self.w_kr(x) if self.config.rope_mode == "decoupled" else None
        return self._finish_kv(self.w_dkv(x), k_r, positions)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        path: AttentionPath = "naive",
        kv_len: int | None = None,
        meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """Attend ``x [B, T, hidden]`` at ``positions [B, T]`` (default ``0..T-1``).

        With ``cache``, the new latents are written at ``positions`` and attention reads the first
        ``kv_len`` cached positions (default ``positions.max() + 1``); without it, the chunk attends
        to itself causally. ``path`` picks naive or absorbed; both give the same result. With
        ``meta`` (the engine), ``x`` is a packed row ``[1, N, hidden]`` over the paged cache and
        ``path`` applies to its decode tokens (see the module docstring).

        Returns: ``[B, T, hidden]``.
        Raises: ValueError for the absorbed path in full-RoPE mode or a malformed ``positions``.
        """
        if meta is not None:
            assert positions is not None, "the paged form needs positions"
            return self._forward_paged(x, positions, meta, path)
        b, t, _ = x.shape
        window = self.config.sliding_window
        causal = positions is None and cache is None and window is None
        if positions is None:
            positions = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
        check_positions(x, positions)
        if path == "absorbed" and not self.config.can_absorb:
            raise ValueError("path='absorbed' needs rope_mode='decoupled'; full-RoPE MLA must decompress (naive)")
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)
        if cache is not None:
            cache.write(positions, c_kv, k_rope)
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            kv_joint = cache.read_joint(kv_len).to(x.dtype)  # [B, S, r + d_rope]
            k_pos = torch.arange(kv_len, device=x.device)
        else:
            kv_joint = c_kv if k_rope is None else torch.cat((c_kv, k_rope), dim=-1)
            k_pos = positions
        mask, causal = (None, True) if causal else mask_or_causal(positions, k_pos, window)
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
        if c.qk_norm:
            k_nope = self.k_head_norm(k_nope)
        if c.rope_mode == "full":
            kp = k_pos if k_pos.dim() == 2 else k_pos.unsqueeze(0).expand(b, s)
            q, k = q_nope, self.rotary.rotate(k_nope, kp)
        else:
            q = torch.cat((q_nope, q_rope), dim=-1)  # [B, T, H, d_qk]
            k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(b, s, h, c.qk_rope_head_dim)), dim=-1)
        d_v = v.shape[-1]
        if d_v < q.shape[-1] and c.logit_softcap is None:
            # fused (flash) SDPA kernels need equal q/k and v widths; zero-padded V columns give zero
            # output columns, sliced off below. Without this CPU falls back to the math path, which
            # keeps the [B, H, T, S] probabilities for backward.
            v = F.pad(v, (0, q.shape[-1] - d_v))
        o = attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal, self.scale, c.logit_softcap
        )  # [B, H, T, d_qk or d_v]
        return o.transpose(1, 2)[..., :d_v]

    def prepare_absorbed(self, dtype: torch.dtype = torch.float32) -> None:
        """Lay ``W_UK`` out as ``[H, d_nope, r]`` and ``W_UV`` as ``[H, r, d_v]`` once, in ``dtype``.

        Called after the weights are loaded and cast (vLLM's ``process_weights_after_loading``):
        the absorbed paths then run their small per-head products in ``dtype`` (fp32 by default:
        on CPUs these tiny batched products are several times faster in fp32 than in bf16).
        """
        c = self.config
        h, r = self.num_heads, c.kv_lora_rank
        w_uk = self.w_uk.weight.detach().view(h, c.qk_nope_head_dim, r)  # [H, d_nope, r]
        w_uv = self.w_uv.weight.detach().view(h, c.v_head_dim, r).transpose(1, 2)  # [H, r, d_v]
        self.absorbed = (w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous())

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        absorbed: tuple[torch.Tensor, torch.Tensor] | None = getattr(self, "absorbed", None)
        if absorbed is not None and absorbed[0].device == self.w_uk.weight.device:
            return absorbed
        c = self.config
        h, r = self.num_heads, c.kv_lora_rank
        return (
            self.w_uk.weight.view(h, c.qk_nope_head_dim, r),  # [H, d_nope, r]
            self.w_uv.weight.view(h, c.v_head_dim, r).transpose(1, 2),  # [H, r, d_v]
        )

    def _absorb_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """``q_joint = [q_nope W_UK | q_rope] * scale``: ``[..., H, d]`` -> ``[..., H, r + d_rope]``.

        In the dtype of the absorbed weights (see :meth:`prepare_absorbed`).
        """
        w_uk, _ = self._absorbed_weights()
        lead = q_nope.shape[:-2]
        q = q_nope.reshape(-1, self.num_heads, q_nope.shape[-1]).to(w_uk.dtype)  # [M, H, d_nope]
        q_latent = torch.bmm(q.transpose(0, 1), w_uk).transpose(0, 1)  # [M, H, r]
        q_joint = torch.cat((q_latent, q_rope.reshape(q.shape[0], self.num_heads, -1).to(w_uk.dtype)), dim=-1)
        return (q_joint * self.scale).view(*lead, self.num_heads, -1)

    def _expand_output(self, o_latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``o_h = W_UV o_latent``: ``[..., H, r]`` -> ``[..., H, d_v]`` in ``dtype``."""
        _, w_uv = self._absorbed_weights()
        lead = o_latent.shape[:-2]
        o = o_latent.reshape(-1, self.num_heads, o_latent.shape[-1]).to(w_uv.dtype)  # [M, H, r]
        out = torch.bmm(o.transpose(0, 1), w_uv).transpose(0, 1)  # [M, H, d_v]
        return out.to(dtype).reshape(*lead, self.num_heads, -1)

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
        q_joint = self._absorb_query(q_nope, q_rope).reshape(b, t * h, r + c.qk_rope_head_dim)  # [B, T*H, r+d_r]
        kv = kv_joint.to(q_joint.dtype)
        # plain batched products (not SDPA): CPU SDPA kernels are tuned for narrow heads, and this
        # "head" is r + d_rope wide with T*H query rows sharing one key/value stream
        scores = torch.matmul(q_joint, kv.transpose(1, 2)).float()  # [B, T*H, S]
        if c.logit_softcap is not None:
            scores = c.logit_softcap * torch.tanh(scores / c.logit_softcap)
        if causal:
            mask = torch.ones(t, s, dtype=torch.bool, device=q_nope.device).tril(s - t).view(1, 1, t, s)
        if mask is not None:
            # one row per (query token, head): row t*H + h uses query token t's mask
            rows = mask.squeeze(1).unsqueeze(2).expand(mask.shape[0], t, h, s).reshape(mask.shape[0], t * h, s)
            scores = scores.masked_fill(~rows, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        o_latent = torch.matmul(probs, kv[..., :r])  # [B, T*H, r]
        return self._expand_output(o_latent.view(b, t, h, r), q_nope.dtype)  # [B, T, H, d_v]

    def prefill_absorbed(self, t: int, s: int) -> bool:
        """Whether a prefill chunk of ``t`` queries over ``s`` cached tokens costs fewer multiply-adds absorbed.

        Naive: decompress all ``s`` latents (``s r H (d_nope + d_v)``), then attend per head
        (``t s H (d_qk + d_v)``). Absorbed: attend in latent space (``t s H (2r + d_rope)``) plus the
        per-query absorption (``t H r (d_nope + d_v)``). With a small latent (conversions) absorbed
        wins for any chunk; with DeepSeek's r = 512 only for short chunks over long contexts.
        """
        c = self.config
        h, r = self.num_heads, c.kv_lora_rank
        naive = s * r * h * (c.qk_nope_head_dim + c.v_head_dim) + t * s * h * (c.qk_head_dim + c.v_head_dim)
        absorbed = t * s * h * (2 * r + c.qk_rope_head_dim) + t * h * r * (c.qk_nope_head_dim + c.v_head_dim)
        return absorbed < naive

    def _forward_paged(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, path: AttentionPath
    ) -> torch.Tensor:
        """The engine's packed step: ``x [1, N, hidden]`` -> ``[1, N, hidden]`` over the paged cache."""
        n = x.shape[1]
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)  # [1, N, H, d]..., [1, N, r], [1, N, d_rope]
        rows = meta.cache.layers[self.layer_idx][0]
        rows.write(meta.slot_mapping, (c_kv if k_rope is None else torch.cat((c_kv, k_rope), dim=-1))[0])
        q_nope, q_rope, pos = q_nope[0], q_rope[0], positions[0]  # [N, H, d], [N]
        nd = meta.num_decodes
        parts = []
        if nd and path == "absorbed":
            q_joint = self._absorb_query(q_nope[:nd], q_rope[:nd])  # [nd, H, r + d_rope]
            o_latent = meta.backend.latent_decode(q_joint, rows, meta, self.config.kv_lora_rank)  # [nd, H, r]
            parts.append(self._expand_output(o_latent, x.dtype))  # [nd, H, d_v]
        elif nd:  # decompress every decode sequence's latents, one masked dense pass
            kv = meta.backend.gather(rows, meta, 0, nd, x.dtype)  # [nd, S, r + d_rope]
            k_pos = torch.arange(kv.shape[1], device=x.device)
            mask = position_mask(pos[:nd].unsqueeze(1), k_pos)  # [nd, 1, 1, S]
            o = self._attend_naive(q_nope[:nd].unsqueeze(1), q_rope[:nd].unsqueeze(1), kv, k_pos, mask, False)
            parts.append(o[:, 0])  # [nd, H, d_v]
        for i in range(nd, meta.num_seqs):  # prefill chunks, one sequence each
            a, b = meta.query_start[i], meta.query_start[i + 1]
            if path == "absorbed" and self.prefill_absorbed(b - a, meta.context_lens_host[i]):
                # in latent space, through the backend: q [T_i, H, r + d_rope] over the cached rows
                q_joint = self._absorb_query(q_nope[a:b], q_rope[a:b])
                o_latent = meta.backend.latent_prefill(q_joint, rows, meta, i, pos[a:b], self.config.kv_lora_rank)
                parts.append(self._expand_output(o_latent, x.dtype))  # [T_i, H, d_v]
                continue
            kv = meta.backend.gather(rows, meta, i, i + 1, x.dtype)  # [1, S_i, r + d_rope]
            k_pos = torch.arange(kv.shape[1], device=x.device)
            chunk_mask, causal = mask_or_causal(pos[a:b].unsqueeze(0), k_pos)  # [1, 1, T_i, S_i] or causal
            o = self._attend_naive(q_nope[a:b].unsqueeze(0), q_rope[a:b].unsqueeze(0), kv, k_pos, chunk_mask, causal)[0]
            parts.append(o)  # [T_i, H, d_v]
        o = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, H, d_v]
        return self.w_o(o.reshape(1, n, -1))
