"""``instanas predict``: classify image files with a run directory or an export folder.

Files are decoded and preprocessed the way class-folder training images were (the model's
colour mode, centre square, bilinear resize; ``runtime.preprocess_image``), classified in
batches, and written as CSV rows: path, class, class index, probability, the child that ran,
and a note. A file that cannot be read gets a row with the reason in the note, and a line on
stderr, and the other files go on.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..data import IMAGE_EXTENSIONS
from ..errors import ExportError
from ..runtime import MANIFEST_FILE, ROUTING_FILE, ExportedModel, read_image
from ..space import ChildArchitecture
from ..utils import atomic_write_text, progress_bar
from .inference import load

COLUMNS = ("path", "class", "class_index", "probability", "child", "escalated", "note")


@dataclass
class Prediction:
    path: str
    label: str = ""
    index: int | None = None
    probability: float | None = None
    child: str = ""
    escalated: bool | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.index is None

    def row(self) -> list[str]:
        probability = "" if self.probability is None else f"{self.probability:.6f}"
        index = "" if self.index is None else str(self.index)
        escalated = "" if self.escalated is None else str(int(self.escalated))
        return [self.path, self.label, index, probability, self.child, escalated, self.note]


@dataclass
class Classified:
    """A classifier's answer for a batch of images."""

    probabilities: np.ndarray  # [N, classes]
    wanted: list[str]  # the child the controller picked
    ran: list[str]  # the child that ran (an exported one)
    escalated: list[bool]  # the larger network answered


class Classifier(Protocol):
    classes: list[str]
    channels: int
    size: int

    def classify(self, images: np.ndarray) -> Classified:
        """uint8 [N, C, H, W] -> probabilities, children picked and run, escalation flags."""


class EagerClassifier:
    """A run directory's model in torch (BatchNorm folded, only the chosen modules run)."""

    def __init__(self, run_dir: Path, model: str) -> None:
        self.model = load(run_dir, model)
        self.classes = self.model.classes
        self.channels = self.model.space.input_channels
        self.size = self.model.space.input_size

    def classify(self, images: np.ndarray) -> Classified:
        with torch.inference_mode():
            logits, policy, escalated = self.model.predictor.answer(
                self.model.normalise(torch.from_numpy(images))
            )
        children = [str(ChildArchitecture.from_policy(p)) for p in policy.cpu()]
        flags = escalated.cpu().tolist()
        return Classified(logits.softmax(1).cpu().numpy(), children, children, flags)


class ExportClassifier:
    """An export folder run by its runtime (onnxruntime, image by image)."""

    def __init__(self, folder: Path, threads: int | None) -> None:
        self.model = ExportedModel(folder, threads=threads)
        self.classes = self.model.classes
        self.channels = self.model.input_channels
        self.size = self.model.input_size

    def classify(self, images: np.ndarray) -> Classified:
        probabilities, answers = self.model.predict_proba(images)
        ran = [a.child for a in answers]
        wanted = [a.wanted or a.child for a in answers]
        return Classified(probabilities, wanted, ran, [a.escalated for a in answers])


def open_classifier(target: Path, model: str | None, threads: int | None) -> Classifier:
    """An export folder (has routing.json) or a run directory (has config.yaml)."""
    if (target / ROUTING_FILE).exists() or (target / MANIFEST_FILE).exists():
        if model is not None:
            raise ExportError(
                f"{target} is an export folder, which holds one model: drop "
                "--model, or pass the run directory to choose a model"
            )
        return ExportClassifier(target, threads)
    if (target / "config.yaml").exists():
        if threads is not None:
            torch.set_num_threads(threads)
        return EagerClassifier(target, model or "instanas")
    raise ExportError(
        f"{target} is neither a run directory (config.yaml) nor an export folder "
        f"({ROUTING_FILE}): pass the --output folder of `instanas run` or "
        "`instanas export`"
    )


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix) and image files under folders, recursively.

    A path that does not exist is kept, so that it is reported like an unreadable file.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.parts)
            )
        else:
            files.append(path)
    return files


def predict_files(
    classifier: Classifier, files: Sequence[Path], batch_size: int
) -> Iterator[Prediction]:
    """One Prediction per file, in order; unreadable files get their reason in the note."""
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    for chunk in progress_bar(chunks, desc="predict", unit="batch"):
        images, readable, failed = [], [], {}
        for path in chunk:
            try:
                images.append(read_image(path, classifier.channels, classifier.size))
                readable.append(path)
            except ExportError as exc:
                failed[path] = str(exc)
        results = iter(_classify(classifier, readable, images))
        for path in chunk:
            if path in failed:
                print(f"instanas: {failed[path]}", file=sys.stderr)
                yield Prediction(str(path), note=failed[path])
            else:
                yield next(results)


def _classify(
    classifier: Classifier, paths: list[Path], images: list[np.ndarray]
) -> list[Prediction]:
    if not paths:
        return []
    out = classifier.classify(np.stack(images))
    best = out.probabilities.argmax(axis=1)
    rows = zip(paths, best, out.wanted, out.ran, out.escalated)
    return [
        Prediction(
            str(p),
            classifier.classes[i],
            int(i),
            float(out.probabilities[row, i]),
            r,
            bool(e),
            "" if w == r else f"fallback: the controller chose {w}, not exported",
        )
        for row, (p, i, w, r, e) in enumerate(rows)
    ]


def to_csv(predictions: Sequence[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(p.row() for p in predictions)
    return buffer.getvalue()


def write_predictions(predictions: Sequence[Prediction], output: Path | None) -> None:
    """CSV to ``output`` (atomically) or to stdout."""
    text = to_csv(predictions)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)


def check_output(output: Path | None, force: bool) -> None:
    if output is None:
        return
    if output.is_dir():
        raise ExportError(
            f"-o {output} is a folder: give a file name, e.g. {output / 'predictions.csv'}"
        )
    if output.exists() and not force:
        raise ExportError(
            f"{output} already exists: choose another -o or pass --force to overwrite it"
        )
