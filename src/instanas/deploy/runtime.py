"""Run an exported InstaNAS model without torch: numpy, Pillow and onnxruntime only.

An export folder (``instanas export``) holds the BatchNorm-folded controller, one static network
per exported child, ``routing.json`` (how a controller output becomes a child file) and
``manifest.json`` (versions and checksums). This module reads that folder, routes each image
the way the trained model does (greedy policy ``logit >= 0``, then the empty-cell rule) and
runs only the chosen child: image by image or batched, one pass per child in the batch.

It must never import torch: deployment machines may not have it, and a test checks this in
a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROUTING_FILE = "routing.json"
MANIFEST_FILE = "manifest.json"
EXPORT_FORMAT_VERSION = 1
# Exceptions Pillow raises for files that are not (whole) images.
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)

# A session maps a float32 batch [N, C, H, W] to the network's one output.
Session = Callable[[np.ndarray], np.ndarray]
SessionFactory = Callable[[Path, "int | None"], Session]


try:  # inside the package: the class the command line reports (instanas.errors)
    from ..errors import ExportError
except ImportError:  # the copy in an export folder runs without the package

    class ExportError(ValueError):  # type: ignore[no-redef]
        """A missing, changed or unusable export folder, or bad input to it; one line."""

        def __init__(self, message: str) -> None:
            super().__init__(" ".join(message.split()))


# --------------------------------------------------------------------------- preprocessing


def image_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def preprocess_image(image: Any, channels: int, size: int) -> np.ndarray:
    """A Pillow image -> uint8 [channels, size, size], the way training images were made.

    Palette images go through RGBA (palette transparency), then the model's mode (``L`` for
    gray models, ``RGB`` otherwise); a centre square is cropped and resized bilinearly
    (the folder loader's recipe; an image already at the model's size is left as it is).
    """
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    image = image.convert(image_mode(channels))  # forces the full decode: corrupt files fail here
    w, h = image.size
    side = min(w, h)
    if (w, h) != (size, size):
        left, top = (w - side) // 2, (h - side) // 2
        # crop() before resize(): resize(box=...) would blend in pixels from outside the box.
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((size, size), _bilinear())
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def _bilinear() -> Any:
    from PIL import Image

    return Image.Resampling.BILINEAR


def read_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """Decode one image file into uint8 [channels, size, size]; ExportError names the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess_image(image, channels, size)
    except (*_IMAGE_ERRORS, Image.DecompressionBombError) as exc:
        raise ExportError(f"cannot read image {path} ({exc}): replace or delete the file") from None


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 ``(x / 255 - mean) / std``, the network's input."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ExportError(
            f"images are {images.dtype} {images.shape}: pass uint8 [N, C, H, W] "
            "(read_image makes them)"
        )
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(1, -1, 1, 1)
    shift = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(1, -1, 1, 1)
    return images.astype(np.float32) * scale - shift


# --------------------------------------------------------------------------- routing


def resolve_policies(logits: np.ndarray, forced: Sequence[bool], default_module: int) -> np.ndarray:
    """Greedy policy (logit >= 0, i.e. p >= 0.5) with the empty-cell rule: bool [N, cells, M].

    A shape-changing cell (``forced``) with nothing selected runs ``default_module``; an empty
    shape-preserving cell stays empty (the identity).
    """
    policy = logits >= 0
    needs_default = ~policy.any(axis=-1) & np.asarray(forced, dtype=bool)
    policy[..., default_module] |= needs_default
    return policy


def child_string(policy: np.ndarray) -> str:
    """[cells, modules] bool -> ``"0-13-_-4"`` (same notation as ChildArchitecture)."""
    return "-".join("".join(str(m) for m in np.flatnonzero(row)) or "_" for row in policy)


def child_modules(child: str) -> set[tuple[int, int]]:
    """The (cell, module) pairs a child string runs."""
    return {(c, int(m)) for c, part in enumerate(child.split("-")) if part != "_" for m in part}


def fallback_child(child: str, exported: Sequence[str]) -> str:
    """The exported child that stands in for ``child`` when it was not exported.

    Rule: among exported children that run every module ``child`` runs (a superset), the one
    with the fewest modules; when none is a superset, the one differing in the fewest
    (cell, module) entries. Ties go to the earlier child of ``exported`` (the more frequent
    on the validation split). A superset keeps all the features the image was routed to.
    """
    wanted = child_modules(child)
    sets = [child_modules(e) for e in exported]
    supersets = [i for i, s in enumerate(sets) if wanted <= s]
    if supersets:
        return exported[min(supersets, key=lambda i: (len(sets[i]), i))]
    return exported[min(range(len(sets)), key=lambda i: (len(wanted ^ sets[i]), i))]


# --------------------------------------------------------------------------- sessions


