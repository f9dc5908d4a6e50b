"""Reconstruction quality of every prefix of an ordered (coarse-to-fine) 1D tokenizer.

::

    python -m eval.prefix_recon --tokenizer tokenizer/flextok-tiny:shapes --images 512 --num-objects 1-4

For ``k`` = 1, 2, 4, ..., N: PSNR (on [0, 1]) and Shapes attribute agreement
(:func:`eval.recon.attribute_agreement`) of ``decode_prefix(encode(x)[:, :k])`` on held-out
Shapes test images (:func:`tokenizers_vis.flextok.prefix_metrics`). FlexTok's claim is that every
prefix decodes to a whole image whose fidelity grows with ``k`` (Bachmann et al. 2025, §3-4).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.prefix_recon", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="checkpoint dir, registry name or name:tag (ordered)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--num-objects", default="1-4", help="Shapes objects per image: N or MIN-MAX")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-attributes", action="store_true")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    from tokenizers_vis.flextok import prefix_metrics
    from train.common import parse_num_objects
    from eval.images import shapes_test_batch
    from zoo.pipeline import load_model

    tok = load_model(a.tokenizer, "tokenizer").eval()
    if not getattr(tok.spec, "ordered", False) or not hasattr(tok, "decode_prefix"):
        raise SystemExit(f"{a.tokenizer}: not an ordered tokenizer with decode_prefix ({tok.spec.describe()})")
    images, _ = shapes_test_batch(a.images, parse_num_objects(a.num_objects), tok.image_size)
    with torch.no_grad():
        res = prefix_metrics(tok, images, batch_size=a.batch_size, attributes=not a.no_attributes)
    ks = list(res)
    print(f"{a.tokenizer}: {a.images} Shapes test images ({a.num_objects} objects)")
    print("| prefix k | " + " | ".join(str(k) for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    print("| PSNR (dB) | " + " | ".join(f"{res[k]['psnr']:.2f}" for k in ks) + " |")
    if not a.no_attributes:
        for key in ("count", "colors", "shapes", "objects"):
            print(f"| {key} | " + " | ".join(f"{res[k]['attribute_agreement'][key]:.3f}" for k in ks) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tokenizer": a.tokenizer, "images": a.images, "prefixes": {str(k): v for k, v in res.items()}},
                      f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
