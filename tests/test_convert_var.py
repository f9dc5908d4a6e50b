"""zoo.convert.var: VAR's released VQVAE / transformer checkpoints -> tokenizer/msvq-*, generator/var-*.

The reference layouts below are written out from FoundationVision/VAR (``models/basic_vae.py``
Encoder/Decoder/ResnetBlock/AttnBlock, ``models/quant.py`` VectorQuantizer2 + PhiPartiallyShared,
``models/vqvae.py`` VQVAE, ``models/var.py`` VAR, ``models/basic_var.py`` AdaLNSelfAttn /
SelfAttention / FFN / AdaLNBeforeHead); the reference computations (VAR's multi-scale
quantization, its attention/ResNet blocks, the whole VAR forward) are re-implemented here in
plain torch, independently of arzoo's modules.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from generators.base import Condition, SamplingConfig
from tokenizers_vis.quantizers.multiscale import phi_index
from zoo import convert
from zoo.checkpoint import load_state_strict
from zoo.cli import main as arzoo
from zoo.tokens import Tokens

# ---- reference layouts (key -> shape), from VAR's code --------------------------------------


def _resnet(p, cin, cout):
    d = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
         f"{p}.conv1.bias": (cout,), f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
         f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)}
    if cin != cout:
        d.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})
    return d


def _attn(p, c):
    return {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.qkv.weight": (3 * c, c, 1, 1),
            f"{p}.qkv.bias": (3 * c,), f"{p}.proj_out.weight": (c, c, 1, 1), f"{p}.proj_out.bias": (c,)}


def vqvae_layout(ch, ch_mult, num_res_blocks, z, cdim, vocab, num_scales, using_sa=True, using_mid_sa=True,
                 qk=3, nphi=4):
    """VAR ``VQVAE.state_dict()`` names and shapes (basic_vae.Encoder/Decoder + quant.VectorQuantizer2)."""
    n, d = len(ch_mult), {}
    d.update({"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)})
    in_mult = (1,) + tuple(ch_mult)
    for i in range(n):
        bin_, bout = ch * in_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            d.update(_resnet(f"encoder.down.{i}.block.{j}", bin_, bout))
            bin_ = bout
            if i == n - 1 and using_sa:
                d.update(_attn(f"encoder.down.{i}.attn.{j}", bin_))
        if i != n - 1:
            d.update({f"encoder.down.{i}.downsample.conv.weight": (bin_, bin_, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (bin_,)})
    for part, c in (("encoder", bin_), ("decoder", ch * ch_mult[-1])):
        d.update(_resnet(f"{part}.mid.block_1", c, c))
        if using_mid_sa:
            d.update(_attn(f"{part}.mid.attn_1", c))
        d.update(_resnet(f"{part}.mid.block_2", c, c))
    d.update({"encoder.norm_out.weight": (bin_,), "encoder.norm_out.bias": (bin_,),
              "encoder.conv_out.weight": (z, bin_, 3, 3), "encoder.conv_out.bias": (z,)})
    bin_ = ch * ch_mult[-1]
    d.update({"decoder.conv_in.weight": (bin_, z, 3, 3), "decoder.conv_in.bias": (bin_,)})
    for i in reversed(range(n)):
        bout = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            d.update(_resnet(f"decoder.up.{i}.block.{j}", bin_, bout))
            bin_ = bout
            if i == n - 1 and using_sa:
                d.update(_attn(f"decoder.up.{i}.attn.{j}", bin_))
        if i != 0:
            d.update({f"decoder.up.{i}.upsample.conv.weight": (bin_, bin_, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (bin_,)})
    d.update({"decoder.norm_out.weight": (bin_,), "decoder.norm_out.bias": (bin_,),
              "decoder.conv_out.weight": (3, bin_, 3, 3), "decoder.conv_out.bias": (3,)})
    d["quantize.ema_vocab_hit_SV"] = (num_scales, vocab)
    d["quantize.embedding.weight"] = (vocab, cdim)
    for k in range(nphi):
        d.update({f"quantize.quant_resi.qresi_ls.{k}.weight": (cdim, cdim, 3, 3),
                  f"quantize.quant_resi.qresi_ls.{k}.bias": (cdim,)})
    d.update({"quant_conv.weight": (cdim, z, qk, qk), "quant_conv.bias": (cdim,),
              "post_quant_conv.weight": (z, cdim, qk, qk), "post_quant_conv.bias": (z,)})
    return d


def var_layout(depth, C, heads, vocab, cvae, num_classes, scales):
    """VAR ``VAR.state_dict()`` names and shapes (shared_aln=False, attn_l2_norm=True)."""
    L, first = sum(p * p for p in scales), scales[0] ** 2
    d = {"word_embed.weight": (C, cvae), "word_embed.bias": (C,), "class_emb.weight": (num_classes + 1, C),
         "pos_start": (1, first, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (len(scales), C)}
    for i in range(depth):
        p = f"blocks.{i}"
        d.update({f"{p}.attn.scale_mul_1H11": (1, heads, 1, 1), f"{p}.attn.q_bias": (C,), f"{p}.attn.v_bias": (C,),
                  f"{p}.attn.zero_k_bias": (C,), f"{p}.attn.mat_qkv.weight": (3 * C, C),
                  f"{p}.attn.proj.weight": (C, C), f"{p}.attn.proj.bias": (C,),
                  f"{p}.ffn.fc1.weight": (4 * C, C), f"{p}.ffn.fc1.bias": (4 * C,),
                  f"{p}.ffn.fc2.weight": (C, 4 * C), f"{p}.ffn.fc2.bias": (C,),
                  f"{p}.ada_lin.1.weight": (6 * C, C), f"{p}.ada_lin.1.bias": (6 * C,)})
    d.update({"lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
              "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
              "head.weight": (vocab, C), "head.bias": (vocab,)})
    return d


def random_state(layout, seed=0, scales=None):
    """Random values in the reference layout (buffers as VAR fills them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k == "lvl_1L":
            out[k] = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([p * p for p in scales]))[None]
        elif k == "attn_bias_for_masking":
            lv = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([p * p for p in scales]))
            out[k] = torch.where(lv[:, None] >= lv[None], 0.0, -torch.inf)[None, None]
        elif k.endswith(("zero_k_bias", "ema_vocab_hit_SV")):
            out[k] = torch.zeros(shape)
        elif k.endswith("scale_mul_1H11"):
            out[k] = math.log(4.0) + 0.3 * torch.randn(shape, generator=g)
        elif "norm" in k and k.endswith("weight") and len(shape) == 1:
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k == "quantize.embedding.weight":
            out[k] = 0.5 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(shape, generator=g)
    return out


