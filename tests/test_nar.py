"""NAR (next-neighbor AR, He et al. 2025): order, mask, head mixing, cached decoding."""
import pytest
import torch

import zoo
from eval.bench import count_forward_steps
from generators.base import Condition, SamplingConfig
from generators.nar import NAR, diagonals, proximity_mask
from zoo.registry import build_meta, entry
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec, random_tokens

GRID = TokenSpec("discrete", "grid", (3, 4), vocab_size=17)
SQUARE = TokenSpec("discrete", "grid", (4, 4), vocab_size=17)
BITS = TokenSpec("binary", "grid", (3, 3), bits=6)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: threads only add overhead


def _model(spec=GRID, classes=True, text=False, seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    m = NAR(spec, num_classes=5 if classes else None, text_vocab_size=12 if text else None, text_len=3,
            dim=32, depth=2, heads=2, ffn_multiple=16, **kw)
    if std:  # the LlamaGen init zeroes the right head; random weights make comparisons meaningful
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return m.eval()


def _cond(classes=True, text=False, B=3):
    return Condition(torch.tensor([0, -1, 4, 2][:B]) if classes else None,
                     torch.tensor([[1, 2, 0], [0, 0, 0], [5, 11, 3], [7, 0, 0]][:B]) if text else None)


def _dist(spec):
    h, w = spec.shape
    r = torch.arange(h * w)
    return r // w + r % w


# ---- order ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 2), (1, 4), (4, 1), (1, 1)])
def test_one_forward_per_diagonal_and_step_t_emits_diagonal_t(shape):
    h, w = shape
    spec = TokenSpec("discrete", "grid", shape, vocab_size=17)
    m = _model(spec)
    per_step = []

    def spy_sample(logits, **kw):  # emit the step index: the output grid then shows the order
        per_step.append(logits.shape[1])
        return torch.full(logits.shape[:-1], len(per_step) - 1, dtype=torch.long)

    m.head.sample = spy_sample
    steps, counted = count_forward_steps(m, _cond(B=2))
    assert (steps, counted) == (h + w - 1, "trunk")
    expected = [sum(1 for i in range(h) for j in range(w) if i + j == t) for t in range(h + w - 1)]
    assert per_step == expected
    if h == w:
        assert per_step == [min(t + 1, 2 * h - 1 - t) for t in range(2 * h - 1)]
    per_step.clear()
    out = m.generate(_cond(B=2))
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert torch.equal(out.data, (ii + jj).expand(2, h, w))  # token (i, j) came from step i + j
    assert diagonals(h, w)[-1] == [(h - 1, w - 1)]


# ---- mask ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 4), (3, 5)])
def test_proximity_mask_sees_q_iff_distance_q_at_most_distance_p(shape):
    h, w = shape
    P = 3
    mask = proximity_mask(h, w, P)
    cells = [(i, j) for i in range(h) for j in range(w)]
    for p, (pi, pj) in enumerate(cells):
        for q, (qi, qj) in enumerate(cells):
            assert bool(mask[P + p, P + q]) == (qi + qj <= pi + pj), ((pi, pj), (qi, qj))
    assert mask[P:, :P].all()                                  # every token sees the prefix
    assert torch.equal(mask[:P, :P], torch.ones(P, P, dtype=torch.bool).tril())
    assert not mask[:P, P:].any()                              # the prefix sees no token
    m = _model(TokenSpec("discrete", "grid", shape, vocab_size=17), text=True)
    assert torch.equal(m.attention_mask(), proximity_mask(h, w, m.prefix_len)[:m.seq_len, :m.seq_len])


def test_perturbing_a_token_at_distance_e_changes_no_target_at_distance_up_to_e():
    m = _model(SQUARE, text=True)
    cond = _cond(text=True, B=2)
    toks = random_tokens(SQUARE, 2, torch.Generator().manual_seed(0))
    base = m.logits(toks, cond)
    d = _dist(SQUARE)
    for e in range(1, 6):  # distances that are inputs (the last token, d = 6, never is)
        for cell in [k for k in range(16) if d[k] == e][:2]:
            data = toks.data.clone().flatten(1)
            data[:, cell] = (data[:, cell] + 5) % SQUARE.vocab_size
            moved = m.logits(Tokens(data.view(2, 4, 4), SQUARE), cond)
            torch.testing.assert_close(moved[:, d <= e], base[:, d <= e], rtol=0, atol=0)
            assert not torch.allclose(moved[:, d == e + 1], base[:, d == e + 1])


# ---- heads ---------------------------------------------------------------------------------

def test_head_mixing_rule_per_target_class_with_spy_heads():
    """Spy heads return the output row's code (row k -> k + 1) in channel 0 (right) or 1
    (below); the assembled logits then say which rows fed each target, with what weight."""
    m = _model(GRID, text=True)
    h, w = GRID.shape
    seen = {}

    def spy(channel):
        def forward(x):
            seen[channel] = x.shape
            out = torch.zeros(*x.shape[:2], GRID.vocab_size)
            out[..., channel] = torch.arange(1, x.shape[1] + 1, dtype=out.dtype)
            return out
        return forward

    m.head.forward, m.head_below.forward = spy(0), spy(1)
    logits = m.logits(random_tokens(GRID, 2), _cond(text=True, B=2))
    assert seen[0] == seen[1] == (2, h * w, 32)  # condition position + tokens 0..N-2

    def code(i, j):  # output row of token (i, j) is 1 + raster index; code = row + 1
        return 2 + i * w + j

    for i in range(h):
        for j in range(w):
            got = logits[0, i * w + j, :2].tolist()
            if i == j == 0:
                want = [0.5, 0.5]                                   # both heads at the condition
            elif i == 0:
                want = [code(0, j - 1), 0.0]                        # right head of the left neighbour
            elif j == 0:
                want = [0.0, code(i - 1, 0)]                        # below head of the upper neighbour
            else:
                want = [0.5 * code(i, j - 1), 0.5 * code(i - 1, j)]  # mean of both logits
            assert got == want, ((i, j), got, want)


def test_below_head_sits_behind_the_extra_block_and_feeds_only_its_targets():
    m = _model(GRID)
    assert len(m.below.layers) == 1 and len(m.transformer.layers) == 2
    toks, cond = random_tokens(GRID, 2), _cond(B=2)
    base = m.logits(toks, cond)
    with torch.no_grad():
        for p in m.below.parameters():
            p.add_(0.5)
    moved = m.logits(toks, cond)
    w = GRID.shape[1]
    first_row = torch.arange(1, w)
    torch.testing.assert_close(moved[:, first_row], base[:, first_row], rtol=0, atol=0)  # right head only
    for k in [0, w, w + 1]:  # corner, first column, interior use the below head
        assert not torch.allclose(moved[:, k], base[:, k])


# ---- cached decoding -----------------------------------------------------------------------

@pytest.mark.parametrize("spec,classes,text", [
    (GRID, True, False), (GRID, False, True), (SQUARE, True, True), (BITS, True, True),
    (TokenSpec("discrete", "grid", (5, 2), vocab_size=9), False, False),
    (TokenSpec("discrete", "grid", (1, 4), vocab_size=9), True, False)])
def test_cached_diagonal_decoding_equals_full_masked_forward(spec, classes, text):
    m = _model(spec, classes, text)
    toks = random_tokens(spec, 3, torch.Generator().manual_seed(1))
    cond = _cond(classes, text) if (classes or text) else None
    full = m.logits(toks, cond)
    per_token = spec.per_token[0] if spec.per_token else spec.vocab_size
    assert full.shape == (3, spec.num_tokens, per_token) and full.std() > 0.1
    torch.testing.assert_close(m.cached_logits(toks, cond), full, atol=5e-5, rtol=1e-5)
    assert m.transformer.cache_len is None and m.below.cache_len is None


def test_greedy_generation_matches_guided_full_logits_with_schedule_and_interval():
    """Temperature 0: every token is the argmax of u + s_t (c - u) of the full forward on
    the output, s_t = cfg_at(t, h + w - 1) for the token's diagonal t (and s = 1 once more
    than cfg_interval tokens exist)."""
    m = _model(SQUARE, text=True)
    cond = _cond(text=True)
    null = Condition(torch.full((3,), -1), torch.zeros(3, 3, dtype=torch.long))
    d = _dist(SQUARE)
    out = m.generate(cond, SamplingConfig(temperature=0.0))
    assert torch.equal(m.logits(out, cond).argmax(-1), out.to_sequence().data)
    for interval in (None, 6):  # 6 tokens exist before diagonal 3: still guided
        s = SamplingConfig(cfg=4.0, cfg_schedule="linear", temperature=0.0, extra={"cfg_interval": interval})
        out = m.generate(cond, s)
        c, u = m.logits(out, cond), m.logits(out, null)
        scale = torch.tensor([s.cfg_at(int(t), 7) for t in d])
        if interval is not None:  # tokens before diagonal t: t(t+1)/2 for t < 4
            before = torch.tensor([sum(int((d == k).sum()) for k in range(int(t))) for t in d])
            scale = torch.where(before > interval, torch.ones_like(scale), scale)
        guided = u + scale.view(1, -1, 1) * (c - u)
        assert torch.equal(guided.argmax(-1), out.to_sequence().data)
        assert not torch.equal(c.argmax(-1), out.to_sequence().data)  # guidance changed something


@pytest.mark.parametrize("spec", [GRID, BITS])
def test_generate_is_valid_and_seeded(spec):
    m = _model(spec, text=True)
    cfg = SamplingConfig(cfg=2.0, top_k=5, top_p=0.9)
    a = m.generate(_cond(text=True), cfg, torch.Generator().manual_seed(0))
    b = m.generate(_cond(text=True), cfg, torch.Generator().manual_seed(0))
    c = m.generate(_cond(text=True), cfg, torch.Generator().manual_seed(1))
    assert isinstance(a, Tokens) and a.spec == spec and a.batch_size == 3
    a.validate()
    assert a == b and a != c
    uncond = _model(spec, classes=False)
    assert uncond.prefix_len == 1
    assert uncond.generate(Condition(batch=2), SamplingConfig(cfg=3.0)).batch_size == 2


# ---- training ------------------------------------------------------------------------------

def test_loss_decreases_on_tiny_overfit_batch():
    torch.manual_seed(0)
    m = NAR(GRID, num_classes=5, text_vocab_size=12, text_len=3, dim=32, depth=2, heads=2,
            ffn_multiple=16, class_dropout=0.0)
    toks = random_tokens(GRID, 4, torch.Generator().manual_seed(0))
    cond = Condition(torch.tensor([0, 1, 2, 3]), torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [0, 0, 0]]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = m.loss(toks, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(17.0)).item(), abs=0.1)  # near uniform at init
    assert losses[-1] < 0.3 * losses[0]
    assert float(out["acc"]) > 0.8


