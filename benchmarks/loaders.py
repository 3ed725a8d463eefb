"""Loader throughput (train mode: random-resized crop + flip, images/s) of every backend beside a plain
PIL + torch DataLoader baseline over the original JPEGs, in the same run.

The images are those of benchmarks/staging.py (`benchmarks.common.make_images`: 500x375 px JPEGs of about
110 KB, 20 classes, the extracted ImageNet layout), kept between runs under --data. They are staged three times
with FFCV files and DALI indexes, into one datasets root (so the versions share their spools), and the staged
copies are kept too (staging is idempotent: a second run reuses them):
- tiers (128, 256): what training reads; 128 px is served from the 128 tier, 224 px from the 256 tier;
- the same with `ffcv_write_mode='raw'` ("ffcv-raw": FFCV stores pixels, so loading decodes no JPEG; its train
  files are ~6x the size of the tiers' JPEGs);
- tier 512: the originals as they are (their shorter side is 375), to measure each backend on full-size JPEGs.

Each configuration runs one train epoch (all but the first batch timed; loader start-up, such as FFCV
compiling its pipeline, is reported apart) with --workers workers (DataLoader processes for wds and the
baseline, threads for FFCV and DALI), --rounds times in alternating order; the best round is reported (the
host is shared: the fastest round is the least disturbed). "per core" divides by the machine's cores.

    python benchmarks/loaders.py [--images 2000] [--rounds 3] [--workers 2] [--batch 64] [--data DIR]
                                 [--ranks 8] [--shares-only] [--profile] [--gpu]

Shares (`--ranks R --workers W`): R ranks x W DataLoader workers of the wds backend simulated as R x W consumers,
each iterating its own share of one train epoch at 224 px, run by one warmed-up process per core (a consumer per
core at a time, as a cluster gives each loader worker a core). Each reports the bytes it read (`rchar` of
/proc/self/io, the kernel's count of read/pread bytes) and its images/s. Run at 1 rank and at R ranks, --rounds
times each in alternating order, the best round reported: total bytes against the train split's size (goal at R
ranks: <= 1.05x) and the median consumer's images/s (per core) against 1 rank's (goal: within 15%). Results:
benchmarks/results/loader_shares.json (`--shares-only` runs just this part).

`--profile` profiles the wds backend in-process at 224 px and prints where the time goes. `--gpu` also
measures DALI decoding on the GPU (nvJPEG, 'mixed') at 224 px and how many GPUs' worth of EfficientNet-B0
training that feeds (NVIDIA: 2,489 img/s per A100, AMP); skipped with a message without CUDA.
Results: benchmarks/results/loaders.json.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path, where models.py would shadow the `models` package; the
# repository root instead, so that `benchmarks.common` and `pipelines` import (in worker processes too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine, make_images, write_report  # noqa: E402
from pipelines.dataset import EXTRA_FORMATS, read_manifest, select_tier
from pipelines.loading import BACKENDS, make_loader
from pipelines.loading.transforms import random_resized_crop_box
from pipelines.loading.wds import _collate
from pipelines.seeds import mix_seed
from pipelines.staging import stager  # noqa: E402
from pipelines.staging.params import StageParams

RESULTS = REPO_ROOT / "benchmarks" / "results" / "loaders.json"
SHARES_RESULTS = REPO_ROOT / "benchmarks" / "results" / "loader_shares.json"
SHARES_RESOLUTION = 224
RESOLUTIONS = (128, 224)
TIERS = (128, 256)
ORIGINALS_TIER = 512  # larger than any side of a 500x375 original: the tier keeps the original bytes
B0_A100_IMAGES_PER_S = 2489  # NVIDIA DeepLearningExamples, EfficientNet-B0, one A100-80GB, AMP (REFERENCE.md)
GOALS = {  # backend throughput over the baseline's at the same resolution
    "wds_224": 2.0,  # wds from its tier, 224 px
    "wds_128": 3.0,
    "fastest_224": 6.0,  # the fastest backend (any source), 224 px
}


# --------------------------------------------------------------------------------------------- baseline


class JpegFolder(Dataset):
    """The baseline: what a torchvision ImageFolder + RandomResizedCrop + RandomHorizontalFlip + PILToTensor
    pipeline does per image (torchvision is not installed here), with the project's crop-box sampler."""

    def __init__(self, root: Path, resolution: int, seed: int = 0) -> None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir())]
        self.resolution, self.seed = resolution, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        rng = random.Random(mix_seed(self.seed, i))
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")  # a full decode, as torchvision's pil_loader
        left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
        img = img.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous(), label


