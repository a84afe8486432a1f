"""Export planning and its maths: how an mlakit MLA model is written in the DeepSeek-V3 format.

The tensor mapping itself is :mod:`mlakit.interop.deepseek_map`; writing the checkpoint is
:mod:`mlakit.interop.deepseek_export`.

What the format cannot say, and what export does about it (recorded under ``mlakit_export`` in
``config.json``):

* per-layer latent ranks (``ModelConfig.kv_lora_ranks``): one ``kv_lora_rank`` ``R`` for all
  layers, the largest. A narrower layer (rank ``r``) gets zero rows in ``w_dkv`` and zero columns
  in ``w_uk``/``w_uv``. Zero rows lower the mean square the latent RMSNorm divides by by ``r/R``;
  scaling the real rows of ``w_dkv`` (and its bias) by ``s = sqrt(R/r)`` restores it exactly
  (epsilon included) and ``kv_norm`` divided by ``s`` undoes the scale: exact in real arithmetic.
* ``kv_norm=False`` (a linear latent ``c = w_dkv x``, what conversion produces): DeepSeek-V3
  always applies ``kv_a_layernorm``, ``RMSNorm(z) = z / sqrt(mean(z^2) + eps) * gamma``. Export
  makes ``eps`` dominate the mean square: the latent rows are ``s * w_dkv`` (and ``s * b``) with
  ``s`` a small power of two, so ``mean(z^2) = s^2 |c|^2 / R << eps`` and::

      RMSNorm(s c) = gamma s c / sqrt(eps) * (1 + x)^(-1/2),   x = s^2 |c|^2 / (R eps)

  which is linear in ``c`` up to a relative error ``1 - (1 + x)^(-1/2) <= x / 2``. ``gamma`` is
  the power of two nearest ``sqrt(eps) / s`` on the real rows (0 on padding rows), so the
  normalised latent, which engines cache, has the magnitude of mlakit's ``c_kv``; ``w_uk``/``w_uv``
  are multiplied by ``up_scale = sqrt(eps) / (s gamma)`` (in ``[2^-1/2, 2^1/2]``) to undo the
  rest. ``s`` is the largest power of two with ``s^2 B^2 / (2 R eps) <= LINEAR_LATENT_TARGET``,
  ``B`` a data-free bound on ``|c|`` (``sigma_max(w_dkv diag(attn_norm)) sqrt(hidden) + |b|``,
  inputs ``attn_norm * u`` with ``rms(u) = 1``). Scaling by powers of two is exact in binary
  floating point, so bf16 rounds ``s * w_dkv`` and ``gamma`` exactly as it rounds ``w_dkv`` and 1.
  No bias is involved, so nothing is lost in vLLM and SGLang. Padding rows of narrower layers are
  zero, so no per-layer norm compensation is needed.

  ``eps`` must be the same in every runtime: transformers builds ``kv_a_layernorm`` with its
  default ``1e-6`` whatever the config says, vLLM and SGLang with ``rms_norm_eps``. So such
  exports write ``rms_norm_eps: 1e-6`` and size ``s`` for it; that also moves the eps of the
  other RMSNorms (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``; in vLLM and
  SGLang also ``q_a_layernorm``) from the source's value, a small change (SmolLM2-135M, eps
  1e-5: logits of magnitude up to 40 move by at most 2e-2) recorded in the notes and in
  ``mlakit_export`` (``source_rms_norm_eps``). fp16 cannot hold ``s * w_dkv`` (it falls below
  fp16's normal range): such exports are refused; bf16 has fp32's exponent range and is fine.
* attention biases: written (``attention_bias: true``) only when one is non-zero, and only with
  ``allow_bias``: transformers honours them, vLLM and SGLang build these projections without bias
  and skip ``.bias`` tensors. All-zero biases are dropped.

* a non-zero ``w_q`` bias without a query latent (``q_lora_rank=None``; a model converted from
  Qwen2): DeepSeek-V3's ``q_proj`` has no bias, its ``q_a_proj`` has. With ``allow_bias`` the query
  is written as a latent of width ``hidden + 1``: ``q_a_proj x + bias = s [x; 1]`` under the same
  epsilon-dominated ``q_a_layernorm``, and ``q_b_proj = u [w_q | b]`` (see
  :func:`_query_bias_through_latent`). Only transformers honours the bias (as above).
* Llama 3 RoPE scaling (``RopeScaling(type='llama3')``, a conversion of Llama 3.x): written as
  ``rope_type: llama3``, which transformers' DeepSeek-V3 computes like Llama's. vLLM's and
  SGLang's DeepSeek-V2/V3 models rewrite every non-default ``rope_type`` to ``deepseek_yarn``
  (``vllm/model_executor/models/deepseek_v2.py``), which is not Llama 3's rescaling: the note says
  so and the engine table refuses them (``--target vllm``). Conversion drops the scaling when it
  leaves every kept rotary frequency unchanged (``--rope-dim`` at most the unscaled width).

Not expressible at all (clear error): ``rope_mode='full'`` MLA and MHA/GQA/MQA baselines, and the
converted-source features DeepSeek-V3 has no field for (:func:`inexpressible_features`: per-head
q/k norms, GeGLU, embedding scale, post norms, soft-capping, sliding windows, a local RoPE base).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from mlakit.config import MLAConfig, ModelConfig
from mlakit.errors import MlakitError
from mlakit.interop.deepseek_map import MAPPING, _mla, _mla_layer
from mlakit.interop.engines import CacheShape
from mlakit.interop.pad import Padding, plan_padding
from mlakit.model import Transformer
from mlakit.rope import unscaled_rope_dim

# Worst-case relative error of a linear latent's epsilon-dominated RMSNorm. 400x below bf16's
# rounding (2^-8), the dtype engines serve in, and at the level of fp32 rounding in the matmuls
# around it. Lower would cost no precision (s is a power of two) but sqrt(10) more exponent range
# per decade between the latent and rope-key rows of kv_a_proj_with_mqa, which hurts
# per-tensor weight quantisation.
LINEAR_LATENT_TARGET = 1e-5
HF_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm/kv_a_layernorm with the default eps


@dataclass(frozen=True)
class LayerLatent:
    """How one layer's latent is written into the shared ``kv_lora_rank`` ``R``.

    ``row_scale`` multiplies the real rows of ``w_dkv`` (and bias): ``sqrt(R/r)`` for a normed
    latent, the small power of two ``s`` for a linear one; ``norm`` is the exported
    ``kv_a_layernorm`` weight ``[R]``; ``up_scale`` multiplies ``w_uk``/``w_uv``;
    ``error_bound`` is the worst-case relative error of the latent path (0 when exact).
    """

    rank: int
    row_scale: float
    norm: torch.Tensor
    up_scale: float = 1.0
    error_bound: float = 0.0


@dataclass(frozen=True)
class ExportPlan:
    """Everything export decides before writing: the HF config, each layer's latent mapping and
    the padding of the cached shapes (``padding.kv_lora_rank == kv_lora_rank``)."""

    config: ModelConfig
    kv_lora_rank: int
    attention_bias: bool
    layers: tuple[LayerLatent, ...]
    rms_norm_eps: float
    padding: Padding
    notes: tuple[str, ...] = ()

    def cache_shape(self, dtype: str) -> CacheShape:
        """What engines must cache for this export, stored as ``dtype`` (``fp32``/``bf16``/``fp16``)."""
        att = _mla(self.config)
        return CacheShape(
            kv_lora_rank=self.kv_lora_rank,
            qk_rope_head_dim=self.padding.qk_rope_head_dim,
            qk_nope_head_dim=att.qk_nope_head_dim,
            dtype=dtype,
            attention_bias=self.attention_bias,
            rope_scaling=att.rope_scaling.type if att.rope_scaling is not None else None,
            unscaled_rope_dim=unscaled_rope_dim(att.qk_rope_head_dim, att.rope_theta, att.rope_scaling),
        )

    @property
    def error_bound(self) -> float:
        return max((lay.error_bound for lay in self.layers), default=0.0)


def inexpressible_features(config: ModelConfig) -> list[str]:
    """The features of ``config`` that DeepSeek-V3's format has no field for (empty when none)."""
    att = config.attention
    out = []
    if config.mlp_act != "silu":
        out.append(f"mlp_act={config.mlp_act!r} (the MLP is SwiGLU: silu)")
    if config.embed_scale != 1.0:
        out.append(f"embed_scale={config.embed_scale:g}")
    if config.post_norms:
        out.append("post_norms=True (norms on the attention and MLP outputs)")
    if config.final_logit_softcap is not None:
        out.append(f"final_logit_softcap={config.final_logit_softcap:g}")
    if att.logit_softcap is not None:
        out.append(f"attention.logit_softcap={att.logit_softcap:g}")
    if any(config.is_sliding(i) for i in range(config.num_layers)):
        out.append(f"sliding-window layers (sliding_window={config.sliding_window})")
    if config.local_rope_theta is not None:
        out.append(f"local_rope_theta={config.local_rope_theta:g}")
    if att.qk_norm:
        out.append("attention.qk_norm=True (per-head q/k norms)")
    return out


