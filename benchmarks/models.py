"""Training-step throughput (forward + backward, images/s) of the EfficientNet family.

CPU (default): efficientnet_b0 and efficientnet_v2_s at 128 px, batch 16, fp32, with and without
channels_last. Results go to benchmarks/results/models.json.

    python benchmarks/models.py [--iters 10] [--warmup 3] [--batch 16] [--resolution 128]

GPU (--gpu): every registered variant at its training resolution with bf16 autocast, channels_last and
torch.compile, at the largest batch that fits (found by halving from --max-batch on out-of-memory).
Results go to benchmarks/results/models_gpu.json. Skipped with a message when CUDA is absent.

A step here is forward + loss + backward with gradients reset; no optimizer update (its cost and
memory depend on the optimizer, not the model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path, where this file would shadow the `models` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from models import create_model, get_variant, list_models  # noqa: E402
from models.summary import format_table  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CPU_MODELS = ("efficientnet_b0", "efficientnet_v2_s")
NUM_CLASSES = 1000


def machine_description() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        # Other work on the host skews CPU figures; record how busy it was.
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def train_step_fn(
    model: nn.Module, batch: int, resolution: int, device: torch.device, channels_last: bool,
    autocast_dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one forward + backward on fixed random data."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        try:
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss = loss_fn(model(images), labels)
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)  # also after an out-of-memory error mid-backward

    return step


def time_interleaved(
    steps: dict[Any, Callable[[], None]], warmup: int, iters: int, sync: Callable[[], None]
) -> dict[Any, list[float]]:
    """Seconds per step for each of `steps`, timed round-robin (A, B, A, B, ...) after `warmup`
    untimed rounds, so that load from other work on the host hits every configuration alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[Any, list[float]] = {key: [] for key in steps}
    for _ in range(iters):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[key].append(time.perf_counter() - start)
    return times


def result_row(name: str, batch: int, resolution: int, times: Sequence[float], **extra: Any) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "model": name,
        **extra,
        "batch": batch,
        "resolution": resolution,
        "images_per_s": batch / median,  # median step: robust to a stray slow iteration
        "images_per_s_best": batch / min(times),  # least disturbed by other work on the host
        "images_per_s_mean": batch * len(times) / sum(times),
        "step_s_median": median,
        "iters": len(times),
    }


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")
    rows = []
    for name in args.models or CPU_MODELS:
        steps = {}
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = create_model(name, num_classes=NUM_CLASSES).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            steps[channels_last] = train_step_fn(model, args.batch, args.resolution, device, channels_last, None)
        times = time_interleaved(steps, args.warmup, args.iters, sync=lambda: None)
        for channels_last, step_times in times.items():
            rows.append(result_row(name, args.batch, args.resolution, step_times, channels_last=channels_last))
            print(f"  {name} channels_last={channels_last}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
    return {
        "kind": "cpu_train_step",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "resolution": args.resolution,
        "warmup": args.warmup,
        "results": rows,
    }


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(make_step: Callable[[int], Callable[[], None]], start: int) -> int:
    """Halve from `start` until two steps run without running out of memory; 0 if even 1 does not."""
    batch = start
    while batch >= 1:
        try:
            step = make_step(batch)
            step()
            step()
            torch.cuda.synchronize()
            return batch
        except RuntimeError as error:
            if not _is_oom(error):
                raise
        finally:
            step = None  # drop the closure's tensors before the next try
            torch.cuda.empty_cache()
        batch //= 2
    return 0


def run_gpu(args: argparse.Namespace) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        print("--gpu: CUDA is not available on this machine; skipping the GPU benchmark.")
        return None
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize
    rows = []
    for name in args.models or list_models():
        resolution = get_variant(name).train_resolution
        torch.manual_seed(0)
        model = create_model(name, num_classes=NUM_CLASSES).to(device, memory_format=torch.channels_last).train()

        # Search in eager mode (compiled graphs use no more memory, and each new batch size would
        # trigger a recompile), then compile once at the batch found.
        def make_step(batch: int, module: nn.Module = model) -> Callable[[], None]:
            return train_step_fn(module, batch, resolution, device, True, torch.bfloat16)

        batch = largest_batch(make_step, args.max_batch)
        if batch == 0:
            print(f"  {name}: batch 1 does not fit at {resolution} px; skipped")
            continue
        # A fresh compiler state per variant: every model would otherwise count as a recompile of the
        # same forward, and past the recompile limit the rest would silently run eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(model)
        batch = largest_batch(lambda b: make_step(b, compiled), batch)
        times = time_interleaved({name: make_step(batch, compiled)}, args.warmup, args.iters, sync)[name]
        rows.append(
            result_row(
                name, batch, resolution, times,
                channels_last=True, autocast="bfloat16", compiled=True,
                max_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
            )
        )
        print(f"  {name} @ {resolution} px, batch {batch}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
        model = compiled = None  # free the GPU memory before the next variant
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"kind": "gpu_train_step", "dtype": "bfloat16-autocast", "warmup": args.warmup, "results": rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA benchmark of every variant (see module doc)")
    parser.add_argument("--models", nargs="+", choices=list_models(), help="variants to run (default: see doc)")
    parser.add_argument("--batch", type=int, default=16, help="CPU batch size")
    parser.add_argument("--resolution", type=int, default=128, help="CPU image size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--iters", type=int, default=10, help="timed steps")
    parser.add_argument("--max-batch", type=int, default=1024, help="GPU batch search starts here")
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/models[_gpu].json)")
    args = parser.parse_args(argv)
    for key in ("batch", "resolution", "iters", "max_batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    header = {
        "torch": torch.__version__,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
    }
    print(f"torch {header['torch']}, {torch.get_num_threads()} threads, {header['machine']['processor']}")
    report = run_gpu(args) if args.gpu else run_cpu(args)
    if report is None:
        return 0
    report = {**header, **report}
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    columns = ("model", "channels_last", "batch", "resolution", "images_per_s", "images_per_s_best", "step_s_median")
    print(format_table([{c: row[c] for c in columns if c in row} for row in report["results"]]))

    output = args.output or RESULTS_DIR / ("models_gpu.json" if args.gpu else "models.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
