"""AR generators (tokens | condition -> tokens), their shared blocks, heads and sampling.

Importing this package registers every generator with ``zoo.registry``.
"""
from generators.base import Condition, Generator, SamplingConfig

__all__ = ["Condition", "Generator", "SamplingConfig"]

# Each import runs its module's @register decorators.
import generators.himar  # noqa: E402,F401  generator/himar-*   (Hi-MAR)
import generators.mar  # noqa: E402,F401  generator/mar-*     (MAR)
import generators.nar  # noqa: E402,F401  generator/nar-*     (NAR, next-neighbour)
import generators.raster_ar  # noqa: E402,F401  generator/raster-ar-* (LlamaGen baseline)
import generators.var  # noqa: E402,F401  generator/var-*, generator/mvar-*
import generators.xar  # noqa: E402,F401  generator/xar-*     (next-X)
