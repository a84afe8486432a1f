"""Every attention backend against the ``torch`` reference, and the reference against plain maths.

Two tables:

* kernel scenarios: paged rows filled with random values, fragmented block tables, ragged lengths
  (one token, exactly a block, across a boundary), fp32 / bf16 / int8 storage; each backend's
  ``latent_decode``, ``latent_prefill``, ``kv_decode``, ``kv_prefill`` and ``gather`` against
  ``torch``'s;
* model scenarios: one packed engine step that mixes decodes with prefill chunks (one of them at
  ``start_pos > 0``) equals the uncached forward of each sequence, for MLA (absorbed and naive),
  full-RoPE MLA, MHA, GQA and MQA, through each backend.

The Triton backend runs here under ``TRITON_INTERPRET=1`` (in a fresh interpreter, since the
variable must be set before Triton is imported), and on a CUDA GPU when there is one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit.attention.backends import get_backend
from mlakit.attention.metadata import AttentionMetadata
from mlakit.config import RuntimeConfig
from mlakit.paged import PagedCache, PagedRows
from tests.conftest import TOLERANCES, build, tiny_mla_config

HAS_TRITON = importlib.util.find_spec("triton") is not None
BLOCK = 4

# name -> (heads, kv_lora_rank, rope, kv heads, head_dim, context lengths, fragmented tables)
KERNEL_SCENARIOS = {
    "single": (4, 32, 8, 2, 8, [9], False),
    "ragged": (5, 32, 8, 1, 16, [13, 1, 8, 5], True),
    "block_boundaries": (3, 24, 6, 3, 8, [4, 8, 12], True),
    "deepseek_dims": (16, 512, 64, 4, 32, [21, 7], True),
    # several 32-key tiles of the CPU kernel's bf16 MLA routine, full and partial (17..31 keys, <= 16)
    "long_tiles": (9, 48, 48, 3, 16, [100, 33, 64, 17, 150], True),
}
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
# int8 storage: the reference dequantizes rows, the fast paths fold the scales in; both see the same values.
# bf16 storage: the CPU kernel multiplies bf16 rows by a bf16-rounded query (VDPBF16PS) where the CPU can.
STORAGE_TOL = {"fp32": 1e-4, "bf16": TOLERANCES[torch.bfloat16], "int8": 1e-4}


def kernel_case(name: str, storage: str, device: str = "cpu"):
    """Random paged rows for one scenario: ``(latent rows, k rows, v rows, meta parts, queries)``."""
    heads, rank, rope, g, d, lens, fragmented = KERNEL_SCENARIOS[name]
    gen = torch.Generator().manual_seed(0)
    blocks = [(n + BLOCK - 1) // BLOCK for n in lens]
    total = sum(blocks) + 3
    order = list(range(total))
    if fragmented:  # interleave the sequences' blocks and leave holes
        order = order[1::2] + order[::2]
    tables, k = [], 0
    for nb in blocks:
        tables.append(order[k : k + nb])
        k += nb
    slots = total * BLOCK
    dt = STORAGE[storage]
    rows = PagedRows(slots, rank + rope, dt, device)
    k_rows, v_rows = PagedRows(slots, g * d, dt, device), PagedRows(slots, g * d, dt, device)
    idx = torch.arange(slots, device=device)
    for r in (rows, k_rows, v_rows):
        r.write(idx, torch.randn(slots, r.width, generator=gen).to(device))
    q_joint = torch.randn(len(lens), heads, rank + rope, generator=gen).to(device) * 0.2
    q = torch.randn(len(lens), g * 2, d, generator=gen).to(device) * 0.3  # two query heads per kv head
    return rows, k_rows, v_rows, tables, lens, q_joint, q, rank


def meta_for(backend_name: str, tables, lens, device: str = "cpu") -> AttentionMetadata:
    cache = PagedCache(layers=[], pool=None, block_size=BLOCK, bytes_per_block=0, dtype="fp32")  # type: ignore[arg-type]
    return AttentionMetadata.build(
        cache, get_backend(backend_name, device), [1] * len(lens), lens, tables, len(lens), device
    )


def dense_latent(q_joint: torch.Tensor, rows: PagedRows, tables, lens, rank: int) -> torch.Tensor:
    """Plain maths, one sequence at a time, from dequantized rows picked slot by slot."""
    out = []
    for b, (table, n) in enumerate(zip(tables, lens)):
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        kv = rows.read([(int(s), 1) for s in slots], torch.float32)  # [S, W]
        p = (q_joint[b].float() @ kv.T).softmax(-1)
        out.append(p @ kv[:, :rank])
    return torch.stack(out)


def compare_kernels(name: str, storage: str, backend: str, device: str = "cpu") -> None:
    rows, k_rows, v_rows, tables, lens, q_joint, q, rank = kernel_case(name, storage, device)
    ref, got = meta_for("torch", tables, lens, device), meta_for(backend, tables, lens, device)
    tol = STORAGE_TOL[storage]
    want = ref.backend.latent_decode(q_joint, rows, ref, rank)
    assert (got.backend.latent_decode(q_joint, rows, got, rank) - want).abs().max().item() <= tol, name
    g = k_rows.width // q.shape[-1]
    want = ref.backend.kv_decode(q, k_rows, v_rows, ref, g)
    assert (got.backend.kv_decode(q, k_rows, v_rows, got, g) - want).abs().max().item() <= tol, name
    for seq in (0, len(lens) - 1):  # a prefill chunk: the last (up to 40) positions of a sequence
        n = lens[seq]
        q_pos = torch.arange(max(0, n - 40), n, device=device)
        qp = torch.randn(len(q_pos), *q_joint.shape[1:], generator=torch.Generator().manual_seed(seq)).to(device) * 0.2
        want = ref.backend.latent_prefill(qp, rows, ref, seq, q_pos, rank)
        assert (got.backend.latent_prefill(qp, rows, got, seq, q_pos, rank) - want).abs().max().item() <= tol, name
        qk = torch.randn(len(q_pos), *q.shape[1:], generator=torch.Generator().manual_seed(seq)).to(device) * 0.3
        want = ref.backend.kv_prefill(qk, k_rows, v_rows, ref, seq, q_pos, g)
        assert (got.backend.kv_prefill(qk, k_rows, v_rows, got, seq, q_pos, g) - want).abs().max().item() <= tol, name
    for lo, hi in [(0, len(lens)), (len(lens) - 1, len(lens))]:
        want = ref.backend.gather(rows, ref, lo, hi, torch.float32)
        have = got.backend.gather(rows, got, lo, hi, torch.float32)
        for i in range(hi - lo):  # past a sequence's end a backend may hold anything (masked by position)
            n = lens[lo + i]
            assert torch.equal(want[i, :n], have[i, :n]), (name, lo, hi)


@pytest.mark.parametrize("name", KERNEL_SCENARIOS)
@pytest.mark.parametrize("storage", STORAGE)
def test_reference_backend_equals_plain_maths(name: str, storage: str) -> None:
    rows, _, _, tables, lens, q_joint, _, rank = kernel_case(name, storage)
    meta = meta_for("torch", tables, lens)
    got = meta.backend.latent_decode(q_joint, rows, meta, rank)
    assert (got - dense_latent(q_joint, rows, tables, lens, rank)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", KERNEL_SCENARIOS)
@pytest.mark.parametrize("storage", STORAGE)
def test_cpu_backend_equals_reference(name: str, storage: str) -> None:
    compare_kernels(name, storage, "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_backend_equals_reference_interpreted() -> None:
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter
    code = (
        "import tests.attention.test_backends as t\n"
        "for name in ('single', 'ragged', 'block_boundaries'):\n"
        "    for storage in ('fp32', 'int8'):\n"
        "        t.compare_kernels(name, storage, 'triton')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("storage,kernel_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_triton_backend_gives_bf16_rows_a_bf16_query(
    storage: str, kernel_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's absorbed query is fp32; over bf16 rows the kernel must see bf16 (tensor cores):
    an fp32 query forces exact fp32 products, measured 70x slower on an H200 (BENCHMARKS.md)."""
    from mlakit.attention.backends import triton_mla

    seen = {}

    def fake(q, rows, tables, lens, longest, block_size, rank, *rest):
        seen["dtype"] = q.dtype
        return torch.zeros(q.shape[0], q.shape[1], rank, dtype=q.dtype)

    monkeypatch.setattr(triton_mla, "mla_decode_paged", fake)
    rows, _, _, tables, lens, q_joint, _, rank = kernel_case("single", storage)
    out = triton_mla.Backend().latent_decode(q_joint, rows, meta_for("torch", tables, lens), rank)
    assert seen["dtype"] == kernel_dtype and out.dtype == q_joint.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("name", KERNEL_SCENARIOS)
