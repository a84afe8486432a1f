"""Fuzzing the readers (safetensors, config.json, GGUF, the DeepSeek-V3 importer) with hypothesis.

Every damaged input — truncated, bit-flipped, a tensor of the wrong shape or dtype, a config value
of the wrong type or size — must end in exactly one of two ways, within seconds: a model that
loads *and runs*, or one :class:`~mlakit.errors.MlakitError`. Anything else (another exception
type, a hang, a giant allocation) fails the test with the reproducing example.

The default suite runs a few derandomized examples per reader (seconds); ``-m slow`` runs many
more, randomized. The engine is fuzzed in :mod:`tests.engine.test_fuzz_engine`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mlakit import MlakitError, Transformer
from mlakit.config import ModelConfig
from tests.conftest import build

FAST = settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMIT_S = 20  # one example; a hang fails here instead of stalling the suite

NASTY: tuple[Any, ...] = (None, -1, 0, 1, 3, 10**6, 2**31, 2**63, 1.5, -0.5, math.inf, "x", "", [], {}, [1, 2], True)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def fire(*_: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- damage ------------------------------------------------------------------------------------------


@st.composite
def byte_damage(draw: st.DrawFn, size: int, header: int) -> tuple[str, Any]:
    """Truncation, or 1-8 bit flips anywhere or within the first ``header`` bytes (where parsers look)."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip-header"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    limit = min(header, size) if kind == "flip-header" else size
    return kind, draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(0, 7)), min_size=1, max_size=8))


def apply_damage(data: bytes, damage: tuple[str, Any]) -> bytes:
    kind, arg = damage
    if kind == "truncate":
        return data[:arg]
    b = bytearray(data)
    for pos, bit in arg:
        b[pos] ^= 1 << bit
    return bytes(b)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_damage(draw: st.DrawFn, obj: Any) -> tuple[tuple[Any, ...], Any]:
    """A path into ``obj`` and what to put there (``...`` deletes the key)."""
    path = draw(st.sampled_from(_paths(obj)))
    return path, draw(st.sampled_from((..., *NASTY)))


def apply_json_damage(obj: Any, damage: tuple[tuple[Any, ...], Any]) -> Any:
    obj = json.loads(json.dumps(obj))
    path, value = damage
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


SHAPE_OPS = ("drop-row", "add-dim", "transpose", "fp16", "delete", "extra", "empty")


def apply_shape_damage(path: Path, name: str, op: str) -> None:
    """Rewrite the safetensors file ``path`` with tensor ``name`` changed by ``op`` (a valid file)."""
    state = load_file(str(path))
    t = state[name]
    if op == "drop-row":
        state[name] = t[:-1].clone() if t.shape[0] > 1 else t.new_zeros(0)
    elif op == "add-dim":
        state[name] = t.unsqueeze(0).clone()
    elif op == "transpose":
        state[name] = t.t().contiguous() if t.dim() == 2 else t.flip(0).clone().unsqueeze(1)
    elif op == "fp16":
        state[name] = t.half()
    elif op == "delete":
        del state[name]
    elif op == "extra":
        state[name + ".extra"] = t.clone()
    elif op == "empty":
        state[name] = t.new_zeros((0, *t.shape[1:]))
    save_file(state, str(path))


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def must_load_or_refuse(load: Callable[[], Any], run: Callable[[Any], None]) -> str:
    """``load()`` gives a thing ``run`` can use, or one MlakitError; anything else fails the test."""
    try:
        with time_limit(LIMIT_S):
            got = load()
    except MlakitError as e:
        assert str(e).strip(), "an empty error message"
        return "refused"
    with time_limit(LIMIT_S):
        run(got)
    return "loaded"


def run_model(model: Transformer) -> None:
    n = min(3, model.config.max_seq_len)
    tokens = torch.arange(1, n + 1).remainder(model.config.vocab_size).unsqueeze(0)  # [1, n]
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (1, n, model.config.vocab_size)


