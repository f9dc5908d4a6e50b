"""xAR (next-X flow matching): entity layouts, block-causal trunk, Noisy Context Learning,
cached sampling, CFG ramp."""
import pytest
import torch

from generators import flow
from generators.base import Condition, SamplingConfig
from generators.xar import XAR, EntityLayout, default_scales
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec, random_tokens

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: threads only add overhead

SPEC = TokenSpec("continuous", "grid", (4, 4), dim=3)
TYPES = [("token", 1, None), ("cell", 2, None), ("subsample", 2, None), ("scale", 1, None), ("image", 1, None)]


def _model(entity="cell", size=2, scales=None, spec=SPEC, classes=True, text=False, std=0.2, seed=0, **kw):
    torch.manual_seed(seed)
    m = XAR(spec, entity=entity, entity_size=size, scales=scales, num_classes=5 if classes else None,
            text_vocab_size=12 if text else None, text_len=3, dim=32, depth=2, heads=2, ffn_multiple=16,
            text_depth=1, **kw)
    if std:  # adaLN-Zero and the zero output layer make the init trivial; random weights test the wiring
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return m.eval()


def _cond(B=3, classes=True, text=False):
    return Condition(torch.tensor([0, -1, 4, 2][:B]) if classes else None,
                     torch.tensor([[1, 2, 0], [0, 0, 0], [5, 11, 3], [7, 0, 0]][:B]) if text else None)


# ---- entity layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (4, 6)])
@pytest.mark.parametrize("entity,size,scales", TYPES)
def test_clusterify_round_trips(grid, entity, size, scales):
    lay = EntityLayout(grid, entity, size, scales)
    g = torch.randn(2, *grid, 3)
    seq = lay.clusterify(g)
    assert seq.shape == (2, lay.length, 3) and lay.length == sum(lay.sizes) == lay.offsets[-1]
    assert torch.equal(lay.unclusterify(seq), g)
    if entity != "scale":   # a permutation: also the other way round, and every token once
        s = torch.randn(2, lay.length, 3)
        assert torch.equal(lay.clusterify(lay.unclusterify(s)), s)
        assert sorted(lay.perm.tolist()) == list(range(grid[0] * grid[1]))
        assert lay.blocks(seq).shape == (2, lay.num_entities, lay.sizes[0], 3)
    assert lay.positions.shape == (lay.length, 2) and lay.entity_ids.shape == (lay.length,)


def test_entity_contents_follow_the_paper_definitions():
    g = torch.arange(4 * 6, dtype=torch.float32).reshape(1, 4, 6, 1)
    cell = EntityLayout((4, 6), "cell", 2)
    assert cell.num_entities == 6
    b = cell.blocks(cell.clusterify(g))[0, :, :, 0]
    assert b[0].tolist() == [0, 1, 6, 7] and b[1].tolist() == [2, 3, 8, 9]   # raster cells, row-major inside
    assert b[3].tolist() == [12, 13, 18, 19]
    sub = EntityLayout((4, 6), "subsample", 2)
    s = sub.blocks(sub.clusterify(g))[0, :, :, 0]
    assert s[1].tolist() == g[0, 0::2, 1::2, 0].flatten().tolist()         # phase (0, 1)
    assert s[2].tolist() == g[0, 1::2, 0::2, 0].flatten().tolist()         # phase (1, 0)
    tok = EntityLayout((4, 6), "token")
    assert tok.num_entities == 24 and tok.clusterify(g)[0, :, 0].tolist() == list(range(24))
    img = EntityLayout((4, 6), "image")
    assert img.num_entities == 1
    assert default_scales(8, 8) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert default_scales(4, 6) == [(1, 1), (2, 3), (4, 6)]
    sc = EntityLayout((4, 6), "scale")
    seq = sc.clusterify(g)
    assert sc.sizes == [1, 6, 24]
    assert seq[0, 0, 0] == g.mean()                                          # 1x1: the mean
    assert seq[0, 1, 0] == g[0, :2, :2].mean() and seq[0, 2, 0] == g[0, :2, 2:4].mean()  # 2x3 area
    with pytest.raises(ValueError, match="tile"):
        EntityLayout((4, 6), "cell", 4)
    with pytest.raises(ValueError, match="divide"):
        EntityLayout((4, 6), "scale", scales=[[3, 3], [4, 6]])
    with pytest.raises(ValueError, match="entities differ"):
        sc.blocks(seq)


