"""`effnet`: the command line. Each subcommand is a thin wrapper over a flow or a pipeline function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from pipelines.settings import DATA_DIR_ENV, data_layout
from pipelines.staging import StagingError


def _prefect_home(data_dir: str | None) -> None:
    """Keep Prefect's local state (ephemeral server database, logs) inside the data directory.

    Must run before prefect is imported; an explicit PREFECT_HOME or PREFECT_API_URL wins.
    """
    layout = data_layout(data_dir).ensure()
    os.environ.setdefault("PREFECT_HOME", str(layout.root / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here, and none wanted


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo_data import write_demo_imagenet

    s = write_demo_imagenet(args.out, num_classes=args.classes, train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, seed=args.seed)
    print(f"{'reused' if s.reused else 'wrote'} demo ImageNet in {args.out}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if progress:
        # The bar replaces the per-task log lines on the terminal; warnings still show, and the Prefect API
        # (the UI) still gets every line.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    _prefect_home(args.data_dir)
    from flows.stage_imagenet import stage_imagenet, stage_params
    from pipelines import staging

    try:
        minival = float(args.minival)
    except ValueError:
        raise ValueError(f"--minival must be a number of images or a fraction < 1, got {args.minival!r}") from None
    knobs = dict(tiers=args.tiers, shard_size=args.shard_size, minival=minival, seed=args.seed,
                 jpeg_quality=args.jpeg_quality, max_bad_fraction=args.max_bad_fraction, formats=args.formats)
    # Checks the parameters and the source (a bad path or archive fails here, in one line) and returns a
    # finished version at once, without starting Prefect.
    base_version = None if args.full else args.base_version
    done = staging.find_finished(args.source, args.out, stage_params(**knobs), base_version)
    if done is not None:
        print(f"already staged: {done.name}", file=sys.stderr)
        staging.mark_latest(done.parent, done.name)
        print(done)
        return 0
    dest = stage_imagenet(args.source, args.out, **knobs, base_version=base_version, workers=args.workers,
                          progress_bar=progress, processes=args.processes)
    print(dest)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import load_recipe, parse_family_member
    from pipelines.train import run_training, validate_job

    recipe = load_recipe(args.recipe)
    sections: dict = {}
    if args.variant:
        sections["model"] = parse_family_member(args.variant)
    if args.epochs:
        sections["schedule"] = {"epochs": args.epochs}
    if args.workers:
        sections["ray"] = {"num_workers": args.workers}
    recipe = recipe.with_overrides(**sections) if sections else recipe
    validate_job(recipe, args.data)  # a bad variant or dataset fails here, before Ray starts
    result = run_training(recipe, args.data, data_layout(args.data_dir))
    print(json.dumps(result.__dict__, indent=1))
    return 0


def cmd_family(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.train_family import train_family

    overrides = {"schedule": {"epochs": args.epochs}} if args.epochs else None
    train_family(args.variants, recipe=args.recipe, dataset_dir=args.data, data_dir=args.data_dir,
                 overrides=overrides)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.demo import demo

    layout = data_layout(args.data_dir)
    demo(data_dir=str(layout.root), epochs=args.epochs)
    print(f"\nResults are in {layout.root}:\n"
          f"  demo archives   {layout.demo_archives}\n  staged shards   {layout.datasets}\n"
          f"  MLflow store    {layout.mlflow_db}\n  Ray storage     {layout.ray_storage}\n"
          f"Open the MLflow UI with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {layout.tracking_uri} "
          f"--default-artifact-root {layout.mlflow_artifacts} --port 5000\n"
          f"then browse http://127.0.0.1:5000 (experiment 'efficientnet-family', Models tab for the registry).")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.deployments import serve_all

    serve_all(args.deployments or None)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.summary import family_table, format_table

    rows = family_table(args.names or None)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effnet", description="Train the EfficientNet family on ImageNet.")
    p.add_argument("--data-dir", default=None,
                   help=f"where archives, shards, MLflow and Ray state live (default ${DATA_DIR_ENV} or ./data)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-data", help="write a small ImageNet in the ILSVRC2012 archive format")
    s.add_argument("out")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--train-per-class", type=int, default=40)
    s.add_argument("--val-per-class", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo_data)

    s = sub.add_parser("stage", help="stage ILSVRC2012 (archives, tree or Kaggle layout) into shards")
    s.add_argument("--source", required=True)
    s.add_argument("--out", required=True, help="datasets root; the version goes in a sub-folder")
    s.add_argument("--tiers", type=int, nargs="+", default=None)
    s.add_argument("--shard-size", type=int, default=1024)
    s.add_argument("--minival", default="25000", help="images held out of train, or a fraction < 1")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jpeg-quality", type=int, default=90)
    s.add_argument("--max-bad-fraction", type=float, default=0.01)
    s.add_argument("--formats", nargs="*", default=[], choices=["ffcv", "dali"],
                   help="extra files beside the WebDataset shards: FFCV .beton per tier, DALI shard indexes "
                        "(either makes the stage a full one, not incremental)")
    growth = s.add_mutually_exclusive_group()
    growth.add_argument("--base-version", default="auto",
                        help="version to add new images to: 'auto' (the latest one the source grew from) or a name")
    growth.add_argument("--full", action="store_true", help="stage every image afresh, not on top of a version")
    s.add_argument("--workers", type=int, default=None, help="images decoded at once (default: all cores)")
    s.add_argument("--processes", action="store_true",
                   help="decode in worker processes rather than threads (scales further on many cores)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with ETA on stderr (default: when stderr is a terminal)")
    s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("train", help="train one variant on Ray, early-stop on minival, register in MLflow")
    s.add_argument("--variant", help="e.g. efficientnet_b0, or phi=-3 for B0 compound-scaled")
    s.add_argument("--recipe", default="v1")
    s.add_argument("--data", required=True, help="a staged dataset version directory")
    s.add_argument("--epochs", type=int)
    s.add_argument("--workers", type=int)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("family", help="train several variants (the train-family flow)")
    s.add_argument("variants", nargs="+")
    s.add_argument("--recipe", default="v1")
    s.add_argument("--data", default=None, help="dataset version directory (default: latest staged)")
    s.add_argument("--epochs", type=int)
    s.set_defaults(fn=cmd_family)

    s = sub.add_parser("demo", help="the main job end to end on the built-in demo dataset")
    s.add_argument("--epochs", type=int)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("serve", help="register the Prefect deployments (train-family/b0-b7, ...) and run them")
    s.add_argument("deployments", nargs="*", help="flow/name of those to serve (default: all)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("models", help="print the family table")
    s.add_argument("names", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, StagingError) as exc:
        # Bad input: one clear line naming the problem, non-zero exit, no traceback.
        print(f"effnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
