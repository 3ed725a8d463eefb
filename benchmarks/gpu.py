"""The GPU path measured in one run (`make bench-gpu`), each part written to benchmarks/results/gpu.json as soon as
it ends (a cut run keeps what it had):

1. models: fwd+bwd img/s of efficientnet_b0 at 224, efficientnet_b4 at 380 and efficientnet_v2_s at 300 (V2-S's
   training size), bf16 autocast + channels_last, eager and torch.compile, at the largest batch that fits
   (doubling from --start-batch until out of memory or --max-batch), with peak memory;
2. data: DALI 'mixed' (nvJPEG) decode + random-resized crop at 224 from the 256 tier, img/s, and how many GPUs'
   worth of B0 training that feeds (part 1's B0 figure; NVIDIA's 2,489 img/s per A100 beside it); the wds and
   ffcv backends on this machine's CPU cores for comparison;
3. job: one real training job through `effnet train` on 1 GPU (Ray Train, NCCL, bf16) for a few hundred steps on
   generated staged data: steady-state img/s (epochs after the first) beside part 1's model-only figure (the gap
   is the pipeline's overhead), and that minival, val and registration ran (the job's result).

Anchors: NVIDIA's EfficientNet-B0 training, 2,489 img/s on one A100-80GB with AMP; goal here >= 5,000 on one
H100/H200. Without CUDA, parts 1, DALI's half of 2 and 3 are skipped with the reason (the CPU loaders are
measured; `--cpu-smoke` runs part 3's path on the CPU with a tiny model to check the script itself). Needs
nothing `make setup` does not install. Budget: --budget-s (default 450 s) in all; a part that would start past it
is skipped, saying so.

    python benchmarks/gpu.py [--budget-s 450] [--images 6000] [--data DIR] [--out FILE] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine, make_images  # noqa: E402
from benchmarks.loaders import B0_A100_IMAGES_PER_S, measure  # noqa: E402
from benchmarks.models import NUM_CLASSES, _is_oom, result_row, time_interleaved, train_step_fn  # noqa: E402
from models import create_model, get_variant  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "gpu.json"
MODELS = ("efficientnet_b0", "efficientnet_b4", "efficientnet_v2_s")  # each at its training resolution
GOAL_B0_IMAGES_PER_S = 5000  # one H100/H200: the A100 figure scaled by the hardware's ratio
DATA_RESOLUTION, DATA_TIER = 224, 256
NO_CUDA = "CUDA is not available on this machine (torch.cuda.is_available() is False)"


# --------------------------------------------------------------------------------------------- report


class Report:
    """The results file, rewritten whole after every part (a cut run keeps the parts that ended)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.data = path, {**header, "parts": {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, result: dict[str, Any]) -> None:
        self.data["parts"][name] = result
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)
        print(f"== {name}: written to {self.path}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def skip_reason(self, part: str, needs: float) -> str | None:
        """Why `part` (expected to take about `needs` seconds) does not start, or None when it fits."""
        if self.left() < needs:
            return (f"{part}: skipped, {self.left():.0f} s of the {self.seconds:.0f} s budget left, it needs "
                    f"~{needs:.0f}")
        return None


# --------------------------------------------------------------------------------------------- part 1


def largest_batch_by_doubling(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Double from `start` while `fits(batch)` (False on out-of-memory) and batch <= `limit`; the last batch that
    fitted (0: not even `start`)."""
    batch, best = start, 0
    while batch <= limit and fits(batch):
        best, batch = batch, batch * 2
    return best


def model_throughput(name: str, start_batch: int, max_batch: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    """One variant at its training resolution: the largest batch (eager), then eager and compiled img/s there."""
    device = torch.device("cuda")
    resolution = get_variant(name).train_resolution
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).to(device, memory_format=torch.channels_last).train()

    def fits(batch: int) -> bool:
        step = None
        try:
            step = train_step_fn(model, batch, resolution, device, True, torch.bfloat16)
            step()
            step()
            torch.cuda.synchronize()
            return True
        except RuntimeError as error:
            if not _is_oom(error):
                raise
            return False
        finally:
            step = None
            torch.cuda.empty_cache()

    batch = largest_batch_by_doubling(fits, start_batch, max_batch)
    if batch == 0:
        return [{"model": name, "skipped": f"batch {start_batch} does not fit at {resolution} px"}]
    rows = []
    torch._dynamo.reset()
    for compiled in (False, True):
        net = torch.compile(model) if compiled else model
        torch.cuda.reset_peak_memory_stats()
        step = train_step_fn(net, batch, resolution, device, True, torch.bfloat16)
        t0 = time.perf_counter()
        times = time_interleaved({name: step}, warmup, iters, torch.cuda.synchronize)[name]
        rows.append(result_row(name, batch, resolution, times, autocast="bfloat16", channels_last=True,
                               compiled=compiled, peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                               seconds_with_warmup=round(time.perf_counter() - t0, 1)))
        print(f"  {name} @ {resolution} px batch {batch} {'compiled' if compiled else 'eager'}: "
              f"{rows[-1]['images_per_s']:.0f} img/s, peak {rows[-1]['peak_memory_gib']} GiB", flush=True)
        step = net = None
    model = None
    torch.cuda.empty_cache()
    return rows


def part_models(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": NO_CUDA}
    torch.backends.cudnn.benchmark = True
    rows, skipped = [], []
    for name in MODELS:
        reason = budget.skip_reason(name, 40)
        if reason:
            skipped.append(reason)
            continue
        rows += model_throughput(name, args.start_batch, args.max_batch, args.warmup, args.iters)
    b0 = best_images_per_s(rows, "efficientnet_b0")
    return {"device": torch.cuda.get_device_name(), "results": rows, "skipped_models": skipped,
            "b0_images_per_s": b0, "b0_vs_nvidia_a100": round(b0 / B0_A100_IMAGES_PER_S, 2) if b0 else None,
            "goal_b0_images_per_s": GOAL_B0_IMAGES_PER_S, "goal_met": bool(b0 and b0 >= GOAL_B0_IMAGES_PER_S)}


def best_images_per_s(rows: Sequence[dict[str, Any]], name: str) -> float | None:
    figures = [r["images_per_s"] for r in rows if r.get("model") == name and "images_per_s" in r]
    return round(max(figures), 1) if figures else None


# --------------------------------------------------------------------------------------------- part 2


def part_data(args: argparse.Namespace, dataset: Path, b0_images_per_s: float | None) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {"resolution": DATA_RESOLUTION, "tier": DATA_TIER, "batch": args.data_batch,
                           "cpu_cores": cores}
    for backend in ("wds", "ffcv"):
        r = measure(lambda b=backend: _loader(dataset, args.data_batch, cores, b))
        out[f"{backend}_cpu"] = r
        print(f"  {backend} on {cores} CPU cores: {r['images_per_s']:.0f} img/s", flush=True)
    if not torch.cuda.is_available():
        out["dali_mixed"] = {"skipped": NO_CUDA}
        return out
    torch.cuda.set_device(0)  # the DALI backend decodes on the caller's current device
    r = measure(lambda: _loader(dataset, args.data_batch, cores, "dali"))
    feeds = r["images_per_s"] / b0_images_per_s if b0_images_per_s else None
    out["dali_mixed"] = {**r, "device": torch.cuda.get_device_name(),
                         "gpus_of_b0_fed": round(feeds, 2) if feeds else None,
                         "b0_images_per_s_part1": b0_images_per_s,
                         "nvidia_a100s_of_b0_fed": round(r["images_per_s"] / B0_A100_IMAGES_PER_S, 2)}
    print(f"  dali mixed: {r['images_per_s']:.0f} img/s = {feeds or 0:.2f} GPUs of B0 training", flush=True)
    return out


def _loader(dataset: Path, batch: int, workers: int, backend: str) -> Any:
    from pipelines.loading import make_loader

    return make_loader(dataset, "train", DATA_RESOLUTION, batch, num_workers=workers, backend=backend)


# --------------------------------------------------------------------------------------------- part 3


def job_recipe(path: Path, gpu: bool, batch: int, epochs: int, cores: int) -> Path:
    """The job's recipe: the V1 recipe on 1 worker (B0, bf16, NCCL on a GPU), data through DALI; on the CPU
    (smoke) the demo's tiny model through wds."""
    if gpu:
        text = (f"extends: v1\nmodel:\n  variant: efficientnet_b0\ndata:\n  batch_size: {batch}\n  backend: dali\n"
                f"  loader_workers: {max(1, cores - 2)}\nschedule:\n  epochs: {epochs}\n  patience: null\n"
                f"ray:\n  num_workers: 1\n  cpus_per_worker: {max(1, cores - 2)}\n  use_gpu: true\n"
                "  device_memory_gb: null\n")
    else:
        text = (f"extends: demo\nschedule:\n  epochs: {epochs}\n  patience: null\nray:\n  num_workers: 1\n"
                f"data:\n  batch_size: {batch}\n")
    path.write_text(text)
    return path


def part_job(args: argparse.Namespace, dataset: Path, data_dir: Path, b0_images_per_s: float | None) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        return {"skipped": NO_CUDA + " (--cpu-smoke runs this part's path on the CPU with a tiny model)"}
    cores = os.cpu_count() or 1
    n_train = _train_images(dataset)
    batch = args.job_batch if gpu else 16
    epochs = max(2, -(-args.job_steps * batch // n_train)) if gpu else 2
    recipe = job_recipe(data_dir / "gpu-bench-recipe.yaml", gpu, batch, epochs, cores)
    result_file = data_dir / "gpu-bench-result.json"
    command = [sys.executable, "-m", "cli.effnet", "--data-dir", str(data_dir), "train", "--recipe", str(recipe),
               "--data", str(dataset), "--result-file", str(result_file)]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.job_timeout_s)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1], "rc": done.returncode,
                "seconds": round(seconds, 1)}
    result = json.loads(result_file.read_text())
    per_epoch = _epoch_images_per_s(data_dir, result["run_id"])
    steady = statistics.median(per_epoch[1:]) if len(per_epoch) > 1 else None
    out = {"mode": "gpu" if gpu else "cpu smoke (not a GPU figure)", "batch": batch, "epochs": epochs,
           "steps": epochs * (n_train // batch), "train_images": n_train, "seconds": round(seconds, 1),
           "images_per_s_per_epoch": [round(x, 1) for x in per_epoch],
           "steady_images_per_s": round(steady, 1) if steady else None,
           "minival_top1": result["minival_top1"], "val_top1": result["val_top1"],
           "registered": f"{result['registered_model']}/{result['version']}", "gpu_hours": result["gpu_hours"]}
    if gpu and steady and b0_images_per_s:
        out["model_only_images_per_s"] = b0_images_per_s
        out["pipeline_overhead"] = round(1 - steady / b0_images_per_s, 3)
    print(f"  job: {out['steady_images_per_s']} img/s steady, registered {out['registered']}", flush=True)
    return out


def _train_images(dataset: Path) -> int:
    from pipelines.dataset import read_manifest

    return int(read_manifest(dataset).splits["train"].samples)


def _epoch_images_per_s(data_dir: Path, run_id: str) -> list[float]:
    from pipelines.settings import DataLayout
    from pipelines.registry import tracking

    c = tracking.client(DataLayout(data_dir).tracking_uri)
    return [m.value for m in sorted(c.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)]


def skipped_parts(parts: dict[str, Any], prefix: str = "") -> list[str]:
    """Every part and sub-part that was skipped, with why: "models: CUDA is not available ..."."""
    out = []
    for name, value in parts.items():
        if isinstance(value, dict):
            if "skipped" in value:
                out.append(f"{prefix}{name}: {value['skipped']}")
            out += skipped_parts({k: v for k, v in value.items() if k != "skipped"}, f"{prefix}{name}.")
    return out


def stage_with_minival(source: Path, out: Path, cores: int) -> Path:
    """The generated images staged at the 256 tier with FFCV files and DALI indexes, 10% of train held out as
    minival (part 3's job early-stops on it); reused when staged already."""
    from pipelines.dataset import EXTRA_FORMATS
    from pipelines.staging import stager
    from pipelines.staging.params import StageParams

    params = StageParams(tiers=(DATA_TIER,), shard_size=256, minival=0.1, formats=EXTRA_FORMATS)
    return stager.stage(source, out, params, log=lambda *a: print("  ", *a), workers=cores, base_version=None)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=450, help="the whole run's time, set-up included")
    p.add_argument("--images", type=int, default=6000, help="generated images (train + val) for parts 2 and 3")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "effnet-gpu-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--start-batch", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--data-batch", type=int, default=256)
    p.add_argument("--job-batch", type=int, default=256)
    p.add_argument("--job-steps", type=int, default=300)
    p.add_argument("--job-timeout-s", type=float, default=240)
    p.add_argument("--cpu-smoke", action="store_true", help="without CUDA, run part 3's path on the CPU")
    args = p.parse_args(argv)
    for key in ("images", "start_batch", "max_batch", "iters", "data_batch", "job_batch", "job_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    report = Report(args.out, {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine(), "budget_s": args.budget_s})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, GPU: {gpu}", flush=True)
    models_part = part_models(args, budget)
    report.part("models", models_part)
    b0 = models_part.get("b0_images_per_s")

    cores = os.cpu_count() or 1
    source = args.data / f"images-{args.images}"
    make_images(source, args.images, cores)  # reused by a rerun
    dataset = stage_with_minival(source, args.data / "staged", cores)
    reason = budget.skip_reason("data", 30)
    report.part("data", {"skipped": reason} if reason else part_data(args, dataset, b0))
    reason = budget.skip_reason("job", 90 if torch.cuda.is_available() else 30)
    data_dir = args.data / "job-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    report.part("job", {"skipped": reason} if reason else part_job(args, dataset, data_dir, b0))
    for line in skipped_parts(report.data["parts"]):
        print(f"skipped {line}")
    report.part("summary", {"seconds": round(args.budget_s - budget.left(), 1),
                            "skipped": skipped_parts(report.data["parts"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
