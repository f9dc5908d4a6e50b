"""UniWeTok (arXiv 2602.14178): 128-bit binary tokens, SigLu, Pre-Post Distillation, GAP prior."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from tokenizers_vis.quantizers.binary import BinaryQuantizer
from tokenizers_vis.uniwetok import UniWeTokTokenizer, siglu
from zoo.tokens import Tokens, TokenSpec, bits_to_groups, groups_to_bits

# thinner than the registered tiny config, same structure (tests run on 2 shared CPU cores)
SMALL = {"image_size": 32, "ch": 8, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 32,
         "bits": 128, "group_size": 8, "norm_groups": 4, "attn_blocks": 1, "attn_heads": 2,
         "attn_ffn_multiple": 32, "registers": 2, "teacher": "eval/shapes-net:shapes",
         "teacher_dim": 16, "distill_hidden": 16, "gap_dim": 32, "gap_depth": 1, "gap_heads": 2,
         "gap_ffn_multiple": 32}


class FakeTeacher(nn.Module):
    """A frozen stand-in with ``patch_features``: (B, 16, 4, 4) from 8x8 average pooling."""

    def __init__(self, dim=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 1)

    def patch_features(self, images):
        return self.proj(nn.functional.avg_pool2d(images, 8))


def _small(**kw):
    torch.manual_seed(0)
    tok = UniWeTokTokenizer(**{**SMALL, **kw})
    if tok.teacher.enabled:
        tok.teacher.set(FakeTeacher())  # never loads the real teacher
    return tok


def _images(B=2, S=32, seed=0):
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grads(module):
    return [p.grad for p in module.parameters()]


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


class _MaxTensor(TorchDispatchMode):
    """Largest dimension and numel of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.max_dim = self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_dim = max([self.max_dim, *t.shape])
                self.max_numel = max(self.max_numel, t.numel())
        return out


# ---- 2^128 codebook never built, bits round trip ----------------------------------------------
def test_forward_backward_never_builds_a_big_code_axis():
    tok = _small()
    x = _images()
    with _MaxTensor() as m:
        _, losses = tok(x)
        losses["loss"].backward()
    # the largest tensors are the group-factorised entropy tables (tokens, groups, 2^8) and their
    # (tokens * groups, 2^8) views: 32 tokens x 16 groups; a 2^16 code axis would break both bounds
    n_tok, groups = 2 * 4 * 4, 128 // 8
    assert m.max_dim <= n_tok * groups and m.max_numel <= n_tok * groups * 2 ** 8
    assert {"distill_pre", "distill_post", "gap"} <= set(losses)
    with _MaxTensor() as m2:
        torch.zeros(2 ** 17).sum()
    assert m2.max_dim == 2 ** 17  # the tracker sees tensors built inside ops (the test can fail)


