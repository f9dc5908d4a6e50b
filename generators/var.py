"""Next-scale prediction: VAR and MVAR (``generator/var-*``, ``generator/mvar-*``).

**VAR** -- Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction" (arXiv 2404.02905), §3.2 (next-scale prediction) and §4 (the
transformer), and the FoundationVision/VAR code (``models/var.py``, ``basic_var.py``).
Images are a pyramid of token maps ``r_1 .. r_S`` (sides ``p_1 < .. < p_S``, VAR's
multi-scale residual VQ); scale ``k`` is predicted in *one* forward pass from the class and
all coarser scales:

* a GPT-2-style transformer, depth ``d``, width ``64 d``, ``d`` heads, MLP ratio 4 with
  GELU(tanh), LayerNorm without affine weights, adaLN on the class embedding in every block
  (6 modulations: two gates, two scales, two shifts) and an adaLN-before-head, attention
  with q/v biases and VAR's L2-normalised queries/keys with a learnable per-head scale;
* input of scale ``k > 1``: ``word_embed`` (Linear ``Cvae -> C``) of the accumulated
  feature map ``f̂_k = Σ_{j<k} bicubic_up(E[r_j])`` area-downsampled to ``p_k``; scale 1
  is the SOS token map = class embedding + ``pos_start``; every token adds a learned
  absolute position embedding and a level (scale) embedding;
* **block-causal** attention: a token of scale ``k`` sees every token of scales ``<= k``.
  Training is one forward over all ``L = Σ p_k²`` tokens; sampling keeps a KV cache across
  scales and runs one forward per scale;
* CFG (VAR): ``t_k = cfg·k/(S−1)``, logits ``(1+t)c − t·u``, i.e. the zoo's
  ``u + s(c − u)`` with ``s = 1 + t`` -- :class:`SamplingConfig` with
  ``cfg_schedule="linear"`` and ``cfg = 1 + cfg_VAR`` (VAR's FID recipe cfg 1.5, top-k 900,
  top-p 0.96 is :data:`VAR_FID_SAMPLING`).

**MVAR** -- Zhang, Long, Han, You & Gu 2025, "MVAR: Visual Autoregressive Modeling with
Scale and Spatial Markovian Conditioning" (arXiv 2505.12742, ICLR 2026), its scale- and
spatial-Markov conditioning, and CVL-UESTC/MVAR (``models/mvar.py``, ``basic_mvar.py``,
``trainer.py``); same weights layout as VAR (``mode="mvar"``):

* **scale-Markov**: a token attends only to tokens of its own scale; the previous scales
  reach it only through its input (the accumulated ``f̂`` map above, the Markov state). No
  K/V are kept across scales when sampling (step ``k`` processes exactly ``p_k²`` tokens),
  and training can split the scales into chunks (``train_chunks``);
* **spatial-Markov**: on the last ``markov_scales`` scales (paper: 2, i.e. 13² and 16²) each
  query attends only to a ``k x k`` neighbourhood (``markov_kernel``, paper 7) of its scale,
  the window shifted at the borders as NATTEN's ``na2d`` does, so every query has exactly
  ``k²`` keys. No NATTEN: :mod:`generators.mvar_attention` (gather-based, ``O(N k²)``
  memory, hand-written backward) or, with ``na_impl="mask"``, a dense SDPA mask.

Where MVAR's memory saving comes from here
    *Sampling*: VAR mode holds a static KV cache of ``2 · depth · B · L · C`` values (CFG
    doubles ``B``) and its last step attends ``p_S²`` queries to all ``L`` keys; MVAR mode
    keeps no cache and attends ``p_S²`` queries to ``k²`` keys. *Training*: VAR mode
    attends through a dense ``L x L`` block-causal mask (``L²`` weights per head and layer
    saved for backward); MVAR mode attends per scale (``Σ_{small} p_k⁴ + Σ_{spatial} p_k²
    k²``) and, with ``train_chunks`` (as MVAR's trainer: scales ``0..S−3`` together, then
    each spatial scale alone), computes each chunk's loss under activation checkpointing,
    so only one chunk's activations (and logits) are alive at a time -- MVAR does separate
    forward/backward passes per chunk; here ``loss`` is one call, so the chunks are
    recomputed in backward instead (same gradients, one extra forward of compute).

The next-scale input (``fhat=``)
    ``"tokenizer"`` (every registered config; VAR/MVAR): ``f̂`` is built exactly as the
    tokenizer builds it, ``f̂ += φ_k(bicubic_up(C[r_k]))`` with the tokenizer's **frozen**
    codebook ``C`` and ``φ`` convs (VAR's ``vae_quant_proxy``). The generator keeps a frozen
    copy (:class:`~tokenizers_vis.quantizers.multiscale.MultiScaleVQ`, same class as the
    tokenizer's), filled by :meth:`NextScaleAR.attach_tokenizer` -- ``train.generator`` calls
    it with the tokenizer recorded in the token shards -- and saved in the checkpoint, so
    sampling needs no tokenizer. ``"learned"`` (the option older arzoo checkpoints use): the
    generator's own trainable ``E`` without ``φ``.
    Head: VAR's ``Linear(C, V)`` **with bias**, weights ``trunc_normal(std)·0.02`` (``head_bias``,
    ``init_head``); ``head_bias=False, init_head=None`` is the zoo's zero-initialised bias-free head.

MVAR training chunks (``chunk_schedule``)
    ``"cycle"`` (MVAR configs): MVAR's trainer runs a separate forward/backward/clip/step for
    each chunk of each iteration, each chunk's loss the mean over its own tokens; here each
    ``loss()`` call in training mode takes the next chunk in turn (one optimizer step per
    chunk, so 3 steps = one reference iteration with the paper's chunks). ``"sum"``: all chunks
    in one step (sum of CE / L), chunk by chunk under activation checkpointing.

Deviations: non-square scales are accepted (windows are ``min(k, h) x min(k, w)``; the
``"tokenizer"`` input needs square scales as the tokenizer has).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from generators.base import Condition, Generator, SamplingConfig
from generators.conditioning import ClassEmbedder
from generators.heads import make_head
from generators.mvar_attention import neighborhood_index, neighborhood_mask
from generators.var_blocks import AdaLNBeforeHead, AttnPlan, DropPath, VARAttention, VARBlock, VARTrunk  # noqa: F401
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

PAPER_VAR = "VAR, Tian et al. 2024 (arXiv 2404.02905), §3.2 + §4"
PAPER_MVAR = "MVAR, Zhang et al. 2025 (arXiv 2505.12742, ICLR 2026): scale- and spatial-Markov attention"
MODES = ("var", "mvar")

#: VAR's FID sampling recipe (cfg 1.5 ramped over the scales, top-k 900, top-p 0.96), in the
#: zoo's CFG convention (s = 1 + t).
VAR_FID_SAMPLING = SamplingConfig(cfg=2.5, cfg_schedule="linear", top_k=900, top_p=0.96)


# ---- the generator -------------------------------------------------------------------------------

class NextScaleAR(Generator):
    """VAR (``mode="var"``) or MVAR (``mode="mvar"``) next-scale prediction over pyramid tokens.

    Args:
        spec: a discrete ``pyramid`` :class:`TokenSpec` (the multi-scale tokenizer's); every
            scale must fit inside the last one.
        num_classes: class conditioning (null class = ``num_classes``; ``None``/0 =
            unconditional, one learned null embedding).
        depth, dim, heads, mlp_ratio: trunk size; ``dim`` defaults to ``64 * depth`` and
            ``heads`` to ``depth`` (VAR's depth-driven sizing).
        cvae: channels of the code embedding ``E`` that builds ``f̂`` (VAR: Cvae = 32).
        mode: ``"var"`` (block-causal, KV cache) or ``"mvar"`` (scale- and spatial-Markov).
        markov_kernel, markov_scales: MVAR's neighbourhood size (odd) and how many of the last
            scales use it (default 2 in MVAR mode; must be 0 in VAR mode).
        class_dropout: CFG training (labels -> null with this probability).
        drop, drop_path: dropout on attention/FFN outputs; max stochastic depth.
        norm_eps, attn_l2_norm: as VAR (1e-6, True).
        init_adaln, init_adaln_gamma: VAR's init: adaLN scale/shift weights x0.5, gate weights
            x``init_adaln_gamma`` (1e-3 for d16/d20, 1e-4 d24, 1e-5 d30) -- near adaLN-zero.
        train_chunks: MVAR only: consecutive scale groups (e.g. ``[[0..7], [8], [9]]``) whose
            losses are computed one at a time (see module doc); ``"mvar"`` is MVAR's trainer rule
            for any number of scales S: ``[[0..S−3], [S−2], [S−1]]``.
        chunk_schedule: ``"sum"`` or ``"cycle"`` (MVAR's one step per chunk; module doc).
        na_impl: ``"gather"`` (O(N k²) memory kernel) or ``"mask"`` (dense SDPA mask).
        fhat: ``"tokenizer"`` (frozen codebook + φ of the tokenizer) or ``"learned"``.
        phi, phi_kernel, codebook_l2_norm: the tokenizer's quantizer options (``fhat="tokenizer"``;
            checked by :meth:`attach_tokenizer`).
        head_bias, init_head: VAR's head (bias, weights x0.02) or the zoo's (False, None).
    """

    trunk = "transformer"

    def __init__(self, spec: TokenSpec, num_classes: int | None = 1000, depth: int = 16, dim: int | None = None,
                 heads: int | None = None, mlp_ratio: float = 4.0, cvae: int = 32, mode: str = "var",
                 markov_kernel: int = 7, markov_scales: int | None = None, class_dropout: float = 0.1,
                 drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, attn_l2_norm: bool = True,
                 init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, train_chunks: list | None = None,
                 na_impl: str = "gather", chunk_schedule: str = "sum", fhat: str = "learned",
                 phi: str = "shared4", phi_kernel: int = 3, codebook_l2_norm: bool = False,
                 head_bias: bool = False, init_head: float | None = None):
        super().__init__()
        if isinstance(spec, dict):
            spec = TokenSpec.from_dict(spec)
        if not isinstance(spec, TokenSpec):
            raise TypeError(f"NextScaleAR needs a TokenSpec, got {type(spec).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        who = "VAR (next-scale prediction)" if mode == "var" else "MVAR (Markovian next-scale prediction)"
        spec.require(kind="discrete", layout="pyramid", who=who)
        self.spec, self.mode = spec, mode
        self.scales = tuple(tuple(s) for s in spec.shape)
        self.num_scales = len(self.scales)
        self.offsets = spec.scale_offsets
        self.L = spec.num_tokens
        self.first_l = self.scales[0][0] * self.scales[0][1]
        H, W = self.final = self.scales[-1]
        bad = [s for s in self.scales if s[0] > H or s[1] > W]
        if bad:
            raise ValueError(f"every scale must fit in the last one {H}x{W} (f̂ lives there), got {bad}")

        dim = int(dim or 64 * depth)
        heads = int(heads or depth)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.cvae = dim, int(cvae)
        self.num_classes = int(num_classes or 0)

        # MVAR's Markov structure
        if markov_scales is None:
            markov_scales = 2 if mode == "mvar" else 0
        if mode == "var" and markov_scales:
            raise ValueError(f"markov_scales={markov_scales} needs mode='mvar' (VAR attends block-causally)")
        if not 0 <= markov_scales <= self.num_scales:
            raise ValueError(f"markov_scales must be in [0, {self.num_scales}], got {markov_scales}")
        if markov_kernel < 1 or markov_kernel % 2 == 0:
            raise ValueError(f"markov_kernel must be a positive odd int, got {markov_kernel}")
        self.kernel = int(markov_kernel)
        self.spatial = frozenset(range(self.num_scales - markov_scales, self.num_scales))
        if na_impl not in ("gather", "mask"):
            raise ValueError(f"na_impl must be 'gather' or 'mask', got {na_impl!r}")
        self.na_impl = na_impl
        self.chunks = self._check_chunks(train_chunks)
        if chunk_schedule not in ("sum", "cycle"):
            raise ValueError(f"chunk_schedule must be 'sum' or 'cycle', got {chunk_schedule!r}")
        self.chunk_schedule, self._next_chunk, self._warned_unattached = chunk_schedule, 0, False
        if fhat not in ("tokenizer", "learned"):
            raise ValueError(f"fhat must be 'tokenizer' or 'learned', got {fhat!r}")
        self.fhat = fhat

        # embeddings (names after VAR)
        V = spec.vocab_size
        if fhat == "learned":
            self.code_embed = nn.Embedding(V, self.cvae)   # the generator's own E (see module doc)
        else:
            if any(h != w for h, w in self.scales):
                raise ValueError(f"fhat='tokenizer' needs square scales (the multi-scale VQ's), got {self.scales}")
            from tokenizers_vis.quantizers.multiscale import MultiScaleVQ
            self.vq_proxy = MultiScaleVQ(V, self.cvae, scales=[h for h, _ in self.scales], phi=phi,
                                         phi_kernel=phi_kernel, l2_norm=codebook_l2_norm)
            self.vq_proxy.requires_grad_(False)
            # set by attach_tokenizer; saved, so a checkpoint knows its f̂ is the tokenizer's
            self.register_buffer("tokenizer_attached", torch.zeros((), dtype=torch.bool))
        self.word_embed = nn.Linear(self.cvae, dim)
        self.class_emb = ClassEmbedder(self.num_classes, dim, class_dropout)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, dim))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, dim))
        self.lvl_embed = nn.Embedding(self.num_scales, dim)
        self.transformer = VARTrunk(dim, depth, heads, mlp_ratio, norm_eps, attn_l2_norm, drop, drop_path)
        self.head_nm = AdaLNBeforeHead(dim, dim, norm_eps)
        self.head = make_head(spec, dim, bias=head_bias)
        self._init_weights(init_adaln, init_adaln_gamma, init_head)
        self._index_cache: dict = {}

    def _check_chunks(self, chunks):
        if chunks is None:
            return None
        if chunks == "mvar":  # MVAR's trainer: all but the last two scales together, then each alone
            S = self.num_scales
            chunks = [list(range(S - 2)), [S - 2], [S - 1]] if S > 2 else [[s] for s in range(S)]
        elif isinstance(chunks, str):
            raise ValueError(f"train_chunks: expected a list of scale groups or 'mvar', got {chunks!r}")
        if self.mode != "mvar":
            raise ValueError("train_chunks needs mode='mvar': VAR's block-causal scales share K/V and "
                             "cannot be trained in separate chunks")
        flat = [int(s) for c in chunks for s in c]
        if any(len(c) == 0 for c in chunks) or flat != list(range(self.num_scales)):
            raise ValueError(f"train_chunks must split the scales 0..{self.num_scales - 1} into consecutive "
                             f"non-empty groups in order, got {chunks}")
        return tuple(tuple(int(s) for s in c) for c in chunks)

    def _init_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float | None) -> None:
        """VAR's ``init_weights``: trunc-normal(std = sqrt(1/(3C))) linears and embeddings, zero
        biases, residual projections / sqrt(2·depth), adaLN weights scaled (gates nearly 0)."""
        std = math.sqrt(1 / self.dim / 3)
        frozen = set(self.vq_proxy.modules()) if self.fhat == "tokenizer" else set()
        for m in self.modules():
            if m in frozen:  # the tokenizer's copy: attach_tokenizer fills it
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        if self.fhat == "learned":
            nn.init.normal_(self.code_embed.weight, std=1.0)  # E plays the codebook: unit scale
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        with torch.no_grad():
            if init_head is None:
                nn.init.zeros_(self.head.proj.weight)  # zoo convention: uniform logits at init
            else:
                self.head.proj.weight.mul_(init_head)  # VAR: trunc_normal(std) * init_head
        C, depth = self.dim, self.transformer.depth
        with torch.no_grad():
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            for b in self.transformer.blocks:
                b.attn.proj.weight.div_(math.sqrt(2 * depth))
                b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                b.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                b.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)

    @torch.no_grad()
    def attach_tokenizer(self, tokenizer) -> None:
        """Copy the tokenizer's codebook and φ convs into the frozen ``f̂`` builder
        (``fhat="tokenizer"``); a tokenizer whose quantizer differs raises IncompatibleTokens
        naming both. No-op check for ``fhat="learned"`` (nothing to copy)."""
        from tokenizers_vis.quantizers.multiscale import MultiScaleVQ
        from zoo.tokens import IncompatibleTokens

        if self.fhat != "tokenizer":
            return
        who = f"{type(self).__name__}({self.mode}, fhat='tokenizer')"
        q = getattr(tokenizer, "quantizer", None)
        name = getattr(tokenizer, "registry_name", None) or type(tokenizer).__name__
        mine = self.vq_proxy
        if not isinstance(q, MultiScaleVQ):
            raise IncompatibleTokens(f"{who} builds f̂ from a multi-scale VQ tokenizer's codebook and φ; "
                                     f"{name} has no MultiScaleVQ quantizer")
        got = (q.codebook_size, q.dim, q.scales, q.phi_mode, q.vq.l2_norm)
        want = (mine.codebook_size, mine.dim, mine.scales, mine.phi_mode, mine.vq.l2_norm)
        if got != want:
            raise IncompatibleTokens(f"{who} expects (codebook, dim, scales, phi, l2_norm) = {want}; "
                                     f"{name}'s quantizer has {got}")
        state = {k: v.to(self.pos_1LC.dtype) if v.is_floating_point() else v for k, v in q.state_dict().items()}
        mine.load_state_dict(state, strict=True)
        self.tokenizer_attached.fill_(True)

    def _require_attached(self) -> None:
        if self.fhat == "tokenizer" and not bool(self.tokenizer_attached) and not self._warned_unattached:
            import warnings

            self._warned_unattached = True
            warnings.warn(f"{type(self).__name__}: training with fhat='tokenizer' but no tokenizer attached: f̂ is "
                          "built from a RANDOM codebook and φ -- call attach_tokenizer(tokenizer) first "
                          "(train.generator does it from the token shards' tokenizer)", stacklevel=3)

    @torch.no_grad()
    def load_codebook(self, weight: torch.Tensor) -> None:
        """Initialise the code embedding ``E`` from a tokenizer's ``(vocab, cvae)`` codebook
        (e.g. ``tokenizer.quantizer.vq.embedding.weight`` of ``tokenizer/msvq-*``)."""
        if self.fhat != "learned":
            raise ValueError("load_codebook is for fhat='learned'; use attach_tokenizer(tokenizer)")
        want = tuple(self.code_embed.weight.shape)
        if tuple(weight.shape) != want:
            raise ValueError(f"codebook must be (vocab_size, cvae) = {want}, got {tuple(weight.shape)}")
        self.code_embed.weight.copy_(weight)

    # ---- layout -------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def levels(self, device=None) -> torch.Tensor:
        """Scale index of each of the ``L`` tokens."""
        sizes = torch.tensor([h * w for h, w in self.scales], device=device)
        return torch.repeat_interleave(torch.arange(self.num_scales, device=device), sizes)

    def _lvl_pos(self, device) -> torch.Tensor:
        return self.lvl_embed(self.levels(device))[None] + self.pos_1LC

    def _na_index(self, s: int, device) -> torch.Tensor | None:
        if s not in self.spatial:
            return None
        key = (s, str(device))
        if key not in self._index_cache:
            h, w = self.scales[s]
            self._index_cache[key] = neighborhood_index(h, w, self.kernel, device)
        return self._index_cache[key]

    def attention_mask(self, device=None) -> torch.Tensor:
        """The scheme's ``(L, L)`` boolean attention mask (True = query row may attend key column).

        VAR: ``level(k) <= level(q)`` (block-causal). MVAR: ``level(k) == level(q)``
        (block-diagonal) intersected, on the spatial-Markov scales, with the
        ``markov_kernel``-neighbourhoods. This is what every forward computes (the MVAR path
        does it per scale, without materialising this matrix).
        """
        lv = self.levels(device)
        if self.mode == "var":
            return lv[None, :] <= lv[:, None]
        mask = lv[None, :] == lv[:, None]
        for s in self.spatial:
            a, b = self.offsets[s], self.offsets[s + 1]
            mask[a:b, a:b] = neighborhood_mask(*self.scales[s], self.kernel, device)
        return mask

    def _plan(self, scales, device, dense: bool = False) -> AttnPlan:
        """Plan for a forward over the tokens of consecutive ``scales`` (laid out in order)."""
        scales = list(scales)
        if scales != list(range(scales[0], scales[-1] + 1)):
            raise ValueError(f"scales of one forward must be consecutive, got {scales}")
        if self.mode == "var":
            if scales[0] != 0:
                raise ValueError("a VAR forward must start at scale 0 (block-causal attention)")
            n = self.offsets[scales[-1] + 1]
            return AttnPlan("mask", mask=self.attention_mask(device)[:n, :n])
        base = self.offsets[scales[0]]
        segs = tuple((self.offsets[s] - base, self.offsets[s + 1] - base, *self.scales[s],
                      self._na_index(s, device)) for s in scales)
        return AttnPlan("scales", segments=segs, dense=dense or self.na_impl == "mask")

    # ---- inputs ----------------------------------------------------------------------------
    def _accumulate(self, fhat: torch.Tensor, ids: torch.Tensor, s: int) -> torch.Tensor:
        """``f̂`` plus scale ``s``'s contribution at the last scale's size (VAR Algorithm 2):
        the tokenizer's ``φ_s(bicubic_up(C[ids]))``, or ``bicubic_up(E[ids])`` (``fhat="learned"``)."""
        if self.fhat == "tokenizer":
            return fhat + self.vq_proxy.scale_contribution(s, ids.long()).float()
        e = self.code_embed(ids.long()).permute(0, 3, 1, 2).float()
        if tuple(e.shape[-2:]) != self.final:
            e = F.interpolate(e, size=self.final, mode="bicubic")
        return fhat + e

    def _downsample(self, fhat: torch.Tensor, s: int) -> torch.Tensor:
        """``f̂`` area-downsampled to scale ``s``: ``(B, h_s * w_s, cvae)``."""
        size = self.scales[s]
        x = fhat if size == self.final else F.interpolate(fhat, size=size, mode="area")
        return x.flatten(2).transpose(1, 2)

    def _inputs(self, ids: list, cvec: torch.Tensor) -> torch.Tensor:
        """Teacher-forced trunk input ``(B, L, C)``: SOS map, then word_embed(f̂ down to each scale)."""
        B = ids[0].shape[0]
        fhat = cvec.new_zeros(B, self.cvae, *self.final, dtype=torch.float32)
        raw = []
        for s in range(self.num_scales - 1):
            fhat = self._accumulate(fhat, ids[s], s)
            raw.append(self._downsample(fhat, s + 1))
        x = self._sos(cvec)
        if raw:
            x = torch.cat((x, self.word_embed(torch.cat(raw, 1).to(x.dtype))), 1)
        return x + self._lvl_pos(x.device)

    def _sos(self, cvec: torch.Tensor) -> torch.Tensor:
        return cvec[:, None, :].expand(-1, self.first_l, -1) + self.pos_start

    def _labels(self, cond: Condition | None, batch: int, device) -> torch.Tensor:
        labels = None if cond is None else cond.labels
        if cond is not None and cond.text is not None:
            raise ValueError(f"{type(self).__name__} is class-conditional (VAR); it takes no text")
        if labels is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        if not self.conditional:
            raise ValueError("this generator was built without classes (num_classes=None) but got labels")
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != (batch,):
            raise ValueError(f"condition labels must be ({batch},), got shape {tuple(labels.shape)}")
        return labels

    def _device(self) -> torch.device:
        return self.pos_1LC.device

    def _ids(self, tokens: Tokens) -> list:
        dev = self._device()
        return [t.to(dev).long() for t in self.check_tokens(tokens).data]

    # ---- forward / training ---------------------------------------------------------------------
    def _run(self, x: torch.Tensor, cvec: torch.Tensor, scales, dense: bool = False) -> torch.Tensor:
        """Trunk + head over the tokens of ``scales``: logits ``(B, n, V)``."""
        h = self.transformer(x, cvec, self._plan(scales, x.device, dense))
        return self.head(self.head_nm(h, cvec))

    def logits(self, tokens: Tokens, cond: Condition | None, dense: bool = False) -> torch.Tensor:
        """One teacher-forced forward over all scales: logits ``(B, L, V)``. ``dense=True``
        runs MVAR through the dense :meth:`attention_mask` instead (the reference path)."""
        ids = self._ids(tokens)
        cvec = self.class_emb(self._labels(cond, ids[0].shape[0], self._device()))
        return self._run(self._inputs(ids, cvec), cvec, range(self.num_scales), dense)

    def loss(self, tokens: Tokens, cond: Condition | None) -> dict:
        """Cross-entropy over all ``L`` tokens (mean, VAR's 1/L weights) -> ``{"loss", "acc"}``."""
        if self.training:  # training on an unattached (random) f̂ builder is a mistake
            self._require_attached()
        ids = self._ids(tokens)
        B = ids[0].shape[0]
        tgt = torch.cat([t.flatten(1) for t in ids], 1)
        cvec = self.class_emb(self._labels(cond, B, self._device()))
        x = self._inputs(ids, cvec)
        if self.chunks is None or not torch.is_grad_enabled():
            return self.head.loss_from_logits(self._run(x, cvec, range(self.num_scales)), tgt)
        if self.chunk_schedule == "cycle" and self.training:
            chunk = self.chunks[self._next_chunk % len(self.chunks)]
            self._next_chunk += 1
            a, b = self.offsets[chunk[0]], self.offsets[chunk[-1] + 1]
            out = self.head.loss_from_logits(self._run(x[:, a:b], cvec, chunk), tgt[:, a:b])
            return {**out, "chunk": torch.tensor(float(chunk[0]))}
        total, correct = 0.0, 0
        for chunk in self.chunks:
            a, b = self.offsets[chunk[0]], self.offsets[chunk[-1] + 1]
            ls, cor = checkpoint(self._chunk_loss, x[:, a:b], cvec, tgt[:, a:b], chunk, use_reentrant=False)
            total, correct = total + ls, correct + cor
        return {"loss": total / tgt.numel(), "acc": correct.float() / tgt.numel()}

    def _chunk_loss(self, x, cvec, tgt, chunk):
        logits = self._run(x, cvec, chunk)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(-1) == tgt).sum()
        return loss, correct

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: Condition | None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tokens:
        """Sample a token pyramid, one forward per scale (VAR: through a KV cache; MVAR: each
        step sees only its own scale's ``p_k²`` tokens). CFG (``sampling.cfg != 1`` and
        labels given) doubles the batch with the null class; the scale at step ``k`` is
        ``sampling.cfg_at(k, S)`` (``cfg_schedule="linear"`` is VAR's ramp)."""
        return self._decode(cond, self.sampling_config(sampling), generator)[0]

    @torch.no_grad()
    def cached_logits(self, tokens: Tokens, cond: Condition | None) -> torch.Tensor:
        """The sampling path (KV cache in VAR mode, one scale per step) fed with ``tokens``,
        no CFG: logits ``(B, L, V)``; equals :meth:`logits` in eval mode."""
        return self._decode(cond, SamplingConfig(), None, teacher=self._ids(tokens))[1]

    def _decode(self, cond, sampling: SamplingConfig, generator, teacher=None):
        was_training = self.training
        self.eval()
        try:
            return self._decode_eval(cond, sampling, generator, teacher)
        finally:
            self.transformer.clear_cache()
            self.train(was_training)

    def _decode_eval(self, cond, sampling, generator, teacher):
        dev = self._device()
        if teacher is not None:
            B = teacher[0].shape[0]
        elif cond is None:
            raise ValueError("pass a Condition (Condition(batch=B) for unconditional sampling)")
        else:
            B = cond.batch_size
        labels = self._labels(cond, B, dev)
        use_cfg = (teacher is None and self.conditional and cond.labels is not None and sampling.cfg != 1.0)
        if use_cfg:
            labels = torch.cat((labels, torch.full_like(labels, -1)))
        cvec = self.class_emb(labels)
        lvl_pos = self._lvl_pos(dev)
        x = self._sos(cvec) + lvl_pos[:, :self.first_l]
        if self.mode == "var":
            self.transformer.setup_cache(cvec.shape[0], self.L, x.dtype, dev)
        fhat = torch.zeros(B, self.cvae, *self.final, device=dev)
        out, all_logits = [], []
        S, offs = self.num_scales, self.offsets
        kw = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "generator": generator}
        for s, (h, w) in enumerate(self.scales):
            if self.mode == "var":
                plan = AttnPlan("cache", slots=(offs[s], offs[s + 1]))
            else:  # only this scale's tokens, nothing kept from earlier steps
                plan = self._plan([s], dev)
            logits = self.head(self.head_nm(self.transformer(x, cvec, plan), cvec))
            if teacher is not None:
                all_logits.append(logits)
                ids = teacher[s]
            else:
                if use_cfg:
                    c, u = logits.chunk(2)
                    ids = self.head.sample(c, uncond=u, cfg=sampling.cfg_at(s, S), **kw)
                else:
                    ids = self.head.sample(logits, **kw)
                ids = ids.view(B, h, w)
            out.append(ids)
            if s + 1 < S:
                fhat = self._accumulate(fhat, ids, s)
                x = self.word_embed(self._downsample(fhat, s + 1).to(x.dtype))
                x = x + lvl_pos[:, offs[s + 1]:offs[s + 2]]
                if use_cfg:
                    x = torch.cat((x, x))
        tokens = Tokens(out, self.spec) if teacher is None else None
        return tokens, (torch.cat(all_logits, 1) if teacher is not None else None)


