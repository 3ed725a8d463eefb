"""The `dali` extra format: the shard indexes listed again under the manifest's `extra.dali`.

Every version now has an index beside each shard (`shards.write_shard_indexes`, in the format of DALI's `wds2idx`:
"v1.2 <samples>", then per sample `<ext> <data offset> <size> <member name>` for each member), which the `dali`
and `wds` backends read. `write_dali_indexes` (the `dali` writer of `stager.extra_writer`) only makes sure they
are there and returns their entries, so versions staged with `formats: [dali]` keep the manifest they had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.staging.params import StageParams
from pipelines.staging.plan import DatasetPlan
from pipelines.staging.shards import write_shard_indexes


def write_dali_indexes(
    plan: DatasetPlan,
    shard_entries: list[dict[str, Any]],
    work: Path,
    dest: Path,
    params: StageParams,
) -> list[dict[str, Any]]:
    """`stager.extra_writer`'s `dali`: the shard indexes (every version has them, see `shards.write_shard_indexes`)
    listed again under the manifest's `extra.dali`, for versions read by tools that look there."""
    del plan, work, params  # everything needed is in the shards
    return write_shard_indexes(dest, shard_entries)