# ---- independent reference computations ------------------------------------------------------

def ref_phi(sd, h, si, num_scales):
    """VAR's PhiPartiallyShared[si / (SN - 1)]: ticks linspace(1/12, 11/12, 4), 0.5 x + 0.5 conv(x)."""
    ticks = np.linspace(1 / 3 / 4, 1 - 1 / 3 / 4, 4)
    j = int(np.argmin(np.abs(ticks - si / (num_scales - 1))))
    w, b = sd[f"quantize.quant_resi.qresi_ls.{j}.weight"], sd[f"quantize.quant_resi.qresi_ls.{j}.bias"]
    return h * 0.5 + F.conv2d(h, w, b, padding=1) * 0.5


def ref_msvq(sd, f, scales):
    """VAR ``f_to_idxBl_or_fhat``: ids per scale (B, p*p) and the final f_hat."""
    emb = sd["quantize.embedding.weight"]
    B, C, H, W = f.shape
    rest, fhat, ids, SN = f.clone(), torch.zeros_like(f), [], len(scales)
    for si, p in enumerate(scales):
        z = (F.interpolate(rest, size=(p, p), mode="area") if si != SN - 1 else rest).permute(0, 2, 3, 1).reshape(-1, C)
        d = z.square().sum(1, keepdim=True) + emb.square().sum(1) - 2 * z @ emb.T
        idx = d.argmin(1)
        h = emb[idx].view(B, p, p, C).permute(0, 3, 1, 2)
        if si != SN - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = ref_phi(sd, h, si, SN)
        fhat, rest = fhat + h, rest - h
        ids.append(idx.view(B, p * p))
    return ids, fhat


