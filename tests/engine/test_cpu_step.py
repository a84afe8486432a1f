"""The fused CPU decode step (:mod:`mlakit.engine.cpu_step`) against the model's own paged decode.

Two engines over the same model, ``fused_decode`` on and off, prefill the same prompts (the
model's path in both) and then decode step by step; each step's logits must agree within the
weights' tolerance and greedy generation must give the same tokens. fp32 weights run the same
maths in the same precision (tight); int8 weights run bf16 activations in the model's path where
the CPU has bf16 arithmetic, fp32 in the fused step (looser).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from mlakit import MlakitError, ModelConfig, SamplingConfig, Transformer, generate
from mlakit.engine import Engine, EngineConfig, Request
from mlakit.engine.cpu_step import FusedDecode, fused_decode_reason
from mlakit.native import build_kernels, cpu_flags, load_native
from mlakit.quant import prepare_weights
from tests.conftest import build, tiny_mla_config

NATIVE = load_native()
needs_native = pytest.mark.skipif(NATIVE is None, reason="needs a C compiler")
needs_vnni = pytest.mark.skipif(NATIVE is None or not NATIVE.has_int8_gemv, reason="needs AVX512-VNNI")
PROMPTS = [[5, 9, 2, 77, 3], [100], [8, 8, 8, *range(40)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _baseline(preset: str, **attention: Any) -> ModelConfig:
    base = ModelConfig.from_preset(preset)
    return dataclasses.replace(base, attention=dataclasses.replace(base.attention, **attention))


MODELS = {
    "q_lora": lambda: tiny_mla_config(),  # fused input 48 + 32 + 8 = 88 outputs: a part tile of the int8 kernel
    "no_q_lora": lambda: tiny_mla_config(q_lora_rank=None, kv_lora_rank=24),  # 96 + 24 + 8
    "ranks_per_layer_no_kv_norm": lambda: dataclasses.replace(
        tiny_mla_config(q_lora_rank=None, kv_lora_rank=40, kv_norm=False), kv_lora_ranks=(24, 40)
    ),
    "geglu_bias": lambda: dataclasses.replace(
        tiny_mla_config(kv_lora_rank=40, attention_bias=True), mlp_act="gelu_tanh"
    ),
    "gqa": lambda: ModelConfig.from_preset("tiny-gqa"),
    "mqa_qk_norm_bias": lambda: _baseline("tiny-mqa", qk_norm=True, qkv_bias=True),
    "mha": lambda: ModelConfig.from_preset("tiny-mha"),
}
# max |logit difference| / logit range, per weight format: bf16 activations (bf16, and int8 where
# the CPU has bf16 arithmetic) round after every op of the model's path; int8 activation blocks
# round differently on tiny input differences
TOL = {"fp32": 1e-4, "bf16": 3e-2, "int8": 3e-2, "int8-fp32": 1e-2}


def prepared(name: str, weights: str) -> Transformer:
    """``weights``: a format of :func:`prepare_weights`, or ``int8-fp32`` (int8 weights, fp32 activations,
    what ``int8`` gives on a CPU without bf16 arithmetic)."""
    model = build(MODELS[name]())
    with torch.no_grad():  # peaked attention (random init attends almost uniformly, hiding RoPE or score bugs)
        for n, p in model.named_parameters():
            if ".attn.w_" in n and n.endswith("weight") and "w_o" not in n and "w_v" not in n:
                p.mul_(6.0)
    prepare_weights(model, weights.removesuffix("-fp32"))
    return model.float() if weights.endswith("-fp32") else model


def engines(model: Transformer, **config: object) -> dict[bool, Engine]:
    out = {}
    for fused in (False, True):
        settings: dict = {"kv_memory": "1MiB", "block_size": 4, **config}
        out[fused] = Engine(model, EngineConfig(fused_decode=fused, **settings))
    assert out[False].runner.fused is None
    assert out[True].runner.fused is not None, fused_decode_reason(
        model, out[True].cache, out[True].runner.backend, out[True].runner.runtime
    )
    return out


def step_logits(engine: Engine, batch: list[list[int]], steps: int) -> torch.Tensor:
    """Prefill each prompt over a fragmented table, then ``steps`` batched decode steps: ``[steps, B, vocab]``.

    The decoded tokens are fixed (teacher forcing), so both paths see the same inputs at every step.
    """
    pool = engine.cache.pool
    tables = []
    for prompt in batch:
        pool.allocate(1)  # a hole before each sequence: tables are not one run
        tables.append(pool.allocate(-(-(len(prompt) + steps) // 4)))
    for p, t in zip(batch, tables):
        engine.runner.prefill(p, 0, t)
    out = []
    for s in range(steps):
        tokens = [(17 * s + 31 * i + 3) % 256 for i in range(len(batch))]
        out.append(engine.runner.decode(tokens, [len(p) + s for p in batch], tables))  # [B, vocab]
    return torch.stack(out)


@needs_native
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "weights", ["fp32", "bf16", *(pytest.param(w, marks=needs_vnni) for w in ("int8", "int8-fp32"))]
)
def test_fused_step_equals_the_model_decode(name: str, weights: str) -> None:
    model = prepared(name, weights)
    e = engines(model)
    batch = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]  # ragged lengths
    want, got = step_logits(e[False], batch, 6), step_logits(e[True], batch, 6)
    err = (got - want).abs().max() / (want.max() - want.min())
    assert err < TOL[weights], f"{err:.2e}"


@needs_native
@pytest.mark.parametrize("name", ["q_lora", "gqa"])
@pytest.mark.parametrize("cache_dtype", ["bf16", "int8"])
def test_fused_step_writes_and_reads_low_precision_caches(cache_dtype: str, name: str) -> None:
    """bf16 and int8 rows: the fused step rounds and quantizes the new row as PagedRows.write does."""
    model = prepared(name, "fp32")
    e = engines(model, cache_dtype=cache_dtype)
    batch = [PROMPTS[3], PROMPTS[0]]
    want, got = step_logits(e[False], batch, 5), step_logits(e[True], batch, 5)
    err = (got - want).abs().max() / (want.max() - want.min())
    assert err < 1e-3, f"{err:.2e}"
    used = slice(0, 4 * e[False].cache.pool.num_used)
    for got_rows, want_rows in zip(e[True].cache.layers[1], e[False].cache.layers[1]):  # (kv,) or (k, v)
        # the rows the decode steps wrote, within one rounding step of the storage (the fp32 values
        # they round differ in the last bits: another summation order)
        got, want = got_rows.data[used].float(), want_rows.data[used].float()
        if cache_dtype == "int8":
            assert got_rows.scale is not None and want_rows.scale is not None
            assert torch.allclose(got_rows.scale[used], want_rows.scale[used], rtol=1e-4)
            assert (got - want).abs().max() <= 1  # one quantization step
        else:
            assert torch.allclose(got, want, rtol=2**-7, atol=1e-6)  # one bf16 ulp


@needs_native
@pytest.mark.parametrize("name", ["no_q_lora", "gqa"])
def test_fused_greedy_generation_equals_the_model(name: str) -> None:
    """Same tokens with fp32 weights. With int8 weights the activations are quantized in blocks, and
    on a random model a 1e-6 change of the input already flips greedy tokens of the model's own
    path (measured), so int8 is held to the teacher-forced logits above."""
    model = prepared(name, "fp32")
    e = engines(model)
    sampling = SamplingConfig(max_new_tokens=12)
    outs = {f: [o.tokens for o in e[f].generate([Request(p, sampling) for p in PROMPTS])] for f in e}
    assert outs[True] == outs[False]


@needs_native
@pytest.mark.parametrize("name", ["q_lora", "gqa"])
def test_continuous_batching_through_the_fused_step_equals_solo_generation(name: str) -> None:
    """Requests joining and finishing between fused steps (ragged batches, blocks freed and reused)
    give each request the tokens the reference ``generate`` (no engine, no paging) gives it alone."""
    model = prepared(name, "fp32")
    engine = engines(model, max_batch_size=3)[True]
    fused = engine.runner.fused
    assert fused is not None
    batches: list[int] = []
    run = fused.run

    def counting(tokens: list[int], *args: object) -> torch.Tensor:
        batches.append(len(tokens))
        return run(tokens, *args)  # type: ignore[arg-type]

    fused.run = counting  # type: ignore[method-assign,assignment]
    prompts = [*PROMPTS, [7, 7, 7], list(range(60, 90))]
    budgets = [3, 9, 5, 12, 1, 7]
    got = engine.generate([Request(p, SamplingConfig(max_new_tokens=n)) for p, n in zip(prompts, budgets)])
    assert len(batches) >= 5 and max(batches) == 3 and min(batches) == 1  # fused steps of ragged batches
    for p, n, out in zip(prompts, budgets, got):
        assert out.tokens == generate(model, [p], SamplingConfig(max_new_tokens=n))[0]
    assert engine.cache.pool.num_free == engine.cache.num_blocks


@needs_native
def test_more_rows_than_the_kernel_takes_run_in_slices() -> None:
    model = prepared("q_lora", "fp32")
    e = engines(model, kv_memory="4MiB")
    batch = [[i + 1, 7] for i in range(17)]
    sizes: list[int] = []
    fused = e[True].runner.fused
    assert fused is not None
    run = fused.run

    def counting(tokens, *args: object) -> torch.Tensor:  # type: ignore[no-untyped-def]
        sizes.append(len(tokens))
        return run(tokens, *args)  # type: ignore[arg-type]

    fused.run = counting  # type: ignore[method-assign,assignment]
    want, got = step_logits(e[False], batch, 2), step_logits(e[True], batch, 2)
    assert sizes == [17, 16, 1] * 2  # 17 > 16 rows: the fused step, one call per 16 sequences
    assert torch.allclose(got, want, atol=1e-5)


@needs_native
def test_a_position_outside_the_context_is_refused_not_read() -> None:
    model = prepared("q_lora", "fp32")
    fused = engines(model)[True].runner.fused
    assert fused is not None
    with pytest.raises(MlakitError, match="positions must lie in"):
        fused.run([1], [model.config.max_seq_len], [[0] * (model.config.max_seq_len // 4 + 1)])


@needs_native
def test_reasons_for_running_through_the_model() -> None:
    def reason(model: Transformer, **config: object) -> str:
        engine = Engine(model, EngineConfig(kv_memory="1MiB", **config))  # type: ignore[arg-type]
        assert engine.runner.fused is None
        r = engine.runner
        return fused_decode_reason(model, engine.cache, r.backend, r.runtime)

    assert "not fused" in reason(build(MODELS["q_lora"]()))  # not prepared for inference
    assert "backend 'torch'" in reason(prepared("q_lora", "fp32"), attention_backend="torch")
    assert "not absorbed" in reason(prepared("q_lora", "fp32"), decode_path="naive")
    half = prepared("q_lora", "fp32").half()
    assert "float16" in reason(half)
    full = build(tiny_mla_config(rope_mode="full", qk_rope_head_dim=0))
    prepare_weights(full, "fp32")
    assert "not absorbed" in reason(full)  # full-RoPE MLA decompresses
    post = build(dataclasses.replace(MODELS["q_lora"](), post_norms=True))
    prepare_weights(post, "fp32")
    assert "post-norms" in reason(post)


@needs_native
@pytest.mark.skipif("avx2" not in cpu_flags(), reason="runs the AVX2 build, needs an AVX2 CPU")
@pytest.mark.parametrize("name", ["q_lora", "gqa"])
def test_the_avx2_only_build_runs_the_fused_step(tmp_path: Path, name: str) -> None:
    """The code CPUs without AVX-512 run (``-march=haswell``: generic vectors, no VNNI/BF16 kernels),
    on fp32 weights (``auto`` there) and a bf16 cache, against the model's decode."""
    native = build_kernels(tmp_path / "haswell.so", "haswell")
    assert native is not None and not native.has_int8_gemv
    model = prepared(name, "fp32")
    e = engines(model, cache_dtype="bf16")
    runner = e[True].runner
    runner.fused = FusedDecode(model, e[True].cache, native)
    batch = [PROMPTS[3], PROMPTS[0]]
    want, got = step_logits(e[False], batch, 4), step_logits(e[True], batch, 4)
    assert ((got - want).abs().max() / (want.max() - want.min())) < 1e-3
