"""Fused Triton sampling kernels behind :mod:`generators.sampling`.

:mod:`generators.sampling` is the single entry point; on CUDA tensors it calls these kernels
when Triton imports and the environment variable ``ARZOO_KERNELS`` is not ``"0"``, and the
torch reference everywhere else. Modules:

``categorical``  CFG + temperature + top-k + top-p + Gumbel-max in one kernel (``fused_categorical``)
``bitwise``      CFG + temperature + Bernoulli bits for binary tokens, packed output (``fused_bits``)
``flow``         CFG + Euler step on velocity predictions (``fused_flow_step``)
``rng``          the counter-based Philox stream in torch (bit-exact with the kernels; no Triton)
``packing``      ``pack_bits`` / ``unpack_bits`` (no Triton)

Importing this package does not import Triton; the kernel modules are imported on first use.
On a machine without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported; see :func:`interpreter_ready`),
which is how the tests check them on CPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from generators.kernels.packing import pack_bits, unpack_bits
from generators.kernels.rng import philox_uniform

ENV_SWITCH = "ARZOO_KERNELS"


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (the kernels also need CUDA or ``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install means: no kernels, use torch)
        return False
    return True


def interpreting() -> bool:
    """Whether Triton will run kernels in its CPU interpreter (``TRITON_INTERPRET`` set)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """Whether kernels can run in Triton's CPU interpreter in this process.

    Needs ``TRITON_INTERPRET=1`` set *before* ``triton.language`` is first imported: Triton
    decides at import whether its own library functions (``tl.zeros``, ``tl.sum``, ...) are
    interpreted. Importing torchvision / ``torch._dynamo`` imports Triton, so set the variable
    at process start (e.g. in ``conftest.py``) or before importing anything from the zoo.
    """
    if not (interpreting() and available()):
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def enabled_for(t: torch.Tensor) -> bool:
    """Dispatch rule of :mod:`generators.sampling`: CUDA tensor, Triton importable, ``ARZOO_KERNELS != "0"``."""
    return bool(t.is_cuda) and os.environ.get(ENV_SWITCH, "1") != "0" and available()


def fused_categorical(*args, **kw):
    """See :func:`generators.kernels.categorical.fused_categorical`."""
    from generators.kernels.categorical import fused_categorical as f
    return f(*args, **kw)


def fused_bits(*args, **kw):
    """See :func:`generators.kernels.bitwise.fused_bits`."""
    from generators.kernels.bitwise import fused_bits as f
    return f(*args, **kw)


def fused_flow_step(*args, **kw):
    """See :func:`generators.kernels.flow.fused_flow_step`."""
    from generators.kernels.flow import fused_flow_step as f
    return f(*args, **kw)


__all__ = [
    "ENV_SWITCH",
    "available",
    "enabled_for",
    "fused_bits",
    "fused_categorical",
    "fused_flow_step",
    "interpreter_ready",
    "interpreting",
    "pack_bits",
    "philox_uniform",
    "unpack_bits",
]
