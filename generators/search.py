"""Test-time search over AR token priors: best-of-N, beam search, lookahead, uniform prior.

"(1D) Ordered Tokens Enable Efficient Test-Time Search" (SoTo; arXiv 2604.15453, ICML 2026;
code github.com/EPFL-VILAB/search-over-tokens, ``soto/search_algorithms/*``). Not a network:
an AR model over tokens is a *prior*, a tokenizer turns (partial) token sequences into
images, and a *verifier* scores images; the search spends verifier calls to find a sequence
the verifier likes. The paper's point: on coarse-to-fine ordered 1D tokens (FlexTok) every
prefix decodes to a whole image, so a verifier can steer the generation early; on a raster
grid a prefix is the top rows of an image.

Pieces (each replaceable):

* a **prior** (:class:`Prior`): ``extend(prefix (B, L), n, cond, greedy=, generator=,
  branches=) -> (ids (B * branches, L+n), logp (B * branches, n))``. :class:`ARPrior` wraps a generator with an ``extend`` method
  (``RasterAR.extend``: KV-cache continuation with CFG as ``generate``); :class:`UniformPrior`
  draws i.i.d. uniform ids and needs no model (the paper's training-free uniform prior), so
  every algorithm runs on either.
* a **decoder** (:class:`PrefixDecoder`): ids ``(B, k)`` for any ``1 <= k <= N`` -> images
  ``(B, 3, H, W)`` in [-1, 1]. :func:`make_decoder` picks :class:`OrderedDecoder` (the
  tokenizer's own ``decode_prefix``, for ``TokenSpec(..., ordered=True)``) or
  :class:`PaddedDecoder`, the GridTok baseline: a grid prefix has no decode of its own, so the
  unseen positions are filled with a fixed token id (0 by default) and the full grid is
  decoded -- what the reference's GridTok and Janus wrappers do (they zero-pad partial
  sequences to the full grid, ``flextok_ar/model/integration.py::_prepare_data_dict_for_2d_grid``,
  ``janus_wrapper.py::decode_tokens``).
* a **verifier**: any callable ``verifier(images, prompts, **extras) -> scores (B,)``,
  higher is better (``eval/verifiers.py`` has the Shapes-GenEval, likelihood, CLIP and
  ImageReward ones). ``prompts`` holds one entry per image (a caption, a GenEval metadata
  dict, ... whatever the verifier reads). Extras passed when the callable accepts them:
  ``tokens`` (the scored ids), ``log_probs`` (their summed prior log-probability) and
  ``num_tokens``. A verifier whose ``requires_images`` attribute is False gets
  ``images=None`` and costs no decoding.

Algorithms (all batched over prompts; deterministic given the ``torch.Generator``):

* :func:`sample_once` -- no search: one sequence per prompt.
* :func:`best_of_n` -- N full sequences per prompt (multinomial), decode, score, argmax.
  N verifier calls and N decodes per prompt.
* :func:`beam_search` -- B beams x C candidates; the token schedule gives cumulative lengths
  (``geometric`` base 2: 1, 2, 4, ..., N; ``linear``; ``fixed``; or an explicit list). Step 0
  starts from one empty beam; at every step each beam grows to ``schedule[s]`` tokens in C
  candidates, every candidate prefix is decoded and scored, and the top B by the *current*
  score are kept (scores are not accumulated). Per prompt: ``C + (steps - 1) * B * C``
  verifier calls and as many decodes (``B <= C``). How the C candidates of a beam are drawn
  (``branching``): ``"last"`` (default, the reference ``generate_ids(num_samples=C,
  replacement=False)``): the first ``n - 1`` new tokens once per beam, the last one C times
  without replacement, so the candidates differ in their last token only; ``"independent"``
  (the paper's wording): C independent draws of all ``n`` new tokens.
* :func:`lookahead_search` -- beam search where each candidate is first rolled out greedily
  (argmax, no random draws) by ``L`` extra tokens (``-1``: to the end) before it is decoded
  and scored; only the un-extended prefix stays in the beam. Same call counts as beam search,
  plus the rollout tokens (``SearchResult.prior_tokens``).

Deviations from the reference code (soto, commit 7b30738):

* ``branching="last"`` follows the reference's candidates; ``"independent"`` (C independent
  continuations of a beam, how the paper describes them) is an option.
* The schedule always ends at N (N is appended when the schedule stops short; the reference
  stops after ``max_steps`` and has an optional ``complete_after_search``), so every result is
  a full sequence and its image is the one that was scored.
* The result's image is the decode that was scored at the last step (the reference decodes
  the winner again, with the same per-prompt noise, so the image is the same for a
  deterministic decoder). With a verifier that needs no images (likelihood) the winners are
  decoded once at the end (counted in ``decoder_calls``).
* Decoder noise (flow decoders): one ``torch.Generator`` seeded with ``decode_seed`` per
  decode call, so row ``r`` of every call gets the same noise; the reference uses one noise
  tensor per prompt for all candidates.
* The log-probabilities handed to a likelihood verifier are of the whole scored sequence
  (the reference passes those of the tokens added in the current step only) under the
  distribution the tokens were drawn from; greedy rollouts add theirs at temperature 1.
* The uniform prior's greedy rollout (lookahead) draws uniform tokens: a uniform
  distribution has no mode (the reference's ``UniformPrior`` ignores ``sample=False`` too).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec

PAPER = ("(1D) Ordered Tokens Enable Efficient Test-Time Search (SoTo), arXiv 2604.15453; "
         "code github.com/EPFL-VILAB/search-over-tokens")

ALGORITHMS = ("none", "best-of-n", "beam", "lookahead")
SCHEDULES = ("geometric", "linear", "fixed")
BRANCHING = ("last", "independent")


# ---- priors ---------------------------------------------------------------------------------
class Prior:
    """A distribution over token sequences that can continue a prefix.

    ``extend(prefix (B, L) int64, n, cond, *, greedy=False, temperature=None, generator=None,
    branches=1)`` returns ``(ids (B, L + n), logp (B, n))`` with ``logp`` the log-probability
    of each new token. ``cond`` is a :class:`generators.base.Condition` with one row per prefix
    row (or None). ``greedy`` takes the argmax and must not draw from ``generator``.
    ``branches = C > 1``: the last new token is drawn C times without replacement (greedy: the
    top C), every row becoming C consecutive rows (``(B * C, L + n)``).
    """

    num_tokens: int
    vocab_size: int
    device: torch.device = torch.device("cpu")
    name: str = "prior"

    def extend(self, prefix: torch.Tensor, n: int, cond=None, *, greedy: bool = False,
               temperature: float | None = None, generator: torch.Generator | None = None, branches: int = 1):
        raise NotImplementedError


class ARPrior(Prior):
    """A next-token AR generator as a prior: any model with ``extend(prefix, n, cond, sampling,
    generator) -> (ids, logp)`` and a discrete ``spec`` (``RasterAR``: raster over a grid, or
    the ordered AR over a 1D sequence). ``sampling`` (a ``SamplingConfig``) sets CFG,
    temperature and filters for every draw. ``max_rows`` splits large calls into chunks (the
    draws then depend on it, as they depend on the batch size in ``zoo.pipeline``)."""

    def __init__(self, model, sampling=None, max_rows: int = 512):
        from generators.base import SamplingConfig

        if not callable(getattr(model, "extend", None)):
            name = getattr(model, "registry_name", None) or type(model).__name__
            raise IncompatibleTokens(f"search needs a next-token AR prior that can continue a prefix "
                                     f"(a generator with .extend, e.g. RasterAR); {name} has none")
        spec = model.spec
        if spec.kind != "discrete":
            raise IncompatibleTokens(f"search runs over discrete token ids; the prior's tokens are "
                                     f"[{spec.describe()}]")
        self.model, self.spec = model.eval(), spec
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.num_tokens, self.vocab_size = spec.num_tokens, spec.vocab_size
        self.max_rows = int(max_rows)
        self.name = getattr(model, "registry_name", None) or type(model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def extend(self, prefix, n, cond=None, *, greedy=False, temperature=None, generator=None, branches=1):
        import copy

        s = copy.copy(self.sampling)
        if greedy:
            s.temperature = 0.0
        elif temperature is not None:
            s.temperature = temperature
        ids, logps = [], []
        for a in range(0, prefix.shape[0], self.max_rows):
            b = min(a + self.max_rows, prefix.shape[0])
            kw = {"branches": branches} if branches != 1 else {}
            i, lp = self.model.extend(prefix[a:b], n, None if cond is None else cond_rows(cond, slice(a, b)),
                                      s, generator=None if greedy else generator, **kw)
            ids.append(i)
            logps.append(lp)
        return torch.cat(ids), torch.cat(logps)


class UniformPrior(Prior):
    """I.i.d. uniform ids over the vocabulary; needs no model, ignores the condition (the
    paper's training-free prior; reference ``soto/ar_priors/uniform.py``). ``logp = -log V``.
    A uniform distribution has no mode: ``greedy`` draws uniformly as well."""

    name = "uniform"

    def __init__(self, vocab_size: int, num_tokens: int, device="cpu"):
        if vocab_size < 1 or num_tokens < 1:
            raise ValueError(f"UniformPrior needs vocab_size >= 1 and num_tokens >= 1, got {vocab_size}, {num_tokens}")
        self.vocab_size, self.num_tokens = int(vocab_size), int(num_tokens)
        self.device = torch.device(device)

    @classmethod
    def for_spec(cls, spec: TokenSpec, device="cpu") -> "UniformPrior":
        if spec.kind != "discrete":
            raise IncompatibleTokens(f"a uniform prior over ids needs discrete tokens, got [{spec.describe()}]")
        return cls(spec.vocab_size, spec.num_tokens, device)

    def extend(self, prefix, n, cond=None, *, greedy=False, temperature=None, generator=None, branches=1):
        B, L = prefix.shape[0], prefix.shape[1]
        if n < 1 or L + n > self.num_tokens:
            raise ValueError(f"extend: need 1 <= n and prefix length + n <= {self.num_tokens}, got {L} and n={n}")
        if not 1 <= branches <= self.vocab_size:
            raise ValueError(f"extend: branches must be in [1, {self.vocab_size}], got {branches}")
        gdev = generator.device if generator is not None else self.device
        new = torch.randint(0, self.vocab_size, (B, n - (branches > 1)), generator=generator, device=gdev)
        ids = torch.cat((prefix.long(), new.to(prefix.device)), 1)
        if branches > 1:  # C distinct last ids per row
            last = torch.rand(B, self.vocab_size, generator=generator, device=gdev).argsort(1)[:, :branches]
            ids = torch.cat((ids.repeat_interleave(branches, 0), last.reshape(-1, 1).to(prefix.device)), 1)
        logp = torch.full((B * branches, n), -math.log(self.vocab_size), device=prefix.device)
        return ids, logp


def cond_rows(cond, idx):
    """Rows ``idx`` (slice or index tensor) of a ``Condition`` (an unconditional one keeps a batch)."""
    from generators.base import Condition

    if cond is None:
        return None
    if cond.labels is None and cond.text is None:
        n = len(range(cond.batch_size)[idx]) if isinstance(idx, slice) else len(idx)
        return Condition(batch=n)
    return Condition(*(None if t is None else t[idx.to(t.device) if torch.is_tensor(idx) else idx]
                       for t in (cond.labels, cond.text)))


# ---- decoders -------------------------------------------------------------------------------
class PrefixDecoder:
    """ids ``(B, k)``, ``1 <= k <= N`` -> images ``(B, 3, H, W)`` in [-1, 1]."""

    kind = "prefix"

    def __init__(self, tokenizer, max_rows: int = 256):
        spec = tokenizer.spec
        if spec.kind != "discrete":
            raise IncompatibleTokens(f"search decodes discrete token ids; the tokenizer's tokens are "
                                     f"[{spec.describe()}]")
        if spec.layout == "pyramid":
            raise IncompatibleTokens(f"search needs a sequence or a grid of tokens, got [{spec.describe()}]")
        self.tokenizer, self.spec = tokenizer.eval(), spec
        self.num_tokens = spec.num_tokens
        self.max_rows = int(max_rows)

    @property
    def device(self) -> torch.device:
        for p in self.tokenizer.parameters():
            return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = ids.shape[1]
        if not 1 <= k <= self.num_tokens:
            raise ValueError(f"{type(self).__name__}: prefix length must be in [1, {self.num_tokens}], got {k}")
        ids = ids.to(self.device).long()
        return torch.cat([self._decode(ids[a:a + self.max_rows], generator)
                          for a in range(0, ids.shape[0], self.max_rows)])

    def _decode(self, ids, generator):
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class OrderedDecoder(PrefixDecoder):
    """A coarse-to-fine ordered tokenizer's own prefix decode: ``tokenizer.decode_prefix(ids,
    generator=)`` (FlexTok: nested dropout makes every prefix decode to a whole image)."""

    kind = "ordered prefix decode"

    def __init__(self, tokenizer, max_rows: int = 256):
        super().__init__(tokenizer, max_rows)
        if not (self.spec.layout == "sequence" and self.spec.ordered):
            raise IncompatibleTokens(f"OrderedDecoder needs an ordered 1D sequence, got [{self.spec.describe()}]")
        if not callable(getattr(tokenizer, "decode_prefix", None)):
            raise IncompatibleTokens(f"{type(tokenizer).__name__} has ordered tokens but no decode_prefix")

    def _decode(self, ids, generator):
        return self.tokenizer.decode_prefix(ids, generator=generator)


class PaddedDecoder(PrefixDecoder):
    """The GridTok baseline: a partial raster sequence is completed with ``fill`` (a fixed token
    id, 0 by default as in the reference's GridTok/Janus wrappers) at every unseen position and
    the full grid is decoded. Full sequences decode as they are."""

    kind = "padded decode"

    def __init__(self, tokenizer, fill: int = 0, max_rows: int = 256):
        super().__init__(tokenizer, max_rows)
        if not 0 <= int(fill) < self.spec.vocab_size:
            raise ValueError(f"fill token {fill} is outside the vocabulary [0, {self.spec.vocab_size})")
        self.fill = int(fill)

    def _decode(self, ids, generator):
        B, k = ids.shape
        if k < self.num_tokens:
            ids = torch.cat((ids, ids.new_full((B, self.num_tokens - k), self.fill)), 1)
        return self.tokenizer.decode(Tokens.from_sequence(ids, self.spec))

    def describe(self) -> str:
        return f"padded decode (unseen positions = token {self.fill})"


def make_decoder(tokenizer, fill: int = 0, max_rows: int = 256) -> PrefixDecoder:
    """:class:`OrderedDecoder` for an ordered sequence with ``decode_prefix``, else
    :class:`PaddedDecoder` (grids, unordered sequences)."""
    spec = tokenizer.spec
    if spec.layout == "sequence" and spec.ordered and callable(getattr(tokenizer, "decode_prefix", None)):
        return OrderedDecoder(tokenizer, max_rows)
    return PaddedDecoder(tokenizer, fill, max_rows)


# ---- schedule -------------------------------------------------------------------------------
def token_schedule(kind: str | Sequence[int], num_tokens: int, base: float = 2.0,
                   tokens_per_step: int = 1) -> list[int]:
    """Cumulative prefix lengths, one per search step, ending at ``num_tokens``.

    ``geometric``: ``int(base**i)`` (1, 2, 4, ..., N for base 2); ``linear``:
    ``tokens_per_step * (i + 1)``; ``fixed``: 1, 2, ..., N; a list (or ``"1,2,8"``): explicit
    lengths, strictly increasing in [1, N]. N is appended when the schedule stops short.
    """
    N = int(num_tokens)
    if isinstance(kind, str) and kind not in SCHEDULES:
        try:
            kind = [int(v) for v in kind.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"token schedule must be one of {SCHEDULES} or comma-separated lengths, "
                             f"got {kind!r}") from None
    if isinstance(kind, str):
        if kind == "geometric":
            if not base > 1:
                raise ValueError(f"geometric schedule needs base > 1, got {base}")
            out, i = [], 0
            while not out or out[-1] < N:
                v = min(int(base ** i), N)
                if not out or v > out[-1]:
                    out.append(v)
                i += 1
            return out
        step = 1 if kind == "fixed" else int(tokens_per_step)
        if step < 1:
            raise ValueError(f"linear schedule needs tokens_per_step >= 1, got {tokens_per_step}")
        return sorted({min(step * (i + 1), N) for i in range(math.ceil(N / step))})
    out = [int(v) for v in kind]
    if not out or any(b <= a for a, b in zip(out, out[1:])) or out[0] < 1 or out[-1] > N:
        raise ValueError(f"an explicit token schedule must be strictly increasing lengths in [1, {N}], got {out}")
    return out if out[-1] == N else out + [N]


# ---- result ---------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Per prompt: the chosen full sequence, its image (the decode that was scored) and score.

    Counters are totals over all prompts: ``verifier_calls`` = images (or sequences) scored,
    ``decoder_calls`` = images decoded, ``prior_tokens`` = tokens drawn from the prior
    (greedy rollouts included). :meth:`per_prompt` divides them by the number of prompts.
    """

    tokens: torch.Tensor
    images: torch.Tensor
    scores: torch.Tensor
    verifier_calls: int
    decoder_calls: int
    prior_tokens: int
    algorithm: str
    settings: dict = field(default_factory=dict)
    step_scores: list = field(default_factory=list)  # best current score per prompt, per step

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0]

    def per_prompt(self) -> dict:
        P = max(self.num_prompts, 1)
        return {"verifier_calls": self.verifier_calls / P, "decoder_calls": self.decoder_calls / P,
                "prior_tokens": self.prior_tokens / P}

    def summary(self) -> dict:
        """JSON-able: algorithm, settings, counters (total and per prompt), scores."""
        return {"algorithm": self.algorithm, **self.settings, "num_prompts": self.num_prompts,
                "verifier_calls": self.verifier_calls, "decoder_calls": self.decoder_calls,
                "prior_tokens": self.prior_tokens, "per_prompt": self.per_prompt(),
                "scores": [float(s) for s in self.scores]}


