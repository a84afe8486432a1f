"""The decoder LM: embeddings, ``num_layers`` pre-norm blocks (attention + SwiGLU), final norm, head.

Attention is pluggable per config: MLA (:class:`MultiHeadLatentAttention`) or a baseline
(:class:`GroupedQueryAttention` for MHA/GQA/MQA). Features of converted sources (Gemma's scaled
embeddings, sandwich norms, GeGLU, soft-capped logits, sliding-window layers with their own RoPE
base) are switched on by :class:`~mlakit.config.ModelConfig` fields; the block loop is the same.
Checkpoints are a directory with ``config.json`` and ``model.safetensors``; loading builds the
model on the ``meta`` device and assigns the stored tensors, so no random init is wasted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mlakit.attention import GroupedQueryAttention, MultiHeadLatentAttention, RotaryEmbedding
from mlakit.attention.metadata import AttentionMetadata
from mlakit.attention.mla import AttentionPath
from mlakit.cache import KVCache, LatentCache, ModelCache
from mlakit.config import MLAConfig, ModelConfig, RuntimeConfig
from mlakit.dtypes import FloatName
from mlakit.errors import MlakitError
from mlakit.io import read_config_json, read_json, write_file, write_json
from mlakit.layers import RMSNorm, SwiGLU

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "mlakit"
_LAYER_NAME = re.compile(r"layers\.(\d+)\.")


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``.

    With ``config.post_norms`` (Gemma 2/3) each branch's output is normalised before the add:
    ``x + attn_post_norm(attn(attn_norm(x)))``, ``x + mlp_post_norm(mlp(mlp_norm(x)))``.
    """

    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        att = config.layer_attention(layer)
        self.attn_norm = RMSNorm(config.hidden_size, att.rms_norm_eps)
        self.attn: MultiHeadLatentAttention | GroupedQueryAttention
        if isinstance(att, MLAConfig):
            self.attn = MultiHeadLatentAttention(att, rotary, layer_idx=layer)
        else:
            self.attn = GroupedQueryAttention(att, rotary, layer_idx=layer)
        self.mlp_norm = RMSNorm(config.hidden_size, att.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_act)
        self.attn_post_norm: RMSNorm | None = None
        self.mlp_post_norm: RMSNorm | None = None
        if config.post_norms:
            self.attn_post_norm = RMSNorm(config.hidden_size, att.rms_norm_eps)
            self.mlp_post_norm = RMSNorm(config.hidden_size, att.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None,
        cache: LatentCache | KVCache | None,
        path: AttentionPath,
        kv_len: int | None,
        meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), positions, cache, path, kv_len, meta)  # type: ignore[arg-type]
        x = x + (a if self.attn_post_norm is None else self.attn_post_norm(a))
        m = self.mlp(self.mlp_norm(x))
        return x + (m if self.mlp_post_norm is None else self.mlp_post_norm(m))


