"""``python -m eval.bench`` / ``arzoo bench``: the sampling benchmark table.

For each (generator, tokenizer) pair it measures, at one batch size:

forward steps / image
    the number of sequential network forward calls ``generate`` makes to produce a batch
    (every image of the batch shares them). This is the number the papers compare: a raster
    AR model over an h x w grid needs h*w (LlamaGen, Sun et al. 2024: 1 prefill + h*w-1
    cached decodes), NAR (He et al. 2025, §3) h+w-1, VAR/MVAR one per scale. Counted with
    forward pre-hooks (see :func:`count_forward_steps`).
images / s
    ``batch`` images through ``generate`` + ``tokenizer.decode``, timed after one warm-up
    run, mean over ``--repeats`` runs (CUDA synchronised).
peak memory
    CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and timed runs (weights
    included). CPU: growth of the process's peak resident set over the resident set before
    sampling, i.e. the sampling working memory without the loaded weights (Linux: the peak
    ``VmHWM`` is reset through ``/proc/self/clear_refs``; elsewhere the ``ru_maxrss``
    growth, a lower bound). The method is stated in each row.

Random-init weights by default (the timing does not depend on the weights; image quality is
not measured here); ``--pretrained`` loads shipped weights where a model has them. Later
generators add rows by registering a ``generator/*-tiny`` entry; ``--pair G T`` picks pairs
explicitly, ``--grid HxW`` changes the generator's token grid (the tokenizer is kept, so
decoding is skipped when its grid differs; for pyramid tokens ``HxW`` is the top scale and the
scales below follow VAR's 256-px schedule 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 up to it, so
``--grid 16x16`` is VAR-d16's pyramid), ``--batch N`` the batch size.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["count_forward_steps", "ForwardCounter", "default_pairs", "bench_pair", "format_table", "main"]


# ---- forward-step counting -------------------------------------------------------------
class ForwardCounter:
    """Counts forward calls of a generator's network while it samples.

    If the generator names its network in ``generator.trunk`` (a module, or the dotted name
    of a submodule), calls of that module are counted. Otherwise every submodule is hooked
    and the answer is the call count of the *largest called* one (by parameters), where a
    ``ModuleList``/``ModuleDict`` counts as one unit (its size is the sum of its children,
    its calls the most calls of any child): so a stack of blocks looped over by the
    generator itself is recognised as the trunk, and a small head called many times per step
    (a diffusion MLP) or a large-vocabulary embedding is not taken for it.
    """

    def __init__(self, generator: nn.Module):
        self.generator = generator
        self.calls: dict[str, int] = {}
        self._handles = []
        trunk = getattr(generator, "trunk", None)
        if isinstance(trunk, str):
            trunk = generator.get_submodule(trunk)
        self.trunk = trunk if isinstance(trunk, nn.Module) else None

    def __enter__(self) -> "ForwardCounter":
        self.calls.clear()
        if self.trunk is not None:
            mods = [("trunk", self.trunk)]
        else:
            mods = [(n, m) for n, m in self.generator.named_modules() if n]
        for name, mod in mods:
            self.calls[name] = 0
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(module, args):
            self.calls[name] += 1
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> tuple[int, str]:
        """``(forward calls, name of the counted module)``."""
        if self.trunk is not None:
            return self.calls["trunk"], "trunk"
        best = (-1, 0, "")  # (params, calls, name); ties go to the shallower (earlier) name
        for name, mod in self.generator.named_modules():
            if not name:
                continue
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                kids = [f"{name}.{k}" for k, _ in mod.named_children()]
                calls = max((self.calls.get(k, 0) for k in kids), default=0)
                label = f"{name}[*]"
            else:
                calls, label = self.calls.get(name, 0), name
            if calls == 0:
                continue
            params = sum(p.numel() for p in mod.parameters())
            if params > best[0]:
                best = (params, calls, label)
        if best[0] < 0:
            raise RuntimeError(f"{type(self.generator).__name__}.generate called no submodule; set "
                               f"`self.trunk` to the module whose calls are the forward steps")
        return best[1], best[2]


@torch.no_grad()
def count_forward_steps(generator, cond, sampling=None, seed: int = 0) -> tuple[int, str]:
    """Forward calls one ``generator.generate(cond, sampling)`` makes (see :class:`ForwardCounter`)."""
    from generators.base import SamplingConfig

    dev = _device_of(generator)
    with ForwardCounter(generator) as fc:
        generator.generate(cond.to(dev), sampling or SamplingConfig(),
                           generator=torch.Generator(device=dev).manual_seed(seed))
    return fc.result()


# ---- memory ----------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    # Give freed heap back to the OS so an earlier pair's garbage does not hide this one's peak.
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _maxrss_kib() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or CPU peak-RSS growth (see module doc)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_mib: float | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated (weights + activations)"
        else:
            _trim_heap()
            self._base = _proc_status_kib("VmRSS")
            if self._base is not None and _reset_peak_rss():
                self.method = "cpu peak RSS growth (VmHWM reset)"
                self._hwm = True
            else:
                self._base = _maxrss_kib()
                self.method = "cpu ru_maxrss growth (lower bound)"
                self._hwm = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_kib("VmHWM") if self._hwm else _maxrss_kib()
            self.peak_mib = max(0, (peak or 0) - self._base) / 1024


# ---- pairs -------------------------------------------------------------------------------
def _device_of(model) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _spec_of(name: str, **overrides):
    """The token spec of a registered model, built on the meta device when that works."""
    from zoo import registry
    from zoo.tokens import IncompatibleTokens

    try:
        return registry.build_meta(name, **overrides).spec
    except IncompatibleTokens:
        raise
    except Exception:  # a constructor that needs real tensors: build it for real
        with torch.random.fork_rng(devices=[]):
            return registry.create(name, **overrides).spec


def default_pairs(generators: str = "generator/*-tiny", tokenizers: str = "tokenizer/*-tiny"):
    """Pair every generator matching ``generators`` with a tokenizer whose spec it accepts.

    A tokenizer emitting the generator's default spec is preferred; otherwise the first
    (sorted by name) that the generator can be built for. Returns ``(pairs, skipped)`` where
    ``skipped`` maps a generator to the reason it has no pair.
    """
    from zoo import registry

    toks = {}
    for t in registry.list_models(tokenizers):
        try:
            toks[t] = _spec_of(t)
        except Exception as e:  # noqa: BLE001  (a broken tokenizer must not stop the table)
            print(f"bench: skipping {t}: {type(e).__name__}: {e}", file=sys.stderr)
    pairs, skipped = [], {}
    for g in registry.list_models(generators):
        try:
            default = _spec_of(g)
        except Exception:  # noqa: BLE001  (no default spec: the factory needs spec=)
            default = None
        match = next((t for t, s in toks.items() if default is not None and s == default), None)
        if match is None:
            for t, s in toks.items():
                try:
                    _spec_of(g, spec=s)
                except Exception:  # noqa: BLE001  (IncompatibleTokens, or a factory without spec=)
                    continue
                match = t
                break
        if match is None:
            skipped[g] = f"no tokenizer matching {tokenizers!r} emits tokens it accepts"
        else:
            pairs.append((g, match))
    return pairs, skipped


VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's patch_nums at 256 px


def pyramid_to(top: tuple[int, int]) -> list[tuple[int, int]]:
    """Square scales of VAR's schedule below a square ``top`` scale, then ``top`` itself."""
    h, w = top
    if h != w:
        raise ValueError(f"--grid for pyramid tokens takes a square top scale, got {h}x{w}")
    return [(s, s) for s in VAR_SCALES if s < h] + [(h, w)]


