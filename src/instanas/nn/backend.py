"""Settings of the CPU kernel library that sparse execution needs, applied by the entry points
(the command line, a run, :func:`instanas.load`) rather than on import."""

from __future__ import annotations

import os

# Sparse execution gives every module a batch of varying size; oneDNN builds a new convolution
# primitive per shape and its default cache (1024) is far smaller than 255 convolutions x a few
# dozen sizes, so most training steps would rebuild kernels (bench/train_step.py). oneDNN reads
# the variable at the first convolution, so setting it after torch is imported still works.
PRIMITIVE_CACHE_CAPACITY = "65536"


def enlarge_primitive_cache() -> None:
    """Raise oneDNN's primitive cache unless the user set its size."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", PRIMITIVE_CACHE_CAPACITY)
