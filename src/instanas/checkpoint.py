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

from .errors import CheckpointError as CheckpointError  # raised here; importable here too
from .utils import atomic_write_bytes

# First bytes of torch.save output: a zip archive, or a bare pickle (protocol 2 or later).
_PICKLE_MAGIC = (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def save_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], meta: dict) -> None:
    """Save the state of named modules (e.g. metagraph, controller) and JSON metadata atomically."""
    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value
    save_tensors(path, tensors, meta)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write named tensors and JSON metadata as one safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = save_safetensors(tensors, metadata={"instanas": json.dumps(meta)})
    atomic_write_bytes(path, blob)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist: run the stage that writes it first"
        )
    try:
        data = path.read_bytes()
        if data[:2] in _PICKLE_MAGIC:
            raise CheckpointError(
                f"checkpoint {path} is a pickle (torch.save), not safetensors; "
                "pickles can run code, so instanas never loads them: rerun the "
                "stage that wrote it"
            )
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("instanas", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (SafetensorError, ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({exc}): delete it and "
            "rerun the stage that wrote it"
        ) from exc
    return tensors, meta


def load_checkpoint(
    path: str | os.PathLike, modules: dict[str, nn.Module], expect: dict | None = None
) -> dict:
    """Load weights into ``modules``; ``expect`` keys (space, classes...) must match."""
    return load_tensors(path, *read_checkpoint(path), modules, expect)


def load_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    modules: dict[str, nn.Module],
    expect: dict | None = None,
) -> dict:
    """Copy already-read checkpoint tensors into ``modules`` (see :func:`load_checkpoint`)."""
    check_identity(path, meta, expect or {})
    load_module_states(
        path, tensors, modules, fix="use the run directory and preset it was made with"
    )
    return meta


def load_module_states(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    *,
    fix: str,
    key_prefix: str = "",
) -> None:
    """Load each module from the tensors named ``{key_prefix}{name}.*``; one-line error with
    ``fix`` when they do not fit."""
    for name, module in modules.items():
        prefix = f"{key_prefix}{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {path} does not fit the {name} ({first}): {fix}"
            ) from exc


def check_identity(path: str | os.PathLike, meta: dict, expect: dict) -> None:
    """Fail, listing what differs, when ``meta`` disagrees with ``expect`` (space, classes...)."""
    diffs: list[str] = []
    for key, value in expect.items():
        if key in _RECORDED_LATER and key not in meta:
            continue  # written before instanas recorded it: nothing to compare
        _differences(key, meta.get(key), value, diffs)
    if diffs:
        shown = "; ".join(diffs[:_SHOWN_DIFFERENCES])
        more = (
            f"; {len(diffs) - _SHOWN_DIFFERENCES} more" if len(diffs) > _SHOWN_DIFFERENCES else ""
        )
        raise CheckpointError(
            f"checkpoint {path} does not match this run ({shown}{more}): use "
            "the run directory, preset and data it was made with"
        )


_SHOWN_DIFFERENCES = 4
_RECORDED_LATER = ("preset",)


def _differences(name: str, found: object, wanted: object, out: list[str]) -> None:
    """Leaf-level differences as 'name: checkpoint X, this run Y' (lists of equal length and
    mappings are compared item by item, so the message points at the field that differs)."""
    if found == wanted:
        return
    if isinstance(found, dict) and isinstance(wanted, dict):
        for key in sorted(set(found) | set(wanted), key=str):
            _differences(f"{name}.{key}", found.get(key), wanted.get(key), out)
    elif isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        for i, (a, b) in enumerate(zip(found, wanted)):
            _differences(f"{name}[{i}]", a, b, out)
    elif isinstance(found, list) and isinstance(wanted, list):
        out.append(f"{name}: checkpoint has {len(found)} entries, this run {len(wanted)}")
    else:
        out.append(f"{name}: checkpoint {_short(found)}, this run {_short(wanted)}")


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