def _with_grid(spec, grid: tuple[int, int]):
    if spec.layout == "pyramid":
        return dataclasses.replace(spec, shape=tuple(pyramid_to(grid)))
    if spec.layout == "grid":
        return dataclasses.replace(spec, shape=tuple(grid))
    if spec.layout == "sequence":
        return dataclasses.replace(spec, shape=(grid[0] * grid[1],))
    raise ValueError(f"--grid applies to grid, sequence or pyramid tokens, not {spec.describe()}")


def _load(name: str, pretrained: bool, **overrides):
    """``(model, weights tag or 'random')``."""
    from zoo import registry
    from zoo.pipeline import load_model

    if pretrained:  # shipped weights carry their own spec; the caller checks it
        e = registry.entry(name)
        for tag in e.weights:
            try:
                registry.resolve_weights(name, tag)
            except (FileNotFoundError, ValueError, OSError):
                continue
            return registry.create(name, pretrained=tag), tag
    kind = name.split("/", 1)[0]
    return load_model(name, kind, **overrides), "random"


def _condition(generator, batch: int):
    from generators.base import Condition
    from zoo.pipeline import class_conditioning, text_conditioning

    n = class_conditioning(generator)
    vocab, length = text_conditioning(generator)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(batch) % n if n else None
    text = torch.randint(1, vocab, (batch, length), generator=g) if vocab else None
    if labels is None and text is None:
        labels = torch.full((batch,), -1)  # the null class: unconditional
    return Condition(labels, text)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench_pair(generator: str, tokenizer: str, *, batch: int = 16, grid=None, pretrained: bool = False,
               device="cpu", repeats: int = 3, sampling=None, seed: int = 0, overrides: dict | None = None) -> dict:
    """One benchmark row (a dict) for a registered generator / tokenizer pair.

    ``overrides``: generator constructor arguments (e.g. ``{"entity": "token"}`` for xAR); a
    generator built with them is random-init even with ``pretrained`` (its weights would not fit).
    """
    from generators.base import SamplingConfig
    from zoo.tokens import IncompatibleTokens

    sampling = sampling or SamplingConfig()
    tok, tok_w = _load(tokenizer, pretrained)
    spec = tok.spec if grid is None else _with_grid(tok.spec, grid)
    try:
        gen, gen_w = _load(generator, pretrained and grid is None and not overrides, spec=spec,
                           **(overrides or {}))
    except IncompatibleTokens as e:
        raise IncompatibleTokens(f"{generator} cannot take the tokens of {tokenizer}: {e}") from e
    if gen.spec != spec:
        raise IncompatibleTokens(f"{generator} [{gen.spec.describe()}] cannot take the tokens of "
                                 f"{tokenizer} [{tok.spec.describe()}]")
    decode = gen.spec == tok.spec
    tok.to(device).eval()
    gen.to(device).eval()
    cond = _condition(gen, batch).to(device)

    def run_once(s):
        tokens = gen.generate(cond, sampling, generator=torch.Generator(device=device).manual_seed(s))
        if decode:
            tok.decode(tokens)

    with PeakMemory(device) as mem:
        with ForwardCounter(gen) as fc:  # the warm-up run also counts the steps
            run_once(seed)
        steps, counted = fc.result()
        _sync(device)
        t0 = time.perf_counter()
        for r in range(repeats):
            run_once(seed + 1 + r)
        _sync(device)
        dt = (time.perf_counter() - t0) / repeats
    return {
        "generator": generator + _variant_label(overrides), "tokenizer": tokenizer,
        "tokens": gen.spec.describe(), "overrides": dict(overrides or {}),
        "generator_params": gen.num_params(), "tokenizer_params": tok.num_params(),
        "weights": gen_w if gen_w == tok_w else f"{gen_w}/{tok_w}",
        "device": str(device), "threads": torch.get_num_threads(), "batch": batch, "cfg": sampling.cfg,
        "forward_steps": steps, "counted_module": counted, "decode": decode,
        "seconds_per_batch": dt, "images_per_s": batch / dt,
        "peak_mib": mem.peak_mib, "memory_method": mem.method,
    }


