"""Baseline training methods the paper compares DeepZero with, written here from their papers'
algorithms (imported by module, e.g. ``from deepzero_kernels.baselines import pattern_search``):
they exist to run the paper's experiments (``python/experiments``) on the same data and models."""
