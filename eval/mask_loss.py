"""MAR / Hi-MAR training loss at fixed mask ratios: does the trunk use what it sees?

::

    python -m eval.mask_loss --generator generator/mar-tiny:shapes --tokenizer tokenizer/kl-tiny:shapes

Encodes ``--images`` held-out Shapes test images (single objects, class condition), then
evaluates the generator's masked-token loss (MAR: the diffusion head's loss on the masked
tokens, Li et al. 2024 §3.2) with exactly ``round_up(N·r)`` random tokens masked for each
ratio ``r`` in ``--ratios``, averaged over ``--draws`` random orders (seeded). A trunk that
uses the visible tokens has a lower loss at lower ratios; a rise at ratios that training never
shows (MAR trains on [0.7, 1]) is what ``mask_ratio_dist="cosine"`` addresses (checkpoints.md,
issue 16). Hi-MAR (two trunks, two heads) is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch


@torch.no_grad()
def mask_loss(generator, tokenizer, images: torch.Tensor, labels: torch.Tensor, ratios, draws: int = 4,
              seed: int = 0) -> dict[float, float]:
    """``{ratio: mean masked-token loss}`` of a MAR-family generator on ``images``."""
    from generators.base import Condition
    from generators.mar import MAR, mask_from_order, random_orders

    if type(generator) is not MAR:
        raise ValueError(f"mask_loss measures MAR's single-trunk loss; got {type(generator).__name__}")
    generator.eval()
    seq = generator.latent_norm.normalize(tokenizer.encode(images).to_sequence().data)
    B, N = seq.shape[:2]
    buf = generator.buffer(Condition(labels), B)
    out = {}
    for r in ratios:
        n_mask = min(N, max(1, math.ceil(N * float(r))))
        total = 0.0
        for d in range(draws):
            g = torch.Generator().manual_seed(seed + d)
            mask = mask_from_order(random_orders(B, N, g), n_mask)
            torch.manual_seed(seed + d)  # the diffusion head draws its noise and timesteps
            z = generator.backbone(generator.embed(seq), buf, mask)
            total += float(generator._head_loss(seq, z, mask)["loss"])
        out[float(r)] = total / draws
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.mask_loss", description=__doc__.split("\n")[0])
    p.add_argument("--generator", required=True, help="checkpoint dir, registry name or name:tag (MAR)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--ratios", default="1.0,0.9,0.7,0.5,0.3,0.1")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    from eval.images import shapes_test_batch
    from zoo.pipeline import load_model

    gen, tok = load_model(a.generator, "generator"), load_model(a.tokenizer, "tokenizer").eval()
    images, labels = shapes_test_batch(a.images, 1, tok.image_size)
    ratios = [float(r) for r in a.ratios.split(",")]
    res = mask_loss(gen, tok, images, labels, ratios, a.draws, a.seed)
    print("| mask ratio | " + " | ".join(f"{r:g}" for r in res) + " |")
    print("|---|" + "---|" * len(res))
    print("| masked-token loss | " + " | ".join(f"{v:.3f}" for v in res.values()) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"generator": a.generator, "tokenizer": a.tokenizer, "images": a.images,
                       "draws": a.draws, "loss": {str(k): v for k, v in res.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
