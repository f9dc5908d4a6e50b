"""Shared generator blocks: transformer + KV cache + RoPE + adaLN, sampling, heads, conditioning."""
import pytest
import torch
import torch.nn.functional as F

from generators.base import Condition
from generators.conditioning import ClassEmbedder, ConditionEncoder, WordTextEncoder
from generators.heads import BitHead, CategoricalHead, OutputHead, TokenEmbedding, make_head
from generators.sampling import cfg_logits, filter_logits, sample_bits, sample_categorical
from generators.transformer import (Block, KVCache, RotaryEmbedding, Transformer, apply_rotary,
                                    causal_mask, swiglu_hidden)
from zoo.tokens import IncompatibleTokens, TokenSpec


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: threads only add overhead


def _randomize(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return module


def _grid_positions(h, w, prefix=1):
    idx = torch.arange(h * w)
    tok = torch.stack((idx // w, idx % w), -1)
    return torch.cat((torch.full((prefix, 2), -1), tok))


# ---- transformer pieces --------------------------------------------------------------------

def test_swiglu_hidden_matches_llamagen_widths():
    # LlamaGen: find_multiple(int(2 * 4 * dim / 3), 256)
    assert swiglu_hidden(768) == 2048
    assert swiglu_hidden(1024) == 2816
    assert swiglu_hidden(1280) == 3584
    assert swiglu_hidden(32, 16) == 96  # int(85.33) = 85 -> 96


def test_causal_cached_one_token_per_step_equals_full_forward():
    torch.manual_seed(0)
    T = 9
    tr = _randomize(Transformer(32, 2, 4, ffn_multiple=16, rope="1d")).eval()
    x = torch.randn(2, T, 32)
    full = tr(x, torch.arange(T), is_causal=True)
    tr.setup_cache(2, T + 3)  # a longer cache than needed: unwritten slots must stay masked
    steps = [tr(x[:, :4], torch.arange(4), input_pos=torch.arange(4), is_causal=True)]
    for t in range(4, T):
        steps.append(tr(x[:, t:t + 1], torch.tensor([t]), input_pos=torch.tensor([t]), is_causal=True))
    tr.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_several_slots_per_step_with_custom_mask():
    """NAR-style: feed a prefix, then whole anti-diagonals (non-contiguous raster slots)
    through the cache with a proximity mask; equals one full masked forward."""
    torch.manual_seed(0)
    h = w = 3
    P, N = 1, h * w
    pos = _grid_positions(h, w, P)
    d = torch.cat((torch.tensor([-1]), pos[P:].sum(-1)))  # prefix has "distance" -1
    mask = d[None, :] <= d[:, None]                       # (T, T): earlier diagonals + own one
    tr = _randomize(Transformer(32, 2, 2, ffn_multiple=16, rope="2d")).eval()
    x = torch.randn(2, P + N, 32)
    full = tr(x, pos, mask=mask[None, None])
    tr.setup_cache(2, P + N + 2)
    out = torch.zeros_like(full)
    for dist in range(-1, h + w - 1):
        slots = torch.nonzero(d == dist).flatten()
        out[:, slots] = tr(x[:, slots], pos[slots], mask=mask, input_pos=slots)
    tr.clear_cache()
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    # and the mask matters: a plain causal forward gives different outputs
    assert not torch.allclose(tr(x, pos, is_causal=True), full, atol=1e-3)


def test_kv_cache_update_writes_exactly_the_given_slots():
    c = KVCache(1, 2, 6, 4)
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).view(1, 2, 2, 4) + 1
    kc, vc = c.update(torch.tensor([4, 1]), k, -k)
    torch.testing.assert_close(kc[:, :, 4], k[:, :, 0])
    torch.testing.assert_close(kc[:, :, 1], k[:, :, 1])
    torch.testing.assert_close(vc[:, :, 1], -k[:, :, 1])
    assert kc[:, :, [0, 2, 3, 5]].abs().sum() == 0
    with pytest.raises(ValueError, match="beyond the cache length"):
        c.update(torch.tensor([6, 0]), k, k)
    with pytest.raises(ValueError, match="setup_cache"):
        c.update(torch.tensor([0, 1]), torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4))


def test_cached_mode_needs_a_mask_or_causal():
    tr = Transformer(16, 1, 2, ffn_multiple=16, rope="1d")
    tr.setup_cache(1, 4)
    with pytest.raises(ValueError, match="is_causal"):
        tr(torch.randn(1, 1, 16), input_pos=torch.tensor([0]))


def test_additive_mask_equals_boolean_mask():
    torch.manual_seed(0)
    tr = _randomize(Transformer(16, 1, 2, ffn_multiple=16, rope=None)).eval()
    x = torch.randn(2, 5, 16)
    m = torch.rand(5, 5) > 0.4
    m |= torch.eye(5, dtype=torch.bool)
    add = torch.zeros(5, 5).masked_fill(~m, float("-inf"))
    torch.testing.assert_close(tr(x, mask=m), tr(x, mask=add))
    torch.testing.assert_close(tr(x, mask=causal_mask(5)), tr(x, is_causal=True))


def _score(rope, q, k, pq, pk):
    cq, sq = rope(torch.tensor([pq]))
    ck, sk = rope(torch.tensor([pk]))
    return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()


def test_rope_2d_score_depends_only_on_relative_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, ndim=2)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    base = _score(rope, q, k, (2, 5), (1, 3))
    for shift in [(0, 1), (3, 0), (4, 7), (10, -2)]:
        s = _score(rope, q, k, (2 + shift[0], 5 + shift[1]), (1 + shift[0], 3 + shift[1]))
        torch.testing.assert_close(s, base, atol=1e-5, rtol=1e-5)
    # not translation-trivial: a different row offset or column offset changes the score
    assert abs(_score(rope, q, k, (3, 5), (1, 3)) - base) > 1e-3
    assert abs(_score(rope, q, k, (2, 6), (1, 3)) - base) > 1e-3