class Transformer(nn.Module):
    """Decoder-only LM over :class:`ModelConfig`.

    Example::

        model = Transformer(ModelConfig.from_preset("tiny-mla"))
        logits = model(tokens)                       # [B, T, vocab], causal, no cache
        out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8))
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        att = config.attention
        self.rotary = RotaryEmbedding(att.rope_dim, config.max_seq_len, att.rope_theta, att.rope_scaling)
        # sliding-window layers with their own RoPE base (Gemma 3) share a second table
        self.local_rotary: RotaryEmbedding | None = None
        if config.local_rope_theta is not None:
            self.local_rotary = RotaryEmbedding(att.rope_dim, config.max_seq_len, config.local_rope_theta)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, self.rotary_of(i)) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, att.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    def rotary_of(self, layer: int) -> RotaryEmbedding:
        """The rotary tables layer ``layer`` uses (the local ones for its sliding-window layers)."""
        if self.local_rotary is not None and self.config.is_sliding(layer):
            return self.local_rotary
        return self.rotary

    def reset_rope_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute every rotary table, e.g. after building on the meta device."""
        self.rotary.reset_tables(device)
        if self.local_rotary is not None:
            self.local_rotary.reset_tables(device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- running -----------------------------------------------------------------------------------

    def new_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype: FloatName | torch.dtype = "fp32"
    ) -> ModelCache:
        """A preallocated cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
        return ModelCache.allocate(self.config, batch_size, max_seq_len, dtype, self.embed.weight.device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        runtime: RuntimeConfig | None = None,
        logit_index: torch.Tensor | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """Logits for ``tokens [B, T]`` at ``positions [B, T]`` (default ``0..T-1`` per row).

        With ``cache``, new K/V (or latents) are written at ``positions`` and attention covers
        everything cached up to each query's position: this is chunked prefill (T > 1) and decode
        (T == 1, using ``runtime.decode_path``). ``logit_index [B]`` returns only that token's
        logits per row, ``[B, vocab]``, instead of ``[B, T, vocab]``.

        With ``attn_metadata`` (the engine's step), ``tokens [1, N]`` is a packed row of many
        sequences over the paged cache (see :mod:`mlakit.attention.metadata`); the logits of each
        sequence's last token come back, ``[B, vocab]``. The engine validates token ids when a
        request arrives, so this path never synchronises with the device.

        Raises: MlakitError for token ids outside the vocabulary or positions outside the cache.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise MlakitError(f"tokens must be a non-empty [B, T] tensor, got shape {tuple(tokens.shape)}")
        if attn_metadata is not None:
            return self._forward_packed(tokens, positions, runtime or RuntimeConfig(), attn_metadata)
        vocab = self.config.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise MlakitError(f"token ids must lie in [0, {vocab}); got [{int(tokens.min())}, {int(tokens.max())}]")
        runtime = runtime or RuntimeConfig()
        kv_len = None
        if positions is not None:
            top = int(positions.max()) + 1
            capacity = cache.max_seq_len if cache is not None else self.config.max_seq_len
            if int(positions.min()) < 0 or top > capacity:
                raise MlakitError(f"positions must lie in [0, {capacity}) (cache/context size); got up to {top - 1}")
            kv_len = top
        elif cache is not None:
            raise MlakitError("positions are required with a cache: pass where each token goes [B, T]")
        elif tokens.shape[1] > self.config.max_seq_len:
            raise MlakitError(
                f"{tokens.shape[1]} tokens exceed the model's context (max_seq_len={self.config.max_seq_len})"
            )
        if cache is not None and cache.batch_size != tokens.shape[0]:
            raise MlakitError(f"cache holds {cache.batch_size} sequences but tokens has batch {tokens.shape[0]}")
        path = self.attention_path(runtime, decode=cache is not None and tokens.shape[1] == 1)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, None if cache is None else cache.layers[i], path, kv_len)
        if logit_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logit_index]  # [B, hidden]
        return self.logits(x)

    def _forward_packed(
        self, tokens: torch.Tensor, positions: torch.Tensor | None, runtime: RuntimeConfig, meta: AttentionMetadata
    ) -> torch.Tensor:
        if positions is None or tokens.shape[0] != 1 or positions.shape != tokens.shape:
            raise MlakitError("a packed step needs tokens and positions of shape [1, N]")
        path = self.attention_path(runtime, decode=True)
        x = self.embed_tokens(tokens)  # [1, N, hidden]
        for layer in self.layers:
            x = layer(x, positions, None, path, None, meta)
        return self.logits(x[0, meta.logits_index])  # [B, vocab]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ids -> ``[B, T, hidden]``, times ``embed_scale`` (Gemma: ``sqrt(hidden)``)."""
        x = self.embed(tokens)
        if self.config.embed_scale != 1.0:
            # Gemma rounds the scale to the activation dtype before multiplying; so do we
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and head on hidden states ``[..., hidden]``; soft-capped when configured (Gemma 2)."""
        out = self.lm_head(self.norm(x))
        cap = self.config.final_logit_softcap
        return out if cap is None else cap * torch.tanh(out / cap)

    def attention_path(self, runtime: RuntimeConfig, decode: bool) -> AttentionPath:
        """Naive for prefill/training; ``runtime.decode_path`` for single-token decode steps."""
        att = self.config.attention
        if not decode or not isinstance(att, MLAConfig) or runtime.decode_path == "naive":
            return "naive"
        if runtime.decode_path == "absorbed" and not att.can_absorb:
            raise MlakitError("decode_path='absorbed' needs rope_mode='decoupled'; this model uses full RoPE")
        return "absorbed" if att.can_absorb else "naive"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written under a temporary name and renamed, so an interrupted save never
        leaves a half-written file under the real name.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        write_file(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
        save_config(out, self.config, metadata)
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> Transformer:
        """Load a directory written by :meth:`save_pretrained` (or ``mlakit convert``).

        Raises: MlakitError when the directory, its config or its weights are missing or do not match.
        """
        config = load_config(directory)
        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise MlakitError(f"{directory} has no {WEIGHTS_FILE}: not an mlakit checkpoint")
        try:
            state = load_file(str(path), device=str(device))
        except Exception as e:  # safetensors raises several types for damaged files
            raise MlakitError(f"cannot read {path} (truncated or damaged?): {e}") from e
        return cls.from_state_dict(config, state, source=str(path), dtype=dtype, device=device)

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        *,
        source: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> Transformer:
        """The one way a model is built from stored tensors: on ``meta``, tensors assigned, head tied.

        Building on the meta device allocates nothing, so no random initialisation is wasted; the
        tensors in ``state`` become the parameters (no copy). A tied head may be absent from
        ``state``. The RoPE tables (buffers, not weights) are computed on ``device``.

        Raises: MlakitError naming ``source`` when ``state`` does not match ``config``.
        """
        state = fill_tied_head(config, dict(state))
        kinds = {t.dtype for t in state.values()}
        if len(kinds) > 1 or any(not dt.is_floating_point for dt in kinds):
            names = ", ".join(sorted(str(dt).removeprefix("torch.") for dt in kinds))
            raise MlakitError(
                f"weights in {source} mix dtypes or are not floating point ({names}): a damaged checkpoint"
            )
        check_layer_count(config, state, source)
        try:
            with torch.device("meta"):
                model = cls(config)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # dimensions torch cannot hold
            raise MlakitError(f"{source}: cannot build a model of its config: {e}") from e
        check_state_shapes(model, state, source)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise MlakitError(f"weights in {source} do not match its config: {' '.join(str(e).split())}") from e
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        model.reset_rope_tables(device)
        if dtype is not None:
            model.to(dtype)
        return model.eval()


def fill_tied_head(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with ``lm_head.weight`` set to the embedding where the config ties them (checkpoints omit it)."""
    if config.tie_word_embeddings and "embed.weight" in state:
        state.setdefault("lm_head.weight", state["embed.weight"])
    return state


