"""Compound scaling's step 1 (a grid search of alpha, beta, gamma at phi = 1 on a baseline) and the paper's
comparison of scaling methods at equal FLOPs (its Figure 8 / Table 3 setting), each as one Ray Tune experiment.

Search (`search_points`, `search_trials`): every (alpha, beta, gamma) of a grid that meets
alpha * beta^2 * gamma^2 ~= 2 within a tolerance scales the baseline once (phi = 1); each point is a trial, a
short training of that model. ASHA stops the weak trials early; the best minival top-1 wins (`pick_winner`).
Study (`study_trials`): from the same baseline, one member per method (width only, depth only, resolution only,
compound) and FLOPs target (2x, 4x, ...), each factor found so that the member's measured GMACs come as close
to the target as the rounding of channels, blocks and pixels allows (`fit_to_gmacs`); every member trains with
the same recipe, its chosen checkpoint (best minival) is evaluated on val.

A trial is one process (no DDP) with one Ray Train worker's resources, running the worker's own loop
(`pipelines.training.loop`: model, EMA, optimizer, epochs, minival); Tune runs as many trials at once as the
cluster holds. The experiment's MLflow parent run has one nested run per trial. Each trial keeps its own folder
under `<ray storage>/tune/<key>` (the key: everything that decides the experiment's outcome): its last and best
epoch as checkpoint files and its state as JSON, so a rerun after a crash runs only the trials that had not
ended, each from its last epoch (Tune's own restore is not used: it unpickles its state).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

import models
from models import CoefficientSet, VariantSpec, check_coefficients, round_resolution
from models.checkpoint import read_checkpoint, scored_weights
from models.summary import count_gmacs, count_params, meta_model
from models.variants import architecture_to_dict
from pipelines.atomic import atomic_path, atomic_write_json
from pipelines.hashing import content_hash
from pipelines.registry import tracking
from pipelines.registry.tracking import Tags
from pipelines.training.loop import (
    SCORE,
    CheckpointClock,
    JobSpec,
    LoopState,
    build_worker,
    last_logged_epoch,
    log_pending,
    quiet_ray_train_reports,
    ray_metrics,
    restore_checkpoint,
    run_epoch,
    score_order,
    write_checkpoint,
)
from pipelines.training.recipe import ModelConfig, Recipe
from pipelines.training.schedules import first_scored_epoch

METHODS = ("width", "depth", "resolution", "compound")
# ASHA ranks trials by minival loss: on a small minival, top-1 takes few values and ties often (a tie never stops
# a trial); the loss is continuous. The winner is still chosen by top-1, the paper's criterion.
ASHA_METRIC, ASHA_MODE = "minival_loss", "min"
SEARCH_KIND, STUDY_KIND = "scaling-search", "scaling-study"


# --------------------------------------------------------------------------------------------------
# What the trials train (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """One trial: its label (the MLflow run's name), the model-section overrides it trains, what its run records."""

    label: str
    model: dict[str, Any]
    params: dict[str, Any]


def _multiplier(value: float) -> float:
    """A multiplier as it goes into a variant slug: 6 decimals are finer than any rounding of channels or blocks."""
    return round(value, 6)


def scaled_model(base: VariantSpec, depth: float, width: float, resolution: float) -> dict[str, Any]:
    """Model-section overrides for `base` scaled by these factors: explicit multipliers of its stage table (so phi
    and its coefficients no longer apply), its resolution rounded as compound scaling rounds it."""
    variant = base.base or base.name
    own_table = models.get_variant(variant).architecture == base.architecture
    # phi, its named set and its bases reset; of the sizes phi decides, the eval resolution follows the new one.
    resets = dict.fromkeys(("phi", "coefficients", *models.COEFFICIENT_KEYS, *models.PHI_SIZE_KEYS))
    return {
        "variant": variant,
        **resets,
        "width_mult": _multiplier(base.width_mult * width),
        "depth_mult": _multiplier(base.depth_mult * depth),
        "resolution": round_resolution(base.train_resolution * resolution),
        # A searched baseline's rows travel with every member scaled from it.
        "table": None if own_table else architecture_to_dict(models.ARCHITECTURES[base.architecture]),
    }


def point_label(cs: CoefficientSet) -> str:
    return f"alpha={cs.alpha:g} beta={cs.beta:g} gamma={cs.gamma:g}"


def search_points(
    alphas: Sequence[float], betas: Sequence[float], gammas: Sequence[float], tolerance: float
) -> list[CoefficientSet]:
    """The grid's points that meet alpha * beta^2 * gamma^2 within `tolerance` of 2, in grid order; ValueError for
    a value below 1 or a grid with no such point."""
    for name, values in (("alphas", alphas), ("betas", betas), ("gammas", gammas)):
        if not values:
            raise ValueError(f"{name} is empty: give at least one value")
        bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 1)]
        if bad:
            raise ValueError(f"{name}: every value must be a number >= 1 (scaling up makes nothing smaller), got {bad}")
    points = []
    for a, b, g in itertools.product(sorted(set(alphas)), sorted(set(betas)), sorted(set(gammas))):
        try:
            cs = check_coefficients("grid point", a, b, g, tolerance)
        except ValueError:
            continue  # off the constraint: not a point of the search
        points.append(CoefficientSet(point_label(cs), cs.alpha, cs.beta, cs.gamma))
    if not points:
        raise ValueError(
            f"no point of the grid alphas {sorted(set(alphas))} x betas {sorted(set(betas))} x gammas "
            f"{sorted(set(gammas))} has alpha * beta^2 * gamma^2 within {tolerance:.0%} of 2: widen "
            "the grid or the tolerance"
        )
    return points