def test_rope_2d_rows_rotate_first_half_columns_second_half():
    rope = RotaryEmbedding(16, ndim=2)
    x = torch.randn(1, 1, 1, 16)
    a = apply_rotary(x, *rope(torch.tensor([[3, 1]])))
    b = apply_rotary(x, *rope(torch.tensor([[3, 6]])))   # only the column changed
    c = apply_rotary(x, *rope(torch.tensor([[0, 1]])))   # only the row changed
    torch.testing.assert_close(a[..., :8], b[..., :8])
    assert not torch.allclose(a[..., 8:], b[..., 8:])
    torch.testing.assert_close(a[..., 8:], c[..., 8:])
    assert not torch.allclose(a[..., :8], c[..., :8])


def test_rope_negative_position_is_identity_and_1d_relative():
    rope = RotaryEmbedding(8, ndim=1)
    x = torch.randn(2, 2, 3, 8)
    cos, sin = rope(torch.tensor([-1, -1, -1]))
    torch.testing.assert_close(apply_rotary(x, cos, sin), x)
    cos2, sin2 = RotaryEmbedding(8, ndim=2)(torch.tensor([[-1, -1], [0, 0], [-1, 4]]))
    torch.testing.assert_close(apply_rotary(x, cos2, sin2)[:, :, [0, 2]], x[:, :, [0, 2]])
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(_score(rope, q, k, 7, 2), _score(rope, q, k, 15, 10), atol=1e-5, rtol=1e-5)
    # batched (B, T) positions give per-sample rotations
    cb, sb = rope(torch.tensor([[0, 1, 2], [5, 6, 7]]))
    y = apply_rotary(x, cb, sb)
    torch.testing.assert_close(y[1:], apply_rotary(x[1:], *rope(torch.tensor([5, 6, 7]))))


