"""Small toy models registered by tests that need the registry without real models."""
import contextlib

import torch
import torch.nn as nn

from generators.base import Condition, Generator
from tokenizers_vis.base import Tokenizer
from zoo import registry
from zoo.tokens import Tokens, TokenSpec


class ToyTokenizer(Tokenizer):
    """4x4 patches -> argmax over a linear projection; decode by a table."""

    def __init__(self, image_size: int = 8, vocab: int = 16, spec_layout: str = "grid"):
        super().__init__()
        self.image_size = image_size
        n = image_size // 4
        self.spec = TokenSpec("discrete", "grid", (n, n), vocab_size=vocab) if spec_layout == "grid" \
            else TokenSpec("discrete", "sequence", (n * n,), vocab_size=vocab)
        self.proj = nn.Conv2d(3, vocab, 4, 4)
        self.table = nn.Embedding(vocab, 48)

    def encode(self, images):
        ids = self.proj(self.check_images(images)).argmax(1)
        return Tokens(ids if self.spec.layout == "grid" else ids.flatten(1), self.spec)

    def decode(self, tokens):
        ids = self.check_tokens(tokens).data.reshape(tokens.batch_size, -1)
        n = self.image_size // 4
        x = self.table(ids).reshape(-1, n, n, 3, 4, 4).permute(0, 3, 1, 4, 2, 5)
        return torch.tanh(x.reshape(-1, 3, self.image_size, self.image_size))

    def forward(self, images):
        soft = self.proj(self.check_images(images)).softmax(1)
        n = self.image_size // 4
        x = torch.einsum("bvhw,vd->bhwd", soft, self.table.weight).reshape(-1, n, n, 3, 4, 4)
        recon = torch.tanh(x.permute(0, 3, 1, 4, 2, 5).reshape(images.shape))
        loss = (recon - images).pow(2).mean()
        return recon, {"loss": loss, "rec": loss.detach()}


class ToyGenerator(Generator):
    """Independent per-position categorical conditioned on a class: enough for plumbing tests."""

    def __init__(self, spec: TokenSpec = TokenSpec("discrete", "grid", (2, 2), vocab_size=16),
                 num_classes: int = 4):
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(num_classes + 1, spec.num_tokens * spec.vocab_size)
        self.num_classes = num_classes

    def _logits(self, labels):
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return self.emb(labels).reshape(-1, self.spec.num_tokens, self.spec.vocab_size)

    def loss(self, tokens, cond):
        ids = self.check_tokens(tokens).to_sequence().data
        loss = nn.functional.cross_entropy(self._logits(cond.labels).transpose(1, 2), ids)
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, cond, sampling=None, generator=None):
        probs = self._logits(cond.labels).softmax(-1)
        ids = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).reshape(probs.shape[:2])
        return Tokens.from_sequence(ids, self.spec)


@contextlib.contextmanager
def toy_registry():
    """Register toy-tokenizer-tiny / toy-generator-tiny for the duration of a block."""
    names = ["tokenizer/toy-tiny", "generator/toy-tiny", "generator/toy-big"]
    registry._ensure_loaded()
    registry.register(names[0], paper="none (test toy)")(lambda **kw: ToyTokenizer(**kw))
    registry.register(names[1], paper="none (test toy)")(lambda **kw: ToyGenerator(**kw))
    registry.register(names[2], paper_params=5 * 4 * 16)(lambda **kw: ToyGenerator(**{"num_classes": 4, **kw}))
    try:
        yield names
    finally:
        for n in names:
            registry.unregister(n)


class ToyOrderedTokenizer(Tokenizer):
    """A coarse-to-fine ordered 1D tokenizer with FlexTok's prefix interface (search tests).

    ``decode_prefix(ids (B, k))``: ``tanh(sum_i 0.5**i * table[ids_i])`` -- token ``i`` moves the
    image half as much as token ``i - 1``, so any prefix decodes to a whole (coarser) image;
    deterministic (``generator`` is accepted and unused). ``encode`` picks the tokens greedily.
    """

    def __init__(self, num_tokens: int = 8, vocab: int = 16, image_size: int = 8):
        super().__init__()
        self.image_size = image_size
        self.spec = TokenSpec("discrete", "sequence", (num_tokens,), vocab_size=vocab, ordered=True)
        self.table = nn.Embedding(vocab, 3 * image_size * image_size)
        nn.init.normal_(self.table.weight, std=0.7)

    def _weights(self, k: int) -> torch.Tensor:
        return 0.5 ** torch.arange(k, dtype=self.table.weight.dtype, device=self.table.weight.device)

    def decode_prefix(self, ids: torch.Tensor, generator=None) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.table.weight.device).long()
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= self.spec.num_tokens:
            raise ValueError(f"decode_prefix takes (B, k) ids with 1 <= k <= {self.spec.num_tokens}, "
                             f"got {tuple(ids.shape)}")
        x = (self.table(ids) * self._weights(ids.shape[1])[None, :, None]).sum(1)
        return torch.tanh(x).reshape(-1, 3, self.image_size, self.image_size)

    def decode(self, tokens):
        return self.decode_prefix(self.check_tokens(tokens).data)

    def encode(self, images):
        res = torch.atanh(self.check_images(images).clamp(-0.999, 0.999)).flatten(1)
        ids = []
        for w in self._weights(self.spec.num_tokens):
            d = ((res[:, None, :] - w * self.table.weight[None]) ** 2).sum(-1)
            v = d.argmin(1)
            ids.append(v)
            res = res - w * self.table.weight[v]
        return Tokens(torch.stack(ids, 1), self.spec)

    def forward(self, images):
        recon = self.decode(self.encode(images))
        loss = (recon - images).pow(2).mean()
        return recon, {"loss": loss, "rec": loss.detach()}


def tiny_raster_ar(spec: TokenSpec, text: bool = True, seed: int = 0, std: float = 0.3):
    """A small RasterAR with random (non-zero) weights for search tests: captions when ``text``."""
    from generators.raster_ar import RasterAR
    from zoo.data import text as T

    torch.manual_seed(seed)
    m = RasterAR(spec, num_classes=None if text else 4, text_vocab_size=T.vocab_size() if text else None,
                 text_len=16, dim=32, depth=1, heads=2, ffn_multiple=16, text_depth=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the LlamaGen init zeroes the head; random weights make the prior non-uniform
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return m.eval()


@contextlib.contextmanager
def search_toy_registry():
    """Register an ordered toy tokenizer, a grid toy tokenizer and a tiny caption RasterAR
    (``generator/test-search-ar-tiny``, built for whatever spec it is given) for a block."""
    names = ["tokenizer/test-search-ordered-tiny", "tokenizer/test-search-grid-tiny", "generator/test-search-ar-tiny"]
    registry._ensure_loaded()
    registry.register(names[0], paper="none (test toy)")(lambda **kw: ToyOrderedTokenizer(**kw))
    registry.register(names[1], paper="none (test toy)")(lambda **kw: ToyTokenizer(**kw))
    registry.register(names[2], paper="none (test toy)")(
        lambda spec=TokenSpec("discrete", "sequence", (8,), vocab_size=16, ordered=True), **kw: tiny_raster_ar(spec, **kw))
    try:
        yield names
    finally:
        for n in names:
            registry.unregister(n)
