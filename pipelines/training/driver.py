"""One job's driver process, as a Ray job runs it: `python -m pipelines.training.driver --recipe FILE --data DIR
--result-file FILE [--ray-address A] [--tag K=V ...]` (the entrypoint `submit` gives the Jobs API).

It trains the job (`job.run_training`) and writes its result as JSON, whole or not at all; `effnet train` runs
the same `train_and_report` in its own process. Bad input is one line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.atomic import atomic_write_json
from pipelines.dataset import BAD_INPUT
from pipelines.settings import DataLayout, data_layout

if TYPE_CHECKING:
    from pipelines.training.job import TrainResult
    from pipelines.training.recipe import Recipe
# The job's modules are imported where used: after `use_stack`, which sets what Ray and MLflow read at import.


def train_and_report(
    recipe: Recipe,
    dataset_dir: str | Path,
    layout: DataLayout,
    ray_address: str | None = None,
    tags: Mapping[str, str] | None = None,
    result_file: str | None = None,
) -> TrainResult:
    """A named coefficient set or baseline resolved, the job checked before Ray starts, trained; its result
    written to `result_file` (else printed as JSON), each epoch's line on stderr."""
    from pipelines.training.baselines import resolve_named
    from pipelines.training.job import run_training, validate_job

    recipe = resolve_named(recipe, layout)
    validate_job(recipe, dataset_dir)  # a bad variant or dataset fails here, before Ray starts
    result = run_training(
        recipe,
        dataset_dir,
        layout,
        ray_address=ray_address,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        tags=dict(tags or {}),
    )
    if result_file:
        atomic_write_json(result_file, asdict(result))
    else:
        print(json.dumps(asdict(result), indent=1))
    return result


def key_value(flag: str, text: str) -> tuple[str, str]:
    """`KEY=VALUE` of a repeatable flag; ValueError naming the flag otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.training.driver",
        description="Train one job of a recipe file on a staged dataset version.",
    )
    p.add_argument("--data-dir", default=None, help="the data directory (default $EFFNET_DATA_DIR or ./data)")
    p.add_argument("--recipe", required=True, help="the job's whole recipe, a YAML or JSON file")
    p.add_argument("--data", required=True, help="a staged dataset version directory")
    add_job_arguments(p)
    return p


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of one job's run (the driver's and `effnet train`/`finetune`'s): where, tagged how, reported where."""
    p.add_argument(
        "--ray-address",
        help="the Ray cluster to join (default: $RAY_ADDRESS, the stack's head, or a "
        "local instance of this process's own)",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tag for the MLflow run (repeatable), e.g. the Prefect flow run that submitted the job",
    )
    p.add_argument(
        "--result-file", help="write the result (JSON) to this file, whole or not at all, instead of to stdout"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines import watchdog

    watchdog.start()  # the servers this process starts (a local Ray) stop if it is killed
    try:
        layout = data_layout(args.data_dir)
        layout.use_stack(check=True)
        from pipelines.training.recipe import load_recipe

        train_and_report(
            load_recipe(args.recipe),
            args.data,
            layout,
            args.ray_address,
            dict(key_value("--tag", t) for t in args.tag),
            args.result_file,
        )
        return 0
    except BAD_INPUT as exc:
        print(f"effnet train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