def test_adaln_block_is_identity_at_init_but_trainable():
    torch.manual_seed(0)
    blk = Block(32, 4, ffn_multiple=16, adaln_dim=12)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 12)
    torch.testing.assert_close(blk(x, is_causal=True, cond=c), x)
    # per-token conditions (B, T, C) also accepted
    torch.testing.assert_close(blk(x, cond=torch.randn(2, 5, 12)), x)
    # zero-init gates still receive gradient, so the block can learn
    (blk(x, cond=c) * torch.randn_like(x)).sum().backward()
    assert blk.adaln[1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        blk.adaln[1].bias.normal_()
    assert not torch.allclose(blk(x, cond=c), x)
    with pytest.raises(ValueError, match="adaLN"):
        blk(x)


def test_transformer_adaln_condition_changes_output_after_training_step():
    torch.manual_seed(0)
    tr = Transformer(16, 2, 2, ffn_multiple=16, rope="1d", adaln_dim=8)
    x = torch.randn(2, 4, 16)
    c1, c2 = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(tr(x, cond=c1), tr(x, cond=c2))  # zero-init: condition unused
    _randomize(tr)
    assert not torch.allclose(tr(x, cond=c1), tr(x, cond=c2))


# ---- sampling -------------------------------------------------------------------------------

def test_cfg_formula_scalar_and_per_row():
    c, u = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(cfg_logits(c, u, 2.5), u + 2.5 * (c - u))
    torch.testing.assert_close(cfg_logits(c, u, 1.0), c)
    s = torch.tensor([1.0, 0.0, 3.0])
    out = cfg_logits(c, u, s)
    torch.testing.assert_close(out[0], c[0])
    torch.testing.assert_close(out[1], u[1])
    torch.testing.assert_close(out[2], u[2] + 3 * (c[2] - u[2]))


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    for k in (1, 2, 3, 5):
        out = filter_logits(logits, top_k=k)
        assert (torch.isfinite(out).sum(-1) == k).all()
        kept = torch.where(torch.isfinite(out), logits, torch.full_like(logits, float("inf")))
        dropped = torch.where(torch.isfinite(out), torch.full_like(logits, -float("inf")), logits)
        assert (kept.min(-1).values >= dropped.max(-1).values).all()  # kept ones are the largest
    torch.testing.assert_close(filter_logits(logits, top_k=6), logits)


def test_top_p_keeps_the_minimal_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g) * 2
    for p in (0.05, 0.3, 0.7, 0.95):
        out = filter_logits(logits, top_p=p)
        probs = logits.softmax(-1)
        for row in range(logits.shape[0]):
            keep = torch.isfinite(out[row])
            pr = probs[row]
            n = int(keep.sum())
            assert n >= 1
            # the kept set is the n most probable tokens ...
            assert set(torch.topk(pr, n).indices.tolist()) == set(torch.nonzero(keep).flatten().tolist())
            # ... with mass >= p, and n-1 of them would not reach p (minimal)
            assert pr[keep].sum() >= p - 1e-6
            sorted_p = pr.sort(descending=True).values
            assert sorted_p[:n - 1].sum() < p + 1e-6
    # a dominant token alone is kept
    assert torch.isfinite(filter_logits(torch.tensor([[10.0, 0.0, 0.0]]), top_p=0.5)).sum() == 1


