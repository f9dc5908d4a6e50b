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
