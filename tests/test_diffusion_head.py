"""DDPM diffusion heads (generators/diffusion_head.py): schedule maths, respacing, sampling."""
import math

import pytest
import torch

from generators.diffusion_head import (
    DiffusionHead,
    DiTDiffusionHead,
    GaussianDiffusion,
    cosine_betas,
    space_timesteps,
)


def test_cosine_schedule_matches_closed_form():
    T = 1000
    d = GaussianDiffusion.cosine(T)
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    want = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    capped = cosine_betas(T) >= 0.999 - 1e-12  # the cap only bites at the very end
    assert int(capped.sum()) <= 2
    ok = ~capped.cumsum(0).bool()
    torch.testing.assert_close(d.alphas_cumprod[ok], want[ok], rtol=1e-9, atol=1e-12)
    assert bool((d.betas > 0).all()) and bool((d.betas <= 0.999).all())


def test_q_sample_matches_iterated_forward_steps():
    """x_t from q_sample has the moments of t+1 single noising steps x_k = sqrt(1-b_k) x_{k-1} + sqrt(b_k) e."""
    d = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((40000, 1), 1.5, dtype=torch.float64)
    t = 30
    x = x0.clone()
    for k in range(t + 1):
        b = float(d.betas[k])
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = torch.full((x0.shape[0],), t)
    q = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert abs(float(x.mean()) - float(q.mean())) < 0.02
    assert abs(float(x.std()) - float(q.std())) < 0.02


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; sqrt(ab')x0, 1-ab') · N(x_t; sqrt(a_t)x_{t-1}, b_t)."""
    d = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 5, 100, 500, 998])
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    mean, var, logvar = d.q_posterior(x0, xt, t)
    ab_prev = d.alphas_cumprod[t - 1][:, None]
    b = d.betas[t][:, None]
    prec = 1 / (1 - ab_prev) + (1 - b) / b
    want_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - b).sqrt() * xt / b) / prec
    torch.testing.assert_close(mean, want_mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(var.expand_as(mean), (1 / prec).expand_as(mean), rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(logvar, var.log(), rtol=1e-7, atol=1e-9)


def test_respacing_honours_the_step_count():
    d = GaussianDiffusion.cosine(1000)
    for n in (1, 7, 100, 1000):
        r = d.respaced(n)
        keep = r.timestep_map
        assert r.num_steps == n and keep.numel() == n
        assert int(keep[-1]) == (999 if n > 1 else 0) and int(keep[0]) == 0
        assert bool((keep[1:] > keep[:-1]).all())
        torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[keep])  # same marginals
    assert space_timesteps(1000, 100)[:3] == [0, 10, 20]
    with pytest.raises(ValueError, match="sampling steps"):
        d.respaced(1001)


def _head(**kw):
    torch.manual_seed(0)
    return DiffusionHead(token_dim=4, cond_dim=6, width=32, depth=2, sampling_steps=12, **kw)


def test_sampler_calls_the_net_once_per_respaced_step_with_original_timesteps():
    head = _head()
    seen = []
    head.net.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    z = torch.randn(3, 6)
    head.sample(z, steps=9, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 9
    want = head.gen_diffusion(9).timestep_map.flip(0)
    assert [int(s[0]) for s in seen] == want.tolist() and int(seen[0][0]) == 999
    seen.clear()
    head.sample(z, z_uncond=torch.randn(3, 6), cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 12 and seen[0].shape[0] == 6  # both CFG branches in one call per step


def test_seeded_sampling_is_deterministic():
    head = _head()
    with torch.no_grad():  # a non-trivial network (the output layer starts at zero)
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(5, 6)
    a = head.sample(z, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, generator=torch.Generator().manual_seed(3))
    c = head.sample(z, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (5, 4) and torch.isfinite(a).all()


def test_cfg_one_equals_conditional_and_cfg_moves_samples():
    head = _head()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, zu = torch.randn(5, 6), torch.randn(5, 6)
    cond = head.sample(z, generator=torch.Generator().manual_seed(0))
    one = head.sample(z, zu, cfg=1.0, generator=torch.Generator().manual_seed(0))
    three = head.sample(z, zu, cfg=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, cond, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(three, cond, atol=1e-3)


def test_temperature_scales_only_the_step_noise(monkeypatch):
    """MAR's temperature multiplies the noise of each reverse step: with τ = 0 the result
    depends on the initial noise only; with τ = 1 it also depends on the step noise."""
    import generators.diffusion_head as dh

    head = _head()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(4, 6)
    x_T = torch.randn(4, 4)

    def run(temperature, later_seed):
        g = torch.Generator().manual_seed(later_seed)
        calls = []

        def fake_randn(shape, generator, device, dtype):
            calls.append(1)
            return x_T.clone() if len(calls) == 1 else torch.randn(shape, generator=g, dtype=dtype)

        monkeypatch.setattr(dh, "_randn", fake_randn)
        out = head.sample(z, temperature=temperature)
        assert len(calls) == head.sampling_steps  # initial draw + one per step but the last
        return out

    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    assert not torch.allclose(run(0.0, 1), run(1.0, 1))


def test_loss_has_mse_and_vb_and_respects_the_mask():
    head = _head()
    tgt, z = torch.randn(8, 4), torch.randn(8, 6)
    torch.manual_seed(0)
    out = head.loss(tgt, z, batch_mul=3)
    assert set(out) == {"mse", "vb", "loss"} and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    # rows with weight 0 do not change the loss
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0]).float()
    torch.manual_seed(1)
    a = head.loss(tgt, z, mask)["loss"]
    tgt2 = tgt.clone()
    tgt2[3:] += 100.0
    torch.manual_seed(1)
    b = head.loss(tgt2, z, mask)["loss"]
    torch.testing.assert_close(a, b)
    fixed = DiffusionHead(4, 6, 32, 1, learn_sigma=False)
    assert set(fixed.loss(tgt, z)) == {"mse", "loss"}


def test_mlp_head_overfits_a_toy_conditional_distribution(single_thread):
    """Two conditions -> two fixed targets: the loss falls and (with the x_0 clamp) the
    sampler returns each condition's target."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=2, width=64, depth=2, sampling_steps=20, clip_denoised=True)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    z = torch.eye(2).repeat(64, 1)
    tgt = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(64, 1)
    losses = []
    for _ in range(150):
        out = head.loss(tgt, z)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["mse"].detach()))
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.5 * start, (start, end)
    head.eval()
    s = head.sample(torch.eye(2).repeat(8, 1), generator=torch.Generator().manual_seed(0))
    assert float((s - tgt[:16]).abs().mean()) < 0.25


