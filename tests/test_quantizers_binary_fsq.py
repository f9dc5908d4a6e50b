"""Binary quantizers (LFQ / BSQ / group LFQ, MAGVIT-v2 §3.1, BSQ §3.2-3.3) and FSQ (Mentzer et al. 2023)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizers_vis.quantizers.binary import BinaryQuantizer
from tokenizers_vis.quantizers.fsq import FSQ, round_ste


def _z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _MaxTensor(TorchDispatchMode):
    """Records the largest dimension and numel of every tensor produced by an aten op."""

    def __init__(self):
        super().__init__()
        self.max_dim = 0
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_dim = max([self.max_dim, *t.shape])
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_size_tracker_can_fail():
    # the tracker must see a tensor built inside a function, else the K = 128 test proves nothing
    with _MaxTensor() as m:
        torch.zeros(3, 2 ** 17).sum()
    assert m.max_dim == 2 ** 17 and m.max_numel == 3 * 2 ** 17


# ---- binary: K = 128 ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lfq", "bsq"])
def test_k128_forward_never_builds_big_codebook(mode):
    q = BinaryQuantizer(128, mode=mode, group_size=8)
    z = _z(2, 128, 4, 4).requires_grad_(True)
    with _MaxTensor() as m:
        z_q, bits, losses = q(z)
        losses["loss"].backward()
    n_tok = 2 * 4 * 4
    # largest intermediate: the (tokens, groups, 2^g) logits / probs; a 2^16 (let alone 2^128)
    # code axis would break both bounds (flattened views may merge tokens and groups)
    assert m.max_numel <= n_tok * (128 // 8) * 2 ** 8
    assert m.max_dim <= n_tok * (128 // 8)
    assert z_q.shape == (2, 128, 4, 4) and bits.shape == (2, 4, 4, 128) and bits.dtype == torch.uint8
    assert torch.isfinite(losses["loss"]) and torch.isfinite(z.grad).all()
    for k in ("commit", "entropy", "bit_usage", "sample_entropy", "codebook_entropy"):
        assert losses[k].dim() == 0
    assert not losses["bit_usage"].requires_grad and 0 <= losses["bit_usage"] <= 1


@pytest.mark.parametrize("mode", ["lfq", "bsq"])
def test_k128_bits_round_trip_and_exact_values(mode):
    q = BinaryQuantizer(128, mode=mode)
    z = _z(2, 128, 4, 4, seed=1)
    z[0, :, 0, 0] = 0.0  # sign(0) = +1
    z_q, bits, _ = q(z)
    scale = 1.0 if mode == "lfq" else 1 / math.sqrt(128)
    assert torch.equal(z_q.abs(), torch.full_like(z_q, scale))
    assert torch.equal(q.bits_to_codes(bits), z_q)
    assert torch.equal(bits.movedim(-1, 1).bool(), z >= 0)
    assert bits[0, 0, 0].all()
    if mode == "bsq":
        assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 4, 4))


def test_group_ids_round_trip_group16():
    q = BinaryQuantizer(128, group_size=16, entropy_weight=0.0)
    bits = torch.randint(0, 2, (2, 3, 128), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    ids = q.group_ids(bits)
    assert ids.shape == (2, 3, 8) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 2 ** 16
    assert torch.equal(q.from_group_ids(ids), bits)
    # little-endian: bit b of group 0 has weight 2^b
    assert torch.equal(ids[..., 0], sum(bits[..., b].long() << b for b in range(16)))


def test_group16_forward_small_k():
    q = BinaryQuantizer(32, group_size=16)
    z_q, bits, losses = q(_z(1, 32, 2, 2))
    assert torch.isfinite(losses["loss"])
    assert torch.equal(q.from_group_ids(q.group_ids(bits)), bits)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="group_size"):
        BinaryQuantizer(34, group_size=17)
    with pytest.raises(ValueError, match="divisible"):
        BinaryQuantizer(12, group_size=8)
    with pytest.raises(ValueError, match="mode"):
        BinaryQuantizer(8, mode="vq")
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        BinaryQuantizer(16)(torch.randn(1, 8, 2, 2))


# ---- binary: STE and losses --------------------------------------------------------------
def test_lfq_ste_gradient_is_identity():
    q = BinaryQuantizer(16, entropy_weight=0.0)
    z = _z(2, 16, 3, 3).requires_grad_(True)
    g = _z(2, 16, 3, 3, seed=5)
    z_q, _, _ = q(z)
    (z_q * g).sum().backward()
    assert torch.allclose(z.grad, g)


def test_bsq_ste_gradient_is_scaled_identity_wrt_u():
    # bsq-vit: zq = (u + sg[sign(u) - u]) / sqrt(K), so d zq / d u = 1/sqrt(K) (not 1)
    K = 16
    q = BinaryQuantizer(K, mode="bsq", entropy_weight=0.0)
    z = _z(2, K, 3, 3).requires_grad_(True)
    g = _z(2, K, 3, 3, seed=5)
    z_q, _, _ = q(z)
    (z_q * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g / math.sqrt(K)).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert torch.allclose(z_q.detach().abs(), torch.full_like(z_q, 1 / math.sqrt(K)))


def test_entropy_only_computed_in_training():
    q = BinaryQuantizer(16, group_size=8, entropy_weight=0.1)
    z = _z(2, 16, 3, 3) * 0.01
    assert q(z)[2]["sample_entropy"] > 0  # training mode: computed
    q.eval()
    assert q(z)[2]["sample_entropy"] == 0 and q(z)[2]["entropy"] == 0
    q.train()
    with torch.no_grad():
        assert q(z)[2]["codebook_entropy"] == 0


def test_commit_loss_value():
    q = BinaryQuantizer(16, commit_weight=0.25, entropy_weight=0.0)
    z = _z(2, 16, 3, 3)
    _, _, losses = q(z)
    expected = 0.25 * ((z - torch.where(z >= 0, 1.0, -1.0)) ** 2).mean()
    assert torch.allclose(losses["commit"], expected) and torch.allclose(losses["loss"], expected)


def _codes_z(ids, K, g):
    """Confident LFQ features (scale 1) whose group ids are ``ids`` (N, K // g)."""
    bits = BinaryQuantizer(K, group_size=g).from_group_ids(ids)
    return (bits.float() * 2 - 1).T.reshape(1, K, -1, 1)  # (1, K, N, 1)


@pytest.mark.parametrize("mode", ["lfq", "bsq"])
def test_entropy_lower_for_spread_than_collapsed(mode):
    K, g = 16, 8
    q = BinaryQuantizer(K, mode=mode, group_size=g)
    spread = torch.arange(2 ** g).unsqueeze(-1).repeat(1, K // g)  # every code once per group
    collapsed = torch.full_like(spread, 37)
    _, _, l_spread = q(_codes_z(spread, K, g))
    _, _, l_coll = q(_codes_z(collapsed, K, g))
    assert torch.isfinite(l_spread["entropy"]) and torch.isfinite(l_coll["entropy"])
    assert l_spread["entropy"] < l_coll["entropy"]
    # confident assignments: per-sample entropy ~ 0; batch entropy log(2^g) per group vs 0
    assert l_spread["sample_entropy"] < 1e-3 and l_coll["sample_entropy"] < 1e-3
    assert abs(l_spread["codebook_entropy"] - (K // g) * g * math.log(2)) < 1e-3
    assert l_coll["codebook_entropy"] < 1e-3
    assert abs(l_spread["entropy"] - q.entropy_weight * -(K // g) * g * math.log(2)) < 1e-3
    assert l_spread["bit_usage"] == 1.0 and l_coll["bit_usage"] == 0.0


def test_sample_entropy_is_exactly_factorised():
    # logits are a sum of per-bit terms, so the per-sample entropy does not depend on the grouping
    # and equals the analytic per-bit form sum_b H(sigmoid(4 * inv_temp * z_b)) (BSQ §3.3)
    z = _z(1, 8, 4, 4) * 0.01  # small so the distributions are not one-hot
    sample = {g: BinaryQuantizer(8, group_size=g)(z)[2]["sample_entropy"] for g in (1, 2, 4, 8)}
    p = torch.sigmoid(4 * 100.0 * z.movedim(1, -1).reshape(-1, 8))
    analytic = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1).mean()
    for g, h in sample.items():
        assert torch.allclose(h, analytic, atol=1e-4), g
    # the codebook term sums marginal entropies: finer groups give an upper bound
    cb = {g: BinaryQuantizer(8, group_size=g)(z)[2]["codebook_entropy"] for g in (1, 8)}
    assert cb[1] >= cb[8] - 1e-5


# ---- FSQ ---------------------------------------------------------------------------------
def test_fsq_all_indices_round_trip():
    f = FSQ([8, 5, 5, 5])
    assert f.codebook_size == 1000
    idx = torch.arange(1000)
    codes = f.indices_to_codes(idx)
    assert codes.shape == (1000, 4)
    assert torch.equal(f.codes_to_indices(codes), idx)
    assert torch.unique(codes, dim=0).shape[0] == 1000
    # grid: codes * (L // 2) integer in [-L//2, L//2 - (1 if L even)]
    half = torch.tensor([4, 2, 2, 2])
    s = codes * half
    assert torch.equal(s, s.round())
    assert torch.equal(s.min(0).values, -half.float())
    assert torch.equal(s.max(0).values, torch.tensor([3.0, 2, 2, 2]))


def test_fsq_forward_on_grid_and_reencode():
    f = FSQ([8, 5, 5, 5])
    z = _z(2, 4, 6, 6) * 3
    z_q, idx, losses = f(z)
    assert z_q.shape == z.shape and idx.shape == (2, 6, 6) and idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < 1000
    s = z_q.movedim(1, -1) * torch.tensor([4.0, 2, 2, 2])
    assert torch.equal(s, s.round())
    assert torch.equal(f.lookup(idx), z_q)
    assert losses["loss"].item() == 0.0
    assert losses["usage"] == torch.unique(idx).numel() / 1000
    # saturated inputs reach the extreme levels (eps widens tanh's range just enough)
    big = torch.tensor([50.0, 50, -50, -50]).view(1, 4, 1, 1)
    zq_big, _, _ = f(big)
    assert torch.equal(zq_big.flatten(), torch.tensor([0.75, 1.0, -1.0, -1.0]))


def test_fsq_round_ste_identity_gradient():
    x = _z(10).requires_grad_(True)
    g = _z(10, seed=3)
    (round_ste(x * 3) * g).sum().backward()
    assert torch.allclose(x.grad, 3 * g)
    f = FSQ([8, 5, 5, 5])
    z = _z(2, 4, 3, 3).requires_grad_(True)
    f(z)[0].sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (f.bound(z2.movedim(1, -1)) / f._half_width).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


def test_fsq_meta_device_build():
    with torch.device("meta"):
        f = FSQ([8, 5, 5, 5])
    assert f.codebook_size == 1000 and f._basis.is_meta
    z_q, idx, _ = f(torch.empty(2, 4, 3, 3, device="meta"))
    assert z_q.shape == (2, 4, 3, 3) and idx.shape == (2, 3, 3)


def test_binary_meta_device_build():
    with torch.device("meta"):
        q = BinaryQuantizer(128, mode="bsq", group_size=16)
    assert q._group_codes.is_meta and q._group_codes.shape == (2 ** 16, 16)
    z_q, bits, losses = q(torch.empty(1, 128, 2, 2, device="meta"))
    assert z_q.shape == (1, 128, 2, 2) and bits.shape == (1, 2, 2, 128) and losses["loss"].is_meta


def test_fsq_bad_input():
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        FSQ([8, 6, 5])(torch.randn(1, 4, 2, 2))
