"""A source checkpoint read one tensor at a time, and its layers run one at a time.

Conversion needs the source's weights one layer at a time and the original model's hidden states
at each layer's input. Loading the whole model through ``transformers`` costs its size in float32
(an 8B model: ~32 GB); this module keeps memory to one layer:

* :class:`CheckpointSource` reads a Hugging Face directory's safetensors shards lazily (memory
  mapped, in their own dtype: a bf16 shard stays bf16); ``get(name)`` returns one tensor.
* :class:`OriginalLayers` runs the source model as mlakit's own MHA/GQA baseline
  (:meth:`~mlakit.convert.arch.SourceSpec.baseline_config`, same logits as the source), one
  :class:`~mlakit.model.Block` at a time, in float32 on any device: ``hidden [N, T, n]`` of the
  calibration windows goes in, the next layer's input comes out.

Shapes: N windows, T tokens per window, n hidden size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mlakit.convert.arch import Getter, SourceSpec, baseline_layer_state, model_weights, source_spec
from mlakit.errors import MlakitError
from mlakit.io import read_config_json, read_json_object

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class CheckpointSource:
    """A Hugging Face checkpoint directory whose tensors are read on demand.

    Args:
        directory: holds ``config.json`` and ``*.safetensors`` (one file, or shards named by
            ``model.safetensors.index.json``).
        name: how errors and records name the source (default: the directory).

    Raises:
        MlakitError: no config, an unsupported architecture, no weights, an index naming a shard
            that is missing, or a damaged shard (each names the file).
    """

    def __init__(self, directory: str | os.PathLike[str], name: str | None = None) -> None:
        from transformers import AutoConfig

        self.path = Path(directory)
        self.name = name or str(directory)
        read_config_json(self.path, "config.json", "a Hugging Face model config")  # names a malformed file
        try:
            self.hf_config: Any = AutoConfig.from_pretrained(self.path)
            self.spec: SourceSpec = source_spec(self.hf_config, self.name)
        except MlakitError:
            raise
        except Exception as e:  # transformers' config classes raise many types for damaged values
            raise MlakitError(f"{self.path / 'config.json'}: not a valid model config ({type(e).__name__}): {e}") from e
        self._where = self._tensor_files()
        self._tokenizer: Any = None

    def _tensor_files(self) -> dict[str, Path]:
        """Tensor name -> the shard holding it (from the index, or from each shard's header)."""
        from safetensors import safe_open

        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index, what="a safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MlakitError(f"{index}: no weight_map (a damaged index)")
            where = {str(k): self.path / str(v) for k, v in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise MlakitError(f"{shard}: missing (named by {index.name}); the checkpoint is incomplete")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MlakitError(f"{self.path}: no *.safetensors weights (convert a .bin checkpoint with transformers)")
        where = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    where.update({k: f for k in st.keys()})
            except Exception as e:  # safetensors raises several types for damaged files
                raise MlakitError(f"cannot read {f}: {e}") from e
        return where

    def get(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` in its stored dtype (memory mapped: pages are read when touched), or None."""
        from safetensors import safe_open

        f = self._where.get(name)
        if f is None:
            return None
        try:
            with safe_open(str(f), framework="pt") as st:
                return st.get_tensor(name)
        except Exception as e:  # a truncated shard, a name the header lost
            raise MlakitError(f"cannot read tensor {name} from {f}: {e}") from e

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the source's layer weights (e.g. bfloat16 for most published checkpoints)."""
        t = self.get("model.layers.0.self_attn.q_proj.weight")
        if t is None:
            raise MlakitError(f"{self.name}: tensor model.layers.0.self_attn.q_proj.weight is missing")
        return t.dtype

    @property
    def tokenizer(self) -> Any:
        """The source's tokenizer (loaded once), or None when the directory has none."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            except (OSError, ValueError, TypeError) as e:  # a directory without tokenizer files
                logger.warning("%s: no tokenizer (%s)", self.name, e)
                self._tokenizer = False
        return self._tokenizer or None

    def weight_bytes(self) -> int:
        """Bytes of the weight files (what the source costs to hold)."""
        return sum(f.stat().st_size for f in set(self._where.values()))


class OriginalLayers:
    """The source model, one block at a time (mlakit's baseline form of it, float32).

    Args:
        spec: the source's architecture.
        get: reads one source tensor by its Hugging Face name.
        seq_len: longest window that will run (sizes the RoPE tables).
        device: where the blocks run (``cuda`` when the machine has one: the forward is the cost).
        source: how errors name the source.
    """

    def __init__(
        self,
        spec: SourceSpec,
        get: Getter,
        seq_len: int,
        device: str | torch.device = "cpu",
        source: str = "the source",
    ) -> None:
        from mlakit.model import Transformer

        self.spec, self.get, self.device, self.source = spec, get, torch.device(device), source
        self.config = spec.baseline_config(seq_len)  # RoPE tables for the windows only
        with torch.device("meta"):
            self._shell = Transformer(self.config)
        self._shell.reset_rope_tables(self.device)

    @torch.no_grad()
    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` token ids -> ``[N, T, n]`` float32: the first block's input."""
        table = model_weights(self.spec, self.get)["embed.weight"]
        want = (self.spec.vocab_size, self.spec.hidden_size)
        if tuple(table.shape) != want:
            raise MlakitError(
                f"weights in {self.source} do not match its config: the embedding is {list(table.shape)}, "
                f"the config makes it {list(want)}"
            )
        with self._lent({"embed": table}) as shell:  # the table is dropped with this call
            return shell.embed_tokens(windows.to(table.device)).float().to(self.device)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, T, n]`` last hidden states -> ``[N, T, vocab]`` float32: the final norm and the head."""
        top = model_weights(self.spec, self.get)
        head = {m: top[f"{m}.weight"].to(self.device, torch.float32) for m in ("norm", "lm_head")}
        with self._lent(head) as shell:
            return shell.logits(hidden).float()  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _lent(self, weights: dict[str, torch.Tensor]) -> Iterator[Any]:
        """The meta-device shell with ``weights`` (module name -> its ``weight``) in place for one call.

        The shell holds no weights of its own, so the table or head read for a call is freed after it.
        """
        saved: dict[str, Any] = {}
        for name, w in weights.items():
            module = self._shell.get_submodule(name)
            saved[name] = module.weight
            module.weight = torch.nn.Parameter(w, requires_grad=False)
        try:
            yield self._shell
        finally:
            for name, w in saved.items():
                self._shell.get_submodule(name).weight = w

    def block(self, layer: int) -> Any:
        """Layer ``layer`` as an mlakit :class:`~mlakit.model.Block` holding the source's weights (float32)."""
        from mlakit.model import Block, check_state_shapes

        state = baseline_layer_state(self.spec, self.get, layer)
        with torch.device("meta"):
            blk = Block(self.config, layer, self._shell.rotary_of(layer))
        check_state_shapes(blk, state, f"{self.source} (layer {layer})")
        blk.load_state_dict({k: v.to(self.device, torch.float32) for k, v in state.items()}, strict=True, assign=True)
        return blk.eval()

    def layers(self, windows: torch.Tensor, *, batch_size: int = 4) -> Iterator[tuple[int, Any, torch.Tensor]]:
        """Yield ``(layer, block, hidden)`` for every layer: ``hidden [N, T, n]`` is the block's
        input in the original model. After the caller's turn the block runs over it in place of
        the previous hidden states (one layer's weights and two hidden-state sets in memory)."""
        hidden = self.embed(windows)
        for i in range(self.spec.num_layers):
            blk = self.block(i)
            yield i, blk, hidden
            hidden = run_block(blk, hidden, batch_size)
            del blk


@torch.no_grad()
def run_block(block: Any, hidden: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """``hidden [N, T, n]`` through one block (full causal attention, no cache), ``batch_size`` windows at a time."""
    return torch.cat([block(x, None, None, "naive", None) for x in hidden.split(batch_size)])


@torch.no_grad()
def attention_input_moments(block: Any, hidden: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """``sigma = E[x~ x~^T]``, ``x~ = [x; 1]``, ``x`` = the attention input of ``block`` (its RMSNorm
    of ``hidden [N, T, n]``): ``[n+1, n+1]`` float64 on the CPU, accumulated ``batch_size`` windows at a time."""
    n = hidden.shape[-1]
    acc = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=hidden.device)
    for h in hidden.split(batch_size):
        x = block.attn_norm(h).reshape(-1, n).double()  # [B*T, n]
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)  # [B*T, n+1]
        acc.addmm_(xa.T, xa)
    return (acc / (hidden.shape[0] * hidden.shape[1])).cpu()
