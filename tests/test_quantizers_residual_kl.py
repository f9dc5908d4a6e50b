"""ResidualVQ (SoundStream §3.3), MultiScaleVQ (VAR §3.2 / TokenFlow) and KLBottleneck (LDM / MAR)."""
import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.quantizers.kl import DiagonalGaussian, KLBottleneck
from tokenizers_vis.quantizers.multiscale import VAR_SCALES, MultiScaleVQ, phi_index
from tokenizers_vis.quantizers.rvq import ResidualVQ
from tokenizers_vis.quantizers.vq import VectorQuantizer
from zoo.tokens import Tokens


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- RVQ ---------------------------------------------------------------------------------
def test_rvq_sum_of_levels_and_lookup():
    torch.manual_seed(0)
    rvq = ResidualVQ(3, 32, 4).eval()
    with torch.no_grad():  # codes at the data's scale so every level does real work
        for q in rvq.quantizers:
            q.embedding.weight.normal_()
    z = torch.randn(2, 4, 3, 5, generator=_g())
    z_q, idx, losses = rvq(z)
    assert idx.shape == (2, 3, 5, 3) and idx.dtype == torch.int64 and int(idx.min()) >= 0
    manual = sum(rvq.level(d).lookup(idx[..., d]) for d in range(3))
    torch.testing.assert_close(z_q, manual, atol=1e-5, rtol=0)
    torch.testing.assert_close(rvq.lookup(idx), z_q, atol=1e-5, rtol=0)
    # each level's code is the nearest to the residual left by the earlier levels
    r = z.clone()
    for d in range(3):
        d2 = ((r.movedim(1, -1).unsqueeze(-2) - rvq.level(d).codebook()) ** 2).sum(-1)
        assert torch.equal(d2.argmin(-1), idx[..., d])
        r = r - rvq.level(d).lookup(idx[..., d])
    assert set(losses) >= {"loss", "commit", "codebook"}


def test_rvq_residual_norm_never_increases():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 16, 3).eval()
    z = torch.randn(4, 3, 4, 4, generator=_g(1))
    with torch.no_grad():  # a few k-means steps per level on its own residual
        r = z.movedim(1, -1).reshape(-1, 3)
        for d in range(4):
            C = rvq.level(d).embedding.weight
            C.copy_(r[torch.randperm(r.shape[0], generator=_g(d))[:16]])
            for _ in range(5):
                a = torch.cdist(r, C).argmin(1)
                for k in range(16):
                    if (a == k).any():
                        C[k] = r[a == k].mean(0)
            r = r - C[torch.cdist(r, C).argmin(1)]
        _, idx, _ = rvq(z)
    norms, res = [z.norm()], z
    for d in range(4):
        res = res - rvq.level(d).lookup(idx[..., d])
        norms.append(res.norm())
    assert all(b <= a + 1e-5 for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.8 * norms[0]


def test_rvq_shared_codebook_has_one_table():
    rvq = ResidualVQ(4, 8, 2, shared_codebook=True)
    assert sum(p.numel() for p in rvq.parameters()) == 8 * 2
    assert rvq.level(0) is rvq.level(3)


def test_rvq_quantizer_dropout_uses_between_1_and_D_levels():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 8, 2, quantizer_dropout=1.0).train()
    z = torch.randn(2, 2, 2, 2, generator=_g())
    seen = set()
    for _ in range(60):
        z_q, idx, losses = rvq(z)
        used = int(losses["levels"])
        seen.add(used)
        assert 1 <= used <= 4
        assert bool((idx[..., :used] >= 0).all()) and bool((idx[..., used:] == -1).all())
        torch.testing.assert_close(rvq.lookup(idx), z_q, atol=1e-5, rtol=0)
    assert seen == {1, 2, 3, 4}
    rvq.eval()
    assert int(rvq(z)[2]["levels"]) == 4


def test_rvq_gradient_is_identity_to_input():
    rvq = ResidualVQ(3, 8, 2)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    z_q, _, _ = rvq(z)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


# ---- multi-scale -------------------------------------------------------------------------
def _msvq(**kw):
    torch.manual_seed(0)
    m = MultiScaleVQ(kw.pop("K", 64), kw.pop("dim", 4), **kw)
    with torch.no_grad():
        m.vq.embedding.weight.normal_()
    return m


def test_multiscale_var_token_count_and_spec():
    m = _msvq(dim=4).eval()
    f = torch.randn(2, 4, 16, 16, generator=_g())
    f_hat, idx, losses = m(f)
    assert f_hat.shape == f.shape
    assert [tuple(t.shape) for t in idx] == [(2, p, p) for p in VAR_SCALES]
    assert sum(t[0].numel() for t in idx) == 680
    spec = m.token_spec()
    assert spec.num_tokens == 680 and spec.vocab_size == 64
    Tokens(idx, spec)  # validates shapes and id range
    assert set(losses) >= {"loss", "commit", "codebook", "usage"}


@pytest.mark.parametrize("phi", ["shared4", "none"])
def test_multiscale_decode_reproduces_forward(phi):
    m = _msvq(scales=(1, 2, 4, 6), phi=phi).eval()
    f = torch.randn(2, 4, 6, 6, generator=_g(2))
    with torch.no_grad():
        f_hat, idx, _ = m(f)
        torch.testing.assert_close(m.indices_to_fhat(idx), f_hat, atol=1e-5, rtol=0)
        # the generator input at scale k is the running f_hat of scales < k, downsampled
        partial = m.scale_contribution(0, idx[0]) + m.scale_contribution(1, idx[1])
        torch.testing.assert_close(m.fhat_upto(idx, 2), F.interpolate(partial, size=(4, 4), mode="area"))
        ins = m.generator_inputs(idx)
        assert [tuple(t.shape[2:]) for t in ins] == [(2, 2), (4, 4), (6, 6)]
        for k in range(1, 4):
            torch.testing.assert_close(ins[k - 1], m.fhat_upto(idx, k))


