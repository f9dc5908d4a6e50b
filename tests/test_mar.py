"""MAR (generators/mar.py): masking schedules, MAE trunk, loss and sampling."""
import math

import pytest
import torch

import zoo
from generators.base import Condition, SamplingConfig
from generators.mar import (
    MAR,
    masked_counts,
    random_orders,
    reveal_plan,
    truncated_mask_ratio,
)
from zoo import registry
from zoo.tokens import Tokens, TokenSpec, random_tokens

SMALL = {"dim": 32, "depth": 1, "heads": 2, "head_width": 32, "head_depth": 1, "buffer_size": 4,
         "text_vocab_size": None, "sampling_steps": 4, "num_iter": 4, "diffusion_batch_mul": 2}


def small(**kw):
    torch.manual_seed(0)
    return zoo.create("generator/mar-tiny", **{**SMALL, **kw})


@pytest.mark.parametrize("n,T", [(64, 16), (64, 64), (64, 1), (16, 16), (256, 64), (10, 3)])
def test_masked_count_strictly_decreases_to_zero(n, T):
    c = masked_counts(n, T)
    assert len(c) == T and c[-1] == 0
    assert all(a > b for a, b in zip([n] + c, c)), c
    # MAR's cosine rule wherever the "at least one per step" clamp does not bite
    for k in range(T - 1):
        f = math.floor(n * math.cos(math.pi / 2 * (k + 1) / T))
        assert c[k] == max(1, min((n if k == 0 else c[k - 1]) - 1, f))


def test_num_iter_beyond_token_count_is_refused():
    with pytest.raises(ValueError, match="num_iter"):
        masked_counts(8, 9)


def test_reveal_plan_predicts_each_position_exactly_once():
    g = torch.Generator().manual_seed(0)
    orders = random_orders(3, 20, g)
    plan = reveal_plan(orders, 6)
    total = torch.zeros(3, 20, dtype=torch.int64)
    for mask, pred in plan:
        assert bool((pred <= mask).all())           # only masked positions are predicted
        total += pred.long()
    assert bool((total == 1).all())
    # per row, positions are revealed from the end of the order towards its start
    first = orders[:, -1]
    assert bool(plan[0][1][torch.arange(3), first].all())


def test_training_mask_ratio_is_truncated_gaussian():
    torch.manual_seed(0)
    r = truncated_mask_ratio(20000, 0.7)
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    a = -1.2
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (Phi(0) - Phi(a))
    assert abs(float(r.mean()) - mean) < 0.005


def test_encoder_never_reads_masked_tokens():
    m = small().eval()
    B, N, C = 2, 64, 8
    seq = torch.randn(B, N, C)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, ::3] = True
    buf = m.buffer(Condition(torch.tensor([1, 2])), B)
    with torch.no_grad():
        z = m.backbone(m.embed(seq), buf, mask)
        seq2 = seq.clone()
        seq2[mask] = torch.randn(int(mask.sum()), C) * 10
        z2 = m.backbone(m.embed(seq2), buf, mask)
        seq3 = seq.clone()
        seq3[~mask] += 1.0
        z3 = m.backbone(m.embed(seq3), buf, mask)
    torch.testing.assert_close(z, z2)
    assert not torch.allclose(z, z3)
    with pytest.raises(ValueError, match="same number"):
        bad = mask.clone()
        bad[0, 1] = True
        m.backbone(m.embed(seq), buf, bad)


def test_loss_trains_only_on_masked_tokens_and_backpropagates():
    m = small(mask_ratio_dist="truncnorm")  # MAR's ratio; the tiny default is "cosine"
    g = torch.Generator().manual_seed(0)
    tok = random_tokens(m.spec, 3, g)
    out = m.loss(tok, m.example_condition(3, g))
    assert torch.isfinite(out["loss"]) and 0.7 <= float(out["mask_ratio"]) <= 1.0
    out["loss"].backward()
    assert m.head.net.out.weight.grad.abs().sum() > 0  # adaLN-Zero: only the output layer at init
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):  # out layer, then the adaLN maps, then the condition path open up
        opt.step()
        m.zero_grad()
        m.loss(tok, Condition(torch.tensor([0, 1, 2])))["loss"].backward()
    assert m.cond_encoder.classes.table.weight.grad.abs().sum() > 0


