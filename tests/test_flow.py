"""Flow-matching utilities (generators/flow.py): path, times, grids, CFG, ODE/SDE samplers."""
import math

import pytest
import torch

from generators import flow

pytestmark = pytest.mark.usefixtures("single_thread")


def _gauss(mu, sigma):
    """Closed-form velocity and score of the linear path for data ~ N(mu, sigma^2) (per coordinate).

    x_t = (1-t) x0 + t eps has mean m_t = (1-t) mu and variance s_t^2 = (1-t)^2 sigma^2 + t^2;
    v = E[eps - x0 | x_t] = (t - (1-t) sigma^2) / s_t^2 * (x - m_t) - mu; score = -(x - m_t) / s_t^2.
    """
    def stats(t):
        return (1 - t) * mu, (1 - t) ** 2 * sigma ** 2 + t ** 2

    def velocity(x, t, i):
        m, var = stats(t)
        return (t - (1 - t) * sigma ** 2) / var * (x - m) - mu

    def score(x, t):
        m, var = stats(t)
        return -(x - m) / var

    return velocity, score


def test_path_endpoints_and_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(flow.interpolate(x, eps, 0.0), x)
    torch.testing.assert_close(flow.interpolate(x, eps, 1.0), eps)
    t = torch.tensor([0.2, 0.5, 0.9])
    h = 1e-3
    fd = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow.velocity_target(x, eps), atol=1e-3, rtol=1e-3)
    # per-row t broadcasts from the left; data and noise estimates invert the path
    xt = flow.interpolate(x, eps, t)
    torch.testing.assert_close(xt[1], 0.5 * x[1] + 0.5 * eps[1])
    v = flow.velocity_target(x, eps)
    torch.testing.assert_close(flow.predict_x0(xt, v, t), x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flow.predict_noise(xt, v, t), eps, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        flow.interpolate(x, eps[:, :2], 0.5)


def test_score_from_velocity_matches_the_gaussian_score():
    vel, score = _gauss(0.7, 0.5)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for t in (0.1, 0.5, 0.95):
        torch.testing.assert_close(flow.score_from_velocity(vel(x, t, 0), x, t), score(x, t))


def test_logit_normal_times_are_in_the_open_interval_with_the_right_median():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_logit_normal((20000,), mean=0.8, std=1.5, generator=g)
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    assert abs(float(t.median()) - 1 / (1 + math.exp(-0.8))) < 0.02
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.std()) - 1.5) < 0.05
    t2 = flow.sample_logit_normal((4, 3), generator=torch.Generator().manual_seed(1))
    assert t2.shape == (4, 3) and len(set(t2.flatten().tolist())) == 12   # independent draws
    assert abs(float(flow.sample_logit_normal(20000, generator=g).median()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="std"):
        flow.sample_logit_normal(3, std=-1.0)


def test_time_grids():
    ts = flow.time_grid(5)
    assert ts.shape == (6,) and ts[0] == 1 and ts[-1] == 0
    torch.testing.assert_close(ts, torch.linspace(1, 0, 6, dtype=torch.float64))
    em = flow.time_grid(5, t_stop=0.04)            # xAR/SiT: 5 points 1 -> 0.04, then 0
    assert em.shape == (6,) and abs(float(em[-2]) - 0.04) < 1e-12 and em[-1] == 0
    sh = flow.time_grid(8, shift=3.0)
    assert sh[0] == 1 and sh[-1] == 0 and bool((sh[:-1] > sh[1:]).all())
    assert bool((sh[1:-1] > torch.linspace(1, 0, 9, dtype=torch.float64)[1:-1]).all())
    assert flow.time_grid(1, t_stop=0.04).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        flow.time_grid(0)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (3, 1.0), (7, 2.5)])
def test_euler_is_exact_for_a_point_mass(steps, shift):
    # v(x, t) = (x - x0) / t is the exact velocity field of data = x0: straight paths, so Euler is exact
    x0 = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = flow.euler_sample(lambda x, t, i: (x - x0) / t, x1, flow.time_grid(steps, shift=shift))
    torch.testing.assert_close(out, x0.expand(4, 3), atol=1e-5, rtol=0)   # flow_step is float32


def test_euler_matches_the_closed_form_gaussian_flow_map():
    mu, sigma = 1.5, 0.4
    vel, _ = _gauss(mu, sigma)
    x1 = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + sigma * x1                                   # the ODE's flow map 1 -> 0
    errs = [float((flow.euler_sample(vel, x1, flow.time_grid(n)) - exact).abs().max()) for n in (10, 40, 160)]
    assert errs[2] < 0.02
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 3      # first order: error ~ 1/n