def ref_resnet(sd, p, x):
    h = F.conv2d(F.silu(F.group_norm(x, 32, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)),
                 sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 32, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)),
                 sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.nin_shortcut.weight"], sd[f"{p}.nin_shortcut.bias"])
    return x + h


def ref_attn(sd, p, x):
    """VAR's AttnBlock: fused 1x1 qkv conv (q, k, v along channels), one head, scale C^-0.5."""
    B, C, H, W = x.shape
    qkv = F.conv2d(F.group_norm(x, 32, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-6),
                   sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    q, k, v = qkv.reshape(B, 3, C, H * W).unbind(1)
    w = torch.softmax(q.transpose(1, 2) @ k * C ** -0.5, dim=2)  # (B, HW_q, HW_k)
    h = (v @ w.transpose(1, 2)).view(B, C, H, W)
    return x + F.conv2d(h, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])


def ref_var_logits(sd, vae, ids, labels, scales):
    """VAR.forward(label_B, vae.quantize.idxBl_to_var_input(ids)) with cond_drop_rate=0, eval."""
    C = sd["pos_1LC"].shape[-1]
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    emb = vae["quantize.embedding.weight"]
    B, Cv, H, SN = labels.shape[0], emb.shape[1], scales[-1], len(scales)
    fhat, nxt = torch.zeros(B, Cv, H, H), []
    for si in range(SN - 1):  # idxBl_to_var_input
        h = F.interpolate(emb[ids[si]].transpose(1, 2).reshape(B, Cv, scales[si], scales[si]), size=(H, H),
                          mode="bicubic")
        fhat = fhat + ref_phi(vae, h, si, SN)
        nxt.append(F.interpolate(fhat, size=(scales[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2))
    cond = sd["class_emb.weight"][labels]
    x = torch.cat((cond[:, None] + sd["pos_start"], F.linear(torch.cat(nxt, 1), sd["word_embed.weight"],
                                                             sd["word_embed.bias"])), 1)
    lvl = torch.repeat_interleave(torch.arange(SN), torch.tensor([p * p for p in scales]))
    x = x + sd["lvl_embed.weight"][lvl][None] + sd["pos_1LC"]
    L = x.shape[1]
    mask = torch.where(lvl[:, None] >= lvl[None], 0.0, -torch.inf)
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    for i in range(depth):
        p = f"blocks.{i}"
        g1, g2, s1, s2, b1, b2 = F.linear(F.silu(cond), sd[f"{p}.ada_lin.1.weight"],
                                          sd[f"{p}.ada_lin.1.bias"]).view(B, 1, 6, C).unbind(2)
        h = ln(x) * (1 + s1) + b1
        bias = torch.cat((sd[f"{p}.attn.q_bias"], torch.zeros(C), sd[f"{p}.attn.v_bias"]))
        q, k, v = F.linear(h, sd[f"{p}.attn.mat_qkv.weight"], bias).view(B, L, 3, heads, C // heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1) * sd[f"{p}.attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        a = (torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v).transpose(1, 2).reshape(B, L, C)
        x = x + F.linear(a, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"]) * g1
        h = ln(x) * (1 + s2) + b2
        h = F.linear(F.gelu(F.linear(h, sd[f"{p}.ffn.fc1.weight"], sd[f"{p}.ffn.fc1.bias"]), approximate="tanh"),
                     sd[f"{p}.ffn.fc2.weight"], sd[f"{p}.ffn.fc2.bias"])
        x = x + h * g2
    s, b = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"],
                    sd["head_nm.ada_lin.1.bias"]).view(B, 1, 2, C).unbind(2)
    return F.linear(ln(x) * (1 + s) + b, sd["head.weight"], sd["head.bias"])


# ---- a reduced VQVAE of VAR's layout (ch 32, ch_mult [1,1,2,2,4], 64 px -> 4x4, scales 1..4) ----

SMALL_SCALES = [1, 2, 3, 4]
SMALL_TOK = dict(image_size=64, ch=32, z_channels=16, codebook_size=64, codebook_dim=16, scales=SMALL_SCALES)
SMALL_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=16, cdim=16, vocab=64, num_scales=4)
SMALL_GEN = dict(depth=2, dim=64, heads=2, num_classes=10, cvae=16)


def _load(name, state, tokenizer=None, **overrides):
    conv = convert.find("var", name)
    model = zoo.create(name, **{**conv.overrides, **overrides})
    load_state_strict(model, conv.fn(dict(state), model, tokenizer=tokenizer), "test")
    return model.eval()


@pytest.fixture(scope="module")
def vae_sd():
    return random_state(vqvae_layout(**SMALL_VAE), seed=0)


@pytest.fixture(scope="module")
def tok(vae_sd):
    return _load("tokenizer/msvq-var", vae_sd, **SMALL_TOK)


@pytest.fixture(scope="module")
def var_sd():
    return random_state(var_layout(2, 64, 2, 64, 16, 10, SMALL_SCALES), seed=1, scales=SMALL_SCALES)


def test_vqvae_every_tensor_lands(vae_sd, tok):
    mine = tok.state_dict()
    n_ref = len(vae_sd) - 1  # ema_vocab_hit_SV is dropped
    n_split = sum(1 for k in vae_sd if k.endswith(".qkv.weight"))  # one fused qkv -> 3 Linears (x2: w, b)
    assert len(mine) == n_ref + 4 * n_split
    # where the tensors went: decoder levels reversed, qkv split/squeezed, phi, codebook
    for a, b in (("decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up.4.block.0.conv1.weight"),
                 ("decoder.up_blocks.3.resnets.2.conv2.weight", "decoder.up.1.block.2.conv2.weight"),
                 ("decoder.up_blocks.1.upsamplers.0.conv.bias", "decoder.up.3.upsample.conv.bias")):
        torch.testing.assert_close(mine[a], vae_sd[b])
    torch.testing.assert_close(mine["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"],
                               vae_sd["encoder.down.2.block.0.nin_shortcut.weight"])
    qkv = vae_sd["encoder.down.4.attn.1.qkv.weight"][:, :, 0, 0]
    C = qkv.shape[1]
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(mine[f"encoder.down_blocks.4.attentions.1.{n}.weight"], qkv[i * C:(i + 1) * C])
    torch.testing.assert_close(mine["quantizer.phis.2.conv.weight"], vae_sd["quantize.quant_resi.qresi_ls.2.weight"])
    torch.testing.assert_close(mine["quantizer.vq.embedding.weight"], vae_sd["quantize.embedding.weight"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        rec = tok.decode(tok.encode(x))
    assert rec.shape == x.shape and torch.isfinite(rec).all()


def test_vqvae_blocks_and_ids_match_reference(vae_sd, tok):
    torch.manual_seed(0)
    with torch.no_grad():
        h = torch.randn(2, 128, 4, 4)
        # mid block by hand: ResnetBlock -> AttnBlock (fused qkv) -> ResnetBlock
        want = ref_resnet(vae_sd, "encoder.mid.block_2",
                          ref_attn(vae_sd, "encoder.mid.attn_1", ref_resnet(vae_sd, "encoder.mid.block_1", h)))
        torch.testing.assert_close(tok.encoder.mid_block(h), want, atol=1e-5, rtol=1e-5)
        want = ref_attn(vae_sd, "decoder.up.4.attn.2", h)
        torch.testing.assert_close(tok.decoder.up_blocks[0].attentions[2](h), want, atol=1e-5, rtol=1e-5)
        # multi-scale quantization of the same features: ids equal VAR's, f_hat too
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        f = F.conv2d(tok.encoder(x), vae_sd["quant_conv.weight"], vae_sd["quant_conv.bias"], padding=1)
        ids, fhat = ref_msvq(vae_sd, f, SMALL_SCALES)
        got = tok.encode(x).data
        for a, b in zip(ids, got):
            assert torch.equal(a, b.flatten(1))
        torch.testing.assert_close(tok.quantizer.indices_to_fhat(list(got)), fhat, atol=1e-5, rtol=1e-5)


def test_phi_index_is_vars_partially_shared_rule():
    ticks = np.linspace(1 / 3 / 4, 1 - 1 / 3 / 4, 4)  # PhiPartiallyShared, K = 4
    for SN in range(2, 33):
        want = [int(np.argmin(np.abs(ticks - si / (SN - 1)))) for si in range(SN)]
        assert [phi_index(si, SN) for si in range(SN)] == want, SN
    assert [phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_var_every_tensor_lands_and_logits_match(vae_sd, tok, var_sd):
    gen = _load("generator/var-d16", var_sd, tokenizer=tok, spec=tok.spec, **SMALL_GEN)
    mine = gen.state_dict()
    dropped = [k for k in var_sd if k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("zero_k_bias")]
    proxy = [k for k in mine if k.startswith("vq_proxy.") or k == "tokenizer_attached"]
    assert len(mine) == len(var_sd) - len(dropped) + len(proxy)
    assert bool(gen.tokenizer_attached)
    torch.testing.assert_close(mine["vq_proxy.vq.embedding.weight"], vae_sd["quantize.embedding.weight"])
    torch.testing.assert_close(mine["class_emb.table.weight"], var_sd["class_emb.weight"])
    torch.testing.assert_close(mine["head.proj.bias"], var_sd["head.bias"])
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 64, (2, p * p), generator=g) for p in SMALL_SCALES]
    toks = Tokens([i.view(2, p, p) for i, p in zip(ids, SMALL_SCALES)], gen.spec)
    with torch.no_grad():
        for labels in (torch.tensor([3, 9]), torch.tensor([-1, 0])):  # -1: VAR's null class (row 10)
            want = ref_var_logits(var_sd, vae_sd, ids, torch.where(labels < 0, 10, labels), SMALL_SCALES)
            torch.testing.assert_close(gen.logits(toks, Condition(labels=labels)), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gen.cached_logits(toks, Condition(labels=labels)), want, atol=1e-4, rtol=1e-4)
        out = gen.generate(Condition(labels=torch.tensor([1, 2])), SamplingConfig(cfg=2.5, cfg_schedule="linear"),
                           generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in out.data] == [(2, p, p) for p in SMALL_SCALES]


def test_var_errors(vae_sd, tok, var_sd):
    conv = convert.find("var", "generator/var-d16")
    assert conv.needs_tokenizer and not convert.find("var", "tokenizer/msvq-var").needs_tokenizer
    model = zoo.create("generator/var-d16", spec=tok.spec, **SMALL_GEN)
    with pytest.raises(ValueError, match="--tokenizer"):
        conv.fn(var_sd, model)
    with pytest.raises(ValueError, match="shared_aln"):
        conv.fn({**var_sd, "shared_ada_lin.1.weight": torch.zeros(1)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="unknown tensors"):
        conv.fn({**var_sd, "blocks.0.attn.extra": torch.zeros(1)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="not zero"):
        conv.fn({**var_sd, "blocks.0.attn.zero_k_bias": torch.ones(64)}, model, tokenizer=tok)
    tconv = convert.find("var", "tokenizer/msvq-var")
    with pytest.raises(ValueError, match="unknown tensors"):
        tconv.fn({**vae_sd, "encoder.down.0.block.0.weird.weight": torch.zeros(1)}, tok)
    # a VQVAE of another depth does not fit (strict load names the tensors)
    bad = random_state(vqvae_layout(**{**SMALL_VAE, "num_res_blocks": 1}))
    with pytest.raises(Exception, match="missing tensors"):
        _load("tokenizer/msvq-var", bad, **SMALL_TOK)


def test_cli_converts_the_tiny_layouts(tmp_path):
    # msvq-tiny / var-tiny in VAR's layout (no attention, 1 ResBlock, z 32 -> code dim 16)
    scales = [1, 2, 3, 4, 6, 8]
    vae = random_state(vqvae_layout(16, (1, 2, 2, 4), 1, 32, 16, 1024, 6, using_sa=False, using_mid_sa=False), 4)
    var = random_state(var_layout(6, 128, 4, 1024, 16, 30, scales), 5, scales=scales)
    torch.save({"model": vae}, tmp_path / "vae.pth")
    torch.save(var, tmp_path / "var.pth")
    assert arzoo(["convert", "--from", "var", str(tmp_path / "vae.pth"), "--model", "tokenizer/msvq-tiny",
                  "--out", str(tmp_path / "tok")]) == 0
    assert arzoo(["convert", "--from", "var", str(tmp_path / "var.pth"), "--model", "generator/var-tiny",
                  "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "README.md").is_file()
    tok = zoo.checkpoint.load_pretrained(tmp_path / "tok").eval()
    gen = zoo.checkpoint.load_pretrained(tmp_path / "gen").eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 1024, (2, p * p), generator=g) for p in scales]
    toks = Tokens([i.view(2, p, p) for i, p in zip(ids, scales)], gen.spec)
    labels = torch.tensor([0, 29])
    with torch.no_grad():
        torch.testing.assert_close(gen.logits(toks, Condition(labels=labels)),
                                   ref_var_logits(var, vae, ids, labels, scales), atol=1e-4, rtol=1e-4)
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        f = F.conv2d(tok.encoder(x), vae["quant_conv.weight"], vae["quant_conv.bias"], padding=1)
        want, _ = ref_msvq(vae, f, scales)
        assert all(torch.equal(a, b.flatten(1)) for a, b in zip(want, tok.encode(x).data))
    # the generator without --tokenizer is refused
    assert arzoo(["convert", "--from", "var", str(tmp_path / "var.pth"), "--model", "generator/var-tiny",
                  "--out", str(tmp_path / "gen2")]) == 2


@pytest.mark.slow
def test_paper_size_vae_and_var_d16_every_tensor_lands():
    vae = random_state(vqvae_layout(160, (1, 1, 2, 2, 4), 2, 32, 32, 4096, 10))
    tok = _load("tokenizer/msvq-var", vae)
    assert sum(p.numel() for p in tok.parameters()) == sum(v.numel() for k, v in vae.items() if "ema_vocab" not in k)
    del vae
    scales = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    var = random_state(var_layout(16, 1024, 16, 4096, 32, 1000, scales), scales=scales)
    gen = _load("generator/var-d16", var, tokenizer=tok, spec=tok.spec)
    n_ref = sum(v.numel() for k, v in var.items() if k not in ("lvl_1L", "attn_bias_for_masking")
                and not k.endswith("zero_k_bias"))
    assert sum(p.numel() for p in gen.parameters() if p.requires_grad) == n_ref  # ~310M
    torch.testing.assert_close(gen.state_dict()["transformer.blocks.15.ada_lin.1.weight"],
                               var["blocks.15.ada_lin.1.weight"])