# ---- the search ------------------------------------------------------------------------------
class _Run:
    """Shared state of one search: prior, decoder, verifier, counters."""

    def __init__(self, prior: Prior, decoder: PrefixDecoder | None, verifier, cond, prompts,
                 generator, decode_seed: int):
        self.prior, self.decoder, self.verifier = prior, decoder, verifier
        self.cond, self.prompts = cond, list(prompts)
        self.P = len(self.prompts)
        if cond is not None and cond.batch_size != self.P:
            raise ValueError(f"the condition has {cond.batch_size} rows but {self.P} prompts were given "
                             f"(one condition row per prompt)")
        if self.P < 1:
            raise ValueError("search needs at least one prompt")
        if decoder is not None and (decoder.num_tokens, decoder.spec.vocab_size) != (prior.num_tokens,
                                                                                       prior.vocab_size):
            raise IncompatibleTokens(f"the prior makes {prior.num_tokens} tokens over {prior.vocab_size} ids but "
                                     f"the decoder takes {decoder.num_tokens} over {decoder.spec.vocab_size}")
        self.generator, self.decode_seed = generator, int(decode_seed)
        self.verifier_calls = self.decoder_calls = self.prior_tokens = 0
        self.needs_images = verifier is not None and getattr(verifier, "requires_images", True)
        self.device = prior.device

    @property
    def N(self) -> int:
        return self.prior.num_tokens

    def extend(self, prefix, n, owner, greedy=False, branches=1):
        """Continue rows ``prefix`` whose prompt indices are ``owner`` by ``n`` tokens (each row
        into ``branches`` rows differing in the last token). ``prior_tokens`` counts the token
        positions the prior computed (a branched last token is one position)."""
        kw = {"branches": branches} if branches != 1 else {}
        ids, lp = self.prior.extend(prefix, n, cond_rows(self.cond, owner), greedy=greedy,
                                    generator=self.generator, **kw)
        self.prior_tokens += prefix.shape[0] * n
        return ids, lp.sum(1)

    def decode(self, ids):
        if self.decoder is None:
            raise ValueError("this search needs a decoder (pass the tokenizer)")
        self.decoder_calls += ids.shape[0]
        dev = self.decoder.device
        g = torch.Generator(device=dev).manual_seed(self.decode_seed)
        return self.decoder(ids, generator=g)

    def score(self, ids, logp, owner, images):
        prompts = [self.prompts[i] for i in owner.tolist()]
        extras = {"tokens": ids, "log_probs": logp, "num_tokens": ids.shape[1]}
        scores = call_verifier(self.verifier, images, prompts, extras)
        self.verifier_calls += ids.shape[0]
        return scores.to(ids.device)

    def result(self, tokens, images, scores, algorithm, settings, step_scores=()):
        if images is None:
            images = self.decode(tokens)
        return SearchResult(tokens, images, scores, self.verifier_calls, self.decoder_calls, self.prior_tokens,
                            algorithm, settings, list(step_scores))