# ---- registry --------------------------------------------------------------------------------------

# msvq-tiny's tokens: scales 1,2,3,4,6,8 (130 tokens), V = 1024, codebook dim 16 (= cvae, so
# load_codebook can take its codebook). depth 6 x 128 (4 heads of 32): ~2.0M parameters.
TINY_SPEC = TokenSpec("discrete", "pyramid", [(p, p) for p in (1, 2, 3, 4, 6, 8)], vocab_size=1024)
TINY = {"spec": TINY_SPEC, "num_classes": 30, "depth": 6, "dim": 128, "heads": 4, "cvae": 16,
        "class_dropout": 0.1, "init_adaln_gamma": 1e-3, "fhat": "tokenizer", "head_bias": True, "init_head": 0.02}
# MVAR on the tiny pyramid: 3x3 neighbourhoods on the last two scales (6x6, 8x8); chunks as
# MVAR's trainer (all but the spatial scales together, then each spatial scale alone).
TINY_MVAR = {"mode": "mvar", "markov_kernel": 3, "markov_scales": 2, "train_chunks": "mvar",
             "chunk_schedule": "cycle"}

VAR_SPEC = TokenSpec("discrete", "pyramid", [(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)],
                     vocab_size=4096)  # VAR's VQVAE at 256 px: 680 tokens


