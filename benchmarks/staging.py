"""Staging throughput: every resolution tier staged by `pipelines.staging` beside one FFCV file written the way
ffcv-imagenet writes ImageNet, on the same images, in the same run.

The images are `benchmarks.common.make_images`'s (shared with benchmarks/loaders.py): ImageNet-like JPEGs of
500x375 px (quality 90, about 110 KB, costing what a photo costs to decode), in the extracted layout
`train/<wnid>/<wnid>_<k>.JPEG` and `val/<wnid>/...`, 10% of them val. They are kept between runs under --data.

- staging: `pipelines.staging.stager.stage` with the default tiers (128, 256, 512 px), WebDataset shards of
  1024, a 2% minival, `--workers` units at a time on threads (default: all cores), as `effnet stage` runs it
  (without Prefect's fixed cost of starting a server). Timed from opening the source to the manifest, spools
  included, until every byte written is on disk (`os.sync()`: FFCV's writer does not flush, staging fsyncs what
  its manifest lists).
- FFCV: ffcv-imagenet's `write_imagenet.py` with its published ImageNet settings (write_imagenet.sh
  `500 0.50 90`): RGBImageField(write_mode='proportion', max_resolution=500, compress_probability=0.5,
  jpeg_quality=90), IntField labels, chunksize 100, `num_workers` = --workers, one file for train and one for
  val, over a minimal ImageFolder equivalent (PIL open + convert('RGB'), as torchvision's loader does).

Each side runs --repeats times into a fresh folder; the table and benchmarks/results/staging.json report the
best run of each (the host is shared, so the fastest run is the one least disturbed), and every run, with how
idle the host was before it (`--wait-idle S` waits up to S seconds for an idle host before each run). CPU time
per image (this process and its workers) is reported too: other work on the host inflates it far less than
wall time.

    python benchmarks/staging.py [--images 2000] [--repeats 2] [--workers N] [--data DIR] [--wait-idle S]
                                 [--profile]

Two more sides stage with the units in processes (`--processes`) and one at a time, to show what each buys.
`--tiers` stages other tiers than the default (e.g. the six 128 192 256 320 384 480) to show what a tier costs.

`--profile` also profiles one class through `process_unit` in this process and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path, where models.py would shadow the `models` package; the
# repository root instead, so that `benchmarks.common` and `pipelines` import (in worker processes too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import IMAGE_SIZE, machine, make_images, write_report  # noqa: E402
from pipelines.dataset import SPLITS, read_manifest
from pipelines.source import imagenet
from pipelines.staging.params import ENCODING, WORK, StageParams
from pipelines.staging.runners import Mapper, available_cores, thread_map
from pipelines.staging.spools import process_unit
from pipelines.staging.stager import stage  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "staging.json"
# ffcv-imagenet, write_imagenet.sh: `write_dataset train 500 0.50 90` (max_res, compress_probability, quality).
FFCV_SETTINGS = {"write_mode": "proportion", "max_resolution": 500, "compress_probability": 0.5, "jpeg_quality": 90}
FFCV_CHUNKSIZE = 100


# --------------------------------------------------------------------------------------------- staging


def _timed(mapper: Mapper, into: dict[str, float], phase: str) -> Mapper:
    def run(fn: Any, args: list[tuple[Any, ...]]) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return mapper(fn, args)
        finally:
            into[phase] = time.perf_counter() - t0

    return run


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children: unlike wall time, not inflated by other work on
    a shared host."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _figures(images: int, seconds: float, cpu: float, nbytes: int) -> dict[str, Any]:
    return {"seconds": round(seconds, 2), "images": images, "images_per_s": round(images / seconds, 1),
            "cpu_s": round(cpu, 2), "cpu_ms_per_image": round(cpu / images * 1e3, 2), "bytes": nbytes}


def run_staging(
    source: Path, out: Path, params: StageParams, workers: int, units_on: str = "threads"
) -> dict[str, Any]:
    """Units decoded `workers` at a time on threads (`units_on="threads"`, what `effnet stage` does), in
    `workers` processes ("processes", `effnet stage --processes`), or one after the other ("serial")."""
    phases: dict[str, float] = {}
    unit_workers = 1 if units_on == "serial" else workers
    c0, t0 = _cpu_seconds(), time.perf_counter()
    dest = stage(source, out, params, map_units=_timed(thread_map(unit_workers), phases, "units"),
                         map_shards=_timed(thread_map(workers), phases, "shards"), log=lambda *_: None,
                         workers=unit_workers, base_version=None, processes=units_on == "processes")
    os.sync()  # the finish line is the same for both sides: every byte written is on disk
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    manifest = read_manifest(dest)
    images = sum(manifest.splits[s].samples for s in SPLITS)
    spools = sum(p.stat().st_size for p in (out / WORK).rglob("*.tar"))
    return {**_figures(images, seconds, cpu, sum(s["bytes"] for s in manifest.shards)), "spool_bytes": spools,
            "phases_s": {k: round(v, 2) for k, v in phases.items()}, "bad_files": len(manifest.bad_files)}


# --------------------------------------------------------------------------------------------- FFCV


class ImageFolder:
    """The part of torchvision's ImageFolder that ffcv-imagenet's writer uses: (PIL RGB image, label)."""

    def __init__(self, root: Path) -> None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(str(p), label) for label, c in enumerate(classes) for p in sorted((root / c).iterdir())]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB"), label


def run_ffcv(source: Path, out: Path, workers: int) -> dict[str, Any]:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out.mkdir(parents=True, exist_ok=True)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    images = 0
    for split in ("train", "val"):
        dataset = ImageFolder(source / split)
        writer = DatasetWriter(str(out / f"{split}.ffcv"), {"image": RGBImageField(**FFCV_SETTINGS), "label": IntField()},
                               num_workers=workers)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # the writer's progress bar
            writer.from_indexed_dataset(dataset, chunksize=FFCV_CHUNKSIZE)
        images += len(dataset)
    os.sync()  # FFCV's writer does not flush; staging flushes its shards before the manifest
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return _figures(images, seconds, cpu, sum(p.stat().st_size for p in out.glob("*.ffcv")))


# --------------------------------------------------------------------------------------------- profile


def profile_one_class(source: Path, scratch: Path, top: int = 18) -> None:
    """Where one class's time goes in process_unit (decode, resize, encode, spool), in this process."""
    unit = imagenet.open_source(source).train_units()[0]
    params = StageParams()
    prof = cProfile.Profile()
    prof.enable()
    process_unit(unit, "train", scratch, params)
    prof.disable()
    print(f"\nprocess_unit on one class ({len(unit.names)} images), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# --------------------------------------------------------------------------------------------- main


def _idle_fraction(seconds: float = 2.0) -> float | None:
    """How idle the host's CPUs were over `seconds` (Linux /proc/stat), or None where unknown."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return round((idle1 - idle0) / max(1, total1 - total0), 3)


def wait_until_idle(limit: float, threshold: float = 0.9) -> float | None:
    """On a shared host, wait (at most `limit` seconds) until others leave the CPUs nearly idle; returns the
    idle fraction seen last."""
    deadline = time.monotonic() + limit
    idle = _idle_fraction()
    while idle is not None and idle < threshold and time.monotonic() < deadline:
        idle = _idle_fraction()
    return idle


SIDES = {
    "staging": "staging, units on threads (effnet stage)",
    "staging-processes": "staging, units in processes",
    "staging-serial": "staging, units one at a time",
    "ffcv": "FFCV, ffcv-imagenet settings",
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images to generate (train + val), 20 classes")
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the best is reported")
    p.add_argument("--workers", type=int, default=available_cores())
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "effnet-staging-bench",
                   help="where the generated images are kept between runs")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    p.add_argument("--tiers", type=int, nargs="+", help="stage these tiers instead of the default ones")
    p.add_argument("--profile", action="store_true", help="profile one class through process_unit")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for the host to be idle (a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    info = machine()
    # Default tiers, shard size and JPEG quality unless --tiers; a 2 % minival.
    params = StageParams(minival=0.02, **({"tiers": tuple(args.tiers)} if args.tiers else {}))
    source = args.data / f"images-{args.images}"
    images = make_images(source, args.images, args.workers)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="staging-bench-") as tmp:
        for r in range(args.repeats):
            # Rotate the order so that no side always runs first (on a cooler or a busier machine).
            order = args.sides[r % len(args.sides):] + args.sides[: r % len(args.sides)]
            for side in order:
                idle = wait_until_idle(args.wait_idle) if args.wait_idle else _idle_fraction(0.5)
                out = Path(tmp) / f"{side}-{r}"
                os.sync()  # start clean: no run pays for writing back the previous run's files
                if side == "ffcv":
                    result = run_ffcv(source, out, args.workers)
                else:
                    result = run_staging(source, out, params, args.workers, side.partition("-")[2] or "threads")
                result["host_idle_before"] = idle
                runs[side].append(result)
                print(f"  run {r + 1} {side:16s} {result['images_per_s']:7.1f} images/s  {result['seconds']:6.2f} s  "
                      f"{result['cpu_ms_per_image']:5.2f} CPU ms/image  (host {'?' if idle is None else f'{idle:.0%}'} idle)")
                shutil.rmtree(out, ignore_errors=True)
        if args.profile:
            profile_one_class(source, Path(tmp) / "profile")

    best = {side: max(rs, key=lambda x: x["images_per_s"]) for side, rs in runs.items()}
    tiers = list(params.tiers)
    print(f"\n{images['images']} images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} px (~{images['mean_kb']} KB), "
          f"{args.workers} workers, {info['cores']} cores ({info['cpu']}), best of {args.repeats}")
    print(f"staging writes {len(tiers)} tiers ({', '.join(map(str, tiers))} px) of WebDataset shards; FFCV writes one "
          f"file per split at max 500 px (half the images JPEG q90, half raw pixels)")
    print(f"{'side':42s} {'images/s':>9s} {'seconds':>8s} {'CPU ms/img':>11s} {'MB out':>8s}")
    for side, r in best.items():
        print(f"{SIDES[side]:42s} {r['images_per_s']:9.1f} {r['seconds']:8.2f} {r['cpu_ms_per_image']:11.2f} "
              f"{r['bytes'] / 1e6:8.1f}")
    ratio = None
    if "ffcv" in best and "staging" in best:
        ratio = round(best["staging"]["images_per_s"] / best["ffcv"]["images_per_s"], 3)
        verdict = "met" if ratio >= 1 else "NOT met"
        print(f"staging / FFCV: {ratio:.2f} in images/s, "
              f"{best['ffcv']['cpu_ms_per_image'] / best['staging']['cpu_ms_per_image']:.2f} in CPU per image; "
              f"goal (every tier at least as fast as one FFCV file) {verdict}")
    for side in ("staging", "staging-processes", "staging-serial"):
        if side in best:
            print(f"{side} phases (best run, s): {best[side]['phases_s']}")
    scaling = {}
    if "staging-serial" in best:
        serial = best["staging-serial"]["phases_s"]["units"]
        scaling = {side: round(serial / best[side]["phases_s"]["units"], 2)
                   for side in ("staging", "staging-processes") if side in best}
        print(f"units phase speed-up over one at a time with {args.workers} workers: {scaling} "
              f"(processes include their start-up)")

    report = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "images": images,
        "workers": args.workers,
        "repeats": args.repeats,
        "tiers": tiers,
        "staging_settings": {"shard_size": params.shard_size, "minival": params.minival,
                             "jpeg_quality": params.jpeg_quality, "encoding": ENCODING},
        "ffcv_settings": {**FFCV_SETTINGS, "chunksize": FFCV_CHUNKSIZE, "num_workers": args.workers,
                          "source": "ffcv-imagenet write_imagenet.sh (500 0.50 90)"},
        "best": best,
        "runs": runs,
        "staging_over_ffcv": ratio,
        "units_speedup_over_serial": scaling,
        "goal_met": None if ratio is None else ratio >= 1,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
