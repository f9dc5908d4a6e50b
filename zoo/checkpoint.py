"""Checkpoints: a folder with ``config.json`` and ``model.safetensors``. Never unpickled.

``config.json`` holds ``{"arzoo": version, "name": registry name, "class": "module:Class",
"args": {...}}`` (a generator may add ``"tokenizer": {"name", "fingerprint"}``, the tokenizer
it was trained on). Loading never imports or walks anything the file names: the class is
the one the registry builds for ``name`` (and must equal the recorded class); for a
checkpoint without a name, one of arzoo's own model classes (looked up in a table of the
imported ZooModule subclasses); or one the caller allowed with :func:`allow_class`. The
model is first built on the meta device, so absurd sizes are refused before any memory is
allocated; every failure names the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)

from zoo.tokens import spec_from_json, spec_to_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
#: default cap on parameter + buffer elements of a checkpoint's model (the largest registered
#: config, var-d30, has 2.0e9); override per call (``max_elements=``) or by this variable
MAX_ELEMENTS_ENV = "ARZOO_MAX_ELEMENTS"
DEFAULT_MAX_ELEMENTS = 4_000_000_000
#: registered models have at most ~1,300 submodules; a config asking for far more (``depth``
#: 10**12) would spin in Python building them, even on the meta device
MAX_MODULES = 20_000
MAX_CONFIG_BYTES = 1 << 20
#: arzoo's own packages: a nameless checkpoint may hold any ZooModule class defined in them
#: (looked up in a table of the classes already imported, never imported by the file's say-so)
_OWN_PACKAGES = ("zoo", "tokenizers_vis", "generators", "eval", "train")
_ALLOWED: dict[str, type] = {}


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, truncated, corrupt or does not fit its config."""


