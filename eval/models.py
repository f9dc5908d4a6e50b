"""Evaluation networks in the model registry (``zoo.registry`` imports this module lazily).

``eval/shapes-net``: the Shapes feature network behind Shapes-FID (``eval/features.py``).
"""
from eval import features  # noqa: F401  (runs its @register)