def call_verifier(verifier: Callable, images, prompts, extras: dict) -> torch.Tensor:
    """``verifier(images, prompts, **extras)`` with only the extras its signature accepts;
    returns a float tensor ``(B,)``."""
    try:
        params = inspect.signature(verifier).parameters.values()
        if any(p.kind == p.VAR_KEYWORD for p in params):
            kw = extras
        else:
            names = {p.name for p in params}
            kw = {k: v for k, v in extras.items() if k in names}
    except (TypeError, ValueError):  # builtins without a signature
        kw = {}
    out = torch.as_tensor(verifier(images, prompts, **kw), dtype=torch.float32).detach().reshape(-1)
    if out.numel() != len(prompts):
        raise ValueError(f"the verifier returned {out.numel()} scores for {len(prompts)} images")
    if not torch.isfinite(out).all():
        raise ValueError("the verifier returned NaN or infinite scores")
    return out


def _empty(run: _Run, rows: int):
    return torch.zeros(rows, 0, dtype=torch.long, device=run.device)


def _top_per_prompt(scores: torch.Tensor, P: int, k: int) -> torch.Tensor:
    """Flat indices of the top ``k`` rows of each prompt's block (descending score; ties keep
    the earlier row), prompt-major."""
    per = scores.view(P, -1)
    order = torch.sort(per, dim=1, descending=True, stable=True).indices[:, :k]
    return (torch.arange(P, device=scores.device)[:, None] * per.shape[1] + order).reshape(-1)


