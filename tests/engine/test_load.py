"""A Hugging Face Llama checkpoint runs unchanged as an mlakit GQA model (engine's --model path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlakit import MlakitError
from mlakit.engine import Engine, EngineConfig, Request
from mlakit.engine.load import load_model, source_to_transformer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=5000.0,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return d, hf


def test_llama_weights_map_onto_gqa_transformer(llama_dir: tuple[Path, object]) -> None:
    d, hf = llama_dir
    model = source_to_transformer(d)
    assert model.config.attention.kind == "gqa"
    tokens = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = hf(tokens).logits  # type: ignore[operator]
        got = model(tokens)
    assert (got - want).abs().max() < 1e-4
    engine = Engine(load_model(str(d)).model, EngineConfig(kv_memory="1MiB", block_size=4))
    out = engine.generate([Request(tokens[0].tolist())])[0]
    assert len(out.tokens) == 32


def test_load_model_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(MlakitError, match="not a checkpoint"):
        load_model(str(tmp_path))