def search_trials(base: VariantSpec, points: Sequence[CoefficientSet]) -> list[TrialPlan]:
    """One trial per point: the baseline scaled at phi = 1 (depth x alpha, width x beta, resolution x gamma)."""
    return [
        TrialPlan(
            cs.name,
            scaled_model(base, cs.alpha, cs.beta, cs.gamma),
            {"alpha": cs.alpha, "beta": cs.beta, "gamma": cs.gamma, "flops_factor": cs.flops_factor},
        )
        for cs in points
    ]


def method_factors(method: str, s: float, cs: CoefficientSet) -> tuple[float, float, float]:
    """(depth, width, resolution) factors of one scaling method at strength `s`: the factor itself for a single
    dimension, phi for compound (alpha^phi, beta^phi, gamma^phi)."""
    if method == "width":
        return 1.0, s, 1.0
    if method == "depth":
        return s, 1.0, 1.0
    if method == "resolution":
        return 1.0, 1.0, s
    if method == "compound":
        return cs.alpha**s, cs.beta**s, cs.gamma**s
    raise ValueError(f"unknown scaling method {method!r}; methods: {', '.join(METHODS)}")


def member_spec(overrides: Mapping[str, Any]) -> VariantSpec:
    """The spec of a model section's overrides (`scaled_model`'s), resolved as a recipe's model section is."""
    return ModelConfig.model_validate(dict(overrides)).spec()


# Counted GMACs by (block plan, eval resolution, classes): the strengths a fit tries mostly round to models it
# has counted already.
_GMACS: dict[tuple[Any, int, int], float] = {}


def member_gmacs(overrides: Mapping[str, Any], num_classes: int) -> float:
    """GMACs at the eval resolution of the model these overrides build (counted on the meta device: no memory)."""
    spec = member_spec(overrides)
    key = (models.plan_blocks(spec), spec.eval_resolution, num_classes)
    if key not in _GMACS:
        _GMACS[key] = count_gmacs(meta_model(spec, num_classes), spec.eval_resolution)
    return _GMACS[key]


def fit_to_gmacs(gmacs_at: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 30) -> float:
    """The strength s in [lo, hi] whose GMACs come closest to `target` (by ratio). `gmacs_at` is non-decreasing
    and a step function (channels, blocks and pixels are rounded): bisection brackets the step that crosses the
    target, then the nearer side of it wins."""
    if gmacs_at(hi) <= target:
        return hi
    below, above = lo, hi
    for _ in range(steps):
        mid = math.sqrt(below * above) if below > 0 else (below + above) / 2
        if gmacs_at(mid) < target:
            below = mid
        else:
            above = mid
    return min((below, above), key=lambda s: abs(math.log(gmacs_at(s) / target)))


