"""Tiny random Llama-family checkpoints saved locally (never the hub), with a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _byte_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2], bos_token=alphabet[1])


#: The tiny GQA source every conversion test builds with transformers (4 heads, 2 KV heads, head dim 16).
TINY_SOURCE: dict[str, int] = dict(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)


def make_hf_model(
    path: Path, kind: str = "llama", *, seed: int = 0, bias_std: float = 0.5, head_scale: float = 1.0
) -> Path:
    """Save a 2-layer GQA model (4 heads, 2 KV heads, head dim 16, hidden 96) with a tokenizer.

    ``head_scale`` multiplies the output head: a random model's next-token distributions are
    nearly uniform, too flat for a test of a fit to them to see anything."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        **TINY_SOURCE,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(std=bias_std)
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    _byte_tokenizer(256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


CALIBRATION_TOKENS = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def cal_llama(tiny_llama: Path):  # type: ignore[no-untyped-def]
    from mlakit.convert import calibrate

    return calibrate(str(tiny_llama), tokens=CALIBRATION_TOKENS)


@pytest.fixture(scope="session")
def cal_qwen2(tiny_qwen2: Path):  # type: ignore[no-untyped-def]
    from mlakit.convert import calibrate

    return calibrate(str(tiny_qwen2), tokens=CALIBRATION_TOKENS)
