"""The training loop's own pieces, on the real functions the workers call: weight decay by rank, the EMA update
and its warm-up, early stopping on minival, when a mid-epoch checkpoint is due, what Ray Train is told and which
kept checkpoint is chosen."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import models
from pipelines.training.evaluate import evaluate
from pipelines.training.job import best_scored_checkpoint
from pipelines.training.loop import (
    CHECKPOINT_RANK,
    SCORE,
    UNSCORED,
    CheckpointClock,
    LoopState,
    checkpoint_rank,
    ray_metrics,
    record_minival,
    score_order,
)
from pipelines.training.recipe import load_recipe
from pipelines.training.schedules import ema_decay_at
from pipelines.training.steps import build_optimizer, seed_step, update_ema

# --------------------------------------------------------------------------------------------- weight decay

WEIGHT_DECAY = 0.05  # large, so one step's decay shows in float32


def _tiny_efficientnet() -> nn.Module:
    torch.manual_seed(0)
    return models.create_model("efficientnet_b0", num_classes=5, phi=-9)


@pytest.mark.parametrize("optimizer", ["rmsprop", "sgd", "adamw"])
def test_weight_decay_skips_every_parameter_of_rank_below_two(optimizer: str) -> None:
    recipe = load_recipe("demo").with_overrides(optim={"optimizer": optimizer, "weight_decay": WEIGHT_DECAY})
    model = _tiny_efficientnet()
    groups = build_optimizer(model, recipe).param_groups
    decay_of: dict[int, float] = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter in two groups"
            decay_of[id(p)] = group["weight_decay"]
    named = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in named.values()}, "a parameter in no group: it would never train"
    wrong = [name for name, p in named.items() if decay_of[id(p)] != (WEIGHT_DECAY if p.ndim >= 2 else 0.0)]
    assert not wrong, wrong
    # What the rule means for EfficientNet: every BatchNorm scale and shift and every bias are exempt (by rank,
    # so the blocks' BN, whose names hold no "bn", are not missed); conv kernels and the classifier decay.
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    exempt = {id(p) for m in norms for p in (m.weight, m.bias)}
    exempt |= {id(p) for name, p in named.items() if name.endswith(".bias")}
    assert norms and {decay_of[i] for i in exempt} == {0.0}
    assert decay_of[id(model.classifier.weight)] == decay_of[id(model.stem[0].weight)] == WEIGHT_DECAY


@pytest.mark.parametrize("optimizer", ["rmsprop", "sgd", "adamw"])
def test_a_step_without_gradient_shrinks_only_the_decayed_weights(optimizer: str) -> None:
    recipe = load_recipe("demo").with_overrides(optim={"optimizer": optimizer, "weight_decay": WEIGHT_DECAY})
    model = _tiny_efficientnet()
    opt = build_optimizer(model, recipe)
    for group in opt.param_groups:
        # The loop sets the scheduled rate each step (it starts at 0). Small enough that RMSProp's normalised step
        # (about lr / sqrt(1 - alpha) for any gradient) cannot carry a weight past zero.
        group["lr"] = 1e-3
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, before[name]), f"{name} moved without a gradient"
        else:
            assert p.norm() < before[name].norm(), f"{name} did not decay"


# --------------------------------------------------------------------------------------------- EMA


def _small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _trained_away(ema: nn.Module) -> nn.Module:
    """A copy of the EMA's network with other weights and BN statistics, as after a few training steps."""
    model = copy.deepcopy(ema).requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3, 6, 6))  # moves BN's running mean and variance, counts a batch
    return model


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.9999])
def test_ema_update_is_the_weighted_average_of_the_parameters(decay: float) -> None:
    ema = _small_net(0).requires_grad_(False)
    model = _trained_away(ema)
    old = {name: p.clone() for name, p in ema.named_parameters()}
    model_before = copy.deepcopy(model.state_dict())
    update_ema(ema, model, decay)
    for name, p in ema.named_parameters():
        expected = decay * old[name] + (1 - decay) * dict(model.named_parameters())[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)
        assert not p.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_before[key]), f"update_ema changed the trained model's {key}"


def test_ema_copies_the_batchnorm_statistics_rather_than_averaging_them() -> None:
    ema = _small_net(0).requires_grad_(False)
    model = _trained_away(ema)
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, ema[1].running_mean)
    update_ema(ema, model, 0.9)
    for (name, e), b in zip(ema.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(e, b), name  # running_mean, running_var, num_batches_tracked: the model's own


def test_ema_warm_up_follows_the_model_early_then_settles_at_the_target_decay() -> None:
    """With the model held still, each update closes a fraction 1 - decay(step) of the gap: the warm-up makes
    the first steps close most of it (an EMA stuck at the random init would score chance for thousands of
    steps), the recipe's decay (0.9999) the later ones."""
    ema = _small_net(0).requires_grad_(False)
    model = _trained_away(ema)
    target = model[5].weight  # the classifier's
    gap0 = (ema[5].weight - target).abs().max().item()
    remaining = 1.0
    for step in range(20):
        decay = ema_decay_at(step, 0.9999)
        update_ema(ema, model, decay)
        remaining *= decay
        gap = (ema[5].weight - target).abs().max().item()
        assert gap == pytest.approx(gap0 * remaining, rel=1e-4, abs=1e-6), step
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)  # the first update moves 90% of the way
    assert remaining < 0.01  # after 20 steps the EMA is within 1% of the model
    assert ema_decay_at(10**6, 0.9999) == 0.9999


