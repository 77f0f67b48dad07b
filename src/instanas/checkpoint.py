"""Checkpoints: weights in safetensors (no pickle), metadata as JSON inside the same file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .utils import atomic_write_bytes


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; one line with the fix."""


def save_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], meta: dict) -> None:
    """Save the state of named modules (e.g. metagraph, controller) and JSON metadata atomically."""
    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    blob = save_safetensors(tensors, metadata={"instanas": json.dumps(meta)})
    atomic_write_bytes(path, blob)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: run the stage that writes it "
                              "first")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("instanas", "{}"))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}): delete it and "
                              "rerun the stage that wrote it") from exc
    return tensors, meta


def load_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module],
                    expect: dict | None = None) -> dict:
    """Load weights into ``modules``; ``expect`` keys (space, classes...) must match."""
    return load_tensors(path, *read_checkpoint(path), modules, expect)


def load_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict,
                 modules: dict[str, nn.Module], expect: dict | None = None) -> dict:
    """Copy already-read checkpoint tensors into ``modules`` (see :func:`load_checkpoint`)."""
    if expect:
        diffs = [k for k, v in expect.items() if meta.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {path} does not match this run ({', '.join(diffs)} "
                                  "differ): use the run directory and preset it was made with")
    for prefix, module in modules.items():
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit the {prefix} ({first}): use the "
                                  "run directory and preset it was made with") from exc
    return meta
