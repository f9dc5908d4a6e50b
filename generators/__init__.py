"""AR generators (tokens | condition -> tokens), their shared blocks, heads and sampling.

Importing this package registers every generator with ``zoo.registry``.
"""
from generators.base import Condition, Generator, SamplingConfig

__all__ = ["Condition", "Generator", "SamplingConfig"]
import generators.raster_ar  # noqa: F401  registers generator/raster-ar-*
