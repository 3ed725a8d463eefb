"""Why the demo recipe underfits real photos: each hypothesis one arm, measured on Fashion-MNIST.

The images are benchmarks/real_data.py's subset (the first 1,000 train and 200 test images of each class,
staged at 32 and 64 px, 10% of train held out as minival). Every arm trains through the project's own loop
(`build_worker`, `run_epoch`: the same loaders, steps, schedules, EMA and early-stopping record as a Ray Train
worker) in one process with 2 threads and a batch of 32 (the demo's global batch, 2 workers x 16), 10 epochs, the
chosen checkpoint (best minival) scored on the 2,000 test images; each arm also scores that checkpoint with the
whole image at evaluation (crop ratio 1), which separates what the eval crop costs from what training learnt.
One process rather than two Ray workers: the arms differ in one knob each, and this halves their cost.

Arms (recipe overrides over `--base`): `demo` as shipped; `whole` (no random-resized crop, whole image at eval);
then one change each over `whole`: BN momentum 0.1, no dropout or stochastic depth, 3x the learning rate, 32 px,
shifts of up to 1/8. Writes benchmarks/results/real_data_ablation.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "real_data_ablation.json"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine, write_report  # noqa: E402
from pipelines.source.idx import DEBIAN_FASHION_MNIST  # noqa: E402

WHOLE = {"model": {"crop_ratio": 1.0}, "data": {"rrc_scale": [1.0, 1.0], "rrc_ratio": [1.0, 1.0]}}


def arms() -> dict[str, dict]:
    """Each arm's recipe sections over the base (`whole` and the arms after it change one knob of it)."""
    from pipelines.training.recipe import merge_sections

    def over_whole(**sections: dict) -> dict:
        return merge_sections(WHOLE, sections)

    return {
        "demo": {},
        "whole": WHOLE,
        "whole+bn_momentum_0.1": over_whole(model={"bn_momentum": 0.1}),
        "whole+no_dropout_or_stochastic_depth": over_whole(model={"dropout": 0.0, "stochastic_depth": 0.0}),
        "whole+lr_x3": over_whole(optim={"lr_per_256": 0.072}),
        "whole+32px": over_whole(model={"resolution": 32, "eval_resolution": 32}),
        "whole+translate_0.125": over_whole(augment={"translate": 0.125}),
    }


def run_arm(recipe, dataset: str, label: str, work: Path) -> dict:
    """Train `recipe` through the loop's own functions in this process; the chosen checkpoint scored."""
    import torch

    from pipelines.dataset import read_manifest
    from pipelines.loading import make_loader
    from pipelines.training.evaluate import evaluate
    from pipelines.training.loop import CheckpointClock, JobSpec, LoopState, build_worker, run_epoch

    job = JobSpec(recipe=recipe, dataset_dir=dataset, num_classes=len(read_manifest(dataset).classes),
                  tracking_uri=f"sqlite:///{work / 'mlflow.db'}", run_id="")
    worker = build_worker(job, 0, 1, torch.device("cpu"))
    worker.client = None  # nothing is tracked: the figures go to the report
    state, clock, chosen = LoopState(history=[]), CheckpointClock(None, None), None
    t0 = time.time()
    for epoch in range(recipe.schedule.epochs):
        row = run_epoch(worker, state, epoch, clock)
        if state.best_epoch == epoch:
            chosen = copy.deepcopy(worker.scored.state_dict())
        print(f"{label:40s} epoch {epoch}: train loss {row['train_loss']:.3f}  minival {row['minival_top1']:5.2f}",
              flush=True)
    seconds = time.time() - t0
    model = worker.scored
    model.load_state_dict(chosen)
    spec = worker.spec

    def top1(split: str, crop_ratio: float) -> float:
        loader = make_loader(dataset, split, spec.eval_resolution, 128, crop_ratio=crop_ratio)
        return evaluate(model, loader, torch.device("cpu"), recipe.runtime.channels_last, False)["top1"]

    out = {"arm": label, "best_epoch": state.best_epoch, "minival_top1": state.best_top1,
           "val_top1": top1("val", spec.crop_ratio), "val_top1_whole_image": top1("val", 1.0),
           "train_loss_last": state.history[-1]["train_loss"], "train_loss_per_epoch":
           [r["train_loss"] for r in state.history], "minival_per_epoch": [r["minival_top1"] for r in state.history],
           "eval_resolution": spec.eval_resolution, "crop_ratio": spec.crop_ratio, "seconds": seconds}
    print(f"{label:40s} val {out['val_top1']:5.2f} (whole image {out['val_top1_whole_image']:5.2f})  "
          f"{seconds / 60:.1f} min", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    p.add_argument("--base", default="demo", help="the recipe every arm changes")
    p.add_argument("--arms", nargs="+", default=None, help="default: all")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        print(f"real_data_ablation: skipped: no Fashion-MNIST at {args.source} (apt-get install dataset-fashion-mnist)")
        return 0

    from pipelines.source.samples.idx import write_idx_subset
    from pipelines.staging.params import StageParams
    from pipelines.staging.stager import stage
    from pipelines.training.recipe import load_recipe, merge_sections

    work = Path(tempfile.mkdtemp(prefix="bench-real-data-ablation-"))
    source = write_idx_subset(args.source, work / "fashion-mnist", per_class_train=1000, per_class_test=200)
    params = StageParams(tiers=(32, 64), shard_size=1024, minival=0.1, seed=0, max_bad_fraction=0.0)
    dataset = str(stage(source, work / "datasets", params, log=lambda *_: None, workers=os.cpu_count() or 1))
    base = load_recipe(args.base)
    # One process stands for the recipe's workers: their global batch in one, both cores its threads.
    one_process = {"data": {"batch_size": base.data.batch_size * base.ray.num_workers},
                   "runtime": {"torch_threads": os.cpu_count() or 1}, "schedule": {"epochs": args.epochs,
                                                                                   "patience": None}}
    rows = []
    for label, sections in arms().items():
        if args.arms and label not in args.arms:
            continue
        rows.append(run_arm(base.with_overrides(**merge_sections(one_process, sections)), dataset, label, work))
    write_report(args.out, {"benchmark": "real_data_ablation", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                 time.gmtime()), "machine": machine(), "base": args.base, "epochs": args.epochs,
                 "arms": {label: sections for label, sections in arms().items()}, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