def plan_export(model: Transformer, allow_bias: bool = False, pad_to: int | None = None) -> ExportPlan:
    """Decide the exported ``kv_lora_rank``, ``rms_norm_eps`` and each layer's latent mapping.

    See the module docstring for the two latent mappings (normed: padding compensation; linear:
    epsilon-dominated RMSNorm), and :mod:`mlakit.interop.pad` for ``pad_to`` (the cached width
    ``kv_lora_rank + qk_rope_head_dim`` to widen to exactly, e.g. 576).

    Raises: MlakitError when the model cannot be written in the DeepSeek-V3 format, has
    non-zero attention biases (vLLM/SGLang ignore them) without ``allow_bias``, or ``pad_to`` is
    smaller than the model's cached width.
    """
    config = model.config
    att = _mla(config)
    missing = inexpressible_features(config)
    if missing:
        raise MlakitError(
            f"{config.name or 'this model'}: DeepSeek-V3 cannot express {', '.join(missing)}; "
            "such a model runs in mlakit only (`mlakit eval`, `mlakit.generate()`)"
        )
    state = model.state_dict()
    ranks = [_mla_layer(config, i).kv_lora_rank for i in range(config.num_layers)]
    linear = not att.kv_norm
    notes: list[str] = []
    if att.attention_bias and att.q_lora_rank is None:
        for i in range(config.num_layers):
            b = state.get(f"layers.{i}.attn.w_q.bias")
            if b is not None and bool(b.ne(0).any()):
                raise MlakitError(
                    f"layer {i}: w_q has a non-zero bias; DeepSeek-V3's q_proj has none (only q_a_proj, "
                    "kv_a_proj_with_mqa and o_proj take attention_bias): pass --allow-bias (allow_bias=True) to "
                    "write it through a query latent, for transformers only"
                )
    biased = _nonzero_biases(state, config.num_layers)
    if biased and not allow_bias:
        more = f" and {len(biased) - 1} more" if len(biased) > 1 else ""
        raise MlakitError(
            f"the model has attention biases ({biased[0]}{more} non-zero). transformers runs such a checkpoint "
            "exactly, vLLM and SGLang silently drop these biases; pass --allow-bias (allow_bias=True) for a "
            "transformers-only export"
        )
    if att.attention_bias and not biased:
        notes.append("attention_bias=True but every attention bias is zero: written without biases")
    if att.rope_scaling is not None and att.rope_scaling.type == "llama3":
        keep = unscaled_rope_dim(att.qk_rope_head_dim, att.rope_theta, att.rope_scaling)
        notes.append(
            "rope_scaling llama3: transformers reproduces it; vLLM's and SGLang's DeepSeek-V2/V3 models compute any "
            "scaling as DeepSeek's YaRN, so they do not serve this export exactly"
            + (
                f" (convert with --rope-dim {keep} to keep only the rotary pairs the scaling leaves unchanged)"
                if keep
                else ""
            )
        )
    padding = plan_padding(att, max(ranks), pad_to)
    big_r = padding.kv_lora_rank
    eps = HF_LATENT_NORM_EPS if linear else att.rms_norm_eps
    if linear and att.rms_norm_eps != eps:
        q_norm = ", q_a_layernorm" if att.q_lora_rank is not None else ""
        notes.append(
            f"rms_norm_eps {att.rms_norm_eps:g} -> {eps:g}: the linear latent's kv_a_layernorm needs the same eps in "
            f"every runtime and transformers hard-codes {eps:g}; the other RMSNorms (input_layernorm, "
            f"post_attention_layernorm, model.norm{q_norm}) now use it too, changing their output by about "
            "(old - new) / (2 mean(h^2)) relative"
        )
    elif eps != HF_LATENT_NORM_EPS:
        notes.append(
            f"rms_norm_eps={eps:g}: transformers normalises q/kv latents with eps {HF_LATENT_NORM_EPS:g}, vLLM/SGLang "
            "with rms_norm_eps (mlakit): tiny differences in transformers"
        )
    layers: list[LayerLatent] = []
    for i, r in enumerate(ranks):
        p = f"layers.{i}."
        if linear:
            bound = _latent_norm_bound(
                state[p + "attn.w_dkv.weight"], state.get(p + "attn.w_dkv.bias"), state[p + "attn_norm.weight"]
            )
            layers.append(_linear_latent(r, big_r, bound, eps))
        else:
            s = math.sqrt(big_r / r)
            g = state[p + "attn.kv_norm.weight"]
            norm = torch.zeros(big_r, dtype=g.dtype)
            norm[:r] = g if r == big_r else (g.double() / s).to(g.dtype)
            layers.append(LayerLatent(r, s, norm))
    how = "zero rows, exact for a linear latent" if linear else "norm-compensated, exact"
    if any(r != padding.source_kv_lora_rank for r in ranks):
        notes.append(f"per-layer latent ranks {ranks} padded to kv_lora_rank={padding.source_kv_lora_rank} ({how})")
    if padding.pads:
        notes.append(
            f"pad_to={pad_to}: kv_lora_rank {padding.source_kv_lora_rank} -> {big_r} ({how}), qk_rope_head_dim "
            f"{padding.source_qk_rope_head_dim} -> {padding.qk_rope_head_dim} (zero rotary pairs, rope_theta "
            f"{padding.source_rope_theta:g} -> {padding.rope_theta:g} keeps every frequency), query x "
            f"{padding.query_scale:.6g} for the softmax scale of the wider head"
        )
    if linear:
        bound = max(lay.error_bound for lay in layers)
        notes.append(
            f"kv_norm=False written as an epsilon-dominated kv_a_layernorm (latent rows x 2^k, eps {eps:g}): "
            f"relative error <= {bound:.1e} per token, no biases"
        )
    return ExportPlan(config, big_r, bool(biased), tuple(layers), eps, padding, tuple(notes))


