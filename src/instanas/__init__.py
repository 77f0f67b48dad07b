"""instanas: instance-aware neural architecture search (InstaNAS) with measured latency."""

import os as _os

# Sparse execution gives every module a batch of varying size; oneDNN builds a new convolution
# primitive per shape and its default cache (1024) is far smaller than 255 convolutions x a few
# dozen sizes, so without this most training steps rebuild kernels (about 1.5x slower). The
# variable is read lazily at the first convolution, so it works even after torch is imported.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

__version__ = "0.1.0"

from .controller import Controller  # noqa: E402
from .exporter import export  # noqa: E402
from .inference import InstaNASModel, load  # noqa: E402
from .metagraph import MetaGraph  # noqa: E402
from .space import ChildArchitecture, SearchSpace  # noqa: E402

__all__ = ["ChildArchitecture", "Controller", "InstaNASModel", "MetaGraph", "SearchSpace",
           "__version__", "export", "load"]
