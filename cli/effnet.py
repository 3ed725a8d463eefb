"""`effnet`: the command line. Each subcommand is a thin wrapper over a flow or a pipeline function (`stage`
answers a version already staged at once, without starting Prefect); the choices it offers (recipes, splits,
loader backends, export formats) are the lists the pipelines define."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pipelines.dataset import BACKENDS, BAD_INPUT, EVAL_SPLITS, EXTRA_FORMATS
from pipelines.inference import EXPORT_FORMATS
from pipelines.registry.tracking import EXPERIMENT
from pipelines.settings import DATA_DIR_ENV, PREFECT_API_ENV, data_layout
from pipelines.source.demo import DEMO_SIZE, write_demo_imagenet
from pipelines.source.records import DEFAULT_VAL_PER_CLASS, SOURCE_KINDS
from pipelines.staging.params import AUTO, DEFAULTS, MIN_TRAIN_PER_CLASS, whole_number
from pipelines.training.driver import add_job_arguments, key_value, train_and_report
from pipelines.training.recipes import list_recipes

TIMEZONE_HELP = (
    "the nightly schedule's timezone, an IANA name such as Europe/Berlin (default: $EFFNET_NIGHTLY_TIMEZONE, else UTC)"
)
RECIPE_HELP = f"a recipe name ({', '.join(list_recipes())}) or the path to a recipe YAML file"


def _prefect_home(data_dir: str | None) -> None:
    """Keep Prefect's local state (ephemeral server database, logs) inside the data directory.

    Must run before prefect is imported; an explicit PREFECT_HOME or PREFECT_API_URL wins.
    """
    layout = data_layout(data_dir).ensure()
    os.environ.setdefault("PREFECT_HOME", str(layout.root / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here, and none wanted


def cmd_demo_data(args: argparse.Namespace) -> int:
    s = write_demo_imagenet(
        args.out,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
    )
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
    from pipelines.dataset import mark_latest
    from pipelines.staging.runners import resolve_workers
    from pipelines.staging.stager import find_finished

    def whole(x: float | int | None) -> float | int | None:
        # Numbers are parsed as floats, so that inf, nan and 1.5 reach staging's checks (one line each) rather
        # than argparse's usage message; whole ones go on as ints, for the flow's typed parameters.
        return int(x) if isinstance(x, float) and x.is_integer() else x

    knobs = dict(
        tiers=[whole(t) for t in args.tiers],
        shard_size=whole(args.shard_size),
        minival=args.minival,
        seed=whole(args.seed),
        jpeg_quality=whole(args.jpeg_quality),
        max_bad_fraction=args.max_bad_fraction,
        formats=args.formats,
    )
    workers = resolve_workers(whole(args.workers))
    floor = 0 if args.allow_small_train else whole_number("--min-train-per-class", whole(args.min_train_per_class), 0)
    # Checks the parameters, the source and the output folder (each fails here, in one line) and returns a
    # finished version at once, without starting Prefect.
    base_version = None if args.full else args.base_version
    vpc = None if args.val_per_class is None else whole_number("--val-per-class", whole(args.val_per_class), 1)
    done = find_finished(
        args.source,
        args.out,
        stage_params(**knobs),
        base_version,
        floor,
        source_kind=args.source_kind,
        val_per_class=vpc,
    )
    if done is not None:
        print(f"already staged: {done.name}", file=sys.stderr)
        mark_latest(done.parent, done.name)
        print(done)
        return 0
    dest = stage_imagenet(
        args.source,
        args.out,
        **knobs,
        base_version=base_version,
        workers=workers,
        progress_bar=progress,
        processes=args.processes,
        min_train_per_class=floor,
        source_kind=args.source_kind,
        val_per_class=vpc,
    )
    print(dest)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.training.recipe import load_recipe, parse_family_member

    sections: dict = {"model": parse_family_member(args.variant)} if args.variant else {}
    return _train(load_recipe(args.recipe), sections, args)


def cmd_finetune(args: argparse.Namespace) -> int:
    """`effnet train` from a registered model's weights: its variant, the recipe's training settings."""
    from pipelines.registry.model_ref import load_model, parse_model_uri
    from pipelines.training.recipe import ModelConfig, load_recipe

    recipe = load_recipe(args.recipe)
    source = load_model(args.model, data_layout(args.data_dir).tracking_uri)
    if not args.model.startswith("models:/"):
        raise ValueError(
            f"{args.model}: fine-tuning starts from a registered version (models:/NAME/VERSION or models:/NAME@ALIAS)"
        )
    # The source's architecture, whatever the recipe's model section says; its training knobs stay.
    model = ModelConfig.of_model_args(source.model_args, recipe.model).model_dump()
    freeze = int(args.freeze) if args.freeze and args.freeze.isdigit() else (args.freeze or 0)
    init = {"from": source.source, "head": args.head, "freeze": freeze, "freeze_epochs": args.freeze_epochs}
    register_as = args.register_as or f"{parse_model_uri(source.source)[0]}-finetuned"
    return _train(recipe.with_overrides(register_as=register_as), {"model": model, "init": init}, args)


def _train(recipe: Any, sections: dict, args: argparse.Namespace) -> int:
    """One job of `recipe` with `sections` and the command's --epochs/--workers over it, run and reported."""
    # `is not None`: an explicit 0 is checked by the recipe schema (and refused), never silently ignored.
    if args.epochs is not None:
        sections["schedule"] = {"epochs": args.epochs}
    if args.workers is not None:
        sections["ray"] = {"num_workers": args.workers}
    recipe = recipe.with_overrides(**sections) if sections else recipe
    tags = dict(key_value("--tag", t) for t in args.tag)
    train_and_report(recipe, args.data, data_layout(args.data_dir), args.ray_address, tags, args.result_file)
    return 0