# --------------------------------------------------------------------------------------------- early stopping


def _run(top1s: list[float], patience: int | None, eval_every: int = 1) -> tuple[LoopState, list[bool]]:
    """Evaluations at epochs eval_every - 1, 2 * eval_every - 1, ... as the loop makes them."""
    state, stopped = LoopState(), []
    for i, top1 in enumerate(top1s):
        record_minival(state, top1, (i + 1) * eval_every - 1, patience)
        stopped.append(state.stopped_early)
    return state, stopped


@pytest.mark.parametrize(
    "top1s, patience, stops, best_index",
    [
        ([50.0, 49.0, 48.0], 2, True, 0),  # patience reached: two evaluations in a row without a gain
        ([50.0, 49.0], 2, False, 0),  # not yet
        ([50.0, 50.0, 50.0], 2, True, 0),  # a tie is no gain: the earlier checkpoint stays the chosen one
        ([50.0, 40.0, 55.0, 54.0, 56.0, 10.0], 2, False, 4),  # each gain resets the count
        ([50.0, 40.0, 55.0, 54.0, 53.0], 2, True, 2),
        ([10.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], None, False, 0),  # no patience: never stops
        ([0.0, 0.0], 1, True, 0),  # a first evaluation at 0% is still the best so far
        ([20.0, 30.0, 40.0], 1, False, 2),
    ],
)
def test_early_stopping(top1s: list[float], patience: int | None, stops: bool, best_index: int) -> None:
    state, stopped = _run(top1s, patience)
    assert stopped == [False] * (len(top1s) - 1) + [stops]  # and never before the last evaluation
    assert (state.best_top1, state.best_epoch) == (top1s[best_index], best_index)
    assert state.epochs_without_improvement == len(top1s) - 1 - best_index


def test_patience_counts_evaluations_and_best_epoch_is_the_epoch() -> None:
    state, stopped = _run([30.0, 35.0, 34.0, 33.0], patience=2, eval_every=3)  # epochs 2, 5, 8, 11
    assert stopped == [False, False, False, True]
    assert (state.best_epoch, state.best_top1, state.epochs_without_improvement) == (5, 35.0, 2)


def test_a_resumed_loop_state_stops_where_the_uninterrupted_one_does() -> None:
    """The checkpoint holds `state.__dict__`; resume rebuilds LoopState from it."""
    top1s = [50.0, 60.0, 59.0, 58.0, 57.0]
    whole, _ = _run(top1s, patience=3)
    state, _ = _run(top1s[:3], patience=3)
    buf = io.BytesIO()
    torch.save({"loop": state.__dict__}, buf)
    buf.seek(0)
    resumed = LoopState(**torch.load(buf, weights_only=True)["loop"])  # plain data: no unpickling
    assert not resumed.stopped_early
    for epoch, top1 in enumerate(top1s[3:], start=3):
        record_minival(resumed, top1, epoch, 3)
    assert resumed == whole and resumed.stopped_early and resumed.best_epoch == 1
    assert math.isclose(resumed.best_top1, 60.0)


# --------------------------------------------------------------------------------------------- mid-epoch checkpoints


def test_a_checkpoint_is_due_every_n_steps_and_never_without_a_setting() -> None:
    cpu = torch.device("cpu")
    assert [s for s in range(1, 13) if CheckpointClock(5, None).due(s, cpu)] == [5, 10]
    assert not any(CheckpointClock(None, None).due(s, cpu) for s in range(1, 100))


def test_a_checkpoint_is_due_once_the_minutes_have_passed_since_the_last() -> None:
    cpu = torch.device("cpu")
    clock = CheckpointClock(None, 1.0)
    every = CheckpointClock.MINUTES_CHECK_STEPS
    assert not clock.due(every, cpu)
    clock.since -= 61  # as if a minute had passed
    assert not clock.due(every + 1, cpu)  # the clock is read every MINUTES_CHECK_STEPS steps only (a host sync)
    assert clock.due(2 * every, cpu)
    clock.restart()
    assert not clock.due(3 * every, cpu)


