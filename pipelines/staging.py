"""Staging: an ImageNet source -> checked RGB images -> minival hold-out -> WebDataset shards per resolution tier.

The work is split in two kinds of idempotent units so that a killed run resumes where it stopped:

1. `process_unit` (one per class of train, one per chunk of val): decode every image once, convert it to RGB,
   encode it once per tier, and spool the results into `work/units/<unit>.tar` plus a JSON index. A unit whose
   index exists and whose spool verifies is not redone.
2. `write_shard` (one per split x tier x shard): copy the planned samples from the spools into a deterministic
   tar. A shard whose sidecar checksum matches the file is not redone.

Between them `plan_dataset` picks the minival (seeded, stratified), shuffles every split across classes and cuts
it into shards; at the end `write_manifest` records everything. No file carries a timestamp or a path that
depends on the run, so an interrupted-then-resumed stage produces the same bytes as an uninterrupted one.
The flow in `flows/stage_imagenet.py` only sequences these functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from pipelines import imagenet
from pipelines.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_file

SPLITS = ("train", "minival", "val")
MANIFEST = "manifest.json"
LATEST = "LATEST"  # under a datasets root: the name of the most recently staged version
MANIFEST_FORMAT = 1


class StagingError(RuntimeError):
    """Staging cannot finish: too many bad files, inconsistent units, ..."""


@dataclass(frozen=True)
class StageParams:
    """Everything that determines the staged bytes; hashed into the dataset version."""

    tiers: tuple[int, ...] = (128, 192, 256, 320, 384, 480)
    shard_size: int = 1024
    # An int is a number of images (25,000 = 25 per class on ImageNet); a float < 1 a fraction of each class.
    minival: int | float = 25_000
    seed: int = 0
    jpeg_quality: int = 90
    max_bad_fraction: float = 0.01
    val_chunk: int = 1000
    # Extra files written beside the WebDataset shards, by writers registered in EXTRA_FORMATS.
    formats: tuple[str, ...] = ()
    ffcv_write_mode: str = "jpg"  # FFCV RGBImageField write_mode: 'jpg' | 'raw' | 'proportion'
    ffcv_compress_probability: float = 0.5  # for 'proportion'
    ffcv_jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not self.tiers or any(int(t) < 16 for t in self.tiers):
            raise ValueError(f"tiers must be a non-empty list of sizes >= 16 px, got {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(sorted({int(t) for t in self.tiers})))
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if isinstance(self.minival, float) and not 0 <= self.minival < 1:
            raise ValueError(f"minival as a fraction must be in [0, 1), got {self.minival}")
        if isinstance(self.minival, int) and self.minival < 0:
            raise ValueError(f"minival must be >= 0 images, got {self.minival}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.val_chunk < 1:
            raise ValueError(f"val_chunk must be >= 1, got {self.val_chunk}")
        object.__setattr__(self, "formats", tuple(self.formats))
        unknown = set(self.formats) - set(EXTRA_FORMATS)
        if unknown:
            raise ValueError(f"unknown formats {sorted(unknown)}; known: {sorted(EXTRA_FORMATS)}")
        if self.ffcv_write_mode not in ("jpg", "raw", "proportion"):
            raise ValueError(f"ffcv_write_mode must be jpg, raw or proportion, got {self.ffcv_write_mode!r}")
        if not 0 <= self.ffcv_compress_probability <= 1:
            raise ValueError(f"ffcv_compress_probability must be in [0, 1], got {self.ffcv_compress_probability}")


# Writers of extra formats, run after the shards and before the manifest, as "module:function" so that
# staging imports FFCV or DALI only when asked for them. A writer is called as
# `fn(plan, shard_entries, work, dest, params) -> list[dict]` and returns manifest entries (each with at least
# path, bytes, sha256); it must be idempotent (reuse its verified outputs) and write atomically.
EXTRA_FORMATS: dict[str, str] = {
    "ffcv": "pipelines.ffcv_backend:write_ffcv_files",
    "dali": "pipelines.dali_backend:write_dali_indexes",
}


def extra_writer(fmt: str) -> Callable[..., list[dict[str, Any]]]:
    import importlib

    module, _, fn = EXTRA_FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module), fn)


# --------------------------------------------------------------------------------------------- images


class BadImage(ValueError):
    """An image that does not decode; the message is the reason recorded in the manifest."""


def decode_rgb(data: bytes, largest_tier: int) -> tuple[Image.Image, bool]:
    """Decode once, fully (a truncated file must fail here, not in a training job), and convert to RGB.

    Returns the image and whether the original bytes are already a baseline RGB JPEG that can be stored as is.
    JPEG decoding uses libjpeg's DCT scaling (`draft`) when the largest tier is much smaller than the file,
    which is most of the cost saved when staging small tiers.
    """
    if not data:
        raise BadImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt == "JPEG" and img.mode in ("RGB", "L"):
            img.draft(img.mode, (largest_tier, largest_tier))
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"does not decode: {type(exc).__name__}: {exc}") from None
    if img.width < 1 or img.height < 1:
        raise BadImage("zero-sized image")
    passthrough = fmt == "JPEG" and img.mode == "RGB"
    if img.mode != "RGB":
        # CMYK, grayscale, palette, RGBA, 16-bit... all become 3-channel RGB (FFCV and the loaders need it).
        img = img.convert("RGB")
    return img, passthrough


def tier_size(width: int, height: int, tier: int) -> tuple[int, int]:
    """Shorter side scaled down to `tier` (never up), aspect kept."""
    short = min(width, height)
    if short <= tier:
        return width, height
    scale = tier / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_tiers(
    data: bytes, tiers: Sequence[int], quality: int, original_size: tuple[int, int] | None = None
) -> dict[int, tuple[bytes, int, int]]:
    """JPEG bytes (and size) of the image at each tier. Raises BadImage."""
    img, passthrough = decode_rgb(data, max(tiers))
    # draft() may have decoded at a reduced scale; sizes are computed from the full-size header dimensions.
    full_w, full_h = original_size or _header_size(data) or img.size
    out: dict[int, tuple[bytes, int, int]] = {}
    for tier in sorted(tiers, reverse=True):
        w, h = tier_size(full_w, full_h, tier)
        if (w, h) == (full_w, full_h) and passthrough and img.size == (full_w, full_h):
            out[tier] = (data, w, h)  # already small enough: keep the original bytes, no second lossy pass
            continue
        resized = img if img.size == (w, h) else img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        buf = io.BytesIO()
        resized.save(buf, format="JPEG", quality=quality)
        out[tier] = (buf.getvalue(), w, h)
    return out


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class UnitResult:
    unit_id: str
    split: str  # "train" or "val"
    records: tuple[dict[str, Any], ...]  # key, wnid, label, source, offsets per tier
    bad: tuple[dict[str, str], ...]


def unit_paths(work: Path, unit_id: str) -> tuple[Path, Path]:
    return work / "units" / f"{unit_id}.tar", work / "units" / f"{unit_id}.json"


def _deterministic_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def process_unit(
    source: imagenet.ImageNetSource, unit: Any, split: str, work: Path, params: StageParams
) -> UnitResult:
    """Decode, check and encode one unit's images into its spool; reuse a finished spool."""
    unit_id = unit_identifier(unit, split)
    spool, index = unit_paths(work, unit_id)
    cached = load_unit(work, unit_id, params)
    if cached is not None:
        return cached
    spool.parent.mkdir(parents=True, exist_ok=True)
    images = source.iter_train_unit(unit) if split == "train" else source.iter_val_unit(unit)
    records: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    tmp = spool.with_name(f".{spool.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for raw in images:
            try:
                encoded = encode_tiers(raw.data, params.tiers, params.jpeg_quality)
            except BadImage as exc:
                bad.append({"source": raw.source_name, "split": split, "reason": str(exc)})
                continue
            offsets: dict[str, list[int]] = {}
            for tier, (jpeg, w, h) in sorted(encoded.items()):
                info = _deterministic_tarinfo(f"{raw.key}.{tier}.jpg", len(jpeg))
                tar.addfile(info, io.BytesIO(jpeg))
                # After addfile the tar's offset is past this member's data, padded to a 512-byte block.
                data_offset = tar.offset - -(-len(jpeg) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                offsets[str(tier)] = [data_offset, len(jpeg), w, h]
            records.append(
                {"key": raw.key, "wnid": raw.wnid, "label": raw.label, "source": raw.source_name, "tiers": offsets}
            )
    os.replace(tmp, spool)
    result = UnitResult(unit_id, split, tuple(records), tuple(bad))
    atomic_write_json(
        index,
        {"unit": unit_id, "split": split, "params": _unit_params(params), "spool_sha256": sha256_file(spool),
         "records": records, "bad": bad},
    )
    return result


def _unit_params(params: StageParams) -> dict[str, Any]:
    # Only what changes a spool's bytes: a new shard size or minival reuses every spool.
    return {"tiers": list(params.tiers), "jpeg_quality": params.jpeg_quality}


def load_unit(work: Path, unit_id: str, params: StageParams) -> UnitResult | None:
    """A finished unit if its index and spool agree with `params`, else None (the unit will be redone)."""
    spool, index = unit_paths(work, unit_id)
    if not (spool.exists() and index.exists()):
        return None
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("params") != _unit_params(params) or meta.get("spool_sha256") != sha256_file(spool):
        return None
    return UnitResult(unit_id, meta["split"], tuple(meta["records"]), tuple(meta["bad"]))


def unit_identifier(unit: imagenet.TrainUnit | imagenet.ValUnit, split: str) -> str:
    """A file-safe, stable name for a unit: the class WNID for train, the chunk index for val."""
    if isinstance(unit, imagenet.TrainUnit):
        return f"{split}-{unit.wnid}"
    return f"{split}-{unit.index:05d}"


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardPlan:
    split: str
    tier: int
    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def relpath(self) -> str:
        return f"{self.tier}/{self.name}"


@dataclass
class DatasetPlan:
    classes: tuple[str, ...]
    splits: dict[str, list[str]]  # split -> shuffled keys
    shards: list[ShardPlan]
    bad: list[dict[str, str]]
    total_seen: int
    records: dict[str, dict[str, Any]] = field(repr=False)  # key -> record (with its unit id)


def _stable_rank(seed: int, key: str) -> str:
    """A per-image sort key that does not depend on processing order, so the minival is stable."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


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


def plan_dataset(
    units: Iterable[UnitResult], classes: Sequence[str], params: StageParams
) -> DatasetPlan:
    records: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, str]] = []
    by_split: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        bad.extend(unit.bad)
        for rec in unit.records:
            if rec["key"] in records:
                raise StagingError(f"image key {rec['key']} appears twice in the source")
            records[rec["key"]] = {**rec, "unit": unit.unit_id}
            by_split[unit.split].append(rec["key"])
    total_seen = len(records) + len(bad)
    if total_seen and len(bad) / total_seen > params.max_bad_fraction:
        raise StagingError(
            f"{len(bad)} of {total_seen} images do not decode ({len(bad) / total_seen:.2%} > "
            f"max_bad_fraction {params.max_bad_fraction:.2%}); first: {bad[0]['source']}: {bad[0]['reason']}"
        )
    per_class: dict[str, list[str]] = defaultdict(list)
    for key in by_split["train"]:
        per_class[records[key]["wnid"]].append(key)
    quota = minival_quota({c: len(k) for c, k in per_class.items()}, params.minival, params.seed)
    held: set[str] = set()
    for wnid, keys in per_class.items():
        held.update(sorted(keys, key=lambda k: _stable_rank(params.seed, k))[: quota[wnid]])
    splits = {
        "train": sorted(k for k in by_split["train"] if k not in held),
        "minival": sorted(held),
        "val": sorted(by_split["val"]),
    }
    shards: list[ShardPlan] = []
    for split_index, (split, keys) in enumerate(splits.items()):
        # Shuffled across classes so that a sequential read of a few shards already mixes labels.
        random.Random(params.seed * 1000 + split_index).shuffle(keys)
        for tier in params.tiers:
            for i in range(0, len(keys), params.shard_size):
                shards.append(ShardPlan(split, tier, i // params.shard_size, tuple(keys[i : i + params.shard_size])))
    return DatasetPlan(tuple(classes), splits, shards, sorted(bad, key=lambda b: b["source"]), total_seen, records)


# --------------------------------------------------------------------------------------------- shards


def write_shard(plan: DatasetPlan, shard: ShardPlan, work: Path, out: Path) -> dict[str, Any]:
    """Write one shard (reusing it if its checksum sidecar verifies); return its manifest entry."""
    path = out / shard.relpath()
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists() and sidecar.exists():
        digest = sha256_file(path)
        if sidecar.read_text().strip() == digest:
            return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
                    "bytes": path.stat().st_size, "sha256": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spools: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in shard.keys:
                rec = plan.records[key]
                spool = spools.get(rec["unit"])
                if spool is None:
                    spool = spools[rec["unit"]] = open(unit_paths(work, rec["unit"])[0], "rb")
                offset, size, _, _ = rec["tiers"][str(shard.tier)]
                spool.seek(offset)
                jpeg = spool.read(size)
                meta = json.dumps({"wnid": rec["wnid"], "source": rec["source"]}, sort_keys=True).encode()
                for suffix, payload in (("jpg", jpeg), ("cls", str(rec["label"]).encode()), ("json", meta)):
                    tar.addfile(_deterministic_tarinfo(f"{key}.{suffix}", len(payload)), io.BytesIO(payload))
    finally:
        for f in spools.values():
            f.close()
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_bytes(sidecar, (digest + "\n").encode())
    return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
            "bytes": len(data), "sha256": digest}


# --------------------------------------------------------------------------------------------- manifest


def dataset_version(fingerprint: dict[str, Any], params: StageParams) -> str:
    """A content address: the same source staged with the same parameters is the same version."""
    blob = json.dumps({"source": fingerprint, "params": asdict(params)}, sort_keys=True, default=str)
    return "imagenet-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_manifest(
    plan: DatasetPlan, shards: list[dict[str, Any]], params: StageParams, fingerprint: dict[str, Any],
    source_kind: str, version: str, code_version: str,
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for split, keys in plan.splits.items():
        per_class: dict[str, int] = defaultdict(int)
        for key in keys:
            per_class[plan.records[key]["wnid"]] += 1
        counts[split] = dict(sorted(per_class.items()))
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "classes": list(plan.classes),
        "num_classes": len(plan.classes),
        "splits": {s: {"samples": len(k), "per_class": counts[s]} for s, k in plan.splits.items()},
        "minival_keys": sorted(plan.splits["minival"]),
        "tiers": list(params.tiers),
        "shards": sorted(shards, key=lambda s: (s["tier"], s["split"], s["path"])),
        "bad_files": plan.bad,
        "images_seen": plan.total_seen,
        "source": {"kind": source_kind, "fingerprint": fingerprint},
        "params": asdict(params),
        "code_version": code_version,
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST
    atomic_write_json(path, manifest)
    return path


# --------------------------------------------------------------------------------------------- the sequence


def work_dir(root: Path, fingerprint: dict[str, Any], params: StageParams) -> Path:
    """Spools shared by every version staged from the same source with the same encoding parameters.

    A rerun with another shard size, minival or bad-file limit is a new version but decodes nothing again.
    """
    blob = json.dumps({"source": fingerprint, "unit": _unit_params(params)}, sort_keys=True, default=str)
    return root / "work" / hashlib.sha256(blob.encode()).hexdigest()[:12]


Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]


def sequential_map(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*a) for a in args]


def stage(
    source_path: str | os.PathLike[str], out: str | os.PathLike[str], params: StageParams,
    map_units: Mapper = sequential_map, map_shards: Mapper = sequential_map, log: Callable[..., None] = print,
) -> Path:
    """Stage a source into `out/<version>`; returns that directory. Idempotent and resumable.

    `map_units` / `map_shards` run a function over argument tuples and return results in order: sequential
    by default; the Prefect flow passes mappers that submit tasks to its task runner.
    """
    src = imagenet.open_source(source_path)
    fingerprint = src.fingerprint()
    version = dataset_version(fingerprint, params)
    root = Path(out).resolve()
    dest = root / version
    if (dest / MANIFEST).exists():
        log(f"dataset {version} is already staged at {dest}: reusing it")
        atomic_write_bytes(root / LATEST, (version + "\n").encode())
        return dest
    work = work_dir(root, fingerprint, params)
    work.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(root)
    if removed:
        log(f"removed {removed} partial files left by an interrupted run")
    units = [(src, u, "train", work, params) for u in src.train_units()]
    units += [(src, u, "val", work, params) for u in src.val_units(params.val_chunk)]
    log(f"staging {source_path} ({src.kind} source, {len(src.classes)} classes) as {version}: "
        f"{len(units)} units, tiers {list(params.tiers)}")
    results = map_units(process_unit, units)
    plan = plan_dataset(results, src.classes, params)
    log(f"plan: {({k: len(v) for k, v in plan.splits.items()})} images, {len(plan.bad)} bad files, "
        f"{len(plan.shards)} shards")
    entries = map_shards(write_shard, [(plan, shard, work, dest) for shard in plan.shards])
    extras = {fmt: extra_writer(fmt)(plan, entries, work, dest, params) for fmt in params.formats}
    manifest = build_manifest(plan, entries, params, fingerprint, src.kind, version, code_version())
    write_manifest(dest, {**manifest, "extra": extras})
    atomic_write_bytes(root / LATEST, (version + "\n").encode())
    return dest


def latest_version(out: str | os.PathLike[str]) -> Path:
    """The most recently staged version under a datasets root."""
    marker = Path(out) / LATEST
    if not marker.exists():
        raise FileNotFoundError(f"{out}: no staged dataset (no {LATEST} file); run `effnet stage` first")
    return Path(out) / marker.read_text().strip()


def read_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a staged dataset version, with a clear error when there is none."""
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no staged dataset here (run `effnet stage` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt manifest: {exc}") from None


def manifest_hash(dataset_dir: str | os.PathLike[str]) -> str:
    return sha256_file(Path(dataset_dir) / MANIFEST)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("effnet-family")
    except PackageNotFoundError:
        ver = "0+unknown"
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{ver}+g{ref[:10]}"
    except OSError:
        return ver
