"""Convert a Hugging Face GQA model into an mlakit MLA :class:`~mlakit.model.Transformer`.

Pipeline (each step in its own module)::

    load.py       HF dir / GGUF / alias  ->  HF *ForCausalLM (float32) + tokenizer
    arch.py       its config             ->  SourceSpec: features, tensor names (Llama, Qwen, Gemma)
    calibrate.py  calibration windows     ->  sigma_l = E[x~ x~^T] per layer
    ranks.py      kv_fraction             ->  kv_lora_rank per layer
    rope.py       decoupled RoPE          ->  shared rotary key w_kr (RoRoPE on high frequencies)
    factorize.py  K_nope, V, sigma        ->  w_dkv, w_uk, w_uv (metric-weighted PCA)
    layer.py      one layer's MLA weights in mlakit names
    convert.py    the whole model, its config, and a record of how it was made

Everything but the attention (embeddings, norms, MLP, head) is copied unchanged (Gemma's
``(1 + w)`` norm weights as ``w + 1``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mlakit.config import MLAConfig, ModelConfig, RopeScaling
from mlakit.convert.arch import (
    SourceSpec,
    attention_weights,
    block_weights,
    head_norms,
    model_weights,
    source_spec,
)
from mlakit.convert.calibrate import (
    attention_input_moments,
    attention_inputs,
    attention_rotation_moments,
)
from mlakit.convert.factorize import AttentionWeights, energy_spectrum, single_thread
from mlakit.convert.layer import LayerRecipe, convert_layer, fold_head_norms, layer_dims, metrics
from mlakit.convert.load import LoadedModel, load_hf_model
from mlakit.convert.ranks import Allocation, check_ranks, greedy_ranks, latent_budget, uniform_ranks
from mlakit.convert.rope import SourceRope, decouple_rope, decoupled_rope_theta, source_rope_pairs
from mlakit.errors import MlakitError
from mlakit.io import write_dir, write_json
from mlakit.model import Transformer
from mlakit.rope import rope_inv_freq
from mlakit.text.corpus import Corpus, default_corpus, token_windows

logger = logging.getLogger(__name__)

RECORD_FILE = "conversion.json"


@dataclass(frozen=True)
class ConversionConfig:
    """How to convert.

    Attributes:
        kv_fraction: cache size as a fraction of the original (0, 1]; ignored when ``ranks`` is set.
        ranks: explicit ``kv_lora_rank`` (one for all layers, or one per layer).
        rope: ``"decoupled"`` (DeepSeek form, absorbable decode) or ``"full"`` (exact positions).
        method: ``"pca"`` (calibrated) or ``"svd"`` (plain SVD of the weights, the baseline).
        rope_dims: ``qk_rope_head_dim`` of the shared rotary key (decoupled only; even, <= head_dim);
            ``None``: :func:`default_rope_dims`, chosen from ``context_length``.
        context_length: decoupled only; the context the converted model must hold. The rotary key
            keeps every frequency pair that turns by a radian or more over it
            (:func:`mlakit.convert.rope.rope_pairs_for_context`). ``None``: the source's
            ``max_position_embeddings``, at most 4096 (the longest length measured).
        allocation: ``"uniform"`` or ``"greedy"`` rank allocation under the budget.
        key_metric / value_metric / key_weight: see :mod:`mlakit.convert.factorize` (defaults
            measured best on SmolLM2, docs/conversion.md).
        rope_mixing: decoupled only; how RoRoPE mixes the KV heads of one frequency into the
            shared rotary key: ``"complex"`` (a rotation and a scale per head; commutes with RoPE,
            measured far better) or ``"real"`` (a real weight per head, TransMLA's form).
        key_share: separate K and V budgets: the share of each layer's latent given to the keys'
            own PCA (``None``: one joint K/V PCA, the default).
        keep_first_wide: keep the first N layers at full latent rank (lossless position-free
            part); the remaining layers share what is left of the budget.
        sequential: convert layer by layer on the *converted* model's own activations: layer
            ``l`` is fitted on the inputs that the already converted layers ``0..l-1`` produce,
            and its keys and values are regressed onto what the original layer computed from the
            original inputs (:func:`sequential_correction`), so each layer corrects the error
            upstream instead of compounding it. ``False``: every layer from the original model's
            statistics alone. ``None`` (default): on for ``rope="full"`` (25% cache x1.74 -> x1.60
            on SmolLM2), off for ``"decoupled"``, where it measured worse (x1.45 -> x2.2 at 50%:
            the regression shrinks keys towards their conditional mean, which flattens attention
            once the inputs carry the decoupled form's larger error).
        sequential_windows: calibration windows the sequential pass runs (its cost is one
            forward of the converted model over them).
        fold_qk_norm: decoupled only, for sources with per-head q/k RMSNorms (Qwen3, Gemma 3):
            fold the norms into constant per-head scales (:func:`~mlakit.convert.layer.fold_head_norms`)
            instead of refusing. An approximation measured to break Gemma 3 270M (top-1 agreement
            with the source 0.16-0.19 with nothing else approximated; docs/conversion.md), so off by
            default: ``--rope full`` keeps these norms exactly.
        rotation_average: decoupled only; fold the attention-weighted expected rotation into the
            position-free query (needs ``calibrate(..., rotation_windows > 0)``; measured worse,
            off by default).
        calibration_windows / calibration_seq_len: size of the calibration set.
    """

    kv_fraction: float = 0.5
    ranks: tuple[int, ...] | None = None
    rope: Literal["decoupled", "full"] = "decoupled"
    method: Literal["pca", "svd"] = "pca"
    rope_dims: int | None = None
    context_length: int | None = None
    allocation: Allocation = "uniform"
    key_metric: Literal["balanced", "query", "query_diag"] = "query"
    value_metric: Literal["balanced", "output"] = "output"
    key_weight: float = 3.0
    rope_mixing: Literal["complex", "real"] = "complex"
    key_share: float | None = None
    keep_first_wide: int = 0
    sequential: bool | None = None
    sequential_windows: int = 8
    rotation_average: bool = False
    fold_qk_norm: bool = False
    calibration_windows: int = 32
    calibration_seq_len: int = 512

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> MlakitError:
            return MlakitError(f"ConversionConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.kv_fraction, (int, float)) or not 0 < self.kv_fraction <= 1:
            raise bad("kv_fraction", "must lie in (0, 1] (1 = the original cache size)")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
            if not self.ranks or any(r <= 0 for r in self.ranks):
                raise bad("ranks", "must be positive integers")
        if self.rope not in ("decoupled", "full"):
            raise bad("rope", "must be 'decoupled' or 'full'")
        if self.method not in ("pca", "svd"):
            raise bad("method", "must be 'pca' or 'svd'")
        if self.rope == "decoupled" and self.rope_dims is not None and (self.rope_dims <= 0 or self.rope_dims % 2):
            raise bad("rope_dims", "must be a positive even number (RoPE rotates pairs of dims)")
        if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 2):
            raise bad("context_length", "must be an integer >= 2 (tokens), or None for the source's context")
        if self.allocation not in ("uniform", "greedy"):
            raise bad("allocation", "must be 'uniform' or 'greedy'")
        if self.key_metric not in ("balanced", "query", "query_diag"):
            raise bad("key_metric", "must be 'balanced', 'query' or 'query_diag'")
        if self.value_metric not in ("balanced", "output"):
            raise bad("value_metric", "must be 'balanced' or 'output'")
        if not self.key_weight > 0:
            raise bad("key_weight", "must be > 0")
        if self.rope_mixing not in ("complex", "real"):
            raise bad("rope_mixing", "must be 'complex' or 'real'")
        if self.key_share is not None and not 0 <= self.key_share <= 1:
            raise bad("key_share", "must lie in [0, 1] or be None")
        if not isinstance(self.keep_first_wide, int) or self.keep_first_wide < 0:
            raise bad("keep_first_wide", "must be a non-negative integer")
        for n in ("calibration_windows", "calibration_seq_len", "sequential_windows"):
            if getattr(self, n) <= 0:
                raise bad(n, "must be positive")

    def resolved_rope_dims(
        self, head_dim: int, num_kv_heads: int, ropes: tuple[SourceRope, ...], source_context: int
    ) -> int:
        """``qk_rope_head_dim``: 0 for full RoPE, ``rope_dims`` if given, else :func:`default_rope_dims`."""
        if self.rope == "full":
            return 0
        if self.rope_dims is not None:
            return self.rope_dims
        # explicit ranks: the rotary key may be as wide as the smallest latent (half the layer's cache)
        per_layer = 2 * min(self.ranks) if self.ranks else int(self.kv_fraction * 2 * num_kv_heads * head_dim + 1e-9)
        return default_rope_dims(per_layer, head_dim, ropes=ropes, context_length=self.context_length or source_context)

    def check_source(self, spec: SourceSpec, source: str) -> None:
        """Refuse a conversion this source cannot take, before any calibration work: a feature the
        form cannot hold, a rotary key wider than the source's head, or a latent wider than its
        K+V (a cheap check; the exact bound, with biases, is :func:`plan_ranks`'s).

        Raises: MlakitError naming the source feature or the field, and the options that work.
        """
        if spec.qk_norm and self.rope == "decoupled" and not self.fold_qk_norm:
            raise MlakitError(
                f"{source}: {spec.model_type} normalises each head's query and key (q_norm, k_norm) before RoPE; "
                "decoupled RoPE cannot absorb a key norm, and folding it into constant scales measured top-1 "
                "agreement below 0.2 on Gemma 3 270M: convert with --rope full (exact at full rank), or pass "
                "--fold-qk-norm to fold anyway"
            )
        _, g, d = _source_dims(spec)
        if self.rope == "decoupled" and self.rope_dims is not None and self.rope_dims > d:
            raise MlakitError(
                f"ConversionConfig.rope_dims={self.rope_dims} is larger than the source's head_dim {d}: the rotary "
                f"key keeps at most every frequency pair of one head (an even number <= {d}); to serve a wider "
                "rotary key (DeepSeek's 64), export with `mlakit export-hf --pad-to 576`, which adds zero pairs"
            )
        limit = min(2 * g * d, spec.hidden_size + 1)
        for r in self.ranks or ():
            if r > limit:
                raise MlakitError(
                    f"ConversionConfig.ranks: kv_lora_rank {r} is larger than the source can fill ({limit}: K+V "
                    f"width {2 * g * d}, input width {spec.hidden_size}); a wider cache for an engine "
                    "(512 + 64 for vLLM/FlashMLA) comes from `mlakit export-hf --pad-to 576`, exactly"
                )

    def resolved_sequential(self) -> bool:
        """``sequential``, or its measured default for the rope kind (see the class docstring)."""
        if self.sequential is not None:
            return self.sequential
        return self.rope == "full"

    def recipe(
        self, head_dim: int, num_kv_heads: int, ropes: tuple[SourceRope, ...], source_context: int
    ) -> LayerRecipe:
        return LayerRecipe(
            rope=self.rope,
            method=self.method,
            rope_pairs=max(1, self.resolved_rope_dims(head_dim, num_kv_heads, ropes, source_context) // 2),
            key_metric=self.key_metric,
            value_metric=self.value_metric,
            key_weight=self.key_weight,
            rotation_average=self.rotation_average,
            complex_mixing=self.rope_mixing == "complex",
            key_share=self.key_share,
        )


def default_rope_dims(per_layer: int, head_dim: int, *, ropes: tuple[SourceRope, ...], context_length: int) -> int:
    """Decoupled rotary width for a budget and a target context (measured on SmolLM2, docs/conversion.md).

    Every pair that turns by a radian or more over ``context_length`` (a sliding layer: its window)
    under any of the source's RoPEs keeps a rotary component
    (:func:`~mlakit.convert.rope.source_rope_pairs`), but the rotary key takes at most half of a
    layer's cache budget (``per_layer`` values per token), so that the latent keeps the other half.
    """
    pairs = source_rope_pairs(ropes, head_dim, context_length)
    pairs = max(1, min(pairs, per_layer // 4))
    return 2 * pairs


@dataclass
class Calibrated:
    """A loaded source model with its calibration statistics (reused across conversions)."""

    loaded: LoadedModel
    spec: SourceSpec
    sigma: list[torch.Tensor]
    corpus: str
    tokens: int
    weights: list[AttentionWeights] = field(default_factory=list)
    rotation: list[torch.Tensor] | None = None
    windows: torch.Tensor | None = None
    _inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def original_inputs(self, num_windows: int) -> list[torch.Tensor]:
        """Attention inputs of the original model on the first ``num_windows`` calibration
        windows, per layer ``[N*T, n]`` (computed once, then reused by every conversion)."""
        if self.windows is None:
            raise MlakitError("sequential conversion needs the calibration windows: calibrate() keeps them")
        if num_windows not in self._inputs:
            self._inputs.clear()
            self._inputs[num_windows] = attention_inputs(self.loaded.model, self.windows[:num_windows])
        return self._inputs[num_windows]


@dataclass
class ConversionResult:
    """A converted model and the record of how it was made (written as ``conversion.json``)."""

    model: Transformer
    record: dict[str, Any]
    tokenizer: Any


def _source_dims(spec: SourceSpec) -> tuple[int, int, int]:
    return spec.num_heads, spec.num_kv_heads, spec.head_dim


#: Default target context of the decoupled form's rotary pairs: the longest length the defaults
#: were measured at (docs/conversion.md); the source's own context when that is shorter.
DEFAULT_CONTEXT = 4096


def _source_context(spec: SourceSpec) -> int:
    """Default ``context_length``: the source's ``max_position_embeddings``, at most :data:`DEFAULT_CONTEXT`."""
    return min(spec.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def calibrate(
    model: str | LoadedModel,
    *,
    windows: int = 32,
    seq_len: int = 512,
    corpus: Corpus | None = None,
    tokens: torch.Tensor | None = None,
    rotation_windows: int = 0,
    progress: bool = False,
    config: ConversionConfig | None = None,
) -> Calibrated:
    """Load (if needed) and collect calibration statistics.

    Args:
        corpus: calibration text (default: the built-in calibration split, disjoint from the
            evaluation split), cut into ``windows`` x ``seq_len`` tokens.
        tokens: ready ``[N, T]`` token ids instead of a corpus (tests, custom pipelines).
        rotation_windows: how many of the windows also measure attention-weighted rotations
            (only needed for ``ConversionConfig(rotation_average=True)``; 0 skips it).
        config: the conversion to come, checked against the source before the calibration pass.
    """
    loaded = model if isinstance(model, LoadedModel) else load_hf_model(model)
    spec = source_spec(loaded.model.config, loaded.source)
    if config is not None:
        config.check_source(spec, loaded.source)
    plain = not (spec.qk_norm or spec.rope_scaling or spec.layer_types or spec.attn_softcap or spec.query_scale != 1)
    if rotation_windows > 0 and not plain:
        raise MlakitError(
            f"{loaded.source}: rotation statistics (rotation_average) are measured for plain-RoPE Llama-style "
            f"attention only, not for {spec.model_type}'s"
        )
    if tokens is None:
        if loaded.tokenizer is None:
            raise MlakitError(f"{loaded.source}: a tokenizer is needed for calibration text")
        corpus = corpus or default_corpus("calibration")
        tokens = token_windows(corpus, loaded.tokenizer, num_windows=windows, seq_len=seq_len)
        name = corpus.name
    else:
        name = "given tokens"
    logger.info("calibrating on %d x %d tokens of %s", tokens.shape[0], tokens.shape[1], name)
    sigma = attention_input_moments(loaded.model, tokens, progress=progress)
    rotation = (
        attention_rotation_moments(loaded.model, tokens[:rotation_windows], spec.rope_theta, progress=progress)
        if rotation_windows > 0
        else None
    )
    hf_state = loaded.model.state_dict()
    weights = [attention_weights(spec, hf_state.get, i) for i in range(spec.num_layers)]
    return Calibrated(
        loaded=loaded,
        spec=spec,
        sigma=sigma,
        corpus=name,
        tokens=tokens.numel(),
        weights=weights,
        rotation=rotation,
        windows=tokens,
    )


def _max_rank(cal: Calibrated) -> int:
    """Largest useful latent rank: the K+V width, or the input width (+1 with biases)."""
    _, g, d = _source_dims(cal.spec)
    has_bias = bool(any(w.w_k[:, -1].abs().max() > 0 or w.w_v[:, -1].abs().max() > 0 for w in cal.weights))
    return min(2 * g * d, cal.spec.hidden_size + int(has_bias))


def plan_ranks(cal: Calibrated, config: ConversionConfig) -> tuple[int, ...]:
    """Per-layer ``kv_lora_rank`` for ``config`` (explicit, or from the budget)."""
    _, g, d = _source_dims(cal.spec)
    n_layers = len(cal.weights)
    max_rank = _max_rank(cal)
    config.check_source(cal.spec, str(cal.loaded.source))
    if config.ranks is not None:
        return check_ranks(config.ranks, n_layers, max_rank)
    rope_dims = config.resolved_rope_dims(d, g, cal.spec.ropes(), _source_context(cal.spec))
    if rope_dims > d:
        raise MlakitError(f"rope_dims={rope_dims} exceeds the head dim {d}")
    total = latent_budget(config.kv_fraction, original_per_layer=2 * g * d, num_layers=n_layers, rope_dims=rope_dims)
    wide = config.keep_first_wide
    if wide:
        if wide >= n_layers:
            raise MlakitError(f"keep_first_wide={wide} must be below the number of layers ({n_layers})")
        rest = total - wide * max_rank
        if rest < n_layers - wide:
            raise MlakitError(
                f"keep_first_wide={wide}: {wide} full-rank layers ({max_rank} each) leave {max(rest, 0)} latent dims "
                f"for the other {n_layers - wide} layers at kv_fraction={config.kv_fraction}; keep fewer layers wide"
            )
        head = (max_rank,) * wide
        if config.allocation == "uniform" or config.method == "svd":
            return head + uniform_ranks(rest, n_layers - wide, max_rank)
        return head + greedy_ranks(_spectra(cal, config)[wide:], rest, max_rank)
    if config.allocation == "uniform" or config.method == "svd":
        return uniform_ranks(total, n_layers, max_rank)
    return greedy_ranks(_spectra(cal, config), total, max_rank)


def _spectra(cal: Calibrated, config: ConversionConfig) -> list[torch.Tensor]:
    """Per layer, the weighted K/V energy spectrum greedy allocation ranks against."""
    _, g, d = _source_dims(cal.spec)
    recipe = config.recipe(d, g, cal.spec.ropes(), _source_context(cal.spec))
    spectra = []
    for i, (w, s) in enumerate(zip(cal.weights, cal.sigma)):
        w = _layer_weights(cal, i, w, s, recipe)
        m_k, m_v = metrics(w, s, recipe)
        w_k = w.w_k
        if recipe.rope == "decoupled":
            w_k = decouple_rope(
                w,
                s,
                recipe.rope_pairs,
                cal.spec.rope_theta,
                query_weighted=recipe.rope_query_weighted,
                complex_mixing=recipe.complex_mixing,
            ).w_k_nope
        spectra.append(energy_spectrum(w_k, w.w_v, s, m_k, m_v, recipe.key_weight))
    return spectra


def _layer_weights(
    cal: Calibrated, layer: int, w: AttentionWeights, sigma: torch.Tensor, recipe: LayerRecipe
) -> AttentionWeights:
    """Layer ``layer``'s weights as the chosen form factorises them: with per-head q/k norms
    (Qwen3, Gemma 3) and decoupled RoPE, the norms are folded into calibrated constant scales
    (:func:`~mlakit.convert.layer.fold_head_norms`, an approximation); otherwise unchanged."""
    norms = head_norms(cal.spec, cal.loaded.model.state_dict().get, layer)
    if norms is None or recipe.rope == "full":
        return w
    return fold_head_norms(w, *norms, sigma, cal.spec.rms_norm_eps)


def _decoupled_scaling(scaling: RopeScaling | None, theta: float, rope_dim: int) -> RopeScaling | None:
    """The source's RoPE scaling for a decoupled rotary key, or None where it changes none of the
    kept frequencies (then every runtime reproduces them with plain RoPE)."""
    if scaling is None:
        return None
    scaled = rope_inv_freq(rope_dim, theta, scaling, torch.float64)
    return None if torch.equal(scaled, rope_inv_freq(rope_dim, theta, None, torch.float64)) else scaling


def convert_calibrated(cal: Calibrated, config: ConversionConfig, *, progress: bool = False) -> ConversionResult:
    """Convert a calibrated source model (see :func:`calibrate`) under ``config``."""
    from tqdm.auto import tqdm

    t0 = time.time()
    spec = cal.spec
    config.check_source(spec, str(cal.loaded.source))
    h, g, d = _source_dims(spec)
    theta = spec.rope_theta
    if config.rotation_average and config.rope == "decoupled" and cal.rotation is None:
        raise MlakitError("rotation_average=True needs rotation statistics: calibrate(..., rotation_windows=8)")
    ranks = plan_ranks(cal, config)
    recipe = config.recipe(d, g, spec.ropes(), _source_context(spec))
    has_bias = any(
        w.w_q[:, -1].abs().max() > 0 or w.w_k[:, -1].abs().max() > 0 or w.w_v[:, -1].abs().max() > 0
        for w in cal.weights
    )
    dn, dr = layer_dims(recipe, d)
    full = config.rope == "full"
    new_theta = theta if full else decoupled_rope_theta(theta, recipe.rope_pairs, d)
    local_theta = spec.local_rope_theta
    if local_theta is not None and not full:
        local_theta = decoupled_rope_theta(local_theta, recipe.rope_pairs, d)
    scaling = spec.rope_scaling if full else _decoupled_scaling(spec.rope_scaling, new_theta, dr)
    att = MLAConfig(
        hidden_size=spec.hidden_size,
        num_heads=h,
        kv_lora_rank=max(ranks),
        qk_nope_head_dim=dn,
        qk_rope_head_dim=dr,
        v_head_dim=d,
        q_lora_rank=None,
        rope_theta=new_theta,
        rope_scaling=scaling,
        rms_norm_eps=spec.rms_norm_eps,
        rope_mode=config.rope,
        kv_norm=False,
        attention_bias=has_bias,
        qk_norm=spec.qk_norm and full,
        logit_softcap=spec.attn_softcap,
    )
    mc = spec.model_config(
        att,
        kv_lora_ranks=ranks,
        local_rope_theta=local_theta,
        name=f"{Path(str(cal.loaded.source)).name}-mla-{config.rope}",
    )
    max_rank = _max_rank(cal)
    # nothing to correct when no layer is compressed (full RoPE at full rank is exact)
    compressed = any(r < max_rank for r in ranks) or not full
    sequential = config.resolved_sequential() and config.method == "pca" and compressed
    layer_states = []
    run = _SequentialRun(cal, mc, config.sequential_windows) if sequential else None
    for i in tqdm(
        range(len(cal.weights)), desc=f"convert ({config.rope}, {config.method})", disable=not progress, leave=False
    ):
        rot = cal.rotation[i] if cal.rotation is not None else None
        w, sigma = run.layer_inputs(i) if run is not None else (cal.weights[i], cal.sigma[i])
        st, _ = convert_layer(_layer_weights(cal, i, w, sigma, recipe), sigma, ranks[i], recipe, theta, rot)
        layer_states.append(st)
        if run is not None:
            run.advance(i, st, has_bias)
    state = _model_state(cal, layer_states, has_bias)
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise MlakitError(
            f"{cal.loaded.source}: the conversion produced non-finite weights ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was written"
        )
    model = Transformer.from_state_dict(mc, state, source=f"the conversion of {cal.loaded.source}")
    original = 2 * g * d * len(ranks)
    cached = sum(ranks) + dr * len(ranks)
    approximations = []
    if spec.qk_norm and not full:
        approximations.append(
            "per-head q/k RMSNorm folded into constant per-head scales (1 / calibrated RMS): decoupled RoPE "
            "cannot absorb a key norm"
        )
    record = {
        "source": str(cal.loaded.source),
        "source_architecture": spec.model_type,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "kv_lora_ranks": list(ranks),
        "qk_rope_head_dim": dr,
        "rope_theta": new_theta,
        "source_rope_theta": theta,
        "local_rope_theta": local_theta,
        "rope_scaling": dataclasses.asdict(scaling) if scaling is not None else None,
        "approximations": approximations,
        "cache_elements_per_token": cached,
        "source_cache_elements_per_token": original,
        "kv_fraction_achieved": cached / original,
        "calibration": {
            "corpus": cal.corpus,
            "tokens": cal.tokens,
            "sequential_tokens": run.tokens if run is not None else 0,
        },
        "seconds": round(time.time() - t0, 1),
    }
    return ConversionResult(model=model, record=record, tokenizer=cal.loaded.tokenizer)


def _layer_state(cal: Calibrated, layer: int, ls: dict[str, torch.Tensor], has_bias: bool) -> dict[str, torch.Tensor]:
    """One mlakit block's state (names relative to the block): converted attention ``ls`` plus
    the source layer's norms and MLP (and the per-head q/k norms when ``ls`` keeps them: full RoPE)."""
    spec = cal.spec
    get = cal.loaded.model.state_dict().get
    st = block_weights(spec, get, layer)
    for k, v in ls.items():
        if k.endswith(".bias") and not has_bias:
            continue
        st["attn." + k] = v
    norms = head_norms(spec, get, layer)
    if norms is not None and "w_kr.weight" not in ls:  # decoupled: folded into w_q/w_k (_layer_weights)
        st["attn.q_head_norm.weight"], st["attn.k_head_norm.weight"] = norms
    if has_bias:
        st["attn.w_o.bias"] = torch.zeros(spec.hidden_size, dtype=torch.float64)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in st.items()}


def _model_state(
    cal: Calibrated, layer_states: list[dict[str, torch.Tensor]], has_bias: bool
) -> dict[str, torch.Tensor]:
    """Full mlakit state dict: converted attention plus everything else copied from the source."""
    st = model_weights(cal.spec, cal.loaded.model.state_dict().get)
    st = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in st.items()}
    for i, ls in enumerate(layer_states):
        for k, v in _layer_state(cal, i, ls, has_bias).items():
            st[f"layers.{i}.{k}"] = v
    return st


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
    xo, xc = x_orig.double(), x_conv.double()
    num, n = xc.shape
    s_cc = xc.T @ xc / num
    s_oc = xo.T @ xc / num
    lam = damp * float(s_cc.diagonal().mean())
    eye = torch.eye(n, dtype=torch.float64)
    with single_thread():
        t = torch.linalg.solve(s_cc + lam * eye, s_oc.T + lam * eye).T  # (s_oc + lam) (s_cc + lam)^-1
    t_aug = torch.eye(n + 1, dtype=torch.float64)
    t_aug[:n, :n] = t
    xa = torch.cat([xc, torch.ones(num, 1, dtype=torch.float64)], dim=1)
    return t_aug, xa.T @ xa / num


class _SequentialRun:
    """Runs the calibration windows through the model as it is being converted, layer by layer."""

    def __init__(self, cal: Calibrated, config: ModelConfig, num_windows: int) -> None:
        self.cal, self.config = cal, config
        self.x_orig = cal.original_inputs(num_windows)
        assert cal.windows is not None
        windows = cal.windows[:num_windows]
        self.tokens = windows.numel()
        with torch.device("meta"):
            shell = Transformer(dataclasses.replace(config, max_seq_len=max(config.max_seq_len, windows.shape[1])))
        shell.reset_rope_tables("cpu")
        self.rotary = {i: shell.rotary_of(i) for i in range(config.num_layers)}  # the converted model's own tables
        shell.embed.weight = torch.nn.Parameter(
            model_weights(cal.spec, cal.loaded.model.state_dict().get)["embed.weight"]
        )
        with torch.no_grad():
            self.hidden = shell.embed_tokens(windows).float()  # [N, T, n], scaled as the converted model does

    def layer_inputs(self, i: int) -> tuple[AttentionWeights, torch.Tensor]:
        """Layer ``i``'s weights regressed onto the converted inputs, and their second moment."""
        hf_layer = self.cal.loaded.model.model.layers[i]
        with torch.no_grad():
            x_conv = hf_layer.input_layernorm(self.hidden).reshape(-1, self.hidden.shape[-1])
        t, sigma = sequential_correction(self.x_orig[i], x_conv)
        w = self.cal.weights[i]
        # queries keep the original weights: also regressing them measured worse (docs/conversion.md)
        return dataclasses.replace(w, w_k=w.w_k @ t, w_v=w.w_v @ t), sigma

    def advance(self, i: int, state: dict[str, torch.Tensor], has_bias: bool) -> None:
        """Run the converted layer ``i`` over the hidden states."""
        from mlakit.model import Block

        block = Block(self.config, i, self.rotary[i])
        block.load_state_dict(_layer_state(self.cal, i, state, has_bias))
        block.eval()
        with torch.no_grad():
            self.hidden = torch.cat([block(x, None, None, "naive", None) for x in self.hidden.split(4)])


def save_converted(result: ConversionResult, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the checkpoint (safetensors + config + tokenizer + ``conversion.json``) atomically:
    into a temporary sibling directory that is renamed at the end, so no partial ``out`` exists.

    Raises:
        MlakitError: ``out`` exists (and ``overwrite`` is false) or its parent is not writable.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise MlakitError(f"--out {out} already exists; choose a new directory")

    def write(tmp: Path) -> None:
        result.model.save_pretrained(tmp, metadata={"conversion": result.record})
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, result.record)

    write_dir(out.resolve(), write, overwrite=True)
    return out


def convert(
    model: str,
    out: str | os.PathLike[str],
    config: ConversionConfig | None = None,
    *,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Load ``model``, calibrate, convert under ``config`` and save to ``out``; returns ``out``."""
    config = config or ConversionConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise MlakitError(f"--out {out} already exists; choose a new directory")
    cal = calibrate(
        model,
        windows=config.calibration_windows,
        seq_len=config.calibration_seq_len,
        progress=progress,
        config=config,
    )
    return save_converted(convert_calibrated(cal, config, progress=progress), out, overwrite=overwrite)
