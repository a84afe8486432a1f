"""The decoder LM: checkpoints round-trip, generation with the cache, clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlakit import MlakitError, ModelConfig, RuntimeConfig, SamplingConfig, Transformer, generate
from mlakit.generate import sample
from tests.conftest import build

KINDS = ["tiny-mla", "tiny-mla-noq", "tiny-mha", "tiny-gqa", "tiny-mqa"]


@pytest.mark.parametrize("preset", KINDS)
def test_save_load_roundtrip(preset: str, tmp_path: Path) -> None:
    model = build(ModelConfig.from_preset(preset, tie_word_embeddings=preset == "tiny-gqa"))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the full, uncached forward each step (the oracle)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("preset", KINDS)
@pytest.mark.parametrize("path", ["naive", "auto"])
def test_generate_batch_matches_uncached_greedy(preset: str, path: str) -> None:
    model = build(ModelConfig.from_preset(preset))
    prompts = [[5, 9, 2, 77, 3], [100], [8, 8, 8]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6), RuntimeConfig(decode_path=path))  # type: ignore[arg-type]
    for p, o in zip(prompts, out):
        assert o == greedy_reference(model, p, 6)


def test_stop_tokens_and_seeded_sampling() -> None:
    model = build(ModelConfig.from_preset("tiny-mla"))
    first = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4))[0]
    out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=10, stop_tokens=(first[1],)))[0]
    assert out == first[:2]
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = generate(model, [[1, 2], [3]], s)
    b = generate(model, [[1, 2], [3]], s)
    assert a == b and all(len(x) == 8 for x in a)


def test_top_k_and_top_p_filter() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, SamplingConfig(temperature=5.0, top_k=2), g)) for _ in range(50)}
    assert picks <= {3, 4} and len(picks) == 2
    picks = {int(sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(20)}
    assert picks == {4}


@pytest.mark.parametrize(
    "prompts,kwargs,msg",
    [
        ([[]], {}, "empty"),
        ([], {}, "no prompts"),
        ([[1, 256]], {}, "outside the vocabulary"),
        ([[-1]], {}, "outside the vocabulary"),
        ([list(range(200)) + list(range(60))], {}, "does not fit"),
        ([[1, 2]], {"max_seq_len": 1}, "does not fit"),
    ],
)
def test_generate_bad_input(prompts: list[list[int]], kwargs: dict, msg: str) -> None:
    model = build(ModelConfig.from_preset("tiny-mla"))
    with pytest.raises(MlakitError, match=msg):
        generate(model, prompts, SamplingConfig(max_new_tokens=2), **kwargs)


def test_forward_bad_input() -> None:
    model = build(ModelConfig.from_preset("tiny-mla"))
    cache = model.new_cache(1, 4)
    with pytest.raises(MlakitError, match="token ids"):
        model(torch.tensor([[300]]))
    with pytest.raises(MlakitError, match="positions"):
        model(torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), cache)
    with pytest.raises(MlakitError, match="positions are required"):
        model(torch.tensor([[1]]), None, cache)
    with pytest.raises(MlakitError, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="not a directory"):
        Transformer.from_pretrained(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(MlakitError, match="no config.json"):
        Transformer.from_pretrained(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MlakitError, match="not an mlakit config"):
        Transformer.from_pretrained(tmp_path / "x")
    model = build(ModelConfig.from_preset("tiny-mla"))
    model.save_pretrained(tmp_path / "ok")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MlakitError, match="cannot read"):
        Transformer.from_pretrained(tmp_path / "ok")
    other = build(ModelConfig.from_preset("tiny-mla", kv_lora_ranks=(8, 8)))
    other.save_pretrained(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["config"]["kv_lora_ranks"] = [8, 16]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlakitError, match="do not match"):
        Transformer.from_pretrained(tmp_path / "bad")


def test_training_step_reduces_loss() -> None:
    """MLA trains like any attention: a few steps on a fixed batch lower the loss."""
    model = build(ModelConfig.from_preset("tiny-mla")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