def sample_once(prior: Prior, decoder: PrefixDecoder, prompts: Sequence[Any], cond=None, *,
                verifier=None, generator: torch.Generator | None = None, decode_seed: int = 0) -> SearchResult:
    """No search: one sequence per prompt from the prior. Scored (one verifier call per
    prompt) only when a verifier is given; otherwise the scores are NaN."""
    run = _Run(prior, decoder, verifier, cond, prompts, generator, decode_seed)
    owner = torch.arange(run.P, device=run.device)
    ids, lp = run.extend(_empty(run, run.P), run.N, owner)
    images = run.decode(ids)
    scores = run.score(ids, lp, owner, images) if verifier is not None else torch.full((run.P,), float("nan"))
    return run.result(ids, images, scores, "none", {})


def best_of_n(prior: Prior, decoder: PrefixDecoder | None, verifier, prompts: Sequence[Any], cond=None, *,
              n: int = 50, generator: torch.Generator | None = None, decode_seed: int = 0) -> SearchResult:
    """Best-of-N: ``n`` full sequences per prompt, decoded, scored; the argmax per prompt.
    ``n`` verifier calls and ``n`` decodes per prompt (no decodes for an image-free verifier,
    then one for the winner)."""
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    run = _Run(prior, decoder, verifier, cond, prompts, generator, decode_seed)
    owner = torch.arange(run.P, device=run.device).repeat_interleave(n)
    ids, lp = run.extend(_empty(run, run.P * n), run.N, owner)
    images = run.decode(ids) if run.needs_images else None
    scores = run.score(ids, lp, owner, images)
    best = _top_per_prompt(scores, run.P, 1)
    return run.result(ids[best], None if images is None else images[best], scores[best], "best-of-n", {"n": n},
                      [scores[best].cpu()])