def test_generate_runs_num_iter_trunk_forwards_and_is_seeded():
    m = small()
    calls = []
    m.backbone.register_forward_pre_hook(lambda mod, a: calls.append(a[0].shape[0]))
    cond = Condition(torch.tensor([0, 5]))
    s = SamplingConfig(cfg=3.0, cfg_schedule="linear", extra={"num_iter": 5})
    a = m.generate(cond, s, torch.Generator().manual_seed(0))
    assert len(calls) == 5 and calls[0] == 4  # CFG doubles the batch
    b = m.generate(cond, s, torch.Generator().manual_seed(0))
    c = m.generate(cond, s, torch.Generator().manual_seed(1))
    assert isinstance(a, Tokens) and a.spec == m.spec and a == b and a != c
    calls.clear()
    m.generate(Condition(torch.tensor([0, 5])), SamplingConfig(), torch.Generator().manual_seed(0))
    assert calls == [2] * m.num_iter  # no CFG: single batch


def test_every_position_is_written_once_during_generate(monkeypatch):
    """Instrument the head: each step fills exactly the positions the plan reveals."""
    m = small()
    filled = []
    orig = m._sample_head

    def spy(z, zu, cfg, sampling, generator, steps):
        out = orig(z, zu, cfg, sampling, generator, steps)
        filled.append(z.shape[0])
        return torch.full_like(out, float(len(filled)))  # tag rows by step

    monkeypatch.setattr(m, "_sample_head", spy)
    toks = m.generate(Condition(torch.tensor([1, 2])), SamplingConfig(extra={"num_iter": 6}),
                      torch.Generator().manual_seed(0))
    counts = masked_counts(64, 6)
    assert filled == [2 * (a - b) for a, b in zip([64] + counts, counts)]
    steps = toks.data[..., 0].flatten(1)
    for k in range(6):  # every step tag appears exactly as often as the plan says
        assert int((steps == k + 1).sum()) == filled[k]


def test_cfg_schedule_linear_ramps_in_revealed_fraction():
    s = SamplingConfig(cfg=4.0, cfg_schedule="linear")
    assert MAR._cfg_scale(s, 4.0, 64, 64) == 1.0
    assert MAR._cfg_scale(s, 4.0, 64, 0) == 4.0
    assert MAR._cfg_scale(s, 4.0, 64, 32) == 2.5
    assert MAR._cfg_scale(SamplingConfig(cfg=4.0), 4.0, 64, 60) == 4.0


@pytest.mark.parametrize("spec", [TokenSpec("discrete", "grid", (4, 4), vocab_size=32),
                                  TokenSpec("binary", "sequence", (12,), bits=5)])
def test_discrete_and_binary_tokens_use_categorical_heads(spec):
    m = small(spec=spec, num_iter=3)
    g = torch.Generator().manual_seed(0)
    out = m.loss(random_tokens(spec, 2, g), m.example_condition(2, g))
    assert "acc" in out and torch.isfinite(out["loss"])
    out["loss"].backward()
    toks = m.generate(Condition(torch.tensor([3, 4])), SamplingConfig(cfg=2.0), torch.Generator().manual_seed(0))
    assert toks.spec == spec and toks.batch_size == 2


def test_config_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="buffer_size"):
        small(buffer_size=1, text_vocab_size=64, text_len=4)
    with pytest.raises(ValueError, match="num_iter"):
        small(num_iter=65)


def test_paper_configs_match_mar_sizes():
    for name, want in (("generator/mar-b", 208e6), ("generator/mar-l", 479e6), ("generator/mar-h", 943e6)):
        n = registry.info(name)["params"]
        assert abs(n / want - 1) < 0.01, (name, n)


def test_cosine_mask_ratio_covers_the_ratios_sampling_visits():
    import zoo
    torch.manual_seed(0)
    g = zoo.create("generator/mar-tiny", mask_ratio_dist="cosine")
    r = torch.tensor([g.train_mask_ratio() for _ in range(4000)])
    # cos(pi/2 u): P(r < 0.7) = 1 - 2/pi * acos(0.7) ~= 0.494; MAR's truncnorm never goes below 0.7
    assert abs(float((r < 0.7).float().mean()) - (1 - 2 / math.pi * math.acos(0.7))) < 0.03
    t = zoo.create("generator/mar-tiny", mask_ratio_dist="truncnorm")
    assert min(t.train_mask_ratio() for _ in range(500)) >= 0.7
    with pytest.raises(ValueError):
        zoo.create("generator/mar-tiny", mask_ratio_dist="uniform")