@pytest.mark.parametrize("storage", STORAGE)
def test_triton_backend_equals_reference_gpu(name: str, storage: str) -> None:
    compare_kernels(name, storage, "triton", "cuda")


# -- the model over the paged cache, one packed step ------------------------------------------------

MODELS = {
    "mla-absorbed": ("tiny-mla", "absorbed"),
    "mla-naive": ("tiny-mla", "naive"),
    "mla-noq": ("tiny-mla-noq", "auto"),
    "mla-full-rope": ("full", "naive"),
    "mha": ("tiny-mha", "auto"),
    "gqa": ("tiny-gqa", "auto"),
    "mqa": ("tiny-mqa", "auto"),
}
CACHE_TOL = {"fp32": TOLERANCES[torch.float32], "bf16": 3e-2, "int8": 5e-2}


def model_for(kind: str) -> Transformer:
    if kind == "full":
        return build(tiny_mla_config(rope_mode="full", qk_rope_head_dim=0))
    return build(ModelConfig.from_preset(kind))


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("storage", STORAGE)
def test_packed_step_equals_uncached_forward(case: str, backend: str, storage: str) -> None:
    """Three decodes and two prefill chunks (one at start_pos > 0) in one call == each sequence alone."""
    kind, path = MODELS[case]
    model = model_for(kind)
    cache = PagedCache.allocate(model.config, 10**7, BLOCK, STORAGE[storage])
    pool = cache.pool
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 4, 17, 11, 6)]
    tables = [pool.allocate((len(s) + BLOCK - 1) // BLOCK) for s in seqs]
    runtime = RuntimeConfig(decode_path=path)  # type: ignore[arg-type]
    meta_backend = get_backend(backend)
    with torch.inference_mode():

        def step(q_lens: list[int], ctx: list[int], idx: list[int], nd: int) -> torch.Tensor:
            meta = AttentionMetadata.build(cache, meta_backend, q_lens, ctx, [tables[i] for i in idx], nd)
            ids = [t for i, q, c in zip(idx, q_lens, ctx) for t in seqs[i][c - q : c]]
            pos = [p for q, c in zip(q_lens, ctx) for p in range(c - q, c)]
            return model(torch.tensor([ids]), torch.tensor([pos]), runtime=runtime, attn_metadata=meta)

        # fill: sequences 0-2 hold all but their last token; sequence 4 holds its first 2 tokens
        step([8, 3, 16, 2], [8, 3, 16, 2], [0, 1, 2, 4], 0)
        # one step: decodes of 0-2, a whole prompt for 3, a chunk at start_pos 2 for 4
        got = step([1, 1, 1, 11, 4], [9, 4, 17, 11, 6], [0, 1, 2, 3, 4], 3)
        want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    assert (got - want).abs().max().item() <= CACHE_TOL[storage] * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("absorbed", [True, False])
@pytest.mark.parametrize("storage", ["fp32", "int8"])
def test_prefill_absorbed_and_naive_equal_the_forward(absorbed: bool, storage: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Chunked prefill in latent space (absorbed) and decompressed (naive) both equal the uncached forward."""
    from mlakit.attention.mla import MultiHeadLatentAttention

    monkeypatch.setattr(MultiHeadLatentAttention, "prefill_absorbed", lambda self, t, s: absorbed)
    model = model_for("tiny-mla")
    cache = PagedCache.allocate(model.config, 10**7, BLOCK, STORAGE[storage])
    seq = torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    table = cache.pool.allocate(6)
    backend = get_backend("cpu")
    runtime = RuntimeConfig(decode_path="absorbed")
    with torch.inference_mode():
        got = []
        for start, end in ((0, 9), (9, 23)):  # the second chunk starts at position 9
            meta = AttentionMetadata.build(cache, backend, [end - start], [end], [table], 0)
            ids, pos = torch.tensor([seq[start:end]]), torch.arange(start, end).unsqueeze(0)
            got.append(model(ids, pos, runtime=runtime, attn_metadata=meta)[0])
        want = model(torch.tensor([seq]))[0]
    assert (got[0] - want[8]).abs().max().item() <= CACHE_TOL[storage] * max(1.0, want.abs().max().item())
    assert (got[1] - want[22]).abs().max().item() <= CACHE_TOL[storage] * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_cpu_prefill_blocks_equal_reference(storage: str, block: int) -> None:
    """Blocks of query tokens sharing key tiles (``prefill_block``), each row at its own causal
    edge, for MLA latents and GQA K/V: equal to the reference for blocks that divide the chunk or
    not, a chunk that starts past position 0 and ends inside a 32-key tile, and a block longer
    than the chunk."""
    from mlakit.attention.backends.cpu import Backend as CpuBackend

    rows, k_rows, v_rows, tables, lens, q_joint, q, rank = kernel_case("long_tiles", storage)
    ref, got = meta_for("torch", tables, lens), meta_for("cpu", tables, lens)
    cpu = CpuBackend(prefill_block=block)
    tol = STORAGE_TOL[storage]
    g = k_rows.width // q.shape[-1]  # 3 kv heads, 2 query heads each
    for seq, (a, b) in [(0, (50, 100)), (4, (0, 150)), (3, (16, 17))]:
        q_pos = torch.arange(a, b)
        qp = torch.randn(b - a, *q_joint.shape[1:], generator=torch.Generator().manual_seed(seq)) * 0.5
        want = ref.backend.latent_prefill(qp, rows, ref, seq, q_pos, rank)
        assert (cpu.latent_prefill(qp, rows, got, seq, q_pos, rank) - want).abs().max().item() <= tol
        qk = torch.randn(b - a, *q.shape[1:], generator=torch.Generator().manual_seed(seq)) * 0.5
        want = ref.backend.kv_prefill(qk, k_rows, v_rows, ref, seq, q_pos, g)
        assert (cpu.kv_prefill(qk, k_rows, v_rows, got, seq, q_pos, g) - want).abs().max().item() <= tol
