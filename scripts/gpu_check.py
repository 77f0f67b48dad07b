"""The GPU check: a shortened paper-cifar-shaped job and the GPU measurements, in one go.

    .venv/bin/python scripts/gpu_check.py --output docs/runs/gpu-check [--cifar DIR]

Meant for the first session that can borrow a GPU (about 8 minutes on one). It writes
OUTPUT/gpu_check.json and OUTPUT/gpu_check.md with:

1. ``run``: ``instanas run --preset paper-cifar --device cuda --amp bf16`` shortened (a subset
   of the training images, a few epochs per stage, no variants, the latency table profiled
   on the GPU) on CIFAR-10 when ``--cifar`` names its python-batch folder, else on
   Fashion-MNIST resized to 32 px; images per second of every training stage from its
   ``metrics.jsonl``, and the run's results table.
2. ``throughput``: training steps (forward, backward, SGD) and inference of the paper-cifar
   meta-graph at batch 256 under random policies of density 0.5: sparse vs dense, and grouped
   for inference, timed with CUDA events after warm-up, in bf16 autocast.
3. ``table``: ``instanas profile --validate`` with ``--latency.device cuda``: the GPU batch-1
   table against 30 random children timed end to end (Spearman, relative errors).
4. ``processes`` (two GPUs or more): one pretraining epoch with 1 and with 2 processes under
   torchrun.

``--device cpu --tiny`` runs every part at toy size on the CPU (what tests/test_scripts.py does
to keep the script working where no GPU is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def instanas(args: list[str], work: Path, ranks: int = 1) -> str:
    """Run the CLI (under torchrun when ``ranks`` > 1); its output, or exit with it."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    env = {**os.environ, "INSTANAS_CACHE": str(work / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([*launcher, "-m", "instanas", *args, "--quiet"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"instanas {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def job_options(opts: argparse.Namespace) -> list[str]:
    """The shortened paper-cifar job's options."""
    data = ["--data.dataset", "cifar10", "--data.root", opts.cifar] if opts.cifar else [
        "--data.dataset", "fashion-mnist", "--data.image_size", "32"]  # fmt: skip
    size = ["--data.limit_train", "256", "--data.limit_test", "100", "--space.width", "0.25",
            "--pretrain.batch_size", "64", "--search.batch_size", "32",
            "--finetune.batch_size", "64", "--baseline.batch_size", "64",
            "--latency.repeats", "30", "--latency.calibration_children", "4",
            "--baseline.oracle_children", "0", "--controller.input_size", "16",
            "--baseline.random_policy", "false", "--pretrain.epochs", "1"] if opts.tiny else [
            "--data.limit_train", "20000", "--data.limit_test", "2000",
            "--pretrain.epochs", "2"]  # fmt: skip
    epochs = ["--search.epochs", "1", "--finetune.epochs", "1",
              "--baseline.epochs", "1", "--variants.count", "0", "--baseline.widths", "[1.0]",
              "--baseline.min_net", "false", "--latency.eval_images", "20" if opts.tiny else "100",
              "--search.min_pretrain_accuracy", "0"]  # fmt: skip
    device = ["--device", opts.device, "--amp", opts.amp, "--latency.device", opts.device]
    return ["--preset", "paper-cifar", *data, *size, *epochs, *device]


def stage_throughput(run: Path) -> dict[str, float]:
    """Training images per second of every stage, from its metrics records."""
    config = (run / "config.yaml").read_text()
    batch = {s: _batch_size(config, s) for s in ("pretrain", "search", "finetune", "baseline")}
    rates: dict[str, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        stage = r["stage"].split("/")[0]
        section = "baseline" if stage.startswith("baseline") else stage
        section = "finetune" if section in ("random-policy", "static-child") else section
        steps, seconds = r.get("steps", r.get("metagraph_steps")), r.get("seconds")
        seconds = seconds or r.get("metagraph_seconds")
        if steps and seconds and section in batch:
            rates.setdefault(r["stage"], []).append(steps * batch[section] / seconds)
    return {stage: sum(v) / len(v) for stage, v in rates.items()}


def _batch_size(config_yaml: str, section: str) -> int:
    import yaml

    return int(yaml.safe_load(config_yaml)[section]["batch_size"])


def shortened_job(opts: argparse.Namespace, work: Path) -> dict:
    start = time.perf_counter()
    run = work / "run"
    instanas(["run", *job_options(opts), "--output", str(run)], work)
    return {
        "wall_s": time.perf_counter() - start,
        "images_per_s": stage_throughput(run),
        "results_md": (run / "results.md").read_text(),
    }


def _timer(device: torch.device):
    """(start, stop -> ms): CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return begin.record, lambda: (end.record(), end.synchronize(), begin.elapsed_time(end))[2]
    state = {}
    return (lambda: state.update(t=time.perf_counter()),
            lambda: 1000 * (time.perf_counter() - state["t"]))  # fmt: skip


def throughput(opts: argparse.Namespace) -> dict:
    """Images per second of training steps and inference, sparse vs dense (vs grouped)."""
    from instanas.config import load_preset
    from instanas.models.metagraph import MetaGraph

    device = torch.device(opts.device)
    config = load_preset("paper-cifar")
    config.space.width = 0.25 if opts.tiny else 1.0
    graph = MetaGraph(config.search_space(3, 32, 10)).to(device)
    graph = graph.to(memory_format=torch.channels_last)
    batch, repeats = (32, 2) if opts.tiny else (256, 20)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    shape = (batch, graph.space.num_cells, graph.space.num_modules)
    policy = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    out = {"batch": batch, "density": 0.5}
    optimizer = torch.optim.SGD(graph.parameters(), lr=0.01, momentum=0.9)
    dtype = torch.bfloat16 if opts.amp == "bf16" else torch.float16

    def train(execution: str) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=opts.amp != "off"):
            loss = torch.nn.functional.cross_entropy(graph(x, policy, execution).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer(execution: str) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=opts.amp != "off"):
            graph(x, policy, execution)

    for name, work in (("train", train), ("inference", infer)):
        modes = ("sparse", "dense") if name == "train" else ("sparse", "grouped", "dense")
        for mode in modes:
            step = partial(work, mode)
            out[f"{name}_{mode}_images_per_s"] = _rate(step, batch, repeats, device)
    return out


def _rate(work, batch: int, repeats: int, device: torch.device) -> float:
    for _ in range(max(repeats // 4, 1)):  # warm-up: kernels chosen, caches filled
        work()
    start, stop = _timer(device)
    start()
    for _ in range(repeats):
        work()
    return batch * repeats / (stop() / 1000)


def table_check(opts: argparse.Namespace, work: Path) -> dict:
    out = work / "profile"
    children = "6" if opts.tiny else "30"
    instanas(["profile", *job_options(opts), "--output", str(out), "--validate",
              "--children", children], work)  # fmt: skip
    check = json.loads((out / "latency_validation.json").read_text())
    return {k: check[k] for k in ("spearman", "median_relative_error", "p90_relative_error",
                                  "chain_factor", "device")}  # fmt: skip


def processes(opts: argparse.Namespace, work: Path) -> dict:
    """One pretraining epoch with 1 and with 2 processes (same global batch)."""
    seconds = {}
    for ranks in (1, 2):
        out = work / f"procs{ranks}"
        instanas(["pretrain", *job_options(opts), "--pretrain.epochs", "1", "--output", str(out)],
                 work, ranks)  # fmt: skip
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        seconds[f"{ranks}_process_epoch_s"] = record["seconds"]
    seconds["ratio_2_vs_1"] = seconds["2_process_epoch_s"] / seconds["1_process_epoch_s"]
    return seconds


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda)  # fmt: skip
    return info


def write(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    measured = json.dumps({k: v for k, v in results.items() if k != "run"}, indent=1)
    lines = ["# GPU check", "", f"`{' '.join(sys.argv)}`", "", "```json", measured, "```", ""]
    if "run" in results:
        job = results["run"]
        rates = json.dumps(job["images_per_s"], indent=1)
        lines += [f"Shortened job: {job['wall_s']:.0f} s; training images/s per stage:", ""]
        lines += ["```json", rates, "```", "", job["results_md"]]
    (output / "gpu_check.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cifar", help="CIFAR-10 python-batch folder (else Fashion-MNIST)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    results = {"environment": environment(device)}
    with tempfile.TemporaryDirectory() as tmp:  # checkpoints and caches are not kept
        work = Path(tmp)
        results["throughput"] = throughput(opts)
        results["table"] = table_check(opts, work)
        results["run"] = shortened_job(opts, work)
        if device.type == "cuda" and torch.cuda.device_count() >= 2:
            results["processes"] = processes(opts, work)
    write(results, opts.output)
    print((opts.output / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