def beam_search(prior: Prior, decoder: PrefixDecoder | None, verifier, prompts: Sequence[Any], cond=None, *,
                beams: int = 5, candidates: int = 10, schedule: str | Sequence[int] = "geometric",
                geometric_base: float = 2.0, tokens_per_step: int = 1, lookahead: int = 0,
                branching: str = "last", generator: torch.Generator | None = None,
                decode_seed: int = 0) -> SearchResult:
    """Beam search over token prefixes (``lookahead > 0`` or ``-1``: :func:`lookahead_search`).

    Step ``s`` grows every beam to ``schedule[s]`` tokens in C candidates (``branching``:
    ``"last"``, the reference's, differ in the last new token, drawn without replacement;
    ``"independent"``: C independent continuations), scores each candidate (after a greedy
    rollout of ``lookahead`` tokens when set) and keeps the ``beams`` best candidates of each
    prompt by their current score. Returns the best beam of the last step.
    """
    if beams < 1 or candidates < 1:
        raise ValueError(f"beam search needs beams >= 1 and candidates >= 1, got {beams}, {candidates}")
    if branching not in BRANCHING:
        raise ValueError(f"branching must be one of {BRANCHING}, got {branching!r}")
    if not (lookahead >= 0 or lookahead == -1):
        raise ValueError(f"lookahead must be >= 0 or -1 (to the end), got {lookahead}")
    run = _Run(prior, decoder, verifier, cond, prompts, generator, decode_seed)
    sched = token_schedule(schedule, run.N, geometric_base, tokens_per_step)
    P, C = run.P, candidates
    cur = _empty(run, P)                       # (P * nb, L), prompt-major
    cur_lp = torch.zeros(P, device=run.device)
    nb = 1
    images = scores = None
    step_scores = []
    for target in sched:
        owner = torch.arange(P, device=run.device).repeat_interleave(nb * C)
        if branching == "last":
            cand, lp = run.extend(cur, target - cur.shape[1], owner[::C], branches=C)
        else:
            cand, lp = run.extend(cur.repeat_interleave(C, 0), target - cur.shape[1], owner)
        lp = cur_lp.repeat_interleave(C) + lp
        scored, scored_lp = cand, lp
        if lookahead and target < run.N:
            extra = run.N - target if lookahead == -1 else min(lookahead, run.N - target)
            scored, more = run.extend(cand, extra, owner, greedy=True)
            scored_lp = lp + more
        imgs = run.decode(scored) if run.needs_images else None
        sc = run.score(scored, scored_lp, owner, imgs)
        k = min(beams, nb * C)
        keep = _top_per_prompt(sc, P, k)
        cur, cur_lp, scores = cand[keep], lp[keep], sc[keep]
        images = None if imgs is None else imgs[keep]
        nb = k
        step_scores.append(scores.view(P, k)[:, 0].cpu())
    best = torch.arange(P, device=run.device) * nb      # beams are sorted best-first
    settings = {"beams": beams, "candidates": candidates, "schedule": sched, "branching": branching}
    if lookahead:
        settings["lookahead"] = lookahead
    return run.result(cur[best], None if images is None else images[best], scores[best],
                      "lookahead" if lookahead else "beam", settings, step_scores)


