"""``python -m deepzero_kernels`` is the trainer (same flags as ``python -m deepzero_kernels.train``)."""
import sys

from .train import main

sys.exit(main())