def bench_train_step(generator: str, tokenizer: str, *, batch: int = 16, grid=None, device="cpu",
                     repeats: int = 3, seed: int = 0) -> dict:
    """One training-step row: peak memory and time of ``loss`` + ``backward`` on random tokens.

    The generator runs in train mode with gradients on (schemes that trade compute for memory in
    training, such as MVAR's chunked loss, only show their saving here). One warm-up step, then
    the peak over ``repeats`` timed steps (gradients freed before each, so they are counted).
    """
    from zoo.tokens import IncompatibleTokens, random_tokens

    tok, _ = _load(tokenizer, False)
    spec = tok.spec if grid is None else _with_grid(tok.spec, grid)
    try:
        gen, _ = _load(generator, False, spec=spec)
    except IncompatibleTokens as e:
        raise IncompatibleTokens(f"{generator} cannot take the tokens of {tokenizer}: {e}") from e
    del tok
    gen.to(device).train()
    tokens = random_tokens(gen.spec, batch, generator=torch.Generator().manual_seed(seed)).to(device)
    cond = _condition(gen, batch).to(device)

    def step():
        gen.zero_grad(set_to_none=True)
        gen.loss(tokens, cond)["loss"].backward()

    torch.manual_seed(seed)
    step()
    gen.zero_grad(set_to_none=True)
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(device)
        dt = (time.perf_counter() - t0) / repeats
    return {"generator": generator, "tokenizer": tokenizer, "tokens": gen.spec.describe(),
            "generator_params": gen.num_params(), "device": str(device), "threads": torch.get_num_threads(),
            "batch": batch, "seconds_per_step": dt, "peak_mib": mem.peak_mib, "memory_method": mem.method}