def _paper(depth: int, gamma: float, **kw) -> dict:
    # VAR's build_vae_var: width 64d, d heads, drop_path 0.1·d/24, 1000 classes, Cvae 32
    return {"spec": VAR_SPEC, "num_classes": 1000, "depth": depth, "cvae": 32, "drop_path": 0.1 * depth / 24,
            "init_adaln_gamma": gamma, "fhat": "tokenizer", "head_bias": True, "init_head": 0.02, **kw}


_PAPER_MVAR = {"mode": "mvar", "markov_kernel": 7, "markov_scales": 2,
               "train_chunks": "mvar", "chunk_schedule": "cycle"}


@register("generator/var-tiny", paper=PAPER_VAR, weights={"shapes": "weights/generator-var-tiny"},
          description="VAR next-scale prediction, tiny (Shapes msvq-tiny pyramid 1..8, 30 classes)")
def var_tiny(**overrides):
    """VAR next-scale prediction, tiny (Shapes msvq-tiny pyramid 1..8, 30 classes)."""
    return NextScaleAR(**{**TINY, **overrides})


@register("generator/mvar-tiny", paper=PAPER_MVAR, weights={"shapes": "weights/generator-mvar-tiny"},
          description="MVAR scale/spatial-Markov next-scale prediction, tiny (3x3 windows on 6x6, 8x8)")