def test_euler_maruyama_samples_the_gaussian():
    mu, sigma = -0.5, 0.3
    vel, _ = _gauss(mu, sigma)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(40000, generator=g, dtype=torch.float64)
    calls = []

    def v(x, t, i):
        calls.append(i)
        return vel(x, t, i)

    out = flow.euler_maruyama_sample(v, x1, flow.time_grid(100, t_stop=0.04), generator=g)
    assert calls == list(range(100))
    assert abs(float(out.mean()) - mu) < 0.01 and abs(float(out.std()) - sigma) < 0.01
    # without injected noise the SDE drift alone is not the ODE: the spread collapses
    quiet = flow.euler_maruyama_sample(vel, x1, flow.time_grid(100, t_stop=0.04), noise_scale=0.0)
    assert float(quiet.std()) < 0.5 * sigma


def test_cfg_on_the_velocity_and_samplers_take_cond_uncond_pairs():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 3.0), u + 3.0 * (c - u))
    torch.testing.assert_close(flow.cfg_velocity(c, u, 1.0), c)
    a, b = torch.randn(3, generator=g), torch.randn(3, generator=g)

    def pair(x, t, i):
        return x * a + t, x * b - t

    def guided(x, t, i):
        return flow.cfg_velocity(*pair(x, t, i), 2.5)

    x1 = torch.randn(5, 3, generator=g)
    for sampler in ("euler", "euler_maruyama"):
        p = flow.sample(pair, x1, num_steps=6, sampler=sampler, cfg=2.5, generator=torch.Generator().manual_seed(1))
        q = flow.sample(guided, x1, num_steps=6, sampler=sampler, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(p, q)


def test_sample_counts_calls_and_temperature_scales_the_noise():
    calls = []

    def v(x, t, i):
        calls.append((i, t))
        return -x

    x1 = torch.ones(2, 3)
    flow.sample(v, x1, num_steps=4, sampler="euler")
    assert [i for i, _ in calls] == [0, 1, 2, 3] and calls[0][1] == 1.0
    # temperature 0: start at 0 and no SDE noise -> deterministic whatever the seed
    outs = [flow.sample(lambda x, t, i: x - 1.0, torch.randn(2, 3, generator=torch.Generator().manual_seed(s)),
                        num_steps=5, sampler="euler_maruyama", temperature=0.0,
                        generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    torch.testing.assert_close(outs[0], outs[1])
    # the point-mass field ends on x0 whatever the temperature (the start point is scaled)
    x0 = torch.tensor([0.5, -0.5, 2.0])
    for temp in (0.5, 1.0):
        out = flow.sample(lambda x, t, i: (x - x0) / t, torch.randn(2, 3), num_steps=3, temperature=temp)
        torch.testing.assert_close(out, x0.expand(2, 3))
    with pytest.raises(ValueError, match="sampler"):
        flow.sample(v, x1, num_steps=2, sampler="heun")


def test_timestep_embedding_shapes_and_sensitivity():
    emb = flow.TimestepEmbedding(16)
    t = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.25, 0.0]])
    e = emb(t)
    assert e.shape == (2, 3, 16)
    torch.testing.assert_close(e[0, 1], e[0, 2])
    torch.testing.assert_close(e[0, 0], e[1, 2])
    assert not torch.allclose(e[0, 1], e[1, 1])


def test_apg_matches_cfg_at_eta_one_and_removes_parallel_part():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(flow.apg(c, u, 3.0, eta=1.0), flow.cfg_velocity(c, u, 3.0))
    out = flow.apg(c, u, 3.0, eta=0.0)
    upd = (out - c).flatten(1)
    # the update (scale - 1) * d_perp is orthogonal to the conditional prediction, per sample
    torch.testing.assert_close((upd * c.flatten(1)).sum(1), torch.zeros(3), atol=1e-4, rtol=0)
    clipped = flow.apg(c, u, 3.0, eta=1.0, norm_threshold=0.1)
    assert torch.all((clipped - c).flatten(1).norm(dim=1) <= 2.0 * 0.1 + 1e-5)
    with pytest.raises(ValueError):
        flow.apg(c, u, 2.0, eta=2.0)
    # images (B, C, H, W): per-sample norms over three dims
    c4, u4 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out4 = flow.apg(c4, u4, 2.0, eta=0.0, norm_threshold=1.0)
    assert torch.all((out4 - c4).flatten(1).norm(dim=1) <= 1.0 + 1e-5)
