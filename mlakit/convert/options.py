"""How to convert: :class:`ConversionConfig`, its validation against a source, and the defaults
that depend on the source (rotary width, target context).

Every default is a measured choice on SmolLM2 (docs/conversion.md); the field docstrings say
what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlakit.convert.arch import SourceSpec
from mlakit.convert.layer import LayerRecipe
from mlakit.convert.ranks import Allocation
from mlakit.convert.rope import SourceRope, source_rope_pairs
from mlakit.errors import MlakitError


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
            original inputs (:func:`~mlakit.convert.sequential.sequential_correction`), so each layer corrects the error
            upstream instead of compounding it. ``False``: every layer from the original model's
            statistics alone. ``None`` (default): on for ``rope="full"`` (25% cache x1.74 -> x1.60
            on SmolLM2), off for ``"decoupled"``, where it measured worse (x1.45 -> x2.2 at 50%:
            the regression shrinks keys towards their conditional mean, which flattens attention
            once the inputs carry the decoupled form's larger error).
        sequential_windows: calibration windows the sequential pass runs (its cost is one
            forward of the converted model over them); ``None`` (default): all
            ``calibration_windows``. On SmolLM2's genre mix (plain-text calibration), full RoPE 50%
            x1.074 | x1.089 at 512 | 4096 tokens with 8, x1.067 | x1.084 with 16, x1.067 | x1.078
            with 32; 25% x1.751 | x1.871 -> x1.678 | x1.759 (+30-50 s per conversion here). With
            half the windows chat-framed, 64 calibration windows gave 50% x1.073 | x1.078 and 25%
            x1.775 | x1.851 against x1.077 | x1.081 and x1.818 | x1.899 with 32 (48: x1.083 | x1.082
            at 50%; +60 s per conversion).
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
    sequential_windows: int | None = None
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
            if getattr(self, n) is not None and getattr(self, n) <= 0:
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
        K+V (a cheap check; the exact bound, with biases, is :func:`~mlakit.convert.convert.plan_ranks`'s).

        Raises: MlakitError naming the source feature or the field, and the options that work.
        """
        if spec.qk_norm and self.rope == "decoupled" and not self.fold_qk_norm:
            raise MlakitError(
                f"{source}: {spec.model_type} normalises each head's query and key (q_norm, k_norm) before RoPE; "
                "decoupled RoPE cannot absorb a key norm, and folding it into constant scales measured top-1 "
                "agreement below 0.2 on Gemma 3 270M: convert with --rope full (exact at full rank), or pass "
                "--fold-qk-norm to fold anyway"
            )
        _, g, d = source_dims(spec)
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

        :func:`~mlakit.convert.convert.calibrate` keeps them from its own pass, so the sequential pass does not run the
        original model over them a second time.
        """
        if not (self.resolved_sequential() and self.method == "pca"):
            return 0
        return self.calibration_windows if self.sequential_windows is None else self.sequential_windows

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


def source_dims(spec: SourceSpec) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` of the source."""
    return spec.num_heads, spec.num_kv_heads, spec.head_dim


#: Default target context of the decoupled form's rotary pairs: the longest length the defaults
#: were measured at (docs/conversion.md); the source's own context when that is shorter.
DEFAULT_CONTEXT = 4096


def source_context(spec: SourceSpec) -> int:
    """Default ``context_length``: the source's ``max_position_embeddings``, at most :data:`DEFAULT_CONTEXT`."""
    return min(spec.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
