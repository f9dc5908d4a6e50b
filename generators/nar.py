"""Neighboring Autoregressive modeling: NAR (He et al. 2025, arXiv 2503.10696, §3).

Generation is outpainting from the top-left token: tokens are produced in increasing
Manhattan distance ``d = i + j`` from (0, 0), a whole anti-diagonal per forward step, so an
``h x w`` grid takes ``h + w - 1`` forward passes (1 prefill + ``h + w - 2`` cached decodes;
31 instead of 256 for 16x16). Three pieces (§3.2-3.3):

* **Dimension-oriented heads.** The "right" head (the trunk's norm + output layer) predicts
  ``(i, j+1)`` from the output at ``(i, j)``; the "below" head sits behind ``extra_blocks``
  (= 1, the code's ``medusa_attention_num``) more transformer blocks on the trunk's
  residual stream and predicts ``(i+1, j)``. Per target: (0,0) = mean of both heads at the
  condition (last prefix) position; first row = right head of the left neighbour; first
  column = below head of the upper neighbour; interior = mean of the two *logits*
  (``(R + B) / 2`` before the softmax, as the reference code's training and sampling do).
* **Proximity-aware causal mask.** Token ``p`` attends to token ``q`` iff
  ``d(q) <= d(p)`` (its own diagonal included); every token sees the condition prefix,
  which stays causal among itself. Predictions made on diagonal ``d`` only target
  diagonal ``d + 1``, so seeing one's own diagonal leaks nothing.
* **Diagonal decoding.** The tokens of diagonal ``t - 1`` are fed together (rows in
  ascending order) into a static KV cache at their raster slots, with RoPE positions
  ``(i, j)``; the step emits diagonal ``t``. Classifier-free guidance ``u + s (c - u)`` on a
  doubled batch, ``s = sampling.cfg_at(t, h + w - 1)``; ``sampling.extra["cfg_interval"]``
  (as the reference's ``cfg_interval``) turns guidance off once more than that many tokens
  have been generated.

The trunk, condition prefix, embeddings, slot layout (prefix + raster tokens ``0 .. N-2``;
the last token is never an input) and 2D RoPE are LlamaGen's, shared with
:class:`generators.raster_ar.RasterAR`, which this class extends. Grid specs only
(discrete or binary tokens); sequences, pyramids and continuous tokens raise
:class:`~zoo.tokens.IncompatibleTokens`.

Deviations from the reference code: by default prefix tokens are unrotated instead of
zero-rotated (see ``generators.transformer``; ``prefix_rope="zero"``, which the NAR converter
``arzoo convert --from nar`` sets, restores the reference's zero rotation in the trunk and the
below block); caption conditioning uses the zoo's word text encoder.
"""
from __future__ import annotations

import torch
from torch import nn

from generators.base import Condition, SamplingConfig
from generators.heads import make_head
from generators.raster_ar import _PAPER_BASE, RasterAR
from generators.raster_ar import TINY as RASTER_TINY
from generators.transformer import RMSNorm, Transformer
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

PAPER = "NAR, He et al. 2025 (arXiv 2503.10696), §3"


# ---- order, mask and head mixing (pure functions of the grid) ------------------------------

def diagonals(h: int, w: int) -> list[list[tuple[int, int]]]:
    """The ``h + w - 1`` anti-diagonals of an ``h x w`` grid: entry ``t`` lists the cells
    ``(i, j)`` with ``i + j = t``, rows ascending (the order a decode step feeds them)."""
    return [[(i, t - i) for i in range(max(0, t - w + 1), min(t, h - 1) + 1)] for t in range(h + w - 1)]


def proximity_mask(h: int, w: int, prefix_len: int, num_tokens: int | None = None,
                   device=None) -> torch.Tensor:
    """NAR's proximity-aware causal mask (§3.3) over ``[prefix] + raster tokens``.

    Returns a boolean ``(P + n, P + n)`` mask (True = attend), ``n = num_tokens`` (default
    ``h * w``; the model feeds ``h * w - 1``): prefix rows are causal over the prefix; a
    token row ``p`` sees the whole prefix and every token ``q`` with ``i_q + j_q <= i_p + j_p``.
    """
    n = h * w if num_tokens is None else num_tokens
    if not 0 <= n <= h * w:
        raise ValueError(f"num_tokens must lie in [0, {h * w}] for a {h}x{w} grid, got {n}")
    P = prefix_len
    r = torch.arange(n, device=device)
    d = r // w + r % w
    mask = torch.zeros(P + n, P + n, dtype=torch.bool, device=device)
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask[P:, :P] = True
    mask[P:, P:] = d[None, :] <= d[:, None]
    return mask