def format_train_table(rows: list[dict]) -> str:
    """Markdown table of training-step rows."""
    head = ["generator", "tokens", "params", "batch", "s/step", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "error" in r:
            cells = [r["generator"], f"error: {r['error']}", "", "", "", ""]
        else:
            cells = [r["generator"], r["tokens"], _fmt_params(r["generator_params"]), str(r["batch"]),
                     f"{r['seconds_per_step']:.3f}", f"{r['peak_mib']:.1f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ---- output --------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows (failed rows show their error)."""
    head = ["generator", "tokenizer", "tokens", "params", "weights", "batch", "fwd steps/img",
            "img/s", "s/batch", "peak MiB", "decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "error" in r:
            cells = [r["generator"], r["tokenizer"], f"error: {r['error']}"] + [""] * (len(head) - 3)
        else:
            cells = [r["generator"], r["tokenizer"], r["tokens"], _fmt_params(r["generator_params"]),
                     r["weights"], str(r["batch"]), str(r["forward_steps"]), f"{r['images_per_s']:.2f}",
                     f"{r['seconds_per_batch']:.3f}", f"{r['peak_mib']:.1f}", "yes" if r["decode"] else "no"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _header(rows, args) -> str:
    ok = [r for r in rows if "error" not in r]
    weights = "shipped weights where present" if args.pretrained else \
        "random-init weights (speed and memory only; image quality is not measured)"
    mem = ok[0]["memory_method"] if ok else "-"
    dev = ok[0]["device"] if ok else args.device
    return (f"Sampling benchmark: {weights}; device {dev} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}); cfg={args.cfg}; "
            f"generate + decode, mean of {args.repeats} runs after 1 warm-up; "
            f"fwd steps = network forward calls per batch (shared by its images); peak memory: {mem}.")


def _variant_label(overrides: dict | None) -> str:
    return "[" + ",".join(f"{k}={v}" for k, v in overrides.items()) + "]" if overrides else ""


def parse_vary(items) -> list[dict]:
    """``["entity=token,cell", "entity_size=2"]`` -> the cartesian product of the values as
    override dicts (``[{}]`` when there is nothing to vary). Values are parsed as YAML."""
    import itertools

    import yaml

    keys, values = [], []
    for item in items or ():
        key, sep, vals = item.partition("=")
        if not sep or not key or not vals:
            raise ValueError(f"--vary takes KEY=V1[,V2...], got {item!r}")
        keys.append(key.strip())
        values.append([yaml.safe_load(v) for v in vals.split(",")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid takes HxW, e.g. 16x16, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid needs positive sizes, got {text!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo bench", description="sampling benchmark: forward steps, "
                                "images/s and peak memory per generator/tokenizer pair")
    p.add_argument("--pair", nargs=2, action="append", metavar=("GENERATOR", "TOKENIZER"),
                   help="registry names; repeatable (default: every --generators entry, paired)")
    p.add_argument("--generators", default="generator/*-tiny", help="pattern for the default pairs")
    p.add_argument("--tokenizers", default="tokenizer/*-tiny", help="pattern for the default pairs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", type=_parse_grid, default=None, metavar="HxW", help="override the token grid")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (>1 adds the unconditional pass)")
    p.add_argument("--pretrained", action="store_true", help="use shipped weights where present")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="generator constructor argument to sweep, one row per value (repeatable: the "
                        "cartesian product), e.g. --vary entity=token,cell,subsample,scale,image for xAR; "
                        "varied generators are random-init")
    p.add_argument("--train-step", action="store_true",
                   help="measure one training step (loss + backward, train mode) instead of sampling")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--kernels" in argv:  # fused sampling kernel benchmark (eval/bench_kernels.py)
        from eval.bench_kernels import main as kernels_main
        return kernels_main([a for a in argv if a != "--kernels"])
    from generators.base import SamplingConfig

    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        print("bench: --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.pair:
        pairs = [tuple(p) for p in args.pair]
    else:
        pairs, skipped = default_pairs(args.generators, args.tokenizers)
        for g, why in skipped.items():
            print(f"bench: skipping {g}: {why}", file=sys.stderr)
        if not pairs:
            print(f"bench: no pairs for {args.generators!r} x {args.tokenizers!r}", file=sys.stderr)
            return 1
    if args.train_step:
        rows = []
        for g, t in pairs:
            try:
                rows.append(bench_train_step(g, t, batch=args.batch, grid=args.grid, device=device,
                                             repeats=args.repeats))
            except Exception as e:  # noqa: BLE001
                print(f"bench: {g} + {t} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"generator": g, "tokenizer": t, "error": f"{type(e).__name__}: {e}"})
        ok = [r for r in rows if "error" not in r]
        print(f"Training-step benchmark: random-init weights, random tokens; device {device}, "
              f"{torch.get_num_threads()} threads; loss + backward, mean of {args.repeats} steps after 1 "
              f"warm-up; peak memory: {ok[0]['memory_method'] if ok else '-'}.")
        print()
        print(format_train_table(rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 1 if any("error" in r for r in rows) else 0
    try:
        variants = parse_vary(args.vary)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    sampling = SamplingConfig(cfg=args.cfg)
    rows = []
    for g, t in pairs:
        for ov in variants:
            try:
                rows.append(bench_pair(g, t, batch=args.batch, grid=args.grid, pretrained=args.pretrained,
                                       device=device, repeats=args.repeats, sampling=sampling, overrides=ov))
            except Exception as e:  # noqa: BLE001  (one broken pair must not hide the others)
                print(f"bench: {g}{_variant_label(ov)} + {t} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"generator": g + _variant_label(ov), "tokenizer": t,
                             "error": f"{type(e).__name__}: {e}"})
    print(_header(rows, args))
    print()
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