def test_multiscale_residual_shrinks_with_scales():
    m = _msvq(K=256, scales=(1, 2, 4), phi="none").eval()
    f = torch.randn(2, 4, 4, 4, generator=_g(3))
    with torch.no_grad():
        _, idx, _ = m(f)
        err = [(f - m.indices_to_fhat(idx[:k] + [torch.full_like(t, -1) for t in idx[k:]])).norm()
               for k in range(4)]
    assert err[-1] < err[0]


def test_multiscale_single_scale_equals_plain_vq():
    m = _msvq(scales=(4,), phi="none").eval()
    vq = VectorQuantizer(64, 4, l2_norm=False).eval()
    vq.load_state_dict(m.vq.state_dict())
    f = torch.randn(2, 4, 4, 4, generator=_g(4))
    f_hat, idx, losses = m(f)
    z_q, idx_vq, l_vq = vq(f)
    assert torch.equal(idx[0], idx_vq)
    torch.testing.assert_close(f_hat, z_q)
    torch.testing.assert_close(losses["loss"], l_vq["loss"])


def test_multiscale_scale_drop_never_drops_first():
    m = _msvq(scales=(1, 2, 3, 4), phi="none", scale_drop=1.0).train()
    f = torch.randn(1, 4, 4, 4, generator=_g(5))
    dropped = set()
    with torch.no_grad():
        for _ in range(80):
            f_hat, idx, _ = m(f)
            d = m.last_dropped
            assert d is not None and d != 0
            dropped.add(d)
            assert bool((idx[0] >= 0).all())  # first scale always present
            assert bool((idx[d] == -1).all())  # placeholder for exactly the dropped scale
            assert sum(bool((t == -1).all()) for t in idx) == 1
            torch.testing.assert_close(m.indices_to_fhat(idx), f_hat, atol=1e-5, rtol=0)
    assert dropped == {1, 2, 3}
    m.eval()
    m(f)
    assert m.last_dropped is None


def test_phi_index_rule():
    # VAR's PhiPartiallyShared: ticks np.linspace(1/12, 11/12, 4), nearest to k/9; k = 2 and 7 are
    # exact ties in real arithmetic, resolved by float64 rounding as in VAR (checked against numpy)
    assert [phi_index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 4) for k in range(4)] == [0, 1, 2, 3]
    assert phi_index(0, 1) == 0


def test_multiscale_gradients_reach_input_and_codebook():
    m = _msvq(scales=(1, 2, 4)).train()
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    f_hat, _, losses = m(f)
    (f_hat.sum() + losses["loss"]).backward()
    assert f.grad is not None and bool((f.grad != 0).all())
    assert m.vq.embedding.weight.grad.abs().sum() > 0
    assert any(p.conv.weight.grad is not None and p.conv.weight.grad.abs().sum() > 0 for p in m.phis)


def test_multiscale_builds_on_meta_and_rejects_bad_input():
    with torch.device("meta"):
        m = MultiScaleVQ(4096, 32)
    assert m.vq.embedding.weight.is_meta
    with pytest.raises(ValueError, match="16, 16"):
        _msvq()(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="phi"):
        MultiScaleVQ(8, 4, phi="bad")


# ---- KL ------------------------------------------------------------------------------------
def test_kl_closed_form_on_fixed_moments():
    mean = torch.tensor([[[[0.5]], [[-1.0]]], [[[0.0]], [[2.0]]]])  # (2, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[-1.0]]], [[[1.0]], [[0.5]]]])
    post = DiagonalGaussian(mean, logvar)
    # by hand: 0.5 * (mu^2 + e^lv - 1 - lv), summed per sample
    s0 = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1.0 + torch.exp(torch.tensor(-1.0)) - 1 + 1)
    s1 = 0.5 * (0 + torch.exp(torch.tensor(1.0)) - 1 - 1) + 0.5 * (4 + torch.exp(torch.tensor(0.5)) - 1 - 0.5)
    torch.testing.assert_close(post.kl(), torch.stack([torch.as_tensor(s0), s1]))
    assert float(DiagonalGaussian(torch.zeros(1, 3), torch.zeros(1, 3)).kl()) == 0.0
    # clamp
    assert float(DiagonalGaussian(torch.zeros(1), torch.tensor([100.0])).logvar) == 20.0


def test_kl_bottleneck_forward_losses_and_scale():
    torch.manual_seed(0)
    kl = KLBottleneck(8, 3, kl_weight=1e-3, scale_factor=0.5).eval()
    h = torch.randn(2, 8, 4, 4, generator=_g())
    lat, losses = kl(h)
    post = kl.posterior(h)
    torch.testing.assert_close(lat, post.mean * 0.5)
    torch.testing.assert_close(losses["kl"], post.kl().sum() / 2)
    torch.testing.assert_close(losses["loss"], 1e-3 * losses["kl"])
    torch.testing.assert_close(kl.unscale(lat), post.mean)
    lat2, _ = kl(h)
    assert torch.equal(lat, lat2)  # mode is deterministic


def test_kl_sample_reproducible_and_differentiable():
    kl = KLBottleneck(4, 2).train()
    h = torch.randn(2, 4, 3, 3, generator=_g(), requires_grad=True)
    a, _ = kl(h, generator=_g(7))
    b, _ = kl(h, generator=_g(7))
    c, _ = kl(h, generator=_g(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, kl(h, sample=False)[0])
    a.sum().backward()
    assert h.grad is not None and kl.quant_conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="4"):
        kl(torch.randn(1, 5, 2, 2))
