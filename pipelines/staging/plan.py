"""The plan between units and shards: which images a version holds, in which split, shard and order.

`plan_dataset` reads the units' records back into a `Catalog` (one unit at a time, from the indexes in the work
folder), holds out a val per class where the source has none (`Source.val_per_class`: ImageNet-21k, a
class-folder tree without val/), then the minival per class (`minival_quota`: seeded, stable whatever order the
units finished in, and refused by `check_minival` when it leaves a class too few train images), shuffles every
split across classes from the seed, and cuts it into `shard_size` shards per tier. The plan depends on the
records, the base and StageParams only, never on timing (`SHARD_LAYOUT` versions how it is cut). Splits and
shards are arrays of the catalog's rows, not lists of keys: beside its catalog, a plan of ImageNet-21k's ~14M
images holds a few bytes an image. With a `BaseVersion`, a finished version the new one grows from, only the new
images are planned: the base's keep their split and shards. `unit_args` lists the units a run decodes: all of
them, or with a base only what the base lacks.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.dataset import Manifest, shard_relpath
from pipelines.seeds import Stream, mix_seed
from pipelines.source.records import Source, TrainUnit, ValUnit
from pipelines.staging.catalog import Catalog, read_catalog
from pipelines.staging.params import MIN_TRAIN_PER_CLASS, StageParams, StagingError
from pipelines.staging.spools import UnitResult


def unit_args(src: Source, work: Path, params: StageParams, base: BaseVersion | None) -> list[tuple[Any, ...]]:
    """Argument tuples for process_unit: every unit, or with a base only what the base lacks (a base is found
    only for the kinds that grow: class tars and listed folders)."""
    if base is None:
        args: list[tuple[Any, ...]] = [(u, "train", work, params) for u in src.train_units()]
        return args + [(u, "val", work, params) for u in src.val_units(params.val_chunk)]
    known = base.known_by_class("train", carved=bool(src.val_per_class))
    args = []
    for u in src.train_units():
        assert isinstance(u, TrainUnit)  # the growing kinds' units
        skip = frozenset(known.get(u.wnid, ()))
        if u.names:  # a listed folder: read only the new files
            names = tuple(n for n in u.names if u.key(n) not in skip)
            if names:
                args.append((replace(u, names=names), "train", work, params))
        else:  # a class tar is read whole; the images the base holds are skipped and counted
            args.append((u, "train", work, params, skip))
    known_val = base.known("val")
    new = [e for e in src.val_entries() if e.key not in known_val]
    for i, start in enumerate(range(0, len(new), params.val_chunk)):
        args.append((ValUnit(i, src.val_path, tuple(new[start : start + params.val_chunk])), "val", work, params))
    return args


# The splits a plan cuts, in the order they are shuffled and cut (a split's place seeds its shuffle).
PLANNED_SPLITS = ("train", "minival", "val")


@dataclass(frozen=True, eq=False)
class ShardPlan:
    split: str
    tier: int
    index: int
    rows: np.ndarray = field(repr=False)  # the catalog rows it holds, in order (a slice of its split's)

    def relpath(self) -> str:
        return shard_relpath(self.tier, self.split, self.index)


@dataclass
class DatasetPlan:
    classes: tuple[str, ...]
    splits: dict[str, np.ndarray]  # split -> shuffled catalog rows written by this version (not a base's)
    shards: list[ShardPlan]
    bad: list[dict[str, str]]
    total_seen: int  # the base's images included
    catalog: Catalog = field(repr=False)  # the images of this version's units
    base: BaseVersion | None = None


def _stable_rank(seed: int, key: str) -> str:
    """A per-image sort key that does not depend on processing order, so the minival is stable."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def carve_quota(total: int, val_per_class: int) -> int:
    """Val images held out of a class of `total` where the source has no val split: `val_per_class`, but never
    more than half the class (ImageNet-21k's smallest synsets hold a handful of images)."""
    return min(val_per_class, total // 2)


def minival_quota(counts: dict[str, int], minival: int | float, seed: int) -> dict[str, int]:
    """Images per class to hold out: equal per class for a count, proportional for a fraction.

    Every class keeps at least one training image. A count that does not divide by the number of classes
    gives its remainder to classes chosen by the seed.
    """
    classes = sorted(counts)
    if not classes:
        return {}
    if isinstance(minival, float):
        quota = {c: min(counts[c] - 1, round(counts[c] * minival)) if counts[c] > 1 else 0 for c in classes}
        return {c: max(0, q) for c, q in quota.items()}
    base, extra = divmod(int(minival), len(classes))
    lucky = set(sorted(classes, key=lambda c: _stable_rank(seed, c))[:extra])
    return {c: max(0, min(counts[c] - 1, base + (c in lucky))) for c in classes}


def check_minival(totals: dict[str, int], held: dict[str, int], minival: int | float, min_train_per_class: int) -> None:
    """StagingError, in one line, for a minival that asks for more images than there are, or that leaves a class
    it takes from (`held` per class, of `totals`) with fewer than `min_train_per_class` train images."""
    total = sum(totals.values())
    if isinstance(minival, int) and minival > total:
        raise StagingError(f"minival {minival} is more than the {total} train images of the source")
    short = sorted(
        (c for c in totals if held.get(c, 0) and totals[c] - held[c] < min_train_per_class),
        key=lambda c: (totals[c] - held[c], c),
    )
    if short:
        shown = ", ".join(f"{c}: {totals[c] - held[c]} of {totals[c]}" for c in short[:3])
        raise StagingError(
            f"minival {minival} leaves {len(short)} of {len(totals)} classes with fewer than {min_train_per_class} "
            f"train images ({shown}{', ...' if len(short) > 3 else ''}); hold out fewer, or stage it anyway with "
            f"--allow-small-train (min_train_per_class=0)"
        )


def plan_dataset(
    units: Sequence[UnitResult],
    work: Path,
    classes: Sequence[str],
    params: StageParams,
    base: BaseVersion | None = None,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS,
    val_per_class: int = 0,
) -> DatasetPlan:
    """Split, shuffle and shard the images of `units` (their records read back from their indexes in `work`).
    With a base, only its new images are planned: the minival takes as many of a class's new images as brings
    the class to its quota over old and new images together (the base's minival images stay), and the new
    shards are numbered after the base's. A minival that leaves a class with fewer than `min_train_per_class`
    train images is refused (`check_minival`).

    `val_per_class` (a source without a val split) first holds that many of each class's train images out as
    val (`carve_quota`), seeded and stable like the minival, and the same way over a base's images."""
    bad = [b for unit in units for b in unit.bad]
    catalog = read_catalog(work, units, params.tiers)
    by_key = catalog.key_order()  # a key two images share is an error here
    if not classes:  # a stream whose classes are learnt as it is read (a gzipped ImageNet-21k): sorted, numbered now
        classes = tuple(sorted(set(catalog.wnids) | {b["wnid"] for b in bad}))
        catalog.relabel(classes)
    base_seen = base.manifest.images_seen if base is not None else 0
    base_bad = len(base.manifest.bad_files) if base is not None else 0
    total_seen = len(catalog) + len(bad) + base_seen
    total_bad = len(bad) + base_bad
    if total_seen and total_bad / total_seen > params.max_bad_fraction:
        first = (bad or base.manifest.bad_files)[0]  # type: ignore[union-attr]
        raise StagingError(
            f"{total_bad} of {total_seen} images do not decode ({total_bad / total_seen:.2%} > "
            f"max_bad_fraction {params.max_bad_fraction:.2%}); first: {first['source']}: {first['reason']}"
        )
    # Each row's split as a PLANNED_SPLITS index: its unit's, until the val carve and the minival move it.
    split_of = np.empty(len(catalog), np.int8)
    for split, start, end in catalog.unit_spans():
        split_of[start:end] = PLANNED_SPLITS.index(split)
    train, minival, val = range(len(PLANNED_SPLITS))
    per_class = _rows_by_class(catalog, np.arange(len(catalog), dtype=np.intc)[split_of == train])
    old_train = base.manifest.splits["train"].per_class if base is not None else {}
    old_minival = base.manifest.splits["minival"].per_class if base is not None else {}
    if val_per_class:
        split_of[_carve_val(catalog, per_class, val_per_class, params.seed, base)] = val
        per_class = {c: rows[split_of[rows] == train] for c, rows in per_class.items()}
    totals = {
        c: len(per_class.get(c, ())) + old_train.get(c, 0) + old_minival.get(c, 0)
        for c in set(per_class) | set(old_train) | set(old_minival)
    }
    quota = minival_quota(totals, params.minival, params.seed)
    check_minival(
        totals, {c: max(quota[c], old_minival.get(c, 0)) for c in totals}, params.minival, min_train_per_class
    )
    for wnid, rows in per_class.items():
        split_of[_first_ranked(catalog, rows, params.seed, quota[wnid] - old_minival.get(wnid, 0))] = minival
    first_index = base.num_shards if base is not None else {}
    splits: dict[str, np.ndarray] = {}
    shards: list[ShardPlan] = []
    for split_index, split in enumerate(PLANNED_SPLITS):
        # Sorted by key, then shuffled across classes so that a sequential read of a few shards already mixes labels.
        rows = _shuffled(by_key[split_of[by_key] == split_index], mix_seed(params.seed, Stream.SHARD_PLAN, split_index))
        splits[split] = rows
        for tier in params.tiers:
            start = first_index.get((split, tier), 0)
            for i in range(0, len(rows), params.shard_size):
                shards.append(ShardPlan(split, tier, start + i // params.shard_size, rows[i : i + params.shard_size]))
    return DatasetPlan(
        tuple(classes), splits, shards, sorted(bad, key=lambda b: b["source"]), total_seen, catalog, base
    )


def _rows_by_class(catalog: Catalog, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`rows` by wnid (each class's in row order), for the classes that have any."""
    ids = catalog.wnid_ids[rows]
    counts = np.bincount(ids, minlength=len(catalog.wnids)).tolist()
    rows = rows[np.argsort(ids, kind="stable")]
    ends = np.cumsum(counts).tolist()
    return {catalog.wnids[i]: rows[end - n : end] for i, (n, end) in enumerate(zip(counts, ends)) if n}


def _first_ranked(catalog: Catalog, rows: np.ndarray, seed: int, take: int) -> np.ndarray:
    """The `take` rows whose keys rank first by `_stable_rank`: a draw that does not depend on the order the
    units finished in."""
    if take <= 0:
        return rows[:0]
    ranks = [_stable_rank(seed, key) for key in catalog.key_list(rows)]
    return rows[sorted(range(len(rows)), key=ranks.__getitem__)[:take]]


def _shuffled(rows: np.ndarray, seed: int) -> np.ndarray:
    """`rows` shuffled by `random.Random(seed).shuffle`, which swaps positions by the length alone: the same order
    it gives the sorted keys. Shuffled as a C int array, not a list (a Python int object per image)."""
    buffer = array("i", rows.astype(np.intc).tobytes())
    random.Random(seed).shuffle(buffer)
    return np.frombuffer(buffer, np.intc) if len(buffer) else np.empty(0, np.intc)


def _carve_val(
    catalog: Catalog, per_class: dict[str, np.ndarray], val_per_class: int, seed: int, base: BaseVersion | None
) -> np.ndarray:
    """The train rows held out as val: per class, as many as bring it to `carve_quota` over the base's images
    and the new ones together (the base's val images stay val)."""
    old = {s: base.manifest.splits[s].per_class for s in ("train", "minival", "val")} if base is not None else {}
    carve_seed = mix_seed(seed, Stream.VAL_CARVE)
    carved = [np.empty(0, np.int64)]
    for wnid, rows in per_class.items():
        old_val = old.get("val", {}).get(wnid, 0)
        total = len(rows) + sum(counts.get(wnid, 0) for counts in old.values())
        carved.append(_first_ranked(catalog, rows, carve_seed, carve_quota(total, val_per_class) - old_val))
    return np.concatenate(carved)


@dataclass(frozen=True)
class BaseVersion:
    """A finished version that a new one grows from: its images keep their split and shards."""

    name: str
    manifest: Manifest = field(repr=False)
    splits: dict[str, dict[str, str]] = field(repr=False)  # split -> key -> wnid
    bad: dict[str, list[str]] = field(repr=False)  # key of a file that did not decode -> [source split, wnid]

    def known(self, split: str, carved: bool = False) -> dict[str, str]:
        """key -> wnid of every image the base holds (staged or reported bad) from a source split; `carved`: its
        val was held out of the source's train images, so they are train's too."""
        out: dict[str, str] = {}
        for s in ("train", "minival", *(("val",) if carved else ())) if split == "train" else ("val",):
            out.update(self.splits[s])
        out.update((key, wnid) for key, (s, wnid) in self.bad.items() if s == split)
        return out

    def known_by_class(self, split: str, carved: bool = False) -> dict[str, set[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        for key, wnid in self.known(split, carved).items():
            out[wnid].add(key)
        return out

    @property
    def num_shards(self) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for s in self.manifest.shards:
            counts[(s["split"], s["tier"])] += 1
        return counts
