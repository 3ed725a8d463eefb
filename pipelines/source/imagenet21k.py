"""The ``imagenet21k`` kind: ImageNet-21k as released, one tar of per-synset tars (``fall11_whole.tar``,
~1.3 TB, 21,841 synsets; ``winter21_whole.tar.gz``, ~1.1 TB gzipped, 19,167 synsets). There is no val split: staging
holds `val_per_class` images of each synset out of train (50 by default, as the processed ImageNet-21k-P release
does). Classes are the sorted WNIDs, so a 1k WNID names the same class in both (ILSVRC2012's classes are a subset).

Nothing is extracted and no list of every image is ever built:

- an uncompressed tar is indexed by its synset tars' headers (one per synset, as ILSVRC2012's train tar is) and
  read a synset at a time, in parallel (`records.TrainUnit`);
- a gzipped tar cannot be seeked, and listing its synsets would mean inflating all of it first. It is read in
  `STREAM_SHARES` units instead, each inflating the whole stream once and reading only every STREAM_SHARES-th
  synset tar, member by member (`StreamShare`): the shares run in parallel, memory stays one image deep, and the
  classes are learnt from what the shares saw (`Source.classes` is empty until then; staging sorts them).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipelines.source.archives import index_class_tars
from pipelines.source.records import (
    ARCHIVE_ERRORS,
    DEFAULT_VAL_PER_CLASS,
    RawImage,
    Source,
    SourceError,
    TrainUnit,
    is_image_name,
    safe_key,
)

WHOLE_TARS = ("fall11_whole.tar", "winter21_whole.tar")
WHOLE_GZ = ("winter21_whole.tar.gz", "fall11_whole.tar.gz")
STREAM_SHARES = 16  # units a gzipped release is read in (each inflates the whole stream once)

_WHOLE = re.compile(r".+_whole\.tar(\.gz)?")


def matches(root: Path) -> bool:
    return _whole_file(root) is not None


def _whole_file(root: Path) -> Path | None:
    """The release's whole-set tar in `root`: a known name first, else one file named `*_whole.tar[.gz]`."""
    for name in (*WHOLE_TARS, *WHOLE_GZ):
        if (root / name).is_file():
            return root / name
    found = sorted(p for p in root.iterdir() if p.is_file() and _WHOLE.fullmatch(p.name))
    return found[0] if len(found) == 1 else None


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index the whole-set tar (synset tar headers only; a gzipped one not at all: see the module's docstring)."""
    path = _whole_file(root)
    if path is None:
        raise SourceError(f"{root}: no ImageNet-21k whole-set tar ({', '.join((*WHOLE_TARS, *WHOLE_GZ))})")
    common = dict(
        kind="imagenet21k",
        dataset="imagenet21k",
        root=root,
        archives=(path,),
        val_per_class=val_per_class or DEFAULT_VAL_PER_CLASS,
        splits={"train": [path.name], "val": ["held out of train"]},
    )
    if path.name.endswith(".gz"):
        shares = [StreamShare(str(path), i, STREAM_SHARES) for i in range(STREAM_SHARES)]
        return Source(classes=(), class_words={}, train_units=shares, **common)  # type: ignore[arg-type]
    spans = index_class_tars(path)
    classes = tuple(sorted(spans))
    units = [TrainUnit(wnid, label, str(path), *spans[wnid]) for label, wnid in enumerate(classes)]
    return Source(
        classes=classes,
        class_words=dict.fromkeys(classes, ""),
        train_units=units,
        **common,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class StreamShare:
    """Every `of`-th synset tar of a gzipped whole-set tar, starting at the `index`-th: read by inflating the
    stream from its start (a gzip cannot be seeked). Labels are -1: the classes are known only once every share
    has been read, and staging numbers them then."""

    path: str
    index: int
    of: int

    def ident(self, split: str) -> str:
        return f"{split}-share{self.index:03d}of{self.of:03d}"

    def estimated_images(self) -> float:
        return Path(self.path).stat().st_size / 110e3 / self.of

    def read(self) -> Iterator[RawImage]:
        try:
            with tarfile.open(self.path, mode="r|gz") as outer:
                for position, member in enumerate(outer):
                    if not member.isfile():
                        continue
                    wnid = _synset_of(member, self.path)
                    if position % self.of != self.index:
                        continue
                    inner_file = outer.extractfile(member)
                    assert inner_file is not None  # a regular file
                    yield from _read_synset_stream(inner_file, wnid, f"{member.name} in {self.path}")
        except ARCHIVE_ERRORS as exc:
            raise SourceError(f"{self.path}: corrupt or truncated: {exc}") from None


def _synset_of(member: tarfile.TarInfo, where: str) -> str:
    name = PurePosixPath(member.name).name
    if not name.endswith(".tar"):
        raise SourceError(f"{where}: member {member.name} is not a per-synset tar (expected <wnid>.tar)")
    return name[: -len(".tar")]


def _read_synset_stream(fileobj: object, wnid: str, where: str) -> Iterator[RawImage]:
    """The images of one synset tar read as a stream (member by member, in the order the tar holds them)."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as inner:  # type: ignore[call-overload]
            for m in inner:
                if not (m.isfile() and is_image_name(m.name)):
                    continue
                reader = inner.extractfile(m)
                assert reader is not None
                name = PurePosixPath(m.name).name
                yield RawImage(safe_key(PurePosixPath(name).stem), name, wnid, -1, reader.read())
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{where}: corrupt or truncated synset tar: {exc}") from None
