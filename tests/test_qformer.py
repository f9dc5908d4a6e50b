"""Q-Former blocks (tokenizers_vis/qformer.py): causal queries, slot attention, ITC."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.qformer import (
    CrossAttention,
    QFormer,
    SlotCrossAttention,
    contrastive_loss,
    feature_map_to_tokens,
    pooled_target,
    sincos_2d,
)


def _qformer(**kw):
    torch.manual_seed(0)
    args = {"num_queries": 6, "dim": 32, "depth": 2, "heads": 4, "context_dim": 24, "cross_attention_freq": 1,
            "ffn_multiple": 16}
    return QFormer(**{**args, **kw}).eval()


def _perturb(qf, j):
    ctx = torch.randn(2, 10, 24)
    base = qf.query_tokens.expand(2, -1, -1).clone()
    pert = base.clone()
    pert[:, j] += torch.randn(2, qf.dim)
    with torch.no_grad():
        return qf(ctx, base), qf(ctx, pert)


@pytest.mark.parametrize("j", [0, 3, 5])
def test_causal_queries_do_not_see_later_queries(j):
    a, b = _perturb(_qformer(causal=True), j)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3  # query j itself changes


def test_bidirectional_queries_do_see_later_queries():
    # the same perturbation without the causal mask moves the earlier queries: the test above can fail
    a, b = _perturb(_qformer(causal=False), 3)
    assert (a[:, :3] - b[:, :3]).abs().max() > 1e-4


def test_cross_attention_only_every_freq_blocks():
    qf = _qformer(depth=4, cross_attention_freq=2)
    assert [b.cross is not None for b in qf.blocks] == [True, False, True, False]


def test_slot_attention_sums_to_one_over_slots_and_matches_reference():
    torch.manual_seed(0)
    att = SlotCrossAttention(dim=16, context_dim=12, heads=2, assign_eps=1.0)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    out = att(x, ctx)
    a = att.last_attn                                   # (B, H, slots, patches)
    assert a.shape == (3, 2, 5, 7)
    torch.testing.assert_close(a.sum(2), torch.ones(3, 2, 7))   # every patch: 1 over the slots
    assert not torch.allclose(a.sum(3), torch.ones(3, 2, 5))    # not normalised over patches
    # reference: softmax over slots, then weights / (sum over patches + eps), mean of values
    q = att.wq(x).view(3, 5, 2, 8).transpose(1, 2)
    k, v = att.wkv(ctx).view(3, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ref_a = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-2)
    ref = (ref_a / (ref_a.sum(-1, keepdim=True) + 1.0)) @ v
    torch.testing.assert_close(out, att.wo(ref.transpose(1, 2).reshape(3, 5, 16)))


def test_full_cross_attention_normalises_over_patches():
    torch.manual_seed(0)
    att = CrossAttention(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 7, 12)
    q = att.wq(x).view(2, 4, 2, 8).transpose(1, 2)
    k, v = att.wkv(ctx).view(2, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ref = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v
    torch.testing.assert_close(att(x, ctx), att.wo(ref.transpose(1, 2).reshape(2, 4, 16)))


def test_slot_qformer_exposes_one_map_per_slot_layer():
    qf = _qformer(slot=True, depth=3, cross_attention_freq=2)
    qf(torch.randn(2, 10, 24))
    maps = qf.slot_attention()
    assert len(maps) == 2 and all(m.shape == (2, 4, 6, 10) for m in maps)


def test_qformer_rejects_wrong_context():
    with pytest.raises(ValueError, match="context"):
        _qformer()(torch.randn(2, 10, 23))


def test_contrastive_loss_is_smoothed_cross_entropy_without_duplicates():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    temp = torch.tensor(0.1)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() / temp
    lab = torch.arange(5)
    ref = (F.cross_entropy(logits, lab, label_smoothing=0.1) + F.cross_entropy(logits.t(), lab, label_smoothing=0.1)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, temp, label_smoothing=0.1), ref)


def test_contrastive_loss_treats_identical_captions_as_positives():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True          # captions 0 and 1 are the same text
    temp = torch.tensor(0.1)
    a = contrastive_loss(img, txt, temp, same)
    b = contrastive_loss(img[[1, 0, 2, 3]], txt, temp, same)   # swapping their images changes nothing
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, contrastive_loss(img, txt, temp))


def test_positions_and_pooling():
    p = sincos_2d(3, 4, 8)
    assert p.shape == (12, 8) and torch.unique(p, dim=0).shape[0] == 12
    f = torch.randn(2, 8, 3, 4)
    tok = feature_map_to_tokens(f, positions=False)
    torch.testing.assert_close(tok[:, 5], f[:, :, 1, 1])       # row-major
    assert pooled_target(f).shape == (2, 16)
    torch.testing.assert_close(pooled_target(f)[:, 8:], f.amax((2, 3)))