def _query_bias_through_latent(model: Transformer) -> tuple[Transformer, str | None]:
    """``model`` with a non-zero ``w_q`` bias carried by a query latent DeepSeek-V3 can write.

    ``q = w_q x + b`` becomes ``w_uq q_norm(w_dq x + b_dq)`` with ``q_lora_rank = n + 1``:
    ``w_dq x + b_dq = s [x; 1]``, ``q_norm`` the epsilon-dominated RMSNorm of a linear latent
    (module docstring; ``s``, the norm weight and ``u`` from :func:`_linear_latent`, sized for
    transformers' ``q_a_layernorm`` eps) and ``w_uq = u [w_q | b]``. Linear to within the bound in
    the returned note. Returns ``(model, None)`` unchanged when there is no such bias.
    """
    att = model.config.attention
    if not isinstance(att, MLAConfig) or att.q_lora_rank is not None or not att.attention_bias:
        return model, None
    state = model.state_dict()
    n, num_layers = att.hidden_size, model.config.num_layers
    if not any(bool(state[f"layers.{i}.attn.w_q.bias"].ne(0).any()) for i in range(num_layers)):
        return model, None
    config = dataclasses.replace(model.config, attention=dataclasses.replace(att, q_lora_rank=n + 1))
    new = {k: v for k, v in state.items() if ".attn.w_q." not in k}
    worst = 0.0
    for i in range(num_layers):
        p = f"layers.{i}.attn."
        w_q, b_q = state[p + "w_q.weight"], state[p + "w_q.bias"]
        # |[x; 1]| for inputs x = attn_norm * u, rms(u) = 1
        x_bound = _latent_norm_bound(torch.eye(n, dtype=w_q.dtype), None, state[f"layers.{i}.attn_norm.weight"])
        lay = _linear_latent(n + 1, n + 1, math.sqrt(x_bound**2 + 1), HF_LATENT_NORM_EPS)
        w_dq = torch.zeros(n + 1, n, dtype=w_q.dtype)
        w_dq[:n] = torch.eye(n, dtype=w_q.dtype) * lay.row_scale
        b_dq = torch.zeros(n + 1, dtype=w_q.dtype)
        b_dq[n] = lay.row_scale
        new[p + "w_dq.weight"], new[p + "w_dq.bias"] = w_dq, b_dq
        new[p + "q_norm.weight"] = lay.norm.to(w_q.dtype)
        new[p + "w_uq.weight"] = (torch.cat([w_q, b_q[:, None]], dim=1).double() * lay.up_scale).to(w_q.dtype)
        worst = max(worst, lay.error_bound)
    with torch.device("meta"):
        out = Transformer(config)
    out.load_state_dict(new, strict=True, assign=True)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.embed.weight
    out.reset_rope_tables(model.embed.weight.device)
    note = (
        f"w_q bias written through a query latent (q_lora_rank={n + 1} = hidden + 1, q_a_proj with bias, "
        f"epsilon-dominated q_a_layernorm): relative error <= {worst:.1e} per token, transformers only"
    )
    return out.eval(), note


