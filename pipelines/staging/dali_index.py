"""DALI indexes: one index file beside every WebDataset shard, written at staging for the `dali` loader backend.

`write_dali_indexes` (the `dali` writer of `stager.extra_writer`) writes `<tier>/<split>-NNNNNN.idx` beside each
shard, in the format of DALI's `wds2idx` ("v1.2 <samples>", then per sample `<ext> <data offset> <size> <member
name>` for each member; `pipelines.dataset.index_text`). It is written here from the tar headers rather than by
running `wds2idx`, which starts two `tar` processes per shard; an index whose bytes already match its shard is
left alone.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from pipelines.atomic import atomic_write_bytes, sha256_file
from pipelines.dataset import DataError, index_path, index_text
from pipelines.staging.params import StageParams
from pipelines.staging.plan import DatasetPlan


def index_lines(shard: Path) -> list[str]:
    """One line per sample of a WebDataset tar: `<ext> <data offset> <size> <member name>` per member."""
    samples: list[list[str]] = []
    last = None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, ext = _split_name(member.name)
                if not base or base.endswith("/"):
                    continue  # as wds2idx: hidden files are not samples
                component = f"{ext} {member.offset_data} {member.size} {member.name}"
                if base != last:
                    samples.append([])
                    last = base
                samples[-1].append(component)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{shard}: unreadable shard, cannot index it ({exc})") from exc
    return [" ".join(components) for components in samples]


def _split_name(name: str) -> tuple[str, str]:
    """`dir/key.a.b` -> (`dir/key`, `a.b`): the extension starts at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def write_dali_indexes(
    plan: DatasetPlan, shard_entries: list[dict[str, Any]], work: Path, dest: Path,
    params: StageParams,
) -> list[dict[str, Any]]:
    """`stager.extra_writer`'s `dali`: a DALI index beside every shard. An index is rewritten only if its bytes
    differ from what the shard gives (so a second call writes nothing, and a stale or damaged index is replaced)."""
    del plan, work, params  # everything needed is in the shards
    entries = []
    for shard in sorted(shard_entries, key=lambda s: s["path"]):
        tar = Path(dest) / shard["path"]
        path = index_path(tar)
        data = index_text(index_lines(tar)).encode()
        if not (path.exists() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
        entries.append({"path": index_path(Path(shard["path"])).as_posix(), "shard": shard["path"],
                        "bytes": len(data), "sha256": sha256_file(path)})
    return entries
