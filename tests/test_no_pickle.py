"""No code path in the package unpickles a file: checkpoints and tables are shared between people,
and unpickling runs whatever code the file names. Scans the source, so new code is covered too."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

import instanas

PACKAGE = Path(instanas.__file__).parent
# Modules whose loaders can run code stored in the data they read.
UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "jsonpickle",
}
# The one allowed site. CIFAR-10/100 are published only as Python pickles, so data/cifar.py reads
# them with _ArrayUnpickler, whose find_class admits numpy's array-rebuilding globals and nothing
# else (test_cifar_unpickler_refuses_other_globals below checks that). It names pickle.Unpickler
# (as the base class) and pickle.UnpicklingError, and nothing else from pickle.
ALLOWED_PICKLE_NAMES = {
    ("data/cifar.py", "pickle.Unpickler"),
    ("data/cifar.py", "pickle.UnpicklingError"),
}
ALLOWED_PICKLE_IMPORTS = {"data/cifar.py"}
# No module loads code from files (TorchScript export was removed: exports are ONNX graphs).
ALLOWED_CODE_LOADS: set[tuple[str, str]] = set()


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return None


def _problems(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES and rel not in ALLOWED_PICKLE_IMPORTS:
                    found.append(f"{where} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where} imports from {node.module}")
            for alias in node.names:
                if alias.name in ("load", "loads") and node.module in ("torch", "numpy", "yaml"):
                    found.append(f"{where} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.split(".")[0] in UNSAFE_MODULES and (rel, name) not in ALLOWED_PICKLE_NAMES:
                found.append(f"{where} uses {name}")
        if isinstance(node, ast.Call):
            if (rel, _dotted(node.func)) not in ALLOWED_CODE_LOADS:
                found += _unsafe_call(where, _dotted(node.func), node)
    return found


def _unsafe_call(where: str, name: str, call: ast.Call) -> list[str]:
    if (
        name in ("torch.load", "torch.serialization.load")
        and _keyword(call, "weights_only") is not True
    ):
        return [f"{where} calls {name} without weights_only=True"]
    if name in ("torch.jit.load", "torch.package.PackageImporter"):
        return [f"{where} calls {name}, which runs code stored in the file"]
    if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (None, False):
        return [f"{where} calls {name} with allow_pickle"]
    if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        return [f"{where} calls {name}; use yaml.safe_load"]
    if name in ("eval", "exec"):
        return [f"{where} calls {name}"]
    return []


def test_no_code_path_unpickles_a_file():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    problems = [p for source in sources for p in _problems(source)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_unsafe_loads(tmp_path, monkeypatch):
    """The scanner itself: each of these must be reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\nimport numpy as np\nimport yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "np.load('x', allow_pickle=True)\nyaml.load('x')\npickle.loads(b'')\n"
        "from pickle import Unpickler\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert len(_problems(bad)) == 7


def test_cifar_unpickler_refuses_other_globals(tmp_path):
    from instanas.data import _ArrayUnpickler

    class Trap:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "unpickled",))

    data = pickle.dumps({"data": np.zeros((2, 3), dtype=np.uint8), "trap": Trap()})
    with open(tmp_path / "batch", "wb") as handle:
        handle.write(data)
    with open(tmp_path / "batch", "rb") as handle, pytest.raises(pickle.UnpicklingError):
        _ArrayUnpickler(handle, encoding="latin1").load()
    assert not (tmp_path / "unpickled").exists()
    # Arrays alone still load: that is what CIFAR batches hold.
    arrays = pickle.dumps({"data": np.arange(6, dtype=np.uint8).reshape(2, 3)})
    with open(tmp_path / "ok", "wb") as handle:
        handle.write(arrays)
    with open(tmp_path / "ok", "rb") as handle:
        assert _ArrayUnpickler(handle, encoding="latin1").load()["data"].sum() == 15
