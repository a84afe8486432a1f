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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mlakit.config import MLAConfig, ModelConfig, RopeScaling
from mlakit.convert.arch import (
    Getter,
    SourceSpec,
    attention_weights,
    block_weights,
    head_norms,
    model_weights,
    source_spec,
)
from mlakit.convert.calibrate import attention_rotation_moments
from mlakit.convert.factorize import AttentionWeights, energy_spectrum, single_thread
from mlakit.convert.layer import LayerRecipe, convert_layer, fold_head_norms, layer_dims, metrics
from mlakit.convert.load import LoadedModel, load_hf_model
from mlakit.convert.ranks import (
    Allocation,
    check_ranks,
    greedy_ranks,
    latent_budget,
    sensitivity_ranks,
    uniform_ranks,
)
from mlakit.convert.rope import SourceRope, decouple_rope, decoupled_rope_theta, source_rope_pairs
from mlakit.convert.sensitivity import rank_grid
from mlakit.convert.source import OriginalLayers, attention_input_moments, run_block
from mlakit.errors import MlakitError
from mlakit.io import write_dir, write_json
from mlakit.model import Transformer
from mlakit.rope import rope_inv_freq
from mlakit.text.chat import mixed_windows
from mlakit.text.corpus import Corpus, default_corpus

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
        allocation: rank allocation under the budget: ``"uniform"``, ``"greedy"`` (by calibrated
            spectra) or ``"sensitivity"`` (by the measured loss of converting each layer alone at a
            few ranks; needs the whole model: the in-memory path only, +1-2 minutes on SmolLM2;
            measured better at both lengths and budgets, docs/conversion.md).
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
            forward of the converted model over them). 32 (all of the default calibration set):
            on SmolLM2's genre mix, full RoPE 50% x1.074 | x1.089 at 512 | 4096 tokens with 8,
            x1.067 | x1.084 with 16, x1.067 | x1.078 with 32; 25% x1.751 | x1.871 -> x1.678 | x1.759
            (+30-50 s per conversion here).
        fold_qk_norm: decoupled only, for sources with per-head q/k RMSNorms (Qwen3, Gemma 3):
            fold the norms into constant per-head scales (:func:`~mlakit.convert.layer.fold_head_norms`)
            instead of refusing. An approximation measured to break Gemma 3 270M (top-1 agreement
            with the source 0.16-0.19 with nothing else approximated; docs/conversion.md), so off by
            default: ``--rope full`` keeps these norms exactly.
        rotation_average: decoupled only; fold the attention-weighted expected rotation into the
            position-free query (needs ``calibrate(..., rotation_windows > 0)``; measured worse,
            off by default).
        calibration_windows / calibration_seq_len: size of the calibration set.
        calibration_chat: share of the calibration windows framed as chat requests
            (:mod:`mlakit.text.chat`: system prompt at position 0, ending at the generation
            prompt). ``None``: 0.5 when the source's tokenizer has a chat template, else 0. An
            instruct model calibrated on plain text only can keep its perplexity and end every
            turn at once (docs/conversion.md "Chat").
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
    sequential_windows: int = 32
    rotation_average: bool = False
    fold_qk_norm: bool = False
    calibration_windows: int = 32
    calibration_seq_len: int = 512
    calibration_chat: float | None = None

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
        if self.allocation not in ("uniform", "greedy", "sensitivity"):
            raise bad("allocation", "must be 'uniform', 'greedy' or 'sensitivity'")
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
        if self.calibration_chat is not None and not 0 <= self.calibration_chat <= 1:
            raise bad("calibration_chat", "must lie in [0, 1] (the share of windows framed as chat requests)")
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

    def sequential_inputs(self) -> int:
        """Calibration windows whose original attention inputs this conversion reads (0: none).

        :func:`calibrate` keeps them from its own pass, so the sequential pass does not run the
        original model over them a second time.
        """
        return self.sequential_windows if self.resolved_sequential() and self.method == "pca" else 0

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

    @property
    def get(self) -> Getter:
        """Reads one source tensor by its Hugging Face name."""
        return self.loaded.model.state_dict().get  # type: ignore[no-any-return]

    def original_inputs(self, num_windows: int) -> list[torch.Tensor]:
        """Attention inputs of the original model on the first ``num_windows`` calibration
        windows, per layer ``[N*T, n]`` (computed once, then reused by every conversion)."""
        if self.windows is None:
            raise MlakitError("sequential conversion needs the calibration windows: calibrate() keeps them")
        if num_windows not in self._inputs:
            self._inputs.clear()
            windows = self.windows[:num_windows]
            run = OriginalLayers(self.spec, self.get, windows.shape[1])
            self._inputs[num_windows] = [
                attention_input(blk, h).reshape(-1, h.shape[-1]) for _, blk, h in run.layers(windows)
            ]
        return self._inputs[num_windows]