MODEL_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a checkpoint file (a registered "
    "version's state_dict.pt, a job's checkpoint.pt)"
)


def _dataset_dir(data: str, data_dir: str | None) -> str:
    """A staged version as given: its directory, or its name among the data directory's datasets."""
    if os.path.isdir(data):
        return data
    named = data_layout(data_dir).datasets / data
    if named.is_dir():
        return str(named)
    raise FileNotFoundError(f"--data {data}: neither a directory nor a staged version in {named.parent}")


def _write_result(result: dict, out: str | None) -> None:
    if out:
        from pipelines.atomic import atomic_write_json

        atomic_write_json(out, result)
    else:
        print(json.dumps(result, indent=1))


def cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.inference.evaluation import evaluate_model, log_evaluation
    from pipelines.registry.model_ref import load_model

    layout = data_layout(args.data_dir)
    dataset = _dataset_dir(args.data, args.data_dir)
    loaded = load_model(args.model, layout.tracking_uri)
    result = evaluate_model(
        loaded, dataset, args.split, backend=args.backend, batch_size=args.batch_size, per_class=args.per_class
    )
    if args.mlflow:
        result["mlflow_run"] = log_evaluation(layout.tracking_uri, layout.artifact_root, result, loaded.run_id)
    _write_result(result, args.out)
    print(
        f"{loaded.source} on {result['dataset']} {args.split}: top-1 {result['top1']:.2f}, top-5 "
        f"{result['top5']:.2f}, loss {result['loss']:.4f} ({result['samples']} images at {result['resolution']} px)",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines.inference.export import export_model
    from pipelines.registry.model_ref import load_model

    layout = data_layout(args.data_dir)
    loaded = load_model(args.model, layout.tracking_uri)
    report = export_model(loaded, args.format, args.out)
    if args.attach:
        from pipelines.inference.export import attach_export

        report["artifact"] = attach_export(layout.tracking_uri, loaded, report)
    print(json.dumps(report, indent=1))
    return 0


def cmd_family(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.train_family import FamilyFailed, train_family

    overrides = {"schedule": {"epochs": args.epochs}} if args.epochs is not None else None
    try:
        train_family(
            args.variants, recipe=args.recipe, dataset_dir=args.data, data_dir=args.data_dir, overrides=overrides
        )
    except FamilyFailed as exc:  # the others trained; the summary above says which variant failed and why
        print(f"effnet family: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.demo import demo

    layout = data_layout(args.data_dir)
    demo(data_dir=str(layout.root), epochs=args.epochs)
    if layout.stack is not None:
        ui = (
            f"The runs and models are on the stack's MLflow server: {layout.stack.mlflow_tracking_uri} "
            f"(experiment '{EXPERIMENT}', Models tab for the registry)."
        )
    else:
        ui = (
            f"Open the MLflow UI with:\n"
            f"  .venv/bin/mlflow ui --backend-store-uri {layout.tracking_uri} "
            f"--default-artifact-root {layout.mlflow_artifacts} --port 5000\n"
            f"then browse http://127.0.0.1:5000 (experiment '{EXPERIMENT}', Models tab for the registry)."
        )
    print(
        f"\nResults are in {layout.root}:\n"
        f"  demo archives   {layout.demo_archives}\n  staged shards   {layout.datasets}\n"
        f"  MLflow store    {layout.mlflow_db}\n  Ray storage     {layout.ray_storage}\n{ui}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    from flows.deployments import serve_all

    serve_all(args.deployments or None, timezone=args.timezone)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    _prefect_home(args.data_dir)
    if not os.environ.get(PREFECT_API_ENV):
        # Prefect would deploy to a temporary server of this command's own, which forgets them as it exits.
        raise ValueError("no Prefect server to deploy to: start the stack (make up) or set PREFECT_API_URL")
    from flows.deployments import deploy_all

    ids = deploy_all(args.pool, args.deployments or None, timezone=args.timezone)
    print(f"{len(ids)} deployment(s) on work pool {args.pool}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipelines.dataset import check_version, read_manifest, version_files

    check_version(args.version, checksums=not args.sizes_only)
    files = version_files(read_manifest(args.version))
    what = "sizes" if args.sizes_only else "sizes and sha256"
    print(
        f"{args.version}: {len(files)} files, {sum(f.get('bytes', 0) for f in files):,} bytes, {what} as in "
        "the manifest"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.summary import family_table, format_table

    rows = family_table(args.names or None)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def _schedule_arguments(s: argparse.ArgumentParser) -> None:
    """The recipe fields a job's command changes directly (over the recipe's own)."""
    s.add_argument("--epochs", type=int, help="schedule.epochs")
    s.add_argument("--workers", type=int, help="ray.num_workers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effnet", description="Train the EfficientNet family on ImageNet.")
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"where archives, shards, MLflow and Ray state live (default ${DATA_DIR_ENV} or ./data)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-data", help="write a small ImageNet in the ILSVRC2012 archive format")
    s.add_argument("out")
    s.add_argument("--classes", type=int, default=DEMO_SIZE.num_classes)
    s.add_argument("--train-per-class", type=int, default=DEMO_SIZE.train_per_class)
    s.add_argument("--val-per-class", type=int, default=DEMO_SIZE.val_per_class)
    s.add_argument("--seed", type=int, default=DEMO_SIZE.seed)
    s.set_defaults(fn=cmd_demo_data)

    s = sub.add_parser(
        "stage",
        help="stage a dataset as distributed (ILSVRC2012, ImageNet-21k, CIFAR, Flowers-102, Stanford Cars, idx "
        "files, class folders) into shards",
    )
    s.add_argument("--source", required=True, help="the folder holding the dataset's files as distributed")
    s.add_argument(
        "--source-kind",
        choices=SOURCE_KINDS,
        default=None,
        help="the kind of source, instead of detecting it from the file names",
    )
    s.add_argument(
        "--val-per-class",
        type=float,
        default=None,
        help=f"images of each class held out as val where the dataset has no val split (ImageNet-21k, class "
        f"folders without val/ or test/; default {DEFAULT_VAL_PER_CLASS})",
    )
    s.add_argument("--out", required=True, help="datasets root; the version goes in a sub-folder")
    # Numbers as floats: staging checks them (whole numbers, ranges, inf and nan) and says what is wrong in a line.
    s.add_argument(
        "--tiers",
        type=float,
        nargs="+",
        default=list(DEFAULTS.tiers),
        help=f"shorter sides in px (default {' '.join(map(str, DEFAULTS.tiers))})",
    )
    s.add_argument("--shard-size", type=float, default=DEFAULTS.shard_size)
    s.add_argument(
        "--minival",
        type=float,
        default=DEFAULTS.minival,
        help="images held out of train (a whole number), or a fraction < 1 of each class",
    )
    small = s.add_mutually_exclusive_group()
    small.add_argument(
        "--min-train-per-class",
        type=float,
        default=MIN_TRAIN_PER_CLASS,
        help="refuse a minival that leaves a class fewer train images (default %(default)s)",
    )
    small.add_argument(
        "--allow-small-train",
        action="store_true",
        help="stage even if the minival leaves a class fewer than --min-train-per-class images",
    )
    s.add_argument("--seed", type=float, default=DEFAULTS.seed)
    s.add_argument("--jpeg-quality", type=float, default=DEFAULTS.jpeg_quality)
    s.add_argument("--max-bad-fraction", type=float, default=DEFAULTS.max_bad_fraction)
    s.add_argument(
        "--formats",
        nargs="*",
        default=list(DEFAULTS.formats),
        choices=EXTRA_FORMATS,
        help="extra files beside the WebDataset shards: FFCV .beton per tier, DALI shard indexes "
        "(either makes the stage a full one, not incremental)",
    )
    growth = s.add_mutually_exclusive_group()
    growth.add_argument(
        "--base-version",
        default=AUTO,
        help=f"version to add new images to: '{AUTO}' (the latest one the source grew from) or a name",
    )
    growth.add_argument("--full", action="store_true", help="stage every image afresh, not on top of a version")
    s.add_argument(
        "--workers", type=float, default=None, help="units (classes, val chunks) decoded at once (default: all cores)"
    )
    s.add_argument(
        "--processes",
        action="store_true",
        help="decode in worker processes rather than threads (scales further on many cores)",
    )
    s.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar with ETA on stderr (default: when stderr is a terminal)",
    )
    s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("train", help="train one variant on Ray, early-stop on minival, register in MLflow")
    s.add_argument("--variant", help="e.g. efficientnet_b0, or phi=-3 for B0 compound-scaled")
    s.add_argument("--recipe", default="v1", help=RECIPE_HELP)
    s.add_argument("--data", required=True, help="a staged dataset version directory")
    _schedule_arguments(s)
    add_job_arguments(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "finetune",
        help="train from a registered model's weights (recipe section `init`), e.g. on other classes with a new head",
    )
    s.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    s.add_argument("--data", required=True, help="a staged dataset version directory")
    s.add_argument(
        "--recipe", default="finetune", help=RECIPE_HELP + " (default: finetune, the V2 paper's transfer settings)"
    )
    s.add_argument(
        "--head",
        default="reset",
        choices=("reset", "keep", "match"),
        help="reset (a new classifier for the dataset's classes, the default), keep (the same classes) or match "
        "(the rows of the class ids both datasets share start from the source's: ImageNet-21k onto ILSVRC2012)",
    )
    s.add_argument(
        "--freeze",
        help="for the first --freeze-epochs: the stem and this many stages, or 'backbone' "
        "(everything but the classifier)",
    )
    s.add_argument("--freeze-epochs", type=int, default=0)
    s.add_argument(
        "--register-as",
        help="the registered model of the new versions, a task of its own (default: "
        "the source's name + '-finetuned'); its champion is decided among them",
    )
    _schedule_arguments(s)
    add_job_arguments(s)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("eval", help="evaluate a trained model on a staged split with its own preprocessing")
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("--data", required=True, help="a staged dataset version: its directory or its name")
    s.add_argument("--split", default="val", choices=EVAL_SPLITS)
    s.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS, help="the loader (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--per-class", action="store_true", help="each class's top-1 too")
    s.add_argument("--mlflow", action="store_true", help="also log the evaluation as an MLflow run (run_kind eval)")
    s.add_argument("--out", help="write the result (JSON) to this file instead of stdout")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("export", help="export a trained model to ONNX, TorchScript or PT2, checked by running it")
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    s.add_argument("--out", required=True, help="the file to write")
    s.add_argument(
        "--attach",
        action="store_true",
        help="also log the file to the model's MLflow run (export/) and tag its registered version with it",
    )
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("family", help="train several variants (the train-family flow)")
    s.add_argument("variants", nargs="+")
    s.add_argument("--recipe", default="v1", help=RECIPE_HELP)
    s.add_argument("--data", default=None, help="dataset version directory (default: latest staged)")
    s.add_argument("--epochs", type=int)
    s.set_defaults(fn=cmd_family)

    s = sub.add_parser("demo", help="the main job end to end on the built-in demo dataset")
    s.add_argument("--epochs", type=int)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "serve",
        help="register the Prefect deployments (train-family/b0-b7, ...) and run them "
        "in this process, without a work pool or worker",
    )
    s.add_argument("deployments", nargs="*", help="flow/name of those to serve (default: all)")
    s.add_argument("--timezone", help=TIMEZONE_HELP)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser(
        "deploy",
        help="register the deployments on a Prefect work pool, whose worker runs them "
        "(what the stack does; `serve` is the one-process alternative)",
    )
    s.add_argument("deployments", nargs="*", help="flow/name of those to deploy (default: all)")
    s.add_argument("--pool", required=True, help="a `process` work pool on the Prefect server (the stack's: effnet)")
    s.add_argument("--timezone", help=TIMEZONE_HELP)
    s.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("verify", help="check a staged version's files against its manifest (sizes and checksums)")
    s.add_argument("version", help="a staged dataset version directory")
    s.add_argument(
        "--sizes-only",
        action="store_true",
        help="only check that every file exists with its size (what every training job checks before it starts)",
    )
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("models", help="print the family table")
    s.add_argument("names", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)
    return p


# Commands that start servers of their own (a temporary Prefect server, a local Ray instance).
STARTS_SERVERS = ("stage", "train", "finetune", "family", "demo")


def main(argv: Sequence[str] | None = None, watch: bool | None = None) -> int:
    """The `effnet` command. `watch` (default: when run as the program, not called from Python) starts the
    watchdog that stops the servers a command started if the command is killed."""
    args = build_parser().parse_args(argv)
    if (argv is None if watch is None else watch) and args.command in STARTS_SERVERS:
        from pipelines import watchdog

        watchdog.start()
    try:
        # Before Prefect, MLflow or Ray is imported: a stack started on this data directory is used by every
        # command (its servers, its Ray head); without one, local stores and a local Ray on 127.0.0.1.
        data_layout(args.data_dir).use_stack(check=args.command not in ("models", "demo-data", "verify"))
        return args.fn(args)
    except BAD_INPUT as exc:
        # Bad input: one clear line naming the problem, non-zero exit, no traceback.
        print(f"effnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
