"""VAR / MVAR next-scale prediction (generators/var.py, generators/mvar_attention.py)."""
import pytest
import torch

from generators.base import Condition, SamplingConfig
from generators.mvar_attention import (
    neighborhood_attention,
    neighborhood_attention_dense,
    neighborhood_index,
    neighborhood_mask,
    window_starts,
)
from generators.var import VAR_FID_SAMPLING, NextScaleAR
from zoo.checkpoint import load_pretrained
from zoo.registry import build_meta
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec, random_tokens

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: threads only add overhead

SPEC = TokenSpec("discrete", "pyramid", [(1, 1), (2, 2), (3, 3), (5, 5)], vocab_size=17)
RECT = TokenSpec("discrete", "pyramid", [(1, 1), (2, 3), (4, 6)], vocab_size=11)


def _model(mode="var", spec=SPEC, depth=2, classes=5, std=0.3, seed=0, **kw):
    torch.manual_seed(seed)
    if mode == "mvar":
        kw = {"markov_kernel": 3, "markov_scales": 2, **kw}
    m = NextScaleAR(spec, num_classes=classes, depth=depth, dim=32, heads=2, cvae=4, mode=mode, **kw)
    if std:  # VAR's init nearly zeroes the gates and the head; random weights make comparisons meaningful
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def _cond(B=3):
    return Condition(torch.tensor([0, -1, 4, 2][:B]))


# ---- neighbourhoods (NATTEN semantics) --------------------------------------------------------

def _natten_window(i, n, k):
    """NATTEN's window along one axis, written independently: centred, shifted inside at borders."""
    k = min(k, n)
    start = i - k // 2
    start = max(start, 0)
    if start + k > n:
        start = n - k
    return list(range(start, start + k))


@pytest.mark.parametrize("h,w,k", [(8, 8, 3), (16, 16, 7), (13, 13, 7), (5, 9, 3), (2, 6, 5), (1, 1, 7)])
def test_every_query_has_exactly_k2_keys_in_its_shifted_window(h, w, k):
    idx = neighborhood_index(h, w, k)
    kh, kw = min(k, h), min(k, w)
    assert idx.shape == (h * w, kh * kw)
    mask = neighborhood_mask(h, w, k)
    assert (mask.sum(1) == kh * kw).all()  # borders too: the window slides, it is never clipped
    for q in range(h * w):
        i, j = divmod(q, w)
        want = {r * w + c for r in _natten_window(i, h, k) for c in _natten_window(j, w, k)}
        assert set(idx[q].tolist()) == want and len(set(idx[q].tolist())) == kh * kw
        assert mask[q, q]  # a query always sees itself
    assert window_starts(16, 7).tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9]


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        neighborhood_index(8, 8, 4)


