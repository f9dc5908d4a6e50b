"""VAR / MVAR as the reference builds them (issue 16): the next-scale input is the tokenizer's
frozen codebook + φ, the head has a bias, and MVAR trains one chunk per optimizer step."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from generators.base import Condition
from zoo.tokens import IncompatibleTokens, random_tokens


@pytest.fixture(scope="module")
def msvq():
    torch.manual_seed(0)
    tok = zoo.create("tokenizer/msvq-tiny")
    with torch.no_grad():  # non-trivial φ so that dropping it would show
        for p in tok.quantizer.phis.parameters():
            p.normal_(0, 0.3)
    return tok.eval()


def _gen(name="generator/var-tiny", **kw):
    torch.manual_seed(1)
    return zoo.create(name, depth=1, dim=32, heads=2, **kw)


def test_inputs_are_the_tokenizers_fhat_with_phi(msvq):
    g = _gen()
    g.attach_tokenizer(msvq)
    assert bool(g.tokenizer_attached)
    tokens = random_tokens(g.spec, 2, generator=torch.Generator().manual_seed(0))
    ids = [t.long() for t in tokens.data]
    cvec = g.class_emb(torch.tensor([0, 1]))
    x = g._inputs(ids, cvec) - g._lvl_pos(cvec.device)
    for k in range(1, g.num_scales):
        want = msvq.quantizer.fhat_upto(ids, k).flatten(2).transpose(1, 2)  # (B, p_k², cvae)
        a, b = g.offsets[k], g.offsets[k + 1]
        torch.testing.assert_close(x[:, a:b], g.word_embed(want), atol=1e-5, rtol=1e-5)
    # without φ (the old "learned" path with the same codebook) the inputs differ
    plain = msvq.quantizer.vq.lookup(ids[0].clamp_min(0))
    assert not torch.allclose(msvq.quantizer.phi(0, plain), plain)


def test_codebook_and_phi_frozen_and_saved(msvq, tmp_path):
    g = _gen()
    g.attach_tokenizer(msvq)
    tokens = random_tokens(g.spec, 2, generator=torch.Generator().manual_seed(0))
    g.train()
    g.loss(tokens, Condition(labels=torch.tensor([0, 1])))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in g.vq_proxy.parameters())
    assert g.word_embed.weight.grad is not None
    g.save_pretrained(tmp_path / "g")
    back = zoo.checkpoint.load_pretrained(tmp_path / "g")
    assert bool(back.tokenizer_attached)
    for (k, a), (_, b) in zip(g.vq_proxy.state_dict().items(), back.vq_proxy.state_dict().items()):
        assert torch.equal(a, b), k


def test_training_without_tokenizer_warns():
    g = _gen().train()
    tokens = random_tokens(g.spec, 2)
    with pytest.warns(UserWarning, match="attach_tokenizer"):
        g.loss(tokens, Condition(labels=torch.tensor([0, 1])))


def test_attach_wrong_tokenizer_names_both():
    g = _gen()
    with pytest.raises(IncompatibleTokens, match="tokenizer/vq-tiny"):
        g.attach_tokenizer(zoo.create("tokenizer/vq-tiny"))
    other = zoo.create("tokenizer/msvq-tiny", phi="none")
    with pytest.raises(IncompatibleTokens, match="phi"):
        g.attach_tokenizer(other)


def test_head_has_bias_and_var_init():
    g = _gen()
    assert g.head.proj.bias is not None and torch.equal(g.head.proj.bias, torch.zeros_like(g.head.proj.bias))
    std = (1 / 32 / 3) ** 0.5
    w = g.head.proj.weight
    assert 0 < w.abs().max() <= 0.02 * 6 * std  # trunc_normal(std) * 0.02
    zoo_head = _gen(head_bias=False, init_head=None)
    assert zoo_head.head.proj.bias is None and not zoo_head.head.proj.weight.any()


def test_mvar_cycles_one_chunk_per_step(msvq):
    g = _gen("generator/mvar-tiny", class_dropout=0.0)
    g.attach_tokenizer(msvq)
    g.train()
    tokens = random_tokens(g.spec, 2, generator=torch.Generator().manual_seed(0))
    cond = Condition(labels=torch.tensor([0, 1]))
    with torch.no_grad():
        logits = g.logits(tokens, cond)  # all scales; MVAR chunks are independent
    tgt = torch.cat([t.flatten(1) for t in tokens.data], 1).long()
    seen = []
    for _ in range(2 * len(g.chunks)):
        out = g.loss(tokens, cond)
        chunk = g.chunks[len(seen) % len(g.chunks)]
        seen.append(int(out["chunk"]))
        a, b = g.offsets[chunk[0]], g.offsets[chunk[-1] + 1]
        want = F.cross_entropy(logits[:, a:b].flatten(0, 1).float(), tgt[:, a:b].flatten())
        torch.testing.assert_close(out["loss"].detach(), want, atol=1e-5, rtol=1e-5)
    assert seen == [c[0] for c in g.chunks] * 2
    # evaluation (no grad) still scores every token
    with torch.no_grad():
        full = g.loss(tokens, cond)["loss"]
    torch.testing.assert_close(full, F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten()),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_generator_attaches_the_shards_tokenizer(tmp_path, msvq, fresh_accelerate):
    # end to end: extract with a (random) msvq-tiny, train var-tiny two steps; the exported
    # generator carries the tokenizer's exact codebook and φ
    from train import extract
    from train import generator as train_generator

    msvq.save_pretrained(tmp_path / "tok")
    extract.main(["--tokenizer", str(tmp_path / "tok"), "--data", "shapes", "--num", "8", "--out",
                  str(tmp_path / "tokens"), "--batch-size", "8", "--num-workers", "0"])
    train_generator.main(["--model", "generator/var-tiny", "--tokens", str(tmp_path / "tokens"), "--out",
                          str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--num-workers", "0",
                          "--eval-samples", "4", "--set", "depth=1", "--set", "dim=32", "--set", "heads=2"])
    g = zoo.checkpoint.load_pretrained(tmp_path / "run" / "final")
    assert bool(g.tokenizer_attached)
    for k, v in msvq.quantizer.state_dict().items():
        assert torch.equal(g.vq_proxy.state_dict()[k], v), k
    assert g.trained_on["fingerprint"] == zoo.checkpoint.fingerprint(msvq)


def test_mvar_train_chunks_rule_follows_the_scale_count():
    import zoo
    from zoo.tokens import TokenSpec
    for top, want in ((8, ((0, 1, 2, 3, 4), (5,), (6,))), (16, (tuple(range(8)), (8,), (9,)))):
        scales = [(s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) if s < top] + [(top, top)]
        spec = TokenSpec("discrete", "pyramid", scales, vocab_size=64)
        g = zoo.create("generator/mvar-tiny", spec=spec, fhat="learned")
        assert g.chunks == want
    with pytest.raises(ValueError):
        zoo.create("generator/mvar-tiny", train_chunks="all")
