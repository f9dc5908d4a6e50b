"""Test-time search (generators/search.py): schedules, beam/lookahead/best-of-N invariants, priors,
the RasterAR KV-cache continuation, the grid completion adapter, and eval.search_claims."""
import json
import math

import pytest
import torch

from generators.base import Condition, SamplingConfig
from generators.search import (ALGORITHMS, ARPrior, OrderedDecoder, PaddedDecoder, UniformPrior, beam_search,
                               beam_verifier_calls, best_of_n, call_verifier, lookahead_search, make_decoder,
                               sample_once, search, token_schedule)
from toys import ToyGenerator, ToyOrderedTokenizer, ToyTokenizer, search_toy_registry, tiny_raster_ar
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec

pytestmark = pytest.mark.usefixtures("single_thread")

SEQ = TokenSpec("discrete", "sequence", (8,), vocab_size=16, ordered=True)


def _tok(seed=0):
    torch.manual_seed(seed)
    return ToyOrderedTokenizer(8, 16).eval()


class Recorder:
    """A verifier with controlled scores: i.i.d. uniform from its own seeded generator (or
    ``fn(tokens)``), recording every call."""

    def __init__(self, fn=None, seed=0, requires_images=True):
        self.fn, self.g, self.calls = fn, torch.Generator().manual_seed(seed), []
        self.requires_images = requires_images

    def __call__(self, images, prompts, tokens=None, log_probs=None):
        s = self.fn(tokens) if self.fn else torch.rand(tokens.shape[0], generator=self.g)
        self.calls.append({"tokens": tokens.clone(), "scores": s.clone(), "prompts": list(prompts),
                           "images": None if images is None else images.clone(), "log_probs": log_probs})
        return s


