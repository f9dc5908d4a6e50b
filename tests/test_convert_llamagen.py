"""zoo.convert llamagen / nar: LlamaGen VQ-16 + GPT and NAR checkpoints -> arzoo models.

The reference state dicts are generated here from the published code's module layout
(FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` and
``autoregressive/models/gpt.py``; ThisisBillhe/NAR ``NAR-images/autoregressive/models/gpt.py``)
with random values, at reduced sizes of the same layout (one slow test per family at paper size).
The numerical tests recompute pieces of the reference forward by hand from the *source* tensors:
VQ ids (nearest l2-normalised code), a LlamaGen ``AttnBlock``, LlamaGen's 2D RoPE table with its
zero prefix rows, and the first outputs of the GPT / NAR heads.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from generators.base import Condition, SamplingConfig
from generators.transformer import RotaryEmbedding, find_multiple
from zoo import convert
from zoo.checkpoint import load_state_strict
from zoo.tokens import Tokens, TokenSpec

# ---- reference layouts (key -> shape), written from the published code -----------------------


def llamagen_vq_layout(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                       codebook_size=16384, codebook_dim=8):
    """vq_model.py: Encoder / Decoder (ResnetBlock, AttnBlock of 1x1 convs), VectorQuantizer."""
    s = {}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{n}", c, c, 1)

    n = len(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    in_mult = (1,) + tuple(ch_mult)
    for lvl in range(n):
        cin, cout = ch * in_mult[lvl], ch * ch_mult[lvl]
        for i in range(num_res_blocks):
            res(f"encoder.conv_blocks.{lvl}.res.{i}", cin, cout)
            cin = cout
            if lvl == n - 1:
                attn(f"encoder.conv_blocks.{lvl}.attn.{i}", cout)
        if lvl != n - 1:
            conv(f"encoder.conv_blocks.{lvl}.downsample.conv", cout, cout, 3)
    top = ch * ch_mult[-1]
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.0", top, top)
        attn(f"{part}.mid.1", top)
        res(f"{part}.mid.2", top, top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, z_channels, 3)
    conv("decoder.conv_in", z_channels, top, 3)
    cin = top
    for k, lvl in enumerate(reversed(range(n))):
        cout = ch * ch_mult[lvl]
        for i in range(num_res_blocks + 1):
            res(f"decoder.conv_blocks.{k}.res.{i}", cin, cout)
            cin = cout
            if lvl == n - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{i}", cout)
        if lvl != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", cout, cout, 3)
    norm("decoder.norm_out", ch * ch_mult[0])
    conv("decoder.conv_out", ch * ch_mult[0], 3, 3)
    s["quantize.embedding.weight"] = (codebook_size, codebook_dim)
    s["quantize.codebook_used"] = (65536,)
    conv("quant_conv", z_channels, codebook_dim, 1)
    conv("post_quant_conv", codebook_dim, z_channels, 1)
    return s


def llamagen_gpt_layout(dim, n_layer, vocab_size=16384, num_classes=1000, medusa=0):
    """gpt.py (c2i): tok_embeddings, cls_embedding (num_classes + 1 rows), layers, norm, output;
    NAR's gpt.py adds ``medusa`` more layers, medusa_norm and medusa_output."""
    hidden = find_multiple(int(2 * 4 * dim / 3), 256)
    s = {"tok_embeddings.weight": (vocab_size, dim), "cls_embedding.embedding_table.weight": (num_classes + 1, dim)}
    for i in range(n_layer + medusa):
        s[f"layers.{i}.attention.wqkv.weight"] = (3 * dim, dim)
        s[f"layers.{i}.attention.wo.weight"] = (dim, dim)
        s[f"layers.{i}.feed_forward.w1.weight"] = (hidden, dim)
        s[f"layers.{i}.feed_forward.w3.weight"] = (hidden, dim)
        s[f"layers.{i}.feed_forward.w2.weight"] = (dim, hidden)
        s[f"layers.{i}.attention_norm.weight"] = (dim,)
        s[f"layers.{i}.ffn_norm.weight"] = (dim,)
    s["norm.weight"], s["output.weight"] = (dim,), (vocab_size, dim)
    if medusa:
        s["medusa_norm.weight"], s["medusa_output.weight"] = (dim,), (vocab_size, dim)
    return s


