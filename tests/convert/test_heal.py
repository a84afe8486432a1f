"""`mlakit heal`: the sampled-query attention equals the full forward, and healing moves a lossy
conversion towards its source (layer errors fall in the local fits, the KL to the source's
next-token distribution falls in the end-to-end phase)."""

from __future__ import annotations

import pytest
import torch

from mlakit.convert import ConversionConfig, convert_calibrated
from mlakit.convert.heal import HealConfig, attention_at, heal
from mlakit.errors import MlakitError
from mlakit.optim import distill_loss

TOKENS = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(3))


def _lossy(cal):  # type: ignore[no-untyped-def]
    return convert_calibrated(cal, ConversionConfig(kv_fraction=0.25, rope="decoupled", rope_dims=4)).model


def test_attention_at_sampled_queries_equals_full_forward(cal_llama) -> None:  # type: ignore[no-untyped-def]
    model = _lossy(cal_llama)
    attn = model.layers[1].attn
    x = torch.randn(1, 50, model.config.hidden_size)
    idx = torch.tensor([0, 7, 8, 31, 49])
    with torch.no_grad():
        full = attn(x)[:, idx]
        part = attention_at(attn, x, idx)
    assert torch.allclose(full, part, atol=1e-5)


def test_heal_lowers_attention_error_on_held_out_text(cal_llama) -> None:  # type: ignore[no-untyped-def]
    from mlakit.convert.heal import _hf_attention

    model = _lossy(cal_llama)
    ref = cal_llama.loaded.model
    held_out = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4))

    def layer0_error() -> float:
        # layer 0 sees the same input in both models (embedding + norm): a clean held-out probe
        with torch.no_grad():
            x = model.layers[0].attn_norm(model.embed(held_out))
            target = torch.cat([_hf_attention(ref, 0, xw) for xw in x.split(1)])
            return float((model.layers[0].attn(x) - target).pow(2).sum() / target.pow(2).sum())

    before = layer0_error()
    # random tokens through a random model are close to noise: a small fit generalises only a little,
    # and a wrong target (e.g. a missing causal mask) makes the held-out error grow instead
    tokens = torch.randint(0, 256, (32, 96), generator=torch.Generator().manual_seed(3))
    config = HealConfig(
        windows=32,
        seq_len=96,
        steps=60,
        lr=1e-3,
        query_tokens=48,
        params=("w_dkv", "w_kr", "w_uk", "w_uv"),
        distill_steps=0,  # the local fits alone
    )
    res = heal(model, ref, tokens, config)
    assert len(res.before) == len(res.after) == 2
    assert all(a < 0.8 * b for a, b in zip(res.after, res.before))
    assert layer0_error() < 0.95 * before


def test_bf16_local_fits_match_fp32(cal_llama) -> None:  # type: ignore[no-untyped-def]
    # the fast path (matmuls under bf16 autocast, picked where the CPU has bf16 arithmetic) against
    # the fp32 reference: the same fit to within bf16's rounding, and a fit at all
    tokens = torch.randint(0, 256, (8, 96), generator=torch.Generator().manual_seed(3))
    results = {}
    for bf16 in (False, True):
        config = HealConfig(windows=8, seq_len=96, steps=30, lr=1e-3, query_tokens=48, distill_steps=0, bf16=bf16)
        results[bf16] = heal(_lossy(cal_llama), cal_llama.loaded.model, tokens, config)
    ref, fast = results[False], results[True]
    assert fast.before[0] == pytest.approx(ref.before[0], rel=1e-6)  # probes are fp32 in both
    # later layers start from the inputs the (slightly different) healed layers below produce
    assert fast.before == pytest.approx(ref.before, rel=0.05)
    assert fast.after != ref.after  # the bf16 path did run
    for a, b, before in zip(fast.after, ref.after, ref.before):
        assert a < 0.8 * before
        assert a == pytest.approx(b, rel=0.1, abs=1e-3)


def test_heal_only_touches_the_chosen_weights(cal_llama) -> None:  # type: ignore[no-untyped-def]
    model = _lossy(cal_llama)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    config = HealConfig(
        steps=3, lr=1e-2, query_tokens=16, params=("w_uv",), distill_steps=2, distill_seq_len=96, distill_batch=1
    )
    res = heal(model, cal_llama.loaded.model, TOKENS, config)
    assert res.distill_steps == 2 and res.distill_kl is not None  # the end-to-end phase ran, on w_uv alone
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {f"layers.{i}.attn.w_uv.weight" for i in range(2)}
    assert all(p.requires_grad for p in model.parameters())  # as before the heal
    assert not model.training


