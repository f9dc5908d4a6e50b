"""MAR: masked autoregressive generation with a per-token diffusion head.

Li, Tian, Li, Deng, He 2024, "Autoregressive Image Generation without Vector Quantization"
(arXiv 2406.11838), §3.3-3.4 and §5.1; reference code LTH14/mar.

* Trunk (:class:`MaskedEncoderDecoder`): an MAE-style bidirectional ViT (He et al. 2022).
  The encoder sees only the *known* tokens plus ``buffer_size`` buffer slots that carry the
  condition; the decoder puts a learned mask token at every unknown position, adds learned
  position embeddings, and its output ``z`` (plus a "diffusion" position embedding)
  conditions the head. Blocks are timm ViT blocks (LayerNorm, GELU MLP, qkv bias), as MAR.
* Head: continuous tokens use :class:`generators.diffusion_head.DiffusionHead` (MAR's
  ``SimpleMLPAdaLN``, cosine DDPM, 1000 steps, 100 respaced sampling steps,
  ``diffusion_batch_mul`` = 4). Discrete / binary tokens use the zoo's categorical / per-bit
  head on ``z`` (MAR's cross-entropy baseline, paper Table 1), so MAR takes every kind; any
  layout is flattened (``Tokens.to_sequence``) and gets learned position embeddings.
* Training: one mask ratio per batch from a truncated Gaussian on [``mask_ratio_min``, 1]
  centred at 1 with std 0.25; a random order per sample; the loss covers the masked
  tokens only. The class / caption condition is dropped to null with probability
  ``class_dropout`` (0.1) for CFG.
* Optimizer: no weight decay on the diffusion head (:meth:`MAR.no_weight_decay`, which
  ``train.loop.param_groups`` reads), as MAR's ``add_weight_decay`` skips ``diffloss``.
* Sampling (:meth:`MAR.generate`): a random order per sample and ``num_iter`` steps; after
  step ``k`` ``floor(N·cos(π/2·(k+1)/T))`` tokens stay masked (at least one fewer each
  step, none after the last); each step runs the trunk once and the head on the tokens
  revealed at that step. CFG doubles the batch with the null condition; the ``linear``
  schedule ramps ``1 + (cfg − 1)·(N − masked_after)/N`` in the revealed fraction (MAR/Muse;
  here the count after the step, so the last step uses exactly ``cfg``; ``cfg_last_step="mar"``
  keeps MAR's count of at least 1 there).

Condition: the buffer holds the :class:`generators.conditioning.ConditionEncoder` prefix
(class token, then caption tokens); slots beyond the prefix repeat the class token (MAR
fills all 64 buffer slots with the class embedding; the null class is MAR's fake latent).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from generators.base import Condition, Generator, SamplingConfig
from generators.conditioning import ConditionEncoder
from generators.diffusion_head import DiffusionHead
from generators.heads import TokenEmbedding, make_head
from generators.latent_norm import LatentNorm
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

PAPER = "MAR, Li et al. 2024 (arXiv 2406.11838), §3.3-3.4, §5.1"


# ---- masking schedules ----------------------------------------------------------------------

def truncated_mask_ratio(n: int = 1, min_ratio: float = 0.7, std: float = 0.25, device=None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of MAR's training mask ratio: N(1, std²) truncated to [min_ratio, 1].

    Inverse-CDF sampling (no scipy): ``u ~ U(Φ(a), Φ(0))``, ``r = 1 + std·Φ⁻¹(u)`` with
    ``a = (min_ratio − 1)/std``.
    """
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    lo = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / std, dtype=torch.float64))
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    r = 1.0 + std * torch.special.ndtri(lo + (0.5 - lo) * u)
    return r.clamp(min_ratio, 1.0).float().to(device)


