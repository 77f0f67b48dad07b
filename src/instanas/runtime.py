"""Run an exported InstaNAS model without torch: numpy, Pillow and onnxruntime only.

An export folder (``instanas export``) holds the deployed model as batch-1 ONNX graphs: a
``controller.onnx`` (the BatchNorm-folded controller and the routing: which exported child an
image runs), one graph per exported child (the shared stem, only that child's modules, the
head) and, when the run has an escalation rule, ``escalation.onnx`` (the larger network that
answers when the child's top softmax probability is below the threshold). ``routing.json`` says
what the files and their outputs mean; ``manifest.json`` records versions and checksums.

Per image this module runs the controller's session, routes its policy to an exported child
(``Router``: one dictionary lookup when the policy is an exported child), then runs the chosen
child's session, then the escalation's when the child is unsure: each session with bound input
and output buffers. A child is chosen here rather than by If nodes inside one graph because
onnxruntime's If costs more per image than a second session call, and the routing is done here
rather than in the controller's graph because ten small graph nodes cost more than the lookup
(docs/latency.md, "The deployed path").

It must never import torch: deployment machines may not have it, and a test checks this in
a fresh interpreter. Inside the package it is ``instanas.runtime``; an export carries a copy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROUTING_FILE = "routing.json"
MANIFEST_FILE = "manifest.json"
# 3: controller, children and escalation as graphs of their own; 4: the routing in the runtime
EXPORT_FORMAT_VERSION = 4
# Exceptions Pillow raises for files that are not (whole) images.
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)

# The outputs of controller.onnx, in order: the greedy policy (uint8 [1, cells, modules], 1
# where the logit is >= 0, before the empty-cell rule) and the policy logits.
CONTROLLER_OUTPUTS = ("policy", "policy_logits")


try:  # inside the package: the class the command line reports (instanas.errors)
    from .errors import ExportError
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


def nearest_child(child: str, exported: Sequence[str]) -> str:
    """The exported child that runs for ``child``: itself when exported, otherwise the one
    differing in the fewest (cell, module) entries, ties to the earlier (more used) one.
    ``Router`` makes the same choice from policy logits."""
    wanted = child_modules(child)
    return min(exported, key=lambda e: len(wanted ^ child_modules(e)))


class Router:
    """The exported child an image runs, from its policy logits: ``nearest_child`` of its
    greedy policy after the empty-cell rule.

    Deployed images mostly pick an exported child, so every raw greedy policy (the graph's
    uint8 ``policy`` output) that the rule turns into an exported child is a key of one
    dictionary: the common case is one lookup, no numpy arithmetic. Other policies get the
    rule and the nearest child by counting differences.
    """

    # Per child, the raw policies tried as keys double with every forced cell that runs only
    # the default module (empty or not); above this many such cells the rest go the slow way.
    _MAX_OPTIONAL_CELLS = 10
    # Policies outside the exported children whose nearest child is remembered.
    _MAX_REMEMBERED = 1 << 16

    def __init__(
        self, children: Sequence[str], forced: Sequence[bool], default_module: int, modules: int
    ) -> None:
        self.forced = np.asarray(forced, dtype=bool)
        self.default_module = default_module
        bits = np.zeros((len(children), len(forced), modules), dtype=bool)
        for k, child in enumerate(children):
            for cell, module in child_modules(child):
                bits[k, cell, module] = True
        self.bits = bits.reshape(len(children), -1)
        self.exact: dict[bytes, int] = {}
        for k in range(len(children)):
            for raw in self._raw_policies(bits[k]):
                self.exact.setdefault(raw.astype(np.uint8).tobytes(), k)

    def _raw_policies(self, resolved: np.ndarray) -> list[np.ndarray]:
        """The greedy policies [cells * modules] that the empty-cell rule turns into
        ``resolved``: in a forced cell running only the default module, that module may be
        off."""
        alone = np.zeros(resolved.shape[1], dtype=bool)
        alone[self.default_module] = True
        optional = [c for c in np.flatnonzero(self.forced) if (resolved[c] == alone).all()]
        policies = [resolved.copy()]
        for cell in optional[: self._MAX_OPTIONAL_CELLS]:
            for policy in list(policies):
                emptied = policy.copy()
                emptied[cell, self.default_module] = False
                policies.append(emptied)
        return [p.reshape(-1) for p in policies]

    def __call__(self, policy: np.ndarray, policy_logits: np.ndarray) -> int:
        """The index of the child one image runs, from its greedy policy (uint8) and its
        logits, both [1, cells, modules]."""
        key = policy.tobytes()
        index = self.exact.get(key)
        if index is not None:
            return index
        cells = self.forced.shape[0]
        resolved = resolve_policies(policy_logits.reshape(cells, -1), self.forced,
                                    self.default_module)  # fmt: skip
        index = int(np.argmin((self.bits != resolved.reshape(-1)).sum(axis=1)))
        # A policy seen once comes back: the nearest child is remembered, so from then on it
        # costs one lookup too (about 1 us against 20 us); bounded, as policies are 2^85.
        if len(self.exact) < self._MAX_REMEMBERED:
            self.exact[key] = index
        return index


# --------------------------------------------------------------------------- sessions


def onnx_session(model: Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for a graph (a file or its bytes), ``threads`` intra-op."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed: pip install onnxruntime (instanas installs it)"
        ) from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class BoundSession:
    """A batch-1 session whose input and output buffers stay bound between calls, as a serving
    loop keeps them: the graph reads ``buffer`` (shared when given, so that several sessions
    read one copy of the image) and writes its outputs into the same arrays each time (read
    or copy them before the next call)."""

    def __init__(self, session: Any, buffer: np.ndarray | None = None) -> None:
        import onnxruntime as ort

        self.session = session
        name = session.get_inputs()[0].name
        shape = [1, *session.get_inputs()[0].shape[1:]]
        self.buffer = np.zeros(shape, dtype=np.float32) if buffer is None else buffer
        # One run on zeros gives every output's shape and type; the graphs have fixed shapes.
        zeros = np.zeros(shape, dtype=np.float32)
        self.outputs = [np.empty_like(o) for o in session.run(None, {name: zeros})]
        self.binding = session.io_binding()
        self.binding.bind_cpu_input(name, self.buffer)
        for output, array in zip(session.get_outputs(), self.outputs):
            self.binding.bind_ortvalue_output(output.name, ort.OrtValue.ortvalue_from_numpy(array))

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        np.copyto(self.buffer, image)
        return self.run()

    def run(self) -> list[np.ndarray]:
        """The graph on what the input buffer holds now."""
        self.session.run_with_iobinding(self.binding)
        return self.outputs


def top_probability(logits: np.ndarray) -> float:
    """The largest softmax probability of one image's logits [classes], in float32 as the
    eager model computes it (a threshold picked at an image's own value must agree)."""
    return float(1.0 / np.exp(logits - logits.max()).sum())


class RoutedSessions:
    """The deployed path of one image: the controller and its ``router`` (absent with one
    child), the chosen child, and the larger network when the child's top softmax
    probability is below ``threshold``. Every session reads one shared copy of the image."""

    def __init__(
        self,
        controller: Any | None,
        children: Sequence[Any],
        escalation: Any | None = None,
        threshold: float = 0.0,
        router: Router | None = None,
    ) -> None:
        if controller is not None and router is None:
            raise ValueError("a controller needs a router to say which child its policy runs")
        shape = [1, *children[0].get_inputs()[0].shape[1:]]
        self.image = np.zeros(shape, dtype=np.float32)

        def bound(session: Any | None) -> BoundSession | None:
            return BoundSession(session, self.image) if session is not None else None

        self.controller = bound(controller)
        self.router = router
        self.children = [BoundSession(child, self.image) for child in children]
        self.escalation = bound(escalation)
        self.threshold = threshold

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, int, bool, np.ndarray | None]:
        """(logits [classes], the child's index, escalated, policy logits or None): arrays the
        next call overwrites."""
        np.copyto(self.image, image)
        index, policy_logits = 0, None
        if self.controller is not None:
            policy, policy_logits = self.controller.run()
            index = self.router(policy, policy_logits)  # type: ignore[misc]
        logits = self.children[index].run()[0][0]
        if self.escalation is not None and top_probability(logits) < self.threshold:
            return self.escalation.run()[0][0], index, True, policy_logits
        return logits, index, False, policy_logits


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