def random_state(layout, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("codebook_used"):
            out[k] = torch.randint(0, 100, shape, generator=g).float()
        elif "norm" in k.rsplit(".", 2)[-2] and k.endswith(".weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = scale * torch.randn(shape, generator=g)
    return out


def convert_into(family, name, state, **over):
    conv = convert.find(family, name)
    model = zoo.create(name, **{**conv.overrides, **over})
    mapped = conv.fn(state, model)
    load_state_strict(model, mapped, "test")
    return model.eval(), mapped


def assert_all_land(model, state, mapped, key_fn, dropped=()):
    """Every source tensor (but ``dropped``) is in the model, under its mapped name, unchanged."""
    own = model.state_dict()
    assert len(own) == len(state) - len(dropped)
    for k, v in state.items():
        nk = key_fn(k)
        if k in dropped:
            assert nk is None
            continue
        assert torch.equal(own[nk], v.reshape(own[nk].shape)), k
        assert own[nk].numel() == v.numel()


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# ---- VQ ----------------------------------------------------------------------------------------

VQ_SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=64)


def small_vq():
    state = random_state(llamagen_vq_layout(**VQ_SMALL), seed=0)
    state["quantize.embedding.weight"] = F.normalize(state["quantize.embedding.weight"], dim=-1)
    over = {**VQ_SMALL, "ch_mult": list(VQ_SMALL["ch_mult"]), "image_size": 16}
    model, mapped = convert_into("llamagen", "tokenizer/vq-16", {"model": state}, **over)
    return state, model, mapped


def test_vq_every_tensor_lands_and_runs():
    from zoo.convert.llamagen import vq_key

    state, model, mapped = small_vq()
    assert_all_land(model, state, mapped, vq_key, dropped=("quantize.codebook_used",))
    # renames the issue lists
    assert "encoder.down_blocks.2.attentions.0.to_q.weight" in mapped
    assert mapped["encoder.down_blocks.2.attentions.0.to_q.weight"].shape == (64, 64)
    assert "decoder.mid_block.attentions.0.to_out.0.bias" in mapped
    assert "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in mapped
    assert "decoder.conv_norm_out.weight" in mapped and "decoder.up_blocks.0.upsamplers.0.conv.weight" in mapped
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tok = model.encode(x)
        rec = model.decode(tok)
    assert tok.data.shape == (2, 4, 4) and rec.shape == x.shape and torch.isfinite(rec).all()


def test_vq_ids_are_the_nearest_reference_code():
    """VQ index lookup: the converted model's ids = argmin over LlamaGen's l2-normalised codebook
    of the l2-normalised pre-quantisation latent, computed here from the source tensors."""
    state, model, _ = small_vq()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encoder(x)
        z = F.conv2d(h, state["quant_conv.weight"], state["quant_conv.bias"])  # reference quant_conv
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        codes = F.normalize(state["quantize.embedding.weight"], dim=-1)
        ref_ids = torch.cdist(zf, codes).argmin(1).view(3, 4, 4)
        ids = model.encode(x).data
        # and decoding starts from the reference code vectors
        zq = model.quantizer.lookup(ids)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(zq.permute(0, 2, 3, 1), codes[ref_ids], atol=1e-6)


def test_vq_attention_block_matches_llamagen_attnblock():
    """LlamaGen's AttnBlock (GroupNorm(32, eps 1e-6), 1x1-conv q/k/v, softmax(q k / sqrt(c)), proj_out,
    residual) computed by hand from the source tensors equals the converted diffusers block."""
    state, model, _ = small_vq()
    p = "encoder.conv_blocks.2.attn.0"
    blk = model.encoder.down_blocks[2].attentions[0]
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        h = F.group_norm(x, 32, state[f"{p}.norm.weight"], state[f"{p}.norm.bias"], eps=1e-6)
        q, k, v = (F.conv2d(h, state[f"{p}.{n}.weight"], state[f"{p}.{n}.bias"]).flatten(2) for n in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(64), dim=-1)
        o = torch.einsum("bcj,bij->bci", v, w).view_as(x)
        ref = x + F.conv2d(o, state[f"{p}.proj_out.weight"], state[f"{p}.proj_out.bias"])
        got = blk(x)
    assert torch.allclose(got, ref, atol=1e-5)


def test_vq_unknown_keys_are_reported():
    state = random_state(llamagen_vq_layout(**VQ_SMALL))
    state["encoder.extra.weight"] = torch.zeros(1)
    conv = convert.find("llamagen", "tokenizer/vq-16")
    model = zoo.create("tokenizer/vq-16", **{**VQ_SMALL, "ch_mult": list(VQ_SMALL["ch_mult"]), "image_size": 16})
    with pytest.raises(Exception, match="encoder.extra.weight"):
        load_state_strict(model, conv.fn(state, model), "test")


# ---- GPT (raster AR) --------------------------------------------------------------------------

GPT_SMALL = dict(dim=64, depth=2, heads=4, num_classes=10)


def small_gpt(medusa=0, seed=1):
    layout = llamagen_gpt_layout(64, 2, vocab_size=128, num_classes=10, medusa=medusa)
    state = random_state(layout, seed=seed, scale=0.1)
    state["freqs_cis"] = torch.zeros(1 + 16, 8, 2)  # older LlamaGen files carry the rope table
    spec = TokenSpec("discrete", "grid", (4, 4), vocab_size=128)
    family, name = ("nar", "generator/nar-b") if medusa else ("llamagen", "generator/raster-ar-b")
    model, mapped = convert_into(family, name, {"model": state, "steps": torch.tensor(5)}, spec=spec, **GPT_SMALL)
    return state, model, mapped


def test_gpt_every_tensor_lands_and_runs():
    from zoo.convert.llamagen import gpt_key

    state, model, mapped = small_gpt()
    assert model.prefix_rope == "zero" and model.transformer.rope.prefix == "zero"
    assert_all_land(model, state, mapped, gpt_key, dropped=("freqs_cis",))
    assert torch.equal(model.head.proj.weight, state["output.weight"])
    assert torch.equal(model.cond_encoder.classes.table.weight, state["cls_embedding.embedding_table.weight"])
    assert model.cond_encoder.classes.null_index == 10  # LlamaGen: null class = num_classes, last row
    toks = model.generate(Condition(labels=torch.tensor([1, 2])), SamplingConfig(cfg=2.0, top_k=10),
                          torch.Generator().manual_seed(0))
    assert toks.data.shape == (2, 4, 4)
    seq = torch.randint(0, 128, (2, 4, 4))
    cond = Condition(labels=torch.tensor([3, 4]))
    t = Tokens(seq, model.spec)
    assert torch.allclose(model.logits(t, cond), model.cached_logits(t, cond), atol=1e-5)


def llamagen_rope_table(grid, head_dim, base=10000.0, cls_token_num=1):
    """gpt.py precompute_freqs_cis_2d, rewritten: (cls + grid^2, head_dim/2, 2) [cos, sin]."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    ang = torch.outer(torch.arange(grid).float(), freqs)
    grid_ang = torch.cat([ang[:, None, :].expand(-1, grid, -1), ang[None, :, :].expand(grid, -1, -1)], -1)
    cache = torch.stack([grid_ang.cos(), grid_ang.sin()], -1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), cache])


def test_prefix_rotation_zero_matches_llamagen_table():
    state, model, _ = small_gpt()
    pos = model.positions()  # prefix (-1, -1), then tokens 0 .. N-2
    cos, sin = model.transformer.rope(pos)
    table = llamagen_rope_table(4, 16)[: pos.shape[0]]  # training uses freqs_cis[:T]
    assert torch.allclose(cos, table[..., 0], atol=1e-6) and torch.allclose(sin, table[..., 1], atol=1e-6)
    assert (cos[0] == 0).all() and (sin[0] == 0).all()
    # arzoo's default keeps the prefix unrotated (identity), unchanged by the option
    c0, s0 = RotaryEmbedding(16, 2)(pos)
    assert (c0[0] == 1).all() and (s0[0] == 0).all() and torch.equal(c0[1:], cos[1:])
    with pytest.raises(ValueError, match="prefix"):
        RotaryEmbedding(16, 2, prefix="one")


def _block(x, st, i, rope_q=None, zero_prefix=True):
    """One LlamaGen TransformerBlock on a 2-slot sequence [class token, token at (0, 0)], by hand.

    Slot 1 sits at grid position (0, 0): its rotation is the identity. The class token's query and
    key are multiplied by LlamaGen's zero table (cos = sin = 0) -> 0."""
    p = f"layers.{i}."
    D, H = x.shape[-1], 4
    hd = D // H
    a = rms(x, st[p + "attention_norm.weight"])
    q, k, v = (a @ st[p + "attention.wqkv.weight"].T).split(D, -1)
    if zero_prefix:
        q, k = q.clone(), k.clone()
        q[:, 0], k[:, 0] = 0, 0
    q, k, v = (t.view(t.shape[0], 2, H, hd).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(2, 2, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + o @ st[p + "attention.wo.weight"].T
    f = rms(x, st[p + "ffn_norm.weight"])
    f = (F.silu(f @ st[p + "feed_forward.w1.weight"].T) * (f @ st[p + "feed_forward.w3.weight"].T))
    return x + f @ st[p + "feed_forward.w2.weight"].T


def test_gpt_first_logits_by_hand_with_zero_rotated_class_token():
    """Logits predicting tokens 0 and 1, recomputed from the source tensors with LlamaGen's
    zero-rotated class token; the unrotated (arzoo default) prefix gives different logits."""
    st, model, _ = small_gpt()
    labels = torch.tensor([3, 7])
    seq = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.logits(Tokens(seq.view(2, 4, 4), model.spec), Condition(labels=labels))[:, :2]
        x = torch.stack((st["cls_embedding.embedding_table.weight"][labels], st["tok_embeddings.weight"][seq[:, 0]]), 1)
        outs = {}
        for zero in (True, False):
            h = x
            for i in range(2):
                h = _block(h, st, i, zero_prefix=zero)
            outs[zero] = rms(h, st["norm.weight"]) @ st["output.weight"].T
        model.transformer.rope.prefix = "none"
        unrot = model.logits(Tokens(seq.view(2, 4, 4), model.spec), Condition(labels=labels))[:, :2]
    assert torch.allclose(got, outs[True], atol=1e-5)
    assert torch.allclose(unrot, outs[False], atol=1e-5)
    assert not torch.allclose(outs[True][:, 1], outs[False][:, 1], atol=1e-3)


def test_gpt_text_conditional_checkpoints_are_refused():
    state = random_state(llamagen_gpt_layout(64, 2, vocab_size=128, num_classes=10))
    del state["cls_embedding.embedding_table.weight"]
    state["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(64, 2048)
    conv = convert.find("llamagen", "generator/raster-ar-b")
    with pytest.raises(ValueError, match="t2i"):
        conv.fn(state, None)


def test_converters_are_registered_with_prefix_rope_zero():
    for fam, name in (("llamagen", "generator/raster-ar-b"), ("llamagen", "generator/raster-ar-xl"),
                      ("nar", "generator/nar-b"), ("nar", "generator/nar-l")):
        assert convert.find(fam, name).overrides == {"prefix_rope": "zero"}
    assert convert.find("llamagen", "tokenizer/vq-16").overrides == {}
    with pytest.raises(ValueError):
        convert.find("llamagen", "generator/nar-b")


# ---- NAR --------------------------------------------------------------------------------------

def test_nar_every_tensor_lands_and_runs():
    from zoo.convert.nar import nar_key

    state, model, mapped = small_gpt(medusa=1, seed=4)
    assert model.transformer.rope.prefix == "zero" and model.below.rope.prefix == "zero"
    assert_all_land(model, state, mapped, lambda k: nar_key(k, 2), dropped=("freqs_cis",))
    assert torch.equal(model.below.layers[0].attention.wqkv.weight, state["layers.2.attention.wqkv.weight"])
    assert torch.equal(model.norm_right.weight, state["norm.weight"])
    assert torch.equal(model.below.norm.weight, state["medusa_norm.weight"])
    assert torch.equal(model.head_below.proj.weight, state["medusa_output.weight"])
    toks = model.generate(Condition(labels=torch.tensor([1, 2])), SamplingConfig(cfg=2.0),
                          torch.Generator().manual_seed(0))
    assert toks.data.shape == (2, 4, 4)
    t, cond = Tokens(torch.randint(0, 128, (2, 4, 4)), model.spec), Condition(labels=torch.tensor([0, 9]))
    assert torch.allclose(model.logits(t, cond), model.cached_logits(t, cond), atol=1e-5)


def test_nar_first_token_logits_by_hand():
    """(0, 0) logits = (R + B) / 2 at the class position: R = output(norm(trunk)), B =
    medusa_output(medusa_norm(extra layer on the un-normed trunk stream)), from the source tensors."""
    st, model, _ = small_gpt(medusa=1, seed=5)
    labels = torch.tensor([2, 8])
    seq = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model.logits(Tokens(seq.view(2, 4, 4), model.spec), Condition(labels=labels))[:, 0]
        x = torch.stack((st["cls_embedding.embedding_table.weight"][labels], st["tok_embeddings.weight"][seq[:, 0]]), 1)
        h = x
        for i in range(2):
            h = _block(h, st, i)
        right = rms(h, st["norm.weight"]) @ st["output.weight"].T
        below = rms(_block(h, st, 2), st["medusa_norm.weight"]) @ st["medusa_output.weight"].T
    assert torch.allclose(got, (right[:, 0] + below[:, 0]) / 2, atol=1e-5)


def test_nar_layer_split_follows_the_model_depth():
    from zoo.convert.nar import nar_key

    assert nar_key("layers.11.attention.wo.weight", 12) == "transformer.layers.11.attention.wo.weight"
    assert nar_key("layers.12.ffn_norm.weight", 12) == "below.layers.0.ffn_norm.weight"
    assert nar_key("layers.3.attention.kv_cache.k_cache", 12) is None
    assert nar_key("medusa_output.weight", 12) == "head_below.proj.weight"


# ---- paper size (slow): every tensor of the released layouts lands ------------------------------

@pytest.mark.slow
def test_llamagen_paper_size_convert_end_to_end(tmp_path):
    """VQ-16 (72M) and GPT-B (111M) from .pt files in LlamaGen's wrapper, through ``convert``."""
    from zoo.checkpoint import load_pretrained

    vq = random_state(llamagen_vq_layout(), seed=0)
    torch.save({"model": vq}, tmp_path / "vq_ds16_c2i.pt")
    m = convert.convert("llamagen", tmp_path / "vq_ds16_c2i.pt", "tokenizer/vq-16", tmp_path / "vq")
    assert m.num_params() == sum(v.numel() for k, v in vq.items() if k != "quantize.codebook_used")
    del vq, m
    gpt = random_state(llamagen_gpt_layout(768, 12), seed=1)
    torch.save({"model": gpt}, tmp_path / "c2i_B_256.pt")
    del gpt
    m = convert.convert("llamagen", tmp_path / "c2i_B_256.pt", "generator/raster-ar-b", tmp_path / "gpt")
    assert 110e6 < m.num_params() < 112e6
    back = load_pretrained(tmp_path / "gpt")
    assert back.config["prefix_rope"] == "zero" and back.transformer.rope.prefix == "zero"


@pytest.mark.slow
def test_nar_paper_size_convert_end_to_end(tmp_path):
    nar = random_state(llamagen_gpt_layout(768, 12, medusa=1), seed=2)
    torch.save({"model": nar}, tmp_path / "nar_b.pt")
    n = sum(v.numel() for v in nar.values())
    del nar
    m = convert.convert("nar", tmp_path / "nar_b.pt", "generator/nar-b", tmp_path / "nar")
    assert m.num_params() == n and m.below.rope.prefix == "zero"
    assert (tmp_path / "nar" / "model.safetensors").is_file()
