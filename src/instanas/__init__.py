"""instanas: instance-aware neural architecture search (InstaNAS) with measured latency.

The building blocks are importable from here: ``SearchSpace`` and ``ChildArchitecture`` (the
search space and child encodings), ``MetaGraph`` (the supernet), ``Controller`` (the policy
network), ``load`` (a trained run as an ``nn.Module``, :class:`InstaNASModel`) and ``export``
(a trained model as one ONNX graph). They are imported on first use, so that
``instanas.runtime`` (which runs exports) works on machines without torch.
"""

from importlib import import_module as _import_module

from .version import __version__ as __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "ChildArchitecture": "space",
    "Controller": "models.controller",
    "InstaNASModel": "deploy.inference",
    "MetaGraph": "models.metagraph",
    "SearchSpace": "space",
    "export": "deploy.export",
    "load": "deploy.inference",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'instanas' has no attribute {name!r}")
    value = getattr(_import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