def test_binary_loss_decreases():
    torch.manual_seed(0)
    m = NAR(BITS, num_classes=5, dim=32, depth=2, heads=2, ffn_multiple=16, class_dropout=0.0)
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


# ---- specs and registry --------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    TokenSpec("discrete", "sequence", (16,), vocab_size=9, ordered=True),
    TokenSpec("binary", "pyramid", ((1, 1), (2, 2)), bits=4),
    TokenSpec("continuous", "grid", (4, 4), dim=8)])
def test_incompatible_spec_is_refused_naming_both_sides(spec):
    with pytest.raises(IncompatibleTokens) as e:
        NAR(spec, num_classes=5, dim=32, depth=1, heads=2)
    msg = str(e.value)
    assert "NAR" in msg and spec.describe() in msg


def test_registry_save_load_round_trip(tmp_path):
    m = zoo.create("generator/nar-tiny").eval()
    assert m.spec == TokenSpec("discrete", "grid", (8, 8), vocab_size=1024) and m.num_steps == 15
    raster = build_meta("generator/raster-ar-tiny")
    assert m.prefix_len == raster.prefix_len == 17  # same class + caption conditioning
    for k in ("num_classes", "text_vocab_size", "text_len", "dim", "depth", "heads", "text_depth"):
        assert m.config[k] == raster.config[k], k
    m.save_pretrained(tmp_path / "ck")
    back = zoo.load_pretrained(tmp_path / "ck").eval()
    assert type(back) is NAR and back.registry_name == "generator/nar-tiny" and back.config == m.config
    toks = random_tokens(m.spec, 2, torch.Generator().manual_seed(0))
    cond = m.example_condition(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.logits(toks, cond), m.logits(toks, cond), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["generator/nar-b", "generator/nar-l", "generator/nar-xl"])
def test_paper_configs_are_llamagen_plus_one_block(name):
    m = build_meta(name)
    base = build_meta(name.replace("nar-", "raster-ar-"))
    n, n_base = m.num_params(), base.num_params()
    assert abs(n / entry(name).paper_params - 1) < 0.05, (name, n)
    extra = sum(p.numel() for p in m.below.parameters()) + sum(p.numel() for p in m.head_below.parameters())
    assert n == n_base + extra and len(m.below.layers) == 1
    assert len(m.transformer.layers) == len(base.transformer.layers)
    assert m.spec == TokenSpec("discrete", "grid", (16, 16), vocab_size=16384) and m.num_steps == 31
