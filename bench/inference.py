"""Inference speed of a trained run: batch 64 and batch 1, dense-masked vs the sparse paths.

    .venv/bin/python bench/inference.py --run runs/fashion-cpu [--images 1024] [--threads 2]

All paths use the same BatchNorm-folded controller and meta-graph and the controller's own
per-image policies on the test split (the searched model's real policy distribution); batch 64 is
also timed with random policies of the same mean density (many distinct children per batch, the
case grouping cannot help). Paths are interleaved batch by batch (image by image at batch 1) in
one process, and every time includes the controller. Batch 1 runs with the run's
``latency.threads``. The controller share is the controller's batch-1 time (network and policy
decoding) over the mean child time (deployed batch-1 path minus controller), the ratio issue 3
bounds at 15 %.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import instanas
from instanas.data import load_dataset
from instanas.latency.side_by_side import measure_per_image
from instanas.latency.timing import cpu_threads, processor_name

BATCH_PATHS = ("dense", "sparse", "grouped")


def test_images(model: instanas.InstaNASModel, run_dir: Path, count: int) -> torch.Tensor:
    import yaml

    d = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    data = load_dataset(
        d["dataset"],
        d.get("root"),
        val_fraction=d["val_fraction"],
        image_size=d.get("image_size"),
        limit_test=count,
    )
    return model.normalise(data.test.images[:count]).contiguous()


def timed(fn, *args) -> float:
    start = time.perf_counter_ns()
    fn(*args)
    return (time.perf_counter_ns() - start) / 1e6


def batch_throughput(
    predictor, images: torch.Tensor, policy_source, batch: int, rounds: int
) -> dict[str, float]:
    """Images per second per path; ``policy_source(x)`` gives the policies each path runs."""
    graph, controller = predictor.metagraph, predictor.controller
    times = {p: 0.0 for p in BATCH_PATHS}
    order = random.Random(0)
    chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]

    def run(path: str, x: torch.Tensor) -> None:
        graph(x, policy_source(x, controller(x)), execution=path)

    with torch.inference_mode():
        for p in BATCH_PATHS:  # build kernels
            run(p, chunks[0])
        for _ in range(rounds):
            for x in chunks:
                paths = list(BATCH_PATHS)
                order.shuffle(paths)
                for p in paths:
                    times[p] += timed(run, p, x)
    total = rounds * len(chunks) * batch
    return {p: total / (t / 1e3) for p, t in times.items()}


def batch_one(predictor, images: torch.Tensor, threads: int) -> dict[str, float]:
    """Mean ms per image at batch 1 for each path, interleaved image by image."""
    graph = predictor.metagraph
    paths = {
        "dense": lambda x: graph(x, predictor.policies(x), execution="dense"),
        "sparse": lambda x: graph(x, predictor.policies(x), execution="sparse"),
        "deployed": predictor.logits_one,
        "controller": predictor.child_cells,  # network + policy decoding, as in "deployed"
    }
    timings = measure_per_image(paths, images, threads, warmup=10)
    return {p: timings[p]["mean"] for p in paths}


def random_like(policy: torch.Tensor, generator: torch.Generator):
    """Independent random policies selecting the same mean number of modules as ``policy``."""
    rate = float(policy.float().mean())

    def source(x: torch.Tensor, _probs: torch.Tensor) -> torch.Tensor:
        return torch.rand((x.shape[0], *policy.shape[1:]), generator=generator) < rate

    return source


def controller_variants(
    predictor, specs: list[str], image: torch.Tensor, threads: int, rounds: int = 500
) -> dict[str, float]:
    """Batch-1 ms of untrained controllers of other shapes ("PX:W1,W2,..."), policy decoding
    included, interleaved with the run's own controller; timing does not depend on weights."""
    from instanas.models.controller import Controller, ControllerSpec
    from instanas.models.predictor import InstaNASPredictor

    space = predictor.space
    fns = {"this run": predictor.child_cells}
    for spec in specs:
        size, widths = spec.split(":")
        shape = ControllerSpec(int(size), tuple(int(w) for w in widths.split(",") if w))
        other = InstaNASPredictor(
            predictor.metagraph,
            Controller(space.input_channels, space.num_cells, space.num_modules, shape).eval(),
        )
        fns[spec] = other.child_cells
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with cpu_threads(threads), torch.inference_mode():
        for r in range(rounds + 20):
            for name, fn in fns.items():
                t = timed(fn, image)
                if r >= 20:
                    samples[name].append(t)
    return {k: statistics.mean(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished `instanas run` dir")
    parser.add_argument("--images", type=int, default=1024, help="test images to use")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the batch-64 images")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for batch 64"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--controllers",
        nargs="*",
        default=["14:8,16,32", "7:8,16", "7:8", "14:", "7:"],
        metavar="PX:WIDTHS",
        help='other controller shapes to time at batch 1 ("7:" is linear)',
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = instanas.load(args.run)
    predictor = model.predictor
    images = test_images(model, args.run, args.images)
    with torch.inference_mode():
        policies = torch.cat(
            [predictor.policies(images[i : i + 256]) for i in range(0, len(images), 256)]
        )
    children = torch.unique(policies.flatten(1), dim=0).shape[0]
    b1_threads = int(model.results.get("device", {}).get("threads", 1)) if model.results else 1

    searched = batch_throughput(
        predictor, images, lambda x, p: predictor.policies(x), 64, args.rounds
    )
    draw = random_like(policies, torch.Generator().manual_seed(0))
    randomised = batch_throughput(
        predictor, images, lambda x, p: predictor.metagraph.resolve(draw(x, p)), 64, args.rounds
    )
    single = batch_one(predictor, images[: max(60, args.images // 4)], b1_threads)
    child_ms = single["deployed"] - single["controller"]
    variants = controller_variants(predictor, args.controllers, images[:1], b1_threads)
    numbers = {
        "machine": processor_name(),
        "torch": torch.__version__,
        "threads_batch64": args.threads,
        "threads_batch1": b1_threads,
        "images": len(images),
        "distinct_children": children,
        "mean_active_modules": float(policies.sum(dim=(1, 2)).float().mean()),
        "batch64_images_per_s": {"searched": searched, "random_same_density": randomised},
        "batch1_ms": single,
        "controller_share": single["controller"] / child_ms,
        "controller_variants_ms": variants,
    }
    print(f"machine: {numbers['machine']}, torch {numbers['torch']}, run {args.run}")
    print(
        f"{len(images)} test images, {children} distinct children, "
        f"{numbers['mean_active_modules']:.1f} active modules per image"
    )
    print(f"batch 64 ({args.threads} threads), images/s and speed-up over dense-masked:")
    for name, result in numbers["batch64_images_per_s"].items():
        cells = "  ".join(
            f"{p} {result[p]:7.0f} ({result[p] / result['dense']:.2f}x)" for p in BATCH_PATHS
        )
        print(f"  {name:20s} {cells}")
    print(f"batch 1 ({b1_threads} thread(s)), mean ms per image and speed-up over dense-masked:")
    print(
        "  "
        + "  ".join(
            f"{p} {single[p]:.3f} ({single['dense'] / single[p]:.2f}x)"
            for p in ("dense", "sparse", "deployed")
        )
    )
    print(
        f"  controller {single['controller']:.3f} ms = {100 * numbers['controller_share']:.1f}% "
        f"of the mean child time {child_ms:.3f} ms"
    )
    print("  controller shapes (untrained, same decoding), ms and share of that child time:")
    print("  " + "  ".join(f"{k} {v:.3f} ({100 * v / child_ms:.1f}%)" for k, v in variants.items()))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