class Answer:
    """What the deployed graph says about one image."""

    __slots__ = ("logits", "child", "escalated", "wanted")

    def __init__(self, logits: np.ndarray, child: str, escalated: bool, wanted: str | None):
        self.logits = logits  # [classes]
        self.child = child  # the exported child that ran
        self.escalated = escalated  # the larger network answered instead
        self.wanted = wanted  # the child the controller picked (None: no controller exported)


class ExportedModel:
    """An export folder ready to classify: ``ExportedModel(folder).predict(images)``.

    ``images`` for every method: float32 [N, C, H, W] already normalised (``normalise``), or
    uint8 [N, C, H, W] at the model's input size, which is normalised here.
    """

    def __init__(self, folder: str | Path, threads: int | None = None, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.routing = read_json(self.folder / ROUTING_FILE, "model")
        if self.routing.get("format_version") != EXPORT_FORMAT_VERSION:
            raise ExportError(
                f"{self.folder} was exported in format "
                f"{self.routing.get('format_version')}, this runtime reads format "
                f"{EXPORT_FORMAT_VERSION}: export the model again with this instanas"
            )
        if verify:
            verify_manifest(self.folder, read_json(self.folder / MANIFEST_FILE, "model"))
        self.threads = threads
        rule = self.routing["empty_cell_rule"]
        self.forced, self.default_module = rule["forced_cells"], rule["default_module"]
        self.children = [c["child"] for c in self.routing["children"]]  # most used first
        self.path = self._sessions(self.routing["model"])

    def _sessions(self, files: dict) -> RoutedSessions:
        def session(name: str | None) -> Any:
            return onnx_session(self.folder / name, self.threads) if name else None

        threshold = (self.routing["escalation"] or {}).get("threshold", 0.0)
        children = [session(c["file"]) for c in self.routing["children"]]
        router = Router(self.children, self.forced, self.default_module,
                        int(self.routing["modules"]))  # fmt: skip
        return RoutedSessions(session(files["controller"]), children,
                              session(files["escalation"]), threshold, router)  # fmt: skip

    @property
    def classes(self) -> list[str]:
        return list(self.routing["classes"])

    @property
    def input_channels(self) -> int:
        return int(self.routing["input"]["channels"])

    @property
    def input_size(self) -> int:
        return int(self.routing["input"]["size"])

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

    def run_one(self, image: np.ndarray) -> None:
        """The deployed path for one prepared image [1, C, H, W], nothing else."""
        self.path(image)

    def answer_one(self, image: np.ndarray) -> Answer:
        """Run one prepared image and read what the deployed path says."""
        logits, index, escalated, policy_logits = self.path(image)
        wanted = None
        if policy_logits is not None:
            policy = resolve_policies(policy_logits, self.forced, self.default_module)
            wanted = child_string(policy[0])
        return Answer(logits.copy(), self.children[index], escalated, wanted)

    def answers(self, images: np.ndarray) -> list[Answer]:
        """One answer per image, each through the batch-1 graph."""
        x = self.prepare(images)
        return [self.answer_one(x[i : i + 1]) for i in range(len(x))]

    def logits_one(self, image: np.ndarray) -> np.ndarray:
        """Batch-1 path: logits [1, classes]."""
        return self.answer_one(self.prepare(image)).logits[None]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits [N, classes]."""
        answers = self.answers(images)
        if not answers:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.stack([a.logits for a in answers])

    def predict_proba(self, images: np.ndarray) -> tuple[np.ndarray, list[Answer]]:
        """(softmax probabilities [N, classes], each image's answer)."""
        answers = self.answers(images)
        logits = np.stack([a.logits for a in answers]) if answers else np.zeros((0, 1), "f4")
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), answers

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class indices [N]."""
        return self.logits(images).argmax(axis=1)

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