@dataclass
class ConversionResult:
    """A converted model and the record of how it was made (written as ``conversion.json``)."""

    model: Transformer
    record: dict[str, Any]
    tokenizer: Any


def attention_input(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    """What layer ``block``'s attention reads: its RMSNorm of ``hidden [N, T, n]``."""
    with torch.no_grad():
        return block.attn_norm(hidden)  # type: ignore[no-any-return]


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
    keep_inputs: int | None = None,
    progress: bool = False,
    config: ConversionConfig | None = None,
    chat: float | None = None,
) -> Calibrated:
    """Load (if needed) and collect calibration statistics.

    Args:
        corpus: calibration text (default: the built-in calibration split, disjoint from the
            evaluation split), cut into ``windows`` x ``seq_len`` tokens.
        tokens: ready ``[N, T]`` token ids instead of a corpus (tests, custom pipelines).
        rotation_windows: how many of the windows also measure attention-weighted rotations
            (only needed for ``ConversionConfig(rotation_average=True)``; 0 skips it).
        keep_inputs: keep every layer's attention inputs on the first ``keep_inputs`` windows
            for sequential conversions (:meth:`Calibrated.original_inputs`; float32, ``L x
            keep_inputs x seq_len x hidden``: 1.1 GiB for SmolLM2 at 32 x 512). ``None``: what
            ``config`` reads (:meth:`ConversionConfig.sequential_inputs`), else 0. Taken from this
            pass, they cost no second pass of the original model (26 s of a full-RoPE conversion
            of SmolLM2 here).
        config: the conversion to come, checked against the source before the calibration pass.
        chat: share of the corpus windows framed as chat requests (:func:`mlakit.text.chat.frame_windows`);
            ``None``: ``config.calibration_chat``, and when that is ``None`` too, 0.5 for a
            tokenizer with a chat template, else 0. Not applied to given ``tokens``.
    """
    from tqdm.auto import tqdm

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
        if chat is None and config is not None:
            chat = config.calibration_chat
        tokens, name = mixed_windows(corpus, loaded.tokenizer, num_windows=windows, seq_len=seq_len, chat=chat)
    else:
        name = "given tokens"
    logger.info("calibrating on %d x %d tokens of %s", tokens.shape[0], tokens.shape[1], name)
    get = loaded.model.state_dict().get
    keep = keep_inputs if keep_inputs is not None else (config.sequential_inputs() if config is not None else 0)
    if keep < 0:
        raise MlakitError(f"keep_inputs={keep} must be >= 0")
    sigma: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for _, blk, h in tqdm(
        OriginalLayers(spec, get, tokens.shape[1]).layers(tokens),
        total=spec.num_layers,
        desc="calibrate",
        disable=not progress,
        leave=False,
    ):
        sigma.append(attention_input_moments(blk, h))
        if keep > 0:
            kept.append(attention_input(blk, h[:keep]).reshape(-1, h.shape[-1]))
    rotation = (
        attention_rotation_moments(loaded.model, tokens[:rotation_windows], spec.rope_theta, progress=progress)
        if rotation_windows > 0
        else None
    )
    weights = [attention_weights(spec, get, i) for i in range(spec.num_layers)]
    return Calibrated(
        loaded=loaded,
        spec=spec,
        sigma=sigma,
        corpus=name,
        tokens=tokens.numel(),
        weights=weights,
        rotation=rotation,
        windows=tokens,
        _inputs={keep: kept} if keep > 0 else {},
    )