def study_trials(
    base: VariantSpec, methods: Sequence[str], targets: Sequence[float], cs: CoefficientSet, num_classes: int
) -> list[TrialPlan]:
    """The baseline, then one member per method and FLOPs target, its strength fitted to the target's GMACs."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    if not targets or any(not (isinstance(t, (int, float)) and math.isfinite(t) and t > 1) for t in targets):
        raise ValueError(f"targets are FLOPs multiples of the baseline, each > 1 (e.g. [2, 4]), got {list(targets)}")
    base_model = scaled_model(base, 1.0, 1.0, 1.0)
    base_gmacs = member_gmacs(base_model, num_classes)
    plans = [TrialPlan("baseline", base_model, {"method": "baseline", "target": 1.0, "strength": 0.0})]
    for method, target in itertools.product(methods, sorted(set(targets))):

        def gmacs_at(s: float, method: str = method) -> float:
            return member_gmacs(scaled_model(base, *method_factors(method, s, cs)), num_classes)

        # Bounds: by the formulas, FLOPs grow at least linearly in each factor and by cs.flops_factor per unit of
        # phi; the fixed layers (stem, head) and the rounding (a stage keeps at least one block) need more room.
        hi = 4 * (math.log(target) / math.log(cs.flops_factor) if method == "compound" else target)
        s = fit_to_gmacs(gmacs_at, target * base_gmacs, 0.0 if method == "compound" else 1.0, hi)
        depth, width, resolution = method_factors(method, s, cs)
        plans.append(
            TrialPlan(
                f"{method} x{target:g}",
                scaled_model(base, depth, width, resolution),
                {
                    "method": method,
                    "target": float(target),
                    "strength": s,
                    "depth_factor": depth,
                    "width_factor": width,
                    "resolution_factor": resolution,
                },
            )
        )
    return plans


def experiment_key(kind: str, parts: Mapping[str, Any]) -> str:
    """Names one experiment by everything that decides its outcome (any change is another experiment)."""
    return f"{kind}-{content_hash(parts, 12)}"


def trial_recipe(recipe: Recipe, epochs: int) -> Recipe:
    """The recipe a trial trains with: `epochs` epochs, minival every epoch (the scheduler's signal), no early
    stopping of its own, one process."""
    return recipe.with_overrides(schedule={"epochs": epochs, "eval_every": 1, "patience": None}, ray={"num_workers": 1})


# --------------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)
# --------------------------------------------------------------------------------------------------


class TrialSetup(BaseModel):
    """What every trial of one experiment shares; sent to the trials as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: Recipe  # `trial_recipe`'s, before the trial's model overrides
    dataset_dir: str
    num_classes: int
    tracking_uri: str


# A trial's own folder (`trial_home`): its latest and its best epoch as checkpoint files (tensors and plain data,
# read back without unpickling), and its state as JSON: status and per-epoch rows.
LAST_CHECKPOINT, BEST_CHECKPOINT, TRIAL_STATE = "last.pt", "best.pt", "trial.json"
# A trial's status there: running (or failed, or cut off by a crash: a rerun goes on from `last.pt`), finished
# (all its epochs), stopped (by the scheduler: a rerun leaves it so).
RUNNING, FINISHED, STOPPED = "running", "finished", "stopped"
# What the scheduler counts: epochs done, which a resumed trial goes on counting (Tune's own iteration count
# starts again at 1 in a new experiment).
EPOCHS_DONE = "epochs_done"


def trial_home(experiment_dir: Path, label: str) -> Path:
    return experiment_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def read_trial_state(home: Path) -> dict[str, Any]:
    path = home / TRIAL_STATE
    return json.loads(path.read_text()) if path.exists() else {"status": RUNNING, "history": []}


def _trial_device() -> torch.device:
    import ray

    # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU: it is device 0 here.
    return torch.device("cuda:0") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def scaling_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Train one trial's model epoch by epoch from where its folder says it stopped, reporting minival to Tune
    after every epoch. Each epoch is kept before it is reported (checkpoint, best checkpoint, state; its row in
    the trial's MLflow run), so a trial the scheduler stops, or a crash, loses nothing that was reported."""
    from ray import tune

    quiet_ray_train_reports()  # Ray logs every report at INFO
    shared = TrialSetup.model_validate(setup)
    trial = config["trial"]
    home = Path(trial["home"])
    home.mkdir(parents=True, exist_ok=True)
    job = JobSpec(
        recipe=shared.recipe.with_overrides(model=trial["model"]),
        dataset_dir=shared.dataset_dir,
        num_classes=shared.num_classes,
        tracking_uri=shared.tracking_uri,
        run_id=trial["run_id"],
        micro_batch=trial["micro_batch"],
        accumulation=trial["accumulation"],
    )
    worker = build_worker(job, rank=0, world=1, device=_trial_device())
    last = home / LAST_CHECKPOINT
    state = restore_checkpoint(worker, last) if last.exists() else LoopState(history=[])
    logged_upto = last_logged_epoch(worker.client, job.run_id)
    never = CheckpointClock(None, None)  # no mid-epoch checkpoints: a trial's epochs are short
    epochs = job.recipe.schedule.epochs
    for epoch in range(state.epoch, epochs):
        # The training loop's own epoch; `trial_recipe` evaluates every epoch and never stops early.
        row = run_epoch(worker, state, epoch, never)
        for path in (last, *((home / BEST_CHECKPOINT,) if state.best_epoch == epoch else ())):
            with atomic_path(path) as tmp:
                write_checkpoint(worker, state, tmp)
        atomic_write_json(
            home / TRIAL_STATE, {"status": FINISHED if state.epoch == epochs else RUNNING, "history": state.history}
        )
        logged_upto = log_pending(worker.client, job.run_id, state.history, logged_upto)
        tune.report({**ray_metrics(row), EPOCHS_DONE: state.epoch})
    if read_trial_state(home)["status"] != FINISHED:  # resumed from a last epoch whose state was not yet written
        atomic_write_json(home / TRIAL_STATE, {"status": FINISHED, "history": state.history})


# --------------------------------------------------------------------------------------------------
# The experiment (driver side)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialOutcome:
    label: str
    params: dict[str, Any]
    run_id: str
    model: dict[str, Any]
    epochs_run: int
    best_epoch: int
    best_minival_top1: float
    best_minival_loss: float  # at the best epoch
    stopped_early: bool  # by the scheduler (trials have no early stopping of their own)
    error: str | None
    best_checkpoint: Path | None  # the best epoch's checkpoint file (None: none scored)
    history: tuple[dict[str, Any], ...] = ()  # the trial's per-epoch rows


def open_parent_run(
    c: Any, exp_id: str, kind: str, key: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """The experiment's parent run: found again by its key (a rerun after a crash goes on in it), else new."""
    return tracking.find_or_start_run(c, exp_id, {Tags.RUN_KIND: kind, Tags.SEARCH_KEY: key}, run_name, params, tags)


def _open_trial_run(c: Any, exp_id: str, parent: str, key: str, plan: TrialPlan, recipe: Recipe) -> str:
    """A trial's run, nested under the experiment's: found again by the experiment's key and its label, else new."""
    return tracking.find_or_start_run(
        c,
        exp_id,
        {Tags.SEARCH_KEY: key, Tags.TRIAL: plan.label},
        plan.label,
        {**plan.params, **recipe.with_overrides(model=plan.model).model_dump()},
        new_tags={Tags.PARENT_RUN: parent, Tags.VARIANT: member_spec(plan.model).name},
    )


def run_trials(
    key: str,
    plans: Sequence[TrialPlan],
    setup: TrialSetup,
    batches: Mapping[str, Any],
    storage: Path,
    c: Any,
    exp_id: str,
    parent: str,
    scheduler: Any = None,
    max_concurrent: int = 0,
) -> list[TrialOutcome]:
    """Every trial not already finished or stopped (by an earlier run of the same experiment: `storage`/`key`
    holds each trial's folder) as a Tune trial with one worker's resources, `max_concurrent` at most at once (0:
    as many as fit), under `scheduler` (None: each runs all its epochs). Returns one outcome per trial, in plan
    order, each trial's MLflow run ended (FINISHED, or FAILED with its error; a rerun goes on with it)."""
    from ray import tune

    recipe = setup.recipe
    experiment_dir = storage / key
    homes = {p.label: trial_home(experiment_dir, p.label) for p in plans}
    runs = {p.label: _open_trial_run(c, exp_id, parent, key, p, recipe) for p in plans}
    todo = [p for p in plans if read_trial_state(homes[p.label])["status"] == RUNNING]
    errors: dict[str, str] = {}
    if todo:
        resources = {"cpu": float(recipe.ray.cpus_per_worker), "gpu": 1.0 if recipe.ray.use_gpu else 0.0}
        trainable = tune.with_resources(tune.with_parameters(scaling_trial, setup=setup.model_dump()), resources)
        configs = [
            {
                "label": p.label,
                "model": p.model,
                "run_id": runs[p.label],
                "home": str(homes[p.label]),
                "micro_batch": batches[p.label].micro_batch,
                "accumulation": batches[p.label].accumulation,
            }
            for p in todo
        ]
        # Tune's own state goes to a folder of this attempt: it is never restored (its restore unpickles); the
        # trials' folders carry what a rerun needs. Its TensorBoard logger says at INFO, per trial, which config
        # values it leaves out (a searched table's rows): quiet.
        logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.WARNING)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                max_concurrent_trials=max_concurrent or None,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(experiment_dir),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=recipe.ray.max_failures),
            ),
        )
        grid = tuner.fit()
        # ResultGrid iterates through __getitem__ and __len__ (no __iter__), which mypy does not follow.
        for result in grid:  # type: ignore[attr-defined]
            label = result.config["trial"]["label"]
            if result.error is not None:
                errors[label] = str(result.error)
            elif read_trial_state(homes[label])["status"] == RUNNING:  # ended by the scheduler before its epochs
                state = read_trial_state(homes[label])
                atomic_write_json(homes[label] / TRIAL_STATE, {**state, "status": STOPPED})
    first = first_scored_epoch(recipe)
    outcomes = [_outcome(p, runs[p.label], homes[p.label], errors.get(p.label), first) for p in plans]
    for o in outcomes:
        c.set_tag(o.run_id, Tags.STOPPED_BY, "scheduler" if o.stopped_early else "none")
        c.set_tag(o.run_id, Tags.EPOCHS_RUN, str(o.epochs_run))
        c.set_terminated(o.run_id, "FAILED" if o.error else "FINISHED")
    return outcomes


