"""VectorQuantizer (VQ-VAE / LlamaGen §2.1) and the LlamaGen-style VQTokenizer."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo
from tokenizers_vis import losses as L
from tokenizers_vis.quantizers import VectorQuantizer, entropy_loss
from tokenizers_vis.vq import VQTokenizer
from zoo import registry
from zoo.tokens import Tokens, TokenSpec


def _z(B=2, C=8, h=3, w=4, seed=0):
    return torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(seed))


# ---- quantizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("l2_norm", [True, False])
def test_lookup_then_quantize_returns_same_index(l2_norm):
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8, l2_norm=l2_norm).eval()
    idx = torch.randint(0, 64, (2, 3, 5))
    codes = q.lookup(idx)
    assert codes.shape == (2, 8, 3, 5)
    _, idx2, _ = q(codes)
    assert idx2.dtype == torch.int64 and torch.equal(idx2, idx)


def test_lookup_is_normalised_with_l2_norm():
    q = VectorQuantizer(32, 8, l2_norm=True)
    with torch.no_grad():
        q.embedding.weight.mul_(3.0)  # stored codes need not be unit-norm
    v = q.lookup(torch.arange(32).view(1, 4, 8))
    assert torch.allclose(v.norm(dim=1), torch.ones(1, 4, 8), atol=1e-5)


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    q = VectorQuantizer(50, 4, l2_norm=False)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = _z(C=4)
    zq, idx, _ = q(z)
    flat = z.movedim(1, -1).reshape(-1, 4)
    ref = torch.cdist(flat, q.embedding.weight).argmin(1)
    assert torch.equal(idx.flatten(), ref)
    assert torch.allclose(zq.movedim(1, -1).reshape(-1, 4), q.embedding.weight[ref])


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(16, 8, l2_norm=False)
    z = _z().requires_grad_(True)
    g = _z(seed=1)
    zq, _, _ = q(z)
    (zq * g).sum().backward()
    assert torch.allclose(z.grad, g)


def test_straight_through_with_l2_norm_passes_through_the_normalisation():
    q = VectorQuantizer(16, 8, l2_norm=True)
    z = _z().requires_grad_(True)
    g = _z(seed=1)
    zq, _, _ = q(z)
    (zq * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_loss_values_match_the_formulas(legacy, l2_norm):
    torch.manual_seed(0)
    beta = 0.4
    q = VectorQuantizer(20, 8, beta=beta, l2_norm=l2_norm, legacy=legacy)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = _z()
    _, idx, out = q(z)
    zz = z.movedim(1, -1).reshape(-1, 8)
    cb = q.embedding.weight
    if l2_norm:
        zz, cb = F.normalize(zz, dim=-1), F.normalize(cb, dim=-1)
    zq = cb[idx.flatten()]
    sq = ((zz - zq) ** 2).mean()
    want_commit, want_codebook = (sq, beta * sq) if legacy else (beta * sq, sq)
    assert torch.allclose(out["commit"], want_commit, rtol=1e-5)
    assert torch.allclose(out["codebook"], want_codebook, rtol=1e-5)
    assert float(out["entropy"]) == 0.0
    assert torch.allclose(out["loss"], want_commit + want_codebook, rtol=1e-5)


def test_commit_trains_the_encoder_and_codebook_trains_the_codes():
    q = VectorQuantizer(20, 8, l2_norm=False)
    z = _z().requires_grad_(True)
    _, _, out = q(z)
    out["commit"].backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and q.embedding.weight.grad is None
    z.grad = None
    out["codebook"].backward()
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0


def test_entropy_loss_prefers_confident_spread_assignments():
    K, N = 8, 64
    spread = torch.full((N, K), 4.0)
    spread[torch.arange(N), torch.arange(N) % K] = 0.0  # each row sure of one code, all codes used
    collapsed = torch.full((N, K), 4.0)
    collapsed[:, 0] = 0.0  # everyone picks code 0
    unsure = torch.zeros(N, K)  # every row uniform over codes
    e_spread, e_coll, e_unsure = (entropy_loss(d) for d in (spread, collapsed, unsure))
    assert e_spread < e_coll and e_spread < e_unsure
    assert abs(float(e_spread) + torch.log(torch.tensor(float(K)))) < 1e-3  # the minimum, -log K
    assert abs(float(e_coll)) < 1e-3 and abs(float(e_unsure)) < 1e-3


def test_entropy_weight_enters_the_quantizer_losses():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8, l2_norm=True, entropy_weight=0.3, entropy_temperature=0.05)
    z = _z()
    _, _, out = q(z)
    flat = F.normalize(z.movedim(1, -1).reshape(-1, 8), dim=-1)
    d = torch.cdist(flat, q.codebook()) ** 2
    assert torch.allclose(out["entropy"], 0.3 * entropy_loss(d, 0.05), atol=1e-4)
    assert torch.allclose(out["loss"], out["commit"] + out["codebook"] + out["entropy"])


def test_usage_is_rolling_and_not_saved():
    K = 32
    q = VectorQuantizer(K, 8, l2_norm=False, usage_window=3).train()
    _, _, out = q(q.lookup(torch.arange(10).view(1, 2, 5)))
    assert float(out["usage"]) == pytest.approx(10 / K)
    for _ in range(3):  # three batches of code 0 push the first batch out of the window
        _, _, out = q(q.lookup(torch.zeros(1, 2, 5, dtype=torch.long)))
    assert float(out["usage"]) == pytest.approx(1 / K)
    assert float(out["perplexity"]) == pytest.approx(1.0)
    q.eval()
    _, _, out = q(q.lookup(torch.arange(10, 20).view(1, 2, 5)))  # eval batches are not counted
    assert float(out["usage"]) == pytest.approx(1 / K)
    assert float(out["perplexity"]) == pytest.approx(10.0, rel=1e-4)
    assert set(q.state_dict()) == {"embedding.weight"}


def test_quantizer_builds_on_meta():
    with torch.device("meta"):
        q = VectorQuantizer(16384, 8)
    assert q.embedding.weight.is_meta and q.embedding.weight.shape == (16384, 8)


def test_quantizer_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        VectorQuantizer(16, 8)(torch.randn(1, 4, 2, 2))


# ---- tokenizer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return zoo.create("tokenizer/vq-tiny").eval()


def test_tiny_encode_decode_shapes(tiny):
    x = tiny.example_images(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tiny.encode(x)
        assert isinstance(tokens, Tokens)
        assert tokens.spec == tiny.spec == TokenSpec("discrete", "grid", (8, 8), vocab_size=tiny.spec.vocab_size)
        assert tokens.data.shape == (2, 8, 8) and tokens.data.dtype == torch.int64
        tokens.validate()
        assert tiny.decode(tokens).shape == x.shape


def test_decode_matches_forward_reconstruction(tiny):
    x = tiny.example_images(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        recon, _ = tiny(x)
        assert torch.allclose(tiny.decode(tiny.encode(x)), recon, atol=1e-5)


def test_forward_losses_are_finite(tiny):
    tiny.train()
    try:
        _, losses = tiny(tiny.example_images(2, torch.Generator().manual_seed(0)))
    finally:
        tiny.eval()
    assert {"loss", "rec", "commit", "codebook", "entropy", "usage", "perplexity"} <= set(losses)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert losses["loss"].requires_grad and not losses["rec"].requires_grad
    parts = losses["rec"] + losses["commit"] + losses["codebook"] + losses["entropy"]
    assert torch.allclose(losses["loss"].detach(), parts, rtol=1e-5)


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError, match="64x64"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        tiny.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="dtype"):
        tiny.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    other = Tokens(torch.zeros(1, 16, 16, dtype=torch.long), TokenSpec("discrete", "grid", (16, 16), vocab_size=1024))
    with pytest.raises(ValueError, match="8x8"):
        tiny.decode(other)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible"):
        VQTokenizer(image_size=60, ch=8, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=16,
                    codebook_size=16, norm_groups=4, level_attn=False, mid_attn=False)
    with pytest.raises(ValueError, match="norm_groups"):
        VQTokenizer(image_size=64, ch=12, ch_mult=[1, 2], num_res_blocks=1, z_channels=16,
                    codebook_size=16, norm_groups=8)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("tokenizer/vq-tiny").eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["name"] == "tokenizer/vq-tiny" and isinstance(cfg["args"]["ch_mult"], list)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    x = model.example_images(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
        assert a == b
        assert torch.equal(model.decode(a), loaded.decode(b))


def test_tiny_overfits_a_batch():
    """A few Adam steps on one batch must cut the reconstruction loss (the graph is wired)."""
    torch.manual_seed(0)
    model = zoo.create("tokenizer/vq-tiny", image_size=32).train()
    x = torch.full((4, 3, 32, 32), -0.0)
    x[:, 0, 8:20, 6:18] = 0.9  # a flat red-ish square on grey
    x[2:, 2, 12:28, 14:30] = -0.8
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(15):
        _, losses = model(x)
        first = first if first is not None else float(losses["rec"])
        losses["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert float(losses["rec"]) < 0.5 * first


def test_vq16_matches_the_paper_parameter_count():
    entry = registry.entry("tokenizer/vq-16")
    assert entry.paper_params == 72e6  # LlamaGen §2.1 / Table 1
    model = registry.build_meta("tokenizer/vq-16")
    assert abs(model.num_params() / 72e6 - 1) < 0.05
    assert model.spec.shape == (16, 16) and model.spec.vocab_size == 16384
    assert model.quantizer.dim == 8 and model.quantizer.l2_norm


def test_vq8_config_on_meta():
    model = registry.build_meta("tokenizer/vq-8")
    assert model.spec.shape == (32, 32) and model.spec.vocab_size == 16384


# ---- training losses ---------------------------------------------------------------------
def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, .5] -> .25 ; relu(1 + fake) = [0, 1] -> .5
    assert float(L.discriminator_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(L.generator_adv_loss(fake)) == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patchgan_gives_patch_logits(norm):
    d = L.NLayerDiscriminator(ndf=8, n_layers=3, norm=norm)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)


def test_adaptive_weight_balances_gradients():
    w = torch.randn(4, requires_grad=True)
    nll, g = (w * 3.0).sum(), (w * 1.5).sum()
    assert float(L.adaptive_weight(nll, g, w)) == pytest.approx(2.0, rel=1e-3)


def test_lpips_or_none_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(L, "_WARNED", False)
    with pytest.warns(UserWarning, match="VGG16 weights not found"):
        assert L.lpips_or_none() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.lpips_or_none() is None  # warns only once


def test_lpips_module_is_a_distance():
    torch.manual_seed(0)
    m = L.LPIPS()  # random VGG: checks the wiring, not the calibration
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = a.clone()
    b[1] = -b[1]
    d = m(a, b)
    assert d.shape == (2,)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6) and float(d[1]) > 0
    assert not any(p.requires_grad for p in m.parameters())
