"""Convert a Hugging Face GQA model into an mlakit MLA :class:`~mlakit.model.Transformer`.

Pipeline (each step in its own module)::

    load.py       HF dir / GGUF / alias  ->  HF *ForCausalLM (float32) + tokenizer
    arch.py       its config             ->  SourceSpec: features, tensor names (Llama, Qwen, Gemma)
    calibrate.py  calibration windows     ->  sigma_l = E[x~ x~^T] per layer
    ranks.py      kv_fraction             ->  kv_lora_rank per layer
    rope.py       decoupled RoPE          ->  shared rotary key w_kr (RoRoPE on high frequencies)
    factorize.py  K_nope, V, sigma        ->  w_dkv, w_uk, w_uv (metric-weighted PCA)
    layer.py      one layer's MLA weights in mlakit names
    options.py    ConversionConfig: how to convert, checked against the source
    sequential.py each layer fitted on the converted layers' outputs (full RoPE)
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
from typing import Any

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
from mlakit.convert.factorize import AttentionWeights, energy_spectrum
from mlakit.convert.layer import LayerRecipe, convert_layer, fold_head_norms, layer_dims, metrics
from mlakit.convert.load import LoadedModel, load_hf_model
from mlakit.convert.options import ConversionConfig, source_context, source_dims
from mlakit.convert.ranks import (
    check_ranks,
    greedy_ranks,
    latent_budget,
    sensitivity_ranks,
    uniform_ranks,
)
from mlakit.convert.rope import decouple_rope, decoupled_rope_theta
from mlakit.convert.sensitivity import rank_grid
from mlakit.convert.sequential import SequentialRun
from mlakit.convert.source import OriginalLayers, attention_input_moments
from mlakit.errors import MlakitError
from mlakit.io import write_dir, write_json
from mlakit.model import Transformer
from mlakit.rope import rope_inv_freq
from mlakit.text.chat import mixed_windows
from mlakit.text.corpus import Corpus, default_corpus

logger = logging.getLogger(__name__)

RECORD_FILE = "conversion.json"


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
    _, g, d = source_dims(spec)
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
    _, g, d = source_dims(spec)
    n_layers = spec.num_layers
    if config.ranks is not None:
        return check_ranks(config.ranks, n_layers, max_rank)
    rope_dims = config.resolved_rope_dims(d, g, spec.ropes(), source_context(spec))
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
    _, g, d = source_dims(spec)
    return config.recipe(d, g, spec.ropes(), source_context(spec))


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
    h, _, d = source_dims(spec)
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
    _, g, d = source_dims(spec)
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
        k = min(config.sequential_inputs(), len(cal.windows))
        run = SequentialRun(spec, get, plan, cal.windows[:k])
        x_orig = cal.original_inputs(k)
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