def max_latent_rank(spec: SourceSpec, has_bias: bool) -> int:
    """Largest useful latent rank: the K+V width, or the input width (+1 with biases)."""
    _, g, d = _source_dims(spec)
    return min(2 * g * d, spec.hidden_size + int(has_bias))


def has_qkv_bias(spec: SourceSpec, get: Getter) -> bool:
    """Whether any layer's q, k or v projection has a non-zero bias (reads the bias tensors only)."""
    return any(
        bool(b.any())
        for i in range(spec.num_layers)
        for name in ("q_proj", "k_proj", "v_proj")
        if (b := get(f"model.layers.{i}.self_attn.{name}.bias")) is not None
    )


def plan_ranks(cal: Calibrated, config: ConversionConfig, *, progress: bool = False) -> tuple[int, ...]:
    """Per-layer ``kv_lora_rank`` for ``config`` (explicit, or from the budget)."""
    config.check_source(cal.spec, str(cal.loaded.source))
    recipe = _recipe(cal.spec, config)

    def spectra() -> list[torch.Tensor]:
        return [spectrum(cal.spec, cal.get, i, w, s, recipe) for i, (w, s) in enumerate(zip(cal.weights, cal.sigma))]

    def sensitivity(grid: tuple[int, ...]) -> torch.Tensor:
        from mlakit.convert.sensitivity import layer_sensitivity

        return layer_sensitivity(cal, config, grid, progress=progress)

    return source_ranks(
        cal.spec, config, max_latent_rank(cal.spec, has_qkv_bias(cal.spec, cal.get)), spectra, sensitivity
    )


