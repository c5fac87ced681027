"""Delta rules by op family, registered with :func:`~.registry.rule`; importing this package
registers them all. Adding an op: one decorated function in the file of its family and one case
in ``tests/test_zoo.py`` (see CONTRIBUTING.md)."""
from . import arithmetic, attention, elementwise, linear, normalization, pooling, shape  # noqa: F401  (registration)
from .normalization import uses_batch_stats
from .registry import (RuleContext, fallback, find_rule, find_source_rule, mixes_channels, propagate, rule,
                       source_rule)

__all__ = ["RuleContext", "fallback", "find_rule", "find_source_rule", "mixes_channels", "propagate", "rule",
           "source_rule", "uses_batch_stats"]