def check_state_shapes(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """One line saying how ``state`` differs from ``model``'s parameters (names and shapes), if it does."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensors of another shape, e.g. {k} is {list(state[k].shape)}, "
            f"the config makes it {list(expected[k].shape)}"
        )
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    raise MlakitError(f"weights in {source} do not match its config: {'; '.join(parts)}")


def check_layer_count(config: ModelConfig, names: Iterable[str], source: str) -> None:
    """Raise MlakitError unless the ``layers.{i}.`` tensors cover exactly layers ``0..num_layers-1``.

    Checked before the model is built: a damaged config claiming millions of layers would
    otherwise spend minutes building them.
    """
    found = {int(m.group(1)) for n in names if (m := _LAYER_NAME.match(n))}
    if found != set(range(config.num_layers)):
        raise MlakitError(
            f"weights in {source} hold {len(found)} layers; its config says num_layers={config.num_layers}"
        )


def is_mlakit_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds an mlakit ``config.json`` (False without one).

    Raises: MlakitError when ``config.json`` exists but is not valid JSON (it names the file), so a
    damaged checkpoint is reported as damaged rather than as "some other format".
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    header = read_json(path)
    return isinstance(header, dict) and header.get("format") == FORMAT


def save_config(directory: str | os.PathLike[str], config: ModelConfig, metadata: dict[str, Any] | None = None) -> None:
    """Write an mlakit checkpoint's ``config.json``: the format tag, ``config`` and ``metadata``'s entries."""
    write_json(Path(directory) / CONFIG_FILE, {"format": FORMAT, "config": config.to_dict(), **(metadata or {})})


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """Read an mlakit checkpoint's ``config.json`` (raises MlakitError with the reason)."""
    header = read_config_json(directory, CONFIG_FILE, "an mlakit checkpoint (config.json + model.safetensors)")
    p = Path(directory) / CONFIG_FILE
    if header.get("format") != FORMAT or "config" not in header:
        raise MlakitError(
            f'{p} is not an mlakit config (no "format": "{FORMAT}"); a Hugging Face '
            "checkpoint? use `mlakit import-hf` or the convert command"
        )
    try:
        return ModelConfig.from_dict(header["config"])
    except ValueError as e:
        raise MlakitError(f"{p}: {e}") from e
