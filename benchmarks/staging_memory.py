"""Staging memory and time per image against the size of the source: does staging stay flat as a dataset grows?

The source is ImageNet-21k's format (`pipelines.source.samples.imagenet21k`: a whole-set tar of per-synset tars,
1,000 images a synset, small JPEGs so that the run measures staging's own bookkeeping rather than decoding), in
two sizes (default 20,000 and 200,000 images). Each is staged once, by `pipelines.staging.stager.stage` in a fresh
child process (`effnet stage`'s path without Prefect: units on 2 threads, one 32 px tier, a val of 50 held out
per synset), which reports its own peak RSS (`ru_maxrss`) and wall time. The goal (issue 30): the larger run's
peak RSS within 1.5x of the smaller's, its time per image within 1.3x.

    python benchmarks/staging_memory.py [--sizes 20000 200000] [--data DIR]

The generated sources are kept under --data (default: a folder in the system's temporary directory) between
runs; the staged versions are removed after each run. Figures go to benchmarks/results/staging_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine, write_report  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "staging_memory.json"
PER_SYNSET = 1000
IMAGE_SIZE = (40, 30)
RSS_GOAL, TIME_GOAL = 1.5, 1.3

# Run in a fresh interpreter per size, so that one run's heap never counts in the other's peak.
_CHILD = """
import json, resource, sys, time
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage
source, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
dest = stage(source, out, StageParams(tiers=(32,), shard_size=1024, minival=0.01), log=lambda *_: None,
             workers=2, base_version=None)
seconds = time.perf_counter() - t0
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "version": dest.name}))
"""


def make_source(root: Path, images: int) -> Path:
    """A whole-set tar of `images` images in synsets of PER_SYNSET, kept for the next run."""
    from pipelines.source.samples.imagenet21k import write_imagenet21k

    folder = root / f"in21k-{images}"
    if (folder / "fall11_whole.tar").is_file():
        return folder
    synsets = max(1, images // PER_SYNSET)
    wnids = tuple(f"n{9_000_000 + i:08d}" for i in range(synsets))
    t0 = time.perf_counter()
    write_imagenet21k(folder, wnids, per_class=PER_SYNSET, image_size=IMAGE_SIZE)
    print(f"wrote {images} images in {synsets} synsets in {time.perf_counter() - t0:.0f} s: {folder}")
    return folder


def stage_in_child(source: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(source), str(out)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "effnet-bench-staging-memory")
    args = ap.parse_args(argv)
    runs = []
    for images in args.sizes:
        source = make_source(args.data, images)
        figures = stage_in_child(source, args.data / "out")
        figures = {
            "images": images,
            "seconds": round(figures["seconds"], 1),
            "ms_per_image": round(figures["seconds"] / images * 1e3, 3),
            "peak_rss_mib": round(figures["peak_rss_mib"], 1),
        }
        print(json.dumps(figures))
        runs.append(figures)
    small, large = runs
    rss_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    time_ratio = large["ms_per_image"] / small["ms_per_image"]
    verdict = {
        "rss_ratio": round(rss_ratio, 3),
        "time_per_image_ratio": round(time_ratio, 3),
        "rss_within_goal": rss_ratio < RSS_GOAL,
        "time_within_goal": time_ratio < TIME_GOAL,
    }
    print(
        f"peak RSS {small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB ({rss_ratio:.2f}x, goal < {RSS_GOAL}x); "
        f"time per image {small['ms_per_image']} -> {large['ms_per_image']} ms ({time_ratio:.2f}x, goal < {TIME_GOAL}x)"
    )
    write_report(RESULTS, {"machine": machine(), "image_size": IMAGE_SIZE, "runs": runs, **verdict})


if __name__ == "__main__":
    main()