class PriorRecorder:
    """Wraps a prior, recording (prefix length, n, greedy) of every extend call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.num_tokens, self.vocab_size, self.name = inner.num_tokens, inner.vocab_size, "rec"

    @property
    def device(self):
        return self.inner.device

    def extend(self, prefix, n, cond=None, **kw):
        self.calls.append((prefix.shape[1], n, kw.get("greedy", False)))
        return self.inner.extend(prefix, n, cond, **kw)


# ---- schedule -----------------------------------------------------------------------------------
def test_token_schedules():
    assert token_schedule("geometric", 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]   # 9 steps, as SoTo
    assert token_schedule("geometric", 8) == [1, 2, 4, 8]
    assert token_schedule("geometric", 12) == [1, 2, 4, 8, 12]                       # N appended
    assert token_schedule("geometric", 27, base=3) == [1, 3, 9, 27]
    assert token_schedule("linear", 10, tokens_per_step=4) == [4, 8, 10]
    assert token_schedule("fixed", 4) == [1, 2, 3, 4]
    assert token_schedule([2, 5], 8) == [2, 5, 8]
    assert token_schedule("1,4,8", 8) == [1, 4, 8]
    for bad in ([3, 3], [0, 4], [2, 9], "1,x", "cubic"):
        with pytest.raises(ValueError):
            token_schedule(bad, 8)


# ---- beam search -------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C", [(2, 3), (3, 2), (1, 4)])
def test_beam_keeps_top_b_by_current_score(B, C):
    """Step s+1 extends exactly the top-B candidates of step s by the score they got at step s
    (not by any accumulated score), best first; the result is the best final candidate."""
    P, N = 2, SEQ.num_tokens
    ver = Recorder(seed=B * 10 + C)
    res = beam_search(UniformPrior.for_spec(SEQ), make_decoder(_tok()), ver, ["p0", "p1"], beams=B, candidates=C,
                      generator=torch.Generator().manual_seed(0))
    sched = token_schedule("geometric", N)
    assert [c["tokens"].shape[1] for c in ver.calls] == sched
    nb = 1
    for s in range(len(sched) - 1):
        cur, nxt = ver.calls[s], ver.calls[s + 1]
        k = min(B, nb * C)
        for p in range(P):
            block = slice(p * nb * C, (p + 1) * nb * C)
            order = torch.sort(cur["scores"][block], descending=True, stable=True).indices[:k]
            kept = cur["tokens"][block][order]
            parents = nxt["tokens"][p * k * C:(p + 1) * k * C, :sched[s]]
            assert torch.equal(parents, kept.repeat_interleave(C, 0))
            assert nxt["prompts"][p * k * C:(p + 1) * k * C] == [f"p{p}"] * (k * C)
        nb = k
    last = ver.calls[-1]
    for p in range(P):
        block = slice(p * nb * C, (p + 1) * nb * C)
        i = int(last["scores"][block].argmax())
        assert torch.equal(res.tokens[p], last["tokens"][block][i])
        assert res.scores[p] == last["scores"][block][i]
        torch.testing.assert_close(res.images[p], last["images"][block][i])   # the image that was scored


def test_counters_follow_the_formulas():
    P, N, B, C = 3, SEQ.num_tokens, 2, 3
    prior, dec = UniformPrior.for_spec(SEQ), make_decoder(_tok())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    steps = len(token_schedule("geometric", N))
    bon = best_of_n(prior, dec, Recorder(), ["a"] * P, n=5, generator=g())
    assert (bon.verifier_calls, bon.decoder_calls, bon.prior_tokens) == (5 * P, 5 * P, 5 * P * N)
    beam = beam_search(prior, dec, Recorder(), ["a"] * P, beams=B, candidates=C, generator=g())
    per = C + (steps - 1) * B * C
    assert beam.per_prompt()["verifier_calls"] == per == beam_verifier_calls(N, B, C)
    assert beam.decoder_calls == beam.verifier_calls == P * per
    la = lookahead_search(prior, dec, Recorder(), ["a"] * P, beams=B, candidates=C, lookahead=2, generator=g())
    assert (la.verifier_calls, la.decoder_calls) == (P * per, P * per)
    assert la.prior_tokens > beam.prior_tokens       # the rollouts are counted
    assert beam_verifier_calls(256, 5, 10) == 410    # SoTo's defaults: 10 + 8 * 50
    assert beam_verifier_calls(8, 4, 2) == 2 + 2 * 2 + 4 * 2 + 4 * 2   # B > C: the beam fills up first
    # an image-free verifier decodes nothing during the search, only the P winners
    lik = beam_search(prior, dec, Recorder(requires_images=False), ["a"] * P, beams=B, candidates=C, generator=g())
    assert lik.decoder_calls == P and lik.verifier_calls == P * per
    one = sample_once(prior, dec, ["a"] * P, generator=g())
    assert (one.verifier_calls, one.decoder_calls) == (0, P) and torch.isnan(one.scores).all()


def test_lookahead_scores_the_rollout_but_keeps_the_prefix():
    N, L = SEQ.num_tokens, 3
    prior = PriorRecorder(ARPrior(tiny_raster_ar(SEQ, text=False), SamplingConfig(temperature=1.5)))
    tok = _tok()
    ver = Recorder(seed=3)
    cond = Condition(torch.tensor([1]))
    res = lookahead_search(prior, make_decoder(tok), ver, ["x"], cond, beams=2, candidates=3, lookahead=L,
                           generator=torch.Generator().manual_seed(0))
    sched = token_schedule("geometric", N)
    assert [c["tokens"].shape[1] for c in ver.calls] == [min(t + L, N) for t in sched]
    # per step: sample up to the schedule, then (except at N) a greedy rollout; the next step
    # extends the un-extended prefix
    expect, prev = [], 0
    for t in sched:
        expect.append((prev, t - prev, False))
        if t < N:
            expect.append((t, min(L, N - t), True))
        prev = t
    assert prior.calls == expect
    # the scored images are decodes of the rolled-out sequences
    for c in ver.calls:
        torch.testing.assert_close(c["images"], tok.decode_prefix(c["tokens"]))
    # rollouts are greedy: the scored tail is the argmax continuation of the prefix
    c = ver.calls[1]
    greedy, _ = prior.inner.extend(c["tokens"][:, :sched[1]], L, Condition(torch.ones(len(c["tokens"]), dtype=torch.long)),
                                   greedy=True)
    assert torch.equal(greedy, c["tokens"])
    assert res.tokens.shape == (1, N) and res.scores[0] == ver.calls[-1]["scores"].max()
    with pytest.raises(ValueError, match="lookahead"):
        lookahead_search(prior, make_decoder(tok), ver, ["x"], cond, lookahead=0)


def test_search_with_a_perfect_verifier_beats_best_of_one():
    """The verifier is the (negative) distance to a target image, which the target tokens reach
    exactly; beam search (either way of branching) beats best-of-8, which beats one sample."""
    tok = _tok()
    target = tok.decode_prefix(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))
    ver = lambda images, prompts: -(images - target).pow(2).flatten(1).mean(1)  # noqa: E731
    prior, dec, P = UniformPrior.for_spec(SEQ), make_decoder(tok), 12
    one = sample_once(prior, dec, ["t"] * P, verifier=ver, generator=torch.Generator().manual_seed(0))
    bon = best_of_n(prior, dec, ver, ["t"] * P, n=8, generator=torch.Generator().manual_seed(0))
    assert bon.scores.mean() > one.scores.mean()
    for branching in ("last", "independent"):
        beam = beam_search(prior, dec, ver, ["t"] * P, beams=3, candidates=8, branching=branching,
                           generator=torch.Generator().manual_seed(0))
        assert beam.scores.mean() > bon.scores.mean(), branching
        # the score returned is the verifier's score of the returned image
        torch.testing.assert_close(beam.scores, ver(beam.images, None))


# ---- priors ----------------------------------------------------------------------------------------
def test_uniform_prior_needs_no_model():
    u = UniformPrior(16, 8)
    ids, lp = u.extend(torch.tensor([[1, 2]]).repeat(4, 1), 3, None, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, 5) and ids.dtype == torch.long and torch.equal(ids[:, :2], torch.tensor([[1, 2]] * 4))
    assert ids.min() >= 0 and ids.max() < 16 and torch.allclose(lp, torch.full((4, 3), -math.log(16)))
    again, _ = u.extend(torch.tensor([[1, 2]]).repeat(4, 1), 3, None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    draws = u.extend(torch.zeros(4000, 0, dtype=torch.long), 1, generator=torch.Generator().manual_seed(1))[0]
    assert torch.bincount(draws.flatten(), minlength=16).min() > 150    # all ids, about equally often
    with pytest.raises(ValueError):
        u.extend(torch.zeros(1, 6, dtype=torch.long), 3)
    for alg in ALGORITHMS:
        r = search(alg, u, make_decoder(_tok()), Recorder(), ["a", "b"], num_candidates=3, beams=2, lookahead=2,
                   generator=torch.Generator().manual_seed(0))
        assert r.tokens.shape == (2, 8) and r.images.shape == (2, 3, 8, 8)


def test_search_is_deterministic_given_the_generator():
    prior = ARPrior(tiny_raster_ar(SEQ), SamplingConfig(cfg=2.0))
    from zoo.data.text import encode

    cond = Condition(text=encode(["a red circle", "two blue squares"], max_len=16))
    run = lambda seed: beam_search(prior, make_decoder(_tok()), Recorder(seed=1), ["a", "b"], cond, beams=2,  # noqa
                                   candidates=3, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.tokens, c.tokens)


def test_raster_ar_extend_continues_generate_through_the_kv_cache():
    """extend from an empty prefix draws what generate draws; from a k-token prefix (after the
    same k draws) it continues generate's sequence; its log-probs are the teacher-forced ones."""
    m = tiny_raster_ar(SEQ)
    from zoo.data.text import encode

    cond = Condition(text=encode(["a red circle", "a blue square", "three green triangles"], max_len=16))
    s = SamplingConfig(cfg=2.0, cfg_schedule="linear", top_k=6)
    ref = m.generate(cond, s, torch.Generator().manual_seed(0)).data
    full, lp = m.extend(ref[:, :0], 8, cond, s, torch.Generator().manual_seed(0))
    assert torch.equal(full, ref) and lp.shape == (3, 8) and (lp <= 0).all()
    for k in (1, 4, 7):
        g = torch.Generator().manual_seed(0)
        for _ in range(k):                                  # the k draws generate made for tokens 0..k-1
            torch.empty(3, SEQ.vocab_size).exponential_(1.0, generator=g)
        cont, _ = m.extend(ref[:, :k], 8 - k, cond, s, g)
        assert torch.equal(cont, ref)
    # log-probabilities of the new tokens (cfg 1, temperature 1) = teacher-forced log-softmax
    plain = SamplingConfig()
    ids, lp = m.extend(ref[:, :3], 5, cond, plain, torch.Generator().manual_seed(2))
    logits = m.logits(Tokens(ids, SEQ), cond).log_softmax(-1)
    want = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[:, 3:]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    greedy, _ = m.extend(ref[:, :3], 5, cond, SamplingConfig(temperature=0.0))
    assert torch.equal(m.logits(Tokens(greedy, SEQ), cond).argmax(-1)[:, 3:], greedy[:, 3:])
    with pytest.raises(ValueError):
        m.extend(ref, 1, cond)
    assert m.transformer.cache_len is None


