"""The fused CPU decode step: every layer of a decode step in one C call (absorbed MLA or GQA).

At batch 1 a decode step of a small model costs more in Python and PyTorch dispatch than in
arithmetic: SmolLM2-135M converted to MLA runs ~40 small ops per layer (norms, RoPE, splits,
casts, the absorption, residual adds) around its five weight products, 30 layers deep. This is
the CPU's counterpart of :mod:`mlakit.engine.graphs` (CUDA graphs): for decode-only steps the
runner hands the whole layer stack to ``mlakit_decode_step`` (``mlakit/csrc/decode_step.c``, one
call per :data:`MAX_ROWS` sequences), which runs the same maths as
:class:`~mlakit.attention.mla.MultiHeadLatentAttention`'s paged absorbed decode (or
:class:`~mlakit.attention.mha.GroupedQueryAttention`'s paged decode) and
:class:`~mlakit.model.Block`, with the residual stream in fp32, the weight products through
``int8_gemv`` (VNNI) or plain fp32/bf16 loops, and the attention through ``paged_decode``. The
embedding, the final norm and the head stay the model's own (one call each).

The model stays the reference: the fast path is taken only where :func:`fused_decode_reason`
finds nothing it does not implement, and every other step (prefill, mixed steps, other models)
runs the model's forward. A decode step of more than :data:`MAX_ROWS` sequences runs as several
calls of at most that many: past 24 rows the model's int8 linears dequantize their weights for a
bf16 GEMM at every call, which costs more than reading the int8 weights once per 16 sequences
(32 x 2048 tokens, side by side: 420 against 168 tokens/s). The tests compare the two paths'
logits and greedy tokens.

What it implements: every layer MLA with decoupled RoPE (absorbed decode), with or without
``q_lora_rank`` and ``kv_norm``, per-layer ``kv_lora_rank``; or every layer MHA/GQA/MQA, with
or without ``qk_norm`` and q/k/v biases; SiLU or GeGLU MLPs, biases; weights int8 (the VNNI
kernel), fp32 or bf16; cache rows fp32, bf16 or int8. Not: the naive (decompressing) MLA decode,
full-RoPE MLA, post-norms (Gemma) (reason logged once; the model's path runs).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from mlakit.attention.backends import AttentionBackend
from mlakit.attention.mla import MultiHeadLatentAttention
from mlakit.config import MLAConfig, RuntimeConfig
from mlakit.errors import MlakitError
from mlakit.model import Block, Transformer
from mlakit.native import DTYPE_CODES, NativeKernels, load_native
from mlakit.paged import PagedCache
from mlakit.quant import Int8Linear
from mlakit.rope import rope_tables

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # the int8 kernel's row limit (INT8_GEMV_MAX_ROWS); larger batches run in slices of this many
_LIN_NONE, _LIN_INT8, _LIN_F32, _LIN_BF16 = 0, 1, 2, 3
_FLOAT_LINEARS = {torch.float32: _LIN_F32, torch.bfloat16: _LIN_BF16}
_ACTS = {"silu": 0, "gelu_tanh": 1}
_i64, _p = ctypes.c_int64, ctypes.c_void_p


class _Linear(ctypes.Structure):  # Linear in decode_step.c
    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("kp", _i64), ("w", _p), ("scale", _p), ("bias", _p)]


class _Layer(ctypes.Structure):  # Layer in decode_step.c
    _fields_ = [
        *((name, _p) for name in ("attn_norm", "mlp_norm", "q_norm", "kv_norm")),
        *((name, _Linear) for name in ("w_in", "w_uq", "w_o", "w_gate_up", "w_down")),
        *((name, _p) for name in ("w_uk", "w_uv", "cos", "sin", "rows", "row_scale")),
        ("row_dtype", _i64),
        ("row_stride", _i64),
        ("rank", _i64),
        *((name, _p) for name in ("v_rows", "v_row_scale", "q_head_norm", "k_head_norm")),
    ]


class _Dims(ctypes.Structure):  # Dims in decode_step.c
    _fields_ = [
        *(
            (name, _i64)
            for name in (
                "hidden",
                "heads",
                "q_lora",
                "rank",
                "d_nope",
                "d_rope",
                "d_v",
                "inter",
                "act",
                "mla",
                "kv_heads",
                "head_dim",
            )
        ),
        ("eps", ctypes.c_float),
        ("softmax_scale", ctypes.c_float),
    ]


_STEP_ARGS: list[Any] = [
    ctypes.POINTER(_Dims), ctypes.c_int, ctypes.POINTER(_Layer), ctypes.c_int, _p, _p, _p, _p, _i64, _p,
    ctypes.c_int, ctypes.c_int, ctypes.c_int,
]  # fmt: skip


def _linear_reason(name: str, module: nn.Module | None) -> str:
    if isinstance(module, Int8Linear):
        return "" if module.native is not None else f"{name} is int8 without the VNNI kernel (AVX512-VNNI absent?)"
    if type(module) is nn.Linear:
        dt = module.weight.dtype
        return "" if dt in _FLOAT_LINEARS else f"{name} weights are {str(dt).removeprefix('torch.')} (int8, fp32, bf16)"
    return f"{name} is {type(module).__name__} (fused projections of int8, fp32 or bf16 weights only)"


def fused_decode_reason(
    model: Transformer, cache: PagedCache, backend: AttentionBackend, runtime: RuntimeConfig
) -> str:
    """Why decode steps cannot run through the fused C step here (``""``: they can)."""
    if model.embed.weight.device.type != "cpu":
        return f"the model is on {model.embed.weight.device.type}, not the CPU"
    if backend.name != "cpu":
        return f"attention backend {backend.name!r} (the fused step reads the cache as the 'cpu' backend does)"
    native = load_native()
    if native is None:
        return "mlakit's CPU kernels could not be built (see the log)"
    c = model.config
    if c.post_norms:
        return "post-norms (Gemma 2/3) are not implemented in the fused step"
    first = c.attention
    mla = isinstance(first, MLAConfig)
    if mla and model.attention_path(runtime, decode=True) != "absorbed":
        return "the MLA decode path is not absorbed (only the absorbed MLA decode is fused)"
    same = (
        ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_norm")
        if mla
        else ("num_heads", "num_kv_heads", "head_dim", "qk_norm")
    )
    for i, layer in enumerate(cast(list[Block], list(model.layers))):
        att, attn = c.layer_attention(i), layer.attn
        if isinstance(att, MLAConfig) != mla or isinstance(attn, MultiHeadLatentAttention) != mla:
            return f"layer {i} is not of layer 0's attention kind"
        if any(getattr(att, f) != getattr(first, f) for f in (*same, "rms_norm_eps")):
            return f"layer {i}'s attention differs from layer 0's beyond kv_lora_rank"
        if isinstance(att, MLAConfig) and (att.rope_dim != att.qk_rope_head_dim or att.qk_rope_head_dim % 2):
            return f"layer {i}'s rotary width {att.rope_dim} is not its rope head width {att.qk_rope_head_dim}"
        if attn.fused_in is None or layer.mlp.w_gate_up is None:
            return "projections are not fused (mlakit.quant.prepare_weights fuses them)"
        parts = [("fused input projection", attn.fused_in), ("w_o", attn.w_o), ("w_gate_up", layer.mlp.w_gate_up)]
        parts.append(("w_down", layer.mlp.w_down))
        if isinstance(att, MLAConfig) and att.q_lora_rank is not None:
            parts.append(("w_uq", cast(MultiHeadLatentAttention, attn).w_uq))
        for name, module in parts:
            why = _linear_reason(name, module)
            if why:
                return f"layer {i}: {why}"
        dtypes = {rows.data.dtype for rows in cache.layers[i]}
        if not dtypes <= set(DTYPE_CODES):
            return f"cache rows of {', '.join(map(str, dtypes))}"
    return ""


class FusedDecode:
    """Decode steps of ``model`` over ``cache`` in one C call (see the module docstring).

    Build it only where :func:`fused_decode_reason` returns ``""``; ``native``: the kernels to call
    (default: this CPU's, :func:`mlakit.native.load_native`). Holds fp32 copies of the
    norms, the absorbed ``W_UK`` / ``W_UV`` and the RoPE tables; the weights themselves are read
    in place (the model's int8, fp32 or bf16 tensors), so the model must not be modified afterwards.
    """

    def __init__(self, model: Transformer, cache: PagedCache, native: NativeKernels | None = None) -> None:
        native = native or load_native()
        assert native is not None
        self.native: NativeKernels = native
        self.native.decode_step.argtypes = _STEP_ARGS
        self.model = model
        self.block_size = cache.block_size
        self.split_rows = 512  # fewest cached rows per attention work item (below, one item per sequence)
        self.dtype = model.embed.weight.dtype
        c = model.config
        att = c.attention
        mla = isinstance(att, MLAConfig)
        self._keep: list[torch.Tensor] = []  # everything the C structures point into
        ranks = [getattr(c.layer_attention(i), "kv_lora_rank", 0) for i in range(c.num_layers)]
        self.dims = _Dims(
            hidden=c.hidden_size,
            heads=att.num_heads,
            inter=c.intermediate_size,
            act=_ACTS[c.mlp_act],
            eps=att.rms_norm_eps,
            softmax_scale=cast(Block, model.layers[0]).attn.scale,
            mla=int(mla),
        )
        if isinstance(att, MLAConfig):
            d = self.dims
            d.q_lora, d.rank, d.d_nope = att.q_lora_rank or 0, max(ranks), att.qk_nope_head_dim
            d.d_rope, d.d_v = att.qk_rope_head_dim, att.v_head_dim
        else:
            self.dims.kv_heads, self.dims.head_dim = att.num_kv_heads, att.head_dim
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_positions = c.max_seq_len
        self.layers = (_Layer * c.num_layers)()
        for i, layer in enumerate(cast(list[Block], list(model.layers))):
            attn = layer.attn
            rot = attn.rotary
            if id(rot) not in tables:  # the model's tables where fp32; a bf16 model's were rounded: fp32 again
                fp32 = rot.cos.dtype == torch.float32 and rot.cos.device.type == "cpu"
                tables[id(rot)] = (
                    (rot.cos, rot.sin) if fp32 else rope_tables(rot.dim, rot.max_positions, rot.theta, rot.scaling)
                )
            cos, sin = tables[id(rot)]
            self.max_positions = min(self.max_positions, cos.shape[0])
            rows = cache.layers[i]
            mlp = layer.mlp
            assert mlp.w_gate_up is not None and attn.fused_in is not None
            lay = self.layers[i]
            lay.attn_norm, lay.mlp_norm = self._ptr(layer.attn_norm.weight), self._ptr(layer.mlp_norm.weight)
            lay.w_in, lay.w_o = self._linear(attn.fused_in), self._linear(attn.w_o)
            lay.w_gate_up, lay.w_down = self._linear(mlp.w_gate_up), self._linear(mlp.w_down)
            lay.cos, lay.sin = self._ptr(cos), self._ptr(sin)
            lay.rows = rows[0].data.data_ptr()
            lay.row_scale = None if rows[0].scale is None else rows[0].scale.data_ptr()
            lay.row_dtype, lay.row_stride = DTYPE_CODES[rows[0].data.dtype], rows[0].data.stride(0)
            if isinstance(attn, MultiHeadLatentAttention):
                w_uk, w_uv = attn._absorbed_weights()  # [H, d_nope, r], [H, r, d_v]; copied to fp32 below
                lay.w_uk, lay.w_uv, lay.rank = self._ptr(w_uk), self._ptr(w_uv), ranks[i]
                if attn.config.q_lora_rank is not None:
                    lay.q_norm, lay.w_uq = self._ptr(attn.q_norm.weight), self._linear(attn.w_uq)
                if attn.config.kv_norm:
                    lay.kv_norm = self._ptr(attn.kv_norm.weight)
            else:
                lay.v_rows = rows[1].data.data_ptr()
                lay.v_row_scale = None if rows[1].scale is None else rows[1].scale.data_ptr()
                if attn.config.qk_norm:
                    lay.q_head_norm = self._ptr(attn.q_head_norm.weight)
                    lay.k_head_norm = self._ptr(attn.k_head_norm.weight)

    def _ptr(self, t: torch.Tensor) -> int:
        """Address of an fp32, contiguous copy of ``t`` (or of ``t`` itself when it already is one), kept alive."""
        t = t.detach().to(torch.float32).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, module: nn.Module) -> _Linear:
        if isinstance(module, Int8Linear):
            assert module.weight_u8 is not None
            w, scale, bias = module.weight_u8, module._scale_f32, module._bias_f32
            self._keep += [w, scale] + ([] if bias is None else [bias])
            return _Linear(
                kind=_LIN_INT8,
                n=module.out_features,
                k=module.in_features,
                kp=w.shape[1] * 64,  # weight_u8 is [N / 16, Kp / 64, 16, 64]
                w=w.data_ptr(),
                scale=scale.data_ptr(),
                bias=None if bias is None else bias.data_ptr(),
            )
        assert isinstance(module, nn.Linear)
        b = module.bias
        w = module.weight.detach().contiguous()  # fp32 or bf16, read in place
        self._keep.append(w)
        return _Linear(
            kind=_FLOAT_LINEARS[w.dtype],
            n=module.out_features,
            k=module.in_features,
            kp=module.in_features,
            w=w.data_ptr(),
            scale=None,
            bias=None if b is None else self._ptr(b),
        )

    def run(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode step: ``tokens[b]`` at ``positions[b]`` of sequence ``b`` (block ``tables[b]``).

        Returns: fp32 logits ``[B, vocab]``. Raises: MlakitError for a position outside the RoPE
        tables (the C code does not check), MemoryError when the kernel cannot allocate its
        buffers, RuntimeError when it refuses the shapes.
        """
        if len(tokens) > MAX_ROWS:  # one call per MAX_ROWS sequences (the kernels' row limit)
            return torch.cat(
                [
                    self.run(tokens[i : i + MAX_ROWS], positions[i : i + MAX_ROWS], tables[i : i + MAX_ROWS])
                    for i in range(0, len(tokens), MAX_ROWS)
                ]
            )
        if min(positions) < 0 or max(positions) >= self.max_positions:
            raise MlakitError(f"positions must lie in [0, {self.max_positions}) (the model's context); got {positions}")
        b, bs = len(tokens), self.block_size
        width = max(len(t) for t in tables)
        pos = torch.tensor(positions, dtype=torch.int64)
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions)], dtype=torch.int64)
        table = torch.tensor([list(t) + [t[0]] * (width - len(t)) for t in tables], dtype=torch.int64)  # [B, M]
        lens = pos + 1
        x = self.model.embed_tokens(torch.tensor(tokens).unsqueeze(0))[0].to(torch.float32).contiguous()  # [B, hidden]
        threads = torch.get_num_threads()
        longest = max(positions) + 1
        splits = max(1, min(math.ceil(longest / self.split_rows), math.ceil(2 * threads / b)))
        rc = self.native.decode_step(
            ctypes.byref(self.dims), len(self.layers), self.layers, b, x.data_ptr(), pos.data_ptr(),
            slots.data_ptr(), table.data_ptr(), table.stride(0), lens.data_ptr(), bs, splits, threads,
        )  # fmt: skip
        if rc == 1:
            raise MemoryError("the fused decode step could not allocate its buffers")
        if rc != 0:
            raise RuntimeError(f"the fused decode step failed (code {rc}) for batch {b}")
        return self.model.logits(x.to(self.dtype)).float()
