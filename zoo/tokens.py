"""The token contract: the only thing tokenizers and generators share.

A tokenizer says what it emits with a :class:`TokenSpec`; it hands a generator a
:class:`Tokens` (a tensor, or a list of per-scale tensors, plus that spec). A generator is
built from a spec and refuses, at construction, a spec its scheme cannot model
(:class:`IncompatibleTokens`).

Kinds
    ``discrete``   integer ids in ``[0, vocab_size)``; one id per token.
    ``binary``     ``bits`` values in {0, 1} per token; the 2^bits codebook is never
                   materialised -- the bit vector *is* the id (bit ``b`` has weight 2^b,
                   little-endian, see :func:`bits_to_groups`).
    ``continuous`` ``dim`` finite floats per token.

Layouts
    ``grid``      ``shape=(h, w)``; data ``(B, h, w, *per_token)``.
    ``sequence``  ``shape=(n,)``; data ``(B, n, *per_token)``; ``ordered=True`` when every
                  prefix is meaningful (coarse-to-fine 1D tokenizers).
    ``pyramid``   ``shape=((h1, w1), ..., (hS, wS))``; data is a list of ``S`` tensors
                  ``(B, h_s, w_s, *per_token)`` (VAR-style residual scales).

``per_token`` is ``()`` for discrete, ``(bits,)`` for binary and ``(dim,)`` for continuous.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

KINDS = ("discrete", "binary", "continuous")
LAYOUTS = ("grid", "sequence", "pyramid")


class TokenError(ValueError):
    """Tokens that do not match their spec (shape, dtype, value range)."""


class IncompatibleTokens(TypeError):
    """A generator (or other consumer) cannot take the tokens a tokenizer emits."""


@dataclass(frozen=True)
class TokenSpec:
    kind: str
    layout: str
    shape: tuple
    vocab_size: int | None = None
    bits: int | None = None
    dim: int | None = None
    ordered: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TokenError(f"TokenSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.layout not in LAYOUTS:
            raise TokenError(f"TokenSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        # Normalise shapes to tuples of ints (JSON round trips give lists).
        if self.layout == "pyramid":
            shape = tuple(tuple(int(v) for v in s) for s in self.shape)
            if not shape or any(len(s) != 2 or min(s) < 1 for s in shape):
                raise TokenError(f"pyramid shape must be a non-empty list of (h, w), got {self.shape!r}")
        else:
            shape = tuple(int(v) for v in self.shape)
            want = 2 if self.layout == "grid" else 1
            if len(shape) != want or min(shape) < 1:
                raise TokenError(f"{self.layout} shape must have {want} positive dims, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        need = {"discrete": "vocab_size", "binary": "bits", "continuous": "dim"}[self.kind]
        val = getattr(self, need)
        if val is None or int(val) < 1:
            raise TokenError(f"a {self.kind} TokenSpec needs a positive {need}, got {val!r}")
        if self.kind == "discrete" and int(val) < 2:
            raise TokenError(f"vocab_size must be >= 2, got {val}")
        if self.ordered and self.layout != "sequence":
            raise TokenError("ordered=True is only meaningful for the sequence layout")

    # ---- derived facts -------------------------------------------------------------
    @property
    def per_token(self) -> tuple:
        """Trailing per-token dims of the data tensor."""
        return {"discrete": (), "binary": (self.bits,), "continuous": (self.dim,)}[self.kind]

    @property
    def scales(self) -> tuple:
        """Per-scale (h, w); a grid is one scale, a sequence has none."""
        if self.layout == "pyramid":
            return self.shape
        if self.layout == "grid":
            return (self.shape,)
        raise TokenError("a sequence spec has no spatial scales")

    @property
    def num_tokens(self) -> int:
        if self.layout == "pyramid":
            return sum(h * w for h, w in self.shape)
        return math.prod(self.shape)

    @property
    def scale_offsets(self) -> tuple:
        """Start of each scale in the flat sequence, plus the total at the end."""
        sizes = [h * w for h, w in self.scales]
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        return tuple(offs)

    def as_sequence(self) -> "TokenSpec":
        """The spec of the flat (row-major, scale after scale) sequence."""
        return dataclasses.replace(self, layout="sequence", shape=(self.num_tokens,),
                                   ordered=self.ordered if self.layout == "sequence" else False)

    def describe(self) -> str:
        size = {"discrete": f"V={self.vocab_size}", "binary": f"K={self.bits}bit",
                "continuous": f"D={self.dim}"}[self.kind]
        if self.layout == "pyramid":
            shp = "+".join(f"{h}x{w}" if h != w else f"{h}²" for h, w in self.shape)
        else:
            shp = "x".join(str(v) for v in self.shape)
        return f"{self.kind}/{self.layout}{'(ordered)' if self.ordered else ''} {shp} {size}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = [list(s) for s in self.shape] if self.layout == "pyramid" else list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenSpec":
        return cls(**d)

    def require(self, *, kind=None, layout=None, ordered=None, who: str = "this generator",
                source: str = "the tokenizer") -> None:
        """Raise :class:`IncompatibleTokens` naming both sides unless the spec fits."""
        problems = []
        if kind is not None and self.kind not in _as_tuple(kind):
            problems.append(f"token kind {self.kind!r} (needs {' or '.join(_as_tuple(kind))})")
        if layout is not None and self.layout not in _as_tuple(layout):
            problems.append(f"layout {self.layout!r} (needs {' or '.join(_as_tuple(layout))})")
        if ordered and not self.ordered:
            problems.append("unordered tokens (needs a coarse-to-fine ordered sequence)")
        if problems:
            raise IncompatibleTokens(f"{who} cannot take the tokens of {source} [{self.describe()}]: "
                                     + "; ".join(problems))


def _as_tuple(x) -> tuple:
    return (x,) if isinstance(x, str) else tuple(x)


class Tokens:
    """A batch of tokens plus its spec, validated on construction.

    ``data`` is one tensor for ``grid``/``sequence`` and a list of per-scale tensors for
    ``pyramid`` (see the module docstring for shapes).
    """

    def __init__(self, data: torch.Tensor | Sequence[torch.Tensor], spec: TokenSpec, *,
                 validate: bool = True):
        if not isinstance(spec, TokenSpec):
            raise TokenError(f"spec must be a TokenSpec, got {type(spec).__name__}")
        self.spec = spec
        if spec.layout == "pyramid":
            if isinstance(data, torch.Tensor):
                raise TokenError("pyramid tokens take a list of per-scale tensors, got one tensor "
                                 "(use Tokens.from_sequence for a flat sequence)")
            self.data = list(data)
        else:
            if not isinstance(data, torch.Tensor):
                raise TokenError(f"{spec.layout} tokens take one tensor, got {type(data).__name__}")
            self.data = data
        if validate:
            self.validate()

    # ---- validation --------------------------------------------------------------
    def _tensors(self) -> list:
        return self.data if self.spec.layout == "pyramid" else [self.data]

    def validate(self) -> "Tokens":
        spec = self.spec
        if spec.layout == "pyramid" and len(self.data) != len(spec.shape):
            raise TokenError(f"expected {len(spec.shape)} scales {list(spec.shape)}, got {len(self.data)}")
        batch = None
        for i, t in enumerate(self._tensors()):
            where = f" at scale {i}" if spec.layout == "pyramid" else ""
            if not isinstance(t, torch.Tensor):
                raise TokenError(f"expected a tensor{where}, got {type(t).__name__}")
            if spec.layout == "pyramid":
                tok_shape = spec.shape[i]
            else:
                tok_shape = spec.shape
            want = (*tok_shape, *spec.per_token)
            if t.dim() != 1 + len(want) or tuple(t.shape[1:]) != want:
                raise TokenError(f"{spec.kind} {spec.layout} tokens{where}: expected shape "
                                 f"(B, {', '.join(map(str, want))}), got {tuple(t.shape)}")
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise TokenError(f"scales disagree on batch size: {batch} vs {t.shape[0]}{where}")
            self._check_values(t, where)
        return self

    def _check_values(self, t: torch.Tensor, where: str) -> None:
        spec = self.spec
        if spec.kind == "discrete":
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TokenError(f"discrete tokens{where} must be integer ids, got dtype {t.dtype}")
            if t.numel():
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= spec.vocab_size:
                    raise TokenError(f"discrete ids{where} must lie in [0, {spec.vocab_size}), "
                                     f"got values in [{lo}, {hi}]")
        elif spec.kind == "binary":
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise TokenError(f"binary tokens{where} must be bool or integer bits, got dtype {t.dtype}")
            if t.dtype != torch.bool and t.numel() and bool(((t != 0) & (t != 1)).any()):
                bad = t[(t != 0) & (t != 1)][0].item()
                raise TokenError(f"binary tokens{where} must be bits in {{0, 1}}, found {bad}")
        else:
            if not t.dtype.is_floating_point:
                raise TokenError(f"continuous tokens{where} must be floating point, got dtype {t.dtype}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise TokenError(f"continuous tokens{where} must be finite, found NaN or inf")

    # ---- layout conversion (lossless) --------------------------------------------
    def to_sequence(self) -> "Tokens":
        """Grid -> row-major sequence; pyramid -> scales concatenated (see scale_offsets)."""
        spec = self.spec
        if spec.layout == "sequence":
            return self
        pt = spec.per_token
        parts = [t.reshape(t.shape[0], -1, *pt) for t in self._tensors()]
        return Tokens(torch.cat(parts, 1) if len(parts) > 1 else parts[0], spec.as_sequence(),
                      validate=False)

    @classmethod
    def from_sequence(cls, seq: torch.Tensor, spec: TokenSpec, *, validate: bool = True) -> "Tokens":
        """Inverse of :meth:`to_sequence` for a grid or pyramid ``spec``."""
        if spec.layout == "sequence":
            return cls(seq, spec, validate=validate)
        if seq.dim() < 2 or seq.shape[1] != spec.num_tokens:
            raise TokenError(f"a flat sequence for {spec.describe()} needs shape (B, {spec.num_tokens}, ...), "
                             f"got {tuple(seq.shape)}")
        pt = spec.per_token
        offs = spec.scale_offsets
        parts = [seq[:, offs[i]:offs[i + 1]].reshape(seq.shape[0], h, w, *pt)
                 for i, (h, w) in enumerate(spec.scales)]
        return cls(parts[0] if spec.layout == "grid" else parts, spec, validate=validate)

    # ---- batch ops -----------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._tensors()[0].shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def _map(self, fn) -> "Tokens":
        if self.spec.layout == "pyramid":
            return Tokens([fn(t) for t in self.data], self.spec, validate=False)
        return Tokens(fn(self.data), self.spec, validate=False)

    def __getitem__(self, idx) -> "Tokens":
        """Index the batch dimension (int, slice, index tensor or bool mask)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return self._map(lambda t: t[idx])

    def to(self, *args, **kwargs) -> "Tokens":
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence["Tokens"]) -> "Tokens":
        items = list(items)
        if not items:
            raise TokenError("Tokens.cat needs at least one Tokens")
        spec = items[0].spec
        for it in items[1:]:
            if it.spec != spec:
                raise TokenError(f"cannot concatenate tokens of different specs: {spec.describe()} vs "
                                 f"{it.spec.describe()}")
        if spec.layout == "pyramid":
            return Tokens([torch.cat([it.data[s] for it in items]) for s in range(len(spec.shape))],
                          spec, validate=False)
        return Tokens(torch.cat([it.data for it in items]), spec, validate=False)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Tokens) or other.spec != self.spec:
            return False
        return all(a.shape == b.shape and bool((a == b).all())
                   for a, b in zip(self._tensors(), other._tensors()))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Tokens(B={self.batch_size}, {self.spec.describe()})"


