"""The package's version, in a module of its own so that what records it (results, exports,
reports) need not import the package's public facade (``instanas/__init__.py``)."""

__version__ = "0.1.0"