def mvar_tiny(**overrides):
    """MVAR scale/spatial-Markov next-scale prediction, tiny (3x3 windows on 6x6, 8x8)."""
    return NextScaleAR(**{**TINY, **TINY_MVAR, **overrides})


# Parameter counts: VAR README (FoundationVision/VAR model zoo: d16 310M, d20 600M, d24 1.0B,
# d30 2.0B) and MVAR README (d16 310M, d20 600M, d24 1.0B).
@register("generator/var-d16", paper=PAPER_VAR, paper_params=310e6)
def var_d16(**overrides):
    """VAR-d16: 16 blocks x 1024, 16 heads, ImageNet 256 (680 tokens, V=4096)."""
    return NextScaleAR(**{**_paper(16, 1e-3), **overrides})


@register("generator/var-d20", paper=PAPER_VAR, paper_params=600e6)
def var_d20(**overrides):
    """VAR-d20: 20 blocks x 1280, 20 heads, ImageNet 256."""
    return NextScaleAR(**{**_paper(20, 1e-3), **overrides})


@register("generator/var-d24", paper=PAPER_VAR, paper_params=1.0e9)
def var_d24(**overrides):
    """VAR-d24: 24 blocks x 1536, 24 heads, ImageNet 256."""
    return NextScaleAR(**{**_paper(24, 1e-4), **overrides})


