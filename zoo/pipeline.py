"""`Pipeline(tokenizer, generator)`: a condition in, images out.

The last two arrows of the job (DESIGN.md, "Flow of one job"): a generator samples
:class:`zoo.tokens.Tokens` for class ids or prompts, the tokenizer decodes them to images.
The pair is checked through the token contract when the pipeline is built, so a mismatch is
reported once, naming both models, instead of failing inside ``decode``.

Determinism
    The Generator API takes one ``torch.Generator`` per ``generate`` call, so the randomness
    of a batch cannot be split into independent per-sample streams from outside the model.
    The guarantee is therefore: **same (seed, batch_size, device, conditions) -> identical
    images.** Batch ``b`` (samples ``b*batch_size ...``) runs with a ``torch.Generator``
    seeded from ``(seed, b*batch_size)`` (see :func:`batch_seed`); with ``batch_size=1``
    sample ``i`` depends only on ``(seed, i, its condition)``, so any single sample can be
    regenerated alone. Changing ``batch_size`` changes the images (and on GPU even
    per-sample random streams would not make results batch-size invariant: kernels pick
    different reduction orders for different batch sizes). CPU and CUDA give different
    images for the same seed.

Random-init models built from registry names are initialised under a fixed seed
(``init_seed``), so two ``Pipeline.load`` calls with the same names build the same weights.
A registry name without ``:tag`` means random weights: :func:`load_model` warns
(:class:`RandomWeightsWarning`) and every model it returns carries ``pretrained_source``, the
weights folder it was loaded from, or ``None`` for random weights.

Tokenizer pairing
    The token spec only says the shape of the tokens: two tokenizers with the same spec
    (tokenflow-tiny and msvq-tiny) still mean different things by the same id. A generator
    checkpoint records the tokenizer it was trained on (``generator.trained_on``: name and
    ``zoo.checkpoint.fingerprint``); ``Pipeline`` refuses another tokenizer unless
    ``allow_tokenizer_mismatch=True`` (then it warns). A generator without the record
    (random init, or a checkpoint from before it existed) is not checked.
"""
from __future__ import annotations

import hashlib
import numbers
import warnings
from pathlib import Path
from typing import Sequence

import torch

from zoo.module import ZooModule
from zoo.tokens import IncompatibleTokens

__all__ = ["Pipeline", "load_model", "model_name", "batch_seed", "to_uint8", "to_pil",
           "class_conditioning", "text_conditioning", "RandomWeightsWarning", "random_weights_note"]


class RandomWeightsWarning(UserWarning):
    """A model was built from a registry name without ``:tag``: its weights are random."""


def model_name(model) -> str:
    """Registry name of a model, else its class name (for messages)."""
    return getattr(model, "registry_name", None) or type(model).__name__


