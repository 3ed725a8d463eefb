"""The `dali` backend: a rank's share of a split read by DALI from the shards, through the indexes staged beside
them (the "dali" format).

`fn.readers.webdataset` reads the samples an index lists, in the order listed, by seeking to their offsets. Its
own sharding (`shard_id`/`num_shards`: contiguous blocks whose sizes differ by one, evened out by repeating a
block's last sample) and shuffling (a buffer that keeps filling across the epoch boundary, so it repeats some
samples and leaves others) cannot give the documented semantics. So for each epoch the loader writes small
per-rank index files (in a temporary folder, removed when the epoch ends) that list exactly this rank's samples
(`sampling.rank_epoch_indices`: the same samples the ffcv backend gives the rank), and the reader runs with
`random_shuffle=False`:
- train: the rank's ceil(N / world) samples of the (seed, epoch) permutation, padded as DistributedSampler;
  exactly (N / world rounded up) // batch_size full batches on every rank. An index file can only point into
  its own tar, so samples are read grouped by shard (shards in random order, samples within a shard in random
  order), like the `wds` backend's shard shuffle; the shards themselves were shuffled across classes at staging.
- eval: every sample exactly once across ranks, in the split's planned order; the last batch is partial.

Train: `decoders.image_random_crop` (the RandomResizedCrop area and aspect ranges; only the crop is decoded),
`resize` to the resolution, a coin-flip mirror, from DALI's generator seeded from (seed, epoch, rank)
(`dali_seed`). Eval: exactly `transforms.center_crop_box` (`decoders.image_slice` of the centred square, then
`resize`), so its pixels match the wds backend's to a fraction of a level. `crop_mirror_normalize` makes uint8 CHW
without normalising. Decoding runs on the CPU (`device_id=None`), or with nvJPEG (`device="mixed"`) on the current
CUDA device when torch sees one (images then arrive as CUDA tensors; the tests cover the CPU path). A pipeline is
built per epoch (the interface is one loader per epoch), which also switches resolution; building one takes well
under a second.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.dataset import (
    EXTENSIONS,
    INDEX_SUFFIX,
    DataError,
    ensure_index,
    index_path,
    index_text,
    read_index,
    read_manifest,
    split_shards,
    split_tier,
)
from pipelines.loading.sampling import rank_epoch_indices
from pipelines.loading.transforms import TrainCrop
from pipelines.seeds import Stream, mix_seed

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode


def _device_id() -> int | None:
    """The CUDA device the caller trains on (the training loop sets it), or None for a CPU-only pipeline."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def build_pipeline(
    paths: list[str],
    index_paths: list[str],
    train: bool,
    resolution: int,
    crop_ratio: float,
    batch_size: int,
    num_threads: int,
    seed: int,
    device_id: int | None,
    train_crop: TrainCrop = TrainCrop(),
) -> Any:
    """The DALI pipeline of one epoch: read (in index order), decode, crop, flip, uint8 CHW."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import Pipeline

    decode_on = "cpu" if device_id is None else "mixed"
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2
    )
    # The `fn` stubs type every operator's result as "one node, several, or none" whatever it is called with; the
    # calls below each make one node (two for the reader), hence the ignores. The image and data types are the
    # enums' own members (`types.RGB` is `types.DALIImageType.RGB`, re-exported in a way the stubs do not show).
    mirror: DataNode | int
    with pipe:
        jpegs, cls = fn.readers.webdataset(  # type: ignore[misc]
            paths=paths,
            index_paths=index_paths,
            ext=list(EXTENSIONS),
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
        )
        if train:
            # The area/aspect draw of transforms.random_resized_crop_box, with DALI's own generator.
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decode_on,
                output_type=types.DALIImageType.RGB,
                random_area=list(train_crop.scale),
                random_aspect_ratio=list(train_crop.ratio),
                num_attempts=10,
            )
            images = fn.resize(images, resize_x=resolution, resize_y=resolution)  # type: ignore[assignment]
            mirror = fn.random.coin_flip(probability=0.5 if train_crop.flip else 0.0)
        else:
            # transforms.center_crop_box: the centred square of side round(shorter side x crop_ratio), resized to
            # the resolution (the same pixels as "resize shorter side to resolution / crop_ratio, centre crop",
            # without DALI rounding the intermediate size). Only that square is decoded.
            shape = fn.peek_image_shape(jpegs)  # H, W, C
            height = fn.cast(shape[0], dtype=types.DALIDataType.FLOAT)
            width = fn.cast(shape[1], dtype=types.DALIDataType.FLOAT)
            side = dmath.floor(dmath.min(height, width) * crop_ratio + 0.5)
            corner = fn.stack(dmath.floor((width - side) * 0.5), dmath.floor((height - side) * 0.5))  # x, y
            images = fn.decoders.image_slice(
                jpegs,
                corner,
                fn.stack(side, side),
                device=decode_on,
                output_type=types.DALIImageType.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
            )
            images = fn.resize(images, resize_x=resolution, resize_y=resolution)  # type: ignore[assignment]
            mirror = 0
        # No mean/std: pixels stay uint8 and are normalised on the device (transforms.normalize).
        images = fn.crop_mirror_normalize(images, dtype=types.DALIDataType.UINT8, output_layout="CHW", mirror=mirror)
        pipe.set_outputs(images, cls)
    pipe.build()
    return pipe


class DaliLoader:
    """One rank's epoch of a split through DALI: an iterable of (uint8 NCHW, int64) batches with len().

    Images are CPU tensors, or CUDA tensors on the current device when decoding is 'mixed'; labels stay on
    the CPU. Each iteration writes this epoch's per-rank index files and builds a pipeline over them.
    """

    bad_samples = 0  # DALI stops with an error on a sample that does not decode

    def __init__(
        self,
        shards: list[Path],
        lines: list[list[str]],
        indices: np.ndarray,
        train: bool,
        resolution: int,
        batch_size: int,
        crop_ratio: float,
        num_workers: int,
        seed: int,
        start_batch: int = 0,
        train_crop: TrainCrop = TrainCrop(),
    ) -> None:
        self.shards, self.lines, self.indices, self.train = shards, lines, indices, train
        self.start_batch, self.train_crop = start_batch, train_crop
        self.resolution, self.batch_size, self.crop_ratio = resolution, batch_size, crop_ratio
        self.num_threads, self.seed = max(1, num_workers), seed
        # position in the split's planned order -> (shard, line in its index)
        self._shard_of = np.repeat(np.arange(len(lines)), [len(x) for x in lines])
        self._line_of = np.concatenate([np.arange(len(x)) for x in lines]) if lines else np.zeros(0, np.int64)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def samples(self) -> int:
        """Samples this rank yields this epoch."""
        return len(self) * self.batch_size if self.train else len(self.indices)

    def _write_rank_indexes(self, folder: Path) -> tuple[list[str], list[str]]:
        """Per-shard index files listing this rank's samples, shards in order of first appearance."""
        groups: dict[int, list[str]] = {}
        for position in self.indices.tolist():
            shard = int(self._shard_of[position])
            groups.setdefault(shard, []).append(self.lines[shard][int(self._line_of[position])])
        paths, index_paths = [], []
        for i, (shard, lines) in enumerate(groups.items()):
            path = folder / f"{i:06d}{INDEX_SUFFIX}"
            path.write_text(index_text(lines))
            paths.append(str(self.shards[shard]))
            index_paths.append(str(path))
        return paths, index_paths

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self) == 0:
            return
        folder = Path(tempfile.mkdtemp(prefix="dali-epoch-"))
        try:
            paths, index_paths = self._write_rank_indexes(folder)
            device_id = _device_id()
            pipe = build_pipeline(
                paths,
                index_paths,
                self.train,
                self.resolution,
                self.crop_ratio,
                self.batch_size,
                self.num_threads,
                self.seed,
                device_id,
                self.train_crop,
            )
            left = self.samples()
            try:
                # DALI's generator runs through the pipeline's samples in order: a loader started at batch k
                # runs (and drops) the first k batches, so that its crops are an uninterrupted epoch's.
                for _ in range(self.start_batch):
                    pipe.run()
                    left -= self.batch_size
                while left > 0:
                    images, cls = pipe.run()
                    take = min(left, self.batch_size)  # the reader wraps into the next epoch: cut there
                    yield _to_torch(images, take, device_id), _labels(cls, take)
                    left -= take
            finally:
                del pipe
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _to_torch(images: Any, take: int, device_id: int | None) -> torch.Tensor:
    if device_id is None:
        return torch.from_numpy(np.array(images.as_tensor())[:take])  # np.array copies out of DALI's buffer
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.uint8, device=torch.device("cuda", device_id))
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out[:take]


