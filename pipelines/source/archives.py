"""The ``archives`` layout: a folder holding the three files as distributed (ILSVRC2012_img_train.tar, a tar of
one tar per class; ILSVRC2012_img_val.tar, flat; ILSVRC2012_devkit_t12.tar.gz), read in place: nothing is
extracted.

`open_archives` reads tar headers only: a train unit is the byte span of one class tar inside the outer tar, a
val entry the byte span of one member of the val tar. Damage tarfile would read past quietly (a bad header past
the first, a tar cut between or inside members) is found here, before staging starts.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from pipelines.source.devkit import read_devkit, val_wnids_from_devkit
from pipelines.source.records import (
    ARCHIVE_ERRORS,
    ARCHIVES,
    DEVKIT_ARCHIVE,
    META_MAT,
    TRAIN_ARCHIVE,
    VAL_ARCHIVE,
    ImageNetSource,
    ImageNetSourceError,
    TrainUnit,
    ValEntry,
    check_same_classes,
    image_members,
)


def open_archives(root: Path) -> ImageNetSource:
    """Index the three archives under `root` (headers only) and check they agree with each other."""
    paths = {name: root / name for name in ARCHIVES}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise ImageNetSourceError(
            f"{root}: archive(s) missing: {', '.join(missing)} (need all of {', '.join(ARCHIVES)})"
        )
    devkit = read_devkit(paths[DEVKIT_ARCHIVE])
    train_tar, val_tar = paths[TRAIN_ARCHIVE], paths[VAL_ARCHIVE]

    spans = index_class_tars(train_tar)
    classes = devkit.wnids
    check_same_classes(classes, spans.keys(), f"{devkit.path} ({META_MAT})", str(train_tar))
    labels = {wnid: i for i, wnid in enumerate(classes)}
    units = [
        TrainUnit(wnid, labels[wnid], str(train_tar), offset, size) for wnid, (offset, size) in sorted(spans.items())
    ]

    members = _index_tar(val_tar, image_members)
    flat = [(PurePosixPath(m.name).name, m) for m in members]
    wnid_of = val_wnids_from_devkit(devkit, [name for name, _ in flat], str(val_tar))
    val = [ValEntry(m.name, wnid_of[name], labels[wnid_of[name]], m.offset_data, m.size) for name, m in flat]
    val.sort(key=lambda e: e.source_name)
    return ImageNetSource(
        kind="archives",
        root=root,
        classes=classes,
        class_words=devkit.words,
        train_units=units,
        val_dir=val_tar,
        val_entries=val,
        archives=tuple(paths.values()),
    )


def _index_tar(
    path: Path, select: Callable[[list[tarfile.TarInfo]], Iterable[tarfile.TarInfo]]
) -> list[tarfile.TarInfo]:
    """The selected members of an uncompressed tar, reading headers only, checked for truncation."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = list(select(tar.getmembers()))
            end_of_members = tar.offset
            assert tar.fileobj is not None
            tar.fileobj.seek(end_of_members)
            after = tar.fileobj.read(tarfile.BLOCKSIZE)
    except ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{path}: not a readable tar archive: {exc}") from None
    if after.count(0) != len(after):  # tarfile stops quietly at a damaged header past the first
        raise ImageNetSourceError(
            f"{path}: corrupt: bad member header at byte {end_of_members} (the members from there on cannot be read)"
        )
    # tarfile reads a tar cut between members as a shorter, valid one, and may read one cut inside a member
    # as if the member were whole; the end-of-archive blocks and the member ends show both.
    file_size = path.stat().st_size
    for m in members:
        if m.offset_data + m.size > file_size:
            raise ImageNetSourceError(f"{path}: truncated: member {m.name} ends past the end of the file")
    if file_size - end_of_members < tarfile.BLOCKSIZE:
        raise ImageNetSourceError(f"{path}: truncated: no end-of-archive marker after the last member")
    if not members:
        raise ImageNetSourceError(f"{path}: holds no images")
    return members


def index_class_tars(path: Path) -> dict[str, tuple[int, int]]:
    """WNID -> (offset, size) of each per-class tar inside a tar of class tars (ILSVRC2012 train, ImageNet-21k)."""

    def class_tars(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
        for m in members:
            if not m.isfile():
                continue
            name = PurePosixPath(m.name).name
            if not name.endswith(".tar"):
                raise ImageNetSourceError(f"{path}: member {m.name} is not a per-class tar (expected <wnid>.tar)")
            yield m

    spans: dict[str, tuple[int, int]] = {}
    members = _index_tar(path, class_tars)
    for m in members:
        wnid = PurePosixPath(m.name).name[: -len(".tar")]
        if wnid in spans:
            raise ImageNetSourceError(f"{path}: class tar {m.name} appears twice")
        spans[wnid] = (m.offset_data, m.size)
    _check_class_tar_headers(path, members)
    return spans


def _check_class_tar_headers(path: Path, members: Iterable[tarfile.TarInfo]) -> None:
    """The first header of every class tar, read now (one 512-byte block each, 1000 on ImageNet: a blink), so
    that a damaged class tar fails before staging starts rather than when its unit's turn comes, hours in.
    Damage further inside a class tar is found when its unit reads it (`records.read_train_unit`)."""
    with open(path, "rb") as f:
        for m in members:
            where = f"{PurePosixPath(m.name).name} in {path}"
            f.seek(m.offset_data)
            try:
                tarfile.TarInfo.frombuf(f.read(min(m.size, tarfile.BLOCKSIZE)), tarfile.ENCODING, "surrogateescape")
            except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # real, undocumented: typeshed omits it
                raise ImageNetSourceError(f"{where}: holds no images (an empty class tar)") from None
            except tarfile.HeaderError as exc:
                raise ImageNetSourceError(f"{where}: corrupt or truncated class tar: {exc}") from None