# -- an mlakit checkpoint ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlakit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mlakit-ckpt")
    build(ModelConfig.from_preset("tiny-mla")).save_pretrained(d)
    return d


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _mlakit_damage() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("weights-bytes"), st.integers(0, 10**9)),
        st.tuples(st.just("config-bytes"), st.integers(0, 10**9)),
        st.tuples(st.just("config-json"), st.integers(0, 10**9)),
        st.tuples(st.just("shape"), st.integers(0, 10**9)),
    )


def check_mlakit_checkpoint(src: Path, work: Path, data: st.DataObject) -> str:
    d = _fresh_copy(src, work)
    weights, config = d / "model.safetensors", d / "config.json"
    what = data.draw(st.sampled_from(["weights-bytes", "config-bytes", "config-json", "shape"]))
    if what == "weights-bytes":
        raw = weights.read_bytes()
        weights.write_bytes(apply_damage(raw, data.draw(byte_damage(len(raw), header_length(weights)))))
    elif what == "config-bytes":
        raw = config.read_bytes()
        config.write_bytes(apply_damage(raw, data.draw(byte_damage(len(raw), len(raw)))))
    elif what == "config-json":
        obj = json.loads(config.read_text())
        config.write_text(json.dumps(apply_json_damage(obj, data.draw(json_damage(obj)))))
    else:
        names = sorted(load_file(str(weights)))
        apply_shape_damage(weights, data.draw(st.sampled_from(names)), data.draw(st.sampled_from(SHAPE_OPS)))
    return must_load_or_refuse(lambda: Transformer.from_pretrained(d), run_model)