def expect_tokens(tokens, spec: TokenSpec, who: str) -> Tokens:
    """Return ``tokens`` if they are :class:`Tokens` of exactly ``spec``; else a ValueError naming ``who``."""
    if not isinstance(tokens, Tokens) or tokens.spec != spec:
        got = tokens.spec.describe() if isinstance(tokens, Tokens) else type(tokens).__name__
        raise ValueError(f"{who} expects tokens [{spec.describe()}], got [{got}]")
    return tokens


def random_tokens(spec: TokenSpec, batch: int, generator: torch.Generator | None = None) -> Tokens:
    """Valid random tokens of ``spec`` (for tests, benchmarks and shape checks)."""
    shapes = [(batch, h, w, *spec.per_token) for h, w in spec.scales] if spec.layout != "sequence" \
        else [(batch, *spec.shape, *spec.per_token)]

    def one(shape):
        if spec.kind == "discrete":
            return torch.randint(0, spec.vocab_size, shape, generator=generator)
        if spec.kind == "binary":
            return torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8)
        return torch.randn(shape, generator=generator)

    parts = [one(s) for s in shapes]
    return Tokens(parts if spec.layout == "pyramid" else parts[0], spec)


def bits_to_groups(bits: torch.Tensor, group: int) -> torch.Tensor:
    """(..., K) bits -> (..., K // group) group ids; bit ``b`` of a group has weight 2^b."""
    K = bits.shape[-1]
    if K % group:
        raise TokenError(f"{K} bits do not split into groups of {group}")
    if group > 62:
        raise TokenError("a group id must fit in int64 (group <= 62 bits)")
    w = (2 ** torch.arange(group, device=bits.device, dtype=torch.int64))
    return (bits.reshape(*bits.shape[:-1], K // group, group).long() * w).sum(-1)


def groups_to_bits(ids: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`bits_to_groups`: (..., G) ids -> (..., G * group) bits (uint8)."""
    w = (2 ** torch.arange(group, device=ids.device, dtype=torch.int64))
    bits = (ids.long().unsqueeze(-1) // w) % 2
    return bits.reshape(*ids.shape[:-1], ids.shape[-1] * group).to(torch.uint8)


def spec_from_json(obj: Any) -> Any:
    """Rebuild TokenSpecs inside a JSON-loaded config (marked by ``__tokenspec__``)."""
    if isinstance(obj, dict):
        if obj.get("__tokenspec__"):
            return TokenSpec.from_dict({k: v for k, v in obj.items() if k != "__tokenspec__"})
        return {k: spec_from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [spec_from_json(v) for v in obj]
    return obj


def spec_to_json(obj: Any) -> Any:
    """Make a config JSON-safe, marking TokenSpecs so :func:`spec_from_json` can rebuild them."""
    if isinstance(obj, TokenSpec):
        return {"__tokenspec__": True, **obj.to_dict()}
    if isinstance(obj, dict):
        return {k: spec_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [spec_to_json(v) for v in obj]
    return obj
