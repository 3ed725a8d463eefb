"""Evaluation reads through the loader backend the recipe names, as training does: minival in the training loop
(`loop.evaluate_and_early_stop`), val in the job driver (`evaluate.evaluate_split`, in a Ray task).

The tiny demo is staged with FFCV files and DALI indexes and one fixed model scores minival and val through each
backend. The backends' eval pixels agree to a few levels (tests/integration/test_backends.py), so the scores
agree too; an ffcv recipe on a version staged without FFCV files fails with the loader's DataError, which shows
that evaluation really reads through the recipe's backend. About half a minute: staging, FFCV's imports and
compiles, Ray.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pipelines.dataset import DataError, read_manifest
from pipelines.loading.transforms import center_crop_box
from pipelines.training.evaluate import evaluate_on_cluster, evaluate_split
from pipelines.training.recipe import Recipe, load_recipe
from pipelines.training.loop import JobSpec, LoopState, Worker, evaluate_and_early_stop

from helpers import STAGE_PARAMS, stage_directly

BACKENDS = ("wds", "ffcv", "dali")


@pytest.fixture(scope="module")
def formats_dataset(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo staged at tiers (32, 64) with FFCV files and DALI indexes (read-only for tests)."""
    params = dataclasses.replace(STAGE_PARAMS, formats=("ffcv", "dali"))
    return stage_directly(demo_archives, tmp_path_factory.mktemp("eval-formats"), params)


def _recipe(backend: str) -> Recipe:
    return load_recipe("demo").with_overrides(data={"backend": backend})


def _model(num_classes: int) -> torch.nn.Module:
    """A fixed model whose scores follow the pixels. The recipe's untrained EfficientNet is no use here: with
    BN's initial running statistics its logits are ~1e-12, so every backend scores ln(classes) and chance."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))
    with torch.no_grad():
        model[2].weight.mul_(10)  # logits of a few units: losses well away from ln(classes), clear top-1 margins
    return model.eval()


def _minival(model: torch.nn.Module, dataset: Path, recipe: Recipe) -> dict[str, float]:
    """The training loop's minival evaluation, on one rank outside Ray (a Worker holds nothing Ray-specific)."""
    spec = recipe.model.spec()
    job = JobSpec(recipe=recipe, dataset_dir=str(dataset), num_classes=read_manifest(dataset).num_classes,
                  tracking_uri="unused", run_id="unused")
    worker = Worker(job=job, rank=0, world=1, device=torch.device("cpu"), amp=False, spec=spec, model=model,
                    ema=None, net=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), client=None,
                    steps_per_epoch=1)
    state = LoopState(history=[])
    row = evaluate_and_early_stop(worker, state, epoch=0)
    assert state.best_top1 == row["minival_top1"]  # recorded for early stopping
    return {"loss": row["minival_loss"], "top1": row["minival_top1"]}


def _val(model: torch.nn.Module, dataset: Path, recipe: Recipe) -> dict[str, float]:
    spec = recipe.model.spec()
    return evaluate_split(model, str(dataset), "val", spec.eval_resolution, spec.crop_ratio, recipe)


@pytest.fixture(scope="module")
def scores(formats_dataset: Path) -> dict[str, dict[str, dict[str, float]]]:
    """backend -> split -> {loss, top1, ...} of the fixed model."""
    model = _model(read_manifest(formats_dataset).num_classes)
    out = {}
    for backend in BACKENDS:
        recipe = _recipe(backend)
        out[backend] = {"minival": _minival(model, formats_dataset, recipe),
                        "val": _val(model, formats_dataset, recipe)}
    return out


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("split", ["minival", "val"])
def test_backends_score_minival_and_val_alike(
    scores: dict[str, dict[str, dict[str, float]]], formats_dataset: Path, backend: str, split: str
) -> None:
    reference, got = scores["wds"][split], scores[backend][split]
    samples = read_manifest(formats_dataset).splits[split].samples
    assert abs(reference["loss"] - math.log(read_manifest(formats_dataset).num_classes)) > 0.5  # not degenerate
    # Measured: ffcv within ~0.7% of wds's loss (its JPEGs are encoded again; 3.6% with FFCV's own centre crop,
    # a pixel smaller), dali within ~0.3%.
    assert got["loss"] == pytest.approx(reference["loss"], rel=0.02)
    assert abs(got["top1"] - reference["top1"]) <= 100 / samples + 1e-9  # at most one sample on a near tie


def test_ffcv_centre_crop_is_the_wds_box() -> None:
    """FFCV's own centre crop truncates the side where wds and dali round it; the backend's decoder rounds."""
    from ffcv.pipeline.compiler import Compiler

    from pipelines.loading.ffcv import _center_crop_decoder_class

    crop = Compiler.compile(_center_crop_decoder_class()((32, 32), ratio=0.875).get_crop_generator)
    for width, height in ((64, 64), (85, 64), (64, 97), (150, 113), (7, 5)):
        for ratio in (0.875, 2 / 3, 0.7333, 0.5078125):  # 0.5078125 x 64 = 32.5: rounds to even, as round()
            x, y, w, h = center_crop_box(width, height, 32, ratio)
            assert tuple(crop(height, width, None, ratio)) == (y, x, h, w), (width, height, ratio)


def test_job_val_task_reads_the_recipe_backend(
    formats_dataset: Path, scores: dict[str, dict[str, dict[str, float]]], ray_cluster: object
) -> None:
    """The job's own val path: `evaluate_split` in a Ray task, here through FFCV in a Ray worker process."""
    recipe = _recipe("ffcv")
    spec = recipe.model.spec()
    model = _model(read_manifest(formats_dataset).num_classes)
    val = evaluate_on_cluster(model, formats_dataset, "val", spec, recipe)
    assert val["loss"] == pytest.approx(scores["ffcv"]["val"]["loss"], rel=1e-5)
    assert val["top1"] == scores["ffcv"]["val"]["top1"]


def test_ffcv_on_a_version_staged_without_ffcv_files_is_a_clear_error(staged_dataset: Path) -> None:
    assert "ffcv" not in read_manifest(staged_dataset).extra
    model = _model(read_manifest(staged_dataset).num_classes)
    for evaluate, split in ((_minival, "minival"), (_val, "val")):
        with pytest.raises(DataError, match=f"no FFCV file for {split} .*stage with formats including 'ffcv'"):
            evaluate(model, staged_dataset, _recipe("ffcv"))
