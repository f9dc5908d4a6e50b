"""The SoTo claims on Shapes-GenEval in one table: priors x search algorithms at equal verifier calls.

"(1D) Ordered Tokens Enable Efficient Test-Time Search" (SoTo, arXiv 2604.15453) claims that
(1) beam search beats best-of-N at equal verifier calls on ordered tokens, (2) ordered 1D
tokens scale better with search than 2D grid tokens under the same search and verifier, and
(3) search over a uniform prior (no AR model) generates something. This command measures
them on Shapes-GenEval::

    python -m eval.search_claims --ordered tokenizer/flextok-tiny:shapes generator/raster-ar-tiny:shapes-flextok \\
        --grid tokenizer/vq-tiny:shapes generator/raster-ar-tiny:shapes-multi \\
        --prompts 96 --budgets 8,32,128 --cfg 2.0 --write checkpoints.md

(the ordered AR and the grid raster AR were trained on the same 1-4-object scenes; ``--ordered
TOK none`` measures the uniform prior over the ordered tokenizer's vocabulary only.)

Rows: for each prior -- ``ordered`` (the ordered AR + its tokenizer's prefix decode), ``grid``
(raster AR over a grid; partial grids are decoded padded with ``--grid-fill``, the GridTok
baseline of ``generators/search.py``) and ``uniform`` (i.i.d. uniform ids over the
``--uniform`` tokenizer's vocabulary, no AR model) -- and each algorithm: sampling without
search (0 verifier calls), best-of-N (N = budget), beam and lookahead (the B x C with the
most verifier calls within the budget, C = 2B preferred as in the reference's 5 x 10; the
calls actually made are reported). Each row reports the GenEval overall score (mean over the
tasks present of the fraction of prompts whose final image is correct, one image per prompt)
and the verifier / decoder calls and AR tokens per prompt.

The verifier (``--verifier geneval``, default) is the graded Shapes-GenEval verifier of
``eval/verifiers.py`` -- the same detector that evaluates, i.e. an oracle verifier: the table
measures how well each prior turns verifier calls into correct images, not how a learned
reward model generalises (the paper verifies with ImageReward etc. and evaluates with GenEval).

Every row is cached in ``--out`` as ``<prior>-<algorithm>-<budget>.json`` keyed by its
settings and the weights' sha256 (random-init models: by name and init seed), so an
interrupted run resumes. ``--write FILE`` replaces the text between
``<!-- search-claims:start -->`` and ``<!-- search-claims:end -->`` in FILE (appending a
section with the markers when FILE has none), with the command that made it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from generators.search import ALGORITHMS, BRANCHING

START, END = "<!-- search-claims:start -->", "<!-- search-claims:end -->"
PRIORS = ("ordered", "grid", "uniform")


# ---- prompts and budgets -----------------------------------------------------------------------
def pick_prompts(k: int, tasks=None, seed: int = 43) -> list[dict]:
    """``k`` Shapes-GenEval prompts, taken round-robin over the tasks (deterministic)."""
    from eval.geneval import TASKS
    from eval.geneval_shapes import make_prompts

    tasks = tuple(tasks or TASKS)
    if k < 1:
        raise ValueError(f"--prompts must be >= 1, got {k}")
    per = math.ceil(k / len(tasks))
    by_task = {t: [m for m in make_prompts(per, seed, tasks=(t,))] for t in tasks}
    out = []
    for i in range(per):
        for t in tasks:
            if i < len(by_task[t]):
                out.append(by_task[t][i])
    return out[:k]


def beam_config(budget: int, num_tokens: int, schedule="geometric") -> tuple[int, int] | None:
    """The (B, C), B <= C, with the most beam-search verifier calls per prompt within
    ``budget``; ties broken towards C = 2B (the reference's 5 x 10), then larger C. None when
    even B = C = 1 (one call per step) exceeds the budget."""
    from generators.search import beam_verifier_calls

    best, best_key = None, None
    for b in range(1, budget + 1):
        for c in range(b, budget + 1):
            calls = beam_verifier_calls(num_tokens, b, c, schedule)
            if calls > budget:
                break
            key = (calls, -abs(math.log(c / b / 2.0)), c)
            if best_key is None or key > best_key:
                best, best_key = (b, c), key
    return best


# ---- one row -------------------------------------------------------------------------------------
class Setup:
    """A prior + decoder (+ the conditions) for one of the three prior kinds."""

    def __init__(self, kind: str, tokenizer: str, generator: str | None, sampling, device, grid_fill: int):
        from generators.search import ARPrior, UniformPrior, make_decoder
        from zoo.pipeline import Pipeline, load_model

        self.kind, self.tokenizer_src, self.generator_src = kind, tokenizer, generator
        if generator is None:
            tok = load_model(tokenizer, "tokenizer").to(device)
            self.pipe, self.prior = None, UniformPrior.for_spec(tok.spec, device)
        else:
            self.pipe = Pipeline.load(tokenizer, generator, device=device)
            tok = self.pipe.tokenizer
            self.prior = ARPrior(self.pipe.generator, sampling)
        self.decoder = make_decoder(tok, fill=grid_fill)
        self.spec = tok.spec

    def condition(self, prompts: list[str]):
        if self.pipe is None:
            return None
        from zoo.pipeline import text_conditioning

        if not text_conditioning(self.pipe.generator)[0]:
            raise ValueError(f"{self.generator_src} takes no captions: the search claims need a "
                             f"text-conditioned generator")
        return self.pipe.make_condition(prompts=prompts).to(self.pipe.device)

    def ident(self) -> dict:
        return {"tokenizer": self.tokenizer_src, "tokenizer_weights": _weights_ident(self.tokenizer_src),
                "generator": self.generator_src,
                "generator_weights": None if self.generator_src is None else _weights_ident(self.generator_src)}


def _weights_ident(source: str) -> str:
    """sha256 prefix of a checkpoint's weights; ``random-init`` for a registry name without tag."""
    name, sep, tag = str(source).partition(":")
    if sep or Path(source).is_dir():
        from eval.leaderboard import _weights_id

        return _weights_id(source)
    return "random-init (init_seed 0)"


def measure(setup: Setup, algorithm: str, budget: int | None, metadatas: list[dict], *, verifier, evaluator,
            lookahead: int, seed: int, batch_size: int, branching: str = "last",
            beam_shape: tuple[int, int] | None = None) -> dict:
    """Run one row over all prompts; GenEval overall of the final images and the call counts."""
    from eval.geneval import summarize
    from generators.search import search
    from zoo.pipeline import batch_seed, to_uint8

    beams = cands = None
    if algorithm in ("beam", "lookahead"):
        bc = beam_config(budget, setup.prior.num_tokens) if beam_shape is None else beam_shape
        if bc is None:
            return {"skipped": f"budget {budget} < the {setup.prior.num_tokens}-token schedule's steps"}
        if beam_shape is not None:
            from generators.search import beam_verifier_calls

            if (calls := beam_verifier_calls(setup.prior.num_tokens, *bc)) > budget:
                return {"skipped": f"{bc[0]} x {bc[1]} needs {calls} calls > budget {budget}"}
        beams, cands = bc
    elif algorithm == "best-of-n":
        cands = budget
    prompts = [m["prompt"] for m in metadatas]
    totals = {"verifier_calls": 0, "decoder_calls": 0, "prior_tokens": 0}
    records = []
    t0 = time.perf_counter()
    for start in range(0, len(metadatas), batch_size):
        meta = metadatas[start:start + batch_size]
        g = torch.Generator(device=setup.prior.device).manual_seed(batch_seed(seed, start))
        res = search(algorithm, setup.prior, setup.decoder, None if algorithm == "none" else verifier, meta,
                     setup.condition(prompts[start:start + batch_size]), num_candidates=cands or 1,
                     beams=beams or 1, lookahead=lookahead, branching=branching, generator=g,
                     decode_seed=batch_seed(seed, start))
        for k in totals:
            totals[k] += getattr(res, k)
        for img, m in zip(to_uint8(res.images).numpy(), meta):
            correct, _ = evaluator.evaluate(img, m)
            records.append({"correct": correct, "tag": m["tag"], "metadata": json.dumps(m)})
    s = summarize(records)
    P = len(metadatas)
    return {"overall": s["overall"], "correct_prompts": s["correct_prompts"],
            "tasks": {t: v["score"] for t, v in s["tasks"].items()}, "beams": beams, "candidates": cands,
            "num_tokens": setup.prior.num_tokens, "prompts": P, "seconds": time.perf_counter() - t0,
            **{f"{k}_per_prompt": v / P for k, v in totals.items()}}


# ---- table and claims ---------------------------------------------------------------------------
def _row_key(prior: str, algorithm: str, budget) -> str:
    return f"{prior}-{algorithm}" + ("" if budget is None else f"-{budget}")


def table(rows: list[tuple[str, str, int | None]], results: dict, specs: dict) -> str:
    head = ("| prior | tokens | algorithm | budget | B x C | verifier calls / prompt | decoder calls / prompt "
            "| AR tokens / prompt | GenEval overall | correct prompts |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for prior, algo, budget in rows:
        m = results.get(_row_key(prior, algo, budget))
        b = "" if budget is None else str(budget)
        if m is None or "skipped" in m:
            why = "not measured" if m is None else m["skipped"]
            lines.append(f"| {prior} | {specs.get(prior, '')} | {algo} | {b} | | | | | {why} | |")
            continue
        bc = (f"{m['beams']} x {m['candidates']}" if m.get("beams") else
              (f"N = {m['candidates']}" if algo == "best-of-n" else ""))
        lines.append(f"| {prior} | {specs.get(prior, '')} | {algo} | {b} | {bc} | {m['verifier_calls_per_prompt']:g} | "
                     f"{m['decoder_calls_per_prompt']:g} | {m['prior_tokens_per_prompt']:g} | **{m['overall']:.3f}** | "
                     f"{m['correct_prompts']:.1%} |")
    return "\n".join(lines)


def claims(results: dict, budgets: list[int]) -> list[str]:
    """The three claims, each stated as holding or not from the measured rows."""
    def get(prior, algo, budget=None):
        m = results.get(_row_key(prior, algo, budget))
        return None if m is None or "skipped" in m else m["overall"]

    out = []
    pairs = [(b, get("ordered", "beam", b), get("ordered", "best-of-n", b)) for b in budgets]
    pairs = [(b, x, y) for b, x, y in pairs if x is not None and y is not None]
    if pairs:
        good = [str(b) for b, x, y in pairs if x > y]
        bad = [str(b) for b, x, y in pairs if x <= y]
        verdict = "holds" if not bad else ("does not hold" if not good else "holds only in part")
        out.append(f"1. Beam > best-of-N on ordered tokens at equal verifier calls: **{verdict}** "
                   f"(beam vs best-of-N overall: " + "; ".join(f"{b}: {x:.3f} vs {y:.3f}" for b, x, y in pairs) + ")"
                   + (f"; beam wins at budgets {', '.join(good)}" if good and bad else ""))
    else:
        out.append("1. Beam > best-of-N on ordered tokens: not measured")
    top = max(budgets) if budgets else None
    gains = {}
    for prior in ("ordered", "grid"):
        base = get(prior, "none")
        best = [v for a in ("best-of-n", "beam", "lookahead") if (v := get(prior, a, top)) is not None]
        beam = get(prior, "beam", top)
        if base is not None and beam is not None:
            gains[prior] = (beam - base, max(best) - base)
    if len(gains) == 2:
        (ob, obest), (gb, gbest) = gains["ordered"], gains["grid"]
        verdict = "holds" if ob > gb else "does not hold"
        out.append(f"2. Ordered tokens scale better with search than grid tokens (same verifier, budget {top}): "
                   f"**{verdict}** (gain of beam search over sampling: ordered {ob:+.3f}, grid {gb:+.3f}; "
                   f"of the best algorithm: ordered {obest:+.3f}, grid {gbest:+.3f})")
    else:
        out.append("2. Ordered vs grid scaling: not measured (needs both priors' sampling and beam rows)")
    uni = [(a, b, v) for a in ALGORITHMS for b in ([None] if a == "none" else budgets)
           if (v := get("uniform", a, b)) is not None]
    if uni:
        a, b, v = max(uni, key=lambda r: r[2])
        base = get("uniform", "none")
        verdict = "holds" if v > 0 else "does not hold"
        out.append(f"3. Search over a uniform prior generates something: **{verdict}** (best: {a}"
                   + (f" at budget {b}" if b else "") + f", GenEval overall {v:.3f}"
                   + (f"; uniform sampling without search {base:.3f}" if base is not None else "") + ")")
    else:
        out.append("3. Uniform prior: not measured")
    return out


def write_section(path: Path, text: str) -> None:
    """Replace the text between the markers of ``path``; append a section with them if absent."""
    doc = path.read_text() if path.is_file() else ""
    if START not in doc or END not in doc:
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + \
            f"## Test-time search: the SoTo claims on Shapes-GenEval\n\n{START}\n{END}\n"
    a, b = doc.index(START) + len(START), doc.index(END)
    path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


# ---- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.search_claims", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ordered", nargs=2, metavar=("TOK", "GEN"),
                   help="ordered tokenizer + its AR generator (GEN 'none': no ordered-AR rows; the tokenizer "
                        "still feeds --uniform ordered)")
    p.add_argument("--grid", nargs=2, metavar=("TOK", "GEN"), help="grid tokenizer + its raster AR generator")
    p.add_argument("--uniform", choices=("ordered", "grid", "none"), default="ordered",
                   help="the tokenizer whose vocabulary the uniform prior draws from (default: the ordered one)")
    p.add_argument("--prompts", type=int, default=60, help="Shapes-GenEval prompts, round-robin over the tasks")
    p.add_argument("--tasks", default="", help="comma-separated GenEval tasks (default: all six)")
    p.add_argument("--budgets", default="8,32,128", help="verifier calls per prompt, comma-separated")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"subset of {','.join(ALGORITHMS)}")
    p.add_argument("--lookahead", type=int, default=8, help="greedy rollout tokens of lookahead search")
    p.add_argument("--beam-shape", metavar="BxC", default=None,
                   help="fixed beams x candidates for every beam/lookahead row (default: the shape with the most "
                        "calls within each budget, which can differ between priors of different lengths)")
    p.add_argument("--branching", choices=BRANCHING, default="last",
                   help="beam candidates: 'last' (the reference: differ in the last new token, drawn without "
                        "replacement) or 'independent' draws")
    p.add_argument("--verifier", choices=("geneval", "likelihood"), default="geneval")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grid-fill", type=int, default=0, help="token id for the unseen positions of a partial grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per search call (part of the seed key)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/search_claims", help="per-row result cache (resumable)")
    p.add_argument("--write", metavar="FILE", help="replace the table between the search-claims markers of FILE")
    return p


