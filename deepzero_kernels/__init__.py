"""deepzero_kernels: fast zeroth-order (DeepZero) training of deep networks.

Public API (see README): fused perturbation ops in :mod:`deepzero_kernels.ops`, the estimators
:class:`CGE` and :class:`RGE`, ZO-GraSP pruning helpers, and the trainer
``python -m deepzero_kernels.train``.
"""
__version__ = "0.1.0"

from . import ops
from .estimators import CGE, RGE, assign_grads
from .ops import backends
from .pruning import layer_densities, prune_masks, random_masks, zo_grasp_scores

__all__ = ["CGE", "RGE", "assign_grads", "backends", "layer_densities", "ops", "prune_masks",
           "random_masks", "zo_grasp_scores"]
