"""TokenFlow (arXiv 2412.03069): dual codebook with one shared index, multi-scale, two decoders."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tokenizers_vis.quantizers.dual import DualCodebook, DualMultiScaleVQ
from tokenizers_vis.tokenflow import TokenFlowTokenizer
from zoo.tokens import Tokens, random_tokens

torch.set_num_threads(1)


def _random_codebook(K=37, ds=6, dp=3, w=1.0, seed=0):
    torch.manual_seed(seed)
    q = DualCodebook(K, ds, dp, pix_weight=w)
    with torch.no_grad():  # raw (unnormalised) tables of varied norms: normalisation must happen
        q.sem.embedding.weight.copy_(torch.randn(K, ds) * torch.rand(K, 1) * 3)
        q.pix.embedding.weight.copy_(torch.randn(K, dp) * torch.rand(K, 1) * 3)
    return q


def _brute(z, q, w):
    """Brute force in float64: per-half normalise, explicit squared differences, weighted sum."""
    zs, zp = z.double().split([q.sem_dim, q.pix_dim], -1)
    cs, cp = q.sem.embedding.weight.double(), q.pix.embedding.weight.double()
    zs, zp, cs, cp = (F.normalize(t, dim=-1) for t in (zs, zp, cs, cp))
    d_sem = ((zs[:, None, :] - cs[None]) ** 2).sum(-1)
    d_pix = ((zp[:, None, :] - cp[None]) ** 2).sum(-1)
    return d_sem, d_pix


def _assert_argmin(idx, d):
    """``idx`` picks a minimum of ``d`` (N, K) (exact index, or a float32 near-tie)."""
    best = d.min(1).values
    picked = d.gather(1, idx.view(-1, 1)).squeeze(1)
    assert (picked - best).abs().max() < 1e-5
    assert (idx == d.argmin(1)).float().mean() > 0.98


@pytest.mark.parametrize("w", [1.0, 0.3, 4.0])
def test_shared_index_is_bruteforce_weighted_argmin(w):
    q = _random_codebook(w=w)
    z = torch.randn(300, 9) * torch.rand(300, 1) * 5
    d_sem, d_pix = _brute(z, q, w)
    joint = d_sem + w * d_pix
    _assert_argmin(q.nearest(z), joint)
    # the forward pass (channels-first map) picks the same ids
    _, idx, _ = q(z.view(3, 10, 10, 9).movedim(-1, 1))
    _assert_argmin(idx.reshape(-1), joint)
    # the pixel half matters: the joint choice is not the semantic-only one everywhere
    assert (q.nearest(z) != d_sem.argmin(1)).any()


def test_w_to_zero_is_semantic_only_and_large_w_is_pixel_led():
    z = torch.randn(300, 9)
    for w in (0.0, 1e-7):
        q = _random_codebook(w=w)
        d_sem, _ = _brute(z, q, w)
        _assert_argmin(q.nearest(z), d_sem)
    q = _random_codebook(w=1e4)
    d_sem, d_pix = _brute(z, q, 1e4)
    # with a dominant w the pixel distance of the pick is the pixel optimum
    picked = d_pix.gather(1, q.nearest(z).view(-1, 1)).squeeze(1)
    assert (picked - d_pix.min(1).values).abs().max() < 1e-4


def test_each_half_is_unit_norm_and_quantised_vector_is_the_concatenation():
    q = _random_codebook()
    cb = q.codebook()
    assert cb.shape == (37, 9)
    torch.testing.assert_close(cb[:, :6].norm(dim=1), torch.ones(37), atol=1e-5, rtol=0)
    torch.testing.assert_close(cb[:, 6:].norm(dim=1), torch.ones(37), atol=1e-5, rtol=0)
    z = torch.randn(2, 9, 4, 4) * 7
    zq, idx, losses = q(z)
    assert idx.shape == (2, 4, 4)
    torch.testing.assert_close(zq[:, :6].norm(dim=1), torch.ones(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(zq[:, 6:].norm(dim=1), torch.ones(2, 4, 4), atol=1e-5, rtol=0)
    # value = [C_sem[k], C_pix[k]] of the one index
    want = torch.cat([F.normalize(q.sem.embedding.weight, dim=-1)[idx],
                      F.normalize(q.pix.embedding.weight, dim=-1)[idx]], -1).movedim(-1, 1)
    torch.testing.assert_close(zq, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.lookup(idx), want, atol=1e-6, rtol=0)
    assert set(losses) >= {"loss", "codebook", "commit", "entropy", "usage", "perplexity"}


def test_quantiser_losses_reach_encoder_input_and_both_tables():
    q = _random_codebook()
    q.train()
    z = (torch.randn(2, 9, 4, 4) * 3).requires_grad_()
    zq, _, losses = q(z)
    (losses["loss"] + zq.sum()).backward()
    assert z.grad.abs().sum() > 0
    assert q.sem.embedding.weight.grad.abs().sum() > 0 and q.pix.embedding.weight.grad.abs().sum() > 0


def test_token_count_is_sum_of_squares():
    assert DualMultiScaleVQ(16, 4, 2, scales=(1, 2, 4, 6, 8, 10, 12, 14)).token_spec().num_tokens == 561
    m = zoo.create("tokenizer/tokenflow-tiny", teacher="none", semantic_encoder="conv").eval()
    with torch.no_grad():
        tok = m.encode(m.example_images(2, torch.Generator().manual_seed(0)))
    assert tok.to_sequence().data.shape == (2, 1 + 4 + 9 + 16 + 36 + 64)
    assert [t.shape[1:] for t in tok.data] == [(p, p) for p in (1, 2, 3, 4, 6, 8)]
    b = zoo.info("tokenizer/tokenflow-b")
    assert b["spec"].endswith("V=32768") and "14²" in b["spec"]
    assert zoo.registry.build_meta("tokenizer/tokenflow-b").spec.num_tokens == 561


def test_scale_drop_never_drops_the_first_scale():
    torch.manual_seed(0)
    q = DualMultiScaleVQ(16, 4, 2, scales=(1, 2, 3, 4), scale_drop=1.0).train()
    f = torch.randn(1, 6, 4, 4)
    seen = set()
    for _ in range(40):
        f_hat, idx, _ = q(f)
        k = q.last_dropped
        assert k is not None and 1 <= k <= 3
        assert [i for i, t in enumerate(idx) if (t < 0).any()] == [k] and (idx[k] == -1).all()
        torch.testing.assert_close(f_hat, q.indices_to_fhat(idx), atol=1e-5, rtol=0)
        seen.add(k)
    assert seen == {1, 2, 3}
    q.eval()
    q(f)
    assert q.last_dropped is None
    # the TokenFlow rate: about 10% of training steps drop a scale
    q.scale_drop = 0.1
    q.train()
    rate = sum(q._draw_drop() is not None for _ in range(1000)) / 1000
    assert 0.06 < rate < 0.14


def test_multiscale_indices_follow_the_residual():
    """Scale k's ids are the joint argmin on the area-downsampled residual left by scales < k."""
    torch.manual_seed(1)
    q = DualMultiScaleVQ(64, 6, 3, scales=(1, 2, 4), scale_drop=0.0).eval()
    f = torch.randn(2, 9, 4, 4)
    f_hat, idx, _ = q(f)
    resid = f.clone()
    for k, p in enumerate((1, 2, 4)):
        r = F.interpolate(resid, size=(p, p), mode="area") if p != 4 else resid
        flat = r.movedim(1, -1).reshape(-1, 9)
        d_sem, d_pix = _brute(flat, q.vq, 1.0)
        _assert_argmin(idx[k].reshape(-1), d_sem + d_pix)
        resid = resid - q.scale_contribution(k, idx[k])
    torch.testing.assert_close(f_hat, q.indices_to_fhat(idx), atol=1e-5, rtol=0)


