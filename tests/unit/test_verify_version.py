"""A staged version is checked against its manifest before a job reads it: missing or truncated files (a stat
each) before Ray starts; every byte on request (`effnet verify`)."""

from __future__ import annotations

import pytest

from cli import effnet
from pipelines.dataset import DataError, damaged_files, read_manifest
from pipelines.training.job import validate_job
from pipelines.training.recipe import load_recipe


def _shard(version, split="train"):
    return next(version / s["path"] for s in read_manifest(version).shards if s["split"] == split)


def test_a_whole_version_passes_every_check(staged_dataset, capsys):
    assert damaged_files(staged_dataset, checksums=True) == []
    assert effnet.main(["verify", str(staged_dataset)]) == 0
    assert "sizes and sha256 as in the manifest" in capsys.readouterr().out


def test_a_truncated_or_deleted_shard_stops_the_job_before_ray(copy_staged, capsys):
    truncated, deleted = _shard(copy_staged, "train"), _shard(copy_staged, "minival")
    truncated.write_bytes(truncated.read_bytes()[:512])
    deleted.unlink()
    recipe = load_recipe("demo").with_overrides(model={"phi": -9})
    with pytest.raises(DataError) as err:
        validate_job(recipe, copy_staged)
    message = str(err.value)
    assert "\n" not in message
    assert f"{deleted.relative_to(copy_staged)} is missing" in message
    assert f"{truncated.relative_to(copy_staged)} has 512 bytes" in message
    assert "run `effnet stage` again" in message
    assert effnet.main(["verify", str(copy_staged), "--sizes-only"]) == 2
    assert "is missing" in capsys.readouterr().err


def test_a_changed_byte_is_found_by_the_checksums_only(copy_staged, capsys):
    shard = _shard(copy_staged)
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert damaged_files(copy_staged) == []  # same size: the quick check before a job passes
    assert damaged_files(copy_staged, checksums=True) == [
        f"{shard.relative_to(copy_staged)} does not match its sha256"]
    assert effnet.main(["verify", str(copy_staged)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match its sha256" in err


def test_an_ffcv_recipe_on_a_version_without_ffcv_files_stops_before_ray(staged_dataset):
    from pipelines.training.job import validate_job
    from pipelines.training.recipe import load_recipe

    recipe = load_recipe("demo").with_overrides(data={"backend": "ffcv"})
    with pytest.raises(DataError, match="no FFCV files; stage it with formats including 'ffcv'"):
        validate_job(recipe, staged_dataset)
    validate_job(load_recipe("demo"), staged_dataset)  # the same version is fine for wds


def test_a_batch_larger_than_the_training_split_stops_before_ray(staged_dataset):
    """Found inside every Ray worker, after the retries, with a traceback per attempt, before it was checked here."""
    from pipelines.training.job import validate_job
    from pipelines.training.recipe import load_recipe

    recipe = load_recipe("demo").with_overrides(data={"batch_size": 4096})
    with pytest.raises(ValueError, match=r"training images give no full batch of 4096 on 2 workers"):
        validate_job(recipe, staged_dataset)


def test_a_progressive_recipe_evaluating_below_its_last_size_stops_before_ray(staged_dataset):
    from pipelines.training.job import validate_job
    from pipelines.training.recipe import load_recipe

    recipe = load_recipe("demo-progressive").with_overrides(progressive={"image_size": [32, 96]})
    with pytest.raises(ValueError, match="ends at 96 px but efficientnet_b0_phi-9 evaluates at 64 px"):
        validate_job(recipe, staged_dataset)
    validate_job(recipe.with_overrides(model={"resolution": 96}), staged_dataset)
