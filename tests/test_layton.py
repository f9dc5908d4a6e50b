"""Layton (tokenizers_vis/layton.py): discrete token count, stage-A denoising loss, stage-B consistency
decoder (1-2 denoiser calls, gradient of the pixel loss through the sampler and the frozen KL decoder
to the encoder and codebook, frozen teacher), paper config on meta, checkpoints, eval/decoder_steps."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import zoo
from eval.decoder_steps import color_stats, compare, format_report, steps_table
from tokenizers_vis.layton import Layton
from zoo.data.shapes import ShapesDataset
from zoo.tokens import Tokens

# 32 px -> kl-tiny (random weights) 4x4x8 latent; 8 tokens, 64 codes
SMALL = dict(image_size=32, patch_size=8, num_tokens=8, enc_dim=32, enc_depth=1, enc_heads=2, codebook_size=64,
             code_dim=4, vae="tokenizer/kl-tiny", vae_config={"image_size": 32}, dec_dim=32, dec_depth=2,
             dec_heads=2, ffn_multiple=16, sample_steps=4, consistency_steps=2, cd_intervals=4)

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**kw) -> Layton:
    torch.manual_seed(0)
    m = Layton(**{**SMALL, **kw})
    # DiT init (zero output layer, zero adaLN gates) makes the tokens invisible to the output: open them,
    # as training does
    torch.nn.init.normal_(m.to_velocity.weight, std=0.05)
    for blk in m.decoder.layers:
        torch.nn.init.normal_(blk.adaln[1].weight, std=0.05)
        torch.nn.init.normal_(blk.adaln[1].bias, std=0.5)
    return m


def shapes(n=4, res=32):
    ds = ShapesDataset(resolution=res, num_objects=(1, 2), length=n)
    return torch.stack([ds[i]["image"] for i in range(n)])


def stage_b(a: Layton, **kw) -> Layton:
    """A stage-B model initialised from ``a`` (as --init does) with a frozen copy of ``a`` as teacher."""
    b = Layton(**{**a.config, "stage": "consistency", **kw})
    b.load_state_dict(a.state_dict())
    b.set_teacher(copy.deepcopy(a))
    return b


def count_velocity_calls(monkeypatch, m) -> list:
    calls = []
    orig = m.velocity
    monkeypatch.setattr(m, "velocity", lambda x, t, c: calls.append(x.shape[0]) or orig(x, t, c))
    return calls


def fitted(m: Layton, x) -> Layton:
    m.train()
    m.latents(x)  # the first training call fits the latent standardisation
    return m


def test_tokens_are_discrete_ids_of_the_declared_count():
    m = small().eval()
    x = shapes(3)
    tok = m.encode(x)
    assert m.spec.kind == "discrete" and m.spec.layout == "sequence" and m.spec.shape == (8,)
    assert m.spec.vocab_size == 64 and not m.spec.ordered
    assert tok.data.shape == (3, 8) and tok.data.dtype == torch.long
    assert 0 <= int(tok.data.min()) and int(tok.data.max()) < 64
    # the ids are the nearest l2-normalised codes of the projected query outputs
    z = F.normalize(m.to_code(m.encoder_forward(x)), dim=-1)
    assert torch.equal(tok.data, (z @ m.quantizer.codebook().t()).argmax(-1))
    y = m.decode(tok)
    assert y.shape == (3, 3, 32, 32) and y.abs().max() <= 1
    with pytest.raises(ValueError):
        m.decode(Tokens(torch.zeros(1, 7, dtype=torch.long), m.spec))
    tiny = zoo.registry.build_meta("tokenizer/layton-tiny")
    assert tiny.spec.shape == (32,) and tiny.spec.vocab_size == 1024
    assert (tiny.latent_size, tiny.latent_channels) == (8, 8)


def test_stage_a_loss_is_the_flow_denoising_loss():
    m = fitted(small(), shapes(4))
    x = shapes(4)
    x0 = m.latents(x)
    codes, _, _ = m.quantize(x)
    cond = m.condition(codes)
    noise, t = torch.randn_like(x0), torch.rand(4)
    # the loss is ||v(x_t, t) - (eps - x0)||^2 at x_t = (1 - t) x0 + t eps ...
    x_t = (1 - t.view(4, 1, 1, 1)) * x0 + t.view(4, 1, 1, 1) * noise
    want = (m.velocity(x_t, t, cond) - (noise - x0)).pow(2).mean()
    torch.testing.assert_close(m.flow_loss(x0, cond, noise, t), want)
    # ... so the true conditional velocity is its minimiser (loss 0)
    m.velocity = lambda x_t_, t_, c_: noise - x0
    assert float(m.flow_loss(x0, cond, noise, t)) == 0.0


def test_stage_a_training_lowers_the_denoising_loss_on_a_fixed_batch():
    m = fitted(small(), shapes(8))
    x = shapes(8)
    g = torch.Generator().manual_seed(1)
    x0 = m.latents(x)
    probes = [(torch.randn(x0.shape, generator=g), torch.rand(8, generator=g)) for _ in range(4)]

    def probe_loss():
        with torch.no_grad():
            cond = m.condition(m.quantize(x)[0])
            return sum(float(m.flow_loss(x0, cond, n, t)) for n, t in probes) / len(probes)

    before = probe_loss()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(40):
        torch.manual_seed(step)
        recon, losses = m(x)
        assert set(losses) >= {"loss", "flow", "vq", "usage"}
        assert recon.shape == x.shape and not recon.requires_grad  # stage A trains no pixel path
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert probe_loss() < 0.85 * before  # measured: 0.77
    m.train_recon = False
    assert m(x)[0] is None


def test_stage_a_decodes_with_many_steps_stage_b_with_one_or_two(monkeypatch):
    a = small().eval()
    x = shapes(2)
    tok = a.encode(x)
    calls = count_velocity_calls(monkeypatch, a)
    a.decode(tok)
    assert len(calls) == a.sample_steps == 4  # Euler steps of the flow ODE
    for steps in (1, 2):
        b = stage_b(a, consistency_steps=steps).eval()
        calls = count_velocity_calls(monkeypatch, b)
        y = b.decode(tok)
        assert len(calls) == steps and y.shape == (2, 3, 32, 32)
        torch.testing.assert_close(y, b.decode(tok), rtol=0, atol=0)  # seeded: a function of the tokens
    calls.clear()
    b.decode(tok, steps=3)
    assert len(calls) == 3  # an explicit count overrides the default
    # the pixel loss runs the same few-step sampler: k steps -> k denoiser calls
    cond = b.condition(b.quantize(x)[0])
    for k in (1, 2):
        calls.clear()
        b.pixel_loss(x, cond, steps=k)
        assert len(calls) == k
    assert sorted(set(b.pixel_steps)) == [1, 2]


def test_consistency_function_boundary_and_cd_target_at_the_data_end():
    a = fitted(small(), shapes(4)).eval()
    b = stage_b(a).eval()
    for w in (b.teacher_model.to_velocity.weight, b.teacher_model.to_code.weight):  # teacher != student
        torch.nn.init.normal_(w, std=0.1)
    x = shapes(4)
    x0 = b.latents(x)
    cond = b.condition(b.quantize(x)[0])
    z = torch.randn_like(x0)
    torch.testing.assert_close(b.consistency_function(z, torch.zeros(4), cond), z, rtol=0, atol=0)  # f(x, 0) = x
    # n = 1: t_{n-1} = 0, so the target is the teacher's one Euler step to t = 0, i.e. its data estimate
    noise = torch.randn_like(x0)
    n = torch.ones(4, dtype=torch.long)
    t_hi = torch.full((4,), 1 / b.cd_intervals)
    x_hi = (1 - t_hi.view(4, 1, 1, 1)) * x0 + t_hi.view(4, 1, 1, 1) * noise
    teacher = b.teacher_model
    with torch.no_grad():
        target = teacher.consistency_function(x_hi, t_hi, teacher.condition(teacher.quantize(x)[0]))
        want = b.cd_intervals * F.mse_loss(b.consistency_function(x_hi, t_hi, cond), target)  # lambda = 1/dt
        torch.testing.assert_close(b.consistency_loss(x, x0, cond, noise, n), want)


def test_stage_b_pixel_loss_reaches_encoder_and_codebook_through_sampler_and_frozen_kl(monkeypatch):
    a = fitted(small(), shapes(4))
    b = stage_b(a).train()
    x = shapes(4)
    # the KL autoencoder is frozen: no parameters at all (its weights are buffers), nothing requires grad
    assert list(b.vae.parameters()) == [] and all(not t.requires_grad for t in b.vae.buffers())
    assert all(not n.startswith("vae.") for n, _ in b.named_parameters())
    seen = {}
    orig_decode, orig_f = b.vae.decode, b.consistency_function
    outputs = []

    def decode(z):
        z.register_hook(lambda g: seen.setdefault("kl_input_grad", g))
        return orig_decode(z)

    def f(x_t, t, c):
        out = orig_f(x_t, t, c)
        out.retain_grad()
        outputs.append(out)
        return out

    monkeypatch.setattr(b.vae, "decode", decode)
    monkeypatch.setattr(b, "consistency_function", f)
    codes, _, _ = b.quantize(x)
    pix, recon = b.pixel_loss(x, b.condition(codes), steps=2)
    assert recon.requires_grad and pix.requires_grad
    b.zero_grad(set_to_none=True)
    pix.backward()
    assert seen["kl_input_grad"].abs().sum() > 0          # the gradient flowed back out of the KL decoder
    assert len(outputs) == 2 and all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)  # both steps
    for name in ("patch_embed.weight", "queries", "to_code.weight", "quantizer.embedding.weight",
                 "decoder.layers.0.attention.wqkv.weight", "to_velocity.weight"):
        p = dict(b.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(t.grad is None for t in b.vae.buffers())   # ... and updated none of its weights

    # controls: the pixel loss has no other path to the encoder than through the KL decoder ...
    monkeypatch.setattr(b.vae, "decode", lambda z: orig_decode(z.detach()))
    pix, _ = b.pixel_loss(x, b.condition(b.quantize(x)[0]), steps=2)
    assert not pix.requires_grad
    # ... and without st_codebook_grad the codebook gets none of it (plain straight-through estimator)
    monkeypatch.setattr(b.vae, "decode", orig_decode)
    b.st_codebook_grad = False
    b.zero_grad(set_to_none=True)
    b.pixel_loss(x, b.condition(b.quantize(x)[0]), steps=1)[0].backward()
    assert b.quantizer.embedding.weight.grad is None and b.patch_embed.weight.grad.abs().sum() > 0


def test_teacher_is_frozen_outside_the_state_and_loaded_lazily(tmp_path):
    a = fitted(small(), shapes(4))
    b = stage_b(a).train()
    teacher = b.teacher_model
    assert teacher is not a and teacher.stage == "diffusion"
    own = {id(p) for p in b.parameters()}
    assert all(id(p) not in own and not p.requires_grad for p in teacher.parameters())
    assert set(b.state_dict()) == set(a.state_dict())  # no teacher tensors in the checkpoint
    before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(b.state_dict())
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    recon, losses = b(shapes(4))
    assert recon.requires_grad and {"consistency", "pixel", "vq"} <= set(losses)
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in b.state_dict().items())
    # wrong teachers are refused; a missing one names the flag
    with pytest.raises(ValueError, match="stage-A"):
        b.set_teacher(b)
    with pytest.raises(ValueError, match="--set teacher"):
        Layton(**{**SMALL, "stage": "consistency"}).teacher_model
    c = Layton(**{**SMALL, "stage": "consistency"})
    c.set_teacher(copy.deepcopy(a))
    with pytest.raises(ValueError, match="standardises"):
        c.train()(shapes(4))  # not initialised from the teacher: another latent standardisation
    # teacher=<stage-A checkpoint folder>: built on first use from the file
    a.save_pretrained(tmp_path / "a")
    d = Layton(**{**a.config, "stage": "consistency", "teacher": str(tmp_path / "a")})
    loaded = d.teacher_model
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert all(not p.requires_grad for p in loaded.parameters())


def test_paper_config_builds_on_meta():
    m = zoo.registry.build_meta("tokenizer/layton")
    assert isinstance(m, Layton) and m.device.type == "meta"
    assert m.image_size == 1024 and m.num_tokens == 256 and m.spec.shape == (256,)
    assert m.vae.spec == "diffusers:sd" and (m.latent_size, m.latent_channels) == (128, 4)
    assert m.latent_grid == 64 and m.stage == "diffusion" and m.consistency_steps in (1, 2)
    assert zoo.registry.info("tokenizer/layton")["spec"] == "discrete/sequence 256 V=16384"
    b = zoo.registry.build_meta("tokenizer/layton", stage="consistency")
    assert b.stage == "consistency" and b.consistency_steps == 2


def test_checkpoint_round_trip_is_self_contained(tmp_path):
    m = zoo.create("tokenizer/layton-tiny")
    x = shapes(2, res=64)
    fitted(m, x).eval()
    kl = zoo.create("tokenizer/kl-tiny:shapes").state_dict()
    assert all(torch.equal(v, kl[k]) for k, v in m.vae.model.state_dict().items())  # shipped KL copied in
    torch.nn.init.normal_(m.to_velocity.weight, std=0.05)
    m.save_pretrained(tmp_path / "l")
    back = zoo.load_pretrained(tmp_path / "l").eval()
    assert type(back) is Layton and back.config == m.config and back.registry_name == "tokenizer/layton-tiny"
    sd = back.state_dict()
    assert any(k.startswith("vae.model.decoder.") for k in sd) and bool(back.latent_norm.fitted)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    tok = m.encode(x)
    assert back.encode(x) == tok
    torch.testing.assert_close(back.decode(tok), m.decode(tok), rtol=0, atol=0)
    torch.testing.assert_close(back.decode(tok, steps=2), m.decode(tok, steps=2), rtol=0, atol=0)


def test_color_stats_definition():
    orig = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    rec = orig.clone()
    rec[0, 0] += 10
    rec[1, 0] -= 10    # opposite casts cancel in the signed shift, not in the absolute one
    rec[:, 2] -= 6
    s = color_stats(orig, rec)
    assert s["color_shift"] == [0.0, 0.0, -6.0] and s["brightness_shift"] == -2.0
    assert abs(s["color_shift_abs"] - (10 + 6) / 3) < 1e-9


def test_decoder_steps_table_side_by_side(tmp_path):
    a = fitted(small(), shapes(4)).eval()
    b = stage_b(a).eval()
    x = shapes(4)
    r = compare({"diffusion": a, "consistency": b}, x, steps=(1, 2, 4), batch_size=3)
    assert r["steps"] == [1, 2, 4] and set(r["tokenizers"]) == {"diffusion", "consistency"}
    for table in r["tokenizers"].values():
        assert [row["steps"] for row in table["rows"]] == [1, 2, 4]
        for row in table["rows"]:
            assert torch.isfinite(torch.tensor(row["psnr"])) and len(row["color_shift"]) == 3
            assert row["attributes"]["objects"] is not None
    # the 4-step row of the stage-A model is decode() with its default steps (same seeded noise)
    gen = torch.Generator().manual_seed(0)
    y = ((a.decode(a.encode(x[:3]), generator=gen).clamp(-1, 1) + 1) * 127.5).round()
    x8 = ((x[:3] + 1) * 127.5).round()
    t1 = steps_table(a, x[:3], steps=(4,), attributes=False)
    want = float((10 * torch.log10(1 / ((y - x8) / 255).double().pow(2).flatten(1).mean(1))).mean())
    assert abs(t1["rows"][0]["psnr"] - want) < 1e-6
    assert "consistency" in format_report(r)
    # the CLI on checkpoint folders
    from eval import decoder_steps

    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    out = tmp_path / "r.json"
    rc = decoder_steps.main(["--tokenizer", f"A={tmp_path / 'a'}", "--tokenizer", f"B={tmp_path / 'b'}",
                             "--steps", "1,2", "--images", "3", "--num-objects", "1-2", "--json", str(out),
                             "--png", str(tmp_path / "r.png"), "--show", "2"])
    rep = json.loads(out.read_text())
    assert rc == 0 and set(rep["tokenizers"]) == {"A", "B"} and (tmp_path / "r.png").is_file()
