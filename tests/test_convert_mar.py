"""zoo.convert.mar: LTH14/mar's KL-16 VAE and MAR generators -> arzoo.

The reference layouts are written out here from the published code (LTH14/mar
``models/vae.py``, ``models/mar.py``, ``models/diffloss.py``, ``util/misc.py``) with random
values; the numerical tests recompute the reference forward passes from those state dicts with
plain tensor ops (LDM ResnetBlock / AttnBlock, timm ViT Block, MAR's encoder/decoder with its
64-slot class buffer, SimpleMLPAdaLN) and compare with the converted arzoo models.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from generators import SamplingConfig
from generators.base import Condition
from zoo import convert
from zoo.checkpoint import load_pretrained, load_state_strict
from zoo.cli import main as arzoo
from zoo.convert import mar as cm
from zoo.registry import register, unregister
from zoo.tokens import TokenSpec

# ---- reference layouts ----------------------------------------------------------------------


def _rand(*shape, std=0.1):
    return torch.randn(*shape) * std


def _norm(c):
    return {"weight": 1 + _rand(c), "bias": _rand(c)}


def _conv(cout, cin, k):
    return {"weight": _rand(cout, cin, k, k, std=1.0 / math.sqrt(cin * k * k)), "bias": _rand(cout)}


def _put(sd, prefix, parts):
    for k, v in parts.items():
        sd[f"{prefix}.{k}"] = v


def _ref_resblock(sd, p, cin, cout):
    _put(sd, f"{p}.norm1", _norm(cin))
    _put(sd, f"{p}.conv1", _conv(cout, cin, 3))
    _put(sd, f"{p}.norm2", _norm(cout))
    _put(sd, f"{p}.conv2", _conv(cout, cout, 3))
    if cin != cout:
        _put(sd, f"{p}.nin_shortcut", _conv(cout, cin, 1))


def _ref_attn(sd, p, c):
    _put(sd, f"{p}.norm", _norm(c))
    for n in ("q", "k", "v", "proj_out"):
        _put(sd, f"{p}.{n}", _conv(c, c, 1))


def ref_kl_state(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16, extras=True):
    """``AutoencoderKL(embed_dim, ch_mult)`` keys: the encoder has attention at the lowest
    resolution (attn_resolutions=(16,) at 256 px), the decoder only in its mid block."""
    sd, n = {}, len(ch_mult)
    in_mult = (1, *ch_mult)
    _put(sd, "encoder.conv_in", _conv(ch, 3, 3))
    for i in range(n):
        cin, cout = ch * in_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            _ref_resblock(sd, f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
            if i == n - 1:
                _ref_attn(sd, f"encoder.down.{i}.attn.{j}", cout)
        if i != n - 1:
            _put(sd, f"encoder.down.{i}.downsample.conv", _conv(cout, cout, 3))
    c = ch * ch_mult[-1]
    for part in ("encoder", "decoder"):
        _ref_resblock(sd, f"{part}.mid.block_1", c, c)
        _ref_attn(sd, f"{part}.mid.attn_1", c)
        _ref_resblock(sd, f"{part}.mid.block_2", c, c)
    _put(sd, "encoder.norm_out", _norm(c))
    _put(sd, "encoder.conv_out", _conv(2 * embed_dim, c, 3))
    _put(sd, "quant_conv", _conv(2 * embed_dim, 2 * embed_dim, 1))
    _put(sd, "post_quant_conv", _conv(embed_dim, embed_dim, 1))
    _put(sd, "decoder.conv_in", _conv(c, embed_dim, 3))
    cin = c
    for i in reversed(range(n)):
        cout = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            _ref_resblock(sd, f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            _put(sd, f"decoder.up.{i}.upsample.conv", _conv(cout, cout, 3))
    _put(sd, "decoder.norm_out", _norm(cin))
    _put(sd, "decoder.conv_out", _conv(3, cin, 3))
    if extras:  # LDM-style loss tensors: must be dropped
        sd["loss.logvar"] = torch.zeros(())
        sd["loss.discriminator.main.0.weight"] = _rand(8, 3, 4, 4)
    return sd


def _lin(cout, cin):
    return {"weight": _rand(cout, cin, std=1.0 / math.sqrt(cin)), "bias": _rand(cout)}


def _ref_vit_block(sd, p, d):
    _put(sd, f"{p}.norm1", _norm(d))
    _put(sd, f"{p}.attn.qkv", _lin(3 * d, d))
    _put(sd, f"{p}.attn.proj", _lin(d, d))
    _put(sd, f"{p}.norm2", _norm(d))
    _put(sd, f"{p}.mlp.fc1", _lin(4 * d, d))
    _put(sd, f"{p}.mlp.fc2", _lin(d, 4 * d))


def ref_mar_state(dim=768, depth=12, token_dim=16, seq_len=256, buffer_size=64, num_classes=1000,
                  width=1024, head_depth=6):
    """``MAR`` (``mar_base`` etc., encoder = decoder width/depth) + ``DiffLoss`` keys."""
    sd = {"class_emb.weight": _rand(num_classes, dim, std=0.5), "fake_latent": _rand(1, dim, std=0.5)}
    _put(sd, "z_proj", _lin(dim, token_dim))
    _put(sd, "z_proj_ln", _norm(dim))
    sd["encoder_pos_embed_learned"] = _rand(1, seq_len + buffer_size, dim)
    for i in range(depth):
        _ref_vit_block(sd, f"encoder_blocks.{i}", dim)
    _put(sd, "encoder_norm", _norm(dim))
    _put(sd, "decoder_embed", _lin(dim, dim))
    sd["mask_token"] = _rand(1, 1, dim)
    sd["decoder_pos_embed_learned"] = _rand(1, seq_len + buffer_size, dim)
    for i in range(depth):
        _ref_vit_block(sd, f"decoder_blocks.{i}", dim)
    _put(sd, "decoder_norm", _norm(dim))
    sd["diffusion_pos_embed_learned"] = _rand(1, seq_len, dim)
    n = "diffloss.net"
    _put(sd, f"{n}.time_embed.mlp.0", _lin(width, 256))
    _put(sd, f"{n}.time_embed.mlp.2", _lin(width, width))
    _put(sd, f"{n}.cond_embed", _lin(width, dim))
    _put(sd, f"{n}.input_proj", _lin(width, token_dim))
    for i in range(head_depth):
        _put(sd, f"{n}.res_blocks.{i}.in_ln", _norm(width))
        _put(sd, f"{n}.res_blocks.{i}.mlp.0", _lin(width, width))
        _put(sd, f"{n}.res_blocks.{i}.mlp.2", _lin(width, width))
        _put(sd, f"{n}.res_blocks.{i}.adaLN_modulation.1", _lin(3 * width, width))
    _put(sd, f"{n}.final_layer.linear", _lin(2 * token_dim, width))
    _put(sd, f"{n}.final_layer.adaLN_modulation.1", _lin(2 * width, width))
    return sd


# ---- reduced configs of the same layouts ----------------------------------------------------

KL_SMALL = dict(image_size=32, ch=32, ch_mult=[1, 2], num_res_blocks=1)  # 16 latent channels, f2
MAR_SMALL = dict(dim=64, depth=2, heads=4, head_width=48, head_depth=2, num_classes=10, buffer_size=8,
                 num_iter=4, spec=TokenSpec("continuous", "grid", (4, 4), dim=16))
MAR_REF_SMALL = dict(dim=64, depth=2, token_dim=16, seq_len=16, buffer_size=8, num_classes=10, width=48,
                     head_depth=2)


@pytest.fixture
def small_names():
    """Reduced-config registry names, so the file-level path (zoo.convert.convert) runs fast."""

    @register("tokenizer/kl-convtest")
    def _kl(**o):
        return zoo.create("tokenizer/kl-16", **{**KL_SMALL, **o})

    @register("generator/mar-convtest")
    def _mar(**o):
        return zoo.create("generator/mar-b", **{**MAR_SMALL, **o})

    yield "tokenizer/kl-convtest", "generator/mar-convtest"
    unregister("tokenizer/kl-convtest")
    unregister("generator/mar-convtest")


# ---- independent reference forward passes ---------------------------------------------------

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-6)


def _cv(sd, p, x, stride=1, padding=None):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd[f"{p}.bias"], stride, w.shape[-1] // 2 if padding is None else padding)


def _res_fwd(sd, p, x):
    h = _cv(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x)))
    h = _cv(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h)))
    if f"{p}.nin_shortcut.weight" in sd:
        x = _cv(sd, f"{p}.nin_shortcut", x)
    return x + h


def _attn_fwd(sd, p, x):
    B, C, H, W = x.shape
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_cv(sd, f"{p}.{n}", h).flatten(2) for n in "qkv")  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), -1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + _cv(sd, f"{p}.proj_out", out)


def ref_kl_encode_mean(sd, x, n, nrb):
    h = _cv(sd, "encoder.conv_in", x)
    for i in range(n):
        for j in range(nrb):
            h = _res_fwd(sd, f"encoder.down.{i}.block.{j}", h)
            if i == n - 1:
                h = _attn_fwd(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != n - 1:
            h = _cv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _res_fwd(sd, "encoder.mid.block_2",
                 _attn_fwd(sd, "encoder.mid.attn_1", _res_fwd(sd, "encoder.mid.block_1", h)))
    h = _cv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)))
    return _cv(sd, "quant_conv", h).chunk(2, 1)[0]


def ref_kl_decode(sd, z, n, nrb):
    h = _cv(sd, "decoder.conv_in", _cv(sd, "post_quant_conv", z))
    h = _res_fwd(sd, "decoder.mid.block_2",
                 _attn_fwd(sd, "decoder.mid.attn_1", _res_fwd(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            h = _res_fwd(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _cv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _cv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)))


def _ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-6)


def _li(sd, p, x):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _vit_fwd(sd, p, x, heads):
    B, N, D = x.shape
    qkv = _li(sd, f"{p}.attn.qkv", _ln(sd, f"{p}.norm1", x)).reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
    x = x + _li(sd, f"{p}.attn.proj", a.transpose(1, 2).reshape(B, N, D))
    return x + _li(sd, f"{p}.mlp.fc2", F.gelu(_li(sd, f"{p}.mlp.fc1", _ln(sd, f"{p}.norm2", x))))


def ref_mar_z(sd, tokens, labels, mask, buffer_size, depth, heads):
    """MAR forward_mae_encoder + forward_mae_decoder (eval): z (B, L, Dd)."""
    B, L, _ = tokens.shape
    cls = sd["class_emb.weight"][labels] if labels is not None else sd["fake_latent"].expand(B, -1)
    x = _li(sd, "z_proj", tokens)
    x = torch.cat((cls[:, None].expand(B, buffer_size, -1), x), 1) + sd["encoder_pos_embed_learned"]
    x = _ln(sd, "z_proj_ln", x)
    keep = torch.cat((torch.ones(B, buffer_size, dtype=torch.bool), ~mask), 1)
    x = x[keep].reshape(B, -1, x.shape[-1])
    for i in range(depth):
        x = _vit_fwd(sd, f"encoder_blocks.{i}", x, heads)
    x = _li(sd, "decoder_embed", _ln(sd, "encoder_norm", x))
    full = sd["mask_token"].repeat(B, buffer_size + L, 1)
    full[keep] = x.reshape(-1, x.shape[-1])
    x = full + sd["decoder_pos_embed_learned"]
    for i in range(depth):
        x = _vit_fwd(sd, f"decoder_blocks.{i}", x, heads)
    return _ln(sd, "decoder_norm", x)[:, buffer_size:] + sd["diffusion_pos_embed_learned"]


def ref_mlp_adaln(sd, x, t, c, head_depth):
    """DiffLoss SimpleMLPAdaLN.forward."""
    n = "diffloss.net"
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    tf = torch.cat((torch.cos(args), torch.sin(args)), -1)
    y = _li(sd, f"{n}.time_embed.mlp.2", F.silu(_li(sd, f"{n}.time_embed.mlp.0", tf))) + _li(sd, f"{n}.cond_embed", c)
    h = _li(sd, f"{n}.input_proj", x)
    for i in range(head_depth):
        p = f"{n}.res_blocks.{i}"
        shift, scale, gate = _li(sd, f"{p}.adaLN_modulation.1", F.silu(y)).chunk(3, -1)
        u = _ln(sd, f"{p}.in_ln", h) * (1 + scale) + shift
        h = h + gate * _li(sd, f"{p}.mlp.2", F.silu(_li(sd, f"{p}.mlp.0", u)))
    shift, scale = _li(sd, f"{n}.final_layer.adaLN_modulation.1", F.silu(y)).chunk(2, -1)
    u = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
    return _li(sd, f"{n}.final_layer.linear", u)


# ---- KL-16 ----------------------------------------------------------------------------------

def test_kl_every_tensor_lands_and_matches_reference():
    torch.manual_seed(0)
    sd = ref_kl_state(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    tok = zoo.create("tokenizer/kl-16", **KL_SMALL).eval()
    state = cm.mar_kl({"model": sd}, tok)  # the file wraps the weights in "model"
    n_ref = sum(v.numel() for k, v in sd.items() if not k.startswith("loss."))
    assert sum(v.numel() for v in state.values()) == n_ref == tok.num_params()
    load_state_strict(tok, state, "test")
    # every reference tensor landed unchanged (1x1 attention convs squeezed to linears)
    own = tok.state_dict()
    for k, v in sd.items():
        if k.startswith("loss."):
            continue
        name, _ = cm.kl_key(k, 2)
        assert torch.equal(own[name].reshape(v.shape), v), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ref_kl_encode_mean(sd, x, 2, 1)
        toks = tok.encode(x)
        torch.testing.assert_close(toks.data.movedim(-1, 1), mean * 0.2325, atol=1e-5, rtol=1e-4)
        # MAR decodes sampled tokens / 0.2325; arzoo's decode unscales itself
        torch.testing.assert_close(tok.decode(toks), ref_kl_decode(sd, mean, 2, 1), atol=1e-4, rtol=1e-4)


def test_kl_decoder_levels_are_reversed():
    assert cm.kl_key("decoder.up.0.block.2.conv1.weight", 5) == ("decoder.up_blocks.4.resnets.2.conv1.weight", False)
    assert cm.kl_key("decoder.up.4.upsample.conv.bias", 5) == ("decoder.up_blocks.0.upsamplers.0.conv.bias", False)
    assert cm.kl_key("encoder.down.4.attn.1.proj_out.weight", 5) == \
        ("encoder.down_blocks.4.attentions.1.to_out.0.weight", True)
    assert cm.kl_key("encoder.mid.block_2.nin_shortcut.bias", 5) == \
        ("encoder.mid_block.resnets.1.conv_shortcut.bias", False)
    assert cm.kl_key("quant_conv.weight", 5) == ("quantizer.quant_conv.weight", False)


def test_kl_unknown_tensor_is_an_error():
    sd = ref_kl_state(ch=32, ch_mult=(1, 2), num_res_blocks=1, extras=False)
    sd["encoder.something_new.weight"] = torch.zeros(1)
    tok = zoo.create("tokenizer/kl-16", **KL_SMALL)
    with pytest.raises(ValueError, match="no arzoo counterpart.*something_new"):
        cm.mar_kl(sd, tok)


# ---- MAR ------------------------------------------------------------------------------------

def _mar_small(**kw):
    return zoo.create("generator/mar-b", **{**MAR_SMALL, "cfg_last_step": "mar", **kw}).eval()


def test_mar_every_tensor_lands_and_trunk_matches_reference():
    torch.manual_seed(0)
    sd = ref_mar_state(**MAR_REF_SMALL)
    gen = _mar_small()
    state = cm.mar_generator({"model": sd, "model_ema": sd}, gen)
    load_state_strict(gen, state, "test")
    own = gen.state_dict()
    for k, v in sd.items():
        if k not in ("class_emb.weight", "fake_latent"):
            assert torch.equal(own[cm.mar_key(k)], v), k
    # the fake latent is the null class: the last row of the class table
    table = own["cond_encoder.classes.table.weight"]
    assert torch.equal(table[:10], sd["class_emb.weight"]) and torch.equal(table[10], sd["fake_latent"][0])
    ref_params = sum(v.numel() for v in sd.values())
    assert gen.num_params() == ref_params  # target_absmax is a buffer

    B, L = 3, 16
    tokens = torch.randn(B, L, 16)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(L)[:11]] = True
    labels = torch.tensor([0, 7, 9])
    with torch.no_grad():
        for lab in (labels, None):  # class conditioning and the null class (CFG branch)
            cond = Condition(labels=lab) if lab is not None else Condition(batch=B)
            buf = gen.buffer(cond, B) if lab is not None else gen.null_buffer(B)
            z = gen.backbone(gen.embed(tokens), buf, mask)
            torch.testing.assert_close(z, ref_mar_z(sd, tokens, lab, mask, 8, 2, 4), atol=1e-5, rtol=1e-4)
        # the diffusion MLP
        x, t, c = torch.randn(20, 16), torch.randint(0, 1000, (20,)), torch.randn(20, 64)
        torch.testing.assert_close(gen.head.net(x, t, c), ref_mlp_adaln(sd, x, t, c, 2), atol=1e-5, rtol=1e-4)


def test_mar_ema_is_the_default_and_raw_is_an_option(tmp_path, small_names):
    torch.manual_seed(0)
    _, name = small_names
    raw, ema = ref_mar_state(**MAR_REF_SMALL), ref_mar_state(**MAR_REF_SMALL)
    # util/misc.py save_model: model, model_ema, optimizer, epoch, scaler, args (a Namespace)
    ckpt = {"model": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "epoch": 399, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mar_base", cfg=2.9)}
    src = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, src)
    assert arzoo(["convert", "--from", "mar", str(src), "--model", name, "--out", str(tmp_path / "out")]) == 0
    g_raw = cm.convert_mar(src, name, ema=False)
    assert torch.equal(g_raw.state_dict()["backbone.enc_pos"], raw["encoder_pos_embed_learned"])
    back = load_pretrained(tmp_path / "out")  # an ordinary arzoo checkpoint, EMA weights
    assert back.cfg_last_step == "mar"
    assert torch.equal(back.state_dict()["backbone.enc_pos"], ema["encoder_pos_embed_learned"])
    assert torch.equal(back.state_dict()["embed.embed.weight"], ema["z_proj.weight"])
    # a flat state dict (the Hugging Face safetensors re-upload)
    from safetensors.torch import save_file
    save_file(ema, str(tmp_path / "mar.safetensors"))
    g2 = convert.convert("mar", tmp_path / "mar.safetensors", name)
    assert torch.equal(g2.state_dict()["backbone.head_pos"], ema["diffusion_pos_embed_learned"])
    with pytest.raises(ValueError, match="no 'model_ema'"):
        cm.select_weights({"model": raw, "model_ema": None})


def test_kl_file_convert_and_generation_runs(tmp_path, small_names):
    torch.manual_seed(0)
    kl_name, mar_name = small_names
    torch.save({"model": ref_kl_state(ch=32, ch_mult=(1, 2), num_res_blocks=1)}, tmp_path / "kl16.ckpt")
    tok = convert.convert("mar", tmp_path / "kl16.ckpt", kl_name, tmp_path / "kl")
    assert (tmp_path / "kl" / "model.safetensors").is_file()
    torch.save({"model": ref_mar_state(**MAR_REF_SMALL)}, tmp_path / "m.pth")
    gen = cm.convert_mar(tmp_path / "m.pth", mar_name, ema=False)
    s = SamplingConfig(cfg=2.0, cfg_schedule="linear", extra={"num_iter": 2, "head_steps": 3})
    out = gen.generate(Condition(labels=torch.tensor([1, 2])), s, torch.Generator().manual_seed(0))
    assert out.data.shape == (2, 4, 4, 16) and torch.isfinite(out.data).all()
    img = tok.decode(tok.encode(torch.zeros(1, 3, 32, 32)))
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_cfg_last_step_option():
    """MAR's linear CFG at the last step uses mask_len = 1, i.e. 1 + (cfg - 1)(N - 1)/N."""
    seen = {}
    for mode in ("full", "mar"):
        gen = _mar_small(cfg_last_step=mode)
        scales = []
        orig = gen._sample_head

        def spy(z, zu, cfg, sampling, generator, head_steps, _o=orig, _s=scales):
            _s.append(cfg)
            return _o(z, zu, cfg, sampling, generator, head_steps)

        gen._sample_head = spy
        s = SamplingConfig(cfg=3.0, cfg_schedule="linear", extra={"num_iter": 4, "head_steps": 2})
        gen.generate(Condition(labels=torch.tensor([1])), s, torch.Generator().manual_seed(0))
        seen[mode] = scales
    assert seen["full"][:-1] == seen["mar"][:-1]
    assert seen["full"][-1] == 3.0
    assert seen["mar"][-1] == pytest.approx(1 + 2.0 * 15 / 16)
    with pytest.raises(ValueError, match="cfg_last_step"):
        _mar_small(cfg_last_step="nope")


def test_mar_refuses_text_models_and_unknown_tensors():
    sd = ref_mar_state(**MAR_REF_SMALL)
    with pytest.raises(ValueError, match="class-conditional"):
        cm.convert_mar_state(sd, zoo.create("generator/mar-tiny"))
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no arzoo counterpart.*extra.weight"):
        cm.convert_mar_state(sd, _mar_small())


# ---- full size --------------------------------------------------------------------------------

@pytest.mark.slow
def test_paper_size_kl16_and_mar_b_every_tensor_lands():
    torch.manual_seed(0)
    sd = ref_kl_state()
    tok = zoo.create("tokenizer/kl-16")
    state = cm.mar_kl({"model": sd}, tok)
    load_state_strict(tok, state, "kl16")
    assert tok.num_params() == 66_456_019 == sum(v.numel() for k, v in sd.items() if not k.startswith("loss."))
    del sd, state, tok
    sd = ref_mar_state()
    gen = zoo.create("generator/mar-b", **convert.find("mar", "generator/mar-b").overrides)
    load_state_strict(gen, cm.mar_generator({"model_ema": sd, "model": {}}, gen), "mar-b")
    assert gen.num_params() == sum(v.numel() for v in sd.values())
    assert gen.cfg_last_step == "mar"
