"""Sampling and cached generation for a batch of prompts of different lengths.

``generate`` prefills all prompts at once (right-padded; padding lands at positions past each
prompt's end, which no real query can see and which decode overwrites), then decodes one token
per step for every sequence through the model's cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mlakit.config import RuntimeConfig
from mlakit.errors import MlakitError
from mlakit.model import Transformer


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k``/``top_p`` filter before sampling."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    logprobs: int | None = None  # engine: report the chosen token's log-probability and this many top ones

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise MlakitError(f"SamplingConfig.max_new_tokens={self.max_new_tokens!r} is invalid: must be an int >= 0")
        if not self.temperature >= 0:
            raise MlakitError(f"SamplingConfig.temperature={self.temperature!r} is invalid: must be >= 0")
        if self.top_k is not None and self.top_k <= 0:
            raise MlakitError(f"SamplingConfig.top_k={self.top_k!r} is invalid: must be a positive integer or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MlakitError(f"SamplingConfig.top_p={self.top_p!r} is invalid: must lie in (0, 1] or be None")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise MlakitError(
                f"SamplingConfig.logprobs={self.logprobs!r} is invalid: must be an int in [0, 20] or None"
            )
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, vocab]`` under ``config``."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints; raises MlakitError for an empty batch/prompt or out-of-vocab ids."""
    if len(prompts) == 0:
        raise MlakitError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise MlakitError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise MlakitError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        out.append(p)
    return out


@torch.inference_mode()
def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    runtime: RuntimeConfig | None = None,
    max_seq_len: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, after each decode step, the new token of every sequence (``None`` once it stopped)."""
    sampling = sampling or SamplingConfig()
    runtime = runtime or RuntimeConfig()
    prompts = validate_prompts(prompts, model.config.vocab_size)
    lengths = [len(p) for p in prompts]
    need = max(lengths) + sampling.max_new_tokens
    capacity = max_seq_len or min(need, model.config.max_seq_len)
    if max(lengths) > capacity or capacity > model.config.max_seq_len:
        room = min(capacity, model.config.max_seq_len)
        raise MlakitError(f"prompt of {max(lengths)} tokens does not fit the context ({room} tokens)")
    device = model.embed.weight.device
    b, t = len(prompts), max(lengths)
    cache = model.new_cache(b, capacity, runtime.cache_storage(model.embed.weight.dtype))  # type: ignore[arg-type]
    tokens = torch.zeros(b, t, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
    cur = torch.tensor(lengths, device=device)  # next position per sequence
    logits = model(tokens, positions, cache, runtime, logit_index=cur - 1)  # [B, vocab]
    gen = sampling.generator(device)
    stop = set(sampling.stop_tokens)
    done = [False] * b
    for _ in range(sampling.max_new_tokens):
        nxt = sample(logits, sampling, gen)  # [B]
        step: list[int | None] = []
        for i, tok in enumerate(nxt.tolist()):
            step.append(None if done[i] else tok)
            done[i] = done[i] or tok in stop or int(cur[i]) + 1 >= capacity
        yield step
        if all(done):
            return
        # finished rows keep stepping in place (their output is ignored) so shapes stay static
        cur = torch.clamp(cur + 1, max=capacity - 1)
        logits = model(nxt.unsqueeze(1), (cur - 1).unsqueeze(1), cache, runtime, logit_index=torch.zeros_like(cur))


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    runtime: RuntimeConfig | None = None,
    max_seq_len: int | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (without the prompt; a stop token, when hit, is included)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, sampling, runtime, max_seq_len):
        for i, tok in enumerate(step):
            if tok is not None:
                out[i].append(tok)
    return out
