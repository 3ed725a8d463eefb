"""Prefect flow `search-baseline`: the papers' baseline search at proxy scale (V1: MnasNet's multi-objective
search that found B0; V2: the training-aware search that found V2-S), one Ray Tune experiment of short trainings
(the scaling search's machinery; the search itself in `pipelines.search.baseline`).

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

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.failures import RunFailed, one_line_failures
from pipelines.registry import compare
from pipelines.search import baseline as bs
from pipelines.search import experiment as ex
from pipelines.settings import data_layout
from pipelines.training.family import DEMO_PHI

ARTIFACT = "baseline-search"


@flow(name="search-baseline", log_prints=True)
@one_line_failures
def search_baseline(
    space: str = "v1", algorithm: str = "random", samples: int = 8, rounds: int = 2, reward: str = "",
    target_gmacs: float = 0.0, proxy_phi: float = DEMO_PHI, repeat_range: int = 1, recipe: str = "demo",
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
    layout = data_layout(data_dir)
    s = bs.plan_search(layout, space, algorithm, reward, samples, rounds, proxy_phi, repeat_range, recipe, overrides,
                       dataset_dir, epochs, (grace_period, reduction_factor), max_concurrent_trials, seed, name,
                       replace)
    title = f"search-baseline {flow_run.name}: {space} space, {algorithm}, on {s.dataset.name}"
    params = {"space": space, "algorithm": algorithm, "samples": samples, "rounds": rounds, "reward": s.reward,
              "proxy_phi": proxy_phi, "epochs": epochs, "dataset": s.dataset.name, "name": name}
    c, exp_id = ex.tracking_client(layout)
    parent = bs.run_rounds(s, layout, c, exp_id, lambda key: ex.open_parent_in(
        c, exp_id, bs.KIND, key, title, params, s.manifest.version, str(flow_run.id)), target_gmacs)
    bs.log_trial_figures(c, s.rows)
    ex.report(c, parent, s.rows, title, compare.BASELINE_COLUMNS,
              lambda d: compare.write_baseline_search(s.rows, d, title), "search")
    if (problem := ex.failed_trials(s.rows)):
        c.set_terminated(parent, "FAILED")
        raise RunFailed(problem)
    best, path, summary = bs.store_best(c, layout, s, parent, name, source={
        "search_run": parent, "flow_run": str(flow_run.id), "space": space, "reward": s.reward})
    get_run_logger().info("%s", summary)
    create_markdown_artifact(key=ARTIFACT, description="The baseline search's trials (MLflow: the parent run's "
                             "search/)", markdown=f"## {title}\n\n{summary}\n\n"
                             f"{compare.to_markdown(s.rows, compare.BASELINE_COLUMNS)}")
    return {"baseline": name, "trial": best["trial"], "reward": best["reward"], "path": str(path),
            "parent_run": parent, "trials": s.rows}
