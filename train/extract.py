"""Encode a dataset with a trained tokenizer into safetensors token shards (the generator's input).

::

    python -m train.extract --tokenizer runs/vq/final --num 50000 --out runs/tok --flip
    python -m train.extract --tokenizer tokenizer/vq-tiny:shapes --data shapes --out runs/tok

Pre-extracting tokens (with horizontal flips as the only augmentation) is how LlamaGen
(Sun et al. 2024, §3.1, "we pre-extract image codes ... ten-crop") and VAR train their
generators: the tokenizer runs once instead of every epoch.

Layout of ``OUT``::

    meta.json                  spec (TokenSpec.to_dict()), tokenizer ({"name", "fingerprint", ...}),
                               data, count, shards
    tokens-00000.safetensors   tokens (N, *shape, *per_token) -- pyramids as the flat sequence
                               label (N,) int64 (-1 = none), text (N, L) int64 word ids,
                               flipped (N,) uint8, index (N,) int64 source image
    ...

Shard ``k`` holds source images ``[k * shard_size, (k + 1) * shard_size)``; with ``--flip``
each image is followed by its mirror, whose caption has "left" and "right" swapped. Under
``accelerate launch`` process ``r`` writes the shards ``k`` with ``k % world == r``, so the
files do not depend on the number of processes. Nothing is pickled.

``OUT`` must be empty or new; ``--overwrite`` first removes its ``meta.json`` and token shards,
so no stale shard survives (and a run cut short leaves no ``meta.json``, i.e. no readable folder).
:class:`TokenShardDataset` checks every shard when it opens a folder (readable, same spec and
tokenizer as ``meta.json``, the listed row count, ids within the vocabulary, labels and word ids
within the recorded ranges), so a bad folder fails at load with the file's name
(:class:`TokenShardError`), not mid-training.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from train.common import (add_caption_style_arg, build_image_dataset, collate_images, has_accelerator, parse_args,
                          parse_num_objects, write_json)
from zoo.tokens import TokenError, Tokens, TokenSpec

META_NAME = "meta.json"
SHARD_FORMAT = "tokens-{:05d}.safetensors"
FORMAT = "arzoo-token-shards"
_SHARD_FILES = ("tokens-*.safetensors", "tokens-*.safetensors.tmp")


class TokenShardError(ValueError):
    """A token-shard folder that cannot be trained on; the message names the file."""


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------


def read_meta(root) -> dict:
    path = Path(root) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected a folder written by `python -m train.extract`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for key in ("spec", "count", "shards"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def load_token_spec(root) -> TokenSpec:
    """The TokenSpec of the tokens under ``root`` (from its ``meta.json``)."""
    return TokenSpec.from_dict(read_meta(root)["spec"])


def stored_spec(spec: TokenSpec) -> TokenSpec:
    """The spec of the tensor stored in a shard (a pyramid is stored as its flat sequence)."""
    return spec.as_sequence() if spec.layout == "pyramid" else spec


def to_tokens(data: torch.Tensor, spec: TokenSpec, *, validate: bool = True) -> Tokens:
    """A batch of stored rows -> :class:`Tokens` of ``spec``."""
    if spec.layout == "pyramid":
        return Tokens.from_sequence(data, spec, validate=validate)
    return Tokens(data, spec, validate=validate)


def as_token_dtype(data: torch.Tensor, spec: TokenSpec) -> torch.Tensor:
    """Stored rows in the dtype models take: int64 ids, uint8 bits or float32 vectors."""
    kind = spec.kind
    return data.long() if kind == "discrete" else data.to(torch.uint8) if kind == "binary" else data.float()


def check_shard(path: Path, count: int, spec: TokenSpec, meta: dict) -> None:
    """Raise :class:`TokenShardError` naming ``path`` unless the shard holds ``count`` valid rows
    of ``spec`` from the tokenizer ``meta`` records (reads the whole shard once)."""
    from safetensors import SafetensorError, safe_open

    where = f"{path} (listed in {path.parent / META_NAME})"
    try:
        with safe_open(str(path), framework="pt") as h:
            info, keys = h.metadata() or {}, set(h.keys())
            missing = {"tokens", "label", "text"} - keys
            if missing:
                raise TokenShardError(f"{where}: missing tensor(s) {', '.join(sorted(missing))}")
            tokens, label, text = h.get_tensor("tokens"), h.get_tensor("label"), h.get_tensor("text")
    except SafetensorError as e:
        raise TokenShardError(f"{where}: truncated or corrupt safetensors file ({e})") from e
    if "spec" in info:
        try:
            theirs = TokenSpec.from_dict(json.loads(info["spec"]))
        except (ValueError, TypeError, KeyError) as e:
            raise TokenShardError(f"{where}: unreadable spec in its metadata ({e})") from e
        if theirs != spec:
            raise TokenShardError(f"{where}: holds {theirs.describe()} tokens but meta.json says "
                                  f"{spec.describe()} (a shard from another tokenizer?)")
    want_fp = (meta.get("tokenizer") or {}).get("fingerprint")
    if want_fp and info.get("tokenizer_fingerprint", want_fp) != want_fp:
        raise TokenShardError(f"{where}: written by tokenizer {info['tokenizer_fingerprint']}, but meta.json "
                              f"records tokenizer {want_fp} (shards of two extractions mixed)")
    for name, t in (("tokens", tokens), ("label", label), ("text", text)):
        if t.shape[:1] != (count,):
            raise TokenShardError(f"{where}: {name} has {tuple(t.shape)[:1] or 'no'} rows, meta.json says {count}")
    try:
        to_tokens(as_token_dtype(tokens, spec), spec)  # shape, and ids / bits / values within the spec
    except TokenError as e:
        raise TokenShardError(f"{where}: {e}") from e
    num_classes, text_vocab = meta.get("num_classes"), meta.get("text_vocab_size")
    if label.ndim != 1 or (count and (int(label.min()) < -1 or (num_classes and int(label.max()) >= num_classes))):
        raise TokenShardError(f"{where}: labels must be (N,) in [-1, {num_classes}), got shape {tuple(label.shape)}"
                              + (f", range [{int(label.min())}, {int(label.max())}]" if label.numel() else ""))
    if text.ndim != 2 or (text.numel() and (int(text.min()) < 0 or (text_vocab and int(text.max()) >= text_vocab))):
        raise TokenShardError(f"{where}: word ids must be (N, L) in [0, {text_vocab}), got shape {tuple(text.shape)}"
                              + (f", range [{int(text.min())}, {int(text.max())}]" if text.numel() else ""))


class TokenShardDataset(Dataset):
    """Rows of a token-shard folder, read lazily (memory-mapped safetensors, one row at a time).

    ``ds[i] -> (tokens, label, text)``: ``tokens`` as stored (grid ``(h, w)``, sequence ``(n,)``
    or a pyramid's flat ``(sum h*w,)``, with ``per_token`` dims for binary/continuous), int64 for
    discrete ids, uint8 for bits, float32 for continuous; ``label`` a 0-d int64 (-1 = none);
    ``text`` ``(L,)`` int64 word ids. Batch them with the default collate and turn the token
    part into :class:`Tokens` with :meth:`to_tokens`.
    """

    def __init__(self, root, *, check: bool = True):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        try:
            self.spec = TokenSpec.from_dict(self.meta["spec"])
        except (TokenError, TypeError, KeyError) as e:
            raise TokenShardError(f"{self.root / META_NAME}: invalid spec ({e})") from e
        self.files, self.offsets = [], [0]
        for sh in self.meta["shards"]:
            f = self.root / sh["file"]
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {self.root / META_NAME} but missing")
            if check:
                check_shard(f, int(sh["count"]), self.spec, self.meta)
            self.files.append(f)
            self.offsets.append(self.offsets[-1] + int(sh["count"]))
        if self.offsets[-1] != int(self.meta["count"]):
            raise ValueError(f"{self.root / META_NAME}: shard counts add up to {self.offsets[-1]}, "
                             f"but count is {self.meta['count']}")
        self._handles: dict = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        # open file handles stay behind when the dataset is sent to DataLoader workers
        return {**self.__dict__, "_handles": {}}

    def _open(self, s: int):
        h = self._handles.get(s)
        if h is None:
            from safetensors import safe_open

            h = self._handles[s] = safe_open(str(self.files[s]), framework="pt")
        return h

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        i %= n
        s = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[s]
        f = self._open(s)
        tok = f.get_slice("tokens")[j:j + 1][0]
        label = f.get_slice("label")[j:j + 1][0].long()
        text = f.get_slice("text")[j:j + 1][0].long()
        return as_token_dtype(tok, self.spec), label, text

    def to_tokens(self, data: torch.Tensor, validate: bool = True) -> Tokens:
        return to_tokens(data, self.spec, validate=validate)

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------


def load_tokenizer(ref: str):
    """A checkpoint folder, or ``registry-name[:tag]`` (pretrained weights when registered;
    an untrained model, with a warning, when the name has none)."""
    import zoo

    p = Path(ref)
    if p.is_dir():
        model = zoo.load_pretrained(p)
        return model, {"ref": ref, "path": str(p.resolve()), "name": model.registry_name}
    name, _, tag = ref.partition(":")
    try:
        e = zoo.entry(name)
    except zoo.registry.UnknownModel as err:
        raise SystemExit(f"--tokenizer {ref}: not a checkpoint folder and {err}") from err
    if tag:
        model = zoo.create(name, pretrained=tag)
    elif e.weights:
        model = zoo.create(name, pretrained=True)
    else:
        print(f"[extract] warning: {name} has no pretrained weights; encoding with an untrained model",
              file=sys.stderr)
        model = zoo.create(name)
    return model, {"ref": ref, "path": None, "name": name, "tag": tag or None}


_LR = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Mirror a caption: "left" <-> "right" (keeping capitalisation)."""
    def sub(m):
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        return new.capitalize() if w[0].isupper() else new
    return _LR.sub(sub, caption)


def storage_dtype(spec: TokenSpec) -> torch.dtype:
    if spec.kind == "discrete":
        return torch.int16 if spec.vocab_size <= 2 ** 15 else torch.int32 if spec.vocab_size <= 2 ** 31 \
            else torch.int64
    if spec.kind == "binary":
        return torch.uint8
    return torch.float32


def encode_text(captions, max_len: int) -> torch.Tensor:
    from zoo.data import text as T

    if not any(captions):
        return torch.zeros(len(captions), max_len, dtype=torch.long)
    return T.encode(list(captions), max_len=max_len)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.extract", description=__doc__.split("\n")[0])
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of defaults for any flag")
    p.add_argument("--tokenizer", help="checkpoint folder, or registry-name[:tag] (required)")
    p.add_argument("--data", default="shapes", help="'shapes' or 'folder:/path/to/images'")
    p.add_argument("--split", default="train", help="Shapes split (train|test)")
    p.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's image_size")
    p.add_argument("--num-objects", type=parse_num_objects, default=1, help="Shapes objects per image: N or MIN-MAX")
    p.add_argument("--num", type=int, default=10000, help="source images to encode")
    add_caption_style_arg(p)
    p.add_argument("--out", help="output folder (required; must be empty or new unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="extract into a non-empty --out: its meta.json and token shards are removed first")
    p.add_argument("--flip", action="store_true",
                   help="also encode the mirrored images (captions get left/right swapped)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000, help="source images per shard")
    p.add_argument("--text-len", type=int, default=16, help="word ids stored per caption")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE[:FUNC]",
                   help="import MODULE (and call FUNC()) first, e.g. to register models")
    p.add_argument("--cpu", action="store_true")
    return p


def main(argv=None) -> dict:
    from accelerate import PartialState
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    args = parse_args(build_parser(), argv, required=("tokenizer", "out"))  # also runs --import
    for name in ("num", "batch_size", "shard_size", "text_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"--out {out}: not empty; pass --overwrite to replace its token shards, or choose "
                         f"another folder")
    # no GPU: several processes (accelerate launch --multi_gpu) must still form one gloo group
    state = PartialState(cpu=args.cpu or not has_accelerator())
    model, source = load_tokenizer(args.tokenizer)
    for attr in ("spec", "image_size", "encode"):
        if not hasattr(model, attr):
            raise SystemExit(f"--tokenizer {args.tokenizer} is not a tokenizer (it has no {attr!r})")
    model = model.to(state.device).eval()
    spec: TokenSpec = model.spec
    res = args.resolution or model.image_size
    if res != model.image_size:
        raise SystemExit(f"--resolution {res} does not match the tokenizer's image_size {model.image_size}")
    dataset = build_image_dataset(args.data, split=args.split, resolution=res, num_objects=args.num_objects,
                                  length=args.num, caption_style=args.caption_style)
    num = min(args.num, len(dataset))
    if num < args.num:
        print(f"[extract] the data has {len(dataset)} images; encoding {num}", file=sys.stderr)
    from zoo.checkpoint import fingerprint

    source = {**source, "name": source.get("name") or source.get("path") or args.tokenizer,
              "fingerprint": fingerprint(model)}
    state.wait_for_everyone()  # every process has checked --out before anything is removed or written
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # meta.json first: a run cut short leaves a folder that refuses to load, not a mixed one
        (out / META_NAME).unlink(missing_ok=True)
        for pattern in _SHARD_FILES:
            for old in out.glob(pattern):
                old.unlink()
    state.wait_for_everyone()
    rows_per = 2 if args.flip else 1
    n_shards = (num + args.shard_size - 1) // args.shard_size
    mine = [k for k in range(n_shards) if k % state.num_processes == state.process_index]
    sspec, sdtype = stored_spec(spec), storage_dtype(spec)
    labels_seen = torch.tensor(-1)

    bar = tqdm(total=sum(min(args.shard_size, num - k * args.shard_size) for k in mine), desc="extract",
               unit="img", disable=not state.is_main_process, dynamic_ncols=True)
    for k in mine:
        lo, hi = k * args.shard_size, min((k + 1) * args.shard_size, num)
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=args.batch_size,
                            num_workers=args.num_workers, collate_fn=collate_images)
        cols = {"tokens": [], "label": [], "text": [], "flipped": [], "index": []}
        pos = lo
        with torch.no_grad():
            for batch in loader:
                x = batch["image"].to(state.device)
                b = x.shape[0]
                views = [(x, batch["caption"], 0)]
                if args.flip:
                    views.append((x.flip(-1), [swap_left_right(c) for c in batch["caption"]], 1))
                per_view = []
                for imgs, caps, fl in views:
                    data = model.encode(imgs).to_sequence().data if spec.layout == "pyramid" \
                        else model.encode(imgs).data
                    per_view.append((data.cpu(), encode_text(caps, args.text_len),
                                     torch.full((b,), fl, dtype=torch.uint8)))

                def interleave(ts):  # image i, then its mirror
                    return torch.stack(ts, 1).flatten(0, 1)

                cols["tokens"].append(interleave([v[0] for v in per_view]))
                cols["text"].append(interleave([v[1] for v in per_view]))
                cols["flipped"].append(interleave([v[2] for v in per_view]))
                lab = batch["label"].long()
                cols["label"].append(lab.repeat_interleave(rows_per))
                idx = torch.arange(pos, pos + b, dtype=torch.long)
                cols["index"].append(idx.repeat_interleave(rows_per))
                labels_seen = torch.maximum(labels_seen, lab.max())
                pos += b
                bar.update(b)
        tensors = {key: torch.cat(v) for key, v in cols.items()}
        to_tokens(tensors["tokens"], spec)  # validate against the spec before writing
        tensors["tokens"] = tensors["tokens"].to(sdtype).contiguous()
        path = out / SHARD_FORMAT.format(k)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "spec": json.dumps(spec.to_dict()),
                                               "stored": json.dumps(sspec.to_dict()),
                                               "tokenizer_fingerprint": source["fingerprint"]})
        os.replace(tmp, path)
    bar.close()

    # largest label over all processes (for num_classes when the dataset does not say)
    if state.num_processes > 1:
        import torch.distributed as dist

        t = labels_seen.to(state.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        labels_seen = t.cpu()
    state.wait_for_everyone()
    meta = {}
    if state.is_main_process:
        shards = [{"file": SHARD_FORMAT.format(k),
                   "count": min(args.shard_size, num - k * args.shard_size) * rows_per} for k in range(n_shards)]
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        num_classes = getattr(base, "num_classes", None)
        if num_classes is None and int(labels_seen) >= 0:
            num_classes = int(labels_seen) + 1
        try:
            from zoo.data import text as T
            text_vocab = T.vocab_size()
        except ImportError:
            text_vocab = None
        meta = {
            "format": FORMAT, "version": 1,
            "spec": spec.to_dict(), "spec_describe": spec.describe(),
            "stored_layout": sspec.layout,
            "tokenizer": source,
            "data": {"source": args.data, "split": args.split, "resolution": res,
                     "num_objects": args.num_objects, "num_images": num,
                     **({"caption_style": args.caption_style} if args.caption_style != "default" else {})},
            "flip": bool(args.flip), "rows_per_image": rows_per,
            "count": num * rows_per, "shard_size": args.shard_size, "shards": shards,
            "num_classes": num_classes, "text_len": args.text_len, "text_vocab_size": text_vocab,
            "dtype": str(sdtype).replace("torch.", ""),
        }
        write_json(out / META_NAME, meta)
        print(f"[extract] {meta['count']} rows of {spec.describe()} in {n_shards} shard(s) -> {out}")
    state.wait_for_everyone()
    return meta


if __name__ == "__main__":
    main(sys.argv[1:])
