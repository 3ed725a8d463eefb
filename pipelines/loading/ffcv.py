"""The `ffcv` backend: a rank's share of a split read from its `.beton` (staged with the "ffcv" format).

FFCV's own `distributed=True` wraps torch's DistributedSampler, which needs an initialised process group, and pads
every split (an eval sample would be scored twice). So the loader computes each rank's sample indices itself
(`sampling.rank_epoch_indices`: a (seed, epoch) permutation strided by `sampling.rank_positions`, exactly the
documented semantics) and passes them as `indices=` with `OrderOption.SEQUENTIAL`, which reads them in the given
order. FFCV 1.0.2 does not seed its augmentations (RandomHorizontalFlip draws from an unseeded generator on
whichever thread runs it), so the train decoder here is RandomResizedCropRGBImageDecoder with the flip folded in,
drawing from numba's generator seeded per sample from the epoch's seed (`augmentation_seed`) and the sample
index: crops and flips depend on (seed, epoch) only, not on threads or world size. Evaluation uses FFCV's
CenterCropRGBImageDecoder cutting `transforms.center_crop_box`'s square (`_center_crop_decoder_class`), so the
three backends score the same pixels. Batches are NCHW tensors in channels_last memory, as FFCV's ToTorchImage
makes them.

Resolution: a new FFCV `Loader` is built every time a loader is iterated (the interface is one loader per epoch;
the epoch's seed is compiled into the decoder), so setting `decoder.output_size` on a long-lived loader, as
ffcv-imagenet does, buys nothing here. Building one compiles its pipeline with numba: the start-up column of
`benchmarks/loaders.py` (~2.5 s on 2 cores), about 0.5% of an ImageNet epoch of B0 on one A100.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.dataset import FFCV, DataError, beton_relpath, read_manifest, split_tier
from pipelines.loading.sampling import rank_epoch_indices
from pipelines.loading.transforms import TrainCrop
from pipelines.seeds import Stream, mix_seed


def augmentation_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's random crops and flips, < 2**32; the decoder mixes in each sample's index."""
    return mix_seed(seed, Stream.FFCV_AUGMENT, epoch)


@lru_cache(maxsize=1)
def _fix_os_cache_state_type() -> None:
    """Stop FFCV 1.0.2 from corrupting numba's type for writable uint8 arrays.

    FFCV: `OSCacheManager.state_type` does `t1 = nb.uint8[::1]; t1.mutable = False`, which mutates numba's
    interned type instance for *every* writable 1-D uint8 array in the process, so its hash changes after it has
    been used as a dictionary key. Every compiled function keyed on it (FFCV's own decoders included) is then
    corrupted: the second Loader of a process prints KeyErrors from numba finalizers, or fails to compile,
    which leaves FFCV's loading thread dead and the consumer waiting forever. Build a distinct read-only type.
    """
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler

    data = nb.types.Array(nb.uint8, 1, "C", readonly=True)
    offsets = nb.types.Array(nb.uint64, 1, "C")
    state = nb.types.Tuple([data, offsets, offsets])

    def compile_reader(self: Any) -> Any:  # FFCV's own reader, typed with `state` instead of the mutated type
        def read(address, mem_state):  # compiled by numba
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read, data(nb.uint64, state))

    OSCacheManager.state_type = property(lambda self: state)
    OSCacheManager.compile_reader = compile_reader