def _tiny(**kw):
    torch.manual_seed(0)
    return zoo.create("tokenizer/tokenflow-tiny", **{"teacher": "none", "semantic_encoder": "conv", **kw})


def test_one_index_tensor_decodes_through_both_codebooks():
    m = _tiny().eval()
    x = m.example_images(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        f_hat, _, _ = m.quantize(x)
        tok = m.encode(x)
        sem = m.semantic_latents(tok)
        img = m.decode(tok)
        feats = m.semantic_features(tok)

        def summed(table):  # sum_k bicubic_up(table[ids_k]) by hand
            out = 0
            for t in tok.data:
                e = F.normalize(table, dim=-1)[t].movedim(-1, 1)
                out = out + (F.interpolate(e, size=(8, 8), mode="bicubic", align_corners=False)
                             if t.shape[-1] != 8 else e)
            return out

        sem_hand = summed(m.quantizer.vq.sem.embedding.weight)
        pix_hand = summed(m.quantizer.vq.pix.embedding.weight)
        torch.testing.assert_close(sem, sem_hand, atol=1e-5, rtol=0)
        torch.testing.assert_close(img, m.decode_latents(pix_hand), atol=1e-5, rtol=0)
        torch.testing.assert_close(feats, m.semantic_decoder(sem_hand), atol=1e-5, rtol=0)
        # encode's f_hat is the concatenation of the two halves read from the ids
        torch.testing.assert_close(f_hat, torch.cat([sem_hand, pix_hand], 1), atol=1e-5, rtol=0)
        assert sem.shape == (2, 32, 8, 8) and img.shape == x.shape and feats.shape == (2, 128, 8, 8)
        # each side reads only its own table
        m.quantizer.vq.pix.embedding.weight.mul_(-1)
        torch.testing.assert_close(m.semantic_latents(tok), sem, atol=0, rtol=0)
        assert not torch.allclose(m.decode(tok), img)
        m.quantizer.vq.sem.embedding.weight.mul_(-1)
        assert not torch.allclose(m.semantic_latents(tok), sem)


def test_forward_eval_matches_encode_decode_and_bad_inputs_fail():
    m = _tiny().eval()
    x = m.example_images(2, torch.Generator().manual_seed(4))
    with torch.no_grad():
        recon, losses = m(x)
        torch.testing.assert_close(recon, m.decode(m.encode(x)), atol=1e-5, rtol=1e-5)
    assert float(losses["semantic"]) == 0.0  # teacher="none": no semantic loss
    with pytest.raises(ValueError, match="64x64"):
        m.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expects tokens"):
        m.decode(random_tokens(zoo.create("tokenizer/vq-tiny").spec, 1))
    with pytest.raises(ValueError, match="last scale"):
        _tiny(scales=[1, 2, 4])
    with pytest.raises(ValueError, match="teacher='none'"):
        _tiny(semantic_encoder="teacher")
    with pytest.raises(ValueError, match="semantic_encoder must be"):
        _tiny(semantic_encoder="vit")
    with pytest.raises(ValueError, match="DualMultiScaleVQ expects"):
        m.quantizer(torch.zeros(1, 39, 8, 8))


def test_teacher_initialises_semantic_encoder_and_losses_reach_every_branch(tmp_path):
    torch.manual_seed(0)
    m = zoo.create("tokenizer/tokenflow-tiny")  # semantic encoder = ShapesNet architecture, no weights
    assert m.teacher._model is None  # building did not load the teacher
    assert not any(k.startswith("teacher") for k in m.state_dict())
    stub = zoo.create("eval/shapes-net")  # a stand-in teacher with random weights (no file I/O)
    m.teacher.set(stub)
    assert not bool(m.semantic_init)
    before = {k: v.clone() for k, v in m.semantic_encoder.state_dict().items()}
    m.train()
    x = m.example_images(2, torch.Generator().manual_seed(5))
    _, losses = m(x)
    assert bool(m.semantic_init)
    for k, v in stub.state_dict().items():
        if v.dim() >= 2:  # conv / linear weights (norm weights start at 1 in both)
            assert not torch.equal(before[k], v), k  # the copy really changed the weights
        if not k.endswith("num_batches_tracked") and "running" not in k:
            torch.testing.assert_close(m.semantic_encoder.state_dict()[k], v, rtol=0, atol=0)
    assert float(losses["semantic"]) > 0
    losses["loss"].backward()
    for name in ("semantic_encoder", "encode_task_layer", "semantic_decoder", "encoder", "decoder"):
        grads = [p.grad for p in getattr(m, name).parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name
    vq = m.quantizer.vq
    assert vq.sem.embedding.weight.grad.abs().sum() > 0 and vq.pix.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stub.parameters())  # the teacher stays frozen
    # a second step does not copy again (the encoder may now drift from the teacher)
    with torch.no_grad():
        m.semantic_encoder.body[0][0].weight.add_(1.0)
    m(x)
    assert not torch.equal(m.semantic_encoder.body[0][0].weight, stub.body[0][0].weight)

    # save/load keeps the flag (no re-copy after loading) and the outputs
    m.eval()
    m.save_pretrained(tmp_path / "tf")
    back = zoo.load_pretrained(tmp_path / "tf")
    assert isinstance(back, TokenFlowTokenizer) and back.registry_name == "tokenizer/tokenflow-tiny"
    assert back.config == m.config and bool(back.semantic_init)
    back.eval()
    with torch.no_grad():
        t1, t2 = m.encode(x), back.encode(x)
        assert t1 == t2
        torch.testing.assert_close(m.decode(t1), back.decode(t2), rtol=0, atol=0)
        torch.testing.assert_close(m.semantic_features(t1), back.semantic_features(t2), rtol=0, atol=0)


def test_real_shapes_teacher_distillation():
    """The one test with the shipped Shapes feature network as the teacher."""
    torch.manual_seed(0)
    m = zoo.create("tokenizer/tokenflow-tiny").eval()
    x = m.example_images(2, torch.Generator().manual_seed(6))
    m.init_semantic_from_teacher()  # explicit form of the first-training-step copy
    teacher = m.teacher.model
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # the copy computes the teacher's own patch features
        torch.testing.assert_close(m.semantic_encoder.patch_features(x), teacher.patch_features(x))
    m.train()
    _, losses = m(x)
    assert 0 < float(losses["semantic"]) <= 2
    losses["loss"].backward()
    assert m.semantic_encoder.body[4][0].weight.grad.abs().sum() > 0


def test_generators_take_tokenflow_tokens():
    m = _tiny().eval()
    x = m.example_images(2, torch.Generator().manual_seed(7))
    with torch.no_grad():
        tok = m.encode(x)
    torch.manual_seed(0)
    for name in ("generator/raster-ar-tiny", "generator/var-tiny"):
        g = zoo.create(name, spec=tok.spec)
        out = g.loss(tok, g.example_condition(2, torch.Generator().manual_seed(0)))
        assert torch.isfinite(out["loss"]) and out["loss"] > 0, name
    # the raster AR reads the pyramid as one flat sequence of sum p^2 ids
    assert Tokens.from_sequence(tok.to_sequence().data, tok.spec) == tok