@register("generator/var-d30", paper=PAPER_VAR, paper_params=2.0e9)
def var_d30(**overrides):
    """VAR-d30: 30 blocks x 1920, 30 heads, ImageNet 256."""
    return NextScaleAR(**{**_paper(30, 1e-5), **overrides})


@register("generator/mvar-d16", paper=PAPER_MVAR, paper_params=310e6)
def mvar_d16(**overrides):
    """MVAR-d16: VAR-d16 weights layout, scale-Markov + 7x7 spatial-Markov on 13², 16²."""
    return NextScaleAR(**{**_paper(16, 1e-3), **_PAPER_MVAR, **overrides})


@register("generator/mvar-d20", paper=PAPER_MVAR, paper_params=600e6)
def mvar_d20(**overrides):
    """MVAR-d20: VAR-d20 weights layout, scale-Markov + 7x7 spatial-Markov on 13², 16²."""
    return NextScaleAR(**{**_paper(20, 1e-3), **_PAPER_MVAR, **overrides})


@register("generator/mvar-d24", paper=PAPER_MVAR, paper_params=1.0e9)
def mvar_d24(**overrides):
    """MVAR-d24: VAR-d24 weights layout, scale-Markov + 7x7 spatial-Markov on 13², 16²."""
    return NextScaleAR(**{**_paper(24, 1e-4), **_PAPER_MVAR, **overrides})


__all__ = [
    "TINY_SPEC",
    "VAR_FID_SAMPLING",
    "VAR_SPEC",
    "AdaLNBeforeHead",
    "AttnPlan",
    "NextScaleAR",
    "VARAttention",
    "VARBlock",
    "VARTrunk",
]