def test_ar_prior_refuses_a_generator_without_extend():
    with pytest.raises(IncompatibleTokens, match="extend"):
        ARPrior(ToyGenerator())


# ---- decoders ----------------------------------------------------------------------------------------
def test_grid_completion_adapter_pads_with_the_fill_token():
    torch.manual_seed(0)
    grid = ToyTokenizer(8, 16).eval()                     # 2x2 grid
    dec = make_decoder(grid, fill=5)
    assert isinstance(dec, PaddedDecoder) and "token 5" in dec.describe()
    prefix = torch.tensor([[3], [7]])
    full = torch.tensor([[3, 5, 5, 5], [7, 5, 5, 5]])
    with torch.no_grad():
        torch.testing.assert_close(dec(prefix), grid.decode(Tokens.from_sequence(full, grid.spec)))
        torch.testing.assert_close(dec(torch.tensor([[1, 2, 3, 4]])),
                                   grid.decode(Tokens(torch.tensor([[[1, 2], [3, 4]]]), grid.spec)))
    assert not torch.allclose(dec(prefix), make_decoder(grid, fill=0)(prefix))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_decoder(grid, fill=16)
    with pytest.raises(ValueError):
        dec(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(IncompatibleTokens):
        OrderedDecoder(grid)
    # ordered tokens use the tokenizer's own prefix decode
    tok = _tok()
    od = make_decoder(tok)
    assert isinstance(od, OrderedDecoder)
    torch.testing.assert_close(od(torch.tensor([[1, 2, 3]])), tok.decode_prefix(torch.tensor([[1, 2, 3]])))
    # raster AR over a grid: the whole search runs through the adapter
    prior = ARPrior(tiny_raster_ar(grid.spec, text=False))
    r = beam_search(prior, dec, Recorder(), ["a"], Condition(torch.tensor([2])), beams=2, candidates=2,
                    generator=torch.Generator().manual_seed(0))
    assert r.tokens.shape == (1, 4) and r.images.shape == (1, 3, 8, 8)


def test_mismatched_prior_and_decoder_are_refused():
    with pytest.raises(IncompatibleTokens, match="decoder"):
        best_of_n(UniformPrior(16, 4), make_decoder(_tok()), Recorder(), ["a"], n=2)


def test_call_verifier_passes_only_accepted_extras():
    ex = {"tokens": torch.zeros(2, 3), "log_probs": torch.tensor([-1.0, -2.0]), "num_tokens": 3}
    assert call_verifier(lambda images, prompts: torch.ones(2), None, ["a", "b"], ex).tolist() == [1, 1]
    assert call_verifier(lambda images, prompts, log_probs: log_probs, None, ["a", "b"], ex).tolist() == [-1, -2]
    assert call_verifier(lambda images, prompts, **kw: kw["num_tokens"] * torch.ones(2), None, ["a", "b"],
                         ex).tolist() == [3, 3]
    with pytest.raises(ValueError, match="2 images"):
        call_verifier(lambda images, prompts: torch.ones(3), None, ["a", "b"], ex)
    with pytest.raises(ValueError, match="NaN"):
        call_verifier(lambda images, prompts: torch.tensor([0.0, float("nan")]), None, ["a", "b"], ex)


# ---- CLI and the claims table on random tiny models ---------------------------------------------
def test_sample_cli_search_end_to_end(tmp_path, capsys):
    from sample.cli import main

    with search_toy_registry() as (otok, gtok, gen):
        out = tmp_path / "s"
        rc = main(["--tokenizer", otok, "--generator", gen, "--prompts", "a red circle", "two blue squares",
                   "--num", "2", "--search", "beam", "--beams", "2", "--num-candidates", "3", "--verifier", "geneval",
                   "--out", str(out), "--no-progress", "--device", "cpu", "--batch-size", "4"])
        assert rc == 0
        meta = json.loads((out / "samples.json").read_text())
        steps = len(token_schedule("geometric", 8))
        per = 3 + (steps - 1) * 2 * 3
        assert meta["search"]["verifier_calls"] == meta["search"]["decoder_calls"] == 4 * per
        assert meta["search"]["expected_verifier_calls_per_sample"] == per
        assert meta["search"]["schedule"] == [1, 2, 4, 8] and meta["search"]["algorithm"] == "beam"
        assert all("score" in s and s["verifier_calls"] == per for s in meta["samples"])
        assert len(list(out.glob("0000*.png"))) == 4
        assert "verifier calls" in capsys.readouterr().err
        # likelihood verifier over the grid tokenizer, and the uniform prior with best-of-n
        rc = main(["--tokenizer", gtok, "--generator", gen, "--prompts", "a red circle", "--num", "1",
                   "--search", "lookahead", "--lookahead", "1", "--verifier", "likelihood", "--beams", "1",
                   "--num-candidates", "2", "--out", str(tmp_path / "l"), "--no-progress", "--device", "cpu"])
        assert rc == 0
        m = json.loads((tmp_path / "l" / "samples.json").read_text())["search"]
        assert m["decoder_calls"] == 1 and m["verifier_calls"] == beam_verifier_calls(4, 1, 2)
        rc = main(["--tokenizer", otok, "--generator", gen, "--prompts", "a red circle", "--num", "1",
                   "--search", "best-of-n", "--prior", "uniform", "--num-candidates", "3",
                   "--out", str(tmp_path / "u"), "--no-progress", "--device", "cpu"])
        assert rc == 0
        m = json.loads((tmp_path / "u" / "samples.json").read_text())["search"]
        assert m["prior"] == "uniform" and m["verifier_calls"] == 3
        # a verifier without weights is a one-line user error
        rc = main(["--tokenizer", otok, "--generator", gen, "--prompts", "a red circle", "--search", "beam",
                   "--verifier", "clip", "--out", str(tmp_path / "c"), "--no-progress", "--device", "cpu"])
        assert rc == 2 and "--verifier-weights" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()            # checked before the output folder is made


def test_search_claims_writes_the_table_and_caches_rows(tmp_path, monkeypatch):
    from eval import search_claims as sc

    doc = tmp_path / "checkpoints.md"
    doc.write_text(f"# models\n\nintro\n\n{sc.START}\nOLD-TABLE\n{sc.END}\n\ntail\n")
    with search_toy_registry() as (otok, gtok, gen):
        argv = ["--ordered", otok, gen, "--grid", gtok, gen, "--prompts", "2", "--budgets", "3,6",
                "--out", str(tmp_path / "cache"), "--write", str(doc), "--device", "cpu", "--lookahead", "1"]
        assert sc.main(argv) == 0
        text = doc.read_text()
        assert text.startswith("# models\n\nintro\n") and text.rstrip().endswith("tail") and "OLD-TABLE" not in text
        rows = [ln for ln in text.splitlines() if ln.startswith("| ordered") or ln.startswith("| grid")
                or ln.startswith("| uniform")]
        assert len(rows) == 3 * (1 + 3 * 2)
        beam6 = next(r for r in rows if r.startswith("| ordered") and "| beam | 6 |" in r)
        b, c = sc.beam_config(6, 8)
        assert f"| {b} x {c} | {beam_verifier_calls(8, b, c):g} |" in beam6
        assert "Beam > best-of-N" in text and "uniform prior" in text
        # a second run reads every row from the cache
        monkeypatch.setattr(sc, "measure", lambda *a, **k: pytest.fail("row was not cached"))
        assert sc.main(argv) == 0
        # --beam-shape: the same B x C in every beam/lookahead row; a budget it exceeds is skipped
        shaped = ["--ordered", otok, gen, "--prompts", "2", "--budgets", "6,40", "--algorithms", "beam",
                  "--beam-shape", "2x3", "--uniform", "none", "--out", str(tmp_path / "shaped"), "--device", "cpu"]
        monkeypatch.undo()
        assert sc.main(shaped) == 0
        rows = {json.loads(f.read_text())["ident"]["row"]: json.loads(f.read_text())["metrics"]
                for f in (tmp_path / "shaped").glob("*.json")}
        assert "skipped" in rows["ordered-beam-6"]                    # 2 x 3 needs 3 + 3 * 6 = 21 calls
        assert (rows["ordered-beam-40"]["beams"], rows["ordered-beam-40"]["candidates"]) == (2, 3)
        assert rows["ordered-beam-40"]["verifier_calls_per_prompt"] == beam_verifier_calls(8, 2, 3) == 21
        with pytest.raises(SystemExit, match="beam-shape"):
            sc.main(shaped[:-4] + ["--beam-shape", "3x2"])
    assert sc.beam_config(2, 8) is None                 # fewer calls than steps
    assert sc.beam_config(410, 256) == (5, 10)          # the reference's configuration
    tasks = [m["tag"] for m in sc.pick_prompts(7)]
    assert tasks[:6] == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


# ---- branching of beam candidates (reference: the last new token, without replacement) --------
def _assert_branched(tokens, C):
    """Rows in groups of C consecutive rows: equal but for the last token, which is distinct."""
    g = tokens.view(-1, C, tokens.shape[1])
    assert torch.equal(g[:, :, :-1], g[:, :1, :-1].expand_as(g[:, :, :-1]))
    assert all(len(set(row.tolist())) == C for row in g[:, :, -1])


@pytest.mark.parametrize("make_prior", [lambda: UniformPrior.for_spec(SEQ),
                                        lambda: ARPrior(tiny_raster_ar(SEQ), SamplingConfig(cfg=2.0))])
def test_beam_candidates_branch_at_the_last_new_token(make_prior):
    """branching='last' (default): at every step the C candidates of a beam share all new tokens
    but the last, and their last tokens are distinct; 'independent' draws whole continuations."""
    from zoo.data.text import encode

    C = 4
    cond = Condition(text=encode(["a red circle", "two blue squares"], max_len=16))
    ver = Recorder(seed=3)
    beam_search(make_prior(), make_decoder(_tok()), ver, ["a", "b"], cond, beams=2, candidates=C,
                generator=torch.Generator().manual_seed(0))
    for call in ver.calls:
        _assert_branched(call["tokens"], C)
    ind = Recorder(seed=3)
    beam_search(make_prior(), make_decoder(_tok()), ind, ["a", "b"], cond, beams=2, candidates=C,
                branching="independent", generator=torch.Generator().manual_seed(0))
    last = ind.calls[-1]["tokens"].view(-1, C, SEQ.num_tokens)   # 4 new tokens per candidate
    assert not torch.equal(last[:, :, :-1], last[:, :1, :-1].expand_as(last[:, :, :-1]))
    with pytest.raises(ValueError, match="branching"):
        beam_search(make_prior(), make_decoder(_tok()), ver, ["a"], beams=1, candidates=2, branching="first")


def test_raster_ar_extend_branches_the_last_token_without_replacement():
    """extend(..., branches=C): the first n-1 new tokens are the unbranched draws (same
    generator), the last is C distinct ids; its log-prob is the model's; greedy takes the top C."""
    from zoo.data.text import encode

    m = tiny_raster_ar(SEQ)
    cond = Condition(text=encode(["a red circle", "a blue square"], max_len=16))
    prefix = torch.tensor([[1, 2], [3, 4]])
    s = SamplingConfig()
    ids, lp = m.extend(prefix, 3, cond, s, torch.Generator().manual_seed(0), branches=5)
    assert ids.shape == (10, 5) and lp.shape == (10, 3)
    _assert_branched(ids, 5)
    plain, _ = m.extend(prefix, 2, cond, s, torch.Generator().manual_seed(0))
    assert torch.equal(ids[::5, :4], plain)
    full = lambda t: Tokens(torch.cat((t, t.new_zeros(t.shape[0], 8 - t.shape[1])), 1), SEQ)  # noqa: E731 (causal)
    rows = Condition(text=cond.text.repeat_interleave(5, 0))
    want = m.logits(full(ids), rows).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[:, 2:]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    greedy, _ = m.extend(prefix, 1, cond, SamplingConfig(temperature=0.0), branches=3)
    top = m.logits(full(greedy), Condition(text=cond.text.repeat_interleave(3, 0)))[::3, 2].topk(3, -1)
    assert torch.equal(greedy[:, 2].view(2, 3), top.indices)
    with pytest.raises(ValueError, match="distinct"):
        m.extend(prefix, 1, cond, SamplingConfig(top_k=2), torch.Generator().manual_seed(0), branches=3)


def test_uniform_prior_branches():
    u = UniformPrior.for_spec(SEQ)
    ids, lp = u.extend(torch.tensor([[1, 2]]).repeat(3, 1), 4, None, generator=torch.Generator().manual_seed(0),
                       branches=6)
    assert ids.shape == (18, 6) and lp.shape == (18, 4)
    _assert_branched(ids, 6)
    assert torch.equal(ids[:, :2], torch.tensor([[1, 2]]).expand(18, 2))
    with pytest.raises(ValueError, match="branches"):
        u.extend(torch.zeros(1, 0, dtype=torch.long), 1, branches=17)