def test_block_causal_mask():
    lay = EntityLayout((4, 4), "cell", 2)
    m = lay.mask(prefix_len=2)
    assert m.shape == (18, 18)
    assert bool(m[:2, :2].all()) and not bool(m[:2, 2:].any())              # prefix sees only itself
    assert bool(m[2:, :2].all())                                             # everyone sees the prefix
    e = lay.entity_ids
    assert torch.equal(m[2:, 2:], e[None, :] <= e[:, None])                   # bidirectional in an entity


# ---- the trunk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("entity,size,scales", TYPES)
def test_changing_entity_k_leaves_earlier_entities_unchanged(entity, size, scales):
    m = _model(entity, size, scales, text=True)
    lay = m.layout
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, lay.length, 3, generator=g)
    t = torch.rand(3, lay.num_entities, generator=g)
    cond = _cond(text=True)
    base = m.velocity(x, t, cond)
    assert base.shape == x.shape and base.std() > 0.05
    k = lay.num_entities // 2
    sl = lay.entity_slice(k)
    x2, t2 = x.clone(), t.clone()
    x2[:, sl] += 1.0
    t2[:, k] = 1 - t2[:, k]
    moved = m.velocity(x2, t2, cond)
    torch.testing.assert_close(moved[:, :sl.start], base[:, :sl.start], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(moved[:, sl], base[:, sl], atol=1e-3)
    if k + 1 < lay.num_entities:   # later entities see entity k
        assert not torch.allclose(moved[:, sl.stop:], base[:, sl.stop:], atol=1e-3)


def test_training_draws_an_independent_t_per_sample_and_entity():
    m = _model("cell", 2)
    m.train()
    toks = random_tokens(SPEC, 3, torch.Generator().manual_seed(0))
    seen = {}
    m.time_embed.register_forward_hook(lambda mod, args, out: seen.setdefault("t", []).append(args[0].detach()))
    m.embed.register_forward_hook(lambda mod, args, out: seen.setdefault("x", []).append(args[0].detach()))
    out = m.loss(toks, _cond())
    t = out["t"]
    assert t.shape == (3, 4) and bool(((t > 0) & (t < 1)).all())
    assert len(set(t.flatten().tolist())) == 12                              # all (sample, entity) differ
    t_tok = seen["t"][-1]                                                    # per-slot times fed to adaLN
    assert torch.equal(t_tok, t[:, m.layout.entity_ids])
    # Noisy Context Learning: every entity is fed noisy at its own t; no clean token is fed
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, 4, generator=g)
    noise = torch.randn(3, 16, 3, generator=g)
    m.loss(toks, _cond(), t=t, noise=noise)
    x = m.layout.clusterify(toks.data)
    want = flow.interpolate(x, noise, t[:, m.layout.entity_ids])
    torch.testing.assert_close(seen["x"][-1], want)
    # a second call draws fresh times
    assert not torch.equal(m.loss(toks, _cond())["t"], out["t"])


@pytest.mark.parametrize("entity,size,text", [("cell", 2, True), ("scale", 1, False), ("subsample", 2, False)])
def test_cached_sampling_path_equals_full_forward(entity, size, text):
    m = _model(entity, size, text=text)
    lay = m.layout
    g = torch.Generator().manual_seed(2)
    toks = random_tokens(SPEC, 3, g)
    clean = lay.clusterify(toks.data)
    noisy = torch.randn(3, lay.length, 3, generator=g)
    t = torch.rand(3, lay.num_entities, generator=g)
    cond = _cond(text=text)
    cached = m.cached_velocity(toks, noisy, t, cond)
    for k in range(lay.num_entities):
        sl = lay.entity_slice(k)
        x = torch.randn(3, lay.length, 3, generator=g)            # entities > k: anything
        x[:, :sl.start], x[:, sl] = clean[:, :sl.start], noisy[:, sl]
        tt = torch.rand(3, lay.num_entities, generator=g)
        tt[:, :k], tt[:, k] = 0.0, t[:, k]                         # clean context at t = 0
        full = m.velocity(x, tt, cond)
        torch.testing.assert_close(cached[:, sl], full[:, sl], atol=1e-4, rtol=1e-4)
    assert m.transformer.cache_len is None                         # the cache is released