def baseline_loader(root: Path, resolution: int, batch: int, workers: int) -> DataLoader:
    return DataLoader(JpegFolder(root, resolution), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True, collate_fn=_collate)


# --------------------------------------------------------------------------------------------- measuring


def measure(make: Callable[[], Any]) -> dict[str, Any]:
    """Start-up (build to first batch) and steady throughput (the rest of the epoch) of one loader."""
    t0 = time.perf_counter()
    batches = iter(make())
    images, _ = next(batches)
    t1 = time.perf_counter()
    n = 0
    for images, labels in batches:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        n += len(labels)
    t2 = time.perf_counter()
    return {"images_per_s": n / (t2 - t1), "startup_s": round(t1 - t0, 3), "images": n,
            "seconds": round(t2 - t1, 3)}


def stage(source: Path, out: Path, tiers: tuple[int, ...], workers: int, ffcv_write_mode: str = "jpg"
          ) -> tuple[Path, float]:
    params = StageParams(tiers=tiers, shard_size=256, minival=0, formats=EXTRA_FORMATS, ffcv_write_mode=ffcv_write_mode)
    t0 = time.perf_counter()
    dest = stager.stage(source, out, params, log=lambda *a: print("  ", *a), workers=workers, base_version=None)
    return dest, time.perf_counter() - t0


