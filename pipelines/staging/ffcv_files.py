"""FFCV files: one `.beton` per tier and split, written at staging for the `ffcv` loader backend.

`write_ffcv_files` (the `ffcv` writer of `stager.extra_writer`) writes `<tier>/<split>.beton` holding the split's
images in its planned (shuffled) order, so sample i of the beton is sample i of the split's shards read in name
order: the same index space as the `wds` and `dali` backends. Images are the tier's JPEGs from the staging spools
(or the source), decoded to RGB arrays; FFCV encodes them again as `ffcv_write_mode` says. A beton whose
`.sha256` sidecar verifies is reused.

NOTE: `RGBImageField(max_resolution=...)` caps the *longer* side, while a tier caps the *shorter* side (what
`pipelines.dataset.select_tier` relies on: eval at 224 needs 256 px of short side). Passing the tier would shrink
a 341x256 image to 256x192, so the field gets no max_resolution: the tier images are stored at their tier size.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.atomic import atomic_path, sha256_file, verified_digest, write_sidecar
from pipelines.dataset import SPLITS, DataError, beton_relpath
from pipelines.seeds import Stream, mix_seed
from pipelines.staging.params import StageParams
from pipelines.staging.plan import DatasetPlan
from pipelines.staging.shards import SampleReader

_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB)


class _StagedImages:
    """The images of one split x tier in planned order, read from the spools or the source: (RGB HWC uint8, label).

    Indexable and picklable, as FFCV's DatasetWriter wants; it runs in the writer's worker processes.
    """

    def __init__(self, spans: list[tuple[str, int, int, int]], seed: int) -> None:
        self.spans, self.seed = spans, seed  # spans: (file, offset, size, label)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, offset, size, label = self.spans[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        # write_mode='proportion' draws from numpy's global generator in the worker: seeding it per sample makes
        # the raw-or-JPEG choice of sample i the same whichever worker encodes it.
        np.random.seed(mix_seed(self.seed, Stream.FFCV_WRITE, i))
        image = Image.open(io.BytesIO(data)).convert("RGB")  # staging stored RGB already; this is a guard
        return np.asarray(image, dtype=np.uint8), int(label)


def _spans(plan: DatasetPlan, split: str, tier: int, work: Path) -> list[tuple[str, int, int, int]]:
    """(file, offset, size, label) of every sample of a split at a tier, in the split's order."""
    reader = SampleReader(work)
    spans = [(*reader.where(plan.records[key], tier), plan.records[key]["label"]) for key in plan.splits[split]]
    # A worker that raises leaves FFCV's writer waiting forever for its samples: check the files first.
    for path in {s[0] for s in spans}:
        if not Path(path).exists():
            raise DataError(f"{path}: staged image bytes missing; cannot write the FFCV files")
    return spans


def _page_size(plan: DatasetPlan, split: str, tier: int) -> int:
    """Smallest FFCV page (a power of two, >= 2 MiB) that holds two of the split's largest raw images."""
    largest = max(
        (w * h * 3 for key in plan.splits[split] for _, _, w, h in [plan.records[key]["tiers"][str(tier)]]),
        default=0,
    )
    return max(_MIN_PAGE, 1 << math.ceil(math.log2(max(1, 2 * largest))))


def write_beton(
    plan: DatasetPlan,
    split: str,
    tier: int,
    work: Path,
    dest: Path,
    params: StageParams,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Write (or reuse, if its checksum sidecar verifies) one split x tier beton; returns its manifest entry."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rel = beton_relpath(tier, split)
    path = dest / rel
    entry = {"path": rel, "split": split, "tier": tier, "samples": len(plan.splits[split])}
    digest = verified_digest(path)
    if digest is not None:
        return {**entry, "bytes": path.stat().st_size, "sha256": digest}
    dataset = _StagedImages(_spans(plan, split, tier, work), params.seed)
    workers = num_workers or os.cpu_count() or 1
    workers = max(1, min(workers, math.ceil(len(dataset) / 64)))  # a tiny split is not worth a second process
    fields = {
        "image": RGBImageField(
            write_mode=params.ffcv_write_mode,
            max_resolution=None,
            jpeg_quality=params.ffcv_jpeg_quality,
            compress_probability=params.ffcv_compress_probability,
        ),
        "label": IntField(),
    }
    # Not fsynced here: `stage` waits for every file of the version once, before the manifest commits it.
    with atomic_path(path, durable=False) as tmp:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(plan, split, tier), num_workers=workers)
        writer.from_indexed_dataset(dataset, chunksize=64)
        digest = sha256_file(tmp)
    write_sidecar(path, digest)
    return {**entry, "bytes": path.stat().st_size, "sha256": digest}


def write_ffcv_files(
    plan: DatasetPlan,
    shard_entries: list[dict[str, Any]],
    work: Path,
    dest: Path,
    params: StageParams,
) -> list[dict[str, Any]]:
    """`stager.extra_writer`'s `ffcv`: one beton per tier per non-empty split. Idempotent: verified betons are kept
    as they are.

    NOTE: with several writer processes FFCV lays pages out in completion order, so two writes of the same
    beton hold the same samples at the same indices but need not be byte-identical; the manifest records the
    checksum of the file actually written.
    """
    del shard_entries  # the images come from the spools, which allow random access
    entries = []
    for tier in params.tiers:
        for split in SPLITS:
            if plan.splits[split]:
                entries.append(write_beton(plan, split, tier, Path(work), Path(dest), params))
    return entries