@pytest.mark.parametrize("h,w,k", [(5, 5, 3), (4, 7, 3), (8, 8, 7)])
def test_gather_kernel_matches_dense_mask_forward_and_backward(h, w, k):
    g = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(2, 3, h * w, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = neighborhood_attention(q, kk, v, h, w, k, scale=0.7)
    b = neighborhood_attention_dense(q, kk, v, h, w, k, scale=0.7)
    torch.testing.assert_close(a, b)
    up = torch.randn(a.shape, generator=g, dtype=torch.float64)
    for ga, gb in zip(torch.autograd.grad(a, (q, kk, v), up), torch.autograd.grad(b, (q, kk, v), up)):
        torch.testing.assert_close(ga, gb)


# ---- masks --------------------------------------------------------------------------------------

def test_var_mask_is_block_causal_and_mvar_mask_block_diagonal_with_windows():
    lv = torch.repeat_interleave(torch.arange(4), torch.tensor([1, 4, 9, 25]))
    var = _model("var", std=0).attention_mask()
    assert torch.equal(var, lv[None, :] <= lv[:, None])
    mvar = _model("mvar", std=0).attention_mask()
    assert not (mvar & (lv[None, :] != lv[:, None])).any()  # nothing crosses scales
    rows = mvar.sum(1)
    assert rows[:5].tolist() == [1, 4, 4, 4, 4]             # scales 0, 1: full within the scale
    assert (rows[5:14] == 9).all() and (rows[14:] == 9).all()  # spatial scales: exactly k^2 = 9 keys
    assert not mvar[14, 14 + 24]  # 5x5: corner (0,0) does not see (4,4)


# ---- cached == uncached, Markov properties --------------------------------------------------------

@pytest.mark.parametrize("mode,spec", [("var", SPEC), ("mvar", SPEC), ("var", RECT), ("mvar", RECT)])
def test_sampling_path_equals_one_full_forward(mode, spec):
    m = _model(mode, spec)
    toks = random_tokens(spec, 3, torch.Generator().manual_seed(1))
    full = m.logits(toks, _cond())
    assert full.shape == (3, spec.num_tokens, spec.vocab_size) and full.std() > 0.1
    torch.testing.assert_close(m.cached_logits(toks, _cond()), full, atol=1e-5, rtol=1e-5)
    # the per-scale / gather path computes exactly the documented dense mask
    torch.testing.assert_close(m.logits(toks, _cond(), dense=True), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_tokens_only_influence_later_scales(mode):
    m = _model(mode)
    toks = random_tokens(SPEC, 2, torch.Generator().manual_seed(0))
    base = m.logits(toks, _cond(2))
    data = [t.clone() for t in toks.data]
    data[2] = (data[2] + 1) % SPEC.vocab_size  # scale 2 occupies tokens 5..13
    moved = m.logits(Tokens(data, SPEC), _cond(2))
    torch.testing.assert_close(moved[:, :14], base[:, :14])
    assert not torch.allclose(moved[:, 14:], base[:, 14:])


def test_scale_markov_each_scale_sees_only_its_own_input():
    """MVAR: the logits of scale k from the full forward equal a forward of scale k's input
    alone (block-diagonal attention), and changing the *inputs* of the other scales changes
    nothing at scale k; in VAR mode the earlier scales are keys, so they do."""
    for mode in ("mvar", "var"):
        m = _model(mode)
        ids = m._ids(random_tokens(SPEC, 2, torch.Generator().manual_seed(0)))
        cvec = m.class_emb(torch.tensor([1, 3]))
        x = m._inputs(ids, cvec)
        full = m._run(x, cvec, range(4))
        for s in range(1, 4):
            a, b = m.offsets[s], m.offsets[s + 1]
            y = x.clone()
            y[:, :a] += torch.randn(y[:, :a].shape, generator=torch.Generator().manual_seed(s))
            moved = m._run(y, cvec, range(4))[:, a:b]
            if mode == "mvar":
                torch.testing.assert_close(m._run(x[:, a:b], cvec, [s]), full[:, a:b], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(moved, full[:, a:b], atol=1e-5, rtol=1e-5)
            else:
                assert not torch.allclose(moved, full[:, a:b], atol=1e-3)
                with pytest.raises(ValueError, match="start at scale 0"):
                    m._run(x[:, a:b], cvec, [s])


@pytest.mark.parametrize("na_impl", ["gather", "mask"])
def test_spatial_markov_perturbing_outside_the_window_changes_nothing(na_impl):
    m = _model("mvar", depth=1, na_impl=na_impl)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 25, 32, generator=g)
    cvec = torch.randn(1, 32, generator=g)
    plan = m._plan([3], x.device)

    def out_after(pos):  # (a constant shift would vanish in the LayerNorm)
        y = x.clone()
        y[0, pos] += torch.randn(32, generator=torch.Generator().manual_seed(pos))
        return m.transformer(y, cvec, plan)

    base = m.transformer(x, cvec, plan)
    far, shifted = out_after(4 * 5 + 4), out_after(2 * 5 + 2)
    torch.testing.assert_close(far[0, 0], base[0, 0], atol=0, rtol=0)   # (4,4) is outside (0,0)'s 3x3 window
    assert not torch.allclose(shifted[0, 0], base[0, 0])             # (2,2) is inside: the window shifted
    centre = 2 * 5 + 2
    for outside in (0, 4, 20, 24):
        torch.testing.assert_close(out_after(outside)[0, centre], base[0, centre], atol=0, rtol=0)
    assert not torch.allclose(out_after(3 * 5 + 3)[0, centre], base[0, centre])


# ---- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_one_forward_per_scale_with_exactly_its_tokens(mode):
    m = _model(mode)
    steps, attn = [], []
    hooks = [m.transformer.register_forward_pre_hook(lambda mod, args: steps.append(tuple(args[0].shape)))]
    for blk in m.transformer.blocks:
        hooks.append(blk.attn.register_forward_hook(
            lambda mod, args, out: attn.append((args[0].shape[1], mod.last_kv_len, mod.kv_cache is None))))
    m.generate(_cond(), SamplingConfig(cfg=2.0), torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    sizes = [h * w for h, w in SPEC.shape]
    assert steps == [(6, n, 32) for n in sizes]  # CFG doubles the batch; step s processes p_s^2 tokens
    per_step = [attn[i * 2:(i + 1) * 2] for i in range(len(sizes))]  # 2 layers per step
    for s, calls in enumerate(per_step):
        for q_len, kv_len, no_cache in calls:
            assert q_len == sizes[s]
            if mode == "mvar":  # no K/V kept across scales: keys are the current scale only
                assert no_cache and kv_len == sizes[s]
            else:               # VAR: the cache holds every scale so far
                assert not no_cache and kv_len == sum(sizes[:s + 1])
    assert m.transformer.cache_len is None  # freed after sampling


@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_generate_is_seeded_and_valid(mode):
    m = _model(mode)
    cfg = SamplingConfig(cfg=2.0, top_k=5, top_p=0.9)
    a = m.generate(_cond(), cfg, torch.Generator().manual_seed(0))
    b = m.generate(_cond(), cfg, torch.Generator().manual_seed(0))
    c = m.generate(_cond(), cfg, torch.Generator().manual_seed(1))
    assert isinstance(a, Tokens) and a.spec == SPEC and a.batch_size == 3
    a.validate()
    assert a == b and a != c


def test_cfg_ratio_ramps_over_the_scales():
    """Greedy sampling with VAR's ramp: scale k uses (1+t)c - t·u with t = t_max·k/(S-1)."""
    m = _model("var")
    cond, S = _cond(), 4
    s = SamplingConfig(cfg=4.0, cfg_schedule="linear", temperature=0.0)  # t_max = 3
    out = m.generate(cond, s)
    c = m.logits(out, cond)
    u = m.logits(out, Condition(torch.full((3,), -1)))
    t = torch.cat([torch.full((h * w,), 3.0 * k / (S - 1)) for k, (h, w) in enumerate(SPEC.shape)]).view(1, -1, 1)
    guided = (1 + t) * c - t * u
    seq = out.to_sequence().data
    torch.testing.assert_close(guided.argmax(-1), seq)
    assert torch.equal(c[:, 0].argmax(-1), seq[:, 0])   # the first scale is unguided (t = 0)
    assert not torch.equal(c.argmax(-1), seq)           # guidance changed something later
    assert [VAR_FID_SAMPLING.cfg_at(k, 10) for k in (0, 9)] == [1.0, 2.5]  # VAR cfg 1.5 == s = 1 + 1.5


def test_unconditional_model():
    m = _model("mvar", classes=None)
    out = m.generate(Condition(batch=2), SamplingConfig(cfg=3.0), torch.Generator().manual_seed(0))
    assert out.batch_size == 2
    toks = random_tokens(SPEC, 2)
    torch.testing.assert_close(m.cached_logits(toks, None), m.logits(toks, None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="without classes"):
        m.logits(toks, _cond(2))


# ---- construction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [TokenSpec("discrete", "grid", (4, 4), vocab_size=16),
                                  TokenSpec("binary", "pyramid", [(1, 1), (2, 2)], bits=4),
                                  TokenSpec("continuous", "pyramid", [(1, 1), (2, 2)], dim=8)])
@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_incompatible_specs_raise_naming_both_sides(spec, mode):
    with pytest.raises(IncompatibleTokens) as e:
        NextScaleAR(spec, num_classes=5, depth=1, dim=32, heads=2, mode=mode)
    msg = str(e.value)
    assert ("MVAR" if mode == "mvar" else "VAR") in msg and spec.describe() in msg


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mode='mvar'"):
        NextScaleAR(SPEC, depth=1, dim=32, heads=2, mode="var", markov_scales=1)
    with pytest.raises(ValueError, match="mode='mvar'"):
        NextScaleAR(SPEC, depth=1, dim=32, heads=2, mode="var", train_chunks=[[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="consecutive"):
        NextScaleAR(SPEC, depth=1, dim=32, heads=2, mode="mvar", train_chunks=[[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="odd"):
        NextScaleAR(SPEC, depth=1, dim=32, heads=2, mode="mvar", markov_kernel=4)
    bad = TokenSpec("discrete", "pyramid", [(1, 1), (4, 4), (2, 2)], vocab_size=5)
    with pytest.raises(ValueError, match="fit in the last"):
        NextScaleAR(bad, depth=1, dim=32, heads=2)
    m = _model("var", std=0)
    with pytest.raises(ValueError, match=r"expects tokens"):
        m.loss(random_tokens(RECT, 2), _cond(2))
    with pytest.raises(ValueError, match=r"\(vocab_size, cvae\)"):
        m.load_codebook(torch.zeros(17, 5))
    m.load_codebook(torch.ones(17, 4))
    assert (m.code_embed.weight == 1).all()


# ---- training ---------------------------------------------------------------------------------------

def test_chunked_checkpointed_loss_equals_one_forward():
    chunked = _model("mvar", train_chunks=[[0, 1, 2], [3]], class_dropout=0.0)
    plain = _model("mvar", class_dropout=0.0)
    plain.load_state_dict(chunked.state_dict())
    toks = random_tokens(SPEC, 3, torch.Generator().manual_seed(2))
    grads = []
    for m in (chunked, plain):
        m.train()
        out = m.loss(toks, _cond())
        out["loss"].backward()
        grads.append((out, [p.grad.clone() for p in m.parameters()]))
    (oa, ga), (ob, gb) = grads
    torch.testing.assert_close(oa["loss"], ob["loss"])
    torch.testing.assert_close(oa["acc"], ob["acc"])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_loss_decreases_on_tiny_overfit_batch(mode):
    m = _model(mode, std=0, class_dropout=0.0, init_adaln_gamma=1e-3)
    m.train()
    toks = random_tokens(SPEC, 4, torch.Generator().manual_seed(0))
    cond = Condition(torch.tensor([0, 1, 2, 3]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = m.loss(toks, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(17.0)).item(), abs=0.05)  # zero head: uniform
    assert losses[-1] < 0.4 * losses[0]


def test_checkpoint_round_trip(tmp_path):
    m = _model("mvar", spec=RECT, train_chunks=[[0, 1], [2]])
    m.registry_name = "generator/mvar-tiny"  # loading resolves the class through the registry
    m.save_pretrained(tmp_path / "ck")
    back = load_pretrained(tmp_path / "ck").eval()
    assert back.config == m.config and back.spec == RECT and back.chunks == ((0, 1), (2,))
    toks = random_tokens(RECT, 2)
    torch.testing.assert_close(back.logits(toks, _cond(2)), m.logits(toks, _cond(2)), atol=0, rtol=0)
    a = back.generate(_cond(2), SamplingConfig(cfg=1.5), torch.Generator().manual_seed(3))
    assert a == m.generate(_cond(2), SamplingConfig(cfg=1.5), torch.Generator().manual_seed(3))


def test_registry_entries_share_the_var_weights_layout():
    var, mvar = build_meta("generator/var-d16"), build_meta("generator/mvar-d16")
    assert (var.dim, var.transformer.depth, var.transformer.heads, var.L) == (1024, 16, 16, 680)
    assert var.state_dict().keys() == mvar.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(var.state_dict().values(), mvar.state_dict().values()))
    assert mvar.spatial == {8, 9} and mvar.kernel == 7 and mvar.chunks == (tuple(range(8)), (8,), (9,))
    tiny = build_meta("generator/mvar-tiny")
    assert tiny.spec.shape == ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)) and tiny.spec.vocab_size == 1024
    assert tiny.spatial == {4, 5} and tiny.kernel == 3
    assert 1e6 < tiny.num_params() < 4e6