def onnx_session(path: Path, threads: int | None = None) -> Session:
    """An onnxruntime CPU session for ``path`` as a function of one float32 batch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed: pip install 'instanas[export]' "
            "(or pip install onnxruntime)"
        ) from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{path.parent} has no {path.name}: pass a folder written by `instanas export`"
        ) from None
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}): export the {what} again") from None


def verify_manifest(folder: Path, manifest: dict) -> None:
    """Fail when a listed file is missing or its bytes changed since the export."""
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path} is missing: copy the whole export folder or export again")
        if sha256_file(path) != entry["sha256"]:
            raise ExportError(
                f"{path} changed since the export (SHA-256 differs from "
                f"{MANIFEST_FILE}): export again"
            )


# --------------------------------------------------------------------------- the model


class ExportedModel:
    """An export folder ready to classify: ``ExportedModel(folder).predict(images)``.

    ``images`` for every method: float32 [N, C, H, W] already normalised (``normalise``), or
    uint8 [N, C, H, W] at the model's input size, which is normalised here.
    """

    def __init__(
        self,
        folder: str | Path,
        threads: int | None = None,
        session_factory: SessionFactory | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.routing = read_json(self.folder / ROUTING_FILE, "model")
        if verify:
            verify_manifest(self.folder, read_json(self.folder / MANIFEST_FILE, "model"))
        fmt = self.routing.get("format")
        if session_factory is None and fmt != "onnx":
            raise ExportError(
                f"{self.folder} is a {fmt} export, which needs torch: use "
                "`instanas predict` or export with --format onnx"
            )
        self.threads = threads
        self._factory = session_factory or onnx_session
        self._sessions: dict[str, Session] = {}
        rule = self.routing["empty_cell_rule"]
        self.forced, self.default_module = rule["forced_cells"], rule["default_module"]
        self.children = [c["child"] for c in self.routing["children"]]  # most frequent first
        self.files = dict(self.routing["policy_to_file"])

    @property
    def classes(self) -> list[str]:
        return list(self.routing["classes"])

    @property
    def input_channels(self) -> int:
        return int(self.routing["input"]["channels"])

    @property
    def input_size(self) -> int:
        return int(self.routing["input"]["size"])

    def session(self, name: str) -> Session:
        """The session of one file of the export, opened on first use."""
        if name not in self._sessions:
            self._sessions[name] = self._factory(self.folder / name, self.threads)
        return self._sessions[name]

    def prepare(self, images: np.ndarray) -> np.ndarray:
        expected = (self.input_channels, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ExportError(
                f"images have shape {tuple(images.shape)}, expected [N, "
                f"{expected[0]}, {expected[1]}, {expected[2]}]: read files with "
                "read_image, which resizes them"
            )
        if images.dtype == np.uint8:
            norm = self.routing["normalization"]
            return normalise(images, norm["mean"], norm["std"])
        return np.ascontiguousarray(images, dtype=np.float32)

    def route(self, images: np.ndarray) -> tuple[list[str], list[str]]:
        """(the child the controller picks, the exported child that runs it) per image."""
        x = self.prepare(images)
        logits = self.session(self.routing["controller"]["file"])(x)
        policies = resolve_policies(logits, self.forced, self.default_module)
        wanted = [child_string(p) for p in policies]
        return wanted, [c if c in self.files else fallback_child(c, self.children) for c in wanted]

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
        """Batched: (logits [N, classes], picked children, children run), one pass per child."""
        x = self.prepare(images)
        wanted, ran = self.route(x)
        out = np.empty((len(x), len(self.classes)), dtype=np.float32)
        for child in dict.fromkeys(ran):  # first-seen order, each child once
            rows = np.array([i for i, c in enumerate(ran) if c == child])
            out[rows] = self.session(self.files[child])(np.ascontiguousarray(x[rows]))
        return out, wanted, ran

    def logits_one(self, image: np.ndarray) -> np.ndarray:
        """Batch-1 path: controller, then the chosen child's network; logits [1, classes]."""
        x = self.prepare(image)
        logits = self.session(self.routing["controller"]["file"])(x)
        child = child_string(resolve_policies(logits, self.forced, self.default_module)[0])
        if child not in self.files:
            child = fallback_child(child, self.children)
        return self.session(self.files[child])(x)

    def predict_proba(self, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(softmax probabilities [N, classes], the child each image ran)."""
        logits, _, ran = self.logits(images)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), ran

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class indices [N]."""
        return self.logits(images)[0].argmax(axis=1)

    def read_images(self, paths: Iterable[str | Path]) -> np.ndarray:
        """Image files -> uint8 [N, C, H, W] at the model's input size."""
        arrays = [read_image(p, self.input_channels, self.input_size) for p in paths]
        return (
            np.stack(arrays)
            if arrays
            else np.zeros((0, self.input_channels, self.input_size, self.input_size), np.uint8)
        )


def load(folder: str | Path, threads: int | None = None) -> ExportedModel:
    """An ONNX export folder, checksums verified, ready for onnxruntime."""
    return ExportedModel(folder, threads=threads)