def profile_wds(dataset: Path, resolution: int, batch: int, batches: int = 8, top: int = 14) -> str:
    """Where the wds backend's time goes, in-process, by own time. With one torch thread, as in a DataLoader
    worker (on a busy 2-core host, torch's 2-thread copies of one small image take milliseconds)."""
    loader = make_loader(dataset, "train", resolution, batch, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prof = cProfile.Profile()
    it = iter(loader)
    try:
        prof.enable()
        for _ in range(batches):
            next(it)
        prof.disable()
    finally:
        torch.set_num_threads(threads)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def gpu_section(dataset: Path, batch: int, workers: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        message = "--gpu: CUDA is not available on this machine; DALI 'mixed' decoding was not measured."
        print(message)
        return {"skipped": message}
    r = measure(lambda: make_loader(dataset, "train", 224, batch, num_workers=workers, backend="dali"))
    gpus = r["images_per_s"] / B0_A100_IMAGES_PER_S
    print(f"--gpu: DALI mixed at 224 px: {r['images_per_s']:.0f} img/s = {gpus:.2f} A100s of B0 training "
          f"({B0_A100_IMAGES_PER_S} img/s each)")
    return {**r, "device": torch.cuda.get_device_name(), "b0_a100_images_per_s": B0_A100_IMAGES_PER_S,
            "a100s_of_b0_fed": round(gpus, 2)}


# --------------------------------------------------------------------------------------------- main


def read_chars() -> int:
    """Bytes this process has read through read(2)/pread(2) so far, as the kernel counts them (page cache or not)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def consume_share(dataset: str, rank: int, ranks: int, worker: int, workers: int) -> dict[str, Any]:
    """One simulated consumer: DataLoader worker `worker` of `workers` on rank `rank` of `ranks`, iterating its
    share of one train epoch in this process (the wds dataset asks torch which worker it is: answered here)."""
    from types import SimpleNamespace

    from pipelines.loading import wds

    wds.get_worker_info = lambda: SimpleNamespace(id=worker, num_workers=workers)
    torch.set_num_threads(1)  # as in a DataLoader worker
    share = make_loader(dataset, "train", SHARES_RESOLUTION, 1, rank, ranks, epoch=0).dataset
    before, start = read_chars(), time.time()
    images = sum(1 for _ in share)
    end = time.time()
    return {"rank": rank, "worker": worker, "images": images, "bytes": read_chars() - before, "start": start,
            "end": end}


def _warm_up(dataset: str) -> None:
    """A pool process imports and decodes before it is timed (PIL's plugins, torch's first ops): a 100th of the
    epoch."""
    consume_share(dataset, 0, 1, 0, 100)


def measure_shares(dataset: Path, ranks: int, workers: int, cores: int) -> dict[str, Any]:
    """R x W consumers run by `cores` processes (one consumer per core at a time, as on a machine with a core per
    loader worker); their bytes read and images, in total and per consumer."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    tasks = [(str(dataset), r, ranks, w, workers) for r in range(ranks) for w in range(workers)]
    with ctx.Pool(cores, initializer=_warm_up, initargs=(str(dataset),)) as pool:
        pool.map(time.sleep, [0.5] * cores)  # every process up and warmed before the first consumer starts
        rows = pool.starmap(consume_share, tasks, chunksize=1)
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    images, read = sum(r["images"] for r in rows), sum(r["bytes"] for r in rows)
    return {"ranks": ranks, "workers": workers, "consumers": len(tasks), "processes": cores, "images": images,
            "bytes_read": read, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 1),
            "per_consumer": sorted(({"rank": r["rank"], "worker": r["worker"], "images": r["images"],
                                     "bytes_read": r["bytes"],
                                     "images_per_s": round(r["images"] / (r["end"] - r["start"]), 1)}
                                    for r in rows), key=lambda r: (r["rank"], r["worker"]))}


def shares_section(dataset: Path, ranks: int, workers: int, cores: int, rounds: int) -> dict[str, Any]:
    """1 rank and `ranks` ranks, `rounds` times in alternating order; the best round of each is reported (the
    host is shared: the fastest round is the least disturbed; bytes read do not vary)."""
    manifest = read_manifest(dataset)
    tier = select_tier(manifest.tiers, SHARES_RESOLUTION, 0.875)
    split = sum(s["bytes"] for s in manifest.shards if (s["split"], s["tier"]) == ("train", tier))
    settings = sorted({1, ranks})
    tried: dict[int, list[dict[str, Any]]] = {r: [] for r in settings}
    for i in range(rounds):
        for r in settings if i % 2 == 0 else reversed(settings):
            m = measure_shares(dataset, r, workers, cores)
            tried[r].append(m)
            print(f"  shares round {i + 1}: {r} rank(s) x {workers} workers: {m['bytes_read'] / 1e6:.1f} MB read "
                  f"({m['bytes_read'] / split:.2f}x the {split / 1e6:.1f} MB train split), "
                  f"{m['images_per_s']:.0f} img/s", flush=True)
    runs = {}
    for r, ms in tried.items():
        best = max(ms, key=lambda m: m["images_per_s"])
        # Per core: the median consumer's own rate (each runs alone on a core), not total / wall, which also
        # counts how evenly 2 or 16 consumers happen to fill the cores' timelines.
        runs[r] = {**best, "bytes_vs_split": round(best["bytes_read"] / split, 3),
                   "images_per_s_per_core": statistics.median(c["images_per_s"] for c in best["per_consumer"]),
                   "rounds_images_per_s": [m["images_per_s"] for m in ms]}
    one, many = runs[1], runs[ranks]
    speed = many["images_per_s_per_core"] / one["images_per_s_per_core"]
    for r, m in runs.items():
        print(f"  shares, best round: {r} rank(s) x {workers} workers: {m['bytes_vs_split']:.2f}x the split read, "
              f"{m['images_per_s']:.0f} img/s ({m['images_per_s_per_core']:.0f} per core)")
    print(f"  shares: {ranks} ranks read {many['bytes_vs_split']:.2f}x the split (goal <= 1.05x) at "
          f"{speed:.2f}x the 1-rank speed (goal within 15%)")
    return {
        "resolution": SHARES_RESOLUTION, "tier": tier, "train_split_bytes": split, "runs": list(runs.values()),
        "goals": {
            "bytes_at_ranks": {"target": f"<= 1.05x the split at {ranks} ranks x {workers} workers",
                               "measured": many["bytes_vs_split"], "met": many["bytes_vs_split"] <= 1.05},
            "speed_vs_one_rank": {"target": "images/s per core within 15% of 1 rank's", "measured": round(speed, 3),
                                  "met": abs(speed - 1) <= 0.15},
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images to generate (train + val), 20 classes")
    p.add_argument("--rounds", type=int, default=3, help="runs per configuration; the best is reported")
    p.add_argument("--workers", type=int, default=2, help="loader workers (processes or threads)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "effnet-staging-bench",
                   help="where the generated images and their staged copies are kept between runs")
    p.add_argument("--profile", action="store_true", help="profile the wds backend at 224 px")
    p.add_argument("--gpu", action="store_true", help="also measure DALI decoding on the GPU")
    p.add_argument("--ranks", type=int, default=8, help="ranks simulated by the shares measurement")
    p.add_argument("--shares-only", action="store_true", help="only the shares measurement (see above)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--shares-out", type=Path, default=SHARES_RESULTS)
    args = p.parse_args(argv)
    started = time.perf_counter()

    info = machine()
    cores = info["cores"]
    source = args.data / f"images-{args.images}"
    images = make_images(source, args.images, cores)
    print("staging (reused when already staged):")
    staged = args.data / "staged"  # one root: the versions share their spools
    tiered, tiered_s = stage(source, staged, TIERS, cores)
    print(f"shares of one train epoch, wds backend, {SHARES_RESOLUTION} px:")
    shares = {"machine": info, "images": images, **shares_section(tiered, args.ranks, args.workers, cores, args.rounds),
              "seconds": round(time.perf_counter() - started, 1)}
    args.shares_out.parent.mkdir(parents=True, exist_ok=True)
    args.shares_out.write_text(json.dumps(shares, indent=1) + "\n")
    print(f"wrote {args.shares_out}")
    if args.shares_only:
        return 0
    tiered_raw, tiered_raw_s = stage(source, staged, TIERS, cores, ffcv_write_mode="raw")
    originals, originals_s = stage(source, staged, (ORIGINALS_TIER,), cores)
    n_train = read_manifest(tiered).splits["train"].samples

    configs: dict[tuple[str, str, int], Callable[[], Any]] = {}
    for res in RESOLUTIONS:
        configs[("baseline", "originals", res)] = lambda res=res: baseline_loader(
            source / "train", res, args.batch, args.workers)
        for backend in BACKENDS:
            for where, dataset in (("tier", tiered), ("originals", originals)):
                configs[(backend, where, res)] = lambda b=backend, d=dataset, res=res: make_loader(
                    d, "train", res, args.batch, num_workers=args.workers, backend=b)
        # FFCV's own trade: pixels stored raw (no JPEG decode when loading) for ~6x the disk of tier JPEGs.
        configs[("ffcv-raw", "tier", res)] = lambda res=res: make_loader(
            tiered_raw, "train", res, args.batch, num_workers=args.workers, backend="ffcv")
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {key: [] for key in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))  # neither end always runs first
        for key in order:
            result = measure(configs[key])
            runs[key].append(result)
            print(f"  round {r + 1} {key[0]:8s} {key[1]:9s} {key[2]} px: {result['images_per_s']:7.1f} img/s "
                  f"(start-up {result['startup_s']:.2f} s)", flush=True)

    best = {key: max(rs, key=lambda x: x["images_per_s"]) for key, rs in runs.items()}
    base = {res: best[("baseline", "originals", res)]["images_per_s"] for res in RESOLUTIONS}
    rows = []
    for (backend, where, res), b in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][0] != "baseline")):
        source_desc = "original JPEGs" if where == "originals" else f"tier {select_tier(TIERS, res)}"
        rows.append({"backend": backend, "source": source_desc, "resolution": res,
                     "images_per_s": round(b["images_per_s"], 1), "per_core": round(b["images_per_s"] / cores, 1),
                     "vs_baseline": round(b["images_per_s"] / base[res], 2), "startup_s": b["startup_s"]})

    def speedup(backend: str, where: str, res: int) -> float:
        return best[(backend, where, res)]["images_per_s"] / base[res]

    fastest = max((k for k in best if k[2] == 224 and k[0] != "baseline"), key=lambda k: best[k]["images_per_s"])
    achieved = {"wds_224": speedup("wds", "tier", 224), "wds_128": speedup("wds", "tier", 128),
                "fastest_224": speedup(*fastest)}
    goals = {name: {"target_x": target, "achieved_x": round(achieved[name], 2), "met": achieved[name] >= target}
             for name, target in GOALS.items()}
    goals["fastest_224"]["which"] = f"{fastest[0]} from {fastest[1]}"

    print(f"\n{images['images']} images of {'x'.join(map(str, images['image_size']))} px "
          f"(~{images['mean_kb']} KB), train split {n_train}, batch {args.batch}, {args.workers} workers, "
          f"{cores} cores ({info['cpu']}), load average {info.get('load_average_at_start')}")
    print(f"{'backend':9s} {'reads':15s} {'px':>4s} {'img/s':>8s} {'per core':>9s} {'x baseline':>11s} "
          f"{'start-up s':>11s}")
    for row in rows:
        print(f"{row['backend']:9s} {row['source']:15s} {row['resolution']:4d} {row['images_per_s']:8.1f} "
              f"{row['per_core']:9.1f} {row['vs_baseline']:11.2f} {row['startup_s']:11.2f}")
    for name, g in goals.items():
        print(f"goal {name}: >= {g['target_x']}x baseline, achieved {g['achieved_x']}x"
              f"{' (' + g['which'] + ')' if 'which' in g else ''}: {'met' if g['met'] else 'NOT met'}")

    profile = None
    if args.profile:
        profile = profile_wds(tiered, 224, args.batch)
        print("\nwds backend at 224 px, in-process, by own time:\n" + profile)
    gpu = gpu_section(tiered, args.batch, args.workers) if args.gpu else None

    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "torch": torch.__version__,
        "images": images,
        "train_images": n_train,
        "settings": {"batch": args.batch, "workers": args.workers, "rounds": args.rounds, "tiers": list(TIERS),
                     "originals_tier": ORIGINALS_TIER, "mode": "train (random-resized crop + flip)",
                     "baseline": "PIL decode + RandomResizedCrop + flip in a torch DataLoader over the JPEG folder",
                     "per_core": f"images/s divided by {cores} cores"},
        # This run's staging calls: ~0 when the staged copies under --data were reused.
        "staging_s": {"tiers": round(tiered_s, 1), "tiers_ffcv_raw": round(tiered_raw_s, 1),
                      "originals": round(originals_s, 1)},
        "disk_mb": {name: round(sum(e["bytes"] for e in read_manifest(d).extra["ffcv"]
                                    if e["split"] == "train") / 1e6, 1)
                    for name, d in (("ffcv_jpg_train", tiered), ("ffcv_raw_train", tiered_raw))}
        | {"wds_train": round(sum(s["bytes"] for s in read_manifest(tiered).shards
                                  if s["split"] == "train") / 1e6, 1)},
        "results": rows,
        "goals": goals,
        "all_goals_met": all(g["met"] for g in goals.values()),
        "runs": [{"backend": k[0], "source": k[1], "resolution": k[2], "rounds": v} for k, v in runs.items()],
        "profile_wds_224": profile,
        "gpu": gpu,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, report, f"{report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
