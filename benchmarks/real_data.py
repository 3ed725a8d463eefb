"""The project's `small` recipe on real photos (Fashion-MNIST), against classical methods on the same images.

Fashion-MNIST: Zalando's 28x28 grey article photos, 60,000 train and 10,000 test, ten classes, as Debian's
`dataset-fashion-mnist` installs them (`make setup` does, as root). Two parts, each optional (`--parts`):

- `subset`: the first 1,000 train and 200 test images of each class (`write_idx_subset`), staged by the project
  as a user stages it (the idx kind, `--minival` of train held out), then per seed one real job (`run_training`:
  Ray Train, 2 CPU workers, MLflow, early stopping on minival, val on the chosen checkpoint only) with the recipe
  (`--recipe`, default `small`). Side by side, on the same training images (the staged train split, minival
  excluded, as their original pixels) and the same 2,000 test images: scikit-learn's logistic regression and an
  RBF SVC (C=1, gamma='scale': the defaults; Fashion-MNIST's published SVC figure is 89.7 on the full set).
  Goal: the recipe's mean val top-1 over the seeds above the SVC's, with a model under 1M parameters, each job
  under 20 minutes on 2 cores.
- `full`: the whole dataset (6,000 of each class's train images minus minival, all 10,000 test images), the
  project alone (`--full-epochs`, `--full-seeds`). Goal: >= 93% test top-1 with a model under 1M parameters
  (the published table: MobileNet 95.0, ResNet-18 94.9, DenseNet-BC 768K params 95.4).

The test images (staged as `val`) are only ever scored, never used to choose anything: early stopping and the
checkpoint use minival. Per-seed figures, mean and spread (population standard deviation) and the wall-clock
times go to benchmarks/results/real_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "real_data.json"
# Run as a script, this folder comes first on sys.path, where models.py would shadow the `models` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine, spread, write_report  # noqa: E402
from pipelines.source.idx import DEBIAN_FASHION_MNIST  # noqa: E402

PARAMS_LIMIT = 1_000_000
SUBSET_MINUTES_LIMIT = 20
FULL_GOAL_TOP1 = 93.0


def stage_fashion_mnist(source: Path, out: Path, tiers: tuple[int, ...], minival: float) -> Path:
    """Stage an idx folder as `effnet stage` does (the idx kind detected from its files)."""
    from pipelines.staging.params import StageParams
    from pipelines.staging.stager import stage

    params = StageParams(tiers=tiers, shard_size=1024, minival=minival, seed=0, max_bad_fraction=0.0)
    return stage(source, out, params, log=lambda *_: None, workers=os.cpu_count() or 1)


def staged_pixels(source: Path, dataset: Path) -> dict[str, tuple]:
    """(images as N x 784 floats in [0, 1], labels) of the staged train split (the source's train images less
    minival) and of the test images (staged as val), read from the idx files: the same images the job sees."""
    import numpy as np

    from pipelines.dataset import read_manifest
    from pipelines.source.idx import TEST_SPLIT, TRAIN_SPLIT, read_split, record_key

    held_out = set(read_manifest(dataset).minival_keys)
    images, labels = read_split(source, TRAIN_SPLIT)
    train = np.array([record_key(TRAIN_SPLIT, i) not in held_out for i in range(len(labels))])
    test_images, test_labels = read_split(source, TEST_SPLIT)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255  # noqa: E731
    return {"train": (flat(images[train]), labels[train]), "test": (flat(test_images), test_labels)}


def classical_rows(pixels: dict[str, tuple]) -> list[dict]:
    """Logistic regression and an RBF SVC fitted on the train pixels, scored on the test pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    (x, y), (xt, yt) = pixels["train"], pixels["test"]
    rows = []
    for name, model in (("logistic_regression", LogisticRegression(max_iter=1000)), ("rbf_svc", SVC())):
        t0 = time.time()
        model.fit(x, y)
        top1 = 100 * float((model.predict(xt) == yt).mean())
        rows.append({"method": name, "val_top1": top1, "seconds": time.time() - t0})
        print(f"{name:22s} test top-1 {top1:5.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def project_row(recipe, dataset: Path, work: Path, label: str) -> dict:
    """One real job of the recipe on the staged version: its chosen checkpoint's figures and times."""
    from mlflow.tracking import MlflowClient

    from pipelines.settings import DataLayout
    from pipelines.training.job import run_training

    layout = DataLayout(work / f"data-{label}").ensure()
    t0 = time.time()
    result = run_training(recipe, dataset, layout)
    job_seconds = time.time() - t0
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    epochs = c.get_metric_history(result.run_id, "epoch_seconds")
    row = {"method": recipe.name, "seed": recipe.seed, "variant": result.variant,
           "params": result.params, "minival_top1": result.minival_top1, "val_top1": result.val_top1,
           "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
           "train_seconds": sum(m.value for m in epochs), "job_seconds": job_seconds}
    print(f"{label:22s} seed {recipe.seed}: minival {row['minival_top1']:5.2f}  test {row['val_top1']:5.2f}  "
          f"{row['params']:,} params  {row['epochs_run']} epochs  job {job_seconds / 60:.1f} min", flush=True)
    return row


def project_summary(rows: list[dict]) -> dict:
    return {f: spread([r[f] for r in rows]) for f in ("minival_top1", "val_top1", "job_seconds")}


def run_subset(args: argparse.Namespace, recipe, work: Path) -> dict:
    from pipelines.source.samples.idx import write_idx_subset

    source = write_idx_subset(args.source, work / "subset" / "fashion-mnist", per_class_train=args.train_per_class,
                              per_class_test=args.test_per_class)
    dataset = stage_fashion_mnist(source, work / "datasets", tuple(args.tiers), args.minival)
    classical = classical_rows(staged_pixels(source, dataset))
    runs = [project_row(recipe.model_copy(update={"seed": s}), dataset, work, f"subset-{s}") for s in args.seeds]
    summary = project_summary(runs)
    svc = next(r["val_top1"] for r in classical if r["method"] == "rbf_svc")
    goal = {
        "text": f"mean test top-1 over the seeds above the RBF SVC's, under {PARAMS_LIMIT:,} parameters, each job "
        f"under {SUBSET_MINUTES_LIMIT} minutes on this machine",
        "margin_over_svc_points": summary["val_top1"]["mean"] - svc,
        "met": summary["val_top1"]["mean"] > svc and all(r["params"] < PARAMS_LIMIT for r in runs)
        and all(r["job_seconds"] < 60 * SUBSET_MINUTES_LIMIT for r in runs),
    }
    return {"train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
            "dataset": str(dataset.name), "classical": classical, "runs": runs, "summary": summary, "goal": goal}


def run_full(args: argparse.Namespace, recipe, work: Path) -> dict:
    dataset = stage_fashion_mnist(args.source, work / "datasets", tuple(args.tiers), args.minival)
    full = recipe.with_overrides(schedule={"epochs": args.full_epochs}) if args.full_epochs else recipe
    runs = [project_row(full.model_copy(update={"seed": s}), dataset, work, f"full-{s}") for s in args.full_seeds]
    summary = project_summary(runs)
    return {"dataset": str(dataset.name), "epochs": full.schedule.epochs, "runs": runs, "summary": summary,
            "goal": {"text": f">= {FULL_GOAL_TOP1}% mean test top-1 under {PARAMS_LIMIT:,} parameters",
                     "met": summary["val_top1"]["mean"] >= FULL_GOAL_TOP1
                     and all(r["params"] < PARAMS_LIMIT for r in runs)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST, help="Fashion-MNIST's idx files' folder")
    p.add_argument("--parts", nargs="+", choices=("subset", "full"), default=["subset", "full"])
    p.add_argument("--recipe", default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--full-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--full-epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--tiers", type=int, nargs="+", default=[64],
                   help="staged sizes (the photos are 28 px; the small recipe trains at 64)")
    p.add_argument("--minival", type=float, default=0.1, help="fraction of each class's train images held out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        print(f"real_data: skipped: no Fashion-MNIST at {args.source} (sudo apt-get install dataset-fashion-mnist)")
        return 0

    from pipelines.training.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = Path(tempfile.mkdtemp(prefix="bench-real-data-"))
    report: dict = {"benchmark": "real_data", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": machine(), "recipe": recipe.model_dump(mode="json"),
                    "setup": {"tiers": args.tiers, "minival": args.minival}}
    if "subset" in args.parts:
        report["subset"] = run_subset(args, recipe, work)
    if "full" in args.parts:
        report["full"] = run_full(args, recipe, work)
    print(json.dumps({part: report[part]["summary"] for part in args.parts}, indent=1))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