def test_clip_denoised_tracks_the_training_range_and_bounds_samples():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=3, cond_dim=2, width=16, depth=1, sampling_steps=5, clip_denoised=True)
    tgt = torch.tensor([[0.5, -2.0, 0.1], [-1.0, 1.0, 0.3]])
    head.loss(tgt, torch.randn(2, 2))
    torch.testing.assert_close(head.target_absmax, torch.tensor([1.0, 2.0, 0.3]))
    head.eval()
    head.loss(10 * tgt, torch.randn(2, 2))  # eval: the range is not updated
    torch.testing.assert_close(head.target_absmax, torch.tensor([1.0, 2.0, 0.3]))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    s = head.sample(torch.randn(64, 2), generator=torch.Generator().manual_seed(0))
    assert bool((s.abs() <= head.target_absmax + 1e-5).all())  # the last step returns the clamped x_0
    assert "target_absmax" in head.state_dict()  # saved with the checkpoint


def test_dit_head_shapes_steps_and_global_attention():
    torch.manual_seed(0)
    head = DiTDiffusionHead(token_dim=3, cond_dim=5, grid=(2, 3), width=16, depth=1, heads=2, sampling_steps=6)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    calls = []
    head.net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    z = torch.randn(2, 2, 3, 5)
    x = head.sample(z, torch.randn_like(z), cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 2, 3, 3) and len(calls) == 6 and calls[0] == (4, 6, 3)
    # the DiT couples positions: changing the condition of one token changes the others' output
    t = torch.full((2,), 500)
    xt = torch.randn(2, 6, 3)
    zz = torch.randn(2, 6, 5)
    a = head.net(xt, t, zz)
    zz2 = zz.clone()
    zz2[:, 0] += 1.0
    b = head.net(xt, t, zz2)
    assert not torch.allclose(a[:, 1:], b[:, 1:])
    out = head.loss(torch.randn(2, 2, 3, 3), z, batch_mul=2)
    assert set(out) == {"mse", "loss"} and torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="2, 3"):
        head.loss(torch.randn(2, 3, 2, 3), z)
