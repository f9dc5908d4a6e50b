"""Sampling CLI: ``arzoo sample`` / ``python -m sample`` (see :mod:`sample.cli`).

Library use goes through :class:`zoo.pipeline.Pipeline`.
"""