def test_heal_rejects_bad_config_and_mismatched_reference(cal_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MlakitError, match="steps"):
        HealConfig(steps=0)
    with pytest.raises(MlakitError, match="params"):
        HealConfig(params=("w_nope",))
    with pytest.raises(MlakitError, match="distill_steps"):
        HealConfig(distill_steps=-1)
    with pytest.raises(MlakitError, match="distill_lr"):
        HealConfig(distill_lr=0.0)
    with pytest.raises(MlakitError, match="distill_batch"):
        HealConfig(distill_batch=0)
    with pytest.raises(MlakitError, match="answer_weight"):
        HealConfig(answer_weight=-0.5)
    model = _lossy(cal_llama)
    with pytest.raises(MlakitError, match="context"):
        heal(model, cal_llama.loaded.model, torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(MlakitError, match="distillation windows"):
        heal(model, cal_llama.loaded.model, TOKENS, HealConfig(steps=1, query_tokens=16, distill_batch=4))


def test_a_fit_that_makes_a_layer_worse_is_undone(cal_llama) -> None:  # type: ignore[no-untyped-def]
    model = _lossy(cal_llama)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    res = heal(model, cal_llama.loaded.model, TOKENS, HealConfig(steps=5, lr=10.0, query_tokens=16, distill_steps=0))
    assert res.after == res.before
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def cal_sharp(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny source with a scaled-up head: its next-token distributions are far from uniform."""
    from mlakit.convert import calibrate
    from tests.convert.conftest import CALIBRATION_TOKENS, make_hf_model

    return calibrate(str(make_hf_model(tmp_path_factory.mktemp("sharp"), head_scale=30.0)), tokens=CALIBRATION_TOKENS)


def test_the_end_to_end_phase_fits_the_source_distribution(cal_sharp) -> None:  # type: ignore[no-untyped-def]
    ref = cal_sharp.loaded.model
    tokens = torch.randint(0, 256, (32, 96), generator=torch.Generator().manual_seed(3))
    local, end_to_end = tokens[:8], tokens[8:]

    def healed_kl(distill_steps: int) -> float:
        model = _lossy(cal_sharp)
        config = HealConfig(
            windows=8,
            seq_len=96,
            steps=20,
            lr=1e-3,
            query_tokens=48,
            distill_steps=distill_steps,
            distill_lr=1e-3,
            bf16=False,
        )
        heal(model, ref, local, config, distill_tokens=end_to_end)
        with torch.no_grad():  # KL(source || model) on the end-to-end windows
            return float(distill_loss(model(end_to_end), ref(end_to_end).logits, end_to_end, 1.0, 1.0)[1])

    local_only, both = healed_kl(0), healed_kl(24)
    # measured 2.41 -> 1.23; a phase that did not train (or trained the wrong weights) leaves it
    assert both < 0.7 * local_only


def test_distill_loss_weighs_the_last_position_on_top() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, 11, generator=gen), torch.randn(3, 7, 11, generator=gen)
    tokens = torch.randint(0, 11, (3, 7), generator=gen)
    plain = distill_loss(student, teacher, tokens, 1.0, 1.0)
    zero = distill_loss(student, teacher, tokens, 1.0, 1.0, torch.zeros(3))
    assert torch.equal(plain[0], zero[0])
    w = torch.tensor([2.0, 0.0, 0.5])
    weighted = distill_loss(student, teacher, tokens, 1.0, 1.0, w)
    log_s, log_t = student[:, -1].log_softmax(-1), teacher[:, -1].log_softmax(-1)
    last = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B] KL(teacher || student) at the last position
    torch.testing.assert_close(weighted[0], plain[0] + (w * last).mean())
    assert torch.equal(weighted[1], plain[1])  # the reported KL stays the plain per-token mean


def test_answer_weight_reaches_the_end_to_end_loss_on_answer_rows_only(cal_sharp) -> None:  # type: ignore[no-untyped-def]
    ref = cal_sharp.loaded.model
    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(5))
    local, end_to_end = tokens[:2], tokens[2:]

    def healed(weight: float, answers: torch.Tensor | None) -> dict[str, torch.Tensor]:
        model = _lossy(cal_sharp)
        config = HealConfig(
            windows=2, seq_len=64, steps=1, query_tokens=16, distill_steps=3, distill_batch=2, bf16=False,
            answer_weight=weight,
        )  # fmt: skip
        heal(model, ref, local, config, distill_tokens=end_to_end, answers=answers)
        return model.state_dict()

    none = torch.zeros(len(end_to_end), dtype=torch.bool)
    some = none.clone()
    some[1::2] = True
    base = healed(0.0, some)
    same = [healed(2.0, none), healed(2.0, None), healed(0.0, None)]
    moved = healed(2.0, some)
    assert all(torch.equal(st[k], base[k]) for st in same for k in base)  # no answer rows, or weight 0: no change
    assert not all(torch.equal(moved[k], base[k]) for k in base)  # the weight reached the loss
