"""Training: a recipe (how), a variant (what, from `models`) and a staged dataset version (on what) make one job.

Modules, in the order a job uses them:
- `recipe`: the one typed recipe schema; `recipes/*.yaml` mirror it (a recipe may `extend` another).
- `cluster`: joining the Ray cluster (or starting a local one on 127.0.0.1) and checking a job fits it.
- `sizing`: the micro-batch that fits a worker's device memory and the gradient accumulation that makes the
  recipe's batch.
- `submit`: a job as a Ray job on the cluster (Jobs API), found again by its key: what the family flow runs.
- `job`: `run_training`, the driver: MLflow run, Ray Train's TorchTrainer, val on the chosen checkpoint,
  registration.
- `worker`: `train_worker`, the loop on every Ray worker: epochs, minival, early stopping, checkpoints.
- `schedules`: learning rate, EMA decay and the progressive-learning stage settings as pure functions of epoch.
- `augment`: batch augmentations on the device (RandAugment, AutoAugment, mixup/cutmix).
- `tracking`: MLflow: the experiment, runs, metrics, tag names (`Tags`), registration and the champion alias.
"""
