"""RasterAR (LlamaGen-style raster next-token prediction)."""
import copy

import pytest
import torch

from generators.base import Condition, SamplingConfig
from generators.raster_ar import RasterAR
from zoo.registry import build_meta, entry
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec, random_tokens

GRID = TokenSpec("discrete", "grid", (3, 4), vocab_size=17)
BITS = TokenSpec("binary", "grid", (3, 3), bits=6)
SEQ = TokenSpec("discrete", "sequence", (7,), vocab_size=9, ordered=True)
PYR = TokenSpec("binary", "pyramid", ((1, 1), (2, 2)), bits=4)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: threads only add overhead


def _model(spec=GRID, classes=True, text=False, seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    m = RasterAR(spec, num_classes=5 if classes else None, text_vocab_size=12 if text else None, text_len=3,
                 dim=32, depth=2, heads=2, ffn_multiple=16, **kw)
    if std:  # the LlamaGen init zeroes the head; random weights make logit comparisons meaningful
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return m.eval()


def _cond(classes=True, text=False, B=3):
    return Condition(torch.tensor([0, -1, 4, 2][:B]) if classes else None,
                     torch.tensor([[1, 2, 0], [0, 0, 0], [5, 11, 3], [7, 0, 0]][:B]) if text else None)


@pytest.mark.parametrize("spec,classes,text", [(GRID, True, False), (GRID, False, True), (BITS, True, True),
                                               (BITS, False, True), (SEQ, True, False), (PYR, True, True)])
def test_cached_decoding_equals_full_causal_forward(spec, classes, text):
    m = _model(spec, classes, text)
    toks = random_tokens(spec, 3, torch.Generator().manual_seed(1))
    cond = _cond(classes, text)
    full = m.logits(toks, cond)
    per_token = spec.per_token[0] if spec.per_token else spec.vocab_size
    assert full.shape == (3, spec.num_tokens, per_token)
    assert full.std() > 0.1
    torch.testing.assert_close(m.cached_logits(toks, cond), full, atol=1e-5, rtol=1e-5)


def test_logits_are_causal_in_raster_order():
    m = _model()
    toks = random_tokens(GRID, 2, torch.Generator().manual_seed(0))
    base = m.logits(toks, _cond(B=2))
    data = toks.data.clone()
    data[:, 1, 2] = (data[:, 1, 2] + 1) % GRID.vocab_size   # raster index 6
    moved = m.logits(Tokens(data, GRID), _cond(B=2))
    torch.testing.assert_close(moved[:, :7], base[:, :7])     # tokens 0..6 do not see token 6
    assert not torch.allclose(moved[:, 7:], base[:, 7:])


def test_loss_decreases_on_tiny_overfit_batch():
    torch.manual_seed(0)
    m = RasterAR(GRID, num_classes=5, text_vocab_size=12, text_len=3, dim=32, depth=2, heads=2,
                 ffn_multiple=16, class_dropout=0.0)
    toks = random_tokens(GRID, 4, torch.Generator().manual_seed(0))
    cond = Condition(torch.tensor([0, 1, 2, 3]), torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [0, 0, 0]]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = m.loss(toks, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert first == pytest.approx(torch.log(torch.tensor(17.0)).item(), abs=0.05)  # zero-init head: uniform
    assert out["loss"].item() < 0.3 * first
    assert float(out["acc"]) > 0.8


def test_binary_loss_decreases():
    torch.manual_seed(0)
    m = RasterAR(BITS, num_classes=5, dim=32, depth=2, heads=2, ffn_multiple=16, class_dropout=0.0)
    toks = random_tokens(BITS, 4, torch.Generator().manual_seed(0))
    cond = Condition(torch.tensor([0, 1, 2, 3]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = m.loss(toks, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("spec", [GRID, BITS, SEQ, PYR])
def test_generate_returns_valid_tokens_and_is_seeded(spec):
    m = _model(spec, text=True)
    cond = _cond(text=True)
    cfg = SamplingConfig(cfg=2.0, top_k=5, top_p=0.9)
    a = m.generate(cond, cfg, torch.Generator().manual_seed(0))
    b = m.generate(cond, cfg, torch.Generator().manual_seed(0))
    c = m.generate(cond, cfg, torch.Generator().manual_seed(1))
    assert isinstance(a, Tokens) and a.spec == spec and a.batch_size == 3
    a.validate()
    assert a == b
    assert a != c
    assert m.transformer.cache_len is None  # cache freed after sampling


def test_greedy_generation_is_consistent_with_full_logits():
    """Temperature 0: each generated token is the argmax of the full forward on the output,
    and with CFG of u + s_i (c - u), s_i from the linear schedule (checks positions, the
    doubled batch and the per-step scale)."""
    m = _model(GRID, text=True)
    cond = _cond(text=True)
    N = GRID.num_tokens
    out = m.generate(cond, SamplingConfig(temperature=0.0))
    torch.testing.assert_close(m.logits(out, cond).argmax(-1), out.to_sequence().data)
    s = SamplingConfig(cfg=3.0, cfg_schedule="linear", temperature=0.0)
    out = m.generate(cond, s)
    c = m.logits(out, cond)
    u = m.logits(out, Condition(torch.full((3,), -1), torch.zeros(3, 3, dtype=torch.long)))
    scale = torch.tensor([s.cfg_at(i, N) for i in range(N)]).view(1, N, 1)
    guided = u + scale * (c - u)
    torch.testing.assert_close(guided.argmax(-1), out.to_sequence().data)
    assert not torch.equal(c.argmax(-1), out.to_sequence().data)  # guidance changed something


def test_unconditional_model_samples_with_batch_size():
    m = _model(classes=False)
    assert m.prefix_len == 1
    out = m.generate(Condition(batch=2), SamplingConfig(cfg=3.0), torch.Generator().manual_seed(0))
    assert out.batch_size == 2
    with pytest.raises(ValueError, match="no batch size"):
        m.generate(Condition())
    toks = random_tokens(GRID, 2)
    torch.testing.assert_close(m.cached_logits(toks, None), m.logits(toks, None), atol=1e-5, rtol=1e-5)


def test_continuous_spec_is_refused_naming_both_sides():
    spec = TokenSpec("continuous", "grid", (4, 4), dim=16)
    with pytest.raises(IncompatibleTokens) as e:
        RasterAR(spec, num_classes=5, dim=32, depth=1, heads=2)
    msg = str(e.value)
    assert "RasterAR" in msg and spec.describe() in msg and "continuous" in msg


def test_wrong_spec_tokens_raise_value_error():
    m = _model()
    other = TokenSpec("discrete", "grid", (4, 4), vocab_size=17)
    with pytest.raises(ValueError, match=r"expects tokens \[discrete/grid 3x4 V=17\], got \[discrete/grid 4x4 V=17\]"):
        m.loss(random_tokens(other, 2), _cond(B=2))
    with pytest.raises(ValueError, match="batch"):
        m.loss(random_tokens(GRID, 2), _cond(B=3))


def test_label_minus_one_is_the_null_class():
    m = _model(text=True)
    toks = random_tokens(GRID, 2)
    null_lab = m.logits(toks, Condition(torch.tensor([-1, -1]), torch.tensor([[1, 2, 0], [3, 0, 0]])))
    no_lab = m.logits(toks, Condition(text=torch.tensor([[1, 2, 0], [3, 0, 0]])))
    torch.testing.assert_close(null_lab, no_lab)
    lab0 = m.logits(toks, Condition(torch.tensor([0, 0]), torch.tensor([[1, 2, 0], [3, 0, 0]])))
    assert not torch.allclose(lab0, null_lab)
    with pytest.raises(ValueError, match="-1"):
        m.logits(toks, Condition(torch.tensor([5, 0])))


def test_checkpoint_round_trip(tmp_path):
    from zoo.checkpoint import load_pretrained
    m = _model(BITS, text=True)
    m.save_pretrained(tmp_path / "ck")
    m2 = load_pretrained(tmp_path / "ck").eval()
    toks = random_tokens(BITS, 2)
    torch.testing.assert_close(m2.logits(toks, _cond(text=True, B=2)), m.logits(toks, _cond(text=True, B=2)))
    assert m2.spec == BITS
    ema = copy.deepcopy(m)  # EMA copies must work (heads dispatch in __new__)
    torch.testing.assert_close(ema.logits(toks, _cond(B=2)), m.logits(toks, _cond(B=2)))


@pytest.mark.parametrize("name", ["generator/raster-ar-b", "generator/raster-ar-l", "generator/raster-ar-xl"])
def test_paper_configs_match_llamagen_param_counts(name):
    m = build_meta(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / entry(name).paper_params - 1) < 0.05, (name, n)
    assert m.spec == TokenSpec("discrete", "grid", (16, 16), vocab_size=16384) and m.prefix_len == 1


def test_tiny_registry_entry():
    m = build_meta("generator/raster-ar-tiny")
    n = sum(p.numel() for p in m.parameters())
    assert 1e6 < n < 6e6
    assert m.spec.shape == (8, 8) and m.spec.vocab_size == 1024
    assert m.prefix_len == 1 + 16


def test_positions_prefix_unrotated_then_raster_row_col():
    m = _model(text=True)  # prefix = 1 class + 3 text tokens
    pos = m.positions()
    assert pos.shape == (4 + GRID.num_tokens - 1, 2)
    assert (pos[:4] == -1).all()
    assert pos[4].tolist() == [0, 0] and pos[4 + 5].tolist() == [1, 1] and pos[-1].tolist() == [2, 2]
    seq = _model(SEQ)
    assert seq.positions().tolist() == [-1] + list(range(SEQ.num_tokens - 1))