@lru_cache(maxsize=1)
def _seeded_crop_decoder_class() -> type:
    """RandomResizedCropRGBImageDecoder with per-sample seeding and the horizontal flip folded in.

    Defined on first use so that importing this module does not import FFCV (numba, OpenCV: seconds).
    """
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropFlipDecoder(RandomResizedCropRGBImageDecoder):
        """Decode, random-resized-crop and flip with probability 1/2 (0 with `crop.flip` off), drawing from a
        generator seeded with (epoch seed, sample index) for each sample: the same pixels whatever thread decodes
        the sample."""

        def __init__(self, output_size: tuple[int, int], seed: int, crop: TrainCrop) -> None:
            super().__init__(output_size, scale=crop.scale, ratio=crop.ratio)
            self.seed, self.flip_probability = seed, 0.5 if crop.flip else 0.0

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            scale, ratio = np.array(self.scale), np.array(self.ratio)
            flip_probability = self.flip_probability
            # A sample's seed: the epoch's seed XOR the high half of (index x 2**64 / golden ratio) mod 2**64.
            # Computed inside numba (no mix_seed call per sample), it depends on (seed, epoch, index) only, and
            # no two indices below 10**8 share that high half (checked), so no two samples of an epoch share a seed.
            base = np.uint64(self.seed)
            mix = np.uint64(0x9E3779B97F4A7C15)
            shift = np.uint64(32)

            def decode(batch_indices, my_storage, metadata, storage_state):  # compiled by numba
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    np.random.seed(base ^ ((np.uint64(source_ix) * mix) >> shift))
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    out = destination[dst_ix]
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                    if np.random.random() < flip_probability:
                        cols = out.shape[1]
                        for y in range(out.shape[0]):
                            for x in range(cols // 2):
                                for c in range(3):
                                    t = out[y, x, c]
                                    out[y, x, c] = out[y, cols - 1 - x, c]
                                    out[y, cols - 1 - x, c] = t
                return destination[: len(batch_indices)]

            decode.is_parallel = True  # type: ignore[attr-defined]  # FFCV's compiler reads the flag off the function
            return decode

    return SeededRandomResizedCropFlipDecoder


@lru_cache(maxsize=1)
def _center_crop_decoder_class() -> type:
    """CenterCropRGBImageDecoder cutting exactly `transforms.center_crop_box`'s square.

    FFCV 1.0.2 truncates the side (`int(ratio * shorter side)`) where the wds and dali backends round it: a pixel
    less whenever the fraction is 0.5 or more, a shifted, rescaled crop (measured on the demo at 64 px and ratio
    2/3, a 42 instead of a 43 px square: ~10 levels mean absolute difference from wds, ~3 with the same square).
    """
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

    def center_crop(height, width, _, ratio):  # compiled by numba
        side = max(1, round(min(height, width) * ratio))  # Python's round, as center_crop_box
        return (height - side) // 2, (width - side) // 2, side, side

    class RoundedCenterCropRGBImageDecoder(CenterCropRGBImageDecoder):
        @property
        def get_crop_generator(self) -> Any:
            return center_crop

    return RoundedCenterCropRGBImageDecoder


class FfcvLoader:
    """One rank's epoch of a split from a beton: an iterable of (uint8 NCHW, int64) CPU batches with len().

    Images are NCHW tensors in channels_last memory (FFCV decodes HWC; training runs channels_last): no
    transposition here, and `transforms.normalize` accepts any layout. Each iteration builds an FFCV Loader over
    this rank's indices and copies every batch out of FFCV's recycled buffers (FFCV reuses them a few batches
    later; callers may keep batches).
    """

    bad_samples = 0  # FFCV fails loudly on a broken beton rather than skipping samples

    def __init__(
        self,
        path: Path,
        indices: np.ndarray,
        train: bool,
        resolution: int,
        batch_size: int,
        crop_ratio: float,
        num_workers: int,
        aug_seed: int,
        train_crop: TrainCrop = TrainCrop(),
    ) -> None:
        self.path, self.indices, self.train = path, indices, train
        self.resolution, self.batch_size, self.crop_ratio = resolution, batch_size, crop_ratio
        self.num_workers, self.aug_seed, self.train_crop = max(1, num_workers), aug_seed, train_crop

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def build(self) -> Any:
        """The FFCV Loader for this epoch (compiles its pipeline)."""
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        _fix_os_cache_state_type()
        res = (self.resolution, self.resolution)
        if self.train:
            decoder = _seeded_crop_decoder_class()(res, self.aug_seed, self.train_crop)
        else:
            decoder = _center_crop_decoder_class()(res, ratio=self.crop_ratio)
        threads = torch.get_num_threads()
        try:
            return Loader(
                str(self.path),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                order=OrderOption.SEQUENTIAL,
                indices=self.indices,
                drop_last=self.train,
                batches_ahead=2,
                pipelines={
                    "image": [decoder, ToTensor(), ToTorchImage(channels_last=True)],
                    "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                },
            )
        finally:
            torch.set_num_threads(threads)  # FFCV sets torch's thread count to its own: put it back

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self) == 0:
            return
        threads = torch.get_num_threads()
        loader = self.build()
        try:
            epoch = iter(loader)
        finally:
            torch.set_num_threads(threads)
        for images, labels in _guarded(epoch, self.path):
            # A same-layout copy (~1 ms per 64 x 224 px batch); making it NCHW-contiguous would cost 8x that.
            yield (images.clone(memory_format=torch.channels_last), labels.to(torch.int64, copy=True).reshape(-1))


def _guarded(epoch: Any, path: Path, poll_s: float = 1.0) -> Iterator[Any]:
    """FFCV's `EpochIterator.__next__`, except that it raises when the loading thread died.

    FFCV decodes in a thread that catches only StopIteration: any other error (a compile failure, a corrupt
    beton) kills it and its consumer waits on the queue forever. Python prints the thread's traceback.
    """
    from queue import Empty

    try:
        while True:
            try:
                item = epoch.output_queue.get(timeout=poll_s)
            except Empty:
                if epoch.is_alive():
                    continue
                try:  # it may have queued its end marker just before exiting
                    item = epoch.output_queue.get_nowait()
                except Empty:
                    raise DataError(
                        f"{path}: FFCV's loading thread stopped mid-epoch (see its traceback above)"
                    ) from None
            if item is None:
                return
            slot, result = item
            stream = epoch.cuda_streams[slot]
            if stream is not None:  # as FFCV: wait for the copy of this batch slot to finish
                epoch.current_stream.wait_stream(stream)
            yield result
    finally:
        epoch.close()


def make_ffcv_loader(
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
) -> FfcvLoader:
    """`make_loader(..., backend="ffcv")`: same arguments and semantics; num_workers = FFCV threads.

    Started at batch k, the loader reads the rank's indices from the k-th batch's first on: every crop is seeded by
    its sample's index, so the batches are those of an uninterrupted epoch from batch k on."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    train, tier = split_tier(manifest, split, resolution, crop_ratio)
    n = manifest.splits[split].samples
    path = dataset_dir / beton_relpath(tier, split)
    listed = {e["path"] for e in manifest.extra.get(FFCV, ())}
    if n and (beton_relpath(tier, split) not in listed or not path.exists()):
        raise DataError(f"{path}: no FFCV file for {split} at tier {tier}; stage with formats including '{FFCV}'")
    indices = rank_epoch_indices(n, train, rank, world_size, seed, epoch).astype(np.uint64)[start_batch * batch_size :]
    return FfcvLoader(
        path,
        indices,
        train,
        resolution,
        batch_size,
        crop_ratio,
        num_workers,
        augmentation_seed(seed, epoch),
        train_crop,
    )
