"""The generator interface: (tokens | condition) -> tokens.

A generator is an ordering / attention scheme (the paper's idea) times a token embedding and
an output head chosen by ``spec.kind``. It is built from ``(spec, conditioning)`` and raises
:class:`zoo.tokens.IncompatibleTokens` at construction when its scheme cannot take the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from generators.sampling import check_sampling_field
from zoo.module import ZooModule
from zoo.tokens import Tokens, TokenSpec, expect_tokens


@dataclass
class Condition:
    """What a sample is conditioned on; either part may be ``None`` (= the null condition).

    ``labels``: (B,) int64 class ids; ``-1`` marks the null class for that row.
    ``text``:   (B, L) int64 word ids from ``zoo.data.text`` (0 = padding; an all-padding
                row is the null caption).
    ``batch``:  the batch size of an unconditional request (``Condition(batch=8)``); ignored
                when labels or text are given.
    """

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    batch: int | None = None

    @property
    def batch_size(self) -> int:
        for t in (self.labels, self.text):
            if t is not None:
                return t.shape[0]
        if self.batch is None:
            raise ValueError("an empty Condition has no batch size; pass labels, text or batch=B")
        return int(self.batch)

    def to(self, device) -> "Condition":
        return Condition(*(None if t is None else t.to(device) for t in (self.labels, self.text)), self.batch)

    def __getitem__(self, idx) -> "Condition":
        if self.labels is None and self.text is None:
            return Condition(batch=len(range(self.batch_size)[idx]))
        return Condition(*(None if t is None else t[idx] for t in (self.labels, self.text)))

    @staticmethod
    def cat(items) -> "Condition":
        items = list(items)
        def c(attr):
            vals = [getattr(i, attr) for i in items]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditions with and without {attr}")
            return torch.cat(vals)
        return Condition(c("labels"), c("text"))


@dataclass
class SamplingConfig:
    """Sampling knobs shared by every generator.

    CFG is always ``u + s·(c − u)`` (VAR's ``(1+t)c − t·u`` is ``s = 1 + t``).
    ``cfg_schedule``: ``constant`` | ``linear`` (s ramps from 1 to ``cfg`` over the steps, as
    VAR/MAR/xAR do). ``top_k=0`` and ``top_p=1`` disable the filters. ``cfg`` is any finite
    float (0 = unconditional, < 0 guides away from the condition); ``temperature >= 0``
    (0 = greedy); float knobs in ``extra`` must be finite.
    """

    cfg: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    extra: dict = field(default_factory=dict)  # scheme-specific knobs (e.g. num_steps)

    def __setattr__(self, name, value):
        # Checked on every assignment, construction included, so a config changed after it was
        # built is checked too (generators read the fields directly): NaN / inf / wrong types
        # raise ValueError naming the field (generators.sampling.check_sampling_field).
        super().__setattr__(name, check_sampling_field(name, value))

    def cfg_at(self, step: int, num_steps: int) -> float:
        if self.cfg_schedule == "constant" or num_steps <= 1:
            return self.cfg
        return 1.0 + (self.cfg - 1.0) * step / (num_steps - 1)


class Generator(ZooModule):
    """Subclasses set ``self.spec`` and implement ``loss`` and ``generate``.

    ``loss(tokens, cond) -> dict`` with ``"loss"`` the scalar to back-propagate.
    ``generate(cond, sampling, generator) -> Tokens`` of ``self.spec``; ``generator`` is a
    seeded ``torch.Generator`` so the same seed gives the same tokens.
    """

    spec: TokenSpec
    #: the ``SamplingConfig.extra`` keys this scheme reads; any other key is refused, so a typo
    #: or a knob of another generator is not silently ignored
    extra_keys: tuple = ()
    # Optional ``trunk``: the dotted name of the network whose calls count as forward steps in
    # ``eval.bench`` (not declared here: a class attribute would shadow a submodule so named).

    def loss(self, tokens: Tokens, cond: Condition) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, cond: Condition, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tokens:
        raise NotImplementedError

    def forward(self, tokens: Tokens, cond: Condition) -> dict:
        return self.loss(tokens, cond)

    def sampling_config(self, sampling: SamplingConfig | None) -> SamplingConfig:
        """``sampling`` (default: ``SamplingConfig()``), its ``extra`` keys checked against
        :attr:`extra_keys`."""
        sampling = SamplingConfig() if sampling is None else sampling
        unknown = sorted(set(sampling.extra) - set(self.extra_keys))
        if unknown:
            name = self.registry_name or type(self).__name__
            takes = ", ".join(self.extra_keys) or "none"
            raise ValueError(f"{name}: SamplingConfig.extra keys {unknown} are not used by this generator "
                             f"(it takes: {takes})")
        return sampling

    def example_condition(self, batch: int = 2, generator: torch.Generator | None = None) -> Condition:
        """A random valid condition for this generator (class ids and/or word ids)."""
        cfg = self.config
        labels = text = None
        if cfg.get("num_classes"):
            labels = torch.randint(0, cfg["num_classes"], (batch,), generator=generator)
        if cfg.get("text_vocab_size"):
            text = torch.randint(1, cfg["text_vocab_size"], (batch, cfg.get("text_len", 16)), generator=generator)
        return Condition(labels, text)

    def check_tokens(self, tokens: Tokens) -> Tokens:
        return expect_tokens(tokens, self.spec, self.registry_name or type(self).__name__)
