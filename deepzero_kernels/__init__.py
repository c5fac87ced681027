"""deepzero_kernels: fast zeroth-order (DeepZero) training of deep networks.

Public API (see README): fused perturbation ops in :mod:`deepzero_kernels.ops`, the estimators
:class:`CGE` and :class:`RGE`, ZO-GraSP pruning helpers, and the trainer
``python -m deepzero_kernels.train``.
"""
__version__ = "0.1.0"