def test_top_k_then_top_p_renormalises_within_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # within the top-2 (0.4, 0.3) renormalised to (0.571, 0.429): p=0.5 keeps only the first
    out = filter_logits(logits, top_k=2, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_temperature_zero_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=g)
    torch.testing.assert_close(sample_categorical(logits, temperature=0.0), logits.argmax(-1))
    torch.testing.assert_close(sample_categorical(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(-1))
    u = torch.randn(50, 30, generator=g)
    torch.testing.assert_close(sample_categorical(logits, uncond=u, cfg=3.0, temperature=0.0),
                               cfg_logits(logits, u, 3.0).argmax(-1))
    torch.testing.assert_close(sample_bits(logits, temperature=0.0), (logits > 0).to(torch.uint8))


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(16, 100)
    a = sample_categorical(logits, top_k=20, generator=torch.Generator().manual_seed(7))
    b = sample_categorical(logits, top_k=20, generator=torch.Generator().manual_seed(7))
    c = sample_categorical(logits, top_k=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (16,)
    x = sample_bits(logits, generator=torch.Generator().manual_seed(7))
    y = sample_bits(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, y) and x.dtype == torch.uint8 and x.shape == logits.shape


def test_empirical_frequencies_match_softmax():
    n = 40000
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    ids = sample_categorical(logits.expand(n, 5), generator=g)
    freq = torch.bincount(ids, minlength=5).float() / n
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)
    # temperature sharpens/flattens as softmax(logits / T)
    ids = sample_categorical(logits.expand(n, 5), temperature=2.0, generator=g)
    freq = torch.bincount(ids, minlength=5).float() / n
    torch.testing.assert_close(freq, (logits / 2).softmax(-1), atol=0.01, rtol=0)
    # top-k renormalises over the kept set
    ids = sample_categorical(logits.expand(n, 5), top_k=2, generator=g)
    freq = torch.bincount(ids, minlength=5).float() / n
    want = torch.zeros(5)
    want[[0, 3]] = logits[[0, 3]].softmax(-1)
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    # bits: frequency of 1 = sigmoid(logit)
    bl = torch.tensor([-2.0, 0.0, 1.5])
    bits = sample_bits(bl.expand(n, 3), generator=g)
    torch.testing.assert_close(bits.float().mean(0), torch.sigmoid(bl), atol=0.01, rtol=0)


# ---- heads ----------------------------------------------------------------------------------

def test_heads_by_kind():
    d = TokenSpec("discrete", "grid", (2, 2), vocab_size=11)
    b = TokenSpec("binary", "sequence", (4,), bits=5)
    c = TokenSpec("continuous", "grid", (2, 2), dim=3)
    assert isinstance(make_head(d, 8), CategoricalHead) and isinstance(OutputHead(b, 8), BitHead)
    with pytest.raises(IncompatibleTokens, match="flow-matching or diffusion"):
        make_head(c, 8)
    with pytest.raises(IncompatibleTokens):
        OutputHead(c, 8)
    h = torch.randn(2, 4, 8)
    head = _randomize(make_head(d, 8))
    tgt = torch.randint(0, 11, (2, 4))
    out = head.loss(h, tgt)
    torch.testing.assert_close(out["loss"], F.cross_entropy(head(h).reshape(-1, 11), tgt.reshape(-1)))
    bhead = _randomize(make_head(b, 8))
    bt = torch.randint(0, 2, (2, 4, 5), dtype=torch.uint8)
    torch.testing.assert_close(bhead.loss(h, bt)["loss"],
                               F.binary_cross_entropy_with_logits(bhead(h), bt.float()))
    assert 0 <= float(bhead.loss(h, bt)["acc"]) <= 1
    # embeddings: binary uses ±1 bits, so all-zero bits embed to minus the column sum
    emb = TokenEmbedding(b, 8)
    zero = emb(torch.zeros(1, 1, 5, dtype=torch.uint8))
    torch.testing.assert_close(zero[0, 0], -emb.embed.weight.sum(1))
    assert TokenEmbedding(d, 8)(tgt).shape == (2, 4, 8)
    assert TokenEmbedding(c, 8)(torch.randn(2, 4, 3)).shape == (2, 4, 8)


# ---- conditioning ---------------------------------------------------------------------------

def test_class_embedder_null_and_dropout():
    emb = ClassEmbedder(10, 8, dropout=0.5).eval()
    out = emb(torch.tensor([3, -1]))
    torch.testing.assert_close(out[1], emb.table.weight[10])
    torch.testing.assert_close(out[0], emb.table.weight[3])
    torch.testing.assert_close(emb.null(2), emb.table.weight[[10, 10]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    emb.train()
    torch.manual_seed(0)
    out = emb(torch.full((4000,), 2))
    frac_null = (out == emb.table.weight[10]).all(-1).float().mean()
    assert abs(float(frac_null) - 0.5) < 0.05
    emb.dropout = 0.0
    assert not (emb(torch.full((100,), 2)) == emb.table.weight[10]).all(-1).any()


def test_word_text_encoder_padding_null_and_context():
    torch.manual_seed(0)
    enc = _randomize(WordTextEncoder(20, 6, 16, depth=2, heads=2)).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = enc(ids)
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out[1], enc.null(1)[0])          # all padding = null caption
    torch.testing.assert_close(enc(ids[:, :3])[0], out[0])      # short input is right-padded
    other = enc(torch.tensor([[3, 4, 7, 0, 0, 0]]))
    assert not torch.allclose(other[0, 0], out[0, 0])           # bidirectional: later word matters
    with pytest.raises(ValueError, match="limited to 6"):
        enc(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        enc(torch.tensor([[25]]))


def test_condition_encoder_prefix_and_nulls():
    torch.manual_seed(0)
    ce = _randomize(ConditionEncoder(16, num_classes=5, text_vocab_size=20, text_len=4, dropout=0.1,
                                     text_heads=2)).eval()
    assert ce.prefix_len == 5
    lab, txt = torch.tensor([1, 2]), torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    both = ce(Condition(lab, txt))
    only_cls = ce(Condition(labels=lab))
    only_txt = ce(Condition(text=txt))
    null = ce.null_condition(2)
    assert both.shape == null.shape == (2, 5, 16)
    torch.testing.assert_close(only_cls[:, 0], both[:, 0])
    torch.testing.assert_close(only_cls[:, 1:], null[:, 1:])     # class-only: text is null
    torch.testing.assert_close(only_txt[:, 1:], both[:, 1:])
    torch.testing.assert_close(only_txt[:, 0], null[:, 0])       # text-only: class is null
    torch.testing.assert_close(ce(Condition(torch.tensor([-1, -1]), torch.zeros(2, 4, dtype=torch.long))), null)
    assert not torch.allclose(both, null)
    # training dropout 1.0: everything becomes null, class and text
    ce.train()
    ce.dropout = ce.classes.dropout = 1.0
    torch.testing.assert_close(ce(Condition(lab, txt)), null)
    # a model without text refuses captions; an unconditional one has a start token
    with pytest.raises(ValueError, match="without text"):
        ConditionEncoder(16, num_classes=5)(Condition(text=txt))
    unc = ConditionEncoder(16)
    assert unc.prefix_len == 1 and unc(None, batch=3).shape == (3, 1, 16)
