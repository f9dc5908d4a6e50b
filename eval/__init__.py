"""Evaluation: FID/IS/KID/PR (torch-fidelity), the GenEval protocol, reconstruction metrics and
the sampling benchmark (``python -m eval.bench``).

Kept import-free: ``zoo.registry`` imports ``eval.models`` when it exists, and the CLIs import
their own submodules.
"""
