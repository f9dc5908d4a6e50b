"""accelerate-native training scripts: the three arrows of arzoo's job flow.

::

    python -m train tokenizer --model tokenizer/vq-tiny --out runs/vq        # images -> tokenizer
    python -m train extract --tokenizer runs/vq/final --out runs/tok         # tokenizer -> token shards
    python -m train generator --model generator/raster-ar-tiny --tokens runs/tok --out runs/ar

Each script also runs as ``python -m train.<script>`` and ``accelerate launch -m train.<script>``
(multi-process data parallel; ``--batch-size`` is the global batch). Shared flags, the
flags and data live in :mod:`train.common`, the training loop (exact resume, EMA, checkpoint
rotation, JSONL log) in :mod:`train.loop`, and the token-shard format in :mod:`train.extract`.
"""

SCRIPTS = ("tokenizer", "extract", "generator", "features")

__all__ = ["SCRIPTS"]
