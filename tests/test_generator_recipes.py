"""Training / sampling recipe options of the continuous generators (issue 16): xAR's context
time and clean-context training, MAR's weight-decay groups."""
import pytest
import torch

import zoo
from generators.base import Condition, SamplingConfig
from train.loop import param_groups
from zoo.tokens import Tokens


def _xar(**kw):
    torch.manual_seed(0)
    m = zoo.create("generator/xar-tiny", dim=32, depth=2, heads=2, num_steps=2, **kw)
    with torch.no_grad():  # output and adaLN layers start at zero: make them non-trivial
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return m.eval()


def _cond(B=2):
    return Condition(labels=torch.arange(B))


def test_xar_context_time_reaches_the_context_only():
    m = _xar()
    g = lambda tc: m.generate(_cond(), SamplingConfig(cfg=1.0, extra={"context_t": tc}),  # noqa: E731
                              generator=torch.Generator().manual_seed(3)).data
    a, b = g(0.0), g(0.05)
    k0 = m.layout.entity_slice(0)
    # the first entity sees only the prefix (always at t = 0): identical; later entities differ
    seq_a, seq_b = m.layout.clusterify(a), m.layout.clusterify(b)
    torch.testing.assert_close(seq_a[:, k0], seq_b[:, k0])
    assert not torch.allclose(seq_a[:, k0.stop:], seq_b[:, k0.stop:])
    # the constructor default is what an empty SamplingConfig uses
    m2 = _xar(context_t=0.05)
    torch.testing.assert_close(m2.generate(_cond(), SamplingConfig(cfg=1.0), generator=torch.Generator().manual_seed(3)).data, b)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_xar_context_time_validated(bad):
    m = _xar()
    with pytest.raises(ValueError, match="context_t"):
        m.generate(_cond(), SamplingConfig(extra={"context_t": bad}))


def test_xar_tiny_default_context_time_is_not_reference():
    # the tiny config uses the swept default; the paper configs keep the reference's t = 0
    assert zoo.registry.build_meta("generator/xar-tiny").context_t > 0
    assert zoo.registry.build_meta("generator/xar-b").context_t == 0
    assert zoo.create("generator/xar-tiny", pretrained="shapes").context_t == 0.05  # the shipped weights too


def test_xar_clean_context_entities_leave_the_loss():
    m = _xar(clean_context_prob=0.5).train()
    x = Tokens(torch.randn(4, 8, 8, 8), m.spec)
    noise = torch.randn(4, 64, 8)
    torch.manual_seed(1)
    out = m.loss(x, _cond(4), t=torch.full((4, m.num_entities), 0.4), noise=noise)
    t = out["t"]
    clean = t == 0
    assert clean.any() and (~clean).any()  # some entities fed clean (t = 0), the rest noisy
    grid = m.layout.clusterify(x.data)
    ids = m.layout.entity_ids
    x_t = grid + t[:, ids, None] * (noise - grid)
    err = (m.velocity(x_t, t, _cond(4)) - (noise - grid)).pow(2)  # dropout is 0: train == eval
    keep = (~clean)[:, ids, None].expand_as(err)
    torch.testing.assert_close(out["loss"], err[keep].mean())
    assert not torch.allclose(out["loss"], err.mean())


def test_xar_clean_context_off_is_reference_loss():
    m = _xar().train()
    x = Tokens(torch.randn(2, 8, 8, 8), m.spec)
    t = torch.full((2, m.num_entities), 0.3)
    noise = torch.randn(2, 64, 8)
    got = m.loss(x, _cond(), t=t, noise=noise)["loss"]
    grid = m.layout.clusterify(x.data)
    want = (m.velocity((1 - 0.3) * grid + 0.3 * noise, t, _cond()) - (noise - grid)).pow(2).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["generator/mar-tiny", "generator/himar-tiny"])
def test_mar_diffusion_heads_have_no_weight_decay(name):
    m = zoo.create(name)
    skip = set(m.no_weight_decay())
    head_params = {n for n, _ in m.named_parameters() if n.startswith(("head.", "dit_head."))}
    assert skip == head_params and skip
    groups = param_groups(m, 0.05)
    no_decay_ids = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay_ids for n, p in m.named_parameters() if n in skip)
    decayed = [n for n, p in m.named_parameters() if id(p) not in no_decay_ids]
    assert decayed and not any(n.startswith("head.") for n in decayed)


# ---- latent_norm: per-channel standardisation inside the continuous generators -------------------

def test_latent_norm_round_trip_and_identity():
    from generators.latent_norm import LatentNorm

    x = torch.randn(500, 8) * torch.linspace(0.1, 1.6, 8) + torch.arange(8.0)
    ln = LatentNorm(8, "channel")
    ln.fit(x)
    z = ln.normalize(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(ln.denormalize(z), x, atol=1e-5, rtol=1e-5)
    none = LatentNorm(8, "none")
    none.fit(x)
    assert none.normalize(x) is x and not list(none.buffers())
    with pytest.raises(ValueError, match="latent_norm"):
        LatentNorm(8, "global")


@pytest.mark.parametrize("name", ["generator/xar-tiny", "generator/mar-tiny", "generator/himar-tiny"])
def test_generators_train_and_sample_in_normalised_space(name):
    # the same weights with fitted statistics: loss on x == loss of the identity model on
    # (x - mean) / std, and samples == mean + std * the identity model's samples
    kw = {"dim": 32, "depth": 1, "heads": 2}
    if name != "generator/xar-tiny":
        kw |= {"head_width": 16, "head_depth": 1, "sampling_steps": 2}
    if name == "generator/himar-tiny":
        kw |= {"dit_width": 16, "dit_depth": 1, "dit_heads": 2, "dit_sampling_steps": 2, "pivot_iter": 2}
    torch.manual_seed(0)
    fitted = zoo.create(name, **kw)
    assert fitted.latent_norm.mode == "channel"
    ident = zoo.create(name, **kw)
    ident.load_state_dict(fitted.state_dict())
    scale, shift = torch.linspace(0.2, 2.0, 8), torch.linspace(-1, 1, 8)
    fitted.fit_latent_stats(torch.randn(256, 8) * scale + shift)
    mean, std = fitted.latent_norm.mean, fitted.latent_norm.std
    x = torch.randn(2, 8, 8, 8)
    cond = _cond(2)
    fitted.eval(), ident.eval()
    torch.manual_seed(5)
    a = fitted.loss(Tokens(x, fitted.spec), cond)["loss"]
    torch.manual_seed(5)
    b = ident.loss(Tokens((x - mean) / std, ident.spec), cond)["loss"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    s = SamplingConfig(cfg=1.0)
    ga = fitted.generate(cond, s, generator=torch.Generator().manual_seed(1)).data
    gb = ident.generate(cond, s, generator=torch.Generator().manual_seed(1)).data
    torch.testing.assert_close(ga, gb * std + mean, atol=1e-4, rtol=1e-4)
