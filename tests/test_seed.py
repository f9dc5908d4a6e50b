"""SEED tokenizer (tokenizers_vis/seed.py) and the diffusion decoder it shares with the slot tokenizer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from tokenizers_vis.diffusion_decoder import DiffusionDecoder
from tokenizers_vis.seed import SEEDTokenizer
from zoo.checkpoint import load_pretrained
from zoo.tokens import Tokens

CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green triangle"]


class FakeTeacher(nn.Module):
    """Stands in for the frozen encoder: a fixed 8x8-stride conv -> (B, 16, 8, 8) patch features."""

    def __init__(self, channels=16):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.conv = nn.Conv2d(3, channels, 8, 8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)

    def patch_features(self, images):
        return self.conv(images)


SMALL = {"image_size": 64, "teacher": "none", "context_dim": 16, "context_pos": True, "num_queries": 5, "dim": 32,
         "depth": 2, "heads": 4, "cross_attention_freq": 1, "ffn_hidden": None, "ffn_multiple": 16,
         "codebook_size": 64, "codebook_dim": 8, "recon_depth": 1, "gen_blocks": 1, "gen_depth": 1,
         "gen_queries": 1, "gen_dim": 32, "text_dim": 32, "text_depth": 1, "itc_dim": 16,
         "decoder_size": 32, "decoder_channels": [16, 32], "decoder_layers": 1, "decoder_attn_levels": 1,
         "decoder_heads": 2, "sample_steps": 3}


def small_seed(**kw):
    torch.manual_seed(0)
    m = SEEDTokenizer(**{**SMALL, **kw})
    m.teacher.set(FakeTeacher())
    return m


def images(b=4, seed=0):
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grads_of(model, prefix):
    ps = [p for n, p in model.named_parameters() if n.startswith(prefix)]
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)


# ---- the causal Q-Former ------------------------------------------------------------------------

def test_perturbing_query_j_leaves_earlier_queries_unchanged():
    m = small_seed().eval()
    ctx = m.context(m.teacher_features(images(2)))
    base = m.qformer.query_tokens.expand(2, -1, -1).clone()
    j = 2
    pert = base.clone()
    pert[:, j] += 0.5 * torch.randn(2, m.dim)
    with torch.no_grad():
        a, b = m.qformer(ctx, base), m.qformer(ctx, pert)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3
    assert (a[:, j + 1:] - b[:, j + 1:]).abs().max() > 1e-4   # later queries do see it


def test_contrastive_feature_comes_from_the_last_query():
    m = small_seed().train()
    q = m.causal_embeddings(images(4)).detach().requires_grad_(True)
    m.itc_loss(m.contrastive_feature(q), CAPTIONS).backward()
    assert q.grad[:, :-1].abs().max() == 0
    assert q.grad[:, -1].abs().max() > 0


def test_legacy_vq_loss_equals_the_formula():
    """``||sg(z_q) - z||^2 + 0.25 ||z_q - sg(z)||^2`` (taming legacy): beta on the codebook term."""
    m = small_seed().train()
    vq = m.quantizer
    assert vq.legacy and not vq.l2_norm and vq.beta == 0.25
    z = torch.randn(3, 8, 5, 1, requires_grad=True)
    _, idx, losses = vq(z)
    codes = vq.embedding.weight
    zf = z.detach().movedim(1, -1).reshape(-1, 8)
    nearest = torch.cdist(zf, codes.detach()).argmin(1)
    assert torch.equal(idx.reshape(-1), nearest)
    zq = codes.detach()[nearest]
    mse = (zf - zq).pow(2).mean()
    torch.testing.assert_close(losses["loss"], 1.25 * mse)
    losses["loss"].backward()
    # gradients tell the two terms apart: weight 1 on the encoder side, 0.25 on the codebook side
    n = zf.numel()
    torch.testing.assert_close(z.grad.movedim(1, -1).reshape(-1, 8), 2 * (zf - zq) / n)
    want = torch.zeros_like(codes).index_add_(0, nearest, 0.25 * 2 * (zq - zf) / n)
    torch.testing.assert_close(codes.grad, want)


# ---- stages ----------------------------------------------------------------------------------------

def test_stage1_trains_only_the_qformer_side_and_needs_captions():
    m = small_seed(stage=1).train()
    with pytest.raises(ValueError, match="captions"):
        m(images(4))
    recon, losses = m(images(4), captions=CAPTIONS)
    assert recon is None and set(losses) >= {"loss", "itc"}
    losses["loss"].backward()
    assert grads_of(m, "qformer") and grads_of(m, "text_encoder") and grads_of(m, "vision_proj")
    assert not grads_of(m, "quantizer") and not grads_of(m, "decoder") and not grads_of(m, "reverse_qformer")


def test_stage2_freezes_the_qformer():
    m = small_seed(stage=2).train()
    recon, losses = m(images(4))
    assert recon is None and {"vq", "rec_cos", "gen_mse"} <= set(losses)
    losses["loss"].backward()
    assert grads_of(m, "quantizer") and grads_of(m, "recon_head") and grads_of(m, "reverse_qformer")
    assert not grads_of(m, "qformer.") and not grads_of(m, "decoder")
    w = m.weights
    torch.testing.assert_close(losses["loss"], w["vq"] * losses["vq"] + w["recon"] * losses["rec_cos"]
                               + w["gen"] * losses["gen_mse"])


def test_stage3_trains_only_the_decoder():
    m = small_seed(stage=3).train()
    x = images(4)
    recon, losses = m(x)
    assert recon.shape == x.shape and set(losses) == {"loss", "diffusion"}
    losses["loss"].backward()
    assert grads_of(m, "decoder")
    assert not grads_of(m, "qformer") and not grads_of(m, "quantizer") and not grads_of(m, "gen_proj")


def test_joint_stage_trains_everything_it_can():
    m = small_seed(stage=0).train()
    recon, losses = m(images(4), captions=CAPTIONS)
    assert recon.shape == (4, 3, 64, 64)
    losses["loss"].backward()
    for part in ("qformer", "text_encoder", "quantizer", "recon_head", "reverse_qformer", "decoder"):
        assert grads_of(m, part), part


def test_joint_stage_routes_only_semantic_gradients_into_the_qformer():
    """VQ / recon terms train the codebook side only (they would collapse the Q-Former)."""
    m = small_seed(stage=0).train()
    q = m.causal_embeddings(images(4))
    z_cb, z_sem, _, ql = m._quantize_routed(q, q_grad=True)
    torch.testing.assert_close(z_cb, z_sem)                       # the same codes either way
    pred = m.recon_head(m.decode_task(z_cb))
    (ql["loss"] + (1 - F.cosine_similarity(pred, q.detach(), dim=-1)).mean()).backward(retain_graph=True)
    assert not grads_of(m, "qformer.") and grads_of(m, "encode_task") and grads_of(m, "quantizer")
    m.generation_embedding(m.decode_task(z_sem)).sum().backward()
    assert grads_of(m, "qformer.")


def test_distillation_lets_stage1_train_without_captions():
    m = small_seed(stage=1, distill_weight=1.0).train()
    recon, losses = m(images(4))
    assert recon is None and "distill" in losses and "itc" not in losses
    losses["loss"].backward()
    assert grads_of(m, "qformer.") and not grads_of(m, "quantizer")


def test_generation_target_is_standardised_with_running_statistics():
    m = small_seed().train()
    f = m.teacher_features(images(8))
    t = m.generation_target(f)                    # first batch: its own mean and variance
    torch.testing.assert_close(t.mean(0), torch.zeros(32), atol=1e-4, rtol=0)
    assert int(m.gen_count) == 1
    m.eval()
    m.generation_target(f)
    assert int(m.gen_count) == 1                  # eval does not update the statistics


def test_paper_config_builds_on_meta_and_refuses_decoding():
    info = zoo.registry.info("tokenizer/seed-blip2")
    assert info["spec"] == "discrete/sequence 32 V=8192"
    m = small_seed(decoder_channels=[])
    with pytest.raises(RuntimeError, match="unCLIP"):
        m.decode(m.encode(images(1)))


# ---- decoding --------------------------------------------------------------------------------------

def count_unet_calls(decoder):
    calls = []
    decoder.unet.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_decode_is_seeded_and_honours_the_step_count():
    m = small_seed().eval()
    tok = m.encode(images(2))
    assert isinstance(tok, Tokens) and tok.data.shape == (2, 5) and int(tok.data.max()) < 64
    calls = count_unet_calls(m.decoder)
    a = m.decode(tok, steps=4)
    assert len(calls) == 4
    b = m.decode(tok, steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = m.decode(tok, steps=4, seed=1)
    assert (a - c).abs().max() > 1e-3
    calls.clear()
    m.decode(tok, steps=2, guidance_scale=3.0)   # CFG: both branches in one call per step
    assert len(calls) == 2
    assert a.shape == (2, 3, 64, 64) and a.abs().max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_diffusion_decoder_samplers_are_deterministic_given_a_generator(sampler):
    torch.manual_seed(0)
    dec = DiffusionDecoder(cond_dim=8, image_size=16, channels=[8, 16], attn_heads=2, sampler=sampler).eval()
    calls = count_unet_calls(dec)
    cond = torch.randn(2, 3, 8)
    a = dec.sample(cond, steps=5, generator=torch.Generator().manual_seed(7))
    b = dec.sample(cond, steps=5, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 10 and a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_diffusion_loss_is_the_epsilon_objective():
    torch.manual_seed(0)
    dec = DiffusionDecoder(cond_dim=8, image_size=16, channels=[8, 16], attn_heads=2, cond_dropout=0.0).train()
    x, cond = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 2, 8)
    torch.manual_seed(5)
    loss, x0 = dec.loss(x, cond)
    torch.manual_seed(5)   # replay the same noise and timesteps
    noise = torch.randn_like(x)
    t = torch.randint(0, dec.num_train_timesteps, (3,))
    ab = dec.train_scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    xt = ab.sqrt() * x + (1 - ab).sqrt() * noise
    eps = dec.denoise(xt, t, cond)
    torch.testing.assert_close(loss, F.mse_loss(eps, noise))
    torch.testing.assert_close(x0, ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1))


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_diffusion_loss_targets_of_other_parameterisations(prediction):
    torch.manual_seed(0)
    dec = DiffusionDecoder(cond_dim=8, image_size=16, channels=[8, 16], attn_heads=2, cond_dropout=0.0,
                           prediction_type=prediction).train()
    x, cond = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 2, 8)
    torch.manual_seed(5)
    loss, x0 = dec.loss(x, cond)
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    t = torch.randint(0, dec.num_train_timesteps, (2,))
    ab = dec.train_scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    xt = ab.sqrt() * x + (1 - ab).sqrt() * noise
    out = dec.denoise(xt, t, cond)
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x if prediction == "v_prediction" else x
    torch.testing.assert_close(loss, F.mse_loss(out, target))
    want_x0 = ab.sqrt() * xt - (1 - ab).sqrt() * out if prediction == "v_prediction" else out
    torch.testing.assert_close(x0, want_x0.clamp(-1, 1))


def test_save_load_round_trip(tmp_path):
    m = small_seed().eval()
    x = images(2)
    m.save_pretrained(tmp_path / "seed")
    back = load_pretrained(tmp_path / "seed")
    back.teacher.set(m.teacher.model)
    assert back.config == m.config and back.stage == 0
    assert back.encode(x) == m.encode(x)
    torch.testing.assert_close(back.decode(m.encode(x)), m.decode(m.encode(x)), rtol=0, atol=0)


def test_tiny_registry_config_with_the_shapes_teacher():
    from zoo.data.shapes import ShapesDataset

    m = zoo.create("tokenizer/seed-tiny").eval()
    assert m.num_params() < 3e6
    x = torch.stack([ShapesDataset(split="test", length=2)[i]["image"] for i in range(2)])
    tok = m.encode(x)
    assert tok.data.shape == (2, 8) and tok.spec.ordered is False
    assert m.generation_target(m.teacher_features(x)).shape == (2, 256)