def masked_counts(num_tokens: int, num_iter: int) -> list[int]:
    """Tokens still masked after each of ``num_iter`` steps (MAR / MaskGIT cosine schedule).

    ``c_k = max(1, min(c_{k−1} − 1, floor(N·cos(π/2·(k+1)/T))))`` for ``k < T−1`` and 0
    after the last step; strictly decreasing for ``1 <= T <= N``.
    """
    if not 1 <= num_iter <= num_tokens:
        raise ValueError(f"num_iter must be between 1 and the {num_tokens} tokens to generate, got {num_iter}")
    counts, c = [], num_tokens
    for k in range(num_iter):
        if k == num_iter - 1:
            c = 0
        else:
            c = max(1, min(c - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iter))))
        counts.append(c)
    return counts


def random_orders(batch: int, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random permutation of ``range(n)`` per row, ``(batch, n)`` int64."""
    g_dev = generator.device if generator is not None else None
    return torch.rand(batch, n, generator=generator, device=g_dev).argsort(-1).to(device)


def mask_from_order(orders: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask ``(B, n)``: True at the first ``count`` positions of each row's order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :count], True)


def reveal_plan(orders: torch.Tensor, num_iter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(mask_before, to_predict)]`` per step for the sampling schedule over ``orders``.

    Positions are masked in the order given (the first ``c_k`` of each row stay masked
    after step ``k``), so the last positions of the order are revealed first.
    """
    n = orders.shape[1]
    plan, mask = [], torch.ones(orders.shape, dtype=torch.bool, device=orders.device)
    for c in masked_counts(n, num_iter):
        nxt = mask_from_order(orders, c)
        plan.append((mask, mask & ~nxt))
        mask = nxt
    return plan


# ---- trunk ----------------------------------------------------------------------------------

class ScaleAwareBlock(Block):
    """A timm ViT block with Hi-MAR's scale-aware modulation (arXiv 2505.20288, §3.2, eq. 2).

    ``ṽ = a·v + b`` (``a``, ``b`` per block; ``v`` from the task embedding) is split into
    (α1, β1, γ1, α2, β2, γ2): ``x + γ1·Attn(α1·LN(x) + β1)``, then ``x + γ2·FFN(α2·LN(x) + β2)``.
    ``a = 0`` and ``b = (1, 0, 1, 1, 0, 1)`` at init, so the block starts as a plain ViT block.
    """

    def __init__(self, dim, num_heads, **kw):
        super().__init__(dim, num_heads, **kw)
        self.mod_a = nn.Parameter(torch.zeros(6 * dim))
        one, zero = torch.ones(dim), torch.zeros(dim)
        self.mod_b = nn.Parameter(torch.cat((one, zero, one, one, zero, one)))

    def forward(self, x, v=None):
        if v is None:
            return super().forward(x)
        a1, b1, g1, a2, b2, g2 = (self.mod_a * v + self.mod_b).chunk(6, -1)
        x = x + g1 * self.drop_path1(self.ls1(self.attn(a1 * self.norm1(x) + b1)))
        return x + g2 * self.drop_path2(self.ls2(self.mlp(a2 * self.norm2(x) + b2)))


class MaskedEncoderDecoder(nn.Module):
    """MAE-style encoder/decoder over ``[buffer | seq_len positions]`` (MAR §3.3).

    ``forward(x, buffer, mask, task=0) -> z (B, seq_len, dec_dim)``:
    ``x`` (B, L, dim) are the embedded inputs (values at masked positions are never read),
    ``buffer`` (B, S, dim) the condition slots, ``mask`` (B, L) bool (True = unknown; every
    row must mask the same number). With ``num_tasks > 1`` (Hi-MAR) each task has its own
    position embeddings and mask token, and the blocks are :class:`ScaleAwareBlock`
    modulated by a task embedding; the block weights are shared by all tasks.
    """

    def __init__(self, seq_len: int, buffer_size: int, dim: int, depth: int, heads: int,
                 dec_dim: int, dec_depth: int, dec_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, attn_dropout: float = 0.1, num_tasks: int = 1):
        super().__init__()
        self.seq_len, self.buffer_size, self.num_tasks = seq_len, buffer_size, num_tasks
        S = buffer_size + seq_len
        blk = ScaleAwareBlock if num_tasks > 1 else Block
        kw = {"mlp_ratio": mlp_ratio, "qkv_bias": True, "norm_layer": partial(nn.LayerNorm, eps=1e-6),
              "proj_drop": dropout, "attn_drop": attn_dropout}
        self.enc_pos = nn.Parameter(torch.zeros(num_tasks, S, dim))
        self.in_norm = nn.LayerNorm(dim, eps=1e-6)
        self.encoder_blocks = nn.ModuleList(blk(dim, heads, **kw) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(num_tasks, 1, dec_dim))
        self.dec_pos = nn.Parameter(torch.zeros(num_tasks, S, dec_dim))
        self.decoder_blocks = nn.ModuleList(blk(dec_dim, dec_heads, **kw) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.head_pos = nn.Parameter(torch.zeros(1, seq_len, dec_dim))
        if num_tasks > 1:  # Hi-MAR: task embedding -> modulation vector v (one map per stack)
            self.enc_task = nn.Embedding(num_tasks, dim)
            self.enc_task_mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            self.dec_task = nn.Embedding(num_tasks, dec_dim)
            self.dec_task_mlp = nn.Sequential(nn.SiLU(), nn.Linear(dec_dim, 6 * dec_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR init: xavier-uniform linears, unit LayerNorms, N(0, 0.02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in (self.enc_pos, self.dec_pos, self.head_pos, self.mask_token):
            nn.init.normal_(p, std=0.02)

    def _task_vectors(self, task: int, like: torch.Tensor):
        if self.num_tasks == 1:
            if task != 0:
                raise ValueError(f"this trunk has one task, got task={task}")
            return None, None
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        idx = torch.tensor([task], device=like.device)
        return self.enc_task_mlp(self.enc_task(idx)), self.dec_task_mlp(self.dec_task(idx))

    def forward(self, x: torch.Tensor, buffer: torch.Tensor, mask: torch.Tensor, task: int = 0) -> torch.Tensor:
        B, L, D = x.shape
        if L != self.seq_len or buffer.shape[1] != self.buffer_size or mask.shape != (B, L):
            raise ValueError(f"trunk expects x (B, {self.seq_len}, D), buffer (B, {self.buffer_size}, D) and "
                             f"mask (B, {self.seq_len}); got {tuple(x.shape)}, {tuple(buffer.shape)}, "
                             f"{tuple(mask.shape)}")
        mask = mask.bool()
        n_keep = L - mask.sum(1)
        if bool((n_keep != n_keep[0]).any()):
            raise ValueError("every row must mask the same number of tokens (the encoder drops them)")
        v_enc, v_dec = self._task_vectors(task, x)
        S = self.buffer_size
        h = self.in_norm(torch.cat((buffer.to(x.dtype), x), 1) + self.enc_pos[task])
        full_mask = torch.cat((torch.zeros(B, S, dtype=torch.bool, device=x.device), mask), 1)
        # visible slots in increasing position order (stable sort puts False first)
        keep = torch.argsort(full_mask.to(torch.int8), dim=1, stable=True)[:, :S + int(n_keep[0])]
        h = torch.gather(h, 1, keep[..., None].expand(-1, -1, D))
        for blk in self.encoder_blocks:
            h = blk(h) if v_enc is None else blk(h, v_enc)
        h = self.decoder_embed(self.encoder_norm(h))
        Dd = h.shape[-1]
        full = self.mask_token[task].to(h.dtype).expand(B, S + L, Dd)
        full = full.scatter(1, keep[..., None].expand(-1, -1, Dd), h) + self.dec_pos[task]
        for blk in self.decoder_blocks:
            full = blk(full) if v_dec is None else blk(full, v_dec)
        return self.decoder_norm(full)[:, S:] + self.head_pos


# ---- MAR ------------------------------------------------------------------------------------

class MAR(Generator):
    """MAR generator (Li et al. 2024) over any token kind / layout.

    Args:
        spec: the tokenizer's :class:`TokenSpec` (continuous -> diffusion head; discrete /
            binary -> categorical / per-bit head; layouts are flattened).
        num_classes, text_vocab_size, text_len, text_depth: condition (class and/or caption).
        dim, depth, heads: encoder; dec_dim, dec_depth, dec_heads: decoder (default = encoder).
        mlp_ratio, dropout, attn_dropout: ViT blocks (MAR: 4, 0.1, 0.1).
        buffer_size: condition slots in front of the tokens (MAR: 64; >= prefix length).
        class_dropout: CFG label (and caption) dropout. mask_ratio_min: 0.7.
        mask_ratio_dist: the training mask ratio. ``"truncnorm"`` (MAR): N(1, 0.25²) truncated
            to [``mask_ratio_min``, 1]. ``"cosine"`` (MaskGIT, Chang et al. 2022 §3.2):
            ``r = cos(π/2·u)``, ``u ~ U(0, 1)`` -- exactly the ratios MAR's cosine sampling
            schedule visits, one step each. Not in MAR; the tiny configs use it because with
            64 tokens half of the 16 sampling steps run at ratios < 0.7 that ``truncnorm``
            never trains, and the head loss there measured 0.14–0.24 against 0.12 at 0.7
            (checkpoints.md, issue 16).
        head_width, head_depth: diffusion MLP; diffusion_steps / sampling_steps: 1000 / 100;
        diffusion_batch_mul: 4; learn_sigma: learned variance (MAR: True).
        num_iter: default sampling steps (``SamplingConfig.extra["num_iter"]`` overrides).
        clip_denoised: clamp the head's predicted x_0 to the training range while sampling
            (not in MAR; on for the tiny config, see :mod:`generators.diffusion_head`).
        latent_norm: per-channel standardisation of continuous tokens (``"none"`` in the
            paper configs; :mod:`generators.latent_norm`).
        cfg_last_step: the ``linear`` CFG schedule at the last sampling step. ``"full"``
            (default): the count of tokens masked after the step is 0, so the last step uses
            exactly ``cfg``. ``"mar"``: LTH14/mar ``sample_tokens``, whose count is clamped to
            at least 1 (``mask_len >= 1``), so the last step uses ``1 + (cfg − 1)(N − 1)/N``;
            ``arzoo convert --from mar`` sets it, so converted models sample as the reference.

    ``SamplingConfig.extra``: ``num_iter`` (trunk steps), ``head_steps`` (DDPM steps).
    """

    trunk = "backbone"

    extra_keys = ("num_iter", "head_steps")

    def __init__(self, spec: TokenSpec, num_classes: int | None = None, text_vocab_size: int | None = None,
                 text_len: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 dec_dim: int | None = None, dec_depth: int | None = None, dec_heads: int | None = None,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, attn_dropout: float = 0.1, buffer_size: int = 64,
                 class_dropout: float = 0.1, text_depth: int = 2, mask_ratio_min: float = 0.7,
                 head_width: int = 1024, head_depth: int = 6, diffusion_steps: int = 1000,
                 sampling_steps: int = 100, diffusion_batch_mul: int = 4, learn_sigma: bool = True,
                 num_iter: int = 64, clip_denoised: bool = False, latent_norm: str = "none",
                 cfg_last_step: str = "full", mask_ratio_dist: str = "truncnorm"):
        super().__init__()
        if mask_ratio_dist not in ("truncnorm", "cosine"):
            raise ValueError(f"mask_ratio_dist must be 'truncnorm' or 'cosine', got {mask_ratio_dist!r}")
        self.mask_ratio_dist = mask_ratio_dist
        if cfg_last_step not in ("full", "mar"):
            raise ValueError(f"cfg_last_step must be 'full' or 'mar', got {cfg_last_step!r}")
        self.cfg_last_step = cfg_last_step
        self.spec = self._check_spec(spec)
        self.num_tokens = self.spec.num_tokens  # tokens to generate
        self.seq_len = self._seq_len()          # positions the trunk sees (Hi-MAR adds pivots)
        dec_dim, dec_depth, dec_heads = dec_dim or dim, dec_depth or depth, dec_heads or heads
        self.cond_encoder = ConditionEncoder(dim, num_classes, text_vocab_size, text_len, class_dropout,
                                             text_depth=text_depth, text_heads=heads)
        P = self.cond_encoder.prefix_len
        if buffer_size < P:
            raise ValueError(f"buffer_size={buffer_size} cannot hold the {P}-token condition prefix "
                             f"(class + {text_len} caption tokens); use buffer_size >= {P}")
        self.buffer_size = buffer_size
        self.mask_ratio_min, self.diffusion_batch_mul = mask_ratio_min, diffusion_batch_mul
        if not 1 <= num_iter <= self.num_tokens:
            raise ValueError(f"num_iter must be in [1, {self.num_tokens}], got {num_iter}")
        self.num_iter = num_iter
        self.backbone = self._make_trunk(dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio,
                                      dropout, attn_dropout)
        self.embed = TokenEmbedding(self.spec, dim)
        self.continuous = self.spec.kind == "continuous"
        # per-channel standardisation of continuous tokens (generators.latent_norm); ids/bits: none
        self.latent_norm = LatentNorm(self.spec.dim if self.continuous else 1,
                                      latent_norm if self.continuous else "none")
        if self.continuous:
            self.head = DiffusionHead(self.spec.dim, dec_dim, head_width, head_depth, diffusion_steps,
                                      sampling_steps, learn_sigma, clip_denoised)
        else:
            self.head = make_head(self.spec, dec_dim)

    # ---- construction hooks (Hi-MAR overrides) ---------------------------------------------
    def _check_spec(self, spec) -> TokenSpec:
        if isinstance(spec, dict):
            spec = TokenSpec.from_dict(spec)
        if not isinstance(spec, TokenSpec):
            raise TypeError(f"{type(self).__name__} needs a TokenSpec, got {type(spec).__name__}")
        return spec

    def _seq_len(self) -> int:
        return self.spec.num_tokens

    def no_weight_decay(self) -> list:
        """Parameter names kept out of weight decay: every diffusion head (MAR's ``diffloss``)."""
        from generators.diffusion_head import _DDPMHead  # MAR's MLP head and Hi-MAR's DiT head

        heads = [n for n, m in self.named_modules() if isinstance(m, _DDPMHead)]
        return [n for n, _ in self.named_parameters() if any(n.startswith(h + ".") for h in heads)]

    def _make_trunk(self, dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio, dropout, attn_dropout):
        return MaskedEncoderDecoder(self.seq_len, self.buffer_size, dim, depth, heads, dec_dim, dec_depth,
                                    dec_heads, mlp_ratio, dropout, attn_dropout)

    # ---- condition buffer -------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.backbone.enc_pos.device

    def _fill_buffer(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prefix (B, P, D) -> buffer (B, buffer_size, D): extra slots repeat the class token."""
        extra = self.buffer_size - prefix.shape[1]
        if extra == 0:
            return prefix
        return torch.cat((prefix, prefix[:, :1].expand(-1, extra, -1)), 1)

    def buffer(self, cond: Condition | None, batch: int) -> torch.Tensor:
        dev = self._device()
        cond = cond.to(dev) if cond is not None else None
        return self._fill_buffer(self.cond_encoder(cond, batch=batch))

    def null_buffer(self, batch: int) -> torch.Tensor:
        return self._fill_buffer(self.cond_encoder.null_condition(batch))

    # ---- training -----------------------------------------------------------------------------
    def loss(self, tokens: Tokens, cond: Condition | None) -> dict:
        """Masked-token loss: diffusion loss (continuous) or CE (discrete / bits) on the
        masked positions -> ``{"loss", ...}`` (``mask_ratio`` reported)."""
        seq = self.latent_norm.normalize(self.check_tokens(tokens).to_sequence().data.to(self._device()))
        B, N = seq.shape[:2]
        buf = self.buffer(cond, B)
        n_mask = max(1, math.ceil(N * self.train_mask_ratio()))
        mask = mask_from_order(random_orders(B, N, device=seq.device), n_mask)
        z = self.backbone(self.embed(seq), buf, mask)
        out = self._head_loss(seq, z, mask)
        out["mask_ratio"] = torch.tensor(n_mask / N)
        return out

    def train_mask_ratio(self) -> float:
        """One training mask ratio (``mask_ratio_dist``)."""
        if self.mask_ratio_dist == "cosine":
            return math.cos(math.pi / 2 * float(torch.rand(())))
        return float(truncated_mask_ratio(1, self.mask_ratio_min)[0])

    def _head_loss(self, seq: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> dict:
        # Only masked rows reach the head: the same loss as MAR's 0/1-weighted mean over all rows.
        if self.continuous:
            return self.head.loss(seq[mask].to(z.dtype), z[mask], None, self.diffusion_batch_mul)
        return self.head.loss(z[mask], seq[mask])

    # ---- sampling -----------------------------------------------------------------------------
    @staticmethod
    def _cfg_scale(sampling: SamplingConfig, cfg: float, n: int, masked_after: int) -> float:
        if sampling.cfg_schedule == "linear":
            return 1.0 + (cfg - 1.0) * (n - masked_after) / n
        return cfg

    def _sample_head(self, z: torch.Tensor, zu: torch.Tensor | None, cfg: float, sampling: SamplingConfig,
                     generator, head_steps: int | None) -> torch.Tensor:
        """Tokens for the rows of ``z`` (M, Dz) (continuous: (M, C) floats; else ids / bits)."""
        if self.continuous:
            return self.head.sample(z, zu, cfg, sampling.temperature, generator, head_steps)
        logits = self.head(z)
        kw = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "generator": generator}
        if zu is not None:
            return self.head.sample(logits, uncond=self.head(zu), cfg=cfg, **kw)
        return self.head.sample(logits, **kw)

    def _empty_seq(self, B: int, n: int) -> torch.Tensor:
        spec, dev = self.spec, self._device()
        if spec.kind == "continuous":
            return torch.zeros(B, n, spec.dim, device=dev)
        if spec.kind == "binary":
            return torch.zeros(B, n, spec.bits, dtype=torch.uint8, device=dev)
        return torch.zeros(B, n, dtype=torch.long, device=dev)

    @torch.no_grad()
    def generate(self, cond: Condition | None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tokens:
        """Random-order masked generation in ``num_iter`` steps (one trunk forward each)."""
        sampling = self.sampling_config(sampling)
        was = self.training
        self.eval()
        try:
            B = cond.batch_size if cond is not None else None
            if B is None:
                raise ValueError("pass a Condition (Condition(batch=B) for unconditional sampling)")
            num_iter = int(sampling.extra.get("num_iter", self.num_iter))
            head_steps = sampling.extra.get("head_steps")
            buf = self.buffer(cond, B)
            use_cfg = self.cond_encoder.conditional and sampling.cfg != 1.0
            if use_cfg:
                buf = torch.cat((buf, self.null_buffer(B).to(buf.dtype)))
            seq = self._empty_seq(B, self.num_tokens)
            orders = random_orders(B, self.num_tokens, generator, seq.device)
            for mask, to_pred in reveal_plan(orders, num_iter):
                seq = self._masked_step(seq, buf, mask, to_pred, use_cfg, sampling.cfg, sampling, generator,
                                        head_steps)
            return Tokens.from_sequence(self.latent_norm.denormalize(seq), self.spec)
        finally:
            self.train(was)

    def fit_latent_stats(self, tokens: torch.Tensor) -> None:
        """Fit ``latent_norm`` on training tokens (..., dim) (``train.generator`` calls it)."""
        self.latent_norm.fit(tokens)

    def _masked_step(self, seq, buf, mask, to_pred, use_cfg, cfg, sampling, generator, head_steps):
        """One trunk forward and head sampling at ``to_pred``; returns the updated ``seq``."""
        N = to_pred.shape[1]
        x = self.embed(seq)
        if use_cfg:  # [cond; null] share the tokens and the mask
            x, mask_in = torch.cat((x, x)), torch.cat((mask, mask))
        else:
            mask_in = mask
        z = self.backbone(x, buf, mask_in)
        zc, zu = z.chunk(2) if use_cfg else (z, None)
        masked_after = int((mask & ~to_pred)[0].sum())
        if self.cfg_last_step == "mar":  # MAR's mask_len is never below 1 (see cfg_last_step)
            masked_after = max(1, masked_after)
        cfg = self._cfg_scale(sampling, cfg, N, masked_after)
        new = self._sample_head(zc[to_pred], zu[to_pred] if use_cfg else None, cfg, sampling, generator,
                                head_steps)
        seq = seq.clone()
        seq[to_pred] = new.to(seq.dtype)
        return seq


# ---- registry -------------------------------------------------------------------------------

# Tiny (Shapes, kl-tiny 8x8x8): 2+2 ViT blocks of 128 and a 3 x 192 diffusion MLP; the buffer
# is the 17-token class + caption prefix. num_iter 16 = N/4 (MAR's main_mar default 64 for 256).
# The MLP runs on every masked token x diffusion_batch_mul (4), so it dominates the training
# FLOPs (~3x the trunk at width 192, ~5x at 256).
TINY = {
    "spec": TokenSpec("continuous", "grid", (8, 8), dim=8), "num_classes": 30, "text_vocab_size": 64,
    "text_len": 16, "dim": 128, "depth": 2, "heads": 4, "mlp_ratio": 4.0, "dropout": 0.0,
    "attn_dropout": 0.0, "buffer_size": 17, "class_dropout": 0.1, "text_depth": 1, "head_width": 192,
    "head_depth": 3, "diffusion_batch_mul": 4, "sampling_steps": 100, "num_iter": 16, "clip_denoised": True,
    "latent_norm": "channel", "mask_ratio_dist": "cosine",
}

_KL16 = TokenSpec("continuous", "grid", (16, 16), dim=16)  # MAR KL-16 at 256 px
_PAPER_BASE = {"spec": _KL16, "num_classes": 1000, "buffer_size": 64, "dropout": 0.1, "attn_dropout": 0.1,
               "class_dropout": 0.1, "num_iter": 64}


@register("generator/mar-tiny", paper=PAPER, weights={"shapes": "weights/generator-mar-tiny"},
          description="MAR (masked AR + diffusion MLP head), tiny (kl-tiny 8x8x8, class + caption)")
def mar_tiny(**overrides):
    """MAR (masked AR + diffusion MLP head), tiny (kl-tiny 8x8x8, class + caption)."""
    return MAR(**{**TINY, **overrides})


@register("generator/mar-b", paper=PAPER, paper_params=208e6)
def mar_b(**overrides):
    """MAR-B: 12+12 blocks x 768, 12 heads, diffusion MLP 6 x 1024, KL-16 16x16x16."""
    return MAR(**{**_PAPER_BASE, "dim": 768, "depth": 12, "heads": 12, "head_width": 1024, "head_depth": 6,
                  **overrides})


@register("generator/mar-l", paper=PAPER, paper_params=479e6)
def mar_l(**overrides):
    """MAR-L: 16+16 blocks x 1024, 16 heads, diffusion MLP 8 x 1280, KL-16 16x16x16."""
    return MAR(**{**_PAPER_BASE, "dim": 1024, "depth": 16, "heads": 16, "head_width": 1280, "head_depth": 8,
                  **overrides})


@register("generator/mar-h", paper=PAPER, paper_params=943e6)
def mar_h(**overrides):
    """MAR-H: 20+20 blocks x 1280, 16 heads, diffusion MLP 12 x 1536, KL-16 16x16x16."""
    return MAR(**{**_PAPER_BASE, "dim": 1280, "depth": 20, "heads": 16, "head_width": 1536, "head_depth": 12,
                  **overrides})


__all__ = [
    "MAR",
    "MaskedEncoderDecoder",
    "ScaleAwareBlock",
    "mask_from_order",
    "masked_counts",
    "random_orders",
    "reveal_plan",
    "truncated_mask_ratio",
]
