"""`stage`: a source of any kind (`pipelines.source.kinds`) -> checked RGB images -> minival hold-out -> WebDataset
shards per resolution tier, as one dataset version under a datasets root. Idempotent and resumable.

The work is split in two kinds of idempotent steps so that a killed run resumes where it stopped:

1. units (`spools.process_unit`: a train class, a chunk of val, a batch file...): decode every image once,
   convert it to RGB, encode it once per tier that needs new pixels, and spool those into
   `work/<inputs>/units/<unit>.tar` plus a JSON index. A unit whose index exists and whose spool verifies is
   not redone. Units run `workers` at a time on threads or processes (`runners.unit_runner`).
2. shards (`shards.write_shard`, one per split x tier x shard): copy the planned samples from the spools and
   the source into a deterministic tar. A shard whose sidecar checksum matches the file is not redone.

Between them `plan.plan_dataset` picks the minival (seeded, stratified), shuffles every split across classes and
cuts it into shards; after them the extra formats are written (`extra_writer`), then the keys file and, last,
the manifest (`versions`), once every file it lists is on disk. No shard, spool, keys file or manifest carries a
timestamp or a path that depends on the run, so an interrupted-then-resumed stage writes the same bytes as an
uninterrupted one (FFCV files hold the same samples, not always the same bytes: see `ffcv_files`).

A source that grew since an earlier version is staged on top of it (`versions.resolve_base`): the new version
hard-links the base's shards, keeps every image's split (so the minival stays) and decodes only the images the
base does not hold.

A work folder is named by what its spools depend on (`work_dir`); a run holds its lock (`_exclusive`) and notes
in it (`work.json`) the source path, those inputs and the versions it backs, so that a run can remove what a
failed run left and no run will reuse (`remove_orphans`). The staging flow only sequences:
it passes mappers that run the units and shards as Prefect tasks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

from pipelines.atomic import (
    atomic_write_json,
    fsync_files,
    remove_stale_temporaries,
)
from pipelines.dataset import DALI, EXTRA_FORMATS, FFCV, MANIFEST, mark_latest
from pipelines.hashing import content_hash
from pipelines.source.kinds import open_source
from pipelines.source.records import Source, SourceKind
from pipelines.staging.params import (
    AUTO,
    ENCODING,
    FINGERPRINTS,
    MIN_TRAIN_PER_CLASS,
    UNITS,
    WORK,
    WORK_META,
    StageParams,
    StagingError,
    whole_number,
)
from pipelines.staging.plan import (
    carve_quota,
    check_minival,
    minival_quota,
    plan_dataset,
    unit_args,
)
from pipelines.staging.runners import (
    Counted,
    Mapper,
    NotStarted,
    Progress,
    Tracker,
    largest_first,
    resolve_workers,
    thread_map,
    unit_runner,
)
from pipelines.staging.shards import link_base_shards, shard_bytes, write_shard, write_shard_indexes
from pipelines.staging.spools import unit_params
from pipelines.staging.versions import (
    build_manifest,
    check_base_seen,
    code_version,
    dataset_version,
    find_staged,
    resolve_base,
    write_keys,
    write_manifest,
)


def work_dir(root: Path, fingerprint: dict[str, Any], params: StageParams, base_version: str | None = None) -> Path:
    """Spools shared by every version staged from the same source with the same encoding parameters.

    A rerun with another shard size, minival or bad-file limit is a new version but decodes nothing again. An
    incremental version's spools (its new images only) are kept apart, by base.
    """
    return root / WORK / content_hash(_work_inputs(fingerprint, params, base_version), 12)


def _work_inputs(fingerprint: dict[str, Any], params: StageParams, base_version: str | None) -> dict[str, Any]:
    """What a work folder's spools depend on (its name hashes it)."""
    inputs: dict[str, Any] = {"source": fingerprint, "unit": unit_params(params)}
    if base_version is not None:
        inputs["base_version"] = base_version
    return inputs


def source_fingerprint(src: Source, root: Path) -> dict[str, Any]:
    """`src.fingerprint()`, cached for sources read from archives (where it hashes every byte: minutes on
    ILSVRC2012's ~145 GB, an hour on ImageNet-21k's 1.2 TB).

    The cache is keyed by each archive's path, size, modification time and inode, the test `make` and `rsync`
    use, so rerunning a finished stage is quick. It is written only by a stage that finished.
    """
    if not src.archives:
        return src.fingerprint()
    path = _fingerprint_cache(src, root)
    try:
        return json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return src.fingerprint()


