"""Fine-tuning's layer-wise freezing on real training epochs (README: "`--freeze N|backbone --freeze-epochs K`:
weights and BN statistics held"): a worker built as a Ray Train worker builds its own (`build_worker`), trained by
the loop's own epoch (`train_one_epoch`) on the staged demo. For the first `init.freeze_epochs` the stem and first
stages keep every weight and every BN statistic bit for bit, and the optimizer keeps no moments for them, while the
rest trains; after them the whole network trains.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from pipelines.training.loop import CheckpointClock, JobSpec, LoopState, Worker, build_worker, train_one_epoch
from pipelines.training.recipe import load_recipe

FREEZE = 1  # the stem and the first stage
FREEZE_EPOCHS = 1


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Rank 0 opens the job's MLflow store when it is built: one store for the module (made once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _worker(dataset: Path, tracking_uri: str, optimizer: str) -> Worker:
    recipe = load_recipe("demo").with_overrides(
        init={"from": "models:/efficientnet-b0-phi-9/1", "freeze": FREEZE, "freeze_epochs": FREEZE_EPOCHS},
        optim={"optimizer": optimizer}, ray={"num_workers": 1})
    job = JobSpec(recipe=recipe, dataset_dir=str(dataset), num_classes=4,
                  tracking_uri=tracking_uri, run_id="no-run")
    worker = build_worker(job, rank=0, world=1, device=torch.device("cpu"))
    worker.client = None  # no MLflow run to tag with the first step's time: the weights are what is looked at
    return worker


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and buffer (BN running mean, variance and batch count) by name, copied."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return [n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])]


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop", "sgd"])  # weight decay and momentum on all three
def test_frozen_weights_and_bn_statistics_are_held_for_the_freeze_epochs_only(staged_dataset, tracking_uri,
                                                                               optimizer) -> None:
    worker = _worker(staged_dataset, tracking_uri, optimizer)
    net = models.unwrap_model(worker.model)
    frozen_modules = models.frozen_part(net, FREEZE)
    names = {id(m): n for n, m in net.named_modules()}
    frozen = tuple(f"{names[id(m)]}." for m in frozen_modules)
    assert frozen == ("stem.", "stages.0.")
    trained = (*(f"stages.{i}." for i in range(FREEZE, len(net.stages))), "head.", "classifier.")
    bn_stats = [n for n in worker.model.state_dict() if n.endswith(("running_mean", "running_var"))]
    assert any(n.startswith(frozen) for n in bn_stats) and any(n.startswith(trained) for n in bn_stats)
    state, clock = LoopState(), CheckpointClock(every_steps=None, every_minutes=None)

    # Frozen epoch: train mode, real batches, real optimizer steps.
    before = _snapshot(worker.model)
    train_one_epoch(worker, state, 0, clock)
    after = _snapshot(worker.model)
    assert state.step == worker.steps_per_epoch >= 2
    held = [n for n in before if n.startswith(frozen)]
    assert held and _changed(before, after, frozen) == [], "a frozen weight or BN statistic moved"
    for prefix in trained:  # every other part trained: its weights, and its BN statistics where it has BN
        assert any(n.startswith(prefix) and ".weight" in n for n in _changed(before, after, prefix)), prefix
    assert all(n in _changed(before, after, "") for n in bn_stats if not n.startswith(frozen))
    frozen_params = [p for m in frozen_modules for p in m.parameters()]
    assert not any(worker.optimizer.state.get(p) for p in frozen_params)  # no moments, no decay applied
    assert any(worker.optimizer.state.get(p) for p in net.classifier.parameters())

    # Past freeze_epochs: the stem and the first stage train too, their BN statistics follow the batches.
    train_one_epoch(worker, state, FREEZE_EPOCHS, clock)
    last = _snapshot(worker.model)
    moved = _changed(after, last, frozen)
    for prefix in frozen:
        assert any(n.startswith(prefix) and n.endswith(".weight") for n in moved), prefix
    assert all(n in moved for n in bn_stats if n.startswith(frozen))