def _trial_name(trial: Any) -> str:
    """Tune names a trial (and its folder) by its whole config otherwise: the trial's label, file-safe."""
    return f"{trial.trial_id}_{Path(trial.config['trial']['home']).name}"


def _outcome(plan: TrialPlan, run_id: str, home: Path, error: str | None, first_scored: int) -> TrialOutcome:
    state = read_trial_state(home)
    history = state["history"]
    scored = [r for r in history if math.isfinite(r.get(SCORE, math.nan)) and r["epoch"] >= first_scored]
    best = max(scored, key=lambda r: score_order(r[SCORE], r["epoch"]), default=None)
    best_file = home / BEST_CHECKPOINT
    return TrialOutcome(
        label=plan.label,
        params=plan.params,
        run_id=run_id,
        model=plan.model,
        epochs_run=len(history),
        best_epoch=int(best["epoch"]) if best else -1,
        best_minival_top1=float(best[SCORE]) if best else math.nan,
        best_minival_loss=float(best["minival_loss"]) if best else math.nan,
        stopped_early=state["status"] == STOPPED,
        error=error,
        best_checkpoint=best_file if best is not None and best_file.exists() else None,
        history=tuple(history),
    )


def asha(epochs: int, grace_period: int, reduction_factor: float) -> Any:
    """ASHA on minival loss, one rung per `reduction_factor` x epochs from `grace_period` up to `epochs`."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        metric=ASHA_METRIC,
        mode=ASHA_MODE,
        max_t=epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def pick_winner(outcomes: Sequence[TrialOutcome]) -> TrialOutcome:
    """The best minival top-1; among equals the lower minival loss at that epoch, then the earlier grid point
    (`score_order`)."""
    done = [(i, o) for i, o in enumerate(outcomes) if o.error is None and math.isfinite(o.best_minival_top1)]
    if not done:
        raise RuntimeError("no trial finished with a minival score")
    return max(done, key=lambda io: score_order((io[1].best_minival_top1, -io[1].best_minival_loss), io[0]))[1]


def load_trial_weights(outcome: TrialOutcome, num_classes: int) -> torch.nn.Module:
    """The trial's best checkpoint as a model in eval mode (its EMA weights when it kept an EMA)."""
    assert outcome.best_checkpoint is not None  # callers pass only trials that kept one
    saved = read_checkpoint(outcome.best_checkpoint)
    model = models.build_model(member_spec(outcome.model), num_classes)
    model.load_state_dict(scored_weights(saved))
    return model.eval()


def member_figures(outcome: TrialOutcome, num_classes: int) -> dict[str, Any]:
    """A trial's model's size, cost and resolutions (what the study's table and plot show)."""
    spec = member_spec(outcome.model)
    return {
        "variant": spec.name,
        "params": count_params(meta_model(spec, num_classes)),
        "gmacs": member_gmacs(outcome.model, num_classes),
        "train_resolution": spec.train_resolution,
        "eval_resolution": spec.eval_resolution,
        "depth_mult": spec.depth_mult,
        "width_mult": spec.width_mult,
    }