def source_ranks(
    spec: SourceSpec,
    config: ConversionConfig,
    max_rank: int,
    spectra: Callable[[], list[torch.Tensor]],
    sensitivity: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> tuple[int, ...]:
    """:func:`plan_ranks` for a source; ``spectra()`` (greedy allocation) gives every layer's spectrum,
    ``sensitivity(grid)`` (sensitivity allocation; None where the model is not in memory) the
    ``[L, len(grid)]`` measured losses (:func:`mlakit.convert.sensitivity.layer_sensitivity`)."""
    _, g, d = _source_dims(spec)
    n_layers = spec.num_layers
    if config.ranks is not None:
        return check_ranks(config.ranks, n_layers, max_rank)
    rope_dims = config.resolved_rope_dims(d, g, spec.ropes(), _source_context(spec))
    if rope_dims > d:
        raise MlakitError(f"rope_dims={rope_dims} exceeds the head dim {d}")
    total = latent_budget(config.kv_fraction, original_per_layer=2 * g * d, num_layers=n_layers, rope_dims=rope_dims)
    greedy = config.allocation == "greedy" and config.method != "svd"
    wide = config.keep_first_wide
    if config.allocation == "sensitivity" and config.method != "svd":
        if wide:
            raise MlakitError("allocation='sensitivity' measures every layer: it does not combine with keep_first_wide")
        if sensitivity is None:
            raise MlakitError(
                "allocation='sensitivity' runs the whole model many times: it needs the in-memory path "
                "(`mlakit convert --allocation sensitivity` takes it; in Python calibrate() + convert_calibrated())"
            )
        grid = rank_grid(total, n_layers, max_rank)
        return sensitivity_ranks(sensitivity(grid), grid, total, max_rank)
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
        if not greedy:
            return head + uniform_ranks(rest, n_layers - wide, max_rank)
        return head + greedy_ranks(spectra()[wide:], rest, max_rank)
    if not greedy:
        return uniform_ranks(total, n_layers, max_rank)
    return greedy_ranks(spectra(), total, max_rank)


def _recipe(spec: SourceSpec, config: ConversionConfig) -> LayerRecipe:
    _, g, d = _source_dims(spec)
    return config.recipe(d, g, spec.ropes(), _source_context(spec))


def spectrum(
    spec: SourceSpec, get: Getter, layer: int, w: AttentionWeights, sigma: torch.Tensor, recipe: LayerRecipe
) -> torch.Tensor:
    """Layer ``layer``'s weighted K/V energy spectrum, what greedy allocation ranks against."""
    w = _layer_weights(spec, get, layer, w, sigma, recipe)
    m_k, m_v = metrics(w, sigma, recipe)
    w_k = w.w_k
    if recipe.rope == "decoupled":
        w_k = decouple_rope(
            w,
            sigma,
            recipe.rope_pairs,
            spec.rope_theta,
            query_weighted=recipe.rope_query_weighted,
            complex_mixing=recipe.complex_mixing,
        ).w_k_nope
    return energy_spectrum(w_k, w.w_v, sigma, m_k, m_v, recipe.key_weight)


def _layer_weights(
    spec: SourceSpec, get: Getter, layer: int, w: AttentionWeights, sigma: torch.Tensor, recipe: LayerRecipe
) -> AttentionWeights:
    """Layer ``layer``'s weights as the chosen form factorises them: with per-head q/k norms
    (Qwen3, Gemma 3) and decoupled RoPE, the norms are folded into calibrated constant scales
    (:func:`~mlakit.convert.layer.fold_head_norms`, an approximation); otherwise unchanged."""
    norms = head_norms(spec, get, layer)
    if norms is None or recipe.rope == "full":
        return w
    return fold_head_norms(w, *norms, sigma, spec.rms_norm_eps)


def _decoupled_scaling(scaling: RopeScaling | None, theta: float, rope_dim: int) -> RopeScaling | None:
    """The source's RoPE scaling for a decoupled rotary key, or None where it changes none of the
    kept frequencies (then every runtime reproduces them with plain RoPE)."""
    if scaling is None:
        return None
    scaled = rope_inv_freq(rope_dim, theta, scaling, torch.float64)
    return None if torch.equal(scaled, rope_inv_freq(rope_dim, theta, None, torch.float64)) else scaling


@dataclass(frozen=True)
class ConversionPlan:
    """What every layer of one conversion shares: the ranks, the recipe and the converted model's config."""

    ranks: tuple[int, ...]
    recipe: LayerRecipe
    model: ModelConfig
    has_bias: bool
    sequential: bool


def plan_conversion(
    spec: SourceSpec, config: ConversionConfig, ranks: tuple[int, ...], has_bias: bool, name: str
) -> ConversionPlan:
    """The converted model's config for ``ranks`` (RoPE bases and scaling for the chosen form)."""
    h, _, d = _source_dims(spec)
    recipe = _recipe(spec, config)
    dn, dr = layer_dims(recipe, d)
    full = config.rope == "full"
    new_theta = spec.rope_theta if full else decoupled_rope_theta(spec.rope_theta, recipe.rope_pairs, d)
    local_theta = spec.local_rope_theta
    if local_theta is not None and not full:
        local_theta = decoupled_rope_theta(local_theta, recipe.rope_pairs, d)
    att = MLAConfig(
        hidden_size=spec.hidden_size,
        num_heads=h,
        kv_lora_rank=max(ranks),
        qk_nope_head_dim=dn,
        qk_rope_head_dim=dr,
        v_head_dim=d,
        q_lora_rank=None,
        rope_theta=new_theta,
        rope_scaling=spec.rope_scaling if full else _decoupled_scaling(spec.rope_scaling, new_theta, dr),
        rms_norm_eps=spec.rms_norm_eps,
        rope_mode=config.rope,
        kv_norm=False,
        attention_bias=has_bias,
        qk_norm=spec.qk_norm and full,
        logit_softcap=spec.attn_softcap,
    )
    mc = spec.model_config(
        att, kv_lora_ranks=ranks, local_rope_theta=local_theta, name=f"{Path(name).name}-mla-{config.rope}"
    )
    # nothing to correct when no layer is compressed (full RoPE at full rank is exact)
    compressed = any(r < max_latent_rank(spec, has_bias) for r in ranks) or not full
    sequential = config.sequential_inputs() > 0 and compressed  # the one rule calibrate() also keeps inputs by
    return ConversionPlan(ranks=ranks, recipe=recipe, model=mc, has_bias=has_bias, sequential=sequential)


def convert_block(
    spec: SourceSpec,
    get: Getter,
    plan: ConversionPlan,
    layer: int,
    w: AttentionWeights,
    sigma: torch.Tensor,
    rotation: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Layer ``layer`` converted: its whole mlakit block state (names below ``layers.{layer}.``), float32."""
    w = _layer_weights(spec, get, layer, w, sigma, plan.recipe)
    st, _ = convert_layer(w, sigma, plan.ranks[layer], plan.recipe, spec.rope_theta, rotation)
    state = _layer_state(spec, get, layer, st, plan.has_bias)
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise MlakitError(
            f"layer {layer}: the conversion produced non-finite weights ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was written"
        )
    return state


def conversion_record(
    spec: SourceSpec,
    config: ConversionConfig,
    plan: ConversionPlan,
    *,
    source: str,
    corpus: str,
    tokens: int,
    sequential_tokens: int,
    seconds: float,
) -> dict[str, Any]:
    """What ``conversion.json`` records: the source, the config, the shapes, the calibration."""
    _, g, d = _source_dims(spec)
    att = plan.model.attention
    assert isinstance(att, MLAConfig)
    ranks, dr, full = plan.ranks, att.qk_rope_head_dim, config.rope == "full"
    original = 2 * g * d * len(ranks)
    cached = sum(ranks) + dr * len(ranks)
    approximations = []
    if spec.qk_norm and not full:
        approximations.append(
            "per-head q/k RMSNorm folded into constant per-head scales (1 / calibrated RMS): decoupled RoPE "
            "cannot absorb a key norm"
        )
    return {
        "source": source,
        "source_architecture": spec.model_type,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "kv_lora_ranks": list(ranks),
        "qk_rope_head_dim": dr,
        "rope_theta": att.rope_theta,
        "source_rope_theta": spec.rope_theta,
        "local_rope_theta": plan.model.local_rope_theta,
        "rope_scaling": dataclasses.asdict(att.rope_scaling) if att.rope_scaling is not None else None,
        "approximations": approximations,
        "cache_elements_per_token": cached,
        "source_cache_elements_per_token": original,
        "kv_fraction_achieved": cached / original,
        "calibration": {"corpus": corpus, "tokens": tokens, "sequential_tokens": sequential_tokens},
        "seconds": round(seconds, 1),
    }


def convert_calibrated(cal: Calibrated, config: ConversionConfig, *, progress: bool = False) -> ConversionResult:
    """Convert a calibrated source model (see :func:`calibrate`) under ``config``."""
    from tqdm.auto import tqdm

    t0 = time.time()
    spec, get = cal.spec, cal.get
    config.check_source(spec, str(cal.loaded.source))
    if config.rotation_average and config.rope == "decoupled" and cal.rotation is None:
        raise MlakitError("rotation_average=True needs rotation statistics: calibrate(..., rotation_windows=8)")
    plan = plan_conversion(
        spec,
        config,
        plan_ranks(cal, config, progress=progress),
        has_qkv_bias(cal.spec, cal.get),
        str(cal.loaded.source),
    )
    run = None
    if plan.sequential:
        assert cal.windows is not None
        run = SequentialRun(spec, get, plan, cal.windows[: config.sequential_windows])
        x_orig = cal.original_inputs(config.sequential_windows)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model_weights(spec, get).items()}
    for i in tqdm(
        range(spec.num_layers), desc=f"convert ({config.rope}, {config.method})", disable=not progress, leave=False
    ):
        rot = cal.rotation[i] if cal.rotation is not None else None
        w, sigma = run.layer_inputs(i, cal.weights[i], x_orig[i]) if run is not None else (cal.weights[i], cal.sigma[i])
        layer = convert_block(spec, get, plan, i, w, sigma, rot)
        state.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        if run is not None:
            run.advance(i, layer)
    model = Transformer.from_state_dict(plan.model, state, source=f"the conversion of {cal.loaded.source}")
    record = conversion_record(
        spec,
        config,
        plan,
        source=str(cal.loaded.source),
        corpus=cal.corpus,
        tokens=cal.tokens,
        sequential_tokens=run.tokens if run is not None else 0,
        seconds=time.time() - t0,
    )
    return ConversionResult(model=model, record=record, tokenizer=cal.loaded.tokenizer)


def _layer_state(
    spec: SourceSpec, get: Getter, layer: int, ls: dict[str, torch.Tensor], has_bias: bool
) -> dict[str, torch.Tensor]:
    """One mlakit block's state (names relative to the block): converted attention ``ls`` plus
    the source layer's norms and MLP (and the per-head q/k norms when ``ls`` keeps them: full RoPE)."""
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
