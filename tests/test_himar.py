"""Hi-MAR (generators/himar.py): pivot phase, shared trunk, pivots, sampling."""
import pytest
import torch

import zoo
from generators.base import Condition, SamplingConfig
from generators.himar import HiMAR
from generators.mar import MaskedEncoderDecoder, ScaleAwareBlock, masked_counts
from zoo import registry
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec, random_tokens

SMALL = {"dim": 32, "depth": 1, "heads": 2, "head_width": 32, "head_depth": 1, "buffer_size": 4,
         "text_vocab_size": None, "sampling_steps": 3, "dit_width": 16, "dit_depth": 1, "dit_heads": 2,
         "dit_sampling_steps": 3, "num_iter": 3, "pivot_iter": 5, "diffusion_batch_mul": 2}


def small(**kw):
    torch.manual_seed(0)
    return zoo.create("generator/himar-tiny", **{**SMALL, **kw})


def _perturb(model):
    """Random small weights everywhere (the zero-initialised outputs would hide dependencies)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_pivot_phase_masks_every_full_resolution_position():
    m = _perturb(small())
    B, P, _N, C = 2, 16, 64, 8
    lens = []
    m.backbone.encoder_blocks[0].register_forward_pre_hook(lambda mod, a: lens.append(a[0].shape[1]))
    piv = torch.randn(B, P, C)
    pmask = torch.zeros(B, P, dtype=torch.bool)
    pmask[:, :10] = True
    buf = m.buffer(Condition(torch.tensor([1, 2])), B)
    with torch.no_grad():
        z = m.phase1(piv, buf, pmask)
    # the encoder sees only the buffer and the 6 visible pivots: no full-resolution slot
    assert lens == [m.buffer_size + P - 10]
    # and the phase-1 features do not depend on full-resolution tokens in any way
    grid = torch.randn(B, 8, 8, C)
    other = torch.randn(B, 8, 8, C)
    torch.manual_seed(3)
    a = m.loss(Tokens(grid, m.spec), Condition(torch.tensor([1, 2])),
               pivots=Tokens(piv.reshape(B, 4, 4, C), m.pivot_spec))["loss_pivot"]
    torch.manual_seed(3)
    b = m.loss(Tokens(other, m.spec), Condition(torch.tensor([1, 2])),
               pivots=Tokens(piv.reshape(B, 4, 4, C), m.pivot_spec))["loss_pivot"]
    torch.testing.assert_close(a, b)
    assert z.shape == (B, P, 32)


def test_both_phases_run_the_same_transformer_weights():
    m = small()
    blocks = [mod for mod in m.modules() if isinstance(mod, ScaleAwareBlock)]
    trunks = [mod for mod in m.modules() if isinstance(mod, MaskedEncoderDecoder)]
    assert len(trunks) == 1 and len(blocks) == 2  # one encoder + one decoder block, no copies
    seen = {"task": [], "weights": []}
    def record(mod, args, out):
        seen["task"].append(args[3] if len(args) > 3 else None)
        seen["weights"].append(id(mod.encoder_blocks[0].attn.qkv.weight))

    hook = m.backbone.register_forward_hook(record)
    g = torch.Generator().manual_seed(0)
    m.loss(random_tokens(m.spec, 2, g), m.example_condition(2, g))
    hook.remove()
    assert seen["task"] == [0, 1]
    assert len(set(seen["weights"])) == 1
    # each phase's loss alone trains the same block parameters
    _perturb(m).train()
    qkv = m.backbone.encoder_blocks[0].attn.qkv.weight
    grads = []
    for w in ((1.0, 0.0), (0.0, 1.0)):
        m.loss_weights = w
        m.zero_grad()
        torch.manual_seed(0)
        m.loss(random_tokens(m.spec, 2, g), Condition(torch.tensor([0, 1])))["loss"].backward()
        grads.append(qkv.grad.clone())
    assert all(gr.abs().sum() > 0 for gr in grads) and not torch.allclose(grads[0], grads[1])
    # the task embedding tells the phases apart: same inputs, different task -> different z
    m.eval()
    x = torch.randn(1, m.seq_len, 32)
    buf = m.buffer(Condition(torch.tensor([0])), 1)
    mask = torch.zeros(1, m.seq_len, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(m.backbone(x, buf, mask, 0), m.backbone(x, buf, mask, 1))


def test_generate_counts_and_each_position_written_once(monkeypatch):
    m = small()
    calls = []
    m.backbone.register_forward_pre_hook(lambda mod, a: calls.append((a[0].shape[0], int(a[3]))))
    dit_calls = []
    orig = m.dit_head.sample

    def spy(z, zu, cfg, temperature, generator, steps):
        out = orig(z, zu, cfg, temperature, generator, steps)
        dit_calls.append(cfg)
        return torch.full_like(out, float(len(dit_calls)))

    monkeypatch.setattr(m.dit_head, "sample", spy)
    s = SamplingConfig(cfg=2.0, cfg_schedule="linear", extra={"pivot_cfg": 1.0})
    piv, toks = m.generate_with_pivots(Condition(torch.tensor([1, 2])), s, torch.Generator().manual_seed(0))
    # pivot phase: 5 single-batch forwards (pivot_cfg = 1); token phase: 3 doubled (CFG 2)
    assert calls == [(2, 0)] * 5 + [(4, 1)] * 3
    assert piv.spec == m.pivot_spec and toks.spec == m.spec
    tags = toks.data[..., 0].flatten(1)
    counts = masked_counts(64, 3)
    for k, (a, b) in enumerate(zip([64] + counts, counts)):
        assert int((tags == k + 1).sum()) == 2 * (a - b)
    assert dit_calls[-1] == pytest.approx(2.0) and dit_calls[0] < 2.0  # linear ramp ends at cfg


def test_seeded_generation_is_deterministic():
    m = _perturb(small())
    s = SamplingConfig(cfg=1.5)
    a = m.generate(Condition(torch.tensor([3, 4])), s, torch.Generator().manual_seed(0))
    b = m.generate(Condition(torch.tensor([3, 4])), s, torch.Generator().manual_seed(0))
    c = m.generate(Condition(torch.tensor([3, 4])), s, torch.Generator().manual_seed(1))
    assert a == b and a != c and bool(torch.isfinite(a.data).all())


def test_phase2_depends_on_pivot_features():
    m = _perturb(small())
    B = 1
    seq = torch.randn(B, 64, 8)
    tmask = torch.zeros(B, 64, dtype=torch.bool)
    tmask[:, 32:] = True
    buf = m.buffer(Condition(torch.tensor([0])), B)
    pin = torch.randn(B, 16, 32)
    with torch.no_grad():
        a = m.phase2(pin, seq, buf, tmask)
        b = m.phase2(pin + 1.0, seq, buf, tmask)
    assert a.shape == (B, 64, 32) and not torch.allclose(a, b)


def test_pivots_default_to_area_pooled_latents_or_come_from_the_pipeline():
    m = _perturb(small())
    grid = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8, 8)
    pooled = m.pool_pivots(grid)
    assert pooled.shape == (2, 4, 4, 8)
    torch.testing.assert_close(pooled[1, 2, 3], grid[1, 4:6, 6:8].mean((0, 1)))
    g = torch.Generator().manual_seed(0)
    toks = random_tokens(m.spec, 2, g)
    cond = m.example_condition(2, g)
    torch.manual_seed(1)
    a = m.loss(toks, cond)
    torch.manual_seed(1)
    b = m.loss(toks, cond, pivots=Tokens(m.pool_pivots(toks.data), m.pivot_spec))
    torch.testing.assert_close(a["loss"], b["loss"])
    torch.manual_seed(1)
    c = m.loss(toks, cond, pivots=random_tokens(m.pivot_spec, 2, g))
    assert not torch.allclose(a["loss_pivot"], c["loss_pivot"])
    with pytest.raises(ValueError, match="pivots"):
        m.loss(toks, cond, pivots=random_tokens(m.spec, 2, g))


def test_pivot_prob_replaces_features_with_placeholders(monkeypatch):
    m = _perturb(small(pivot_prob=0.0)).train()
    seen = []
    orig = m.phase2
    monkeypatch.setattr(m, "phase2", lambda pin, *a: (seen.append(pin), orig(pin, *a))[1])
    g = torch.Generator().manual_seed(0)
    m.loss(random_tokens(m.spec, 2, g), m.example_condition(2, g))
    torch.testing.assert_close(seen[0], m.pivot_placeholder.expand(2, -1, -1))
    m.pivot_prob = 1.0
    m.loss(random_tokens(m.spec, 2, g), m.example_condition(2, g))
    assert not torch.allclose(seen[1], m.pivot_placeholder.expand(2, -1, -1))


def test_incompatible_tokens_are_refused_naming_both_sides():
    with pytest.raises(IncompatibleTokens, match="HiMAR.*discrete"):
        small(spec=TokenSpec("discrete", "grid", (8, 8), vocab_size=16))
    with pytest.raises(IncompatibleTokens, match="layout"):
        small(spec=TokenSpec("continuous", "sequence", (64,), dim=8))
    with pytest.raises(IncompatibleTokens, match="pivots"):
        small(spec=TokenSpec("continuous", "grid", (5, 5), dim=8))


def test_paper_configs_match_himar_sizes():
    for name, want in (("generator/himar-b", 244e6), ("generator/himar-l", 529e6), ("generator/himar-h", 1090e6)):
        n = registry.info(name)["params"]
        assert abs(n / want - 1) < 0.015, (name, n)
    assert isinstance(registry.build_meta("generator/himar-b"), HiMAR)