def main(argv=None) -> int:
    from eval.verifiers import GenEvalVerifier, make_verifier
    from generators.base import SamplingConfig

    a = build_parser().parse_args(argv)
    try:
        budgets = sorted({int(b) for b in a.budgets.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--budgets takes comma-separated integers, got {a.budgets!r}") from None
    if not budgets or budgets[0] < 1:
        raise SystemExit(f"--budgets must be integers >= 1, got {a.budgets!r}")
    algos = [s.strip() for s in a.algorithms.split(",") if s.strip()]
    if not algos or any(s not in ALGORITHMS for s in algos):
        raise SystemExit(f"--algorithms takes a subset of {','.join(ALGORITHMS)}, got {a.algorithms!r}")
    beam_shape = None
    if a.beam_shape:
        try:
            beam_shape = tuple(int(v) for v in a.beam_shape.lower().split("x"))
            assert len(beam_shape) == 2 and 1 <= beam_shape[0] <= beam_shape[1]
        except (ValueError, AssertionError):
            raise SystemExit(f"--beam-shape takes BxC with 1 <= B <= C, got {a.beam_shape!r}") from None
    if a.ordered is None and a.grid is None:
        raise SystemExit("pass --ordered TOK GEN and/or --grid TOK GEN")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampling = SamplingConfig(cfg=a.cfg, temperature=a.temperature)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] or None
    metadatas = pick_prompts(a.prompts, tasks)
    setups = {}
    if a.ordered and a.ordered[1] != "none":  # GEN "none": the tokenizer only feeds the uniform prior
        setups["ordered"] = Setup("ordered", *a.ordered, sampling, device, a.grid_fill)
    if a.grid:
        setups["grid"] = Setup("grid", *a.grid, sampling, device, a.grid_fill)
    if a.uniform != "none" and getattr(a, a.uniform):
        setups["uniform"] = Setup("uniform", getattr(a, a.uniform)[0], None, sampling, device, a.grid_fill)
    verifier = make_verifier(a.verifier)
    evaluator = GenEvalVerifier()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(p, al, None if al == "none" else b) for p in PRIORS if p in setups for al in algos
            for b in ([None] if al == "none" else budgets)]
    results = {}
    for prior, algo, budget in rows:
        key = _row_key(prior, algo, budget)
        ident = {"row": key, **setups[prior].ident(), "prompts": [m["prompt"] for m in metadatas],
                 "verifier": a.verifier, "cfg": a.cfg, "temperature": a.temperature, "lookahead": a.lookahead,
                 **({"branching": a.branching} if algo in ("beam", "lookahead") else {}),
                 **({"beam_shape": list(beam_shape)} if beam_shape and algo in ("beam", "lookahead") else {}),
                 "grid_fill": a.grid_fill, "seed": a.seed, "batch_size": a.batch_size, "device": device}
        cache = out / f"{key}.json"
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("ident") == ident:
                results[key] = saved["metrics"]
                continue
        print(f"[search-claims] {key}: {len(metadatas)} prompts", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        results[key] = measure(setups[prior], algo, budget, metadatas, verifier=verifier, evaluator=evaluator,
                               lookahead=a.lookahead, seed=a.seed, batch_size=a.batch_size, branching=a.branching,
                               beam_shape=beam_shape)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ident": ident, "metrics": results[key]}, indent=2))
        tmp.replace(cache)
    specs = {p: f"{s.spec.describe()} ({s.decoder.describe()})" for p, s in setups.items()}
    text = table(rows, results, specs) + "\n\n" + "\n".join(claims(results, budgets))
    print(text)
    if a.write:
        cmd = "python -m eval.search_claims " + " ".join(argv if argv is not None else sys.argv[1:])
        note = (f"Shapes-GenEval, {len(metadatas)} prompts (one image each), verifier `{a.verifier}`"
                + (" (the evaluating detector itself: an oracle verifier)" if a.verifier == "geneval" else "")
                + f", AR sampling cfg {a.cfg:g}, temperature {a.temperature:g}; budgets = verifier calls per "
                  f"prompt; beam/lookahead use the B x C (B <= C) with the most calls within the budget, "
                  f"candidates branched `{a.branching}`."
                + (f" Beam/lookahead shape fixed at {beam_shape[0]} x {beam_shape[1]}." if beam_shape else ""))
        write_section(Path(a.write), f"```bash\n{cmd}\n```\n\n{note}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
