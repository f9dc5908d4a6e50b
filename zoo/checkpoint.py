"""Checkpoints: a folder with ``config.json`` and ``model.safetensors``. Never unpickled.

``config.json`` holds ``{"arzoo": version, "name": registry name, "class": "module:Class",
"args": {...}}``. Loading imports the class only from arzoo's own packages, rebuilds it from
the arguments and loads the tensors strictly; every failure names the file and the problem.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from zoo.tokens import spec_from_json, spec_to_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_TRUSTED_PACKAGES = ("zoo", "tokenizers_vis", "generators", "eval", "train", "tests")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, truncated, corrupt or does not fit its config."""


def save_pretrained(model: torch.nn.Module, directory, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors``.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type -- used to keep
    shipped tiny checkpoints small; loading casts them back to the model's own dtype.
    """
    from zoo.module import ZooModule

    if not isinstance(model, ZooModule):
        raise TypeError(f"save_pretrained needs a ZooModule, got {type(model).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cls = type(model)
    cfg = {
        "arzoo": FORMAT_VERSION,
        "name": model.registry_name,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "args": spec_to_json(model.config),
    }
    try:
        text = json.dumps(cfg, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"{cls.__name__}: constructor arguments are not JSON-serialisable ({e})") from e
    # Write to temporary names first so an interrupted save never leaves a half checkpoint.
    tmp_w, tmp_c = d / (WEIGHTS_NAME + ".tmp"), d / (CONFIG_NAME + ".tmp")
    if dtype is None:
        save_model(model, str(tmp_w), metadata={"format": "pt"})
    else:
        cfg["stored_dtype"] = str(dtype).replace("torch.", "")
        text = json.dumps(cfg, indent=2, sort_keys=True)
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
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    for key in ("class", "args"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return cfg


def build_from_config(cfg: dict, source: str = "config"):
    modname, _, qual = str(cfg["class"]).partition(":")
    if modname.split(".")[0] not in _TRUSTED_PACKAGES:
        raise CheckpointError(f"{source}: class {cfg['class']!r} is outside arzoo's packages; refusing to import it")
    try:
        obj = importlib.import_module(modname)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{source}: unknown class {cfg['class']!r} ({e})") from e
    try:
        model = obj(**spec_from_json(cfg["args"]))
    except TypeError as e:
        raise CheckpointError(f"{source}: arguments do not fit {qual} ({e})") from e
    model.registry_name = cfg.get("name")
    return model


def load_pretrained(directory, map_location="cpu"):
    """Rebuild a model from a checkpoint folder (strict: every tensor present and the right shape)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint folder (does not exist)")
    cfg = read_config(d)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: missing")
    model = build_from_config(cfg, str(d / CONFIG_NAME))
    try:
        state = load_file(str(wpath), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: truncated or corrupt safetensors file ({e})") from e
    load_state_strict(model, state, str(wpath))
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
