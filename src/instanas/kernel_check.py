"""Native-kernel guard: every convolution shape a configuration builds, run forward and backward.

oneDNN and ATen choose AVX-512 or AVX2 kernels at run time, and some of those kernels have
corrupted the heap for narrow sets of shapes (docs/troubleshooting.md, "Native crashes"). A crash
there kills a process hours into a run, or silently changes numbers. This module lists the
convolution shapes of a configuration (meta-graph with every module on, the MobileNetV2-path
baselines at each width, the controller) and runs each through the package's own layers, the way
training (channels-last, train mode, forward and backward, many batch sizes) and deployment
(BatchNorm folded, inference) run them.

Run it in a fresh process so the kernel caps apply (they are read when torch starts)::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MALLOC_CHECK_=3 \\
        python -m instanas.kernel_check --preset fashion-cpu

Before each shape it prints one ``checking`` line, so the last such line of a process that died
names the shape that killed it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import Config, load_config_file, load_preset, preset_names
from .data import DEFAULT_FOLDER_IMAGE_SIZE
from .models.controller import Controller
from .models.metagraph import MetaGraph, scaled_space
from .nn.kernel_guard import RAW_PATTERN, ConvShape, check_shapes, shapes_of, sweep_shapes
from .space import SearchSpace


def input_geometries(config: Config) -> list[tuple[int, int]]:
    """(channels, side) of the images a configuration can train on."""
    data = config.data
    if data.dataset == "fashion-mnist":
        return [(1, data.image_size or 28)]
    if data.dataset in ("cifar10", "cifar100"):
        return [(3, data.image_size or 32)]
    side = data.image_size or DEFAULT_FOLDER_IMAGE_SIZE
    return [(1, side), (3, side)]  # folder trees may be grayscale or colour


def conv_shapes(config: Config) -> list[ConvShape]:
    """Every distinct convolution shape of the models a run of ``config`` builds."""
    shapes: set[ConvShape] = set()
    for channels, side in input_geometries(config):
        space = config.search_space(channels, side, 10)
        spaces = [space] + [scaled_space(space, w) for w in config.mbv2_path_widths()]
        for each in spaces:
            shapes |= shapes_of(MetaGraph(each), _all_modules(each), channels, side)
        controller = Controller(
            channels, space.num_cells, space.num_modules, config.controller_spec()
        )
        shapes |= shapes_of(controller, None, channels, side)
    return sorted(shapes)


def _all_modules(space: SearchSpace) -> torch.Tensor:
    return torch.ones(1, space.num_cells, space.num_modules, dtype=torch.bool)


_SWITCHES = {
    "--sweep": "a grid of kernels, strides, groups and tiny maps instead of presets",
    "--raw-pattern": "only the plain nn.Conv2d pattern known to abort on AVX2-only CPUs",
    "--raw": "plain nn.Conv2d layers instead of the package's (what the package would run "
    "without its safe forms)",
    "--isolate": "run each shape in a forked process and list every one that dies",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instanas.kernel_check",
        description="Run every convolution shape of the shipped presets forward and backward.",
    )
    parser.add_argument(
        "--preset",
        action="append",
        choices=preset_names(),
        help="preset to check (repeatable; default: every shipped preset)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a run's config YAML to check (repeatable)",
    )
    for flag, text in _SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.isolate else args.threads)
    torch.manual_seed(0)
    if args.raw_pattern:
        groups = {"raw-pattern": [RAW_PATTERN]}
        args.raw = True
    elif args.sweep:
        groups = {"sweep": sweep_shapes()}
    else:
        names = args.preset or ([] if args.config else preset_names())
        groups = {name: conv_shapes(load_preset(name)) for name in names}
        groups.update({path: conv_shapes(load_config_file(path)) for path in args.config})
    died = []
    for name, shapes in groups.items():
        died += check_shapes(name, shapes, args.raw, args.isolate, args.threads)
        print(f"done: {name}, {len(shapes)} convolution shapes", flush=True)
    for line in died:
        print(f"died: {line}")
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