def lookahead_search(prior: Prior, decoder: PrefixDecoder | None, verifier, prompts: Sequence[Any], cond=None, *,
                     lookahead: int = 8, **kw) -> SearchResult:
    """Beam search whose candidates are scored after a greedy rollout of ``lookahead`` extra
    tokens (``-1``: to the end); the beams keep the un-extended prefixes."""
    if lookahead == 0:
        raise ValueError("lookahead search needs lookahead >= 1 (or -1 = to the end); 0 is plain beam search")
    return beam_search(prior, decoder, verifier, prompts, cond, lookahead=lookahead, **kw)


def beam_verifier_calls(num_tokens: int, beams: int, candidates: int, schedule="geometric",
                        geometric_base: float = 2.0, tokens_per_step: int = 1) -> int:
    """Verifier calls per prompt of :func:`beam_search` (= decodes with an image verifier):
    ``C`` at step 0, then ``min(B, nb * C) * C`` per step (``C + (steps - 1) B C`` for B <= C)."""
    steps = len(token_schedule(schedule, num_tokens, geometric_base, tokens_per_step))
    total, nb = 0, 1
    for _ in range(steps):
        total += nb * candidates
        nb = min(beams, nb * candidates)
    return total


def search(algorithm: str, prior: Prior, decoder: PrefixDecoder | None, verifier, prompts: Sequence[Any],
           cond=None, *, num_candidates: int = 10, beams: int = 5, lookahead: int = 8,
           schedule: str | Sequence[int] = "geometric", geometric_base: float = 2.0, tokens_per_step: int = 1,
           branching: str = "last", generator: torch.Generator | None = None, decode_seed: int = 0) -> SearchResult:
    """One entry point: ``algorithm`` in :data:`ALGORITHMS` (``num_candidates`` is N for
    best-of-N and C for beam / lookahead)."""
    common = dict(generator=generator, decode_seed=decode_seed)
    beam_kw = dict(beams=beams, candidates=num_candidates, schedule=schedule, geometric_base=geometric_base,
                   tokens_per_step=tokens_per_step, branching=branching, **common)
    if algorithm == "none":
        return sample_once(prior, decoder, prompts, cond, verifier=verifier, **common)
    if algorithm == "best-of-n":
        return best_of_n(prior, decoder, verifier, prompts, cond, n=num_candidates, **common)
    if algorithm == "beam":
        return beam_search(prior, decoder, verifier, prompts, cond, **beam_kw)
    if algorithm == "lookahead":
        return lookahead_search(prior, decoder, verifier, prompts, cond, lookahead=lookahead, **beam_kw)
    raise ValueError(f"unknown search algorithm {algorithm!r}; expected one of {ALGORITHMS}")


__all__ = ["ALGORITHMS", "ARPrior", "BRANCHING", "OrderedDecoder", "PaddedDecoder", "PrefixDecoder", "Prior", "SCHEDULES",
           "SearchResult", "UniformPrior", "beam_search", "beam_verifier_calls", "best_of_n", "call_verifier",
           "cond_rows", "lookahead_search", "make_decoder", "sample_once", "search", "token_schedule"]