def _fingerprint_cache(src: Source, root: Path) -> Path:
    stats: list[list[Any]] = []
    for path in (*src.archives, *src.label_files):
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_mtime_ns, st.st_ino])
    if src.val_per_class:
        stats.append(["val_per_class", src.val_per_class])
    key = content_hash(stats, 16)
    return root / WORK / FINGERPRINTS / f"{key}.json"


def find_finished(
    source_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    params: StageParams,
    base_version: str | None = AUTO,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS,
    *,
    source_kind: SourceKind | None = None,
    val_per_class: int | None = None,
) -> Path | None:
    """The finished version that staging this source with these parameters would return at once, or None.

    Checks what `stage` checks before its first unit (the source, the output folder and, when there is no
    finished version, the minival against a listed source), so bad input fails here, in one line.
    """
    src = open_source(source_path, source_kind, val_per_class=val_per_class)
    root = Path(out).resolve()
    check_out(root, src)
    done = find_staged(root, source_fingerprint(src, root), params, base_version, src.dataset)
    if done is None:
        _precheck_minival(src, params, min_train_per_class)
    return done


def check_out(root: Path, src: Source) -> None:
    """StagingError, in one line, for an output folder that cannot hold versions: a file, under a file, not
    writable, or inside a folder the source lists (its train/ or val/: the next run would read the versions as
    classes or images). Before any work, so that a run does not fail at its first write.

    Writability is what access(2) says: it sees permission bits (but as root), read-only mounts and ACLs; what
    only a write can tell (a file system that refuses folders, such as sysfs) fails at `stage`'s first mkdir.
    """
    if root.exists() and not root.is_dir():
        raise StagingError(f"{root}: the output folder is a file")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise StagingError(f"{root}: the output folder cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StagingError(f"{root}: the output folder is not writable ({existing} is not)")
    for folder in src.folders:
        folder = folder.resolve()
        if root == folder or folder in root.parents:
            raise StagingError(
                f"{root}: the output folder is inside the source's {folder}, where the next run "
                f"would read it as part of the source; choose a folder outside it"
            )


def _listed_train_counts(src: Source) -> dict[str, int] | None:
    """Train files per class where the source lists them without reading (trees), less the val a source without
    one holds out, else None (archives: read to count)."""
    if not src.listed:
        return None
    counts = {u.wnid: len(u.names) for u in src.train_units()}  # type: ignore[attr-defined]  # listed: TrainUnits
    return {c: n - carve_quota(n, src.val_per_class) for c, n in counts.items()}


def _precheck_minival(src: Source, params: StageParams, min_train_per_class: int) -> None:
    """`check_minival` on the listed file counts, before any unit is decoded: bad files only lower the counts,
    and fewer images never leave a class more train images, so what fails here fails after decoding too."""
    counts = _listed_train_counts(src)
    if counts is not None:
        check_minival(counts, minival_quota(counts, params.minival, params.seed), params.minival, min_train_per_class)


def stage(
    source_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    params: StageParams,
    map_units: Mapper | None = None,
    map_shards: Mapper | None = None,
    log: Callable[..., None] = print,
    *,
    progress: Progress | None = None,
    workers: int = 1,
    base_version: str | None = AUTO,
    processes: bool = False,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS,
    source_kind: SourceKind | None = None,
    val_per_class: int | None = None,
) -> Path:
    """Stage a source into `out/<version>`; returns that directory. Idempotent and resumable.

    `source_kind` forces the kind of source (`pipelines.source.kinds`) instead of detecting it;
    `val_per_class` is how many images of each class to hold out as val where the source has no val split
    (ImageNet-21k, a class-folder tree without val/ or test/; None: the kind's default).

    `map_units` / `map_shards` run a function over argument tuples and return results in order (on threads
    of this process; default: `workers` threads); the Prefect flow passes mappers that submit tasks to its task
    runner. At most `workers` units decode at once, on those threads or, with `processes`, in that many worker
    processes (see `unit_runner`). `progress(phase, done, total)`
    is called as units and shards finish (the same events that are logged with an ETA).

    `base_version`: AUTO grows the latest finished version under `out` that holds a subset of this source's
    images (same classes and parameters); a version name grows that one (an error if it cannot); None stages
    everything afresh.

    One run at a time per source and encoding: a second one fails at once with a StagingError (the lock is the
    work folder's flock, released when the first run ends or dies).

    Bad input fails before any unit runs where it can be seen without decoding: the source (`open_source`), the
    output folder (`check_out`), the parameters, and a minival that leaves a class fewer than
    `min_train_per_class` train images (for archives, whose class tars must be read to count them, after the
    units; `plan_dataset`).
    """
    workers = resolve_workers(workers)
    min_train_per_class = whole_number("min_train_per_class", min_train_per_class, 0)
    src = open_source(source_path, source_kind, val_per_class=val_per_class)
    root = Path(out).resolve()
    check_out(root, src)
    fingerprint = source_fingerprint(src, root)
    done = find_staged(root, fingerprint, params, base_version, src.dataset)
    if done is not None:
        log(f"dataset {done.name} is already staged at {done}: reusing it")
        _finish(root, done.name, src, fingerprint)
        return done
    _precheck_minival(src, params, min_train_per_class)
    base = resolve_base(root, base_version, src, params, log)
    version = dataset_version(fingerprint, params, base.name if base else None, src.dataset)
    dest = root / version
    work = work_dir(root, fingerprint, params, base.name if base else None)
    created = [p for p in (root, root / WORK, work, dest) if not p.exists()]
    try:
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StagingError(f"{root}: cannot create the output folder: {exc.strerror or exc}") from None
        with _exclusive(work):
            _record_work(work, src.root, _work_inputs(fingerprint, params, base.name if base else None), version)
            # Only this run's folders (it holds their lock); elsewhere under the root only what is clearly stale
            # (LATEST and fingerprint caches are rewritten in a blink by whichever run finishes).
            removed = (
                remove_stale_temporaries(work)
                + remove_stale_temporaries(dest)
                + remove_stale_temporaries(root, recursive=False, older_than_s=3600)
                + remove_stale_temporaries(root / WORK / FINGERPRINTS, older_than_s=3600)
            )
            if removed:
                log(f"removed {removed} partial files left by an interrupted run")
            orphans = remove_orphans(root, work, src.root, version)
            if orphans:
                log(f"removed what failed runs left and no run will reuse: {', '.join(orphans)}")
            units = unit_args(src, work, params, base)
            log(
                f"staging {source_path} ({src.dataset}, {src.kind} source, {len(src.classes)} classes) as {version}"
                f"{f' on top of {base.name}' if base else ''}: {len(units)} units, tiers {list(params.tiers)}, "
                f"{workers} worker(s)"
            )
            with unit_runner(workers, processes) as run_unit:
                tracker = Tracker("units", len(units), log, progress)
                try:
                    results = largest_first(
                        map_units or thread_map(workers),
                        Counted(run_unit, tracker),
                        units,
                        lambda a: a[0].estimated_images(),
                    )
                except NotStarted:
                    assert run_unit.failure is not None  # raised only once a unit has failed
                    raise run_unit.failure from None  # the unit that failed, not one stopped behind it
            if base is not None and not src.listed:
                check_base_seen(results, base)
            plan = plan_dataset(results, work, src.classes, params, base, min_train_per_class, src.val_per_class)
            log(
                f"plan: { ({k: len(v) for k, v in plan.splits.items()}) } new images, {len(plan.bad)} bad files, "
                f"{len(plan.shards)} shards to write"
            )
            inherited = link_base_shards(root / base.name, dest, base.manifest.shards) if base else []
            tracker = Tracker("shards", len(plan.shards), log, progress)
            entries = largest_first(
                map_shards or thread_map(workers),
                Counted(write_shard, tracker),
                [(plan, shard, work, dest) for shard in plan.shards],
                lambda a: shard_bytes(plan, a[1]),
            )
            indexes = write_shard_indexes(dest, [*inherited, *entries])
            extras = {fmt: extra_writer(fmt)(plan, entries, work, dest, params) for fmt in params.formats}
            # The commit point: every file the manifest will list is on disk before the manifest is (shards and
            # FFCV files were only handed to the writeback; linked or copied base shards too).
            fsync_files(
                dest / e["path"] for e in [*inherited, *entries, *indexes, *chain.from_iterable(extras.values())]
            )
            keys = write_keys(dest, plan)
            write_manifest(
                dest,
                build_manifest(
                    plan,
                    inherited + entries,
                    params,
                    fingerprint,
                    {"kind": src.kind, **src.manifest_record()},
                    version,
                    code_version(),
                    keys=keys,
                    indexes=indexes,
                    extra=extras,
                ),
            )
            _finish(root, version, src, fingerprint)
            return dest
    except BaseException:
        # Finished spools and shards stay for a rerun to reuse; folders this run made and left empty go (a work
        # folder holding nothing but its note counts as empty).
        if work in created and not (work / UNITS).exists():
            (work / WORK_META).unlink(missing_ok=True)
        for p in reversed(created):
            _remove_empty_tree(p)
        raise


@contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on a work folder (flock on the directory itself: released when the process dies,
    even by SIGKILL). Two runs staging the same source would otherwise write the same spools and shards and
    delete each other's temporary files."""
    with _locked(work) as held:
        if not held:
            raise StagingError(
                f"{work}: another staging run of this source is in progress; let it finish (or stop it) and run again"
            )
        yield


@contextmanager
def _locked(work: Path) -> Iterator[bool]:
    """Try to lock a work folder (see `_exclusive`); yields whether this process holds it."""
    import fcntl

    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _work_meta(work: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((work / WORK_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _record_work(work: Path, source: Path, inputs: dict[str, Any], version: str) -> None:
    """Note in a work folder the source path and inputs of its spools and every version it was used for, the
    facts `remove_orphans` decides by. Sorted and free of times, like every file staging writes."""
    old = _work_meta(work) or {}
    meta = {"source": str(source), "inputs": inputs, "versions": sorted({*old.get("versions", []), version})}
    if meta != old:
        atomic_write_json(work / WORK_META, meta)


def _spool_encoding(work: Path) -> int | None:
    """The ENCODING of a work folder's spools, from a unit index (folders of code older than WORK_META)."""
    for index in sorted((work / UNITS).glob("*.json"))[:1]:
        try:
            return json.loads(index.read_text())["params"]["encoding"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def remove_orphans(root: Path, work: Path, source: Path, version: str) -> list[str]:
    """Remove what failed runs left under a datasets root that no run will reuse; returns the names removed.

    A work folder is named by its inputs (source fingerprint, tiers, JPEG quality, ENCODING, base version), so
    a failed run's spools are reused only by a run with those very inputs. Removed, where no run holds them:

    - this run's work folder's unfinished versions but its own (a failed run with another shard size, minival
      or bad-file limit, or by code of another SHARD_LAYOUT; their shards are cheap to write again from the
      spools);
    - work folders of this source path that back no finished version: a failed run of this source with other
      inputs (the source changed since, or other tiers or quality were asked for), which only those inputs
      again would reuse; with their unfinished versions;
    - work folders of another ENCODING, whoever's: no run of this code reads their spools.

    Work folders of other sources that failed are kept until a run of that source (their own rerun reuses them).
    """
    removed: list[str] = []

    def remove_unfinished(names: Iterable[str], but: str | None = None) -> None:
        for name in names:
            path = root / name
            if name != but and path.is_dir() and not (path / MANIFEST).exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)

    remove_unfinished((_work_meta(work) or {}).get("versions", []), but=version)
    others = sorted(p for p in (root / WORK).iterdir() if p.is_dir() and p not in (work, root / WORK / FINGERPRINTS))
    for other in others:
        meta = _work_meta(other)
        encoding = meta.get("inputs", {}).get("unit", {}).get("encoding") if meta else _spool_encoding(other)
        stale = encoding is not None and encoding != ENCODING
        failed = (
            meta is not None
            and meta.get("source") == str(source)
            and not any((root / v / MANIFEST).is_file() for v in meta.get("versions", []))
        )
        if not (stale or failed):
            continue
        try:
            with _locked(other) as held:
                if not held:
                    continue  # a run is using it
                remove_unfinished(meta.get("versions", []) if meta else ())
                shutil.rmtree(other, ignore_errors=True)
        except FileNotFoundError:
            continue  # another run removed it first
        removed.append(f"{WORK}/{other.name}")
    return removed


def _finish(root: Path, version: str, src: Source, fingerprint: dict[str, Any]) -> None:
    """Point LATEST at a finished version; remember an archive source's fingerprint for the next run."""
    mark_latest(root, version)
    if src.archives:
        atomic_write_json(_fingerprint_cache(src, root), {"fingerprint": fingerprint})


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def extra_writer(fmt: str) -> Callable[..., list[dict[str, Any]]]:
    """The writer of an extra format, run after the shards and before the manifest, called as
    `fn(plan, shard_entries, work, dest, params) -> list[dict]` (manifest entries, each with at least path, bytes,
    sha256); it reuses its verified outputs and writes atomically. Imported only when asked for: FFCV pulls in
    numba and OpenCV."""
    if fmt == FFCV:
        from pipelines.staging.ffcv_files import write_ffcv_files

        return write_ffcv_files
    if fmt == DALI:
        from pipelines.staging.dali_index import write_dali_indexes

        return write_dali_indexes
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(EXTRA_FORMATS)}")
