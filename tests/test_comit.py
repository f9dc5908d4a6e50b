"""COMiT (tokenizers_vis/comit.py): one predictor for encode + decode, recurrent message updates,
prior-code init, crop orders, relative offsets, flow direction, paper sizes, checkpoints, training."""
import pytest
import torch
from torch import nn

import zoo
from tokenizers_vis import comit as C
from tokenizers_vis.comit import COMiT, adaptive_next_crop, comit_interpolate, comit_velocity_target, crop_centres
from zoo import registry
from zoo.checkpoint import load_pretrained

SMALL = dict(image_size=64, vae="tokenizer/kl-tiny", crop=4, stride=2, crop_space="latent", num_tokens=6,
             levels=[4, 4, 4, 3, 3, 3], dim=32, depth=2, heads=2, patch_size=1, teacher="none",
             sample_steps=3, guidance=1.0)


class FakeTeacher(nn.Module):
    """A fixed conv standing in for the Shapes net: (B, 16, 8, 8) patch features."""

    def __init__(self, channels=16):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 8, 8)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)

    def patch_features(self, images):
        return self.conv(images)


def small(**kw):
    torch.manual_seed(0)
    m = COMiT(**{**SMALL, **kw})
    # the velocity head starts at zero (adaLN-Zero): give it weights so decodes depend on the inputs
    with torch.no_grad():
        for lin in (m.predictor.x_out, m.predictor.x_adaln[1]):
            lin.weight.normal_(0, 0.05)
        for b in m.predictor.blocks:
            for lin in (b.adaln[1], b.adaln_msg[1]):
                lin.weight.normal_(0, 0.05)
                lin.bias.normal_(0, 1.0)  # gates of order 1: crops move the unit-scale query positions
    return m.eval()


def images(b=2, seed=0):
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def on_grid(m, codes):
    half = m.fsq._half_width.float()
    scaled = codes * half
    return torch.allclose(scaled, scaled.round(), atol=1e-5) and bool((scaled.abs() <= half + 1e-5).all())


class Spy:
    """Records the arguments of COMiT.observe (the one encoding step)."""

    def __init__(self, m):
        self.calls, self.orig = [], m.observe

        def observe(crop, message, offset):
            self.calls.append((crop.clone(), message.clone(), offset.clone()))
            return self.orig(crop, message, offset)

        m.observe = observe


# ---- one predictor -----------------------------------------------------------------------------

def test_encode_and_decode_share_one_predictor():
    m = small()
    owners = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert owners == {"predictor"}  # the VAE is frozen buffers; no separate encoder/decoder
    assert not list(m.vae.parameters()) and any(k.startswith("vae.") for k in m.state_dict())
    modes = []
    h = m.predictor.register_forward_hook(lambda mod, args, kw, out: modes.append("message" in out),
                                          with_kwargs=True)
    x = images()
    tok = m.encode(x)
    y = m.decode(tok)
    h.remove()
    assert True in modes and False in modes  # the same module ran the encode and the decode passes
    crop, msg, off = m.crop_latents(x)[:, 0], m.prior_message(2), torch.zeros(2, 2)
    t1 = torch.ones(2)
    with torch.no_grad():  # the message update before FSQ rounding (rounding can hide a small change)
        upd = m.predictor(crop, t1, msg, off, update_message=True, velocity=False)["message"]
        # perturb one shared weight: both directions change
        m.predictor.blocks[0].attention.wqkv.weight.add_(torch.randn_like(m.predictor.blocks[0].attention.wqkv.weight))
        upd2 = m.predictor(crop, t1, msg, off, update_message=True, velocity=False)["message"]
    assert not torch.allclose(upd, upd2, atol=1e-4)
    assert not torch.allclose(y, m.decode(tok), atol=1e-4)


# ---- the message ---------------------------------------------------------------------------------

