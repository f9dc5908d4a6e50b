"""VectorQuantizer training options: EMA codebook (VQ-VAE App. A.1), taming legacy loss form,
k-means init, dead-code restart (Jukebox §3.1), rolling usage metrics, and the entropy loss."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.quantizers import ResidualVQ, VectorQuantizer, entropy_loss, kmeans


def _grid(v: torch.Tensor) -> torch.Tensor:
    """(N, C) vectors -> (1, C, 1, N) channels-first features."""
    return v.t().reshape(1, v.shape[1], 1, v.shape[0]).contiguous()


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _set_codes(q: VectorQuantizer, codes) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.as_tensor(codes, dtype=torch.float32))
        if q.ema:
            q.embed_sum.copy_(q.embedding.weight)


def _blobs(n_blobs=8, per=8, dim=2, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, dim, generator=g) * 5
    x = centres.repeat_interleave(per, 0) + spread * torch.randn(n_blobs * per, dim, generator=g)
    return x, centres


# ---- EMA codebook ---------------------------------------------------------------------------
CODES = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]]
BATCH = [[0.5, 0.0], [0.0, 1.0], [-1.0, 0.5], [9.0, 1.0], [11.0, -2.0], [1.0, 8.0]]
ASSIGN = [0, 0, 0, 1, 1, 2]  # nearest codes of BATCH; code 3 is never picked


def _ema_closed_form(decay, eps, codes, batch, assign, K):
    """VQ-VAE App. A.1 by hand, starting from cluster size 1 and embed_sum = code per entry."""
    out, sizes = [], []
    for k in range(K):
        mine = [b for b, a in zip(batch, assign) if a == k]
        n_k = len(mine)
        s_k = [sum(v[c] for v in mine) for c in range(2)]
        sizes.append(decay * 1.0 + (1 - decay) * n_k)
        out.append([decay * codes[k][c] + (1 - decay) * s_k[c] for c in range(2)])
    total = sum(sizes)
    smoothed = [(n + eps) / (total + K * eps) * total for n in sizes]
    return torch.tensor([[m / s for m in row] for row, s in zip(out, smoothed)])


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_one_update_equals_the_closed_form(decay):
    eps = 1e-2  # large enough that the smoothing visibly matters
    q = VectorQuantizer(4, 2, l2_norm=False, ema=True, ema_decay=decay, ema_eps=eps).train()
    _set_codes(q, CODES)
    zq, idx, _ = q(_grid(torch.tensor(BATCH)))
    assert idx.flatten().tolist() == ASSIGN
    # this batch was quantised with the old codes
    assert torch.allclose(_flat(zq), torch.tensor(CODES)[ASSIGN])
    want = _ema_closed_form(decay, eps, CODES, BATCH, ASSIGN, 4)
    assert torch.allclose(q.embedding.weight, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.cluster_size, torch.tensor([decay + (1 - decay) * n for n in (3, 2, 1, 0)]))
    # eval forwards leave the codebook alone
    q.eval()
    before = q.embedding.weight.clone()
    q(_grid(torch.tensor(BATCH)))
    assert torch.equal(q.embedding.weight, before)


def test_ema_codes_get_no_gradient_and_only_commitment_remains():
    beta = 0.3
    q = VectorQuantizer(4, 2, beta=beta, l2_norm=False, ema=True).train()
    _set_codes(q, CODES)
    assert not any(p is q.embedding.weight for p in q.parameters())
    assert set(q.state_dict()) == {"embedding.weight", "cluster_size", "embed_sum"}
    z = _grid(torch.tensor(BATCH)).requires_grad_(True)
    _, _, out = q(z)
    zq_old = torch.tensor(CODES)[ASSIGN]
    sq = ((torch.tensor(BATCH) - zq_old) ** 2).mean()
    assert float(out["codebook"]) == 0.0
    assert torch.allclose(out["commit"], beta * sq) and torch.allclose(out["loss"], beta * sq)
    out["loss"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.embedding.weight.grad is None and not q.embedding.weight.requires_grad


def test_ema_converges_to_the_cluster_means_and_state_round_trips():
    x, centres = _blobs(n_blobs=4, per=16, spread=0.1)
    q = VectorQuantizer(4, 2, l2_norm=False, ema=True, ema_decay=0.8).train()
    _set_codes(q, centres + 0.5)  # each code starts near its own blob
    for _ in range(60):
        _, idx, _ = q(_grid(x))
    means = torch.stack([x[idx.flatten() == k].mean(0) for k in range(4)])
    assert torch.allclose(q.embedding.weight, means, atol=1e-3)
    q2 = VectorQuantizer(4, 2, l2_norm=False, ema=True, ema_decay=0.8)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.embedding.weight, q.embedding.weight) and torch.equal(q2.embed_sum, q.embed_sum)


def test_ema_with_legacy_is_rejected():
    with pytest.raises(ValueError, match="legacy"):
        VectorQuantizer(4, 2, ema=True, legacy=True)
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(4, 2, ema=True, ema_decay=1.0)


# ---- loss forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
def test_loss_and_gradients_follow_the_formula(legacy):
    torch.manual_seed(0)
    beta, N, C = 0.3, 10, 3
    q = VectorQuantizer(6, C, beta=beta, l2_norm=False, legacy=legacy).train()
    with torch.no_grad():
        q.embedding.weight.normal_()
    x = torch.randn(N, C)
    z = _grid(x).requires_grad_(True)
    _, idx, out = q(z)
    e = q.embedding.weight.detach()
    a = idx.flatten()
    diff = x - e[a]  # z - z_q
    sq = (diff ** 2).mean()
    w_commit, w_codebook = (1.0, beta) if legacy else (beta, 1.0)
    # legacy:   ||sg(z_q) - z||^2 + beta ||z_q - sg(z)||^2
    # default:  beta ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2
    assert torch.allclose(out["loss"], (w_commit + w_codebook) * sq, rtol=1e-5)
    out["loss"].backward()
    # d/dz of w * mean((z - z_q)^2) is 2 w (z - z_q) / (N C); the codes get the opposite sign,
    # summed over the vectors assigned to them.
    assert torch.allclose(_flat(z.grad), 2 * w_commit * diff / (N * C), atol=1e-6)
    want_e = torch.zeros_like(e).index_add_(0, a, -2 * w_codebook * diff / (N * C))
    assert torch.allclose(q.embedding.weight.grad, want_e, atol=1e-6)


# ---- k-means init -----------------------------------------------------------------------------
def test_kmeans_init_lowers_the_quantisation_error_and_stays_in_the_data_hull():
    x, _ = _blobs(n_blobs=8, per=8)
    torch.manual_seed(0)
    plain = VectorQuantizer(8, 2, l2_norm=False).train()
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, l2_norm=False, kmeans_init=True, kmeans_iters=10).train()
    assert not bool(q.kmeans_done)
    plain(_grid(x))
    q(_grid(x))
    assert bool(q.kmeans_done)
    codes = q.embedding.weight.detach()
    assert (codes >= x.min(0).values - 1e-5).all() and (codes <= x.max(0).values + 1e-5).all()

    def err(m):
        return float(torch.cdist(x, m.codebook().detach()).min(1).values.pow(2).mean())

    assert err(q) < 0.1 * err(plain)
    # every code is the mean of the batch vectors nearest to it or a batch vector (empty cluster)
    a = torch.cdist(x, codes).argmin(1)
    for k in range(8):
        if (a == k).any():
            assert torch.allclose(codes[k], x[a == k].mean(0), atol=0.2)


def test_kmeans_init_happens_once_and_survives_save_load():
    x, _ = _blobs(seed=1)
    q = VectorQuantizer(8, 2, l2_norm=False, kmeans_init=True).train()
    q(_grid(x))
    after_first = q.embedding.weight.detach().clone()
    q(_grid(x * 3 + 7))  # a different batch: no re-init (and no optimiser step here)
    assert torch.equal(q.embedding.weight, after_first)
    state = q.state_dict()
    assert "kmeans_done" in state and state["kmeans_done"].dtype == torch.bool
    q2 = VectorQuantizer(8, 2, l2_norm=False, kmeans_init=True).train()
    q2.load_state_dict(state)
    q2(_grid(x * 3 + 7))
    assert torch.equal(q2.embedding.weight, after_first)
    # the flag really gates it: a fresh quantizer does re-init on that batch
    q3 = VectorQuantizer(8, 2, l2_norm=False, kmeans_init=True).train()
    q3(_grid(x * 3 + 7))
    assert not torch.allclose(q3.embedding.weight, after_first)


def test_kmeans_init_with_fewer_vectors_than_codes_and_l2_norm():
    x = torch.randn(3, 4)
    q = VectorQuantizer(8, 4, l2_norm=False, kmeans_init=True).train()
    q(_grid(x))
    # with replacement: every code is one of the 3 vectors
    assert torch.cdist(q.embedding.weight.detach(), x).min(1).values.max() < 1e-5
    qn = VectorQuantizer(8, 4, l2_norm=True, kmeans_init=True).train()
    qn(_grid(x))
    assert torch.allclose(qn.embedding.weight.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.cdist(qn.embedding.weight.detach(), F.normalize(x, dim=1)).min(1).values.max() < 1e-5


def test_lloyd_iterations_never_increase_the_kmeans_objective():
    x, _ = _blobs(n_blobs=6, per=10, spread=1.0, seed=3)

    def objective(c):
        return float(torch.cdist(x, c).min(1).values.pow(2).sum())

    objs = [objective(kmeans(x, 6, iters=i, generator=torch.Generator().manual_seed(5))) for i in range(6)]
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(objs))
    assert objs[-1] < objs[0]  # and it does move
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        kmeans(torch.randn(5), 2)


# ---- dead-code restart ------------------------------------------------------------------------
def _half_dead(threshold=0.5, every=1, **kw):
    x, centres = _blobs(n_blobs=8, per=8)
    q = VectorQuantizer(8, 2, l2_norm=False, restart_threshold=threshold, restart_every=every, **kw).train()
    # codes 0-3 sit on four blobs; codes 4-7 are far away and can never be nearest
    _set_codes(q, torch.cat([centres[:4], torch.full((4, 2), 1e3)]))
    return q, x


def test_dead_code_restart_moves_unused_codes_onto_data_and_all_codes_get_used():
    torch.manual_seed(0)
    q, x = _half_dead()
    live = q.embedding.weight[:4].detach().clone()
    _, idx, _ = q(_grid(x))
    assert set(idx.flatten().tolist()) <= {0, 1, 2, 3}  # the collapsed batch
    w = q.embedding.weight.detach()
    assert torch.equal(w[:4], live)  # used codes stay
    assert torch.cdist(w[4:], x).min(1).values.max() < 0.05  # restarted onto batch vectors
    assert torch.allclose(q.code_usage[4:], torch.full((4,), 0.5))
    _, idx2, _ = q.eval()(_grid(x))
    assert len(set(idx2.flatten().tolist())) == 8  # all codes used on the same batch


def test_dead_code_restart_waits_for_restart_every_and_skips_eval():
    torch.manual_seed(0)
    q, x = _half_dead(every=3)
    far = q.embedding.weight[4:].detach().clone()
    q.eval()(_grid(x))
    q.train()
    for _ in range(2):
        q(_grid(x))
        assert torch.equal(q.embedding.weight[4:], far)
    q(_grid(x))
    assert not torch.equal(q.embedding.weight[4:], far)
    assert set(q.state_dict()) == {"embedding.weight", "code_usage"}


def test_restart_with_ema_resets_the_moving_averages_of_restarted_codes():
    torch.manual_seed(0)
    q, x = _half_dead(ema=True)
    q(_grid(x))
    w = q.embedding.weight
    assert torch.cdist(w[4:], x).min(1).values.max() < 0.05
    assert torch.equal(q.cluster_size[4:], torch.ones(4)) and torch.equal(q.embed_sum[4:], w[4:])


# ---- rolling usage metrics ----------------------------------------------------------------------
def test_usage_stats_uniform_gives_K_single_code_gives_one():
    K = 16
    q = VectorQuantizer(K, 4, l2_norm=False, usage_window=4).train()
    assert q.usage_stats() == {"usage": 0.0, "perplexity": 1.0}
    for s in range(4):  # each batch uses half the codes; together they cover all K uniformly
        ids = torch.arange(K // 2) + (K // 2) * (s % 2)
        q(q.lookup(ids.view(1, 1, -1)))
    stats = q.usage_stats()
    assert stats["usage"] == 1.0 and stats["perplexity"] == pytest.approx(K, rel=1e-5)
    for _ in range(4):  # the window forgets: only code 3 now
        q(q.lookup(torch.full((1, 2, 5), 3)))
    stats = q.usage_stats()
    assert stats["usage"] == pytest.approx(1 / K) and stats["perplexity"] == pytest.approx(1.0)
    q(q.lookup(torch.tensor([[[0, 1]]])))  # skewed: 10 x code 3, 1 x code 0, 1 x code 1 in window
    p = torch.tensor([30.0, 1.0, 1.0]) / 32
    assert q.usage_stats()["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)


# ---- entropy loss --------------------------------------------------------------------------------
def test_entropy_loss_matches_a_hand_computation():
    d = [[0.01, 0.02, 0.05], [0.03, 0.0, 0.01]]
    tau = 0.01
    ps = []
    for row in d:
        ex = [math.exp(-v / tau) for v in row]
        ps.append([e / sum(ex) for e in ex])
    mean_h = sum(-sum(p * math.log(p) for p in row) for row in ps) / len(ps)
    avg = [sum(row[k] for row in ps) / len(ps) for k in range(3)]
    h_avg = -sum(a * math.log(a) for a in avg)
    assert float(entropy_loss(torch.tensor(d), tau)) == pytest.approx(mean_h - h_avg, rel=1e-5)


def test_entropy_loss_bounds():
    K, N = 8, 32
    confident_uniform = torch.full((N, K), 5.0)
    confident_uniform[torch.arange(N), torch.arange(N) % K] = 0.0
    assert float(entropy_loss(confident_uniform)) == pytest.approx(-math.log(K), abs=1e-4)
    same = torch.rand(1, K).expand(N, K)  # identical rows, whatever their confidence
    assert abs(float(entropy_loss(same, 0.5))) < 1e-5
    for s in range(5):  # concavity of H: always within [-log K, 0]
        d = torch.rand(N, K, generator=torch.Generator().manual_seed(s)) * 0.05
        v = float(entropy_loss(d))
        assert -math.log(K) - 1e-5 <= v <= 1e-5


# ---- composition ---------------------------------------------------------------------------------
def test_all_options_build_on_meta_and_compose_with_rvq():
    opts = {"ema": True, "ema_decay": 0.9, "kmeans_init": True, "kmeans_iters": 3,
            "restart_threshold": 0.1, "restart_every": 2, "usage_window": 5}
    with torch.device("meta"):
        q = VectorQuantizer(16384, 8, **opts)
    assert q.embedding.weight.is_meta and q.embed_sum.shape == (16384, 8)
    torch.manual_seed(0)
    rvq = ResidualVQ(2, 8, 4, **opts).train()
    z = torch.randn(2, 4, 3, 3)
    for _ in range(3):
        zq, idx, out = rvq(z)
    assert torch.isfinite(out["loss"]) and zq.shape == z.shape and int(idx.min()) >= 0
    assert all(bool(rvq.level(d).kmeans_done) for d in range(2))