def test_encode_bits_groups_round_trip_and_decode_shape():
    tok = _small().eval()
    x = _images(3)
    with torch.no_grad():
        tokens = tok.encode(x)
        assert tokens.spec == tok.spec and tok.spec.kind == "binary" and tok.spec.bits == 128
        assert tokens.data.shape == (3, 4, 4, 128) and tokens.data.dtype == torch.uint8
        Tokens(tokens.data, tok.spec)  # validates values in {0, 1}
        for g in (8, 16, 32):
            ids = bits_to_groups(tokens.data, g)
            assert ids.shape == (3, 4, 4, 128 // g)
            assert torch.equal(groups_to_bits(ids, g), tokens.data)
        # bits are the signs of the bounded pre-quantisation latent
        z = tok.encode_latent(x)
        assert torch.equal(tokens.data.movedim(-1, 1).bool(), z >= 0)
        recon = tok.decode(tokens)
        assert recon.shape == x.shape and torch.isfinite(recon).all()
        # decode reads the bits as ±1 codes: the same as decoding the STE codes of a forward pass
        z_q, _, _ = tok.quantize(x)
        torch.testing.assert_close(tok.decode_latents(z_q), recon)


def test_decode_refuses_other_tokens():
    tok = _small().eval()
    other = Tokens(torch.zeros(1, 4, 4, 32, dtype=torch.uint8), TokenSpec("binary", "grid", (4, 4), bits=32))
    with pytest.raises(ValueError, match="128bit"):
        tok.decode(other)


# ---- SigLu ------------------------------------------------------------------------------------
def test_siglu_formula_and_bounds():
    x = torch.tensor([-1e30, -1e4, -88.0, -15.0, -1.0, 0.0, 1.0, 15.0, 88.0, 1e4, 1e30])
    y = siglu(x)
    assert torch.isfinite(y).all() and (y.abs() <= 1).all()  # closed bound in floating point
    assert (y[3:8].abs() < 1).all()  # open bound where float32 can represent it
    torch.testing.assert_close(siglu(torch.linspace(-20, 20, 101)), torch.tanh(torch.linspace(-20, 20, 101) / 2))
    torch.testing.assert_close(siglu(-x), -y)  # odd: sign(siglu(x)) = sign(x), bits unchanged
    t = torch.zeros(1, requires_grad=True)
    siglu(t).sum().backward()
    assert torch.allclose(t.grad, torch.tensor([0.5]))


def test_encoder_latent_is_bounded_even_with_huge_weights():
    tok = _small().eval()
    with torch.no_grad():
        tok.quant_conv.weight.mul_(1e4)
        tok.quant_conv.bias.fill_(1e3)
        z = tok.encode_latent(_images() * 1e3)
    assert z.shape == (2, 128, 4, 4) and torch.isfinite(z).all() and z.abs().max() <= 1


def test_siglu_makes_entropy_and_commitment_agree():
    """The documented reason for SigLu: with z unbounded, the per-sample entropy pushes |z| up
    while commitment pulls |z| back to 1 (opposite gradients for |z| > 1); with z = siglu(x) the
    two gradients w.r.t. the encoder output x have the same sign everywhere."""
    # a soft temperature keeps the code posteriors away from float saturation
    q = BinaryQuantizer(8, group_size=8, commit_weight=1.0, entropy_weight=1.0, inv_temperature=0.5)
    x = torch.tensor([-3.0, -2.0, -1.2, -0.5, 0.3, 0.8, 1.5, 2.5]).repeat_interleave(8)
    x = x.view(-1, 8)  # 8 tokens of 8 equal channels

    def grads(z_fn):
        xs = x.clone().requires_grad_(True)
        z = z_fn(xs)
        commit = ((z - torch.where(z >= 0, 1.0, -1.0)) ** 2).mean()
        sample_h, _ = q.entropies(z)
        g_commit = torch.autograd.grad(commit, xs, retain_graph=True)[0]
        g_ent = torch.autograd.grad(sample_h, xs)[0]
        return g_commit, g_ent

    g_c, g_e = grads(lambda v: v)
    big = x.abs() > 1
    assert ((g_c * g_e)[big] < 0).all()  # conflict without a bound
    g_c, g_e = grads(siglu)
    assert ((g_c * g_e) > 0).all()  # agreement with SigLu


# ---- Pre-Post Distillation ---------------------------------------------------------------------
def test_pre_and_post_distillation_reach_the_loss_with_gradients():
    tok = _small(gap_weight=0.0)
    x = _images()
    z = tok.encode_latent(x)
    z_q, _, _ = tok.quantizer(z)
    terms = tok.distill_losses(x, z, z_q)
    assert set(terms) == {"distill_pre", "distill_post"}
    for v in terms.values():
        assert v.dim() == 0 and torch.isfinite(v) and 0 <= float(v.detach()) <= 2
    # pre term: its head and the encoder, not the post head
    tok.zero_grad()
    terms["distill_pre"].backward(retain_graph=True)
    assert _nonzero(_grads(tok.pre_head)) and _nonzero(_grads(tok.encoder))
    assert not _nonzero(_grads(tok.post_head))
    # post term: its head and, through the straight-through binary codes, the encoder
    tok.zero_grad()
    terms["distill_post"].backward()
    assert _nonzero(_grads(tok.post_head)) and _nonzero(_grads(tok.encoder))
    assert _nonzero(_grads(tok.quant_conv)) and not _nonzero(_grads(tok.pre_head))
    # the post head sees the binary codes: its input has only ±1 values
    seen = []
    h = tok.post_head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    tok.distill_losses(x, z.detach(), tok.quantizer(z.detach())[0])
    h.remove()
    assert torch.equal(seen[0].abs(), torch.ones_like(seen[0]))


@pytest.mark.parametrize("zero", ["pre", "post"])
def test_distillation_weight_zero_removes_its_term(zero):
    tok = _small(gap_weight=0.0, **{f"{zero}_distill_weight": 0.0})
    _, losses = tok(_images())
    other = "post" if zero == "pre" else "pre"
    assert f"distill_{zero}" not in losses and f"distill_{other}" in losses
    losses["loss"].backward()
    assert not _nonzero(_grads(getattr(tok, f"{zero}_head")))
    assert _nonzero(_grads(getattr(tok, f"{other}_head")))


def test_distillation_weights_scale_the_total():
    x = _images()
    _, base = _small(gap_weight=0.0, pre_distill_weight=0.0, post_distill_weight=0.0)(x)
    _, full = _small(gap_weight=0.0, pre_distill_weight=0.5, post_distill_weight=2.0)(x)
    expect = base["loss"] + 0.5 * full["distill_pre"] + 2.0 * full["distill_post"]
    torch.testing.assert_close(full["loss"], expect)


def test_teacher_none_has_no_heads_and_no_teacher_in_state_dict():
    tok = _small(teacher="none")
    assert tok.pre_head is None and tok.post_head is None
    _, losses = tok(_images())
    assert "distill_pre" not in losses and torch.isfinite(losses["loss"])
    tok2 = _small()
    tok2(_images())  # the (fake) teacher ran
    assert not [k for k in tok2.state_dict() if "teacher" in k or k.startswith("proj")]


def test_teacher_dim_mismatch_is_explained():
    tok = _small(teacher_dim=24, distill_hidden=8)
    with pytest.raises(ValueError, match="teacher_dim=24"):
        tok(_images())


def test_real_shapes_net_teacher():
    torch.manual_seed(0)
    tok = zoo.create("tokenizer/uniwetok-tiny")
    assert tok.teacher._model is None  # building does not load the teacher
    x = tok.example_images(2, torch.Generator().manual_seed(0))
    _, losses = tok(x)
    assert tok.teacher._model is not None
    assert 0 < float(losses["distill_pre"]) < 2 and 0 < float(losses["distill_post"]) < 2
    assert not any("teacher" in k for k in tok.state_dict())


# ---- Generative-Aware Prior --------------------------------------------------------------------
def test_gap_loss_present_and_differentiable():
    tok = _small(pre_distill_weight=0.0, post_distill_weight=0.0, gap_weight=1.0)
    x = _images()
    z_q, _, _ = tok.quantize(x)
    gap, acc = tok.gap_loss(z_q)
    assert gap.dim() == 0 and torch.isfinite(gap) and gap > 0 and 0 <= float(acc) <= 1
    gap.backward()
    assert _nonzero(_grads(tok.prior)) and _nonzero(_grads(tok.encoder))  # inputs/targets via STE
    _, losses = tok(x)
    assert "gap" in losses and "gap_acc" in losses


def test_gap_target_grad_flag():
    """With gap_target_grad=False the GAP gradient reaches the codes through the inputs only."""
    tok = _small(gap_target_grad=False)
    codes = (torch.randint(0, 2, (2, 16, 128)).float() * 2 - 1).requires_grad_(True)
    tok.prior(codes, target_grad=False)[0].backward()
    g_in_only = codes.grad.clone()
    codes.grad = None
    tok.prior(codes, target_grad=True)[0].backward()
    assert g_in_only[:, -1].abs().sum() == 0  # the last token is never an input
    assert codes.grad[:, -1].abs().sum() > 0  # ... but it is a target


def test_gap_prior_is_causal():
    tok = _small()
    codes = torch.randint(0, 2, (1, 16, 128)).float() * 2 - 1
    with torch.no_grad():
        a = tok.prior.logits(codes)
        codes2 = codes.clone()
        codes2[0, 6] = -codes2[0, 6]
        b = tok.prior.logits(codes2)
    diff = (a - b).abs().sum(-1)[0]
    assert diff[:7].max() == 0 and diff[7:].min() > 0  # token 6 is the input of slot 7 onwards


def test_gap_is_not_part_of_encode_decode():
    tok = _small().eval()
    x = _images()
    with torch.no_grad():
        t1 = tok.encode(x)
        r1 = tok.decode(t1)
        for p in tok.prior.parameters():
            p.add_(1.0)
        t2 = tok.encode(x)
        assert t1 == t2 and torch.equal(tok.decode(t2), r1)


# ---- registry, generators ------------------------------------------------------------------------
def test_registry_configs():
    from zoo import registry

    info = registry.info("tokenizer/uniwetok-tiny")
    assert info["spec"] == "binary/grid 8x8 K=128bit" and info["config"]["teacher"] == "eval/shapes-net:shapes"
    f32 = registry.info("tokenizer/uniwetok-f32")
    assert f32["spec"] == "binary/grid 8x8 K=128bit" and f32["paper_params"] is None


def test_save_load_round_trip(tmp_path):
    tok = _small()
    tok.save_pretrained(tmp_path / "ckpt")
    back = zoo.load_pretrained(tmp_path / "ckpt")
    assert type(back) is UniWeTokTokenizer and back.config == tok.config
    assert back.teacher._model is None  # the teacher is not in the checkpoint
    x = _images()
    tok.eval()
    back.eval()
    with torch.no_grad():
        assert tok.encode(x) == back.encode(x)
        torch.testing.assert_close(back.decode(back.encode(x)), tok.decode(tok.encode(x)), rtol=0, atol=0)
        back.teacher.set(tok.teacher.model)
        torch.testing.assert_close(back(x)[1]["loss"], tok(x)[1]["loss"], rtol=0, atol=0)


def test_bitwise_raster_ar_trains_on_uniwetok_tokens():
    tok = _small().eval()
    with torch.no_grad():
        tokens = tok.encode(_images(2))
    gen = zoo.create("generator/raster-ar-tiny", spec=tok.spec)
    assert type(gen.head).__name__ == "BitHead"
    out = gen.loss(tokens, gen.example_condition(2, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out["loss"]) and 0 <= float(out["acc"]) <= 1
    out["loss"].backward()
    assert _nonzero(_grads(gen))


def test_bad_config():
    with pytest.raises(ValueError, match="2D RoPE"):
        UniWeTokTokenizer(**{**SMALL, "attn_heads": 3})
    with pytest.raises(ValueError, match="divisible"):
        UniWeTokTokenizer(**{**SMALL, "bits": 36})