def batch_seed(seed: int, start: int) -> int:
    """A 63-bit torch seed from ``(seed, index of the batch's first sample)``.

    A hash rather than ``seed + start`` so that neighbouring seeds do not share streams
    (seed 0 batch 64 vs seed 64 batch 0); blake2b is stable across platforms and versions.
    """
    h = hashlib.blake2b(f"arzoo:{int(seed)}:{int(start)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 on the CPU (the ADM npz layout)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoded images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def to_pil(images: torch.Tensor) -> list:
    """(N, H, W, 3) uint8 -> list of ``PIL.Image``."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return [Image.fromarray(a) for a in images.cpu().numpy()]


# ---- conditioning capabilities ---------------------------------------------------------
def class_conditioning(generator) -> int:
    """Number of classes the generator is conditioned on (0 = not class-conditional)."""
    n = generator.config.get("num_classes", getattr(generator, "num_classes", 0))
    return int(n or 0)


def text_conditioning(generator) -> tuple[int, int]:
    """``(text_vocab_size, text_len)``; ``(0, 0)`` when the generator takes no text."""
    cfg = generator.config
    vocab = int(cfg.get("text_vocab_size", getattr(generator, "text_vocab_size", 0)) or 0)
    if not vocab:
        return 0, 0
    return vocab, int(cfg.get("text_len", getattr(generator, "text_len", 16)) or 16)


# ---- loading ---------------------------------------------------------------------------
def load_model(source, kind: str, *, init_seed: int = 0, map_location="cpu", **overrides):
    """A tokenizer or generator from a checkpoint folder, a registry name or ``name:tag``.

    ``kind`` is ``"tokenizer"`` or ``"generator"``: a bare name without ``/`` gets that
    prefix (``vq-tiny`` -> ``tokenizer/vq-tiny``), and the result must be of that kind.
    ``overrides`` go to the registry factory (random init only; ``spec=`` is dropped for a
    factory that does not take it). A model passed in is returned as it is.

    A name without ``:tag`` builds random weights and warns (:class:`RandomWeightsWarning`).
    The model's ``pretrained_source`` is the folder its weights came from, or ``None``.
    """
    import zoo
    from zoo.checkpoint import load_pretrained
    from zoo.registry import resolve_weights

    if isinstance(source, torch.nn.Module):
        model = source
    else:
        src = str(source)
        path = Path(src)
        from zoo import hub

        if hub.is_hub_ref(src):
            model = hub.load(src, map_location=map_location)
        elif path.is_dir():
            model = load_pretrained(path, map_location=map_location)
            model.pretrained_source = str(path)
        elif path.exists():
            raise ValueError(f"{kind} {src!r} is a file; expected a checkpoint folder (config.json + "
                             f"model.safetensors), a registry name or name:tag")
        else:
            name, sep, tag = src.partition(":")
            if "/" not in name:
                name = f"{kind}/{name}"
            elif name.split("/", 1)[0] not in ("tokenizer", "generator"):
                raise ValueError(f"{kind} {src!r}: no such checkpoint folder, and not a registry name "
                                 f"('{kind}/<model>' or '{kind}/<model>:<weights tag>')")
            if sep and not tag:
                raise ValueError(f"{kind} {src!r}: empty weights tag after ':' "
                                 f"(available: {_tags(name)}; drop the ':' for random weights)")
            if tag:
                model = zoo.create(name, pretrained=tag)
                model.pretrained_source = str(resolve_weights(name, tag))
            else:
                model = _create_random(name, init_seed, overrides)
                model.pretrained_source = None
                warnings.warn(random_weights_note(model), RandomWeightsWarning, stacklevel=2)
    _check_kind(model, kind, source)
    return model


def _tags(name: str) -> str:
    from zoo.registry import entry

    return ", ".join(entry(name).weights) or "none shipped"


def random_weights_note(model) -> str | None:
    """The one-line warning for a model :func:`load_model` built with random weights, else None."""
    if not hasattr(model, "pretrained_source") or model.pretrained_source is not None:
        return None
    name = model_name(model)
    return f"{name}: RANDOM weights (no :tag given; available tags: {_tags(name)})"


def _create_random(name: str, init_seed: int, overrides: dict):
    import zoo

    # fork_rng: a fixed init seed without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            return zoo.create(name, **overrides)
        except TypeError as e:
            if "spec" in overrides and "spec" in str(e) and "unexpected keyword" in str(e):
                torch.manual_seed(init_seed)
                return zoo.create(name, **{k: v for k, v in overrides.items() if k != "spec"})
            raise


def _check_kind(model, kind: str, source) -> None:
    from generators.base import Generator
    from tokenizers_vis.base import Tokenizer

    want = {"tokenizer": Tokenizer, "generator": Generator}[kind]
    if not isinstance(model, want):
        raise ValueError(f"expected a {kind} for {source!r}, got a {type(model).__name__} "
                        f"({model_name(model)})")


def _check_trained_on(tokenizer, generator, allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) a generator trained on another tokenizer's tokens."""
    rec = getattr(generator, "trained_on", None)
    if rec is None:  # random init or an older checkpoint: nothing to compare
        return
    from zoo.checkpoint import fingerprint

    have = fingerprint(tokenizer)
    if rec["fingerprint"] == have:
        return
    msg = (f"generator {model_name(generator)} was trained on the tokens of tokenizer "
           f"{rec.get('name') or '(unnamed)'} (fingerprint {rec['fingerprint']}), not on those of tokenizer "
           f"{model_name(tokenizer)} (fingerprint {have}): same token shape, different meaning")
    if not allow:
        raise IncompatibleTokens(f"{msg}; pass allow_tokenizer_mismatch=True (arzoo sample: "
                                 f"--allow-tokenizer-mismatch) to pair them anyway")
    warnings.warn(msg, stacklevel=3)


# ---- the pipeline ------------------------------------------------------------------------
class Pipeline:
    """Tokenizer + generator: class ids or prompts in, uint8 images / PIL images out.

    ``Pipeline(tokenizer, generator)`` refuses (``IncompatibleTokens``) a generator whose
    token spec differs from the tokenizer's, or that was trained on another tokenizer's tokens
    (unless ``allow_tokenizer_mismatch=True``; module docstring). See the module docstring for
    the seeding rule.
    """

    def __init__(self, tokenizer, generator, device=None, *, allow_tokenizer_mismatch: bool = False):
        _check_kind(tokenizer, "tokenizer", model_name(tokenizer))
        _check_kind(generator, "generator", model_name(generator))
        tspec, gspec = getattr(tokenizer, "spec", None), getattr(generator, "spec", None)
        if gspec != tspec:
            raise IncompatibleTokens(
                f"generator {model_name(generator)} [{gspec.describe() if gspec else gspec}] cannot "
                f"take the tokens of tokenizer {model_name(tokenizer)} "
                f"[{tspec.describe() if tspec else tspec}]: the token specs differ")
        _check_trained_on(tokenizer, generator, allow_tokenizer_mismatch)
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        if device is not None:
            self.to(device)

    @classmethod
    def load(cls, tokenizer, generator, *, device=None, init_seed: int = 0,
             allow_tokenizer_mismatch: bool = False) -> "Pipeline":
        """Each of ``tokenizer`` / ``generator``: a checkpoint folder, a registry name or
        ``name:tag`` (shipped weights). A random-init generator is built for the tokenizer's
        spec (``zoo.create(name, spec=tokenizer.spec)``)."""
        tok = load_model(tokenizer, "tokenizer", init_seed=init_seed)
        try:
            gen = load_model(generator, "generator", init_seed=init_seed, spec=tok.spec)
        except IncompatibleTokens as e:
            raise IncompatibleTokens(f"generator {generator!r} cannot be built for tokenizer "
                                     f"{model_name(tok)} [{tok.spec.describe()}]: {e}") from e
        return cls(tok, gen, device=device, allow_tokenizer_mismatch=allow_tokenizer_mismatch)

    # -- device ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for t in (*self.generator.parameters(), *self.generator.buffers()):
            return t.device
        return torch.device("cpu")

    def to(self, device) -> "Pipeline":
        self.tokenizer.to(device)
        self.generator.to(device)
        return self

    # -- conditions ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return class_conditioning(self.generator)

    def make_condition(self, classes=None, prompts=None):
        """A :class:`generators.base.Condition` (on the CPU) for ``classes`` and/or ``prompts``.

        Class ids must lie in ``[0, num_classes)`` (``-1`` = the null class, unconditional);
        prompts are encoded with ``zoo.data.text.encode`` and must use known words only.
        """
        from generators.base import Condition

        if classes is None and prompts is None:
            raise ValueError("pass classes=[...] (class ids) or prompts=[...] (captions)")
        gname = model_name(self.generator)
        labels = text = None
        if classes is not None:
            labels = self._labels(classes, gname)
        if prompts is not None:
            text = self._text(prompts, gname)
        if labels is not None and text is not None and len(labels) != len(text):
            raise ValueError(f"classes and prompts pair up one to one: got {len(labels)} class ids "
                             f"and {len(text)} prompts")
        return Condition(labels, text)

    def _labels(self, classes, gname: str) -> torch.Tensor:
        n = self.num_classes
        if not n:
            raise ValueError(f"{gname} is not class-conditional (its config has no num_classes); "
                             f"pass prompts=... to a text-conditioned generator instead")
        if isinstance(classes, numbers.Integral):
            classes = [classes]
        if isinstance(classes, torch.Tensor):
            if classes.dim() != 1 or classes.dtype.is_floating_point or classes.dtype.is_complex \
                    or classes.dtype == torch.bool:
                raise ValueError(f"classes must be a 1-D sequence of integer class ids, got a "
                                 f"{classes.dtype} tensor of shape {tuple(classes.shape)}")
            classes = classes.tolist()
        try:
            classes = list(classes)
        except TypeError:
            raise ValueError(f"classes must be a sequence of integer class ids, got {classes!r:.100}") from None
        if not classes:
            raise ValueError("classes is empty: pass at least one class id")
        # Checked in Python: torch.as_tensor would take '3' as a char, 2.5 as a float, and
        # overflow on 2**63 with a RuntimeError instead of naming the bad id.
        wrong = [c for c in classes if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if wrong:
            raise ValueError(f"class ids must be integers, got {wrong[0]!r} ({type(wrong[0]).__name__})")
        bad = sorted({int(c) for c in classes if not -1 <= c < n})
        if bad:
            raise ValueError(f"class ids must lie in [0, {n}) for {gname} (or -1 for the null class), "
                             f"got {bad[:10]}")
        return torch.tensor([int(c) for c in classes], dtype=torch.long)

    def _text(self, prompts, gname: str) -> torch.Tensor:
        vocab, text_len = text_conditioning(self.generator)
        if not vocab:
            raise ValueError(f"{gname} takes no text conditioning (its config has no text_vocab_size); "
                             f"pass classes=... to a class-conditional generator instead")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.200}")
        from zoo.data import text as T

        try:
            ids = T.encode(prompts, max_len=text_len)
        except ValueError as e:
            raise ValueError(f"{gname} takes prompts of at most {text_len} words: {e}") from e
        unk = getattr(T, "UNK", None)
        if unk is not None and bool((ids == unk).any()):
            row = int((ids == unk).any(1).nonzero()[0])
            known = set(getattr(T, "WORD_TO_ID", {}))
            words = [w for w in T.tokenize(prompts[row]) if w not in known] if known else ["?"]
            raise ValueError(f"prompt {row} {prompts[row]!r} has words outside the caption vocabulary: "
                             f"{words} (known words: {' '.join(getattr(T, 'VOCAB', [])[2:])})")
        if int(ids.max()) >= vocab:
            raise ValueError(f"{gname} was built for {vocab} word ids but the prompts use id "
                             f"{int(ids.max())}; the checkpoint predates the current vocabulary")
        return ids

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, classes=None, prompts=None, *, sampling=None, seed: int = 0,
                 batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Sample one image per class id / prompt: (N, H, W, 3) uint8 on the CPU.

        Same ``(seed, batch_size)`` on the same device -> identical images (module docstring).
        """
        from generators.base import SamplingConfig

        sampling = SamplingConfig() if sampling is None else sampling
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cond = self.make_condition(classes, prompts)
        n = cond.batch_size
        device = self.device
        out = []
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"sampling {n} images", unit="batch", leave=False)
        for start in starts:
            c = cond[start:start + batch_size].to(device)
            g = torch.Generator(device=device).manual_seed(batch_seed(seed, start))
            tokens = self.generator.generate(c, sampling, generator=g)
            if tokens.batch_size != c.batch_size:
                raise RuntimeError(f"{model_name(self.generator)}.generate returned {tokens.batch_size} "
                                   f"samples for a batch of {c.batch_size}")
            out.append(to_uint8(self.tokenizer.decode(tokens)))
        return torch.cat(out)

    def generate_pil(self, classes=None, prompts=None, **kwargs) -> list:
        """:meth:`generate`, as a list of ``PIL.Image``."""
        return to_pil(self.generate(classes, prompts, **kwargs))

    def describe(self) -> dict:
        return {"tokenizer": model_name(self.tokenizer), "generator": model_name(self.generator),
                "spec": self.tokenizer.spec.describe(), "device": str(self.device)}

    def __repr__(self) -> str:
        d = self.describe()
        return f"Pipeline({d['tokenizer']} -> {d['generator']}, {d['spec']}, {d['device']})"