def _labels(cls: Any, take: int) -> torch.Tensor:
    # A `.cls` member is the label as ASCII digits: DALI hands over its bytes.
    return torch.tensor([int(np.asarray(cls[i]).tobytes()) for i in range(take)], dtype=torch.int64)


def dali_seed(seed: int, epoch: int, rank: int) -> int:
    """The pipeline seed of one rank's epoch (DALI wants a non-negative 32-bit int: 31 bits)."""
    return mix_seed(seed, Stream.DALI, epoch, rank) & 0x7FFFFFFF


def make_dali_loader(
    dataset_dir: str | Path,
    split: str,
    resolution: int,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    crop_ratio: float,
    num_workers: int,
    start_batch: int = 0,
    train_crop: TrainCrop = TrainCrop(),
) -> DaliLoader:
    """`make_loader(..., backend="dali")`: same arguments and semantics; num_workers = DALI threads."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    train, tier = split_tier(manifest, split, resolution, crop_ratio)
    shards = split_shards(dataset_dir, manifest, split, tier)
    lines = []
    for s in shards:
        shard_lines = read_index(ensure_index(s.path))
        if len(shard_lines) != s.samples:
            raise DataError(f"{index_path(s.path)}: {len(shard_lines)} samples, the manifest says {s.samples}")
        lines.append(shard_lines)
    n = sum(s.samples for s in shards)
    indices = rank_epoch_indices(n, train, rank, world_size, seed, epoch)
    return DaliLoader(
        [s.path for s in shards],
        lines,
        indices,
        train,
        resolution,
        batch_size,
        crop_ratio,
        num_workers,
        dali_seed(seed, epoch, rank),
        start_batch,
        train_crop,
    )