def test_ray_is_told_finite_figures_and_a_rank_for_every_checkpoint() -> None:
    """NaN never reaches Ray Train: its run snapshot would store null, which a relaunched driver cannot rank."""
    epoch_row = {"epoch": 3.0, "train_loss": 1.5, SCORE: 71.5}
    assert ray_metrics(epoch_row) == {**epoch_row, CHECKPOINT_RANK: pytest.approx(71.5, abs=1e-5)}
    # Equal scores: the earlier epoch ranks higher (Ray keeps the later of equal ranks, early stopping the earlier).
    later = ray_metrics({**epoch_row, "epoch": 9.0})[CHECKPOINT_RANK]
    assert ray_metrics(epoch_row)[CHECKPOINT_RANK] > later > 71.5 - 0.004  # above one image less of 25,000
    unscored = ray_metrics({"epoch": 4.0, "train_loss": 1.4, SCORE: math.nan})
    assert unscored == {"epoch": 4.0, "train_loss": 1.4, CHECKPOINT_RANK: UNSCORED}
    assert ray_metrics({"epoch": 4.0, "batch": 7.0})[CHECKPOINT_RANK] == UNSCORED  # mid-epoch
    # An epoch early stopping does not score (progressive learning before its last stage): figures, no rank.
    assert ray_metrics(epoch_row, scored=False) == {**epoch_row, CHECKPOINT_RANK: UNSCORED}
    assert UNSCORED < 0.0  # below every top-1, so Ray keeps scored checkpoints before it


def test_the_chosen_checkpoint_is_the_best_scored_the_earliest_of_equals() -> None:
    def kept(*ranks: tuple[int, float]) -> list[tuple[str, dict]]:
        return [(f"epoch-{e}", {"epoch": e, CHECKPOINT_RANK: r}) for e, r in ranks]

    assert best_scored_checkpoint(kept((2, 60.0), (5, 70.0), (6, UNSCORED))) == "epoch-5"
    assert best_scored_checkpoint(kept((7, 70.0), (5, 70.0))) == "epoch-5"  # a tie keeps the earlier epoch
    assert best_scored_checkpoint(kept((0, 0.0))) == "epoch-0"  # 0% is a score
    assert best_scored_checkpoint(kept((1, UNSCORED))) is None


def test_early_stopping_ray_and_the_chosen_checkpoint_order_epochs_by_one_rule() -> None:
    """The best score, the earliest of equals (`score_order`): early stopping's best epoch, the rank Ray keeps
    checkpoints by, and the checkpoint the job registers are the same epoch."""
    scores = [60.0, 70.0, 70.0, 65.0, 70.0, 0.0]
    by_rule = sorted(range(len(scores)), key=lambda e: score_order(scores[e], e), reverse=True)
    assert by_rule[:3] == [1, 2, 4]
    assert sorted(range(len(scores)), key=lambda e: checkpoint_rank(scores[e], e), reverse=True) == by_rule
    state, _ = _run(scores, patience=None)
    assert state.best_epoch == by_rule[0]
    kept = [(e, {"epoch": e, CHECKPOINT_RANK: checkpoint_rank(s, e)}) for e, s in enumerate(scores)]
    assert best_scored_checkpoint(kept[::-1]) == by_rule[0]  # whatever order Ray lists them in


def test_a_step_draws_the_same_whatever_ran_before_it() -> None:
    def draws(noise: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.rand(noise)  # what ran before in the process
        gen = torch.Generator()
        gen.manual_seed(noise)
        seed_step(3, 2, 7, 1, gen)
        return torch.rand(4), torch.rand(4, generator=gen)

    first, second = draws(1), draws(100)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    gen = torch.Generator()
    seed_step(3, 2, 8, 1, gen)
    assert not torch.equal(torch.rand(4), first[0])  # the next batch draws anew


def test_evaluate_matches_a_hand_count_and_counts_each_class() -> None:
    logits = [torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 0, 3, 2, 1, 0]]), torch.tensor([[0.0, 0, 0, 0, 1, 9]])]
    labels = [torch.tensor([0, 3]), torch.tensor([1])]  # hit; top-5 only; a miss beyond top-5 (rank 6 of 6)

    class Preset(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batches = iter(logits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return next(self.batches)

    batches = [(torch.zeros(len(y), 3, 2, 2, dtype=torch.uint8), y) for y in labels]
    counts = torch.zeros(2, 6, dtype=torch.float64)
    m = evaluate(Preset(), batches, torch.device("cpu"), channels_last=False, amp=False, per_class=counts)
    loss = sum(torch.nn.functional.cross_entropy(lg, y, reduction="sum") for lg, y in zip(logits, labels)) / 3
    assert m["samples"] == 3 and math.isclose(m["top1"], 100 / 3) and math.isclose(m["top5"], 200 / 3)
    assert math.isclose(m["loss"], float(loss), rel_tol=1e-6)  # float32 per batch, float64 sums
    assert counts.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0]]