def _nonzero_biases(state: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """mlakit names of the non-zero biases the format would write (``attention_bias`` tensors)."""
    names = [n for mp in MAPPING if mp.per_layer and mp.hf.endswith(".bias") for n in mp.mlakit]
    out = []
    for i in range(num_layers):
        for n in names:
            b = state.get(f"layers.{i}.{n}")
            if b is not None and bool(b.ne(0).any()):
                out.append(f"layers.{i}.{n}")
    return out


def _linear_latent(rank: int, big_r: int, bound: float, eps: float) -> LayerLatent:
    """The epsilon-dominated RMSNorm mapping of a linear latent with ``|c| <= bound``."""
    if bound <= 0:  # an all-zero latent: nothing to approximate
        s = 1.0
    else:
        # largest power of two with s^2 bound^2 / (2 R eps) <= target
        s = 2.0 ** math.floor(math.log2(math.sqrt(2 * big_r * eps * LINEAR_LATENT_TARGET) / bound))
    gamma = 2.0 ** round(math.log2(math.sqrt(eps) / s))
    norm = torch.zeros(big_r)
    norm[:rank] = gamma
    error = s * s * bound * bound / (2 * big_r * eps)
    return LayerLatent(rank, s, norm, math.sqrt(eps) / (s * gamma), error)


def _latent_norm_bound(w_dkv: torch.Tensor, b_dkv: torch.Tensor | None, attn_norm: torch.Tensor) -> float:
    """Upper bound on ``|w_dkv x + b|`` for ``x = attn_norm * u`` with ``rms(u) = 1`` (so ``|u| = sqrt(d)``)."""
    w = w_dkv.detach().double() * attn_norm.detach().double()  # [r, d]
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    b = float(b_dkv.detach().double().norm()) if b_dkv is not None else 0.0
    return sigma * math.sqrt(w.shape[1]) + b


def measure_latent_error(model: Transformer, plan: ExportPlan, probes: int = 256, seed: int = 0) -> float:
    """Largest relative error of the exported latent path against mlakit's, over random inputs.

    Replays, in fp32 as transformers does and with the exported ``rms_norm_eps``,
    ``kv_b_proj(kv_a_layernorm(kv_a_proj(x)))`` for the exported tensors against
    ``[w_uk; w_uv] c_kv`` for the original layer, on ``probes`` random inputs
    ``x = attn_norm * u`` with ``rms(u) = 1`` (the inputs this projection sees). The result is
    the approximation plus fp32 rounding. 0 when every layer is copied unchanged.
    """
    big_r = plan.kv_lora_rank
    if all(lay.row_scale == 1 and lay.up_scale == 1 and lay.rank == big_r for lay in plan.layers):
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    eps = plan.rms_norm_eps
    worst = 0.0
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    att = _mla(model.config)
    with torch.no_grad():
        for i, lay in enumerate(plan.layers):
            p = f"layers.{i}."
            w_dkv, b_dkv = state[p + "attn.w_dkv.weight"], state.get(p + "attn.w_dkv.bias")
            d = w_dkv.shape[1]
            u = torch.randn(probes, d, generator=gen)
            u = u / u.pow(2).mean(-1, keepdim=True).sqrt()
            x = u * state[p + "attn_norm.weight"]  # [N, d]
            ref_c = x @ w_dkv.T + (b_dkv if b_dkv is not None else 0.0)  # [N, r]
            if att.kv_norm:
                ms = ref_c.pow(2).mean(-1, keepdim=True)
                ref_c = ref_c * torch.rsqrt(ms + att.rms_norm_eps) * state[p + "attn.kv_norm.weight"]
            up = torch.cat((state[p + "attn.w_uk.weight"], state[p + "attn.w_uv.weight"]))  # [H*(d_n+d_v), r]
            ref = ref_c @ up.T
            # exported path, fp32
            r = lay.rank
            w = torch.zeros(big_r, d)
            w[:r] = w_dkv * lay.row_scale
            z = x @ w.T  # [N, R]
            if b_dkv is not None:
                z[:, :r] += b_dkv * lay.row_scale
            c = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * lay.norm.float()
            up_x = torch.zeros(up.shape[0], big_r)
            up_x[:, :r] = up * lay.up_scale
            got = c @ up_x.T
            rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
            worst = max(worst, float(rel.max()))
    return worst


def _check_latent_dtype(model: Transformer, plan: ExportPlan, dtype: torch.dtype) -> None:
    """Refuse an export ``dtype`` that cannot hold the scaled latent rows or norm weights.

    A linear latent's rows ``s * w_dkv`` are tiny; fp16 flushes them into its subnormal range
    (or to zero). Casting loses more than the dtype's own rounding (``finfo.eps``) exactly then.

    Raises: MlakitError naming the layer, the loss and the dtypes that work.
    """
    if dtype == torch.float32 or _mla(plan.config).kv_norm:
        return
    state = model.state_dict()
    for i, lay in enumerate(plan.layers):
        scaled = [state[f"layers.{i}.attn.w_dkv.weight"].detach().double() * lay.row_scale, lay.norm.double()]
        b = state.get(f"layers.{i}.attn.w_dkv.bias")
        if plan.attention_bias and b is not None:
            scaled.append(b.detach().double() * lay.row_scale)
        for t in scaled:
            cast = t.to(dtype).double()
            loss = float((cast - t).norm() / t.norm().clamp_min(1e-300))
            if not bool(cast.isfinite().all()) or loss > torch.finfo(dtype).eps:
                name = str(dtype).removeprefix("torch.")
                raise MlakitError(
                    f"layer {i}: {name} cannot hold the exported latent (w_dkv x {lay.row_scale:.3g} for the "
                    f"epsilon-dominated kv_a_layernorm, norm weight {float(lay.norm.max()):g}): the cast loses "
                    f"{loss:.1e} relative, more than {name}'s rounding; export as bf16 (--dtype bf16, fp32's "
                    "exponent range) or fp32"
                )