def class_path(cls: type) -> str:
    """``module:QualName``, as ``config.json`` records a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def allow_class(cls) -> str:
    """Let checkpoints of ``cls`` load without a registry name (a class, or ``"pkg.mod:Class"``,
    imported here because *you* name it). Returns the key checkpoints record it under."""
    from zoo.module import ZooModule

    obj = cls
    if isinstance(cls, str):
        modname, sep, qual = cls.partition(":")
        if not (sep and modname and qual):
            raise ValueError(f"allow_class({cls!r}): expected 'package.module:Class'")
        try:
            obj = importlib.import_module(modname)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"allow_class({cls!r}): {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, ZooModule)):
        raise TypeError(f"allow_class({cls!r}): not a ZooModule subclass")
    key = class_path(obj)
    _ALLOWED[key] = obj
    return key


def fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits identifying a tokenizer: class, config and tensors. Floating tensors are
    hashed as float16, so a float16 export of the same weights has the same fingerprint."""
    h = hashlib.sha256(json.dumps({"class": class_path(type(model)), "args": spec_to_json(model.config)},
                                  sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        if v.device.type == "meta":
            raise ValueError(f"fingerprint: {k} is on the meta device (the model holds no weights)")
        t = v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
        t = t.cpu().contiguous().reshape(-1)
        h.update(f"\n{k}:{t.dtype}:{tuple(v.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _check_trained_on(rec, source: str):
    """``{"name": str | None, "fingerprint": str}`` (or None): the tokenizer a generator learned."""
    if rec is None:
        return None
    if not (isinstance(rec, dict) and isinstance(rec.get("fingerprint"), str)
            and isinstance(rec.get("name"), (str, type(None)))):
        raise CheckpointError(f"{source}: 'tokenizer' must be {{\"name\": str or null, \"fingerprint\": str}}, "
                              f"got {rec!r:.200}")
    return rec


def save_pretrained(model: torch.nn.Module, directory, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors``.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type -- used to keep
    shipped tiny checkpoints small; loading casts them back to the model's own dtype.
    """
    from zoo.module import ZooModule

    if not isinstance(model, ZooModule):
        raise TypeError(f"save_pretrained needs a ZooModule, got {type(model).__name__}")
    d = Path(directory)
    cls = type(model)
    cfg = {
        "arzoo": FORMAT_VERSION,
        "name": model.registry_name,
        "class": class_path(cls),
        "args": spec_to_json(model.config),
    }
    trained_on = getattr(model, "trained_on", None)
    if trained_on is not None:
        cfg["tokenizer"] = _check_trained_on(trained_on, f"{cls.__name__}.trained_on")
    if dtype is not None:
        cfg["stored_dtype"] = str(dtype).replace("torch.", "")
    try:
        text = json.dumps(cfg, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"{cls.__name__}: constructor arguments are not JSON-serialisable ({e})") from e
    d.mkdir(parents=True, exist_ok=True)
    # Write to temporary names first so an interrupted save never leaves a half checkpoint.
    tmp_w, tmp_c = d / (WEIGHTS_NAME + ".tmp"), d / (CONFIG_NAME + ".tmp")
    if dtype is None:
        save_model(model, str(tmp_w), metadata={"format": "pt"})
    else:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            key = (v.data_ptr(), v.dtype, tuple(v.shape))
            if key in seen:  # an alias of a tied tensor: loading restores it from its twin
                continue
            seen.add(key)
            state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
        save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(text + "\n")
    os.replace(tmp_w, d / WEIGHTS_NAME)
    os.replace(tmp_c, d / CONFIG_NAME)
    return d


def read_config(directory) -> dict:
    """``config.json`` of a checkpoint folder, checked for shape and format version."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes; a checkpoint config is at most "
                              f"{MAX_CONFIG_BYTES:,}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("arzoo", "class", "args"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing key {key!r}")
    version = cfg["arzoo"]
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format 'arzoo': {version!r} is not one this arzoo reads "
                              f"(1..{FORMAT_VERSION}); a newer arzoo may have written it")
    for key, types in (("class", str), ("args", dict), ("name", (str, type(None)))):
        if not isinstance(cfg.get(key), types):
            want = {"class": "a 'module:Class' string", "args": "an object", "name": "a registry name"}[key]
            raise CheckpointError(f"{path}: {key!r} must be {want}, got {cfg.get(key)!r:.100}")
    _check_trained_on(cfg.get("tokenizer"), str(path))
    return cfg


def resolve_class(cfg: dict, source: str = "config") -> type:
    """The class to build for ``cfg``: an allowed class, what the registry builds for its name, or
    (no name) an arzoo class already imported. Never imports or walks what the file names."""
    from zoo import registry

    recorded = cfg["class"]
    if recorded in _ALLOWED:
        return _ALLOWED[recorded]
    if not cfg.get("name"):  # e.g. a model built from its class directly, not from a registry name
        own = _own_classes()
        if recorded in own:
            return own[recorded]
    hint = ("register it (`--import MODULE` that registers it, zoo.import_plugins) or allow the class "
            "(zoo.checkpoint.allow_class)")
    name = cfg.get("name")
    if not name:
        raise CheckpointError(f"{source}: no registry 'name', and class {recorded!r} is not allowed; {hint}")
    base = name.partition(":")[0]
    try:
        cls = registry.model_class(base)
    except registry.UnknownModel as e:
        raise CheckpointError(f"{source}: name {name!r}: {e}; {hint}") from None
    except Exception as e:  # a broken factory: say which checkpoint needed it
        raise CheckpointError(f"{source}: cannot build {base!r} to check its class ({type(e).__name__}: {e})") from e
    if class_path(cls) != recorded:
        raise CheckpointError(f"{source}: class {recorded!r} is not the class {base!r} builds "
                              f"({class_path(cls)}); refusing to load it")
    return cls


def _own_classes() -> dict[str, type]:
    """``module:Class`` -> class for every ZooModule subclass defined in arzoo's packages."""
    from zoo.module import ZooModule
    from zoo.registry import _ensure_loaded

    _ensure_loaded()  # imports the model packages (their classes, not anything a file names)
    out, todo = {}, [ZooModule]
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if c.__module__.split(".")[0] in _OWN_PACKAGES:
            out[class_path(c)] = c
    return out


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def _size_guard(max_elements: int):
    """Abort module construction (raise _TooLarge) once it registers more than ``max_elements``
    tensor elements or MAX_MODULES submodules: checked as they are registered, so a huge
    config stops early instead of spinning through its layers."""
    seen, count = {}, {"elements": 0, "modules": 0}

    def on_tensor(module, name, t):
        if t is not None and id(t) not in seen:
            seen[id(t)] = t  # keep it alive so its id is not reused
            count["elements"] += t.numel()
            if count["elements"] > max_elements:
                raise _TooLarge(f"more than {max_elements:,} parameter/buffer elements (the limit: "
                                f"max_elements= or ${MAX_ELEMENTS_ENV})")

    def on_module(module, name, sub):
        count["modules"] += 1
        if count["modules"] > MAX_MODULES:
            raise _TooLarge(f"more than {MAX_MODULES:,} submodules")

    handles = [register_module_parameter_registration_hook(on_tensor),
               register_module_buffer_registration_hook(on_tensor),
               register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _max_elements(max_elements) -> int:
    if max_elements is not None:
        return int(max_elements)
    env = os.environ.get(MAX_ELEMENTS_ENV)
    if not env:
        return DEFAULT_MAX_ELEMENTS
    try:
        return int(float(env))
    except ValueError:
        raise ValueError(f"{MAX_ELEMENTS_ENV}={env!r}: expected a number of elements, e.g. 4e9") from None


def build_from_config(cfg: dict, source: str = "config", max_elements: int | None = None):
    """Build (without weights) the model ``cfg`` describes; see :func:`resolve_class`."""
    cls = resolve_class(cfg, source)
    cap = _max_elements(max_elements)
    try:
        args = spec_from_json(cfg["args"])
        with _size_guard(cap), torch.device("meta"):  # the size check allocates nothing
            cls(**args)
        model = cls(**args)
    except _TooLarge as e:
        raise CheckpointError(f"{source}: these arguments make a {cls.__qualname__} with {e}; "
                              f"refusing to build it") from None
    except RecursionError:
        raise CheckpointError(f"{source}: 'args' nested too deeply") from None
    except Exception as e:  # the arguments come from a file: any failure is the file's
        raise CheckpointError(f"{source}: arguments do not fit {cls.__qualname__} ({type(e).__name__}: {e})") from e
    model.registry_name = cfg.get("name")
    return model


def load_pretrained(directory, map_location="cpu", *, max_elements: int | None = None):
    """Rebuild a model from a checkpoint folder (strict: every tensor present and the right shape).

    ``max_elements`` caps the model's parameter + buffer elements (default: ``$ARZOO_MAX_ELEMENTS``
    or 4e9), checked on the meta device before anything is allocated.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint folder (does not exist)")
    # A meta model would hold no weights: refuse rather than return a silently empty model.
    if torch.device(map_location).type == "meta" or torch.get_default_device().type == "meta":
        raise CheckpointError(f"{d}: cannot load weights onto the meta device (it holds no data); load on a "
                              f"real device, or use zoo.registry.build_meta(name) for shapes only")
    cfg = read_config(d)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: missing")
    model = build_from_config(cfg, str(d / CONFIG_NAME), max_elements)
    try:
        state = load_file(str(wpath), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: truncated or corrupt safetensors file ({e})") from e
    load_state_strict(model, state, str(wpath))
    model.trained_on = cfg.get("tokenizer")
    model.pretrained_source = str(d)
    return model


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    # save_model drops aliases of shared tensors; a missing alias is fine if its twin is present.
    shared = _shared_aliases(model)
    missing = [k for k in own if k not in state and not any(a in state for a in shared.get(k, ()))]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append("shape mismatch " + "; ".join(bad[:5]))
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: " + "; ".join(parts))
    for k, aliases in shared.items():
        if k not in state:
            for a in aliases:
                if a in state:
                    state[k] = state[a]
                    break
    model.load_state_dict(state, strict=True)


def _shared_aliases(model: torch.nn.Module) -> dict:
    by_ptr: dict = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.device.type == "meta":
            continue
        by_ptr.setdefault((v.data_ptr(), v.dtype, tuple(v.shape)), []).append(k)
    out = {}
    for names in by_ptr.values():
        if len(names) > 1:
            for n in names:
                out[n] = [m for m in names if m != n]
    return out
