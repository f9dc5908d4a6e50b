"""``arzoo demo``: the main job on the embedded default (Shapes, tiny models).

1. Load the shipped tiny checkpoints (``weights/``: ``tokenizer/vq-tiny:shapes`` and
   ``generator/raster-ar-tiny:shapes``). When they are absent (or with ``--retrain``) train
   them here on Shapes with the regular training scripts -- VQ tokenizer, token extraction,
   raster AR generator -- on a budget that fits ~15 minutes on a 2-core CPU.
2. Sample a class grid (every Shapes class) and a caption grid (Shapes captions) with the
   sampling CLI, and report how many class samples the Shapes detector parses as exactly
   the requested class.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_TOKENIZER = "tokenizer/vq-tiny"
DEMO_GENERATOR = "generator/raster-ar-tiny"
CAPTIONS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
    "an orange triangle", "a pink circle", "a white square", "a brown triangle", "a black circle",
]


def _shipped(name: str) -> str | None:
    from zoo import registry

    e = registry.entry(name)
    for tag in e.weights:
        try:
            registry.resolve_weights(name, tag)
            return f"{name}:{tag}"
        except (FileNotFoundError, ValueError):
            continue
    return None


def train_tiny(out: Path, *, tok_steps: int, gen_steps: int, num_tokens: int, seed: int) -> tuple[str, str]:
    """Train the demo pair from scratch with the regular scripts; returns their final folders."""
    from train import extract, generator, tokenizer

    t0 = time.time()
    tok_dir, tok_data, gen_dir = out / "vq-tiny", out / "tokens", out / "raster-ar-tiny"
    print(f"[demo] training {DEMO_TOKENIZER} for {tok_steps} steps -> {tok_dir}", flush=True)
    tokenizer.main(["--model", DEMO_TOKENIZER, "--out", str(tok_dir), "--steps", str(tok_steps),
                    "--batch-size", "32", "--lr", "2e-3", "--warmup", "50", "--lr-schedule", "cosine",
                    "--num-objects", "1", "--eval-images", "256", "--seed", str(seed), "--num-workers", "1"])
    print(f"[demo] extracting {num_tokens} token grids -> {tok_data}", flush=True)
    extract.main(["--tokenizer", str(tok_dir / "final"), "--out", str(tok_data), "--num", str(num_tokens),
                  "--num-objects", "1", "--num-workers", "1"])
    print(f"[demo] training {DEMO_GENERATOR} for {gen_steps} steps -> {gen_dir}", flush=True)
    generator.main(["--model", DEMO_GENERATOR, "--tokens", str(tok_data), "--out", str(gen_dir),
                    "--steps", str(gen_steps), "--batch-size", "64", "--lr", "1e-3", "--warmup", "50",
                    "--lr-schedule", "cosine", "--cond", "both", "--seed", str(seed), "--num-workers", "0"])
    print(f"[demo] trained both in {(time.time() - t0) / 60:.1f} min", flush=True)
    return str(tok_dir / "final"), str(gen_dir / "final")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="arzoo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="where grids (and any trained models) go")
    p.add_argument("--retrain", action="store_true", help="train the tiny pair even if weights are shipped")
    p.add_argument("--tok-steps", type=int, default=600, help="tokenizer steps when training")
    p.add_argument("--gen-steps", type=int, default=500, help="generator steps when training")
    p.add_argument("--num-tokens", type=int, default=8000, help="images encoded for generator training")
    p.add_argument("--num-per-class", type=int, default=2, help="samples per class / caption in the grids")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from eval.shapes_acc import score
    from sample import cli as sample_cli
    from zoo.data.shapes import NUM_CLASSES

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, gen = _shipped(DEMO_TOKENIZER), _shipped(DEMO_GENERATOR)
    if a.retrain or not (tok and gen):
        why = "--retrain" if a.retrain else "no shipped tiny checkpoints found"
        print(f"[demo] {why}: training the tiny pair on Shapes (about 15 min on 2 CPU cores)", flush=True)
        tok, gen = train_tiny(out / "train", tok_steps=a.tok_steps, gen_steps=a.gen_steps,
                              num_tokens=a.num_tokens, seed=a.seed)
    else:
        print(f"[demo] using shipped checkpoints {tok} and {gen}", flush=True)

    common = ["--tokenizer", tok, "--generator", gen, "--num", str(a.num_per_class), "--cfg", str(a.cfg),
              "--seed", str(a.seed), "--overwrite"]
    class_dir, caption_dir = out / "class_grid", out / "caption_grid"
    rc = sample_cli.main([*common, "--classes", "all", "--out", str(class_dir)])
    rc = rc or sample_cli.main([*common, "--prompts", *CAPTIONS, "--out", str(caption_dir)])
    if rc:
        return rc

    import numpy as np

    imgs = np.load(class_dir / "samples.npz")["arr_0"]
    wanted = [c for c in range(NUM_CLASSES) for _ in range(a.num_per_class)]
    acc, _ = score(imgs, wanted)
    summary = {"tokenizer": tok, "generator": gen, "class_grid": str(class_dir / "grid.png"),
               "caption_grid": str(caption_dir / "grid.png"), "class_grid_accuracy": acc}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[demo] class grid  : {class_dir / 'grid.png'}  (one row per class; "
          f"{100 * acc:.0f}% of its {len(wanted)} samples parsed as the requested class)")
    print(f"[demo] caption grid: {caption_dir / 'grid.png'}  (one row per caption: {', '.join(CAPTIONS[:3])}, ...)")
    print(f"[demo] summary     : {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
