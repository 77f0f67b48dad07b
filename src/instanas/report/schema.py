"""The ``results.json`` contract: its version and the JSON Schema shipped with the package."""

from __future__ import annotations

import json
from importlib import resources

# Raised when a field is removed or changes meaning; new optional fields keep the version.
RESULTS_SCHEMA_VERSION = 2  # 2: latency_ms is the latency backend's (onnxruntime by default)


def results_schema() -> dict:
    """The JSON Schema (draft 2020-12) every ``results.json`` of this version satisfies."""
    text = resources.files("instanas").joinpath("schemas/results.schema.json").read_text()
    return json.loads(text)


def validate_results(results: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``results`` breaks the contract.

    Needs the ``jsonschema`` package (in the ``test`` extra); instanas itself never needs it.
    """
    import jsonschema

    jsonschema.validate(results, results_schema(), cls=jsonschema.Draft202012Validator)
