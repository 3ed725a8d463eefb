"""Staging options: every number checked in one line (inf, nan, fractions where counts belong, ranges, 0 never
silently "the default"), a minival that would starve classes of training images refused, and `workers` the number
of units decoded at once whatever the mapper."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest

from pipelines.dataset import LATEST, MANIFEST, read_manifest
from pipelines.source.demo import DemoSummary, extract_to_tree
from pipelines.staging import runners
from pipelines.staging.params import AUTO, MIN_TRAIN_PER_CLASS, StageParams, StagingError, minival_value
from pipelines.staging.plan import check_minival
from pipelines.staging.runners import MAX_WORKERS, available_cores, resolve_workers, thread_map
from pipelines.staging.spools import process_unit
from pipelines.staging.stager import stage

from helpers import STAGE_PARAMS, ConcurrencyProbe, stage_directly

INF, NAN = math.inf, math.nan


# --------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tiers=(INF,)), dict(tiers=(NAN,)), dict(tiers=(64.5,)), dict(tiers=(True,)), dict(tiers=128),
        dict(shard_size=INF), dict(shard_size=NAN), dict(shard_size=2.5), dict(shard_size=0),
        dict(minival=INF), dict(minival=NAN), dict(minival=-1), dict(minival=25_000.0), dict(minival=True),
        dict(seed=INF), dict(seed=NAN), dict(seed=-1), dict(seed=0.5),
        dict(jpeg_quality=INF), dict(jpeg_quality=NAN), dict(jpeg_quality=90.5), dict(jpeg_quality=0),
        dict(max_bad_fraction=INF), dict(max_bad_fraction=NAN), dict(max_bad_fraction=-0.0001),
        dict(val_chunk=INF), dict(val_chunk=0), dict(ffcv_jpeg_quality=0), dict(ffcv_jpeg_quality=NAN),
        dict(ffcv_compress_probability=NAN),
    ],
    ids=repr,
)
def test_every_number_rejects_inf_nan_and_out_of_range_in_one_line(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))) as info:
        StageParams(**kwargs)
    assert "\n" not in str(info.value)


def test_zero_is_honoured_where_it_means_something() -> None:
    params = StageParams(minival=0, seed=0, max_bad_fraction=0)
    assert (params.minival, params.seed, params.max_bad_fraction) == (0, 0, 0.0)
    assert StageParams(tiers=[64.0], shard_size=8.0, jpeg_quality=90.0).shard_size == 8  # integral floats (JSON)


@pytest.mark.parametrize(
    "value, expected", [(0, 0.0), (0.25, 0.25), (0.0, 0.0), (1, 1), (25_000.0, 25_000), (3, 3)])
def test_minival_value_counts_from_one_fractions_below(value: float, expected: int | float) -> None:
    got = minival_value(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value", [1.5, 25_000.5, INF, -INF, NAN, -1, -0.5, True, "100"])
def test_minival_value_refuses_what_is_not_a_count_or_a_fraction(value: object) -> None:
    with pytest.raises(ValueError, match="minival") as info:
        minival_value(value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, -1, 2.5, INF, NAN, MAX_WORKERS + 1, True])
def test_workers_must_be_a_whole_number_in_range(workers: object) -> None:
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(workers)


def test_workers_none_is_every_core_and_a_number_is_kept() -> None:
    assert resolve_workers(None) == available_cores()
    assert resolve_workers(3) == 3 and resolve_workers(2.0) == 2


def test_the_flow_parameters_default_to_stage_params_and_an_empty_list_is_no_default() -> None:
    from flows.stage_imagenet import stage_params

    assert stage_params() == StageParams()
    assert stage_params(tiers=[64, 32], formats=["dali"]) == StageParams(tiers=(32, 64), formats=("dali",))
    with pytest.raises(ValueError, match="tiers"):
        stage_params(tiers=[])  # an empty list is not "the default tiers"
    with pytest.raises(ValueError, match="minival"):
        stage_params(minival=1.5)  # not one image
    assert stage_params(minival=2.0).minival == 2 and stage_params(minival=0.1).minival == 0.1


def test_the_stage_flags_default_to_stage_params() -> None:
    from cli.effnet import build_parser

    args = vars(build_parser().parse_args(["stage", "--source", "src", "--out", "out"]))
    flags = {f.name for f in dataclasses.fields(StageParams)} & set(args)
    assert flags >= {"tiers", "shard_size", "minival", "seed", "jpeg_quality", "max_bad_fraction", "formats"}
    for name in flags:
        value = args[name]
        assert (tuple(value) if isinstance(value, list) else value) == getattr(StageParams(), name), name
    assert args["base_version"] == AUTO and args["min_train_per_class"] == MIN_TRAIN_PER_CLASS


def test_stage_refuses_bad_workers_before_reading_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        stage(tmp_path / "nowhere", tmp_path / "out", STAGE_PARAMS, workers=0, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- minival vs. data


@pytest.fixture(scope="module")
def tree(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_to_tree(demo_archives, tmp_path_factory.mktemp("options") / "tree", "tree")


def _no_units(*args: object) -> None:
    raise AssertionError("a unit ran")


def test_a_minival_that_starves_classes_is_one_line_naming_a_few(
    demo_archives: Path, demo_summary: DemoSummary, tmp_path: Path
) -> None:
    # 12 train images per class (one class 11): 44 held out leaves one each. Archives are counted by decoding.
    starving = dataclasses.replace(STAGE_PARAMS, minival=44)
    with pytest.raises(StagingError) as info:
        stage_directly(demo_archives, tmp_path / "out", starving)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"minival 44 leaves 4 of 4 classes with fewer than {MIN_TRAIN_PER_CLASS} "
                              f"train images (")
    assert message.count(": 1 of 1") == 3 and ", ..." in message  # three shown, not all
    assert "--allow-small-train" in message
    assert not (tmp_path / "out" / LATEST).exists() and not list((tmp_path / "out").rglob(MANIFEST))


def test_a_starving_minival_of_a_listed_source_fails_before_any_unit(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runners, "process_unit", _no_units)
    with pytest.raises(StagingError, match="minival 44 leaves 4 of 4 classes"):
        stage_directly(tree, tmp_path / "out", dataclasses.replace(STAGE_PARAMS, minival=44))
    assert not (tmp_path / "out").exists()


def test_the_floor_is_a_parameter_and_zero_allows_small_train(demo_archives: Path, tmp_path: Path) -> None:
    # minival 0.25 leaves 8 or 9 train images per class.
    with pytest.raises(StagingError, match="fewer than 9 train images"):
        stage(demo_archives, tmp_path / "a", STAGE_PARAMS, log=lambda *_: None, min_train_per_class=9)
    floor = stage(demo_archives, tmp_path / "b", STAGE_PARAMS, log=lambda *_: None, min_train_per_class=8)
    assert min(read_manifest(floor).splits["train"].per_class.values()) == 8  # met exactly: staged
    dest = stage(demo_archives, tmp_path / "c", dataclasses.replace(STAGE_PARAMS, minival=44),
                         log=lambda *_: None, min_train_per_class=0)
    assert set(read_manifest(dest).splits["train"].per_class.values()) == {1}
    with pytest.raises(ValueError, match="min_train_per_class"):
        stage(demo_archives, tmp_path / "d", STAGE_PARAMS, log=lambda *_: None, min_train_per_class=-1)


@pytest.mark.parametrize("minival", [48, 1000])
def test_a_minival_larger_than_the_data_is_one_line(tree: Path, tmp_path: Path, minival: int) -> None:
    # 48 train files, one of them truncated: 47 images. 48 fails on the decoded count, 1000 on the listing.
    with pytest.raises(StagingError, match=rf"^minival {minival} is more than the 4[78] train images of the source$"):
        stage(tree, tmp_path / "out", dataclasses.replace(STAGE_PARAMS, minival=minival),
                      log=lambda *_: None, min_train_per_class=0)


def test_check_minival_takes_only_classes_the_minival_takes_from() -> None:
    # A class with 2 images and nothing held out is small, but not the minival's doing.
    check_minival({"a": 2, "b": 50}, {"a": 0, "b": 10}, 10, 5)
    with pytest.raises(StagingError, match=r"leaves 1 of 2 classes .*\(a: 1 of 2\)"):
        check_minival({"a": 2, "b": 50}, {"a": 1, "b": 10}, 11, 5)


# --------------------------------------------------------------------------------------------- workers


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_is_the_number_of_units_decoded_at_once(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # A mapper with more threads than workers, as the flow's task runner has: at most `workers` units decode.
    source = Path(shutil.copytree(tree, tmp_path / "tree"))
    probe = ConcurrencyProbe(process_unit, pause=0.1)
    monkeypatch.setattr(runners, "process_unit", probe)
    params = dataclasses.replace(STAGE_PARAMS, val_chunk=4)  # 4 class units + 4 val units
    stage(source, tmp_path / "out", params, map_units=thread_map(6), workers=workers,
                  log=lambda *_: None)
    assert len(probe.starts) == 8 and probe.most == workers
