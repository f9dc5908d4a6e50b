"""Nearest-neighbour vector quantizer (VQ-VAE / VQGAN / LlamaGen VQ) and its training options.

Implements the quantizer of

- van den Oord et al. 2017, "Neural Discrete Representation Learning" (VQ-VAE), §3.1-3.2:
  nearest code, straight-through gradient, codebook + commitment losses (beta = 0.25);
  App. A.1: the exponential-moving-average (EMA) codebook update that replaces the codebook
  loss, with the Laplace smoothing of the cluster sizes used by the VQ-VAE(-2) reference code;
- Esser et al. 2021, "Taming Transformers" (VQGAN): the ``legacy`` loss form of its
  ``VectorQuantizer2`` puts beta on the codebook term instead of the commitment term
  (used by SEED and Slot-MLLM);
- Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN" (ViT-VQGAN), §3.2:
  l2-normalised, low-dimensional ("factorised") codes;
- Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image
  Generation" (LlamaGen), §2.1: codebook 16384 x 8 with l2-norm, beta 0.25, and the optional
  MAGVIT-style entropy loss ``mean_i H(p_i) - H(mean_i p_i)`` with ``p = softmax(-d / tau)``;
- k-means codebook initialisation on the first training batch (Łańcucki et al. 2020,
  "Robust Training of Vector Quantized Bottleneck Models", §3; Zeghidour et al. 2021,
  SoundStream, §3.3) and dead-code restart from encoder outputs (Dhariwal et al. 2020,
  Jukebox, §3.1 "random restarts"; Łańcucki et al. 2020).

Every option is off by default: a default-constructed quantizer has exactly one tensor in its
state dict (``embedding.weight``) and behaves as before, so shipped checkpoints keep loading.
The pieces are separate methods -- :meth:`codebook`, :meth:`distances`, :meth:`_losses`,
:meth:`_track`, :meth:`_ema_update`, :meth:`_kmeans_init`, :meth:`_restart_dead_codes` --
so composite quantizers (RVQ, multi-scale) can reuse them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def entropy_loss(distances: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """MAGVIT / LlamaGen entropy penalty ``mean_i H(p_i) - H(mean_i p_i)``, ``p_i = softmax(-d_i / tau)``.

    ``distances`` is (N, K). The first term is low when each vector is confidently assigned; the
    second (subtracted) term is high when the batch spreads over many codes. The minimum,
    ``-log K``, is reached by confident assignments spread uniformly over all K codes.
    """
    logits = -distances.float().reshape(-1, distances.shape[-1]) / temperature
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    sample_entropy = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    # clamp avoids log(0) = -inf times 0 = NaN for codes nobody picks
    avg_entropy = -(avg * avg.clamp_min(1e-12).log()).sum()
    return sample_entropy - avg_entropy


def _sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (N, K) between the rows of ``x`` (N, d) and ``c`` (K, d)."""
    x, c = x.float(), c.float()
    # ||x||^2 + ||c||^2 - 2 x.c, with the matmul done by addmm (one pass, no (N, K, d) tensor)
    return torch.addmm((x * x).sum(1, keepdim=True) + (c * c).sum(1), x, c.t(), beta=1.0, alpha=-2.0)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` (N, d) -> (k, d) float32 centres.

    Centres start at ``k`` rows of ``x`` drawn without replacement (with replacement when
    ``N < k``); each iteration assigns every row to its nearest centre and moves each centre to
    the mean of its rows. A centre that receives no row keeps its position.
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"kmeans expects a non-empty (N, d) matrix, got shape {tuple(x.shape)}")
    if k < 1 or iters < 0:
        raise ValueError(f"kmeans needs k >= 1 and iters >= 0, got k={k}, iters={iters}")
    x = x.float()
    n = x.shape[0]
    if n >= k:
        pick = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")[:k]
    else:
        pick = torch.randint(n, (k,), generator=generator, device=generator.device if generator else "cpu")
    c = x[pick.to(x.device)].clone()
    for _ in range(iters):
        a = _sq_distances(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).unsqueeze(1)
        c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
    return c


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum batch statistics over data-parallel ranks (no-op without torch.distributed)."""
    if _distributed():
        for t in tensors:
            dist.all_reduce(t)


def _broadcast(*tensors: torch.Tensor) -> None:
    """Copy rank 0's tensors to every rank, so random choices agree (no-op without torch.distributed)."""
    if _distributed():
        for t in tensors:
            dist.broadcast(t, 0)


class VectorQuantizer(nn.Module):
    """Map channels-first features ``(B, dim, h, w)`` to their nearest codebook entries.

    Args:
        codebook_size: K, the number of codes.
        dim: code dimension (the channel count of the input).
        beta: commitment weight (0.25 in VQ-VAE / LlamaGen).
        l2_norm: l2-normalise inputs and codes before the lookup (ViT-VQGAN / LlamaGen); then
            squared distance is ``2 - 2 cos`` and the quantized output lies on the unit sphere.
        entropy_weight: weight of :func:`entropy_loss` (0 disables it; LlamaGen's default).
        entropy_temperature: tau of the entropy loss softmax (0.01 as in LlamaGen).
        legacy: taming's legacy form, beta on the codebook term instead of the commitment term:
            ``||sg(z_q) - z||^2 + beta ||z_q - sg(z)||^2`` (default form:
            ``beta ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2``).
        usage_window: number of recent training batches the usage metrics look back over.
        ema: update the codebook by exponential moving averages of the assignments (VQ-VAE
            App. A.1) instead of by gradient. ``embedding.weight`` then is a buffer, the
            ``codebook`` loss is zero and only the beta-commitment term remains. Cannot be
            combined with ``legacy`` (whose beta sits on the removed codebook term).
        ema_decay: gamma of the moving averages (0.99 in VQ-VAE).
        ema_eps: Laplace smoothing of the cluster sizes, ``N_i <- (N_i + eps) / (N + K eps) * N``.
        kmeans_init: on the first training forward, set the codebook to k-means centres of
            that batch's vectors. A persistent ``kmeans_done`` flag makes it happen once, also
            across save/load.
        kmeans_iters: Lloyd iterations of that k-means.
        restart_threshold: > 0 enables dead-code restart: every ``restart_every`` training
            forwards, codes whose usage EMA (assignments per batch, decay ``restart_decay``)
            is below this are moved onto random vectors of the current batch (plus tiny
            noise), and their usage EMA is reset to the threshold (Jukebox §3.1).
        restart_every: training forwards between dead-code checks.
        restart_decay: decay of the per-code usage EMA that the restart reads.

    ``forward`` returns ``(z_q, indices, losses)``; ``losses`` holds ``commit``, ``codebook``,
    ``entropy`` (already weighted), ``loss`` (their sum) and the detached metrics ``usage``
    (fraction of codes used in the last ``usage_window`` training batches) and ``perplexity``
    (exp of the entropy of this batch's code histogram). :meth:`usage_stats` gives both over
    the rolling window. In training mode with ``ema``/``kmeans_init``/``restart_threshold``
    the codebook is updated *after* this batch was quantised (the returned ``z_q`` used the
    old codes); with ``torch.distributed`` initialised the batch statistics are summed over
    ranks and random choices are broadcast from rank 0, so codebooks stay identical.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, l2_norm: bool = True,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 legacy: bool = False, usage_window: int = 100,
                 ema: bool = False, ema_decay: float = 0.99, ema_eps: float = 1e-5,
                 kmeans_init: bool = False, kmeans_iters: int = 10,
                 restart_threshold: float = 0.0, restart_every: int = 100, restart_decay: float = 0.99):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"VectorQuantizer needs codebook_size >= 2 and dim >= 1, got "
                             f"codebook_size={codebook_size}, dim={dim}")
        if ema and legacy:
            raise ValueError("ema=True drops the codebook loss term, on which legacy=True puts beta; "
                             "use one of them, got both")
        for name, v in (("ema_decay", ema_decay), ("restart_decay", restart_decay)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v}")
        if ema_eps <= 0 or kmeans_iters < 0 or restart_threshold < 0 or restart_every < 1 or usage_window < 0:
            raise ValueError(f"expected ema_eps > 0, kmeans_iters >= 0, restart_threshold >= 0, "
                             f"restart_every >= 1, usage_window >= 0; got ema_eps={ema_eps}, "
                             f"kmeans_iters={kmeans_iters}, restart_threshold={restart_threshold}, "
                             f"restart_every={restart_every}, usage_window={usage_window}")
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.beta = float(beta)
        self.l2_norm = bool(l2_norm)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.legacy = bool(legacy)
        self.ema = bool(ema)
        self.ema_decay = float(ema_decay)
        self.ema_eps = float(ema_eps)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = int(kmeans_iters)
        self.restart_threshold = float(restart_threshold)
        self.restart_every = int(restart_every)
        self.restart_decay = float(restart_decay)
        # Same parameter name as LlamaGen/taming (``embedding.weight``) to ease weight porting.
        self.embedding = nn.Embedding(self.codebook_size, self.dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                # As LlamaGen: store unit-norm codes. Raw codes of norm ~1/K would make the
                # gradient through the normalisation ~K times larger than the step Adam takes.
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if self.ema:
            # The codebook becomes a buffer under the same state-dict key: no gradient, no
            # optimiser state, and DDP broadcasts it like the EMA statistics.
            w = self.embedding.weight.detach()
            del self.embedding.weight
            self.embedding.register_buffer("weight", w)
            # One pseudo-observation per code at its initial position: an unused code then
            # stays where it is (embed_sum / cluster_size = code) instead of drifting to 0.
            self.register_buffer("cluster_size", torch.ones(self.codebook_size))
            self.register_buffer("embed_sum", w.clone().float())
        if self.kmeans_init:
            self.register_buffer("kmeans_done", torch.zeros((), dtype=torch.bool))
        self._kmeans_done_cache = False  # python copy of the flag: no device sync once set
        if self.restart_threshold > 0:
            # Start at the threshold: a code must actually be unused for a while to be restarted.
            self.register_buffer("code_usage", torch.full((self.codebook_size,), self.restart_threshold))
        self._step = 0  # training forwards seen (python int: no device sync, works on meta)
        # Rolling usage: per-code assignment counts of the recent training batches. Not
        # persistent, so checkpoints stay loadable whatever the window; integer, so that
        # ``model.to(torch.bfloat16)`` does not round the counts.
        self.usage_window = int(usage_window)
        self.register_buffer("_counts", torch.zeros(self.usage_window, self.codebook_size, dtype=torch.int32),
                             persistent=False)
        self._slot = 0  # python int: no .item() / device sync, works on meta

    # ---- codebook ----------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The effective (K, dim) code vectors (unit-norm when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def distances(self, z_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances (N, K) between rows of ``z_flat`` and ``codes``."""
        return _sq_distances(z_flat, codes)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` (B, h, w) -> (B, dim, h, w), normalised when ``l2_norm``."""
        if indices.dtype.is_floating_point:
            raise ValueError(f"lookup expects integer code indices, got dtype {indices.dtype}")
        return F.embedding(indices.long(), self.codebook()).movedim(-1, 1).contiguous()

    # ---- forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, h, w) features, got {tuple(z.shape)}")
        B, C, h, w = z.shape
        z = z.movedim(1, -1)  # (B, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        z_flat = z.reshape(-1, C)
        if self.training and self.kmeans_init and not self._kmeans_is_done():
            self._kmeans_init(z_flat.detach())
        codes = self.codebook()
        d = self.distances(z_flat, codes)
        idx = d.argmin(1)
        z_q = F.embedding(idx, codes).view_as(z).to(z.dtype)
        losses = self._losses(z, z_q, d)
        hist = torch.bincount(idx, minlength=self.codebook_size).float()
        losses.update(self._track(idx, hist))
        if self.training and (self.ema or self.restart_threshold > 0):
            self._update_codebook(z_flat.detach(), idx, hist)
        # straight-through estimator: forward value z_q, gradient identity w.r.t. z
        z_q = z + (z_q - z).detach()
        return z_q.movedim(-1, 1).contiguous(), idx.view(B, h, w), losses

    def _losses(self, z: torch.Tensor, z_q: torch.Tensor, d: torch.Tensor) -> dict:
        commit = F.mse_loss(z, z_q.detach())  # pulls the encoder to its code
        if self.ema:  # the EMA update moves the codes; no codebook gradient term
            codebook = z.new_zeros(())
        else:
            codebook = F.mse_loss(z_q, z.detach())  # pulls the code to the encoder output
        if self.legacy:  # taming's legacy form: beta weights the codebook term
            codebook = self.beta * codebook
        else:
            commit = self.beta * commit
        if self.entropy_weight > 0:
            ent = self.entropy_weight * entropy_loss(d, self.entropy_temperature)
        else:
            ent = z.new_zeros(())
        return {"loss": commit + codebook + ent, "commit": commit, "codebook": codebook, "entropy": ent}

    # ---- codebook updates (training mode only) -------------------------------------------
    @torch.no_grad()
    def _update_codebook(self, z_flat: torch.Tensor, idx: torch.Tensor, hist: torch.Tensor) -> None:
        counts = hist.clone()
        sums = None
        if self.ema:
            sums = torch.zeros(self.codebook_size, self.dim, device=z_flat.device).index_add_(0, idx, z_flat.float())
            _all_reduce_sum(counts, sums)
        else:
            _all_reduce_sum(counts)
        if self.ema:
            self._ema_update(counts, sums)
        if self.restart_threshold > 0:
            self.code_usage.mul_(self.restart_decay).add_(counts, alpha=1.0 - self.restart_decay)
            self._step += 1
            if self._step % self.restart_every == 0:
                self._restart_dead_codes(z_flat)

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """VQ-VAE App. A.1: ``N_i <- g N_i + (1-g) n_i``, ``m_i <- g m_i + (1-g) sum_j z_ij``,
        ``e_i = m_i / N~_i`` with Laplace-smoothed ``N~_i = (N_i + eps) / (N + K eps) * N``."""
        g = self.ema_decay
        self.cluster_size.mul_(g).add_(counts, alpha=1.0 - g)
        self.embed_sum.mul_(g).add_(sums, alpha=1.0 - g)
        n = self.cluster_size.sum()
        # smoothing keeps a code that no vector picks from dividing by zero
        smoothed = (self.cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        self.embedding.weight.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def _kmeans_is_done(self) -> bool:
        if not self._kmeans_done_cache:
            self._kmeans_done_cache = bool(self.kmeans_done)  # one sync until it is set
        return self._kmeans_done_cache

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        """Set the codebook to k-means centres of this batch's (normalised) vectors, once."""
        c = kmeans(z_flat, self.codebook_size, self.kmeans_iters).to(z_flat.device)
        if self.l2_norm:
            c = F.normalize(c, dim=-1)  # keep the unit-norm storage convention
        _broadcast(c)
        self._set_codes(torch.ones(self.codebook_size, dtype=torch.bool, device=c.device), c)
        self.kmeans_done.fill_(True)
        self._kmeans_done_cache = True

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor) -> int:
        """Move codes with usage EMA below ``restart_threshold`` onto random batch vectors.

        Returns the number of restarted codes (one device sync per check)."""
        dead = self.code_usage < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        n = z_flat.shape[0]
        if n >= n_dead:  # distinct vectors when the batch has enough
            pick = torch.randperm(n, device=z_flat.device)[:n_dead]
        else:
            pick = torch.randint(n, (n_dead,), device=z_flat.device)
        new = z_flat[pick].float()
        # tiny noise separates codes restarted on the same or on identical vectors
        scale = 1e-3 * new.pow(2).mean().sqrt().clamp_min(1e-12)
        new = new + scale * torch.randn_like(new)
        _broadcast(new)
        self._set_codes(dead, new)
        return n_dead

    def _set_codes(self, mask: torch.Tensor, new: torch.Tensor) -> None:
        """Replace the codes at ``mask`` by ``new`` (n, dim) and reset their statistics."""
        w = self.embedding.weight
        w.data[mask] = new.to(w.dtype)
        if self.ema:  # restart the moving averages at the new code, one pseudo-observation
            self.cluster_size[mask] = 1.0
            self.embed_sum[mask] = new.to(self.embed_sum.dtype)
        if self.restart_threshold > 0:
            self.code_usage[mask] = self.restart_threshold

    # ---- usage metrics -------------------------------------------------------------------
    @torch.no_grad()
    def _track(self, idx: torch.Tensor, hist: torch.Tensor | None = None) -> dict:
        if hist is None:
            hist = torch.bincount(idx, minlength=self.codebook_size).float()
        p = hist / hist.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        if self.training and self.usage_window > 0:
            self._counts[self._slot] = hist.to(torch.int32)
            self._slot = (self._slot + 1) % self.usage_window
        return {"usage": self.usage(), "perplexity": perplexity}

    def usage(self) -> torch.Tensor:
        """Fraction of codes picked at least once in the last ``usage_window`` training batches."""
        return (self._counts.sum(0) > 0).float().mean()

    @torch.no_grad()
    def usage_stats(self) -> dict:
        """Rolling codebook metrics over the last ``usage_window`` training batches (for logging).

        ``usage``: fraction of the K codes picked at least once; ``perplexity``:
        ``exp(H(p))`` of the pooled assignment histogram ``p`` (K for uniform use, 1 for a single
        code; 1 before any training batch). Returns Python floats.
        """
        tot = self._counts.sum(0, dtype=torch.float64)
        p = tot / tot.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        return {"usage": float((tot > 0).float().mean()), "perplexity": float(perplexity)}

    def reset_usage(self) -> None:
        self._counts.zero_()
        self._slot = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kmeans_done_cache = False  # re-read the loaded flag on the next training forward

    def extra_repr(self) -> str:
        s = (f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, "
             f"l2_norm={self.l2_norm}, entropy_weight={self.entropy_weight}, legacy={self.legacy}")
        if self.ema:
            s += f", ema_decay={self.ema_decay}"
        if self.kmeans_init:
            s += f", kmeans_iters={self.kmeans_iters}"
        if self.restart_threshold > 0:
            s += f", restart_threshold={self.restart_threshold}, restart_every={self.restart_every}"
        return s
