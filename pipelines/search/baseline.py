"""The papers' baseline search at proxy scale (V1: MnasNet's multi-objective search that found B0; V2: the
training-aware search that found V2-S), in rounds of Tune trials (the scaling search's machinery,
`pipelines.search.trials.run_trials`).

Architectures are drawn from the space around the base table (`models.search_space`: per stage block kind,
kernel, expansion, repeats, SE), by random search or by evolution (rounds of mutations of the best half so far,
regularised evolution's mutation without its ageing, `next_batch`); every one is trained at the proxy scale (the
base's compound multipliers at `proxy_phi`, `proxy_model`) and scored by the paper's reward (`rewards`: V1:
accuracy x (FLOPs / target)^w; V2: accuracy x step-time^w x params^v, step time measured on the trial's machine).
`run_rounds` runs the rounds under one MLflow parent run; the best table is stored as a named baseline.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
from models import search_space
from models.variants import architecture_to_dict, compound_scale
from pipelines.dataset import Manifest, latest_version
from pipelines.registry import tracking
from pipelines.registry.compare import TRAINED
from pipelines.search import experiment as ex
from pipelines.search import trials
from pipelines.settings import DataLayout
from pipelines.training.baselines import baseline_path, save_baseline
from pipelines.training.job import validate_job
from pipelines.training.recipe import Recipe, load_recipe

KIND = "baseline-search"
# The base tables (and the variant each trial is built as: its resolutions, rates, crop) of the two searches.
SPACES = {"v1": ("v1_b0", "efficientnet_b0"), "v2": ("v2_s", "efficientnet_v2_s")}
ALGORITHMS = ("random", "evolution")


def check_search(
    space: str,
    algorithm: str,
    reward: str,
    samples: int,
    rounds: int,
    epochs: int,
    grace_period: int,
    reduction_factor: float,
) -> None:
    """The search's own parameters; ValueError naming them."""
    if space not in SPACES or algorithm not in ALGORITHMS or (reward or space) not in SPACES:
        raise ValueError(
            f"space and reward must be among {', '.join(SPACES)}, algorithm among "
            f"{', '.join(ALGORITHMS)}; got space {space!r}, reward {reward!r}, algorithm "
            f"{algorithm!r}"
        )
    if samples < 1 or rounds < 1 or epochs < 1 or not 1 <= grace_period <= epochs or not reduction_factor > 1:
        raise ValueError(
            f"need samples ({samples}), rounds ({rounds}) >= 1 and 1 <= grace_period "
            f"({grace_period}) <= epochs ({epochs}), reduction_factor ({reduction_factor}) > 1"
        )


def check_name(layout: DataLayout, name: str, replace: bool) -> None:
    if baseline_path(layout, name).exists() and not replace:
        raise ValueError(
            f"a baseline named {name!r} exists ({baseline_path(layout, name)}); choose another "
            "name or pass replace=true"
        )


def proxy_model(variant: str, table: models.Architecture, proxy_phi: float) -> dict[str, Any]:
    """Model-section overrides of a table at the proxy scale: the base's compound multipliers at `proxy_phi`
    (the paper's coefficients), at its resolution scaled alike."""
    base = models.get_variant(variant)
    scaled = compound_scale(proxy_phi, base_resolution=base.train_resolution)
    return {
        "variant": variant,
        "phi": None,
        "width_mult": round(scaled.width_mult, 6),
        "depth_mult": round(scaled.depth_mult, 6),
        "resolution": scaled.resolution,
        "table": architecture_to_dict(table),
    }


@dataclass
class Search:
    """A baseline search checked and ready: its space, the trials' recipe, dataset and settings; the rows and
    tables of the trials so far (`run_rounds` fills them)."""

    space: str
    algorithm: str
    the_space: search_space.SearchSpace
    variant: str
    base_table: models.Architecture
    recipe: Recipe
    dataset: Path
    manifest: Manifest
    reward: str
    proxy_phi: float
    samples: int
    rounds: int
    epochs: int
    asha: tuple[int, float]
    max_concurrent: int
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, models.Architecture] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes


def plan_search(
    layout: DataLayout,
    space: str,
    algorithm: str,
    reward: str,
    samples: int,
    rounds: int,
    proxy_phi: float,
    repeat_range: int,
    recipe: str,
    overrides: dict | None,
    dataset_dir: str | None,
    epochs: int,
    asha: tuple[int, float],
    max_concurrent: int,
    seed: int,
    name: str,
    replace: bool,
) -> Search:
    """Everything checked before anything trains (parameters, name, recipe, dataset, the base table's proxy
    model, the cluster); ValueError naming the first problem."""
    check_search(space, algorithm, reward, samples, rounds, epochs, *asha)
    check_name(layout, name, replace)
    table_key, variant = SPACES[space]
    base_table = models.ARCHITECTURES[table_key]
    the_space = search_space.space_around(base_table, repeat_range)
    trial_recipe = trials.trial_recipe(load_recipe(recipe).with_overrides(**(overrides or {})), epochs)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    _, manifest, _ = validate_job(
        trial_recipe.with_overrides(model=proxy_model(variant, base_table, proxy_phi)), dataset
    )
    ex.connect_and_check(layout, trial_recipe)
    return Search(
        space,
        algorithm,
        the_space,
        variant,
        base_table,
        trial_recipe,
        dataset,
        manifest,
        reward or space,
        proxy_phi,
        samples,
        rounds,
        epochs,
        asha,
        max_concurrent,
        seed,
    )


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