def test_message_starts_at_prior_code_and_is_replaced_not_appended():
    m = small()
    spy = Spy(m)
    out = m.tokenize(images(), history=True)
    K = m.fsq.codebook_size
    first_msg = spy.calls[0][1]
    assert torch.equal(m.fsq.codes_to_indices(first_msg), torch.full((2, 6), K // 2))
    assert len(out["steps"]) == 9 and len(spy.calls) == 9
    for i, step in enumerate(out["steps"]):
        assert step["ids"].shape == (2, 6) and step["codes"].shape == (2, 6, 6)  # length N after every crop
        assert on_grid(m, step["codes"])
        if i + 1 < 9:  # the next step reads exactly this message
            torch.testing.assert_close(spy.calls[i + 1][1], step["codes"])
    assert out["ids"].shape == (2, 6) and torch.equal(out["ids"], out["steps"][-1]["ids"])
    changed = [not torch.equal(a["ids"], b["ids"]) for a, b in zip(out["steps"], out["steps"][1:])]
    assert any(changed)  # updated along the way
    tok = m.encode(images())
    assert tok.data.shape == (2, 6) and tok.spec.vocab_size == 4 * 4 * 4 * 3 * 3 * 3


def test_message_and_query_positions_start_unit_variance_as_the_reference():
    # reference RuledDiT: r_pos_embed, r_to_token, r_to_pos_embed, c_pos_embed = torch.randn. The
    # prior message is one code at every position and the queries one token, so these positions
    # are all that tells the N tokens apart at init (a 0.02 std left them near-identical).
    m = COMiT(**{**SMALL, "dim": 64})
    p = m.predictor
    for name in ("msg_pos", "query_token", "query_pos", "offset_pos"):
        std = getattr(p, name).std().item()
        assert 0.8 < std < 1.2, (name, std)
    with torch.no_grad():
        tokens = torch.nn.functional.normalize(p.msg_embed(m.prior_message(1))[0] + p.msg_pos, dim=-1)
    cos = tokens @ tokens.T
    off_diag = cos[~torch.eye(p.num_tokens, dtype=torch.bool)]
    assert off_diag.max() < 0.9


def test_prior_message_is_the_guidance_null():
    m = small()
    prior = m.prior_message(2)
    assert torch.equal(m.fsq.codes_to_indices(prior), torch.full((2, 6), m.prior_index))
    seen = []
    h = m.predictor.register_forward_hook(lambda mod, args, kw, out: seen.append(args[2].clone()), with_kwargs=True)
    tok = m.encode(images())
    seen.clear()
    m.decode(tok, cfg=3.0, steps=2)
    h.remove()
    assert len(seen) == 2  # one batched cond + uncond call per step
    for msg in seen:
        cond, uncond = msg.chunk(2)
        torch.testing.assert_close(cond, m.fsq.indices_to_codes(tok.data))
        torch.testing.assert_close(uncond, prior)


def test_recurrence_is_causal_in_crop_order():
    m = small()
    x = images()
    base = m.crop_latents(x)
    other = base.clone()
    other[:, 8] += 1.0  # change only crop 8 (observed last in raster order)
    m.crop_latents = lambda images, full=None: base
    a = m.tokenize(x, history=True)
    m.crop_latents = lambda images, full=None: other
    b = m.tokenize(x, history=True)
    for i in range(8):
        assert torch.equal(a["steps"][i]["codes"], b["steps"][i]["codes"])
    assert not torch.equal(a["steps"][8]["codes"], b["steps"][8]["codes"])
    one = m.tokenize(x, num_crops=1)  # depends on the first crop only
    assert torch.equal(one["codes"], a["steps"][0]["codes"])


# ---- orders and offsets ---------------------------------------------------------------------------

def test_order_modes():
    m = small()
    x = images(3)
    assert torch.equal(m.tokenize(x, "raster")["order"], torch.arange(9).expand(3, 9))
    assert torch.equal(m.tokenize(images(3, seed=9), "raster", 4)["order"], torch.arange(4).expand(3, 4))
    r1 = m.tokenize(x, "random", generator=torch.Generator().manual_seed(1))["order"]
    r1b = m.tokenize(x, "random", generator=torch.Generator().manual_seed(1))["order"]
    r2 = m.tokenize(x, "random", generator=torch.Generator().manual_seed(2))["order"]
    assert torch.equal(r1, r1b) and not torch.equal(r1, r2)
    assert all(sorted(row) == list(range(9)) for row in r1.tolist())  # a permutation per image
    assert not torch.equal(r1, torch.arange(9).expand(3, 9))
    expl = m.tokenize(x, [2, 0, 7])["order"]
    assert torch.equal(expl, torch.tensor([2, 0, 7]).expand(3, 3))
    with pytest.raises(ValueError, match="order must be one of"):
        m.tokenize(x, "spiral")


def test_adaptive_picks_the_largest_error_crop():
    err = torch.zeros(2, 64, 64)
    err[0, 52:60, 4:12] = 5.0   # only inside crop 6's window (rows 32..64, cols 0..32)
    err[1, 4:12, 52:60] = 5.0   # crop 2
    used = torch.zeros(2, 9, dtype=torch.bool)
    assert adaptive_next_crop(err, used, 32, 16).tolist() == [6, 2]
    used[0, 6] = True
    err[0, 30:34, 30:34] = 1.0  # the next best: the centre region (in crops 0, 1, 3, 4 windows)
    assert adaptive_next_crop(err, used, 32, 16)[0].item() in (0, 1, 3, 4)
    used[:] = True
    used[:, 5] = False
    assert adaptive_next_crop(err, used, 32, 16).tolist() == [5, 5]  # used crops excluded

    # through tokenize: the current one-step reconstruction is wrong only in crop 6's window
    m = small()
    x = images(2)

    def recon(message, offset, generator):
        r = x.clone()
        r[:, :, 52:60, 4:12] += 1.0
        return r

    m.one_step_reconstruction = recon
    order = m.tokenize(x, "adaptive", 4)["order"]
    assert order[:, 0].tolist() == [4, 4] and order[:, 1].tolist() == [6, 6]  # centre first, then argmax
    assert all(len(set(row)) == 4 for row in order.tolist())


def test_offsets_are_relative():
    m = small()
    spy = Spy(m)
    out = m.tokenize(images())
    cen = crop_centres(8, 4, 2)
    assert torch.allclose(cen[0], torch.tensor([-0.5, -0.5])) and torch.allclose(cen[4], torch.zeros(2))
    assert torch.equal(spy.calls[0][2], torch.zeros(2, 2))
    for i in range(1, 9):
        torch.testing.assert_close(spy.calls[i][2], (cen[i] - cen[i - 1]).expand(2, 2))
    torch.testing.assert_close(out["offset"], (-cen[8]).expand(2, 2))  # global centre - last crop
    # identical crops at shifted places with the same relative moves give the same message
    m2 = small()
    same = torch.ones(2, 9, m2.vae.channels, 4, 4) * 0.3
    m2.crop_latents = lambda images, full=None: same
    a = m2.tokenize(images(), [0, 1])  # a move of (+0.5, 0) ...
    b = m2.tokenize(images(), [4, 5])  # ... from a different absolute place
    assert torch.equal(a["codes"], b["codes"]) and not torch.equal(a["offset"], b["offset"])


# ---- flow ----------------------------------------------------------------------------------------

def test_flow_goes_from_noise_at_t0_to_data_at_t1():
    x, eps = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(comit_interpolate(x, eps, 0.0), eps)
    torch.testing.assert_close(comit_interpolate(x, eps, 1.0), x)
    torch.testing.assert_close(comit_velocity_target(x, eps), x - eps)

    m = small()
    target = torch.randn(2, 8, 8, 8)
    calls = []

    class PointMass(nn.Module):  # the exact COMiT velocity of a point mass: (x0 - x) / (1 - t)
        def forward(self, x, t, message, offset, **kw):
            calls.append((x.clone(), t.clone()))
            return {"velocity": (target - x) / (1 - t).view(-1, 1, 1, 1)}

    m.predictor = PointMass()
    m.predictor.parameters = lambda: iter([torch.zeros(1)])
    z = m.sample_latents(torch.zeros(2, 6, 6), torch.zeros(2, 2), steps=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, target)
    ts = [float(t[0]) for _, t in calls]
    assert ts == sorted(ts) and ts[0] == 0.0 and abs(ts[-1] - 0.75) < 1e-6
    torch.testing.assert_close(calls[0][0], torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_decode_is_deterministic_and_guidance_changes_it():
    m = small()
    tok = m.encode(images())
    a, b = m.decode(tok), m.decode(tok)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, m.decode(tok, seed=7))
    assert not torch.allclose(a, m.decode(tok, cfg=4.0), atol=1e-5)


# ---- sizes, checkpoints, training ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tokenizer/comit-b", "tokenizer/comit-l", "tokenizer/comit-xl"])
def test_paper_configs_match_param_counts(name):
    e = registry.entry(name)
    n = registry.info(name)["params"]  # the predictor (+ REPA projector); the SD VAE is buffers
    assert abs(n / e.paper_params - 1) <= 0.05, (name, n)


def test_save_load_round_trip_is_self_contained(tmp_path):
    torch.manual_seed(0)
    m = zoo.create("tokenizer/comit-tiny", dim=32, depth=2, heads=2, num_tokens=4, teacher="none",
                   sample_steps=2).eval()
    kl = zoo.create("tokenizer/kl-tiny:shapes")
    for k, v in kl.state_dict().items():  # the factory copied the shipped KL weights in
        assert torch.equal(m.vae.model.state_dict()[k], v)
    m.save_pretrained(tmp_path / "ck")
    back = load_pretrained(tmp_path / "ck").eval()
    assert back.config == m.config and back.num_params() == m.num_params()
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = images()
    t1, t2 = m.encode(x), back.encode(x)
    assert torch.equal(t1.data, t2.data)
    torch.testing.assert_close(m.decode(t1), back.decode(t2), rtol=0, atol=0)


def test_training_step_lowers_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = COMiT(**{**SMALL, "teacher": "eval/shapes-net:shapes", "teacher_dim": 16, "repr_layer": 0})
    m.teacher.set(FakeTeacher())
    m.train()
    x = images(4, seed=3)

    def loss():
        torch.manual_seed(123)
        return m(x)[1]

    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = loss()
    assert {"loss", "flow", "repa"} <= set(first) and torch.isfinite(first["loss"])
    first["loss"].backward()
    before = float(first["loss"].detach())
    opt.step()
    for _ in range(14):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
    opt.zero_grad()
    last = loss()
    assert float(last["loss"].detach()) < 0.9 * before
    last["loss"].backward()  # past the adaLN-Zero start, every path has gradient
    assert m.repa_proj[0].weight.grad.abs().sum() > 0
    assert m.predictor.blocks[0].attention.wqkv.weight.grad.abs().sum() > 0
    assert m.predictor.msg_out.weight.grad.abs().sum() > 0  # through the recurrent encoding steps


def test_sd_style_vae_path_with_pixel_crops():
    cfg = {"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    m = small(vae="diffusers:sd", vae_config=cfg, image_size=16, latent_scale=C.SD_SCALE, crop_space="pixel")
    assert m.latent_size == 8 and not list(m.vae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tok = m.encode(x)
    assert tok.data.shape == (2, 6)
    assert m.decode(tok).shape == (2, 3, 16, 16)
    assert m.crop_latents(x).shape == (2, 9, 4, 4, 4)


# ---- eval/comit_crops.py -------------------------------------------------------------------------

def test_crops_curve_report_and_cli(tmp_path):
    import json

    from eval.comit_crops import crops_curve, main

    m = small()
    x = images(3, seed=4)
    r = crops_curve(m, x, steps=1, batch_size=2, show=2)
    assert set(r["orders"]) == {"raster", "random", "adaptive"} and r["images"] == 3
    for rows in r["orders"].values():
        assert [e["crops"] for e in rows] == list(range(1, 10))
        assert all(torch.isfinite(torch.tensor(e["psnr"])) and 0 <= e["attributes"]["objects"] <= 1 for e in rows)
    assert len({e["psnr"] for e in r["orders"]["raster"]}) > 1  # the message after k crops matters
    assert r["examples"].shape == (6, 10, 3, 64, 64) and r["examples"].dtype == torch.uint8
    # the decode after k crops is the decode of a num_crops=k encoding
    enc = m.tokenize(x[:2], "raster", 3)
    g = torch.Generator().manual_seed(0 + 100_003)
    z = m.sample_latents(enc["codes"], enc["offset"], steps=1, generator=g)
    ref = ((m.decode_latents(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(r["examples"][:2, 3], ref)
    m.save_pretrained(tmp_path / "ck")
    assert main(["--tokenizer", str(tmp_path / "ck"), "--images", "2", "--steps", "1", "--orders", "raster",
                 "--no-attributes", "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert list(rep["orders"]) == ["raster"] and (tmp_path / "r.png").is_file()
    assert main(["--tokenizer", "tokenizer/vq-tiny:shapes", "--images", "1"]) == 2  # not a COMiT


def test_velocity_probe_compares_messages():
    from eval.comit_crops import velocity_probe

    m = small()
    x = images(4, seed=5)
    r = velocity_probe(m, x, (0.0, 0.5), seed=1)
    assert list(r) == ["0", "0.5"] and all(set(v) == {"own", "prior", "shuffled"} for v in r.values())
    assert r == velocity_probe(m, x, (0.0, 0.5), seed=1)  # seeded
    # the three rows use the same noise: only the message differs, so a predictor that ignores
    # the message gives three equal numbers
    for blk in m.predictor.blocks:
        torch.nn.init.zeros_(blk.adaln[1].weight)
    with torch.no_grad():
        m.predictor.msg_embed[-1].weight.zero_()
        m.predictor.msg_embed[-1].bias.zero_()
        m.predictor.msg_pos.zero_()
    v = velocity_probe(m, x, (0.3,), seed=1)["0.3"]
    assert v["own"] == pytest.approx(v["prior"]) and v["own"] == pytest.approx(v["shuffled"])
