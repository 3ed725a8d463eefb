"""Training: a recipe (how), a variant (what, from `models`) and a staged dataset version (on what) make one job.

Modules, in the order a job uses them:
- `recipe`: the one typed recipe schema; `recipes/*.yaml` mirror it (a recipe may `extend` another).
- `coefficients`, `baselines`: named coefficient sets and searched baseline tables, stored as files and resolved
  into a recipe's numbers.
- `family`: a family's members as recipes (layered overrides, champions, fine-tuning nights), checked together.
- `cluster`: joining the Ray cluster (or starting a local one on 127.0.0.1) and checking a job fits it.
- `sizing`: the micro-batch that fits a worker's device memory and the gradient accumulation that makes the
  recipe's batch.
- `submit`: a job as a Ray job on the cluster (Jobs API), found again by its key: what the family flow runs;
  `driver` is that Ray job's process (`python -m pipelines.training.driver`).
- `job`: `run_training`, the driver's work: MLflow run, Ray Train's TorchTrainer, val on the chosen checkpoint,
  registration.
- `supervise`: the driver's watch over its Ray Train run: abort, SIGTERM, one progress line per epoch.
- `warm_start`: a job's initial weights from a registered version (fine-tuning, nightly; a new head, or one with
  the rows of the class ids both share).
- `transfer`: registered models onto other datasets as the papers run it: the jobs of each pair, the table.
- `loop`: `train_worker`, the loop on every Ray worker: epochs, minival, early stopping, checkpoints.
- `steps`: the pieces of one step (optimizer, EMA, batch preparation, gradient accumulation, seeding).
- `evaluate`: top-1/top-5/loss of a model on a split, in the loop, on the cluster, or in-process.
- `schedules`: learning rate, EMA decay and the progressive-learning stage settings as pure functions of epoch.
- `augment`: batch augmentations on the device (RandAugment, AutoAugment, mixup/cutmix).
"""
