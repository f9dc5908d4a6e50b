"""zoo.convert.mvar: MVAR's released transformer checkpoints -> generator/mvar-*.

MVAR's ``MVAR.state_dict()`` (CVL-UESTC/MVAR ``models/mvar.py`` + ``basic_mvar.py``) has VAR's
names and shapes (:func:`test_convert_var.var_layout`); only its ``attn_bias_for_masking``
buffer differs (block-diagonal by scale). The reference computation below re-implements MVAR's
sampling forward (``autoregressive_infer`` fed given ids: one forward per scale over that
scale's tokens only, NATTEN 2D windows from ``refine_step`` on) in plain torch, independently of
arzoo's modules; the NATTEN window rule is written from NATTEN's ``get_window_start``.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from test_convert_var import random_state, ref_phi, var_layout, vqvae_layout

import zoo
from generators.base import Condition, SamplingConfig
from zoo import convert
from zoo.checkpoint import CheckpointError, load_pretrained, load_state_strict
from zoo.cli import main as arzoo
from zoo.convert.mvar import check_buffers, mvar_state_from
from zoo.tokens import Tokens

# generator/mvar-tiny as registered: scales 1..8, depth 6 x 128, 4 heads, 30 classes, Cvae 16,
# 3x3 windows on the last two scales (MVAR kernel_size=3, refine_step=4)
SCALES = [1, 2, 3, 4, 6, 8]
DEPTH, C, HEADS, V, CVAE, CLASSES, KERNEL, REFINE = 6, 128, 4, 1024, 16, 30, 3, 4
NAME = "generator/mvar-tiny"


def levels(scales):
    return torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([p * p for p in scales]))


def mvar_layout_state(seed=1):
    """Random values in MVAR's layout, with MVAR's mask (generate_backward_attn_mask_only_next)."""
    sd = random_state(var_layout(DEPTH, C, HEADS, V, CVAE, CLASSES, SCALES), seed=seed, scales=SCALES)
    lv = levels(SCALES)
    sd["attn_bias_for_masking"] = torch.where(lv[:, None] == lv[None], 0.0, -torch.inf)[None, None]
    return sd


# ---- independent reference: MVAR's sampling forward, teacher-forced -----------------------------

def natten_allow(n, k):
    """(n², n²) bool: NATTEN na2d's k x k windows on an n x n map (window slid inwards at borders)."""
    r = k // 2
    start = [max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0) for i in range(n)]
    allow = torch.zeros(n, n, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allow[i, j, start[i]:start[i] + k, start[j]:start[j] + k] = True
    return allow.view(n * n, n * n)


def ref_mvar_logits(sd, vae, ids, labels, scales, kernel=KERNEL, refine=REFINE):
    """MVAR ``autoregressive_infer`` (cfg 1) with its sampler returning ``ids``: logits (B, L, V)."""
    Cm = sd["pos_1LC"].shape[-1]
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    emb = vae["quantize.embedding.weight"]
    B, Cv, H, S = labels.shape[0], emb.shape[1], scales[-1], len(scales)
    cond = sd["class_emb.weight"][labels]
    lvl_pos = sd["lvl_embed.weight"][levels(scales)][None] + sd["pos_1LC"]
    ln = lambda t: F.layer_norm(t, (Cm,), eps=1e-6)  # noqa: E731
    x = cond[:, None] + sd["pos_start"] + lvl_pos[:, :1]
    fhat, out, a = torch.zeros(B, Cv, H, H), [], 0
    for si, pn in enumerate(scales):
        mask = natten_allow(pn, kernel) if si >= refine else None  # else: no mask, this scale only
        T = pn * pn
        for i in range(depth):
            p = f"blocks.{i}"
            g1, g2, s1, s2, b1, b2 = F.linear(F.silu(cond), sd[f"{p}.ada_lin.1.weight"],
                                              sd[f"{p}.ada_lin.1.bias"]).view(B, 1, 6, Cm).unbind(2)
            bias = torch.cat((sd[f"{p}.attn.q_bias"], sd[f"{p}.attn.zero_k_bias"], sd[f"{p}.attn.v_bias"]))
            q, k, v = F.linear(ln(x) * (1 + s1) + b1, sd[f"{p}.attn.mat_qkv.weight"], bias) \
                .view(B, T, 3, heads, Cm // heads).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.normalize(q, dim=-1) * sd[f"{p}.attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
            w = q @ F.normalize(k, dim=-1).transpose(-1, -2)
            if mask is not None:
                w = w.masked_fill(~mask, -torch.inf)
            att = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, Cm)
            x = x + F.linear(att, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"]) * g1
            h = F.gelu(F.linear(ln(x) * (1 + s2) + b2, sd[f"{p}.ffn.fc1.weight"], sd[f"{p}.ffn.fc1.bias"]),
                       approximate="tanh")
            x = x + F.linear(h, sd[f"{p}.ffn.fc2.weight"], sd[f"{p}.ffn.fc2.bias"]) * g2
        s, b = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"],
                        sd["head_nm.ada_lin.1.bias"]).view(B, 1, 2, Cm).unbind(2)
        out.append(F.linear(ln(x) * (1 + s) + b, sd["head.weight"], sd["head.bias"]))
        a += T
        if si + 1 < S:  # get_next_autoregressive_input: f̂ += φ(bicubic_up(E[ids])), area-down to the next scale
            hs = emb[ids[si]].transpose(1, 2).reshape(B, Cv, pn, pn)
            fhat = fhat + ref_phi(vae, F.interpolate(hs, size=(H, H), mode="bicubic"), si, S)
            nxt = F.interpolate(fhat, size=(scales[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
            x = F.linear(nxt, sd["word_embed.weight"], sd["word_embed.bias"]) + lvl_pos[:, a:a + scales[si + 1] ** 2]
    return torch.cat(out, 1)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_sd():
    # msvq-tiny in VAR's VQVAE layout (no attention, 1 ResBlock, z 32 -> code dim 16)
    return random_state(vqvae_layout(16, (1, 2, 2, 4), 1, 32, 16, V, len(SCALES), using_sa=False,
                                     using_mid_sa=False), seed=4)


@pytest.fixture(scope="module")
def tok(vae_sd):
    conv = convert.find("var", "tokenizer/msvq-tiny")
    t = zoo.create("tokenizer/msvq-tiny")
    load_state_strict(t, conv.fn(dict(vae_sd), t), "vae")
    return t.eval()


@pytest.fixture(scope="module")
def mvar_sd():
    return mvar_layout_state()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, V, (2, p * p), generator=g) for p in SCALES]
    return ids, Tokens([i.view(2, p, p) for i, p in zip(ids, SCALES)],
                       zoo.tokens.TokenSpec("discrete", "pyramid", [(p, p) for p in SCALES], vocab_size=V))


def _convert(state, tok, **overrides):
    conv = convert.find("mvar", NAME)
    model = zoo.create(NAME, spec=tok.spec, **{**conv.overrides, **overrides})
    load_state_strict(model, conv.fn(state, model, tokenizer=tok), "test")
    return model.eval()


# ---- tests -----------------------------------------------------------------------------------------

def test_every_tensor_lands_and_logits_match_mvar(tok, vae_sd, mvar_sd, batch):
    wrapped = {"epoch": 3, "iter": 0, "args": {"depth": DEPTH, "patch_nums": tuple(SCALES), "kernel_size": KERNEL,
                                               "refine_step": REFINE, "anorm": True, "saln": False},
               "trainer": {"config": {"patch_nums": tuple(SCALES), "label_smooth": 0.0}, "mvar_wo_ddp": mvar_sd,
                           "mvar_opt": {"state": {}}}}
    gen = _convert(wrapped, tok)
    assert gen.mode == "mvar" and gen.kernel == KERNEL and sorted(gen.spatial) == [4, 5]
    mine = gen.state_dict()
    dropped = [k for k in mvar_sd if k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("zero_k_bias")]
    proxy = [k for k in mine if k.startswith("vq_proxy.") or k == "tokenizer_attached"]
    assert len(mine) == len(mvar_sd) - len(dropped) + len(proxy)
    assert bool(gen.tokenizer_attached)
    torch.testing.assert_close(mine["vq_proxy.vq.embedding.weight"], vae_sd["quantize.embedding.weight"])
    torch.testing.assert_close(mine["transformer.blocks.5.attn.mat_qkv.weight"],
                               mvar_sd["blocks.5.attn.mat_qkv.weight"])
    torch.testing.assert_close(mine["class_emb.table.weight"], mvar_sd["class_emb.weight"])
    torch.testing.assert_close(mine["head.proj.weight"], mvar_sd["head.weight"])
    ids, toks = batch
    with torch.no_grad():
        for labels in (torch.tensor([3, 29]), torch.tensor([-1, 0])):  # -1: MVAR's null class (row 30)
            want = ref_mvar_logits(mvar_sd, vae_sd, ids, torch.where(labels < 0, CLASSES, labels), SCALES)
            cond = Condition(labels=labels)
            torch.testing.assert_close(gen.logits(toks, cond), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gen.cached_logits(toks, cond), want, atol=1e-4, rtol=1e-4)
        # the reference is sensitive to the Markov structure: other windows / scales give other logits
        for kernel, refine in ((5, REFINE), (KERNEL, REFINE + 1), (KERNEL, len(SCALES))):
            other = ref_mvar_logits(mvar_sd, vae_sd, ids, torch.where(labels < 0, CLASSES, labels), SCALES,
                                    kernel, refine)
            assert (other - want).abs().max() > 1e-3, (kernel, refine)
        out = gen.generate(Condition(labels=torch.tensor([1, 2])), SamplingConfig(cfg=2.4, cfg_schedule="linear"),
                           generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in out.data] == [(2, p, p) for p in SCALES]


def test_inverse_mapping_is_mvars_layout_and_round_trips(tok, batch):
    torch.manual_seed(0)
    a = zoo.create(NAME, spec=tok.spec).eval()
    a.attach_tokenizer(tok)
    sd = mvar_state_from(a)
    layout = var_layout(DEPTH, C, HEADS, V, CVAE, CLASSES, SCALES)
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout  # MVAR's names and shapes, buffers included
    assert check_buffers(sd, a) == "mvar"
    b = _convert({"mvar_wo_ddp": sd}, tok)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    ids, toks = batch
    cond = Condition(labels=torch.tensor([0, 7]))
    with torch.no_grad():
        assert torch.equal(a.logits(toks, cond), b.logits(toks, cond))


def test_fine_tuned_file_with_vars_mask_buffer(tok, vae_sd, mvar_sd, batch):
    # MVAR's fine-tuned releases loaded var_d*.pth with strict=True: their mask buffer is VAR's
    lv = levels(SCALES)
    var_mask = torch.where(lv[:, None] >= lv[None], 0.0, -torch.inf)[None, None]
    ft = {**mvar_sd, "attn_bias_for_masking": var_mask}
    gen = _convert({"mvar_wo_ddp": ft}, tok)
    assert check_buffers(ft, gen) == "var" and check_buffers(mvar_sd, gen) == "mvar"
    ids, toks = batch
    labels = torch.tensor([5, 6])
    with torch.no_grad():
        torch.testing.assert_close(gen.logits(toks, Condition(labels=labels)),
                                   ref_mvar_logits(mvar_sd, vae_sd, ids, labels, SCALES), atol=1e-4, rtol=1e-4)
    # a bare state dict without the buffers converts too
    bare = {k: v for k, v in mvar_sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")
            and not k.endswith("zero_k_bias")}
    assert check_buffers(bare, gen) == "none"
    _convert(bare, tok)


def test_errors(tok, mvar_sd):
    conv = convert.find("mvar", NAME)
    assert conv.needs_tokenizer and convert.find("mvar", "generator/mvar-d24").needs_tokenizer
    with pytest.raises(ValueError, match="no 'mvar' converter"):
        convert.find("mvar", "generator/var-d16")
    model = zoo.create(NAME, spec=tok.spec)
    with pytest.raises(ValueError, match="--tokenizer"):
        conv.fn(mvar_sd, model)
    with pytest.raises(ValueError, match="mode='mvar'"):
        conv.fn(mvar_sd, zoo.create("generator/var-tiny", spec=tok.spec), tokenizer=tok)
    with pytest.raises(ValueError, match=r"unknown tensors \['blocks.0.attn.extra'\]"):
        conv.fn({**mvar_sd, "blocks.0.attn.extra": torch.zeros(1)}, model, tokenizer=tok)
    missing = {k: v for k, v in mvar_sd.items() if k not in ("blocks.3.attn.q_bias", "head.bias")}
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.3.attn.q_bias', 'head.bias'\]"):
        conv.fn(missing, model, tokenizer=tok)
    with pytest.raises(ValueError, match="shared_aln"):
        conv.fn({**mvar_sd, "shared_ada_lin.1.weight": torch.zeros(1)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="not zero"):
        conv.fn({**mvar_sd, "blocks.0.attn.zero_k_bias": torch.ones(C)}, model, tokenizer=tok)
    # the training options the file records must be the model's
    for bad, word in (({"kernel_size": 7}, "kernel_size=7"), ({"refine_step": 8}, "refine_step=8"),
                      ({"patch_nums": (1, 2, 3, 4, 5, 6)}, "patch_nums"), ({"depth": 16}, "depth=16"),
                      ({"anorm": False}, "anorm=False"), ({"saln": True}, "saln=True")):
        with pytest.raises(ValueError, match=word):
            conv.fn({"args": bad, "mvar_wo_ddp": mvar_sd}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="patch_nums"):
        conv.fn({"trainer": {"config": {"patch_nums": (1, 2, 4)}, "mvar_wo_ddp": mvar_sd}}, model, tokenizer=tok)
    # buffers that do not fit the pyramid / are no known mask
    with pytest.raises(ValueError, match="lvl_1L"):
        conv.fn({**mvar_sd, "lvl_1L": torch.zeros(1, 130, dtype=torch.long)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="attn_bias_for_masking"):
        conv.fn({**mvar_sd, "attn_bias_for_masking": torch.zeros(1, 1, 130, 130)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="attn_bias_for_masking .1, 1, 680, 680."):
        conv.fn({**mvar_sd, "attn_bias_for_masking": torch.zeros(1, 1, 680, 680)}, model, tokenizer=tok)
    with pytest.raises(ValueError, match="no tensors"):
        conv.fn({"epoch": 1, "args": {}}, model, tokenizer=tok)
    # a deeper checkpoint does not fit (strict load names the tensors)
    deep = random_state(var_layout(DEPTH + 1, C, HEADS, V, CVAE, CLASSES, SCALES), scales=SCALES)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_state_strict(model, conv.fn(deep, model, tokenizer=tok), "deep")


def test_cli_converts_the_released_layout(tmp_path, tok, vae_sd, mvar_sd, batch):
    tok.save_pretrained(tmp_path / "tok")
    torch.save({"mvar_wo_ddp": mvar_sd}, tmp_path / "mvar.pth")  # what run_mvar_evaluate.py reads
    assert arzoo(["convert", "--from", "mvar", str(tmp_path / "mvar.pth"), "--model", NAME,
                  "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "README.md").is_file()
    gen = load_pretrained(tmp_path / "gen").eval()
    assert gen.mode == "mvar" and bool(gen.tokenizer_attached)
    ids, toks = batch
    labels = torch.tensor([0, 29])
    with torch.no_grad():
        torch.testing.assert_close(gen.logits(toks, Condition(labels=labels)),
                                   ref_mvar_logits(mvar_sd, vae_sd, ids, labels, SCALES), atol=1e-4, rtol=1e-4)
    # without --tokenizer, or into a VAR config: refused with exit code 2
    assert arzoo(["convert", "--from", "mvar", str(tmp_path / "mvar.pth"), "--model", NAME,
                  "--out", str(tmp_path / "gen2")]) == 2
    assert arzoo(["convert", "--from", "mvar", str(tmp_path / "mvar.pth"), "--model", "generator/var-tiny",
                  "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "gen3")]) == 2


@pytest.mark.slow
def test_paper_size_mvar_d16_every_tensor_lands():
    vae = random_state(vqvae_layout(160, (1, 1, 2, 2, 4), 2, 32, 32, 4096, 10))
    tok = zoo.create("tokenizer/msvq-var")
    load_state_strict(tok, convert.find("var", "tokenizer/msvq-var").fn(vae, tok), "vae")
    del vae
    scales = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    sd = random_state(var_layout(16, 1024, 16, 4096, 32, 1000, scales), scales=scales)
    lv = levels(scales)
    sd["attn_bias_for_masking"] = torch.where(lv[:, None] == lv[None], 0.0, -torch.inf)[None, None]
    conv = convert.find("mvar", "generator/mvar-d16")
    gen = zoo.create("generator/mvar-d16", spec=tok.spec)
    args = {"depth": 16, "patch_nums": tuple(scales), "kernel_size": 7, "refine_step": 8, "anorm": True, "saln": False}
    load_state_strict(gen, conv.fn({"args": args, "mvar_wo_ddp": sd}, gen, tokenizer=tok), "mvar-d16")
    n_ref = sum(v.numel() for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")
                and not k.endswith("zero_k_bias"))
    assert sum(p.numel() for p in gen.parameters() if p.requires_grad) == n_ref  # ~310M
    torch.testing.assert_close(gen.state_dict()["transformer.blocks.15.ada_lin.1.weight"],
                               sd["blocks.15.ada_lin.1.weight"])
