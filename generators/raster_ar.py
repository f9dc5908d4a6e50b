"""Raster-order next-token prediction: LlamaGen (Sun et al. 2024, arXiv 2406.06525, §2.2).

A Llama decoder (RMSNorm, SwiGLU, 2D RoPE, no biases) over ``[condition prefix] + tokens``
in raster order with a causal mask. Training is teacher-forced: the input is the prefix
followed by tokens ``0 .. N-2`` and the outputs at the last prefix position and at every
token predict tokens ``0 .. N-1`` (LlamaGen ``cls_token_num = 1`` for class conditioning).
Sampling pre-fills the prefix into a static KV cache and then decodes one token per step
(1 prefill + N-1 decodes = N forward passes), with classifier-free guidance computed on a
doubled batch ``[cond; uncond]`` in the same forward.

Any layout is accepted: a grid uses 2D RoPE over (row, col); a sequence or pyramid is
flattened with ``Tokens.to_sequence()`` (pyramids scale after scale) and uses 1D RoPE over
the flat index. Discrete and binary tokens are supported; continuous tokens need a
flow/diffusion head and are refused at construction.

Deviation from LlamaGen's code: by default prefix tokens are not rotated (see
``generators.transformer``) instead of having their queries/keys zeroed by an all-zero
rotation table. ``prefix_rope="zero"`` restores LlamaGen's zero rotation; the LlamaGen
converter (``arzoo convert --from llamagen``) sets it, so converted GPT-B/L/XL weights give
the reference logits. Everything else that shapes the outputs matches the reference: RMSNorm
eps 1e-5, SwiGLU width ``find_multiple(int(8 dim / 3), 256)``, class table of
``num_classes + 1`` rows with the null class last, token dropout on ``[prefix] + tokens``,
2D RoPE halves (rows, then columns) with interleaved channel pairs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from generators.base import Condition, Generator, SamplingConfig
from generators.conditioning import ConditionEncoder
from generators.heads import TokenEmbedding, make_head
from generators.transformer import Transformer
from zoo.registry import register
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec

PAPER = "LlamaGen, Sun et al. 2024 (arXiv 2406.06525), §2.2"


class RasterAR(Generator):
    """LlamaGen-style raster AR generator over discrete or binary tokens.

    Args:
        spec: the tokenizer's :class:`TokenSpec` (discrete or binary; any layout).
        num_classes: class conditioning (one prefix token, null class = ``num_classes``).
        text_vocab_size, text_len: caption conditioning with a :class:`WordTextEncoder`
            (``text_len`` prefix tokens); both class and text may be enabled.
        dim, depth, heads, ffn_multiple: trunk size (SwiGLU width rounded to ``ffn_multiple``).
        dropout: residual / FFN dropout; token_dropout: dropout on the input embeddings;
        class_dropout: probability of dropping class and caption (independently) to null.
        text_depth: layers of the word text encoder.
        prefix_rope: rotation of the condition prefix's queries/keys: ``"none"`` (identity,
            the zoo's default) or ``"zero"`` (LlamaGen's all-zero table: the prefix queries and
            keys are 0; set for converted LlamaGen/NAR weights).
    """

    trunk = "transformer"

    def __init__(self, spec: TokenSpec, num_classes: int | None = None, text_vocab_size: int | None = None,
                 text_len: int = 16, dim: int = 256, depth: int = 6, heads: int = 4, ffn_multiple: int = 256,
                 dropout: float = 0.0, token_dropout: float = 0.0, class_dropout: float = 0.1,
                 text_depth: int = 2, prefix_rope: str = "none"):
        super().__init__()
        if isinstance(spec, dict):
            spec = TokenSpec.from_dict(spec)
        if not isinstance(spec, TokenSpec):
            raise TypeError(f"RasterAR needs a TokenSpec, got {type(spec).__name__}")
        try:
            spec.require(kind=("discrete", "binary"), who="RasterAR (LlamaGen raster next-token prediction)")
        except IncompatibleTokens as e:
            raise IncompatibleTokens(f"{e}; continuous tokens need a flow-matching/diffusion head "
                                     "(use an xAR or MAR-style generator)") from None
        self.spec = spec
        self.grid = spec.layout == "grid"
        self.cond_encoder = ConditionEncoder(dim, num_classes, text_vocab_size, text_len, class_dropout,
                                             text_depth=text_depth, text_heads=heads)
        self.embed = TokenEmbedding(spec, dim)
        self.tok_dropout = nn.Dropout(token_dropout)
        self.prefix_rope = prefix_rope
        self.transformer = Transformer(dim, depth, heads, ffn_multiple, rope="2d" if self.grid else "1d",
                                       dropout=dropout, prefix_rope=prefix_rope)
        self.head = make_head(spec, dim)

    # ---- layout ----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens

    @property
    def prefix_len(self) -> int:
        return self.cond_encoder.prefix_len

    @property
    def seq_len(self) -> int:
        """Slots of the training sequence / KV cache: prefix + tokens 0..N-2."""
        return self.prefix_len + self.num_tokens - 1

    def positions(self, device=None) -> torch.Tensor:
        """RoPE positions of the ``seq_len`` slots: prefix = -1 (unrotated), then tokens 0..N-2.

        Grid: (row, col) of the raster index; otherwise the flat index.
        """
        P, N = self.prefix_len, self.num_tokens
        idx = torch.arange(N - 1, device=device)
        if self.grid:
            w = self.spec.shape[1]
            tok = torch.stack((idx // w, idx % w), -1)
            return torch.cat((torch.full((P, 2), -1, device=device), tok))
        return torch.cat((torch.full((P,), -1, device=device), idx))

    def _batch(self, cond: Condition | None, fallback: int | None = None) -> int:
        if fallback is not None:
            return int(fallback)
        if cond is None:
            raise ValueError("pass a Condition (Condition(batch=B) for unconditional sampling)")
        return cond.batch_size

    # ---- training ---------------------------------------------------------------------
    def logits(self, tokens: Tokens, cond: Condition | None) -> torch.Tensor:
        """One full causal forward (no cache): logits ``(B, N, V)`` (``(B, N, K)`` for bits)
        predicting each token from the prefix and the tokens before it."""
        seq = self.check_tokens(tokens).to_sequence().data
        return self._logits_seq(seq, cond)

    def _logits_seq(self, seq: torch.Tensor, cond: Condition | None) -> torch.Tensor:
        B = seq.shape[0]
        dev = self.head.proj.weight.device
        seq = seq.to(dev)
        prefix = self.cond_encoder(cond.to(dev) if cond is not None else None, batch=self._batch(cond, B))
        if prefix.shape[0] != B:
            raise ValueError(f"condition batch {prefix.shape[0]} does not match token batch {B}")
        x = torch.cat((prefix, self.embed(seq[:, :-1])), 1)
        h = self.transformer(self.tok_dropout(x), self.positions(dev), is_causal=True)
        return self.head(h[:, self.prefix_len - 1:])

    def loss(self, tokens: Tokens, cond: Condition | None) -> dict:
        """Teacher-forced next-token loss over all N tokens -> ``{"loss", "acc"}``."""
        seq = self.check_tokens(tokens).to_sequence().data
        logits = self._logits_seq(seq, cond)
        return self.head.loss_from_logits(logits, seq.to(logits.device))

    # ---- sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: Condition | None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tokens:
        """Sample ``Tokens`` of ``self.spec``: prefill, then one token per forward.

        CFG (``sampling.cfg != 1`` and a conditional model) doubles the batch with the null
        prefix; the scale at step ``i`` is ``sampling.cfg_at(i, N)``. Runs in eval mode.
        """
        return self._cached_decode(cond, self.sampling_config(sampling), generator)[0]

    @torch.no_grad()
    def cached_logits(self, tokens: Tokens, cond: Condition | None) -> torch.Tensor:
        """Teacher-forced decoding through the KV cache, exactly the path :meth:`generate`
        takes (prefill + one token per step) but feeding ``tokens`` instead of samples and
        without CFG. Returns ``(B, N, ·)`` logits; equals :meth:`logits` in eval mode (the
        test that the cache is correct)."""
        seq = self.check_tokens(tokens).to_sequence().data
        return self._cached_decode(cond, SamplingConfig(), None, teacher=seq, batch=seq.shape[0])[1]

    def _cached_decode(self, cond, sampling: SamplingConfig, generator, teacher=None, batch=None):
        was_training = self.training
        self.eval()
        try:
            return self._cached_decode_eval(cond, sampling, generator, teacher, batch)
        finally:
            self.transformer.clear_cache()
            self.train(was_training)

    def _cached_decode_eval(self, cond, sampling, generator, teacher, batch):
        dev = self.head.proj.weight.device
        B = self._batch(cond, batch)
        cond = cond.to(dev) if cond is not None else None
        N, P = self.num_tokens, self.prefix_len
        prefix = self.cond_encoder(cond, batch=B)
        use_cfg = teacher is None and self.cond_encoder.conditional and (
            sampling.cfg != 1.0)
        if use_cfg:
            prefix = torch.cat((prefix, self.cond_encoder.null_condition(B).to(prefix.dtype)))
        pos = self.positions(dev)
        self.transformer.setup_cache(prefix.shape[0], self.seq_len)
        h = self.transformer(prefix, pos[:P], input_pos=torch.arange(P, device=dev), is_causal=True)[:, -1:]
        toks, logits_out = [], []
        for i in range(N):
            if i > 0:
                prev = toks[-1].unsqueeze(1)
                if use_cfg:
                    prev = torch.cat((prev, prev))
                slot = P + i - 1
                h = self.transformer(self.embed(prev), pos[slot:slot + 1],
                                     input_pos=torch.tensor([slot], device=dev), is_causal=True)
            logits = self.head(h)[:, 0]
            if teacher is not None:
                logits_out.append(logits)
                toks.append(teacher[:, i].to(dev))
                continue
            kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                      generator=generator)
            if use_cfg:
                c, u = logits.chunk(2)
                toks.append(self.head.sample(c, uncond=u, cfg=sampling.cfg_at(i, N), **kw))
            else:
                toks.append(self.head.sample(logits, **kw))
        out = Tokens.from_sequence(torch.stack(toks, 1), self.spec) if teacher is None else None
        return out, (torch.stack(logits_out, 1) if teacher is not None else None)

    # ---- prefix continuation (test-time search, generators/search.py) ----------------
    @torch.no_grad()
    def extend(self, prefix: torch.Tensor, n: int, cond: Condition | None,
               sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
               branches: int = 1):
        """Continue ``prefix`` (flat token values ``(B, L, *per_token)``, ``0 <= L < N``) by ``n``
        tokens through the KV cache: one prefill of ``[condition] + prefix``, then one token per
        forward, with CFG, temperature and filters as :meth:`generate` (the CFG scale of token
        ``i`` is ``sampling.cfg_at(i, N)`` with ``i`` the absolute index). ``temperature=0`` is
        greedy and draws nothing from ``generator``. From an empty prefix with ``n = N`` it draws
        exactly what :meth:`generate` draws and returns the same tokens.

        ``branches = C > 1`` (the SoTo reference's ``generate_ids(num_samples=C,
        replacement=False)``): the first ``n - 1`` new tokens are drawn once per row and the
        last one C times *without replacement* (greedy: the top C), so every row becomes C rows
        (row-major, ``(B * C, L + n)``) that differ in their last token. Discrete ids only.

        Returns ``(ids (B, L + n, *per_token), logp (B, n))``: ``logp`` is the log-probability
        of each new token under the distribution it was drawn from (guided, tempered, filtered;
        for ``temperature=0``, the guided logits at temperature 1). Runs in eval mode.
        """
        sampling = self.sampling_config(sampling)
        if branches < 1 or (branches > 1 and self.spec.kind != "discrete"):
            raise ValueError(f"extend: branches must be >= 1 (> 1 only for discrete ids, drawn without "
                             f"replacement), got {branches} for [{self.spec.describe()}]")
        was_training = self.training
        self.eval()
        try:
            return self._extend_eval(prefix, int(n), cond, sampling, generator, int(branches))
        finally:
            self.transformer.clear_cache()
            self.train(was_training)

    def _extend_eval(self, prefix, n, cond, sampling, generator, branches=1):
        from generators.sampling import categorical_probs, cfg_logits

        dev = self.head.proj.weight.device
        N, P = self.num_tokens, self.prefix_len
        prefix = prefix.to(dev)
        B, L = prefix.shape[0], prefix.shape[1]
        if n < 1 or L + n > N:
            raise ValueError(f"extend: need 1 <= n and prefix length + n <= {N}, got prefix {L} and n={n}")
        cond = cond.to(dev) if cond is not None else None
        cond_prefix = self.cond_encoder(cond, batch=self._batch(cond, B))
        if cond_prefix.shape[0] != B:
            raise ValueError(f"condition batch {cond_prefix.shape[0]} does not match prefix batch {B}")
        use_cfg = self.cond_encoder.conditional and sampling.cfg != 1.0
        if use_cfg:
            cond_prefix = torch.cat((cond_prefix, self.cond_encoder.null_condition(B).to(cond_prefix.dtype)))
        dup = (lambda t: torch.cat((t, t))) if use_cfg else (lambda t: t)  # noqa: E731
        pos = self.positions(dev)
        self.transformer.setup_cache(cond_prefix.shape[0], self.seq_len)
        x = torch.cat((cond_prefix, self.embed(dup(prefix)).to(cond_prefix.dtype)), 1)
        h = self.transformer(x, pos[:P + L], input_pos=torch.arange(P + L, device=dev), is_causal=True)[:, -1:]
        new, logps = [], []
        for j in range(n):
            i = L + j
            if j > 0:
                slot = P + i - 1
                h = self.transformer(self.embed(dup(new[-1].unsqueeze(1))), pos[slot:slot + 1],
                                     input_pos=torch.tensor([slot], device=dev), is_causal=True)
            logits = self.head(h)[:, 0]
            kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                      generator=generator)
            scale = sampling.cfg_at(i, N)
            if use_cfg:
                c, u = logits.chunk(2)
                guided = cfg_logits(c, u, scale)
            else:
                c, u, guided = logits, None, logits
            if branches > 1 and j == n - 1:
                return self._branch_last(prefix, new, logps, guided, sampling, generator, branches)
            tok = self.head.sample(c, uncond=u, cfg=scale, **kw) if use_cfg else self.head.sample(logits, **kw)
            new.append(tok)
            if self.spec.kind == "binary":  # independent bits: sum of per-bit log-probabilities
                z = guided.float() / (sampling.temperature or 1.0)
                logps.append(torch.nn.functional.logsigmoid(torch.where(tok.bool(), z, -z)).sum(-1))
            else:
                if sampling.temperature > 0:
                    probs = categorical_probs(guided, temperature=sampling.temperature, top_k=sampling.top_k,
                                              top_p=sampling.top_p)
                    lp = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1).log()
                else:
                    lp = guided.float().log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
                logps.append(lp)
        return torch.cat((prefix, torch.stack(new, 1)), 1), torch.stack(logps, 1)

    @staticmethod
    def _branch_last(prefix, new, logps, guided, sampling, generator, C):
        """The last new token drawn ``C`` times without replacement (greedy: the top C) from
        the guided distribution; every row becomes C rows."""
        from generators.sampling import categorical_probs

        if sampling.temperature > 0:
            probs = categorical_probs(guided, temperature=sampling.temperature, top_k=sampling.top_k,
                                      top_p=sampling.top_p)
            if int((probs > 0).sum(-1).min()) < C:
                raise ValueError(f"extend: cannot draw {C} distinct last tokens: the filtered distribution "
                                 f"keeps fewer ids (top_k={sampling.top_k}, top_p={sampling.top_p})")
            last = torch.multinomial(probs, C, replacement=False, generator=generator)
            lp = probs.gather(-1, last).log()
        else:
            last = guided.float().topk(C, -1).indices
            lp = guided.float().log_softmax(-1).gather(-1, last)
        rep = (lambda t: t.repeat_interleave(C, 0))  # noqa: E731
        head = torch.cat((prefix, torch.stack(new, 1)), 1) if new else prefix
        head_lp = torch.stack(logps, 1) if logps else lp.new_zeros(prefix.shape[0], 0)
        ids = torch.cat((rep(head), last.reshape(-1, 1)), 1)
        return ids, torch.cat((rep(head_lp), lp.reshape(-1, 1)), 1)


# ---- registry -----------------------------------------------------------------------------

# Tiny (Shapes) size is set by CPU training cost: a forward+backward step on batch 128 x
# (17 prefix + 63 token) slots costs ~88 GFLOP at dim 128 / depth 6 (about 1 s on 2 CPU
# cores); dim=192 (3.5M params) costs ~178 GFLOP, dim=256 (7M) ~329 GFLOP.
TINY = dict(spec=TokenSpec("discrete", "grid", (8, 8), vocab_size=1024), num_classes=30,
            text_vocab_size=64, text_len=16, dim=128, depth=6, heads=4, ffn_multiple=64,
            dropout=0.0, token_dropout=0.0, class_dropout=0.1, text_depth=1)

_VQ16 = TokenSpec("discrete", "grid", (16, 16), vocab_size=16384)  # LlamaGen VQ-16 at 256px
_PAPER_BASE = dict(spec=_VQ16, num_classes=1000, ffn_multiple=256, dropout=0.1, token_dropout=0.1,
                   class_dropout=0.1)


# One tag per Shapes tokenizer it was trained on ("shapes" = vq-tiny); each checkpoint carries
# its tokenizer's spec, so e.g. raster-ar-tiny:shapes-seed pairs with tokenizer/seed-tiny:shapes.
# "shapes-flextok" is the ordered AR of SoTo: the same raster AR over flextok-tiny's 1D ordered
# sequence (32 tokens, coarse-to-fine), trained on 1-4-object scenes with GenEval-style captions;
# "shapes-multi" is its grid baseline: vq-tiny tokens of the same kind of scenes. "shapes-comit" /
# "shapes-layton": over the 16 / 32 ids of the (undertrained) COMiT / Layton tokenizers.
@register("generator/raster-ar-tiny", paper=PAPER, weights={
    "shapes": "weights/generator-raster-ar-tiny",
    "shapes-seed": "weights/generator-raster-ar-tiny-seed",
    "shapes-slot": "weights/generator-raster-ar-tiny-slot",
    "shapes-tokenflow": "weights/generator-raster-ar-tiny-tokenflow",
    "shapes-uniwetok": "weights/generator-raster-ar-tiny-uniwetok",
    "shapes-flextok": "weights/generator-raster-ar-tiny-flextok",
    "shapes-multi": "weights/generator-raster-ar-tiny-multi",
    "shapes-comit": "weights/generator-raster-ar-tiny-comit",
    "shapes-layton": "weights/generator-raster-ar-tiny-layton"},
          description="LlamaGen-style raster AR, tiny (8x8 Shapes tokens, class + caption prefix)")
def raster_ar_tiny(**overrides):
    """LlamaGen-style raster AR, tiny (8x8 Shapes tokens, class + caption prefix)."""
    return RasterAR(**{**TINY, **overrides})


@register("generator/raster-ar-b", paper=PAPER, paper_params=111e6)
def raster_ar_b(**overrides):
    """LlamaGen GPT-B: 12 layers x 768, 12 heads, class-conditional on VQ-16 16x16."""
    return RasterAR(**{**_PAPER_BASE, "dim": 768, "depth": 12, "heads": 12, **overrides})


@register("generator/raster-ar-l", paper=PAPER, paper_params=343e6)
def raster_ar_l(**overrides):
    """LlamaGen GPT-L: 24 layers x 1024, 16 heads, class-conditional on VQ-16 16x16."""
    return RasterAR(**{**_PAPER_BASE, "dim": 1024, "depth": 24, "heads": 16, **overrides})


@register("generator/raster-ar-xl", paper=PAPER, paper_params=775e6)
def raster_ar_xl(**overrides):
    """LlamaGen GPT-XL: 36 layers x 1280, 20 heads, class-conditional on VQ-16 16x16."""
    return RasterAR(**{**_PAPER_BASE, "dim": 1280, "depth": 36, "heads": 20, **overrides})


__all__ = ["RasterAR"]