def mixing_plan(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which outputs give each target's logits in a full forward (§3.2, mixed logits).

    Output rows are ``k = 0`` for the condition (last prefix) position and ``k = 1 + r`` for
    the token of raster index ``r``. Returns ``(right, below)``, each ``(h*w,)`` int64 in
    raster order of the targets: the output row whose right / below head contributes, or
    ``-1`` when that head does not (first column / first row). (0,0) takes both at row 0.
    """
    r = torch.arange(h * w, device=device)
    i, j = r // w, r % w
    right = torch.where(j > 0, 1 + r - 1, -1)
    below = torch.where(i > 0, 1 + r - w, -1)
    right[0] = below[0] = 0
    return right, below


def mix_logits(right_logits: torch.Tensor, below_logits: torch.Tensor, right_idx: torch.Tensor,
               below_idx: torch.Tensor) -> torch.Tensor:
    """Assemble target logits ``(B, T, ·)`` from per-output head logits ``(B, K, ·)``.

    Target ``t`` gets ``R[right_idx[t]]`` and/or ``B[below_idx[t]]`` (``-1`` = absent), their
    mean when both are present. Weights 0.5/1/0 make this bit-identical to ``(R + B) / 2``.
    """
    has_r, has_b = right_idx >= 0, below_idx >= 0  # (each target has at least one)
    both = (has_r & has_b).to(right_logits.dtype)
    wr = (has_r.to(right_logits.dtype) - 0.5 * both).view(1, -1, *([1] * (right_logits.dim() - 2)))
    wb = (has_b.to(right_logits.dtype) - 0.5 * both).view(1, -1, *([1] * (right_logits.dim() - 2)))
    r = right_logits[:, right_idx.clamp(min=0)]
    b = below_logits[:, below_idx.clamp(min=0)]
    return r * wr + b * wb


class NAR(RasterAR):
    """NAR next-neighbor generator over a grid of discrete or binary tokens.

    Args: those of :class:`~generators.raster_ar.RasterAR` (the LlamaGen trunk, its class /
    caption prefix, dropouts and ``prefix_rope``, which applies to the below block too), plus
    ``extra_blocks``: transformer blocks between the trunk and the below head (NAR: 1).

    Modules: ``transformer`` (the trunk, the counted forward step; its final norm is moved
    to ``norm_right`` so the extra block reads the raw residual stream, as in the reference),
    ``norm_right`` + ``head`` (right head, zero-initialised as LlamaGen's output layer),
    ``below`` (the extra block(s) with their own final norm) + ``head_below``.
    """

    extra_keys = ("cfg_interval",)

    def __init__(self, spec: TokenSpec, num_classes: int | None = None, text_vocab_size: int | None = None,
                 text_len: int = 16, dim: int = 256, depth: int = 6, heads: int = 4, ffn_multiple: int = 256,
                 dropout: float = 0.0, token_dropout: float = 0.0, class_dropout: float = 0.1,
                 text_depth: int = 2, extra_blocks: int = 1, prefix_rope: str = "none"):
        if isinstance(spec, dict):
            spec = TokenSpec.from_dict(spec)
        if not isinstance(spec, TokenSpec):
            raise TypeError(f"NAR needs a TokenSpec, got {type(spec).__name__}")
        who = "NAR (next-neighbor prediction over a 2D grid)"
        spec.require(kind=("discrete", "binary"), layout="grid", who=who)
        if extra_blocks < 1:
            raise ValueError(f"NAR needs at least one extra block for the below head, got extra_blocks={extra_blocks}")
        super().__init__(spec, num_classes, text_vocab_size, text_len, dim, depth, heads, ffn_multiple,
                         dropout, token_dropout, class_dropout, text_depth, prefix_rope)
        # The right head reads the normed trunk output; the extra block(s) read the residual
        # stream before that norm (reference: `norm` after layer n_layer-1, medusa layers on).
        self.transformer.norm = nn.Identity()
        self.norm_right = RMSNorm(dim)
        self.below = Transformer(dim, extra_blocks, heads, ffn_multiple, rope="2d", dropout=dropout,
                                 prefix_rope=prefix_rope)
        self.head_below = make_head(spec, dim, zero_init=False)
        nn.init.normal_(self.head_below.proj.weight, std=0.02)  # reference: only `output` is zeroed

    # ---- layout ----------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.spec.shape)

    @property
    def num_steps(self) -> int:
        """Forward passes of one sampling run: ``h + w - 1``."""
        h, w = self.grid_shape
        return h + w - 1

    def attention_mask(self, device=None) -> torch.Tensor:
        """The proximity mask over this model's ``seq_len`` slots (see :func:`proximity_mask`)."""
        h, w = self.grid_shape
        return proximity_mask(h, w, self.prefix_len, self.num_tokens - 1, device)

    def _heads(self, h: torch.Tensor, hb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.norm_right(h)), self.head_below(hb)

    # ---- training ---------------------------------------------------------------------
    def _logits_seq(self, seq: torch.Tensor, cond: Condition | None) -> torch.Tensor:
        """One teacher-forced forward with the proximity mask -> mixed logits ``(B, N, ·)``."""
        B = seq.shape[0]
        dev = self.head.proj.weight.device
        seq = seq.to(dev)
        prefix = self.cond_encoder(cond.to(dev) if cond is not None else None, batch=self._batch(cond, B))
        if prefix.shape[0] != B:
            raise ValueError(f"condition batch {prefix.shape[0]} does not match token batch {B}")
        x = torch.cat((prefix, self.embed(seq[:, :-1])), 1)
        pos, mask = self.positions(dev), self.attention_mask(dev)
        h = self.transformer(self.tok_dropout(x), pos, mask=mask)
        hb = self.below(h, pos, mask=mask)
        P = self.prefix_len
        right, below = self._heads(h[:, P - 1:], hb[:, P - 1:])
        return mix_logits(right, below, *mixing_plan(*self.grid_shape, device=dev))

    # ---- sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: Condition | None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tokens:
        """Sample ``Tokens`` of ``self.spec`` one anti-diagonal per forward (``h + w - 1``).

        CFG (``sampling.cfg != 1`` and a conditional model) doubles the batch with the null
        prefix; step ``t`` (emitting diagonal ``t``) uses ``sampling.cfg_at(t, h + w - 1)``,
        or no guidance once more than ``sampling.extra["cfg_interval"]`` tokens exist
        (when set and >= 0). Runs in eval mode.
        """
        return self._cached_decode(cond, self.sampling_config(sampling), generator)[0]

    def _cached_decode(self, cond, sampling: SamplingConfig, generator, teacher=None, batch=None):
        was_training = self.training
        self.eval()
        try:
            return self._cached_decode_eval(cond, sampling, generator, teacher, batch)
        finally:
            self.transformer.clear_cache()
            self.below.clear_cache()
            self.train(was_training)

    def _forward_cached(self, x, pos, slots, mask, last_only=False):
        h = self.transformer(x, pos, mask=mask, input_pos=slots)
        hb = self.below(h, pos, mask=mask, input_pos=slots)  # all slots: fills its cache
        if last_only:
            h, hb = h[:, -1:], hb[:, -1:]
        return self._heads(h, hb)

    def _decode_plan(self, device):
        """Per step ``t``: (raster indices fed = diagonal t-1 or None, right / below source
        rows among the fed tokens (-1 = none), raster indices emitted = diagonal t)."""
        h, w = self.grid_shape
        diags, plan = diagonals(h, w), []
        for t, targets in enumerate(diags):
            if t == 0:  # the prefill's last (condition) row feeds both heads of (0,0)
                fed, r_src, b_src = None, [0], [0]
            else:
                i0 = diags[t - 1][0][0]  # fed token k sits on row i0 + k
                fed = [i * w + j for i, j in diags[t - 1]]
                r_src = [i - i0 if j > 0 else -1 for i, j in targets]
                b_src = [i - 1 - i0 if i > 0 else -1 for i, j in targets]
            plan.append(tuple(None if v is None else torch.tensor(v, device=device)
                              for v in (fed, r_src, b_src, [i * w + j for i, j in targets])))
        return plan

    def _cached_decode_eval(self, cond, sampling, generator, teacher, batch):
        dev = self.head.proj.weight.device
        B = self._batch(cond, batch)
        cond = cond.to(dev) if cond is not None else None
        N, P = self.num_tokens, self.prefix_len
        prefix = self.cond_encoder(cond, batch=B)
        use_cfg = teacher is None and self.cond_encoder.conditional and sampling.cfg != 1.0
        if use_cfg:
            prefix = torch.cat((prefix, self.cond_encoder.null_condition(B).to(prefix.dtype)))
        interval = sampling.extra.get("cfg_interval")
        pos, mask = self.positions(dev), self.attention_mask(dev)
        for net in (self.transformer, self.below):
            net.setup_cache(prefix.shape[0], self.seq_len)
        if teacher is None:
            dtype = torch.long if self.spec.kind == "discrete" else torch.uint8
            seq = torch.zeros((B, N, *self.spec.per_token), dtype=dtype, device=dev)
        else:
            seq, full = teacher.to(dev), None
        kw = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "generator": generator}
        plan, done = self._decode_plan(dev), 0
        for t, (fed, r_src, b_src, dst) in enumerate(plan):
            if fed is None:  # prefill: fills the caches with the prefix
                right, below = self._forward_cached(prefix, pos[:P], torch.arange(P, device=dev), mask,
                                                    last_only=True)
            else:            # feed diagonal t-1 at its raster slots and RoPE (i, j)
                x = self.embed(seq[:, fed])
                if use_cfg:
                    x = torch.cat((x, x))
                right, below = self._forward_cached(x, pos[P + fed], P + fed, mask)
            logits = mix_logits(right, below, r_src, b_src)
            if teacher is not None:
                if full is None:
                    full = logits.new_empty((B, N, *logits.shape[2:]))
                full[:, dst] = logits
                continue
            if not use_cfg:
                toks = self.head.sample(logits, **kw)
            elif interval is not None and 0 <= interval < done:  # guidance off (cfg_interval)
                toks = self.head.sample(logits[:B], **kw)
            else:
                c, u = logits.chunk(2)
                toks = self.head.sample(c, uncond=u, cfg=sampling.cfg_at(t, len(plan)), **kw)
            seq[:, dst] = toks.to(seq.dtype)
            done += dst.numel()
        if teacher is not None:
            return None, full
        return Tokens.from_sequence(seq, self.spec), None


# ---- registry -----------------------------------------------------------------------------

# Same trunk, conditioning (30 classes + 16-word captions, word vocab 64) and token grid as
# raster-ar-tiny, so the same extracted token shards train both; + 1 block for the below head.
TINY = {**RASTER_TINY, "extra_blocks": 1}


@register("generator/nar-tiny", paper=PAPER, weights={"shapes": "weights/generator-nar-tiny"},
          description="NAR next-neighbor AR, tiny (8x8 Shapes tokens, class + caption prefix)")
def nar_tiny(**overrides):
    """NAR next-neighbor AR, tiny (8x8 Shapes tokens, class + caption prefix; raster-ar-tiny + 1 block)."""
    return NAR(**{**TINY, **overrides})


# Parameter counts: LlamaGen GPT-B/L/XL + one block + one vocab head. 816M for XL is in the
# reference README (NAR-XL t2i); 130M / 372M are the paper's ImageNet table values as
# recalled, and equal LlamaGen's 111M / 343M plus one block and one 16384-way head.
@register("generator/nar-b", paper=PAPER, paper_params=130e6)
def nar_b(**overrides):
    """NAR-B: LlamaGen GPT-B (12 x 768, 12 heads) + 1 block, class-conditional on VQ-16 16x16."""
    return NAR(**{**_PAPER_BASE, "dim": 768, "depth": 12, "heads": 12, "extra_blocks": 1, **overrides})


@register("generator/nar-l", paper=PAPER, paper_params=372e6)
def nar_l(**overrides):
    """NAR-L: LlamaGen GPT-L (24 x 1024, 16 heads) + 1 block, class-conditional on VQ-16 16x16."""
    return NAR(**{**_PAPER_BASE, "dim": 1024, "depth": 24, "heads": 16, "extra_blocks": 1, **overrides})


@register("generator/nar-xl", paper=PAPER, paper_params=816e6)
def nar_xl(**overrides):
    """NAR-XL: LlamaGen GPT-XL (36 x 1280, 20 heads) + 1 block, class-conditional on VQ-16 16x16."""
    return NAR(**{**_PAPER_BASE, "dim": 1280, "depth": 36, "heads": 20, "extra_blocks": 1, **overrides})


__all__ = ["NAR", "diagonals", "mix_logits", "mixing_plan", "proximity_mask"]
