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
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.atomic import atomic_path, sha256_file, verified_digest, write_sidecar
from pipelines.dataset import SPLITS, DataError, beton_relpath
from pipelines.seeds import Stream, mix_seed
from pipelines.staging.params import StageParams
from pipelines.staging.plan import DatasetPlan

_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB)


class _StagedImages:
    """The images of one split x tier in planned order, read from the spools or the source: (RGB HWC uint8, label).

    Indexable and picklable, as FFCV's DatasetWriter wants; it runs in the writer's worker processes.
    """

    def __init__(self, files: list[str], spans: np.ndarray, seed: int) -> None:
        self.files, self.spans, self.seed = files, spans, seed  # spans: (file index, offset, size, label) rows

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        file, offset, size, label = self.spans[i].tolist()
        with open(self.files[file], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        # write_mode='proportion' draws from numpy's global generator in the worker: seeding it per sample makes
        # the raw-or-JPEG choice of sample i the same whichever worker encodes it.
        np.random.seed(mix_seed(self.seed, Stream.FFCV_WRITE, i))
        image = Image.open(io.BytesIO(data)).convert("RGB")  # staging stored RGB already; this is a guard
        return np.asarray(image, dtype=np.uint8), int(label)


def _spans(plan: DatasetPlan, split: str, tier: int, work: Path) -> tuple[list[str], np.ndarray]:
    """The files a split's samples at a tier lie in, and each sample's (file index, offset, size, label), in the
    split's order: an array row per sample, not a tuple and a path."""
    catalog = plan.catalog
    files: dict[str, int] = {}
    spans = array("q")
    for row in plan.splits[split].tolist():
        path, offset, size = catalog.where(row, tier, work)
        spans.extend((files.setdefault(path, len(files)), offset, size, catalog.label(row)))
    # A worker that raises leaves FFCV's writer waiting forever for its samples: check the files first.
    for path in files:
        if not Path(path).exists():
            raise DataError(f"{path}: staged image bytes missing; cannot write the FFCV files")
    return list(files), np.frombuffer(spans, np.int64).reshape(-1, 4) if spans else np.empty((0, 4), np.int64)


def _page_size(plan: DatasetPlan, split: str, tier: int) -> int:
    """Smallest FFCV page (a power of two, >= 2 MiB) that holds two of the split's largest raw images."""
    dims = plan.catalog.dims[plan.splits[split], plan.catalog.column(tier)].astype(np.int64)
    largest = int((dims[:, 0] * dims[:, 1] * 3).max()) if len(dims) else 0
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
    dataset = _StagedImages(*_spans(plan, split, tier, work), params.seed)
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
            if len(plan.splits[split]):
                entries.append(write_beton(plan, split, tier, Path(work), Path(dest), params))
    return entries