def next_batch(s: Search, generation: int, rng: random.Random) -> list[models.Architecture]:
    """The round's tables: a uniform sample first; then (evolution) mutations of the best half so far, one stage
    redrawn each, none trained before."""
    if generation == 0:
        return sample_architectures(s.the_space, s.samples, s.seed)
    ranked = sorted((r for r in s.rows if r.get("reward") is not None), key=lambda r: -r["reward"])
    parents = [s.tables[r["trial"]] for r in ranked[: max(1, s.samples // 2)]] or list(s.tables.values())
    batch = [s.the_space.mutate(rng.choice(parents), rng) for _ in range(s.samples)]
    trained = {search_space.architecture_name(t) for t in s.tables.values()}
    return [a for a in dict.fromkeys(batch) if search_space.architecture_name(a) not in trained]


def rewards(rows: list[dict[str, Any]], kind: str, target_gmacs: float) -> list[float | None]:
    """Each finished trial's reward (None for a failed one): V1 on its GMACs against the target, V2 on its step
    time (seconds per image, relative to the trials' median) and its parameters."""
    done = [i for i, r in enumerate(rows) if r["status"] == TRAINED]
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


def baseline_row(o: trials.TrialOutcome, num_classes: int) -> dict[str, Any]:
    """A trial's row: a scaling trial's (`experiment.trial_row`) and its training speed."""
    # Training speed after the first epoch (which pays the start-up), or the first alone.
    speeds = [r["images_per_s"] for r in (o.history[1:] or o.history) if r.get("images_per_s")]
    seconds_per_image = 1 / statistics.median(speeds) if speeds else math.nan
    return {**ex.trial_row(o, trials.member_figures(o, num_classes)), "seconds_per_image": seconds_per_image}


def run_rounds(s: Search, layout: DataLayout, c: Any, exp_id: str, open_parent: Any, target: float) -> str:
    """Every round's tables trained as Tune trials (ASHA stopping the weak), their rows scored; the parent run
    (opened by `open_parent(key)` at the first round, recorded KILLED if a round is interrupted). `target`: the V1
    reward's GMACs (0: the base table's own at the proxy scale)."""
    target_gmacs = target or trials.member_gmacs(proxy_model(s.variant, s.base_table, s.proxy_phi), s.num_classes)
    rng = random.Random(s.seed)
    parent = None
    for generation in range(s.rounds if s.algorithm == "evolution" else 1):
        batch = next_batch(s, generation, rng)
        plans = [
            trials.TrialPlan(
                search_space.architecture_name(a),
                proxy_model(s.variant, a, s.proxy_phi),
                {"rows": " | ".join(search_space.describe(a)), "generation": generation},
            )
            for a in batch
        ]
        if not plans:
            continue
        s.tables.update({p.label: a for p, a in zip(plans, batch)})
        key = trials.experiment_key(
            KIND,
            {
                "space": s.space,
                "plans": [p.label for p in plans],
                "epochs": s.epochs,
                "recipe": s.recipe.model_dump(),
                "dataset": s.manifest.version,
                "asha": list(s.asha),
                "proxy": s.proxy_phi,
            },
        )
        parent = parent or open_parent(key)
        setup = trials.TrialSetup(
            recipe=s.recipe, dataset_dir=str(s.dataset), num_classes=s.num_classes, tracking_uri=layout.tracking_uri
        )
        batches = ex.killed_on_interrupt(c, parent, ex.check_trials, plans, s.recipe, s.dataset)
        outcomes = ex.killed_on_interrupt(
            c,
            parent,
            trials.run_trials,
            key,
            plans,
            setup,
            batches,
            layout.ray_storage / "tune",
            c,
            exp_id,
            parent,
            scheduler=trials.asha(s.epochs, *s.asha),
            max_concurrent=s.max_concurrent,
        )
        s.rows += [baseline_row(o, s.num_classes) for o in outcomes]
        for r, value in zip(s.rows, rewards(s.rows, s.reward, target_gmacs)):
            r["reward"] = value
    assert parent is not None  # the first round always has plans: a uniform sample of at least one table
    return parent


def log_trial_figures(c: Any, rows: list[dict[str, Any]]) -> None:
    """Each scored trial's figures on its run: what MLflow's compare view plots."""
    for r in rows:
        if r.get("reward") is not None:
            tracking.log_metrics(
                c,
                r["run_id"],
                {
                    "reward": r["reward"],
                    "gmacs": r["gmacs"],
                    "model_params": r["params"],
                    "seconds_per_image": r["seconds_per_image"],
                },
                step=max(r["best_epoch"], 0),
            )


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest reward, the earlier trial of equals."""
    return max(rows, key=lambda r: (r["reward"], -rows.index(r)))


def store_best(
    c: Any, layout: DataLayout, s: Search, parent: str, name: str, source: dict[str, Any]
) -> tuple[dict[str, Any], Path, str]:
    """The best trial's table stored as the named baseline and on the parent run, which ends; its row, the file
    and a one-line summary."""
    best = best_row(s.rows)
    path = save_baseline(
        layout,
        name,
        s.tables[best["trial"]],
        source={
            **source,
            "reward_value": best["reward"],
            "minival_top1": best["best_minival_top1"],
            "dataset": s.manifest.version,
        },
    )
    summary = (
        f"best {best['trial']} (reward {best['reward']:.4f}, minival top-1 {best['best_minival_top1']:.2f}, "
        f"{best['gmacs']:.4f} GMACs): stored as baseline {name!r} ({path}); rows: {best['rows']}"
    )
    ex.finish_search(
        c,
        parent,
        path,
        "baselines",
        {"baseline.name": name, "baseline.trial": best["trial"], "baseline.reward": f"{best['reward']:.4f}"},
    )
    return best, path, summary
