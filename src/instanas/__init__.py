"""instanas: instance-aware neural architecture search (InstaNAS) with measured latency."""

__version__ = "0.1.0"
