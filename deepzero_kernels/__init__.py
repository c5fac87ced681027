"""deepzero_kernels: fast zeroth-order (DeepZero) training of deep networks.

Public API (see README): fused perturbation ops in :mod:`deepzero_kernels.ops`, the estimators
:class:`CGE` and :class:`RGE`, ZO-GraSP pruning helpers, and the trainer
``python -m deepzero_kernels.train``.
"""
__version__ = "0.1.0"

# Before torch loads its OpenMP runtime: waiting OpenMP threads sleep instead of spinning, so a
# busy neighbour on shared cores costs its share of the cores, not 10-40x (see runtime.py).
from . import runtime as _runtime

_runtime.apply_omp_defaults()

from . import ops  # noqa: E402
from .estimators import CGE, RGE, assign_grads  # noqa: E402
from .kernels.registry import selftest  # noqa: E402
from .ops import backends  # noqa: E402
from .pruning import layer_densities, prune_masks, random_masks, zo_grasp_scores  # noqa: E402

__all__ = ["CGE", "RGE", "assign_grads", "backends", "layer_densities", "ops", "prune_masks",
           "random_masks", "selftest", "zo_grasp_scores"]