def test_cfg_ramps_linearly_per_entity_and_generate_uses_it(monkeypatch):
    m = _model("cell", 2)
    s = m.cfg_scales(SamplingConfig(cfg=3.0, cfg_schedule="linear"))
    assert len(s) == 4 and s[0] == 1.0 and s[-1] == 3.0
    torch.testing.assert_close(torch.tensor(s), torch.linspace(1, 3, 4))
    assert m.cfg_scales(SamplingConfig(cfg=2.0)) == [2.0] * 4
    used = []
    real = flow.sample

    def spy(vel, noise, **kw):
        used.append(kw["cfg"])
        return real(vel, noise, **kw)

    monkeypatch.setattr(flow, "sample", spy)
    sampling = SamplingConfig(cfg=3.0, cfg_schedule="linear", extra={"num_steps": 2})
    out = m.generate(_cond(), sampling, generator=torch.Generator().manual_seed(0))
    assert used == s and out.spec == SPEC


def test_generate_is_seeded_counts_nfe_and_temperature_zero_is_deterministic():
    from eval.bench import count_forward_steps

    m = _model("scale", 1, text=True)
    cond = _cond(text=True)
    sampling = SamplingConfig(cfg=2.0, cfg_schedule="linear", extra={"num_steps": 3, "sampler": "euler"})
    a = m.generate(cond, sampling, generator=torch.Generator().manual_seed(0))
    b = m.generate(cond, sampling, generator=torch.Generator().manual_seed(0))
    c = m.generate(cond, sampling, generator=torch.Generator().manual_seed(1))
    assert isinstance(a, Tokens) and a.data.shape == (3, 4, 4, 3) and a == b and a != c
    assert m.nfe(sampling) == 3 * 3
    n, _ = count_forward_steps(m, cond, sampling)
    assert n == m.nfe(sampling)
    cold = SamplingConfig(temperature=0.0, extra={"num_steps": 2})      # Euler-Maruyama, no noise at all
    d = m.generate(cond, cold, generator=torch.Generator().manual_seed(0))
    e = m.generate(cond, cold, generator=torch.Generator().manual_seed(5))
    assert d == e
    with pytest.raises(ValueError, match="extra"):
        m.generate(cond, SamplingConfig(extra={"steps": 3}))


def test_unconditional_model_samples():
    m = _model("token", 1, classes=False)
    out = m.generate(Condition(batch=2), SamplingConfig(cfg=3.0, extra={"num_steps": 1}),
                     generator=torch.Generator().manual_seed(0))
    assert out.data.shape == (2, 4, 4, 3) and torch.isfinite(out.data).all()


def test_refuses_discrete_binary_and_non_grid_tokens():
    for spec in (TokenSpec("discrete", "grid", (4, 4), vocab_size=16), TokenSpec("binary", "grid", (4, 4), bits=8),
                 TokenSpec("continuous", "sequence", (16,), dim=3)):
        with pytest.raises(IncompatibleTokens, match="XAR.*" + spec.kind):
            XAR(spec, dim=32, depth=1, heads=2)


def test_loss_decreases_on_a_toy_overfit():
    torch.manual_seed(0)
    m = XAR(SPEC, entity="cell", entity_size=2, num_classes=4, dim=32, depth=2, heads=2, ffn_multiple=16,
            class_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    toks = Tokens(2 * torch.randn(4, 4, 4, 3, generator=g), SPEC)
    cond = Condition(torch.arange(4))
    t_eval, n_eval = torch.rand(4, 4, generator=g), torch.randn(4, 16, 3, generator=g)

    def eval_loss():
        m.eval()
        with torch.no_grad():
            return float(m.loss(toks, cond, t=t_eval, noise=n_eval)["loss"])

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(40):
        loss = m.loss(toks, cond)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)   # ~4.8 -> ~2.6
