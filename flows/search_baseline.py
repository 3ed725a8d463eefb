"""Prefect flow `search-baseline`: the papers' baseline search at proxy scale (V1: MnasNet's multi-objective
search that found B0; V2: the training-aware search that found V2-S), one Ray Tune experiment of short trainings
(the scaling search's machinery, `pipelines.search.trials.run_trials`).

Its deployment `search-baseline/default` is declared in `flows/deployments.py`; the defaults fit the demo data
on two CPU cores. Architectures are drawn from the space around the base table (`models.search_space`: per stage
block kind, kernel, expansion, repeats, SE), by random search or by evolution (rounds of mutations of the best
half so far, regularised evolution's mutation without its ageing); every one is trained at the proxy scale (the
base's compound multipliers at `proxy_phi`) as a nested MLflow run with ASHA stopping the weak ones; each is
scored by the paper's reward (V1: accuracy x (FLOPs / target)^w; V2: accuracy x step-time^w x params^v, step time
measured on the trial's machine), and the best is stored as a named baseline (`data/baselines/NAME.json`) that
`train-family` ("phi=2,baseline=NAME") and `search-scaling` (baseline "phi=-9,baseline=NAME") build.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

import models
from flows.failures import failed_run
from flows.scaling import check_trials, connect_and_check, failed_trials, finish_search, log_files
from flows.train_family import BAD_INPUT
from models import search_space
from models.variants import architecture_to_dict, compound_scale
from pipelines.dataset import latest_version
from pipelines.settings import data_layout
from pipelines.registry import compare, tracking
from pipelines.search import trials
from pipelines.training.baselines import baseline_path, save_baseline
from pipelines.training.job import validate_job
from pipelines.training.recipe import load_recipe
from pipelines.registry.tracking import Tags

ARTIFACT = "baseline-search"
KIND = "baseline-search"
# The base tables (and the variant each trial is built as: its resolutions, rates, crop) of the two searches.
SPACES = {"v1": ("v1_b0", "efficientnet_b0"), "v2": ("v2_s", "efficientnet_v2_s")}
ALGORITHMS = ("random", "evolution")


def proxy_model(variant: str, table: models.Architecture, proxy_phi: float) -> dict[str, Any]:
    """Model-section overrides of a table at the proxy scale: the base's compound multipliers at `proxy_phi`
    (the paper's coefficients), at its resolution scaled alike."""
    base = models.get_variant(variant)
    scaled = compound_scale(proxy_phi, base_resolution=base.train_resolution)
    return {"variant": variant, "phi": None, "width_mult": round(scaled.width_mult, 6),
            "depth_mult": round(scaled.depth_mult, 6), "resolution": scaled.resolution,
            "table": architecture_to_dict(table)}


def sample_architectures(space: search_space.SearchSpace, n: int, seed: int) -> list[models.Architecture]:
    """`n` distinct points, drawn uniformly (random search)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n):
        arch = space.sample(rng)
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
        if len(out) == n:
            break
    return out


def rewards(rows: list[dict[str, Any]], kind: str, target_gmacs: float) -> list[float | None]:
    """Each finished trial's reward (None for a failed one): V1 on its GMACs against the target, V2 on its step
    time (seconds per image, relative to the trials' median) and its parameters."""
    done = [i for i, r in enumerate(rows) if r["status"] == compare.TRAINED]
    relative = search_space.normalised_step_times([rows[i]["seconds_per_image"] for i in done]) if done else []
    step = dict(zip(done, relative))
    out: list[float | None] = []
    for i, r in enumerate(rows):
        if i not in step:
            out.append(None)
        elif kind == "v1":
            out.append(search_space.v1_reward(r["best_minival_top1"] / 100, r["gmacs"], target_gmacs))
        else:
            out.append(search_space.v2_reward(r["best_minival_top1"] / 100, step[i], r["params"]))
    return out


@flow(name="search-baseline", log_prints=True)
def search_baseline(
    space: str = "v1", algorithm: str = "random", samples: int = 8, rounds: int = 2, reward: str = "",
    target_gmacs: float = 0.0, proxy_phi: float = -9, repeat_range: int = 1, recipe: str = "demo",
    dataset_dir: str | None = None, data_dir: str | None = None, overrides: dict | None = None, epochs: int = 4,
    grace_period: int = 1, reduction_factor: float = 2.0, max_concurrent_trials: int = 0, seed: int = 0,
    name: str = "searched-baseline", replace: bool = False,
) -> dict:
    """Search a baseline table at proxy scale and store the best under `name`. Returns it and one row per trial.

    Args:
        space: "v1" (the space around B0, MBConv and Fused-MBConv per stage) or "v2" (around V2-S).
        algorithm: "random" (random search), or "evolution": `rounds` rounds, each mutating the best half of
            the trials so far (one stage redrawn: regularised evolution's mutation, by rounds, without ageing).
        samples: Architectures per round (random: in all).
        rounds: Rounds of evolution (random search: ignored).
        reward: "v1" (accuracy x (GMACs / target)^-0.07) or "v2" (accuracy x step-time^-0.07 x params^-0.05);
            empty for the space's own.
        target_gmacs: The V1 reward's target; 0 for the base table's own GMACs at the proxy scale.
        proxy_phi: Every table trains at the base's compound multipliers (the paper's coefficients) at this phi.
        repeat_range: Each stage's repeats within this many of the base's.
        recipe: How each trial trains (a recipe name or YAML path); one process per trial.
        dataset_dir: A staged dataset version directory; empty for the latest one staged in the data directory.
        data_dir: The data directory; empty for EFFNET_DATA_DIR or ./data.
        overrides: Recipe fields to change, by section.
        epochs: Epochs of each trial (ASHA's max_t).
        grace_period: Epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the best 1/reduction_factor of the trials at each rung (> 1).
        max_concurrent_trials: Trials at once; 0 for as many as the Ray cluster's resources hold.
        seed: The sampling's seed.
        name: The name the best table is stored under (then "phi=2,baseline=<name>").
        replace: Replace a stored baseline of that name (else a name in use is refused before anything trains).
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    try:
        if space not in SPACES or algorithm not in ALGORITHMS or (reward or space) not in SPACES:
            raise ValueError(f"space and reward must be among {', '.join(SPACES)}, algorithm among "
                             f"{', '.join(ALGORITHMS)}; got space {space!r}, reward {reward!r}, algorithm "
                             f"{algorithm!r}")
        if samples < 1 or rounds < 1 or epochs < 1 or not 1 <= grace_period <= epochs or not reduction_factor > 1:
            raise ValueError(f"need samples ({samples}), rounds ({rounds}) >= 1 and 1 <= grace_period "
                             f"({grace_period}) <= epochs ({epochs}), reduction_factor ({reduction_factor}) > 1")
        if baseline_path(layout, name).exists() and not replace:
            raise ValueError(f"a baseline named {name!r} exists ({baseline_path(layout, name)}); choose another "
                             "name or pass replace=true")
        table_key, variant = SPACES[space]
        base_table = models.ARCHITECTURES[table_key]
        the_space = search_space.space_around(base_table, repeat_range)
        trial_recipe = trials.trial_recipe(load_recipe(recipe).with_overrides(**(overrides or {})), epochs)
        dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
        _, manifest, _ = validate_job(trial_recipe.with_overrides(model=proxy_model(variant, base_table, proxy_phi)),
                                      dataset)
        connect_and_check(layout, trial_recipe)
    except BAD_INPUT as exc:
        return failed_run(logger, exc)  # type: ignore[return-value]
    kind = reward or space
    num_classes = manifest["num_classes"]
    target = target_gmacs or trials.member_gmacs(proxy_model(variant, base_table, proxy_phi), num_classes)
    c = tracking.client(layout.tracking_uri)
    exp_id = tracking.experiment_id(c, layout.artifact_root)
    from prefect.runtime import flow_run

    title = f"search-baseline {flow_run.name}: {space} space, {algorithm}, on {dataset.name}"
    setup = trials.TrialSetup(recipe=trial_recipe, dataset_dir=str(dataset), num_classes=num_classes,
                               tracking_uri=layout.tracking_uri)
    rows: list[dict[str, Any]] = []
    tables: dict[str, models.Architecture] = {}
    parent = None
    generations = rounds if algorithm == "evolution" else 1
    rng = random.Random(seed)
    for generation in range(generations):
        if generation == 0:
            batch = sample_architectures(the_space, samples, seed)
        else:  # evolution: mutate the best half so far, one stage redrawn each
            ranked = sorted((r for r in rows if r.get("reward") is not None), key=lambda r: -r["reward"])
            parents = [tables[r["trial"]] for r in ranked[: max(1, samples // 2)]] or list(tables.values())
            batch = [the_space.mutate(rng.choice(parents), rng) for _ in range(samples)]
            batch = [a for a in dict.fromkeys(batch) if search_space.architecture_name(a) not in
                     {search_space.architecture_name(t) for t in tables.values()}]
        plans = [trials.TrialPlan(f"{search_space.architecture_name(a)}", proxy_model(variant, a, proxy_phi),
                                   {"rows": " | ".join(search_space.describe(a)), "generation": generation})
                 for a in batch]
        if not plans:
            continue
        tables.update({p.label: a for p, a in zip(plans, batch)})
        key = trials.experiment_key(KIND, {"space": space, "plans": [p.label for p in plans], "epochs": epochs,
                                            "recipe": trial_recipe.model_dump(), "dataset": manifest["version"],
                                            "asha": [grace_period, reduction_factor], "proxy": proxy_phi})
        if parent is None:
            parent = trials.open_parent_run(
                c, exp_id, KIND, key, title,
                {"space": space, "algorithm": algorithm, "samples": samples, "rounds": rounds, "reward": kind,
                 "proxy_phi": proxy_phi, "epochs": epochs, "dataset": dataset.name, "name": name},
                {Tags.FLOW_RUN: str(flow_run.id), Tags.DATASET_VERSION: manifest["version"]})
        try:
            batches = check_trials(plans, trial_recipe, dataset)
            outcomes = trials.run_trials(key, plans, setup, batches, layout.ray_storage / "tune", c, exp_id, parent,
                                          scheduler=trials.asha(epochs, grace_period, reduction_factor),
                                          max_concurrent=max_concurrent_trials)
        except BaseException:
            c.set_terminated(parent, "KILLED")
            raise
        rows += [_row(o, num_classes) for o in outcomes]
        for r, value in zip(rows, rewards(rows, kind, target)):
            r["reward"] = value
    for r in rows:  # each trial's figures on its run: what MLflow's compare view plots
        if r.get("reward") is not None:
            tracking.log_metrics(c, r["run_id"], {"reward": r["reward"], "gmacs": r["gmacs"],
                                                  "model_params": r["params"],
                                                  "seconds_per_image": r["seconds_per_image"]},
                                 step=max(r["best_epoch"], 0))
    print("\n" + compare.to_text(rows, compare.BASELINE_COLUMNS))
    log_files(c, parent, lambda d: compare.write_baseline_search(rows, d, title), "search")
    problem = failed_trials(rows)
    if problem:
        c.set_terminated(parent, "FAILED")
        return failed_run(logger, RuntimeError(problem))  # type: ignore[return-value]
    best = max(rows, key=lambda r: (r["reward"], -rows.index(r)))
    path = save_baseline(layout, name, tables[best["trial"]], source={
        "search_run": parent, "flow_run": str(flow_run.id), "space": space, "reward": kind,
        "reward_value": best["reward"], "minival_top1": best["best_minival_top1"], "dataset": manifest["version"]})
    summary = (f"best {best['trial']} (reward {best['reward']:.4f}, minival top-1 {best['best_minival_top1']:.2f}, "
               f"{best['gmacs']:.4f} GMACs): stored as baseline {name!r} ({path}); rows: {best['rows']}")
    finish_search(c, parent, path, "baselines", {"baseline.name": name, "baseline.trial": best["trial"],
                                                 "baseline.reward": f"{best['reward']:.4f}"}, logger, summary)
    create_markdown_artifact(key=ARTIFACT, description="The baseline search's trials (MLflow: the parent run's "
                             "search/)", markdown=f"## {title}\n\n{summary}\n\n"
                             f"{compare.to_markdown(rows, compare.BASELINE_COLUMNS)}")
    return {"baseline": name, "trial": best["trial"], "reward": best["reward"], "path": str(path),
            "parent_run": parent, "trials": rows}


def _row(o: trials.TrialOutcome, num_classes: int) -> dict[str, Any]:
    figures = trials.member_figures(o, num_classes)
    # Training speed after the first epoch (which pays the start-up), or the first alone.
    speeds = [r["images_per_s"] for r in (o.history[1:] or o.history) if r.get("images_per_s")]
    status = {"status": compare.TRAINED} if o.error is None else {"status": "failed",
                                                                   "reason": o.error.strip().splitlines()[0]}
    return {"trial": o.label, **o.params, **figures, "epochs_run": o.epochs_run, "best_epoch": o.best_epoch,
            "stopped_early": "yes" if o.stopped_early else "no", "best_minival_top1": o.best_minival_top1,
            "seconds_per_image": 1 / statistics.median(speeds) if speeds else math.nan, "run_id": o.run_id,
            **status}
