"""The ILSVRC2012 devkit: the leaf synsets (the 1000 classes) and the val ground truth, read from
ILSVRC2012_devkit_t12.tar.gz or its extracted folder. The archives and a tree with a flat val/ take their val
labels from it.

The devkit's ILSVRC2012_IDs are in a different order from the sorted WNIDs that are the class index, so val
labels map ID -> WNID -> sorted index (`val_wnids_from_devkit`).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipelines.source.records import ARCHIVE_ERRORS, GROUND_TRUTH, META_MAT, ImageNetSourceError

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC2012 devkit says: the leaf synsets and the val ground truth."""

    path: Path  # the .tar.gz or the extracted folder
    leaf_wnids: dict[int, str]  # ILSVRC2012_ID -> WNID, leaves (num_children == 0) only
    words: dict[str, str]  # WNID -> words, leaves only
    ground_truth: tuple[int, ...]  # ILSVRC2012_ID of val image i+1 (file name order)
    ground_truth_name: str  # for error messages: where the ground truth was read

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(sorted(self.leaf_wnids.values()))


def read_devkit(path: str | os.PathLike[str]) -> Devkit:
    """Leaf synsets and val ground truth from ILSVRC2012_devkit_t12.tar.gz or its extracted folder."""
    path = Path(path)
    if path.is_dir():
        meta_path, gt_path = path / META_MAT, path / GROUND_TRUTH
        for p in (meta_path, gt_path):
            if not p.is_file():
                raise ImageNetSourceError(f"{p}: devkit file missing")
        meta, gt = meta_path.read_bytes(), gt_path.read_bytes()
        meta_name, gt_name = str(meta_path), str(gt_path)
    elif path.is_file():
        meta, gt = _read_devkit_archive(path)
        meta_name, gt_name = f"{path} ({META_MAT})", f"{path} ({GROUND_TRUTH})"
    else:
        raise ImageNetSourceError(f"{path}: devkit missing")
    leaf_wnids, words = _parse_meta_mat(meta, meta_name)
    ground_truth = _parse_ground_truth(gt, gt_name, leaf_wnids)
    return Devkit(path, leaf_wnids, words, ground_truth, gt_name)


def _read_devkit_archive(path: Path) -> tuple[bytes, bytes]:
    wanted = {tuple(META_MAT.split("/")): b"", tuple(GROUND_TRUTH.split("/")): b""}
    found: dict[tuple[str, ...], bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for m in tar:
                tail = PurePosixPath(m.name).parts[-2:]
                if m.isfile() and tail in wanted:
                    reader = tar.extractfile(m)
                    assert reader is not None
                    found[tail] = reader.read()
    except ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{path}: not a readable .tar.gz devkit: {exc}") from None
    for tail in wanted:
        if tail not in found:
            raise ImageNetSourceError(f"{path}: devkit has no {'/'.join(tail)}")
    return found[tuple(META_MAT.split("/"))], found[tuple(GROUND_TRUTH.split("/"))]


def _parse_meta_mat(data: bytes, name: str) -> tuple[dict[int, str], dict[str, str]]:
    from scipy.io import loadmat  # scipy is heavy; only devkit readers pay for it

    try:
        synsets = np.atleast_1d(loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        rows = [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]), int(r["num_children"])) for r in synsets]
    except KeyError:
        raise ImageNetSourceError(f"{name}: no 'synsets' struct") from None
    except (ValueError, TypeError, IndexError, NotImplementedError) as exc:
        raise ImageNetSourceError(
            f"{name}: not a readable meta.mat (need struct array 'synsets' with ILSVRC2012_ID, WNID, words, "
            f"num_children): {exc}"
        ) from None
    leaves = [(i, wnid, words) for i, wnid, words, children in rows if children == 0]
    if not leaves:
        raise ImageNetSourceError(f"{name}: no leaf synsets (num_children == 0)")
    leaf_wnids = {i: wnid for i, wnid, _ in leaves}
    if len(leaf_wnids) != len(leaves) or len(set(leaf_wnids.values())) != len(leaves):
        raise ImageNetSourceError(f"{name}: leaf synsets repeat an ILSVRC2012_ID or a WNID")
    return leaf_wnids, {wnid: words for _, wnid, words in leaves}


def _parse_ground_truth(data: bytes, name: str, leaf_wnids: dict[int, str]) -> tuple[int, ...]:
    ids: list[int] = []
    for lineno, line in enumerate(data.decode("ascii", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise ImageNetSourceError(f"{name}: line {lineno} is not an ILSVRC2012_ID: {text!r}") from None
        if ids[-1] not in leaf_wnids:
            raise ImageNetSourceError(
                f"{name}: line {lineno}: ILSVRC2012_ID {ids[-1]} is not a leaf class of meta.mat "
                f"(leaf IDs {min(leaf_wnids)}..{max(leaf_wnids)})"
            )
    return tuple(ids)


def val_wnids_from_devkit(devkit: Devkit, names: list[str], where: str) -> dict[str, str]:
    """File name -> WNID for flat val files ILSVRC2012_val_<n>.JPEG, whose label is ground-truth line n."""
    gt = devkit.ground_truth
    if len(gt) != len(names):
        raise ImageNetSourceError(
            f"{devkit.ground_truth_name}: has {len(gt)} labels but {where} holds {len(names)} val images"
        )
    out: dict[str, str] = {}
    for name in names:
        match = _VAL_NAME.fullmatch(Path(name).stem)
        n = int(match.group(1)) if match else 0
        if not 1 <= n <= len(gt):
            raise ImageNetSourceError(
                f"{where}: val file {name} is not named ILSVRC2012_val_<n> with n in 1..{len(gt)}"
            )
        out[name] = devkit.leaf_wnids[gt[n - 1]]
    return out
