"""docs/errors.md is true: every row's bad input gets exactly the one-line error the table shows.

Each :data:`CASES` entry builds a bad input in a temporary directory and feeds it to the CLI (one
line on stderr, exit status 2, no traceback) or the Python API (one :class:`MlakitError`). The
table in docs/errors.md is the expected text: the test reads it by case id, replaces the
temporary directory by ``DIR``, and compares (a row ending in ``…`` matches as a prefix, for
messages that quote a third-party library). A case missing from the table, or a row without a
case, fails too.

    python -m tests.test_errors_doc   # prints the table rows as the code answers today
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mlakit import MlakitError, ModelConfig, RuntimeConfig, SamplingConfig, Transformer, generate
from mlakit.cli import main
from mlakit.config import MLAConfig
from mlakit.convert.heal import heal_checkpoint
from mlakit.convert.load import load_hf_model
from mlakit.engine import Engine, EngineConfig
from mlakit.interop import export_hf, load_hf
from mlakit.io import write_dir
from mlakit.train.data import TokenDataset

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
TEXT = "The latent vector is cached instead of the keys and values. " * 40


@dataclass(frozen=True)
class Case:
    """A bad input: ``where`` is ``CLI`` or ``API``; ``run(tmp)`` returns the error text it gets."""

    id: str
    where: str
    bad_input: str
    run: Callable[[Path], str]


def cli(*argv: str) -> Callable[[Path], str]:
    """Run ``mlakit ARGV`` (``{tmp}`` in an argument is the case's directory); return its one stderr line."""

    def go(tmp: Path) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([a.format(tmp=tmp) for a in argv])
        lines = err.getvalue().strip().splitlines()
        assert rc == 2, f"exit status {rc}, stderr: {err.getvalue()}"
        assert len(lines) == 1, f"not one line: {lines}"
        return lines[0]

    return go


def api(call: Callable[[Path], object]) -> Callable[[Path], str]:
    def go(tmp: Path) -> str:
        with pytest.raises(MlakitError) as info:
            call(tmp)
        message = str(info.value)
        assert "\n" not in message.strip(), f"not one line: {message!r}"
        return message

    return go


# -- fixtures built inside the case directory ---------------------------------------------------------


def mla_ckpt(tmp: Path, name: str = "mla") -> Path:
    torch.manual_seed(0)
    d = tmp / name
    Transformer(ModelConfig.from_preset("tiny-mla")).save_pretrained(d)
    return d


def gqa_ckpt(tmp: Path) -> Path:
    torch.manual_seed(0)
    d = tmp / "gqa"
    Transformer(ModelConfig.from_preset("tiny-gqa")).save_pretrained(d)
    return d


def llama_dir(tmp: Path) -> Path:
    from tests.convert.conftest import make_hf_model

    return make_hf_model(tmp / "llama")


def missing_shard(tmp: Path) -> None:
    """A Llama directory whose index names a second shard that is not there."""
    import json

    from safetensors import safe_open

    d = llama_dir(tmp)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in names} | {names[-1]: "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def deepseek_dir(tmp: Path) -> Path:
    torch.manual_seed(0)
    export_hf(Transformer(ModelConfig.from_preset("tiny-mla")), tmp / "ds")
    return tmp / "ds"


def text_file(tmp: Path, text: str = TEXT) -> Path:
    p = tmp / "text.txt"
    p.write_text(text)
    return p


def with_config(d: Path, edit: Callable[[dict], object]) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def truncate(path: Path, keep: int = 100) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def prep(*steps: Callable[[Path], object]) -> Callable[[Path], None]:
    def go(tmp: Path) -> None:
        for s in steps:
            s(tmp)

    return go


def then(setup: Callable[[Path], object], action: Callable[[Path], str]) -> Callable[[Path], str]:
    def go(tmp: Path) -> str:
        setup(tmp)
        return action(tmp)

    return go


TRAIN = ("train", "--data", "{tmp}/text.txt", "--out", "{tmp}/run", "--size", "tiny", "--seq-len", "32")


def trained(tmp: Path) -> None:
    text_file(tmp)
    assert main([a.format(tmp=tmp) for a in (*TRAIN, "--steps", "1", "--batch-size", "2", "--eval-windows", "1")]) == 0


def small_engine() -> Engine:
    torch.manual_seed(0)
    return Engine(Transformer(ModelConfig.from_preset("tiny-mla")), EngineConfig(kv_memory="8KiB", block_size=4))


# -- the cases (the order of docs/errors.md) ------------------------------------------------------------

CASES: list[Case] = [
    # files and checkpoints, CLI
    Case("convert-missing-model", "CLI", "`mlakit convert --model` a path that does not exist",
         cli("convert", "--model", "{tmp}/nope", "--out", "{tmp}/out")),
    Case("convert-not-gguf", "CLI", "`mlakit convert --model` a file that is not `.gguf`",
         then(text_file, cli("convert", "--model", "{tmp}/text.txt", "--out", "{tmp}/out"))),
    Case("convert-junk-gguf", "CLI", "`mlakit convert --model` a `.gguf` that is not GGUF",
         then(lambda t: (t / "m.gguf").write_bytes(b"not a gguf"),
              cli("convert", "--model", "{tmp}/m.gguf", "--out", "{tmp}/o"))),
    Case("convert-dir-without-config", "CLI", "`mlakit convert --model` a directory without config.json",
         then(lambda t: (t / "empty").mkdir(), cli("convert", "--model", "{tmp}/empty", "--out", "{tmp}/out"))),
    Case("convert-malformed-config", "CLI", "`mlakit convert --model` a directory whose config.json is not JSON",
         then(lambda t: (llama_dir(t) / "config.json").write_text("{'a': 1}"),
              cli("convert", "--model", "{tmp}/llama", "--out", "{tmp}/out"))),
    Case("convert-missing-shard", "CLI", "`mlakit convert --model` a sharded checkpoint missing a shard",
         then(missing_shard, cli("convert", "--model", "{tmp}/llama", "--out", "{tmp}/out"))),
    Case("convert-out-exists", "CLI", "`mlakit convert --out` an existing directory, no `--overwrite`",
         then(lambda t: (t / "out").mkdir(), cli("convert", "--model", "{tmp}/x", "--out", "{tmp}/out"))),
    Case("convert-kv-fraction", "CLI", "`mlakit convert --kv-fraction 1.5`",
         cli("convert", "--model", "{tmp}/x", "--out", "{tmp}/out", "--kv-fraction", "1.5")),
    Case("eval-malformed-checkpoint", "CLI", "`mlakit eval --model` a checkpoint whose config.json is cut short",
         then(lambda t: truncate(mla_ckpt(t) / "config.json", 30), cli("eval", "--model", "{tmp}/mla"))),
    Case("generate-not-a-checkpoint", "CLI", "`mlakit generate --model` an empty directory",
         then(lambda t: (t / "empty").mkdir(), cli("generate", "--model", "{tmp}/empty", "hi"))),
    Case("generate-no-tokenizer", "CLI", "`mlakit generate --model` a checkpoint without tokenizer files",
         then(mla_ckpt, cli("generate", "--model", "{tmp}/mla", "hi"))),
    Case("generate-kv-memory", "CLI", "`mlakit generate --kv-memory lots`",
         cli("generate", "--model", "{tmp}/mla", "--kv-memory", "lots", "hi")),
    Case("export-gqa", "CLI", "`mlakit export-hf` a GQA (not MLA) checkpoint",
         then(gqa_ckpt, cli("export-hf", "{tmp}/gqa", "{tmp}/hf"))),
    Case("export-out-exists", "CLI", "`mlakit export-hf` into a non-empty directory, no `--overwrite`",
         then(prep(mla_ckpt, lambda t: (t / "hf").mkdir(), lambda t: (t / "hf" / "x").write_text("x")),
              cli("export-hf", "{tmp}/mla", "{tmp}/hf"))),
    Case("import-not-deepseek", "CLI", "`mlakit import-hf` a Llama checkpoint",
         then(llama_dir, cli("import-hf", "{tmp}/llama", "{tmp}/out"))),
    Case("import-truncated-weights", "CLI", "`mlakit import-hf` a DeepSeek checkpoint whose safetensors is cut short",
         then(lambda t: truncate(deepseek_dir(t) / "model.safetensors"), cli("import-hf", "{tmp}/ds", "{tmp}/out"))),
    Case("import-malformed-index", "CLI", "`mlakit import-hf` a checkpoint whose safetensors index is not JSON",
         then(lambda t: (deepseek_dir(t) / "model.safetensors.index.json").write_text("{"),
              cli("import-hf", "{tmp}/ds", "{tmp}/out"))),
    Case("train-missing-data", "CLI", "`mlakit train --data` a file that does not exist",
         cli("train", "--data", "{tmp}/nope.txt", "--out", "{tmp}/run")),
    Case("train-empty-data", "CLI", "`mlakit train --data` an empty file",
         then(lambda t: text_file(t, ""), cli("train", "--data", "{tmp}/text.txt", "--out", "{tmp}/run"))),
    Case("train-bad-tokenizer", "CLI", "`mlakit train --tokenizer` something that is not a tokenizer",
         then(text_file, cli("train", "--data", "{tmp}/text.txt", "--out", "{tmp}/run", "--tokenizer", "nonsense"))),
    Case("train-batch-too-large", "CLI", "`mlakit train` with a batch larger than the text",
         then(lambda t: text_file(t, "short text. " * 20), cli(*TRAIN, "--batch-size", "64"))),
    Case("train-resume-mismatch", "CLI", "`mlakit train` again into a run made with another batch size",
         then(trained, cli(*TRAIN, "--steps", "2", "--batch-size", "4", "--eval-windows", "1"))),
    Case("train-damaged-state", "CLI", "`mlakit train` resuming from a checkpoint whose trainer_state.pt is cut short",
         then(prep(trained, lambda t: truncate(t / "run" / "checkpoints" / "step-00000001" / "trainer_state.pt")),
              cli(*TRAIN, "--steps", "2", "--batch-size", "2", "--eval-windows", "1"))),
    Case("distill-student-not-mlakit", "CLI", "`mlakit distill --student` a Hugging Face directory",
         then(llama_dir, cli("distill", "--teacher", "{tmp}/llama", "--student", "{tmp}/llama", "--out", "{tmp}/o"))),
    Case("kv-size-preset", "CLI", "`mlakit kv-size --preset` an unknown name",
         cli("kv-size", "--preset", "gpt-5")),
    Case("kv-size-malformed-config", "CLI", "`mlakit kv-size --config` a config.json with a wrong field",
         then(lambda t: with_config(mla_ckpt(t), lambda c: c["config"].update(num_layers=0)),
              cli("kv-size", "--config", "{tmp}/mla"))),
    # the Python API
    Case("load-no-config", "API", "`Transformer.from_pretrained` of a directory without config.json",
         api(lambda t: Transformer.from_pretrained(t))),
    Case("load-malformed-config", "API", "`Transformer.from_pretrained` of a config.json written with single quotes",
         api(lambda t: Transformer.from_pretrained(
             (mla_ckpt(t) / "config.json").write_text("{'format': 'mlakit'}") and t / "mla"))),
    Case("load-hf-config", "API", "`Transformer.from_pretrained` of a Hugging Face directory",
         api(lambda t: Transformer.from_pretrained(llama_dir(t)))),
    Case("load-truncated-weights", "API", "`Transformer.from_pretrained` with model.safetensors cut short",
         api(lambda t: Transformer.from_pretrained(truncate(mla_ckpt(t) / "model.safetensors").parent))),
    Case("load-layer-count", "API", "`Transformer.from_pretrained` whose config claims more layers than stored",
         api(lambda t: Transformer.from_pretrained(
             with_config(mla_ckpt(t), lambda c: c["config"].update(num_layers=3))))),
    Case("load-wrong-shape", "API", "`Transformer.from_pretrained` whose config has another hidden size",
         api(lambda t: Transformer.from_pretrained(
             with_config(mla_ckpt(t), lambda c: c["config"]["attention"].update(kv_lora_rank=16))))),
    Case("import-bad-field", "API", "`mlakit.interop.load_hf` of a config.json with a list where a number goes",
         api(lambda t: load_hf(
             with_config(deepseek_dir(t), lambda c: c.update(first_k_dense_replace=[1, 2], n_routed_experts=8))))),
    Case("heal-malformed-record", "API", "`heal_checkpoint` of a checkpoint whose conversion.json is not JSON",
         api(lambda t: heal_checkpoint(
             (mla_ckpt(t) / "conversion.json").write_text("{\"source\": ") and t / "mla", t / "out"))),
    Case("token-sidecar", "API", "`TokenDataset` whose .json sidecar is not JSON",
         api(lambda t: TokenDataset(
             (t / "t.bin").write_bytes(b"\0\0") and (t / "t.bin.json").write_text("{") and t / "t.bin"))),
    Case("mla-config", "API", "`MLAConfig(kv_lora_rank=0, ...)`",
         api(lambda t: MLAConfig(
             hidden_size=64, num_heads=4, kv_lora_rank=0, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))),
    Case("max-seq-len", "API", "`ModelConfig.from_preset('tiny-mla', max_seq_len=2**30)`",
         api(lambda t: ModelConfig.from_preset("tiny-mla", max_seq_len=2**30))),
    Case("runtime-decode-path", "API", "`RuntimeConfig(decode_path='fast')`",
         api(lambda t: RuntimeConfig(decode_path="fast"))),  # type: ignore[arg-type]
    Case("engine-cache-dtype", "API", "`EngineConfig(cache_dtype='fp16')`",
         api(lambda t: EngineConfig(cache_dtype="fp16"))),
    Case("sampling-temperature", "API", "`SamplingConfig(temperature=-1)`",
         api(lambda t: SamplingConfig(temperature=-1))),
    Case("engine-empty-prompt", "API", "`Engine.add_request([])`",
         api(lambda t: small_engine().add_request([]))),
    Case("engine-prompt-past-budget", "API", "`Engine.add_request` of a prompt larger than the whole KV budget",
         api(lambda t: small_engine().add_request(list(range(100))))),
    Case("engine-unknown-output", "API", "`Engine.output('nope')`",
         api(lambda t: small_engine().output("nope"))),
    Case("generate-int8-cache", "API", "`mlakit.generate(..., RuntimeConfig(cache_dtype='int8'))`",
         api(lambda t: generate(Transformer(ModelConfig.from_preset("tiny-mla")), [[1, 2]],
                                SamplingConfig(max_new_tokens=1), RuntimeConfig(cache_dtype="int8")))),
    Case("forward-too-long", "API", "a forward pass over more tokens than `max_seq_len`",
         api(lambda t: Transformer(ModelConfig.from_preset("tiny-mla", max_seq_len=4))(
             torch.zeros(1, 5, dtype=torch.long)))),
    Case("gguf-layer-count", "API", "`load_hf_model` of a GGUF whose header claims more layers than it holds",
         api(lambda t: load_hf_model(str(damaged_gguf(t))))),
    Case("write-dir-onto-file", "API", "`mlakit.io.write_dir` onto an existing file",
         api(lambda t: write_dir(
             text_file(t), lambda d: None, overwrite=True))),
]  # fmt: skip


def damaged_gguf(tmp: Path) -> Path:
    """The fuzz suite's tiny GGUF with its block count raised from 1 to 3 in the header."""
    from tests.test_fuzz import write_tiny_gguf

    good = write_tiny_gguf(tmp / "tiny.gguf")
    data = bytearray(good.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # the key, then its uint32 type tag, then the value
    data[at : at + 4] = (3).to_bytes(4, "little")
    bad = tmp / "bad.gguf"
    bad.write_bytes(bytes(data))
    return bad


def documented() -> dict[str, str]:
    """``case id -> documented message`` from the table in docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(
            r"\| \d+ \| (?:CLI|API) \| .+ \| `` (.+) `` \| `test_documented_error\[([a-z0-9-]+)\]` \|", line
        )
        if m:
            rows[m.group(2)] = m.group(1).replace("\\|", "|")
    return rows


def row(number: int, case: Case, message: str) -> str:
    """The table row of ``case`` (the format :func:`documented` reads)."""
    return (
        f"| {number} | {case.where} | {case.bad_input} | `` {message.replace('|', chr(92) + '|')} `` "
        f"| `test_documented_error[{case.id}]` |"
    )


def normalise(message: str, tmp: Path) -> str:
    return message.replace(str(tmp.resolve()), "DIR").replace(str(tmp), "DIR")


def test_table_lists_every_case_once() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert sorted(documented()) == sorted(ids), "docs/errors.md and CASES list different cases"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_documented_error(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLAKIT_CACHE", str(tmp_path / "cache"))
    got = normalise(case.run(tmp_path), tmp_path)
    want = documented()[case.id]
    if want.endswith("…"):
        assert got.startswith(want[:-1]), f"\n got: {got}\nwant: {want}"
    else:
        assert got == want


if __name__ == "__main__":  # print the rows as the code answers today
    import os
    import tempfile

    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            os.environ["MLAKIT_CACHE"] = str(tmp / "cache")
            try:
                msg = normalise(case.run(tmp), tmp)
            except BaseException as e:  # show what went wrong instead
                msg = f"!! {type(e).__name__}: {e}"
        print(row(i, case, msg))