@FAST
@given(data=st.data())
def test_mlakit_checkpoint_reader(mlakit_ckpt: Path, tmp_path: Path, data: st.DataObject) -> None:
    check_mlakit_checkpoint(mlakit_ckpt, tmp_path / "d", data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mlakit_checkpoint_reader_many(mlakit_ckpt: Path, tmp_path: Path, data: st.DataObject) -> None:
    check_mlakit_checkpoint(mlakit_ckpt, tmp_path / "d", data)


# -- a DeepSeek-V3 Hugging Face checkpoint (the importer) ------------------------------------------


@pytest.fixture(scope="module")
def deepseek_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mlakit.interop import export_hf

    model = build(ModelConfig.from_preset("tiny-mla"))
    one = tmp_path_factory.mktemp("ds") / "one"
    sharded = one.parent / "sharded"
    export_hf(model, one)
    export_hf(model, sharded, max_shard_size=40_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    return {"one": one, "sharded": sharded}


def check_deepseek(dirs: dict[str, Path], work: Path, data: st.DataObject) -> str:
    from mlakit.interop import load_hf

    d = _fresh_copy(dirs[data.draw(st.sampled_from(sorted(dirs)))], work)
    files = sorted(p.name for p in d.iterdir() if p.suffix in (".json", ".safetensors"))
    target = d / data.draw(st.sampled_from(files))
    how = data.draw(st.sampled_from(["bytes", "json", "shape"]))
    if how == "json" and target.suffix == ".json":
        obj = json.loads(target.read_text())
        if _paths(obj):
            target.write_text(json.dumps(apply_json_damage(obj, data.draw(json_damage(obj)))))
    elif how == "shape" and target.suffix == ".safetensors":
        names = sorted(load_file(str(target)))
        apply_shape_damage(target, data.draw(st.sampled_from(names)), data.draw(st.sampled_from(SHAPE_OPS)))
    else:
        raw = target.read_bytes()
        header = header_length(target) if target.suffix == ".safetensors" else len(raw)
        target.write_bytes(apply_damage(raw, data.draw(byte_damage(max(1, len(raw)), max(1, header)))))
    return must_load_or_refuse(lambda: load_hf(d), run_model)


@FAST
@given(data=st.data())
def test_deepseek_importer(deepseek_dirs: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    check_deepseek(deepseek_dirs, tmp_path / "d", data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_deepseek_importer_many(deepseek_dirs: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    check_deepseek(deepseek_dirs, tmp_path / "d", data)


# -- a Llama-family Hugging Face config (conversion and the engine read it) --------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.convert.conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("llama"))


def check_llama_config(src: Path, work: Path, data: st.DataObject) -> None:
    from mlakit.convert.load import load_hf_model
    from mlakit.engine.load import source_to_transformer

    d = _fresh_copy(src, work)
    config = d / "config.json"
    if data.draw(st.booleans()):
        obj = json.loads(config.read_text())
        config.write_text(json.dumps(apply_json_damage(obj, data.draw(json_damage(obj)))))
    else:
        raw = config.read_bytes()
        config.write_bytes(apply_damage(raw, data.draw(byte_damage(len(raw), len(raw)))))

    def run_hf(loaded: Any) -> None:
        with torch.no_grad():
            loaded.model(torch.tensor([[1, 2, 3]]))

    must_load_or_refuse(lambda: source_to_transformer(d), run_model)
    must_load_or_refuse(lambda: load_hf_model(str(d)), run_hf)


@FAST
@given(data=st.data())
def test_llama_config_readers(llama_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    check_llama_config(llama_dir, tmp_path / "d", data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_llama_config_readers_many(llama_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    check_llama_config(llama_dir, tmp_path / "d", data)


# -- GGUF -----------------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path) -> Path:
    """A one-layer Llama GGUF (fp32 tensors, a byte-level BPE vocabulary) that transformers loads."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    v, h, f, heads, kv_heads = 256, 32, 64, 4, 2
    d = h // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet())[:v])
    w.add_token_types([1] * v)
    w.add_token_scores([0.0] * v)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(v, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.add_tensor("output.weight", t(v, h))
    for name, shape in [
        ("attn_norm", (h,)),
        ("attn_q", (h, h)),
        ("attn_k", (kv_heads * d, h)),
        ("attn_v", (kv_heads * d, h)),
        ("attn_output", (h, h)),
        ("ffn_norm", (h,)),
        ("ffn_gate", (f, h)),
        ("ffn_up", (f, h)),
        ("ffn_down", (h, f)),
    ]:
        w.add_tensor(f"blk.0.{name}.weight", np.ones(shape, np.float32) if len(shape) == 1 else t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def check_gguf(src: Path, work: Path, data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlakit.convert.load import load_hf_model

    monkeypatch.setenv("MLAKIT_CACHE", str(work / "cache"))
    raw = src.read_bytes()
    damaged = work / "damaged.gguf"
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(apply_damage(raw, data.draw(byte_damage(len(raw), 4096))))

    def run_hf(loaded: Any) -> None:
        with torch.no_grad():
            loaded.model(torch.tensor([[1, 2, 3]]))

    must_load_or_refuse(lambda: load_hf_model(str(damaged)), run_hf)


@FAST
@given(data=st.data())
def test_gguf_reader(tiny_gguf: Path, tmp_path: Path, data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    check_gguf(tiny_gguf, tmp_path, data, monkeypatch)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_gguf_reader_many(
    tiny_gguf: Path, tmp_path: Path, data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_gguf(tiny_gguf, tmp_path, data, monkeypatch)


def test_undamaged_inputs_load(
    mlakit_ckpt: Path, deepseek_dirs: dict[str, Path], tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fuzz bases are good inputs: the damage, not the base, is what gets refused."""
    from mlakit.convert.load import load_hf_model
    from mlakit.interop import load_hf

    monkeypatch.setenv("MLAKIT_CACHE", str(tmp_path / "cache"))
    run_model(Transformer.from_pretrained(mlakit_ckpt))
    for d in deepseek_dirs.values():
        run_model(load_hf(d))
    assert load_hf_model(str(tiny_gguf)).model.config.num_hidden_layers == 1
